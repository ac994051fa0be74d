"""`fuse_lora_forward` computes what peft's LoRA forward computes, with one addmm in place of a scale and an add."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from oasst_model import lora_fused
from oasst_model.lora_fused import fuse_lora_forward, fused_lora_modules, seeded_dropout_mask, unfuse_lora_forward
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


class CountConcat:
    """Counts calls of the concatenated GEMM's autograd Function (one per 4-bit LoRA linear and forward)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        function = lora_fused._concat_linear()
        real = function.apply

        def counting(*args: Any) -> torch.Tensor:
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(function, "apply", counting)


def _lora_falcon(tiny_falcon: Path, base: str, *, bf16: bool = False, lora_dtype: torch.dtype | None = None,
                 cast_norms: bool = True, dropout: float = 0.1, **lora: Any) -> Any:
    """The tiny Falcon, 4-bit or plain, with LoRA (scale 1.5, `dropout`) on its four linears, lora_B non-zero.

    bf16 loads it as `oasst train` does for the bf16 recipes: what stays unquantized in bf16 for a 4-bit base (fp32
    for a plain one, which autocast then runs in bf16), LayerNorm outputs in bf16 (cast_norm_outputs) unless
    `cast_norms` is off, and LoRA weights in bf16 for a 4-bit base (trl 1.16 casts them) unless `lora_dtype` says.
    """
    from peft import LoraConfig, get_peft_model

    from oasst_model.casts import cast_norm_outputs
    from oasst_model.load import load_model

    net, _ = load_model(str(tiny_falcon), load_in_4bit=base == "4bit",
                        compute_dtype="bfloat16" if bf16 and base == "4bit" else "float32")
    if bf16 and cast_norms:
        cast_norm_outputs(net)
    torch.manual_seed(0)
    # init_lora_weights=False: lora_B random like lora_A; peft's zeros would hide a wrong or missing update.
    config = LoraConfig(r=8, lora_alpha=12, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
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


@pytest.mark.parametrize("concat", [False, True], ids=["addmm", "concat"])
def test_gradient_checkpointing_recomputes_the_same_gradients(tiny_falcon: Path, concat: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, bf16=True)
    fuse_lora_forward(model, concat=concat)
    concat_calls = CountConcat(monkeypatch)
    with CountAddmm() as addmm_calls:
        loss_b, grads_b = _loss_and_grads(model, ids, bf16=True)
    counter = concat_calls if concat else addmm_calls
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
        result = oasst("train", "--model", tiny_falcon, "--data", GUANACO, "--out", out, "--load-in-4bit",
                       "--compute-dtype", "bfloat16", "--precision", "bf16", "--gradient-checkpointing",
                       "--lora-dropout", 0.1, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1,
                       "--max-length", 64, "--eval-rows", 2, "--save-steps", 2, "--seeded-lora-dropout", "-q")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["fused_lora_modules"] == LORA_LINEARS
    assert summary["seeded_lora_dropout"] is True  # asked for, and this run has a dropout for it to replace
    assert counter.calls > 0  # training and evaluation went through the fused addmm


# Seeded LoRA dropout: lora_A(dropout(x)) that keeps x and a seed for backward instead of the dropout's output and mask.

@pytest.mark.parametrize("case", ["eval", "dropout-0"])
def test_seeded_dropout_without_a_dropout_to_replace_is_the_unseeded_path_bit_for_bit(
        tiny_falcon: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval mode and p 0 (peft's nn.Identity) drop nothing: the same lora_A(x), and no seed drawn."""
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True, dropout=0.0 if case == "dropout-0" else 0.1)
    ids = _ids()
    fuse_lora_forward(model)
    if case == "eval":
        want = _logits(model, ids)
    else:
        want_loss, want_grads = _loss_and_grads(model, ids, bf16=True)
    unfuse_lora_forward(model)
    fuse_lora_forward(model, seeded_dropout=True)
    drawn = []
    monkeypatch.setattr(lora_fused, "_draw_seed", lambda: drawn.append(1) or 1)
    if case == "eval":
        assert torch.equal(_logits(model, ids), want)
    else:
        loss, grads = _loss_and_grads(model, ids, bf16=True)
        assert loss == want_loss
        assert all(torch.equal(grads[name], grad) for name, grad in want_grads.items())
    assert drawn == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_seeded_dropout_gives_the_reference_with_the_mask_regenerated_from_its_seed(
        tiny_falcon: Path, precision: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Output and gradients of x, lora_A and lora_B equal base(x) + s * B(A(x * mask / (1 - p))) for its mask."""
    bf16 = precision == "bf16"
    if bf16:  # the bf16 recipes' layer: 4-bit base, bf16 LoRA weights and input, autocast as on a GPU
        request.getfixturevalue("autocast_as_on_cuda")
    model = _lora_falcon(tiny_falcon, "4bit" if bf16 else "plain", bf16=bf16)
    fuse_lora_forward(model, seeded_dropout=True)
    model.train()
    layer = model.base_model.model.transformer.h[0].mlp.dense_4h_to_h
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    drawn = []
    monkeypatch.setattr(lora_fused, "_draw_seed", lambda: drawn.append(1234) or 1234)
    x = torch.randn(2, 12, lora_a.in_features, dtype=torch.bfloat16 if bf16 else torch.float32)
    grad_out = torch.randn(2, 12, lora_b.out_features)
    mask = seeded_dropout_mask(1234, x.shape, 0.1, x.device)
    assert 0 < mask.sum() < mask.numel()

    def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        model.zero_grad()
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(leaf)
        out.backward(grad_out.to(out.dtype))
        return [out.float(), leaf.grad.float(), lora_a.weight.grad.float(), lora_b.weight.grad.float()]

    got = run(layer)
    assert drawn == [1234]  # the seeded path ran, once
    want = run(lambda leaf: layer.base_layer(leaf) + layer.scaling["default"] * lora_b(lora_a(leaf * mask / 0.9)))
    tol = 2e-2 if bf16 else 1e-5  # bf16 rounds the dropout scale on x there, on the rank-8 output here (~5e-3)
    for name, a, b in zip(["output", "x", "lora_A", "lora_B"], got, want, strict=True):
        assert (a - b).norm() <= tol * b.norm(), (name, float((a - b).norm() / b.norm()))


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant", "non-reentrant-without-rng-state"])
def test_gradient_checkpointing_redraws_the_same_seeded_masks(tiny_falcon: Path, checkpointing: str) -> None:
    """A recomputed forward draws the seeds, hence the masks, of the first forward: the same gradients.

    Without checkpoint's RNG restore (preserve_rng_state off) the recomputation draws other masks, and the gradients
    differ: the comparison does see which masks were used.
    """
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True)
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    fuse_lora_forward(model, seeded_dropout=True)
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, bf16=True)
    kwargs = {"use_reentrant": checkpointing == "reentrant", "preserve_rng_state": not checkpointing.endswith("state")}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # 5.17, the GPU machine's
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    loss_b, grads_b = _loss_and_grads(model, ids, bf16=True)
    assert loss_a == loss_b  # the first forward is the same forward either way
    same = all(torch.equal(grads_b[name], grad) for name, grad in grads_a.items())
    assert same == (not checkpointing.endswith("state"))


def test_seeded_dropout_keeps_1_minus_p_and_is_unbiased() -> None:
    p = 0.1
    mask = seeded_dropout_mask(7, (1000, 1000), p, "cpu")
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    assert not torch.equal(mask, seeded_dropout_mask(8, (1000, 1000), p, "cpu"))
    assert torch.equal(mask, seeded_dropout_mask(7, (1000, 1000), p, "cpu"))

    # Many copies of one row: the mean of h over rows must tend to row @ A.T, within 5 standard errors.
    generator = torch.Generator().manual_seed(0)
    row, weight, rows = torch.randn(32, generator=generator), torch.randn(4, 32, generator=generator), 20_000
    h = lora_fused._seeded_dropout_linear().apply(row.expand(rows, 32), weight, p, 11)
    variance = p / (1 - p) * (row**2 * weight**2).sum(dim=1)  # of one row's h, per output
    assert ((h.mean(dim=0) - weight @ row).abs() < 5 * (variance / rows).sqrt()).all()


def _carved_statistics(x: torch.Tensor, y: torch.Tensor, p: float) -> None:
    """y is carved dropout of x (no zeros in x): Bernoulli keeps at 1 - round(p 2^15) / 2^15 overall, per field of
    a random word and jointly for pairs of fields (independent uniforms), kept values x scaled to an unbiased mean."""
    threshold = lora_fused.carved_threshold(p)
    q = 1 - threshold / 2**15
    keep = y != 0

    def near(fraction: float, expected: float, n: int) -> bool:
        return abs(fraction - expected) < 6 * (expected * (1 - expected) / n) ** 0.5

    assert near(keep.float().mean().item(), q, keep.numel())
    fields = keep.reshape(-1, 4)  # the four elements one 60-bit word decides
    for i in range(4):
        assert near(fields[:, i].float().mean().item(), q, fields.shape[0]), i
    for i, j in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert near((fields[:, i] & fields[:, j]).float().mean().item(), q * q, fields.shape[0]), (i, j)
    # Neighbouring words too: one word's field 3 and the next word's field 0.
    assert near((fields[:-1, 3] & fields[1:, 0]).float().mean().item(), q * q, fields.shape[0] - 1)
    scale = 2**15 / (2**15 - threshold)
    assert torch.allclose(y[keep], x[keep] * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_carved_dropout_is_bernoulli_per_element_and_unbiased(compiled: bool) -> None:
    """carved_lora_dropout's masks: the right keep rate for every one of a word's four fields, no correlation
    between fields, kept values scaled so the mean is x, gradient = mask x scale; eager and through inductor."""
    p = 0.1
    run = torch.compile(lora_fused.carved_dropout, backend="inductor", dynamic=False) if compiled \
        else lora_fused.carved_dropout
    x = (torch.rand(2048, 512, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_()
    torch.manual_seed(3)
    y = run(x, p)
    _carved_statistics(x.detach(), y.detach(), p)
    y.backward(torch.ones_like(y))
    scale = 2**15 / (2**15 - lora_fused.carved_threshold(p))
    assert torch.equal(x.grad, (y != 0).float() * scale)
    assert not torch.equal(run(x, p) != 0, y != 0)  # a new mask per call
    torch.manual_seed(3)
    assert torch.equal(run(x, p) != 0, y != 0)  # from the generator's stream: seeded runs repeat
    # Other probabilities: the threshold follows p (0.5: half of each field's range).
    _carved_statistics(x.detach(), run(x, 0.5).detach(), 0.5)
    assert lora_fused.carved_threshold(0.1) == 3277 and lora_fused.carved_threshold(0.5) == 2**14


def test_carved_dropout_applies_only_to_a_plain_training_dropout_over_fours() -> None:
    x = torch.ones(3, 8)
    dropout = torch.nn.Dropout(0.1)
    assert lora_fused.carved_dropout_applies(dropout, x)
    assert not lora_fused.carved_dropout_applies(dropout, torch.ones(3, 6))  # 6 is not four fields per word
    assert not lora_fused.carved_dropout_applies(torch.nn.Dropout(1e-6), x)  # rounds to no dropout: torch's runs
    assert not lora_fused.carved_dropout_applies(torch.nn.Identity(), x)  # peft's module for p 0
    assert not lora_fused.carved_dropout_applies(torch.nn.Dropout(0.1, inplace=True), x)
    dropout.eval()
    assert not lora_fused.carved_dropout_applies(dropout, x)


def test_carved_dropout_runs_inside_compiled_layers_only(tiny_falcon: Path) -> None:
    """Eager, the fused forward calls peft's dropout module as before (the carving is several kernels there); traced
    by dynamo, the carving replaces it: every LoRA linear of the tiny Falcon, and the layer still learns."""
    model = _lora_falcon(tiny_falcon, "4bit")
    assert fuse_lora_forward(model, carved_dropout=True) == LORA_LINEARS == lora_fused.carved_lora_modules(model)
    calls = []
    real = lora_fused.carved_dropout

    def counting(x: torch.Tensor, p: float) -> torch.Tensor:
        calls.append(x.shape)
        return real(x, p)

    ids = _ids()
    lora_fused.carved_dropout = counting
    try:
        _loss_and_grads(model, ids, bf16=False)
        assert calls == []
        torch._dynamo.reset()
        layers = model.base_model.model.transformer.h
        for layer in layers:
            layer.compile(backend="aot_eager")
        loss, grads = _loss_and_grads(model, ids, bf16=False)
    finally:
        lora_fused.carved_dropout = real
        torch._dynamo.reset()
    assert len(calls) >= LORA_LINEARS  # traced once per layer's four linears (and again on a recompile)
    assert loss == loss and all(g.abs().sum() > 0 for g in grads.values())
    unfuse_lora_forward(model)
    assert lora_fused.carved_lora_modules(model) == 0


def test_carved_dropout_without_dropout_modules_counts_nothing(tiny_falcon: Path) -> None:
    model = _lora_falcon(tiny_falcon, "4bit", dropout=0.0)  # peft puts nn.Identity in place of a dropout
    assert fuse_lora_forward(model, carved_dropout=True) == LORA_LINEARS
    assert lora_fused.carved_lora_modules(model) == 0


def _saved_bytes(model: Any, run: Callable[[], Any]) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct storages autograd keeps for backward during `run()`, parameters left out."""
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(t.untyped_storage().nbytes() for t in kept.values()), list(kept.values())


@pytest.fixture
def dropout_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let nn.Dropout keep for backward what it keeps on a GPU: CUDA's fused dropout saves a bool mask.

    On a CPU, F.dropout multiplies by a mask in the input's dtype (2 bytes in bf16) instead.
    """
    def native(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        return torch.native_dropout(x, p, training)[0] if training and p > 0 else x

    monkeypatch.setattr(torch.nn.functional, "dropout", native)


@pytest.mark.usefixtures("autocast_as_on_cuda", "dropout_as_on_cuda")
def test_seeded_dropout_keeps_x_instead_of_the_dropout_output_and_mask(tiny_falcon: Path) -> None:
    """bf16, 4-bit base: peft keeps 2 + 1 bytes per input element per LoRA layer, seeded dropout 2 per kept input.

    The 4-bit base keeps no x (bitsandbytes' MatMul4Bit keeps only its packed weight), so seeded dropout keeps x
    itself; Falcon's query_key_value and dense_h_to_4h read one LayerNorm output, which it keeps once.
    """
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True)
    model.train()
    block = model.base_model.model.transformer.h[0]
    width = block.mlp.dense_4h_to_h.in_features  # 4 x hidden
    hidden = torch.randn(2, 12, width // 4, dtype=torch.bfloat16)
    tokens = hidden.shape[0] * hidden.shape[1]
    position_ids = torch.arange(12)[None]
    rotary = model.base_model.model.transformer.rotary_emb(hidden, position_ids)
    inputs: dict[str, torch.Tensor] = {}
    for name in TARGETS:
        module = block.self_attention if name in ("query_key_value", "dense") else block.mlp
        getattr(module, name).register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]}))

    def one_module() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block.mlp.dense_4h_to_h(torch.randn(tokens, width, dtype=torch.bfloat16, requires_grad=True))

    def one_block() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block(hidden.clone().requires_grad_(), alibi=None, attention_mask=None, position_ids=position_ids,
                         position_embeddings=rotary)

    fuse_lora_forward(model)
    peft_module, _ = _saved_bytes(model, one_module)
    peft_block, _ = _saved_bytes(model, one_block)
    unfuse_lora_forward(model)
    fuse_lora_forward(model, seeded_dropout=True)
    seeded_module, kept = _saved_bytes(model, one_module)
    assert not any(t.dtype == torch.bool for t in kept)
    assert peft_module - seeded_module == tokens * width * (2 + 1 - 2)
    seeded_block, kept = _saved_bytes(model, one_block)
    storages = {t.untyped_storage().data_ptr() for t in kept}
    assert all(x.untyped_storage().data_ptr() in storages for x in inputs.values())  # x itself, no copy
    assert inputs["query_key_value"] is inputs["dense_h_to_4h"]
    # peft: four dropout outputs and masks (3 bytes per element); seeded: three inputs (2 bytes), at least (on a GPU,
    # dense's input may be the output flash attention keeps anyway).
    hidden_width = width // 4
    assert peft_block - seeded_block >= tokens * (3 * (3 * hidden_width + width) - 2 * (2 * hidden_width + width))


# concat_lora: a 4-bit base's product and its LoRA update as one GEMM over [x | h] and [dequant(W) | s B].

@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-as-on-cuda"])
def test_concat_gemm_gives_peft_loss_and_gradients(tiny_falcon: Path, precision: str, request: pytest.FixtureRequest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Same loss and LoRA gradients (lora_A's through h's gradient, lora_B's from the GEMM's) as peft, with dropout;
    no addmm left: every LoRA linear took the one product."""
    bf16 = precision != "fp32"
    if precision == "bf16-as-on-cuda":
        request.getfixturevalue("autocast_as_on_cuda")
    model = _lora_falcon(tiny_falcon, "4bit", bf16=bf16)
    ids = _ids()
    loss_a, grads_a = _loss_and_grads(model, ids, bf16)
    assert fuse_lora_forward(model, concat=True) == LORA_LINEARS == lora_fused.concat_lora_modules(model)
    counter = CountConcat(monkeypatch)
    with CountAddmm() as addmm:
        loss_b, grads_b = _loss_and_grads(model, ids, bf16)
    assert counter.calls == LORA_LINEARS and addmm.calls == 0
    loss_tol, grad_tol = (1e-3, 3e-2) if bf16 else (1e-6, 1e-5)
    assert abs(loss_a - loss_b) <= loss_tol * abs(loss_a)
    for name, grad in grads_a.items():
        rel = (grad - grads_b[name]).norm() / grad.norm()
        assert rel < grad_tol, (name, float(rel))


def test_concat_gemm_in_eval_mode_is_the_merged_weight_product(tiny_falcon: Path) -> None:
    """No dropout: [x | x A^T] [W | s B]^T is x (W + s B A)^T, the adapter merged into the dequantized weight."""
    model = _lora_falcon(tiny_falcon, "4bit")
    ids = _ids()
    expected = _logits(model, ids)
    fuse_lora_forward(model, concat=True)
    got = _logits(model, ids)
    assert (got - expected).abs().max() < 1e-4
    with model.disable_adapter():
        assert (_logits(model, ids) - got).abs().max() > 1e-2  # the update is in there, and matters


@pytest.mark.parametrize("case", ["plain-base", "4bit-fp32-lora", "base-hook", "trainable-bias"])
def test_concat_gemm_leaves_what_it_does_not_compute_to_the_addmm_path(tiny_falcon: Path, case: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain base, mixed dtypes, a hook on the 4-bit layer, or a bias that trains: not the product it reproduces."""
    if case == "plain-base":
        model = _lora_falcon(tiny_falcon, "plain")
    elif case == "4bit-fp32-lora":  # bf16 4-bit output, fp32 LoRA, no autocast: peft casts x and the update
        model = _lora_falcon(tiny_falcon, "4bit", bf16=True, lora_dtype=torch.float32, cast_norms=False)
    else:
        model = _lora_falcon(tiny_falcon, "4bit")
    layer = model.base_model.model.transformer.h[0].mlp.dense_4h_to_h.base_layer
    if case == "base-hook":
        layer.register_forward_hook(lambda module, args, out: out * 2)
    elif case == "trainable-bias":
        layer.bias = torch.nn.Parameter(torch.randn(layer.out_features) * 0.1)
    ids = _ids()
    expected = _logits(model, ids)
    fuse_lora_forward(model, concat=True)
    counter = CountConcat(monkeypatch)
    got = _logits(model, ids)
    expect_concat = {"plain-base": 0, "4bit-fp32-lora": 0}.get(case, LORA_LINEARS - 1)
    assert counter.calls == expect_concat
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_ops_dequantize_as_bitsandbytes_does(quant_type: str, nested: bool, blocksize: int,
                                                   dtype: torch.dtype) -> None:
    """The compiled layers' dequantization, bit for bit bitsandbytes' own, for every 4-bit layout QLoRA loads."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(96, 256, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(dtype) * 0.05
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(lora_fused.dequantize_4bit_ops(packed, state, dtype), expected)
    assert lora_fused.dequantize_4bit_ops(packed[:-1], state, dtype) is None  # a layout it does not know


def test_concat_gemm_keeps_its_concatenated_weight_for_backward(tiny_falcon: Path) -> None:
    """What the README promises for memory: each 4-bit LoRA linear keeps one [out, in + r] weight from forward to
    backward (2 bytes per base weight in bf16)."""
    model = _lora_falcon(tiny_falcon, "4bit")
    fuse_lora_forward(model, concat=True)
    model.train()
    expected = sorted((m.base_layer.out_features, m.base_layer.in_features + m.lora_A["default"].out_features)
                      for m in model.modules() if lora_fused.concat_lora_modules(m) and hasattr(m, "base_layer"))
    assert len(expected) == LORA_LINEARS
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(_ids(), labels=_ids()).loss.backward()
    assert sorted(shape for shape in saved if shape in expected) == expected


def test_concat_gemm_with_seeded_dropout_is_the_seeded_addmm_path(tiny_falcon: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """Seeded dropout makes h; the concatenated GEMM takes it as it takes peft's: the same loss and gradients."""
    request.getfixturevalue("autocast_as_on_cuda")
    model = _lora_falcon(tiny_falcon, "4bit", bf16=True)
    ids = _ids()
    fuse_lora_forward(model, seeded_dropout=True)
    loss_a, grads_a = _loss_and_grads(model, ids, bf16=True)
    unfuse_lora_forward(model)
    fuse_lora_forward(model, seeded_dropout=True, concat=True)
    loss_b, grads_b = _loss_and_grads(model, ids, bf16=True)
    assert abs(loss_a - loss_b) <= 1e-3 * abs(loss_a)
    for name, grad in grads_a.items():
        assert (grad - grads_b[name]).norm() / grad.norm() < 3e-2, name
