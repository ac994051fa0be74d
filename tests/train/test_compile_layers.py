"""`compile_layers`: the decoder layers compiled with torch.compile train exactly as the eager layers do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from oasst_model import compiled
from tests.train.conftest import GUANACO, read_summary

STEPS = 4
ARGS = ("--load-in-4bit", "--lora-dropout", 0.1, "--max-steps", STEPS, "--batch-size", 2, "--grad-accum", 1,
        "--max-length", 64, "--eval-rows", 2, "--save-steps", STEPS, "--logging-steps", 1, "-q")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (dynamo caches compiled code per code object for the process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(oasst: Callable[..., Any], model: Path, out: Path, *extra: object) -> tuple[list[float], dict[str, Any]]:
    result = oasst("train", "--model", model, "--data", GUANACO, "--out", out, *ARGS, *extra)
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    return [h["loss"] for h in summary["log_history"] if "loss" in h], summary


def _lora_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_graph_trains_exactly_as_eager(oasst: Callable[..., Any], tiny_falcon: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, checkpointing: bool) -> None:
    """The traced graph (dynamo + AOT autograd, no code generation) of the 4-bit Falcon layers with fused attention,
    fused LoRA and LoRA dropout: the same losses and LoRA weights, bit for bit, with and without recomputation."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    flags = ("--gradient-checkpointing",) if checkpointing else ("--no-gradient-checkpointing",)
    eager, _ = _run(oasst, tiny_falcon, tmp_path / "eager", *flags)
    ours, summary = _run(oasst, tiny_falcon, tmp_path / "compiled", *flags, "--compile-layers")
    assert len(ours) == STEPS and ours == eager
    reference = _lora_weights(tmp_path / "eager")
    got = _lora_weights(tmp_path / "compiled")
    assert reference.keys() == got.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
    assert summary["compiled_layers"] == 2 and summary["compiled_graphs"] > 0
    assert summary["compiled_graph_breaks"] == 0
    assert summary["patches"]["compile_layers"]["state"] == "active"
    assert summary["patches"]["compile_layers"]["places"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_concat_lora_compiles_whole_and_trains_as_eager(oasst: Callable[..., Any], tiny_falcon: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """concat_lora's autograd Function (bitsandbytes' dequantization inside, the quantization state as an argument)
    traces into the layer graphs: no break, the traced graph bit for bit the eager run, inductor's code within
    rounding, and the run reports every 4-bit LoRA linear on the one product."""
    monkeypatch.setattr(compiled, "BACKEND", backend)
    flags = ("--no-gradient-checkpointing", "--concat-lora")
    eager, off = _run(oasst, tiny_falcon, tmp_path / "eager", *flags)
    ours, summary = _run(oasst, tiny_falcon, tmp_path / "compiled", *flags, "--compile-layers")
    assert ours == eager if backend == "aot_eager" else ours == pytest.approx(eager, rel=1e-4)
    assert summary["compiled_graph_breaks"] == 0 and summary["compiled_graphs"] > 0
    for run in (off, summary):
        assert run["concat_lora_modules"] == 8  # the tiny Falcon's 2 layers x 4 linears
        assert run["patches"]["concat_lora"]["state"] == "active"


@pytest.mark.slow
def test_inductor_code_trains_as_eager(oasst: Callable[..., Any], stories: Path, tmp_path: Path) -> None:
    """Inductor's generated kernels (C++ on a CPU, Triton on a GPU) on stories260K (Llama): fp32 losses within
    rounding of the eager ones, and the config and summary say the layers ran compiled."""
    eager, off = _run(oasst, stories, tmp_path / "eager", "--lora-dropout", 0.0)
    ours, summary = _run(oasst, stories, tmp_path / "compiled", "--lora-dropout", 0.0, "--compile-layers")
    assert ours == pytest.approx(eager, rel=1e-4)
    assert summary["compiled_layers"] == 5 and summary["compiled_graphs"] > 0  # stories260K's 5 LlamaDecoderLayers
    assert off["compiled_layers"] == 0 and off["compiled_graphs"] is None
    assert "compile_layers" not in off["patches"]


def test_a_model_without_repeated_blocks_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_model import patches

    patches.begin_run()
    assert compiled.compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
    entry = patches.report()["compile_layers"]
    assert entry["state"] == "not needed" and "no repeated block" in entry["detail"]


def test_a_changed_torch_compiles_nothing_with_one_warning(tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from oasst_model import patches
    from oasst_model.load import load_model

    patches.begin_run()
    patch = patches.PATCHES["compile_layers"]
    monkeypatch.setitem(patches.PATCHES, "compile_layers",
                        type(patch)(**{**vars(patch), "check": lambda: "torch.nn.Module lacks compile"}))
    model, _ = load_model(str(tiny_falcon), compute_dtype="float32")
    assert len(compiled.decoder_blocks(model)) == 2
    assert compiled.compile_layers(model) == 0
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in compiled.decoder_blocks(model))
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: patch")]
    assert line.startswith("warning: patch compile_layers is off: torch ") and "eager layers" in line


@pytest.mark.slow
def test_dpo_with_compiled_layers_trains_as_eager(oasst: Callable[..., Any], stories: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO runs the compiled layers twice per pair (the policy, and the reference with the adapter disabled): the
    same losses and reward margin as eager."""
    from tests.train.conftest import RECIPES
    from tests.train.test_dpo import TREES

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    data = tmp_path / "pairs"
    assert oasst("build", "--input", TREES, "--pairs", "best", "--out", data).exit_code == 0
    figures = []
    for name, extra in (("eager", ()), ("compiled", ("--compile-layers",))):
        out = tmp_path / name
        result = oasst("train", "--config", RECIPES / "tiny-cpu-dpo.yaml", "--model", stories, "--data", data,
                       "--out", out, "--max-steps", 3, "--logging-steps", 1, *extra, "-q")
        assert result.exit_code == 0, result.output
        summary = read_summary(out)
        figures.append(([h["loss"] for h in summary["log_history"] if "loss" in h], summary["reward_margin_last"]))
    assert figures[1] == figures[0]


def test_seeded_lora_dropout_does_not_break_the_compiled_graph(oasst: Callable[..., Any], tiny_falcon: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded dropout's Function makes a Generator and reads a seed back per call, which dynamo cannot trace (29
    graph breaks in this run before): inside compiled layers peft's dropout runs instead, and the run still learns."""
    monkeypatch.setattr(compiled, "BACKEND", "eager")  # graph breaks are dynamo's: no code generation needed
    losses, summary = _run(oasst, tiny_falcon, tmp_path / "seeded", "--no-gradient-checkpointing", "--compile-layers",
                           "--seeded-lora-dropout")
    assert summary["compiled_graphs"] > 0
    assert summary["compiled_graph_breaks"] == 0
    assert len(losses) == STEPS and all(loss == loss for loss in losses)


@pytest.mark.slow
def test_carved_masks_are_drawn_again_alike_when_checkpointing_recomputes(
        oasst: Callable[..., Any], tiny_falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """carved_lora_dropout inside compiled layers: traced whole (no graph break), every LoRA linear with a dropout
    counted, the patch active. The Colab-class recipe carves inside checkpointed compiled layers, so the recomputation
    in backward must draw the forward's masks again, or the gradients silently belong to other masks: same losses and
    LoRA weights, bit for bit, with and without checkpointing (a generator that checkpointing does not restore fails
    this). Through the traced graph (AOT autograd), not inductor's code: on torch 2.15 inductor draws other forward
    masks under checkpointing than without it, for torch's own dropout as for this one (a CPU probe, 2026-12-07), so
    the two runs differ there whatever the dropout; on torch 2.13 they agree bit for bit through inductor too."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    flags = ("--compile-layers", "--carved-lora-dropout")
    plain, summary = _run(oasst, tiny_falcon, tmp_path / "plain", "--no-gradient-checkpointing", *flags)
    assert summary["carved_lora_modules"] == 8  # the tiny Falcon's 2 layers x 4 linears
    assert summary["patches"]["carved_lora_dropout"] == {**summary["patches"]["carved_lora_dropout"],
                                                         "state": "active", "places": 8}
    assert summary["compiled_graphs"] > 0 and summary["compiled_graph_breaks"] == 0
    assert all(loss == loss for loss in plain)
    torch._dynamo.reset()
    recomputed, summary = _run(oasst, tiny_falcon, tmp_path / "checkpointed", "--gradient-checkpointing", *flags)
    assert summary["carved_lora_modules"] == 8 and summary["compiled_graph_breaks"] == 0
    assert len(recomputed) == STEPS and recomputed == plain
    reference = _lora_weights(tmp_path / "plain")
    got = _lora_weights(tmp_path / "checkpointed")
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_falcon_layers_compile_without_graph_breaks_as_lengths_change(tiny_falcon: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of new lengths make the compiled layers symbolic in the length; the fused attention must still trace
    whole (sdpa refuses a SymBool `is_causal`: that broke every layer into several regions on a GPU)."""
    from torch._dynamo.utils import counters

    from oasst_model.attention import fused_attention_layers
    from oasst_model.load import load_model

    monkeypatch.setattr(compiled, "BACKEND", "eager")  # graph breaks are dynamo's: no code generation needed
    model, _ = load_model(str(tiny_falcon), compute_dtype="float32")
    model.train()
    assert fused_attention_layers(model) == 2
    assert compiled.compile_layers(model) == 2
    for length in (16, 24, 40):  # the second length makes dynamo recompile with a symbolic one
        ids = torch.randint(0, 1000, (2, length))
        model(input_ids=ids).logits.float().sum().backward()
    stats = compiled.compile_stats()
    assert stats["compiled_graph_breaks"] == 0, dict(counters["graph_break"])
    assert stats["compiled_graphs"] >= 2
