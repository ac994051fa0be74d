"""async_inputs: packed batches bring their example boundaries from the host, the planner takes them without
reading the GPU, and training computes what it computes without them (the training run: tests/train/test_attention.py,
beside the read-back and block-mask runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from oasst_model import attention, packing, patches
from tests.train.test_attention import TOL, _forbid_fallback, _ids, _pair, varlen_calls  # noqa: F401 - fixture

# Two packed rows as trl's bfd packing makes them (examples' lengths per row), padded to a multiple of 16.
ROWS = [[11, 23, 7], [30, 14]]


def _collated(wrap: bool, collate: Any = None) -> dict[str, Any]:
    """The rows through trl's padding-free collator (or `collate`), and through async_inputs' collator around it
    when `wrap`."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from oasst_train.async_inputs import async_inputs

    seqs = iter(_ids([n for row in ROWS for n in row], seed=5))
    features = [{"input_ids": torch.cat([next(seqs) for _ in row]).tolist(), "seq_lengths": row} for row in ROWS]
    collate = collate or DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)
    if not wrap:
        return collate(features)

    class Trainer:  # what async_inputs reads of an SFTTrainer
        data_collator = staticmethod(collate)
        padding_free = True
        model = _pair_model()

    trainer = Trainer()
    assert async_inputs(trainer)
    return trainer.data_collator(features)


def _pair_model() -> torch.nn.Module:
    """A module holding a fused-attention plan and a parameter on the CPU, as async_inputs looks for them."""
    holder = torch.nn.Linear(1, 1)
    holder._oasst_plan = attention._Plan()
    return holder


def test_collated_boundaries_are_the_planners_own(varlen_calls: list[tuple[list[int], int]]) -> None:
    """The boundaries async_inputs' collator hands over equal those the planner reads back from the position ids
    (trl's padding tail included), and trl's keys are replaced by them, never dropped."""
    plain, ours = _collated(False), _collated(True)
    boundaries, longest = packing.packed_boundaries(plain["position_ids"])
    assert ours["cu_seq_lens_q"].tolist() == ours["cu_seq_lens_k"].tolist() == boundaries.tolist()
    assert ours["cu_seq_lens_q"].dtype == torch.int32 and ours["max_length_q"] == ours["max_length_k"] == longest == 30
    assert boundaries.tolist() == [0, 11, 34, 41, 71, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96]
    assert plain["cu_seq_lens_q"].tolist() == boundaries.tolist()  # trl's own rule agrees on its own batches
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(plain[key], ours[key])


def test_the_collator_replaces_boundaries_that_disagree_with_the_position_ids(
        varlen_calls: list[tuple[list[int], int]]) -> None:
    """Keys a collator filled by another rule (here: wrong ones) are replaced by the planner's own."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trl_collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)

    def other_rule(features: Any) -> dict[str, Any]:
        batch = trl_collate(features)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 3, batch["input_ids"].numel()],
                                                                       dtype=torch.int32)
        batch["max_length_q"] = batch["max_length_k"] = 93
        return batch

    ours = _collated(True, other_rule)
    boundaries, longest = packing.packed_boundaries(ours["position_ids"])
    assert ours["cu_seq_lens_q"].tolist() == ours["cu_seq_lens_k"].tolist() == boundaries.tolist()
    assert ours["max_length_q"] == ours["max_length_k"] == longest == 30


def test_rows_of_one_example_each_stay_on_the_causal_kernel(tiny_falcon: Path,
                                                            varlen_calls: list[tuple[list[int], int]]) -> None:
    """Collated boundaries that make every row one example give the plain causal plan, as the read-back does."""
    _, fused = _pair(tiny_falcon)
    ids = torch.stack(_ids([9, 9], seed=2))
    positions = torch.arange(9).repeat(2, 1)
    boundaries, longest = packing.packed_boundaries(positions)
    inputs = {"input_ids": ids, "position_ids": positions, "labels": ids, "cu_seq_lens_q": boundaries,
              "max_length_q": longest}
    with torch.no_grad():
        read_back = _log_probs(fused, inputs)
        assert fused.transformer._oasst_plan.mode == "causal"
        attention.use_collated_boundaries(fused)
        collated = _log_probs(fused, inputs)
    assert fused.transformer._oasst_plan.mode == "causal" and not varlen_calls
    assert torch.equal(collated, read_back)


def _log_probs(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Per-token log-probs through trl's fused LM head, the path training takes (it hands the body the batch's
    other keys; FalconForCausalLM's own forward drops them)."""
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_test_fused_head", False):
        add_fused_lm_head(model)
        model._test_fused_head = True
    return model(**inputs, fused_lm_head=True).log_probs


def test_the_planner_takes_collated_boundaries_without_reading_the_gpu(
        tiny_falcon: Path, varlen_calls: list[tuple[list[int], int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """With use_collated_boundaries, a packed forward never computes example starts from the (device) position ids:
    the kernel gets the collated boundaries and the logits equal the read-back plan's."""
    _, fused = _pair(tiny_falcon)
    _forbid_fallback(fused)
    batch = _collated(True)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "cu_seq_lens_q", "max_length_q")}
    with torch.no_grad():
        read_back = _log_probs(fused, inputs)
        assert attention.use_collated_boundaries(fused) == 1
        monkeypatch.setattr(attention, "example_starts", lambda *a: pytest.fail("read the position ids back"))
        collated = _log_probs(fused, inputs)
    assert fused.transformer._oasst_plan.mode == "varlen"
    assert (collated - read_back).abs().max() < TOL and read_back.abs().sum() > 0
    assert varlen_calls[0] == varlen_calls[-1] == (batch["cu_seq_lens_q"].tolist(), attention.VARLEN_MIN_BOUND)


@pytest.mark.parametrize("bad", ["int64", "no_longest", "longest_too_big", "one_boundary", "other_device", "off",
                                 "switched_off"])
def test_unusable_or_unasked_collated_boundaries_are_read_back(tiny_falcon: Path, bad: str,
                                                                varlen_calls: list[tuple[list[int], int]]) -> None:
    """Boundaries of the wrong dtype, without their longest example, out of range, or with the switch off: the
    planner reads the position ids back as before (wrong boundaries handed in then change nothing)."""
    _, fused = _pair(tiny_falcon)
    if bad != "off":
        attention.use_collated_boundaries(fused)
    if bad == "switched_off":  # another trainer switched the model, this one did not ask
        attention.use_collated_boundaries(fused, False)
    batch = _collated(True)
    right = batch["cu_seq_lens_q"].tolist()
    wrong = torch.tensor([0, 5, batch["input_ids"].numel()], dtype=torch.int32)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"],
              "cu_seq_lens_q": {"int64": wrong.long(), "one_boundary": wrong[:1],
                                "other_device": wrong.to("meta")}.get(bad, wrong),
              "max_length_q": {"longest_too_big": 10**6, "no_longest": None}.get(bad, 30)}
    with torch.no_grad():
        _log_probs(fused, inputs)
    assert varlen_calls == [(right, attention.VARLEN_MIN_BOUND)] * 2


def test_async_inputs_steps_aside_without_a_plan_packing_or_varlen_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fused attention, unpacked batches, or a device without the varlen kernel (the block mask is built from
    the position ids there): nothing wrapped, recorded as not needed."""
    from oasst_train.async_inputs import async_inputs

    def collate(features: Any) -> Any:
        return features

    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda",))
    for model, packed, why in ((torch.nn.Linear(2, 2), True, "no fused attention"),
                               (_pair_model(), False, "not packed"), (_pair_model(), True, "packed rows on cpu")):
        patches.begin_run()
        trainer = type("T", (), {"data_collator": staticmethod(collate), "padding_free": packed, "model": model})()
        assert not async_inputs(trainer)
        assert trainer.data_collator is collate
        assert why in patches.report()["collated_boundaries"]["detail"], why


def test_loader_args_pin_and_copy_without_waiting_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-blocking copy is asked for only where there is a CUDA device to copy to."""
    from oasst_train.async_inputs import loader_args

    assert loader_args(True) == {} == loader_args(False)  # this machine has no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_args(True) == {"dataloader_pin_memory": True, "accelerator_config": {"non_blocking": True}}
    assert loader_args(False) == {}


def test_changed_trl_collator_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """trl's collator without the boundary keys: the patch is off with one warning, batches go through untouched."""
    import trl.trainer.sft_trainer as sft

    from oasst_train.async_inputs import async_inputs

    class Collator:
        def __call__(self, features: Any) -> Any:
            return features

    monkeypatch.setattr(sft, "DataCollatorForLanguageModeling", Collator)
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))  # as on a GPU: the patch is asked
    patches.begin_run()
    trainer = type("T", (), {"data_collator": Collator(), "padding_free": True, "model": _pair_model()})()
    before = trainer.data_collator
    assert not async_inputs(trainer)
    assert trainer.data_collator is before and not trainer.model._oasst_plan.collated
    err = capsys.readouterr().err
    assert err.count("warning: patch collated_boundaries is off") == 1 and '"cu_seq_lens_q"' in err
    assert patches.report()["collated_boundaries"]["state"] == "fallback"



@pytest.mark.slow
@pytest.mark.parametrize("changed", [False, True])
def test_a_resumed_epoch_copies_its_batches_as_the_run_asked(oasst: Any, stories_run: Path, stories: Path,
                                                             tmp_path: Path, changed: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed mid-epoch with non-blocking copies asked (as loader_args asks on a GPU): the loader transformers
    rebuilds to skip the seen batches copies every batch non-blocking too (accelerate builds it blocking). Where
    accelerate's loader changed, the run finishes as before and one warning says the patch is off."""
    import shutil

    import accelerate.data_loader

    import oasst_train.arguments
    from tests.train.conftest import GUANACO, RECIPES, STORIES_STEPS, read_summary

    monkeypatch.setattr(oasst_train.arguments, "loader_args",
                        lambda enabled: {"accelerator_config": {"non_blocking": True}} if enabled else {})
    copies: list[bool] = []
    own_send = accelerate.data_loader.send_to_device

    def send_to_device(batch: Any, device: Any, non_blocking: bool = False, **kwargs: Any) -> Any:
        copies.append(non_blocking)
        return own_send(batch, device, non_blocking=non_blocking, **kwargs)

    monkeypatch.setattr(accelerate.data_loader, "send_to_device", send_to_device)
    if changed:  # a release whose loader keeps its copy mode elsewhere (the check reads the class's source)
        class DataLoaderShard(accelerate.data_loader.DataLoaderShard):
            """Renamed state."""

        monkeypatch.setattr(accelerate.data_loader, "DataLoaderShard", DataLoaderShard)
    out = tmp_path / "run"
    shutil.copytree(stories_run, out)
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{STORIES_STEPS}")
    previous = STORIES_STEPS // 2  # mid-epoch: the recipe's 171 rows make 22 steps an epoch
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO, "--out",
                   out, "--max-steps", previous + 2, "--save-steps", 30, "--async-inputs", "-q", "--resume")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["resumed_from"] == f"checkpoint-{previous}" and summary["global_step"] == previous + 2
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: patch resume_non_blocking")]
    if changed:
        assert summary["patches"]["resume_non_blocking"]["state"] == "fallback"
        assert len(warned) == 1 and "DataLoaderShard lacks _non_blocking" in warned[0], result.stderr
        return
    assert summary["patches"]["resume_non_blocking"]["state"] == "active" and not warned
    assert len(copies) >= 2 and all(copies), copies  # the two training steps' batches (and the evaluation's)
