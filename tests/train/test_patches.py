"""The patch registry: every patch's target is checked before patching; a changed target means the library's own
path, one warning line naming the patch and the installed version, a finished run, and a summary that says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oasst_model import patches
from tests.train.conftest import GUANACO, read_summary

# The settings a GPU user gets without a recipe (4-bit, bf16, checkpointing, every speed patch on), cut to seconds;
# spelled out because a CPU run's own defaults are fp32 without checkpointing.
SHORT = ("--precision", "bf16", "--compute-dtype", "bfloat16", "--gradient-checkpointing", "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--max-length", 48, "--eval-rows", 2,
         "--save-steps", 100)


def test_every_patch_target_is_the_one_it_was_written_for_on_this_install() -> None:
    """A new library release that changes a target fails here first (scripts/test-latest.sh runs this too)."""
    assert patches.check_all() == {name: None for name in patches.PATCHES}


def test_every_patch_names_its_library_versions_and_fallback() -> None:
    for patch in patches.PATCHES.values():
        assert patch.library in ("transformers", "peft", "trl", "bitsandbytes", "torch", "lm-eval", "tokenizers"), \
            patch.name
        assert patch.library.split("-")[0] in patch.written_for.replace("lm-eval", "lm"), patch.name
        assert patch.target and patch.why and patch.fallback


@pytest.mark.slow
def test_gpu_default_falcon_run_quantizes_and_uses_every_training_patch(oasst, tiny_falcon: Path, tmp_path: Path) -> None:
    result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", tmp_path / "run", *SHORT)
    assert result.exit_code == 0, result.output
    assert "warning: patch" not in result.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["global_step"] == 2
    assert summary["linear4bit_layers"] == 8
    assert summary["fused_attention_layers"] == 2
    assert summary["fused_lora_modules"] == 8
    states = {name: (entry["state"], entry["places"]) for name, entry in summary["patches"].items()}
    assert states == {
        "falcon_4bit_linear": ("active", 1),
        "bnb_cpu_weights_unpacked": ("active", 8),
        "falcon_fused_attention": ("active", 2),
        "cast_norm_outputs": ("active", 3),  # one input norm per layer (parallel attention) + the final one
        "fused_lora": ("active", 8),
    }
    assert summary["patches"]["falcon_fused_attention"]["library"].startswith("transformers 5.")


@pytest.mark.slow
def test_a_changed_falcon_attention_signature_runs_transformers_attention_with_one_warning(
        oasst, tiny_falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that renames FalconAttention.forward's parameters: the fused path stays off, the run finishes."""
    import transformers
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.FalconAttention.forward

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN202 - the "new release"
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", forward)
    result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", tmp_path / "run", *SHORT)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: patch")]
    assert warnings == [
        f"warning: patch falcon_fused_attention is off: transformers {transformers.__version__} changed its target "
        "(FalconAttention.forward lacks attention_mask, position_ids, layer_past, use_cache, output_attentions, "
        "position_embeddings); running transformers' own FalconAttention.forward (packing then refused on "
        f"transformers < 5.24) (written for {patches.PATCHES['falcon_fused_attention'].written_for})"]
    summary = read_summary(tmp_path / "run")
    assert summary["global_step"] == 2 and summary["linear4bit_layers"] == 8
    assert summary["fused_attention_layers"] == 0
    entry = summary["patches"]["falcon_fused_attention"]
    assert entry["state"] == "fallback" and entry["places"] == 0 and "position_embeddings" in entry["detail"]
    assert summary["patches"]["fused_lora"]["state"] == "active"  # the others are untouched


@pytest.mark.slow
def test_a_changed_falcon_linear_skips_the_swap_and_the_4bit_check_refuses(
        oasst, tiny_falcon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FalconLinear that is more than nn.Linear plus a forward must not be swapped for nn.Linear."""
    from transformers.models.falcon import modeling_falcon

    class FalconLinear(torch.nn.Linear):
        scale = 2.0  # the "new release" adds state the swap would lose

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    monkeypatch.setattr(modeling_falcon, "FalconLinear", FalconLinear)
    result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", tmp_path / "run", *SHORT)
    assert result.exit_code == 1
    assert "warning: patch falcon_4bit_linear is off: transformers" in result.stderr
    assert "FalconLinear defines scale beside forward" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: 4-bit loading of {tiny_falcon} quantized 0")
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_a_changed_peft_lora_forward_leaves_peft_in_charge(tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import layer as lora_layer
    from transformers import FalconForCausalLM

    from oasst_model.lora_fused import fuse_lora_forward, fused_lora_modules

    original = lora_layer.Linear.forward

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the input is no longer called `x`
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "forward", forward)
    patches.begin_run()
    model = get_peft_model(FalconForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["query_key_value", "dense"], lora_dropout=0.0))
    ids = torch.arange(10, 30)[None]
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_lora_forward(model) == 0 == fused_lora_modules(model)
        assert torch.equal(model(ids).logits, want)
    err = capsys.readouterr().err
    assert err.count("warning: patch fused_lora is off: peft ") == 1
    assert "lora.Linear.forward lacks (self, x, ...)" in err
    assert patches.report()["fused_lora"]["state"] == "fallback"


def test_a_changed_bitsandbytes_4bit_forward_leaves_concat_lora_to_the_addmm_path(
        tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """concat_lora reproduces Linear4bit.forward; a forward that no longer reads what it reproduces is not replaced:
    the LoRA layers keep fused_lora's addmm over bitsandbytes' own product, with one warning line."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from oasst_model.load import load_model
    from oasst_model.lora_fused import concat_lora_modules, fuse_lora_forward, fused_lora_modules

    original = bnb.nn.Linear4bit.forward

    def forward(self, x):  # noqa: ANN001, ANN202 - a release that moved its product elsewhere
        return original(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)
    patches.begin_run()
    net, _ = load_model(str(tiny_falcon), load_in_4bit=True, compute_dtype="float32")
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["query_key_value", "dense"], lora_dropout=0.0,
                                           init_lora_weights=False))
    ids = torch.arange(10, 30)[None]
    with torch.no_grad():
        want = model(ids).logits
        assert fuse_lora_forward(model, concat=True) == 4 == fused_lora_modules(model)
        assert concat_lora_modules(model) == 0
        assert (model(ids).logits - want).abs().max() < 1e-4
    err = capsys.readouterr().err
    assert err.count("warning: patch concat_lora is off: bitsandbytes ") == 1
    assert "Linear4bit.forward lacks (reads compute_dtype), (reads matmul_4bit)" in err
    report = patches.report()
    assert report["concat_lora"]["state"] == "fallback" and report["fused_lora"]["state"] == "active"


def test_a_changed_torch_dropout_leaves_lora_dropout_uncarved(
        tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """carved_lora_dropout reproduces nn.Dropout from its p and training fields; a Dropout that keeps its
    probability elsewhere is called as it is (fused_lora still runs), with one warning line."""
    from peft import LoraConfig, get_peft_model

    from oasst_model.load import load_model
    from oasst_model.lora_fused import carved_lora_modules, fuse_lora_forward, fused_lora_modules

    class Dropout(torch.nn.Module):  # a release that renamed the probability
        def __init__(self, p: float = 0.5) -> None:
            super().__init__()
            self.rate = p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(x, self.rate, self.training)

    monkeypatch.setattr(torch.nn, "Dropout", Dropout)
    patches.begin_run()
    net, _ = load_model(str(tiny_falcon), load_in_4bit=True, compute_dtype="float32")
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["query_key_value", "dense"], lora_dropout=0.1))
    assert fuse_lora_forward(model, carved_dropout=True) == 4 == fused_lora_modules(model)
    assert carved_lora_modules(model) == 0
    err = capsys.readouterr().err
    assert err.count("warning: patch carved_lora_dropout is off: torch ") == 1
    assert "torch.nn.Dropout lacks p, inplace" in err
    report = patches.report()
    assert report["carved_lora_dropout"]["state"] == "fallback" and report["fused_lora"]["state"] == "active"


def test_an_instance_without_the_attributes_read_is_a_changed_target(tiny_falcon: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Attributes set in __init__ are checked on the first instance: a missing one means no patch at all."""
    from transformers import FalconForCausalLM

    from oasst_model.attention import fused_attention_layers, use_fused_attention

    patches.begin_run()
    model = FalconForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32)
    del model.transformer.h[0].self_attention.num_kv_heads
    assert use_fused_attention(model) == 0 == fused_attention_layers(model)
    assert "(FalconAttention instance lacks num_kv_heads)" in capsys.readouterr().err


def test_a_check_that_raises_counts_as_a_changed_target(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str | None:
        raise AttributeError("module has no attribute 'Thing'")

    patch = patches.PATCHES["cast_norm_outputs"]
    monkeypatch.setitem(patches.PATCHES, "cast_norm_outputs", type(patch)(**{**vars(patch), "check": broken}))
    patches.begin_run()
    assert not patches.applies("cast_norm_outputs")
    assert not patches.applies("cast_norm_outputs")
    err = capsys.readouterr().err
    assert err.count("warning: patch cast_norm_outputs is off") == 1  # once per run, however often it is asked
    assert "check failed: AttributeError: module has no attribute 'Thing'" in err
