"""`fuse_lora_forward` computes what peft's LoRA forward computes, with one addmm in place of a scale and an add."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from oasst_train.lora_fused import fuse_lora_forward, fused_lora_modules, unfuse_lora_forward
from tests.train.conftest import GUANACO, read_summary

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LORA_LINEARS = 2 * len(TARGETS)  # the tiny Falcon's 2 layers x Falcon's four linear modules


class CountAddmm:
    """Counts calls of torch.addmm, the fused path's one op (nothing else in the tiny Falcon calls it from Python).

    A patch of `torch.addmm`, not a TorchFunctionMode: modes are not active in the recomputation that gradient
    checkpointing runs inside backward.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._real = torch.addmm

    def __enter__(self) -> CountAddmm:
        def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.calls += 1
            return self._real(*args, **kwargs)

        torch.addmm = counting
        return self

    def __exit__(self, *exc: object) -> None:
        torch.addmm = self._real


def _lora_falcon(tiny_falcon: Path, base: str, *, bf16: bool = False, lora_dtype: torch.dtype | None = None,
                 cast_norms: bool = True, **lora: Any) -> Any:
    """The tiny Falcon, 4-bit or plain, with LoRA (scale 1.5, dropout 0.1) on its four linears, lora_B non-zero.

    bf16 loads it as `oasst train` does for the bf16 recipes: what stays unquantized in bf16 for a 4-bit base (fp32
    for a plain one, which autocast then runs in bf16), LayerNorm outputs in bf16 (cast_norm_outputs) unless
    `cast_norms` is off, and LoRA weights in bf16 for a 4-bit base (trl 1.16 casts them) unless `lora_dtype` says.
    """
    from peft import LoraConfig, get_peft_model

    from oasst_train.casts import cast_norm_outputs
    from oasst_train.model import load_model

    net, _ = load_model(str(tiny_falcon), load_in_4bit=base == "4bit",
                        compute_dtype="bfloat16" if bf16 and base == "4bit" else "float32")
    if bf16 and cast_norms:
        cast_norm_outputs(net)
    torch.manual_seed(0)
    # init_lora_weights=False: lora_B random like lora_A; peft's zeros would hide a wrong or missing update.
    config = LoraConfig(r=8, lora_alpha=12, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False,
                        **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on bias-free layers: peft warns that merging is impossible
        model = get_peft_model(net, config)
    if lora_dtype is None and bf16 and base == "4bit":
        lora_dtype = torch.bfloat16
    if lora_dtype is not None:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(lora_dtype)
    return model


@pytest.fixture
def autocast_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let peft's 4-bit LoRA see CPU autocast the way it sees CUDA autocast on a GPU.

    peft 0.21's `lora.bnb.Linear4bit.forward` asks `torch.is_autocast_enabled()` without a device, which is CUDA's
    state: on a CPU it casts the LoRA input to the LoRA weights' dtype, on a GPU under autocast it does not.
    """
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: real(device_type or "cpu"))


def _ids(rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Random token ids."""
    return torch.randint(10, 60000, (rows, length), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model: Any, ids: torch.Tensor, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Training-mode loss and LoRA gradients, with dropout drawn from the same seed every time."""
    model.train()
    model.zero_grad()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * LORA_LINEARS and all("lora_" in n for n in grads)
    return loss.item(), grads


def _logits(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Eval-mode logits (no dropout)."""
    model.eval()
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize(("base", "precision"), [
    ("4bit", "fp32"),
    ("4bit", "bf16"),  # the bf16 recipes' setup
    ("4bit", "bf16-as-on-cuda"),  # the same, with peft's 4-bit forward taking its GPU path
    ("plain", "fp32"),
    ("plain", "bf16"),  # fp32 LoRA weights under autocast, as peft leaves them on an unquantized base
])
def test_fused_forward_gives_peft_loss_and_gradients(tiny_falcon: Path, base: str, precision: str,
                                                     request: pytest.FixtureRequest) -> None:
    bf16 = precision != "fp32"
    if precision == "bf16-as-on-cuda":
        request.getfixturevalue("autocast_as_on_cuda")
    model = _lora_falcon(tiny_falcon, base, bf16=bf16)
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, bf16)
    assert fuse_lora_forward(model) == LORA_LINEARS
    with CountAddmm() as counter:
        loss_b, grads_b = _loss_and_grads(model, ids, bf16)
    assert counter.calls == LORA_LINEARS  # the fused path really ran in every LoRA linear, not a fallback
    # bf16: peft rounds lora_B's output, then the scaled update, then the sum; addmm rounds once.
    loss_tol, grad_tol = (1e-3, 3e-2) if bf16 else (1e-6, 1e-5)
    assert abs(loss_a - loss_b) <= loss_tol * abs(loss_a)
    for name, grad in grads_a.items():
        rel = (grad - grads_b[name]).norm() / grad.norm()
        assert rel < grad_tol, (name, float(rel))


@pytest.mark.parametrize("case", ["plain-bf16-base", "4bit-fp32-lora", "4bit-fp32-base-under-autocast"])
def test_mixed_dtypes_add_the_update_as_peft_does(tiny_falcon: Path, case: str,
                                                  request: pytest.FixtureRequest) -> None:
    """Where the base output's dtype is not addmm's, the update is added with peft's own arithmetic."""
    autocast = case == "4bit-fp32-base-under-autocast"
    if case == "plain-bf16-base":  # bf16 base output, fp32 LoRA, no autocast
        model = _lora_falcon(tiny_falcon, "plain", lora_dtype=torch.float32)
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    elif case == "4bit-fp32-lora":  # bf16 4-bit output, fp32 LoRA, no autocast: peft casts x and the update
        model = _lora_falcon(tiny_falcon, "4bit", bf16=True, lora_dtype=torch.float32, cast_norms=False)
    else:  # fp32 4-bit output, bf16 update under autocast, on peft's GPU path: the sum promotes to fp32
        request.getfixturevalue("autocast_as_on_cuda")
        model = _lora_falcon(tiny_falcon, "4bit")
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, autocast)
    fuse_lora_forward(model)
    with CountAddmm() as counter:
        loss_b, grads_b = _loss_and_grads(model, ids, autocast)
    if case == "4bit-fp32-base-under-autocast":
        assert 0 < counter.calls < LORA_LINEARS  # layers with bf16 inputs fuse, those with fp32 inputs add as peft
        assert abs(loss_a - loss_b) <= 1e-3 * abs(loss_a)
        for name, grad in grads_a.items():
            assert (grad - grads_b[name]).norm() / grad.norm() < 3e-2, name
    else:
        assert counter.calls == 0
        assert loss_a == loss_b
        assert all(torch.equal(grad, grads_b[name]) for name, grad in grads_a.items())


def test_gradient_checkpointing_recomputes_the_same_gradients(tiny_falcon: Path) -> None:
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, bf16=True)
    fuse_lora_forward(model)
    with CountAddmm() as counter:
        loss_b, grads_b = _loss_and_grads(model, ids, bf16=True)
    assert counter.calls == 2 * LORA_LINEARS  # forward, then the recomputation in backward
    assert abs(loss_a - loss_b) <= 1e-3 * abs(loss_a)
    for name, grad in grads_a.items():
        assert (grad - grads_b[name]).norm() / grad.norm() < 3e-2, name


def test_fused_count_is_every_lora_linear_and_unfuse_restores_peft(tiny_falcon: Path) -> None:
    from peft.tuners.lora import LoraLayer

    model = _lora_falcon(tiny_falcon, "4bit")
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == LORA_LINEARS
    assert fuse_lora_forward(model) == LORA_LINEARS == fused_lora_modules(model)
    assert fuse_lora_forward(model) == 0  # idempotent
    assert unfuse_lora_forward(model) == LORA_LINEARS
    assert fused_lora_modules(model) == 0
    assert all("forward" not in vars(m) for m in lora_layers)  # the class's forward, as before


def test_disabled_adapter_gives_the_base_output(tiny_falcon: Path) -> None:
    model = _lora_falcon(tiny_falcon, "4bit")
    ids = _ids()
    with model.disable_adapter():
        base = _logits(model, ids)
    fuse_lora_forward(model)
    with model.disable_adapter(), CountAddmm() as counter:
        assert torch.equal(_logits(model, ids), base)
    assert counter.calls == 0
    assert (_logits(model, ids) - base).abs().max() > 1e-2  # the adapter is on again, and matters


def test_merged_adapter_is_not_applied_twice(tiny_falcon: Path) -> None:
    model = _lora_falcon(tiny_falcon, "plain")
    ids = _ids()
    with_adapter = _logits(model, ids)
    fuse_lora_forward(model)
    model.merge_adapter()
    with CountAddmm() as counter:
        merged = _logits(model, ids)
    assert counter.calls == 0
    assert (merged - with_adapter).abs().max() < 1e-4
    model.unmerge_adapter()
    assert (_logits(model, ids) - with_adapter).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["two-active-adapters", "adapter-names", "dora", "lora-bias", "lora-b-hook"])
def test_cases_it_does_not_handle_run_peft_forward_unchanged(tiny_falcon: Path, case: str) -> None:
    from peft import LoraConfig

    extra = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora-bias" else {}
    model = _lora_falcon(tiny_falcon, "plain", **extra)
    kwargs: dict[str, Any] = {}
    if case == "two-active-adapters":
        model.add_adapter("second", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    elif case == "adapter-names":
        kwargs["adapter_names"] = ["default", "__base__"]
    elif case == "lora-b-hook":
        model.base_model.model.transformer.h[0].mlp.dense_4h_to_h.lora_B["default"].register_forward_hook(
            lambda module, args, out: out * 2)
    ids = _ids()
    expected = _logits(model, ids, **kwargs)
    fuse_lora_forward(model)
    with CountAddmm() as counter:
        got = _logits(model, ids, **kwargs)
    if case == "lora-b-hook":
        # The hook sits on one module, which runs peft's forward (hook included); the other seven still fuse.
        assert counter.calls == LORA_LINEARS - 1
        assert (got - expected).abs().max() < 1e-5
    else:
        assert counter.calls == 0
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_training_run_reports_fused_lora_modules(oasst: Callable[..., Any], tiny_falcon: Path,
                                                 tmp_path: Path) -> None:
    """The bf16 recipes' path on a CPU: 4-bit, bf16 autocast, gradient checkpointing, LoRA dropout."""
    out = tmp_path / "run"
    with CountAddmm() as counter:
        result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", out, "--4bit",
                       "--compute-dtype", "bfloat16", "--precision", "bf16", "--gradient-checkpointing",
                       "--lora-dropout", 0.1, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1,
                       "--max-length", 64, "--eval-rows", 2, "--save-steps", 2, "-q")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["fused_lora_modules"] == LORA_LINEARS
    assert counter.calls > 0  # training and evaluation went through the fused addmm
