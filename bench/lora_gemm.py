"""Where a 4-bit LoRA linear's time goes, and whether the LoRA update can ride inside the base GEMM.

    python bench/lora_gemm.py [--tokens 10240] [--results FILE]

Why: on an H100 the fast recipe's profile (train_throughput-2026-12-06-h100.json call 11) spends ~378 ms per step
in the base GEMMs (~740 TFLOP/s: at the chip's matrix rate) and ~250 ms in everything else, of which the LoRA
update's addmm alone takes ~41 ms at a third of the memory bandwidth its bytes need. One way to drop it: the update
is `h @ (s B)^T` with `h = A(dropout(x))`, so `y = [x | h] @ [W | s B]^T` computes base and update in one GEMM whose
inner dimension grows by the rank (4,544 -> 4,608: +1.4% FLOPs), and in backward `g @ [W | s B]` gives the input's
gradient and h's in one GEMM too. The price is writing the concatenated weight and input.

Per Falcon-7B linear shape (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) at `--tokens` tokens, NF4 base
with double quantization (bitsandbytes), LoRA r 64, alpha 128, dropout 0.1, bf16, forward + backward (gradients
of the input, lora_A and lora_B), warm CUDA-event medians, each path also under torch.compile:
- base: the 4-bit linear alone (what no LoRA would cost);
- peft: peft 0.21's arithmetic (`base(x) + B(A(dropout(x))) * s`);
- addmm: the trainer's `fused_lora` (`addmm(base(x), A(dropout(x)), B^T, alpha=s)`);
- kcat: one GEMM over the concatenated input and weight (bitsandbytes dequantizes, then the copy into the
  concatenation), the weight rebuilt in backward eagerly; compiled, torch's partitioner keeps it from forward
  instead (found afterwards; `concat_lora` keeps it in both modes);
- kcat-torchdq: the same with the dequantization in torch ops (oasst_model.lora_fused.dequantize_4bit_ops), so that
  inductor writes the dequantized weight straight into the concatenation (compiled only: eager it is slow by
  construction).
Each path's output and gradients are checked against peft's with dropout off. Sum over the four shapes x 32 layers
gives milliseconds per fast-recipe step, next to the profile's.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "model"))
from _common import machine, median_ms, versions  # noqa: E402 - bench/ is not a package
from oasst_model.lora_fused import dequantize_4bit_ops  # noqa: E402

SHAPES = {"query_key_value": (4672, 4544), "dense": (4544, 4544), "dense_h_to_4h": (18176, 4544),
          "dense_4h_to_h": (4544, 18176)}  # (out_features, in_features)
LAYERS = 32
RANK, ALPHA, DROPOUT = 64, 128, 0.1


def make_paths(torch: Any) -> dict[str, Any]:
    """name -> fn(x, weight, state, lora_a, lora_b, p) returning y."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    s = ALPHA / RANK
    drop = torch.nn.functional.dropout

    def base(x, w, st, a, b, p):  # noqa: ANN001, ANN202
        return bnb.matmul_4bit(x, w.t(), quant_state=st)

    def peft(x, w, st, a, b, p):  # noqa: ANN001, ANN202
        return base(x, w, st, a, b, p) + (drop(x, p) @ a.t() @ b.t()) * s

    def addmm(x, w, st, a, b, p):  # noqa: ANN001, ANN202
        y = base(x, w, st, a, b, p)
        h = drop(x, p) @ a.t()
        return torch.addmm(y.view(-1, y.shape[-1]), h.view(-1, RANK), b.t(), alpha=s).view(y.shape)

    class KCat(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, h, b, w, st, dequant):  # noqa: ANN001, ANN205
            weight = torch.cat((dequant(w, st), b * s), dim=1)
            ctx.save_for_backward(h, b, w)
            ctx.st, ctx.dequant = st, dequant
            return torch.cat((x, h), dim=-1) @ weight.t()

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            h, b, w = ctx.saved_tensors
            weight = torch.cat((ctx.dequant(w, ctx.st), b * s), dim=1)
            gcat = g @ weight
            inner = ctx.st.shape[1]
            gx, gh = gcat[..., :inner], gcat[..., inner:]
            gb = (g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])) * s
            return gx, gh, gb, None, None, None

    def bnb_dequant(w, st):  # noqa: ANN001, ANN202
        return bf.dequantize_4bit(w, st).to(st.dtype)

    def torch_dequant(w, st):  # noqa: ANN001, ANN202
        return dequantize_4bit_ops(w, st, st.dtype)

    def kcat(x, w, st, a, b, p):  # noqa: ANN001, ANN202
        return KCat.apply(x, drop(x, p) @ a.t(), b, w, st, bnb_dequant)

    def kcat_torchdq(x, w, st, a, b, p):  # noqa: ANN001, ANN202
        return KCat.apply(x, drop(x, p) @ a.t(), b, w, st, torch_dequant)

    return {"base": base, "peft": peft, "addmm": addmm, "kcat": kcat, "kcat-torchdq": kcat_torchdq}


def timed(torch: Any, fn: Any, args: tuple, repeats: int, cuda: bool) -> float:
    """Median milliseconds of forward + backward of `fn(*args)` (warm)."""
    x, a, b = args[0], args[3], args[4]

    def once() -> None:
        y = fn(*args)
        y.backward(torch.ones_like(y))
        x.grad = a.grad = b.grad = None

    return median_ms(torch, once, repeats, cuda)


def check(torch: Any, paths: dict[str, Any], args: tuple, compiled: dict[str, Any]) -> dict[str, float]:
    """Worst relative error (output, input grad, lora grads) of every path against peft's, dropout off."""
    x, w, st, a, b, _ = args
    errors = {}

    def run(fn: Any) -> list[Any]:
        y = fn(x, w, st, a, b, 0.0)
        y.backward(torch.ones_like(y) / y.shape[-1])
        out = [y.detach().float(), x.grad.float(), a.grad.float(), b.grad.float()]
        x.grad = a.grad = b.grad = None
        return out

    reference = run(paths["peft"])
    for name, fn in {**paths, **{f"{k} compiled": v for k, v in compiled.items()}}.items():
        if name.startswith("base"):
            continue
        got = run(fn)
        errors[name] = max(float((g - r).norm() / r.norm().clamp_min(1e-12)) for g, r in zip(got, reference,
                                                                                            strict=True))
    return errors


def main() -> None:
    """Time every path on every shape and write the results."""
    import torch
    import bitsandbytes.functional as bf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10240)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "lora_gemm.json")
    opts = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    paths = make_paths(torch)
    compiled = {name: torch.compile(fn, dynamic=False) for name, fn in paths.items()}
    table: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for shape_name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
        packed, state = bf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8)
        state.dtype = dtype
        dq = bf.dequantize_4bit(packed, state).to(dtype)
        ours = dequantize_4bit_ops(packed, state, dtype)
        assert torch.equal(dq, ours), f"{shape_name}: torch NF4 dequantization differs from bitsandbytes'"
        x = (torch.randn(opts.tokens, in_f, device=device, dtype=dtype)).requires_grad_()
        a = (torch.randn(RANK, in_f, device=device, dtype=dtype) / in_f**0.5).requires_grad_()
        b = (torch.randn(out_f, RANK, device=device, dtype=dtype) * 0.01).requires_grad_()
        args = (x, packed, state, a, b, DROPOUT)
        errors[shape_name] = check(torch, paths, args, compiled)
        row: dict[str, float] = {}
        for name, fn in paths.items():
            if name != "kcat-torchdq":
                row[name] = round(timed(torch, fn, args, opts.repeats, cuda), 3)
            row[f"{name} compiled"] = round(timed(torch, compiled[name], args, opts.repeats, cuda), 3)
        table[shape_name] = row
        print(shape_name, row, flush=True)
        del x, a, b, weight, dq, ours
    names = list(next(iter(table.values())))
    per_step = {n: round(sum(r[n] for r in table.values()) * LAYERS, 1) for n in names}
    result = {"benchmark": "fwd+bwd ms of one 4-bit LoRA linear per Falcon-7B shape; per_step: x 4 shapes x 32 "
                           "layers", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(["torch", "bitsandbytes"]), "tokens": opts.tokens,
              "ms": table, "per_step_ms": per_step, "max_rel_error_vs_peft_no_dropout": errors}
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    opts.results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'path':<24} {'ms per step (32 layers)':>24}")
    for n in names:
        print(f"{n:<24} {per_step[n]:>24}")


if __name__ == "__main__":
    main()
