"""What LoRA dropout costs in the fast recipe's compiled layers, and whether cheaper random bits would pay.

    python bench/dropout_cost.py [--tokens 10240] [--repeats 20] [--results FILE]

Why: the fast recipe's profile on an H100 (train_throughput-2026-12-07-h100.json, call 3) spends ~11% of its kernel
time in three fused element-wise kernels: GELU + dropout (942 us a layer), LayerNorm + dropout (587 us), GELU's
backward. Their bytes alone would take ~0.2-0.4 ms at the H100's bandwidth, so they look bound by the dropout's
random numbers: inductor draws one Philox value per element. LoRA dropout (0.1, the recipe's) is four masks a layer in
Falcon-7B: the LayerNorm output twice (query_key_value's and dense_h_to_4h's LoRA), the attention output (dense's),
GELU's output (dense_4h_to_h's). This measures, per decoder layer at `--tokens` tokens, bf16, compiled, forward and
backward of that element-wise work with its outputs (what the base GEMMs and the LoRA A products read):
- none: lora_dropout 0 (the floor: what the masks cost is `torch` minus this);
- torch: torch's dropout, as peft applies it (the recipe today);
- bits15: the same Bernoulli(0.9) masks from half the random draws: each 30-bit random word gives two 15-bit
  uniforms, an element kept when its uniform is >= 3277 (keep probability 0.899994 instead of 0.9);
- bits15x4: four 15-bit uniforms from each 60-bit random word (inductor's 64-bit randint: one Philox call for 64
  bits), a quarter of the draws;
- carved: the train option carved_lora_dropout as shipped (`oasst_model.lora_fused.carved_dropout`: bits15x4's
  masks, words laid along the last dimension, scaled by 2^15 / (2^15 - 3277) so the mean is exact).
Each path's kept fraction is checked against 0.9 (within 6 standard errors) and its kept values against x / 0.9;
carved's masks also per field of a word and for pairs of fields (independent uniforms: keep^2 jointly).
Per-step milliseconds are per layer x 32, next to the profile's. On a CPU (`--tokens 256`) it checks the paths
run and agree; its times mean nothing for a GPU.
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

HIDDEN, FFN, LAYERS, P = 4544, 18176, 32, 0.1
THRESHOLD = round(P * 2**15)  # 3277 of 32768


def make_paths(torch: Any) -> dict[str, Any]:
    """name -> fn(x, attn, h, ln_w, ln_b) returning the tensors the layer's GEMMs read."""
    f = torch.nn.functional

    def torch_drop(t: Any) -> Any:
        return f.dropout(t, P, training=True)

    def carved(t: Any, per_word: int, dtype: Any) -> Any:
        """Dropout whose uniforms are 15-bit fields of random words, `per_word` to a word."""
        n = t.numel()
        words = torch.randint(0, 2 ** (15 * per_word), (-(-n // per_word),), device=t.device, dtype=dtype)
        fields = [(words >> (15 * i)) & 0x7FFF for i in range(per_word)]
        uniforms = torch.stack(fields, dim=-1).flatten()[:n].view(t.shape)
        return torch.where(uniforms >= THRESHOLD, t * (1 / (1 - P)), torch.zeros((), dtype=t.dtype, device=t.device))

    def bits15_drop(t: Any) -> Any:
        return carved(t, 2, torch.int32)

    def bits15x4_drop(t: Any) -> Any:
        return carved(t, 4, torch.int64)

    def layer(drop: Any) -> Any:
        def run(x: Any, attn: Any, h: Any, ln_w: Any, ln_b: Any) -> tuple[Any, ...]:
            n = f.layer_norm(x, (HIDDEN,), ln_w, ln_b)
            g = f.gelu(h)
            if drop is None:
                return n, g, attn
            return n, drop(n), drop(n), attn, drop(attn), g, drop(g)
        return run

    from oasst_model.lora_fused import carved_dropout

    return {"none": layer(None), "torch": layer(torch_drop), "bits15": layer(bits15_drop),
            "bits15x4": layer(bits15x4_drop), "carved": layer(lambda t: carved_dropout(t, P))}


def inputs(torch: Any, tokens: int, device: str) -> tuple[Any, ...]:
    """The layer's element-wise inputs: residual stream, attention output, dense_h_to_4h output, LayerNorm."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    return rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(tokens, FFN), rand(HIDDEN), rand(HIDDEN)


def timed(torch: Any, fn: Any, args: tuple, repeats: int, cuda: bool) -> float:
    """Median milliseconds of forward + backward (warm)."""

    def once() -> None:
        outs = fn(*args)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for a in args:
            a.grad = None

    return median_ms(torch, once, repeats, cuda)


def check(torch: Any, fn: Any, args: tuple) -> dict[str, float]:
    """Kept fraction of the GELU mask (the largest), its distance from 0.9 in standard errors, and the largest
    relative error of a kept value against x / 0.9."""
    with torch.no_grad():
        outs = fn(*args)
    g, dropped = outs[-2].float(), outs[-1].float()
    kept = dropped != 0
    fraction = kept.float().mean().item()
    se = (P * (1 - P) / kept.numel()) ** 0.5
    expected = g[kept] / (1 - P)
    error = ((dropped[kept] - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
    return {"kept_fraction": fraction, "standard_errors_from_0.9": round((fraction - (1 - P)) / se, 2),
            "max_rel_error_kept": error}


def field_check(torch: Any, fn: Any, args: tuple) -> dict[str, float]:
    """Carved masks: the largest distance, in standard errors, of any field's keep rate from 1 - 3277/2^15 and of
    any pair of fields' joint keep rate from its square."""
    with torch.no_grad():
        fields = (fn(*args)[-1] != 0).reshape(-1, 4)
    q = 1 - THRESHOLD / 2**15

    def distance(kept: Any, expected: float) -> float:
        return abs(kept.float().mean().item() - expected) / (expected * (1 - expected) / kept.numel()) ** 0.5

    single = max(distance(fields[:, i], q) for i in range(4))
    joint = max(distance(fields[:, i] & fields[:, j], q * q) for i in range(4) for j in range(i + 1, 4))
    return {"field_standard_errors_max": round(single, 2), "pair_standard_errors_max": round(joint, 2)}


def main() -> None:
    """Time every path and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 10240 on a GPU, 256 "
                        "on a CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "dropout_cost.json")
    opts = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = opts.tokens or (10240 if cuda else 256)
    args = inputs(torch, tokens, device)
    paths = make_paths(torch)
    # Every path is the same `run` code object: one compilation per path and grad mode, past dynamo's default limit
    # of 8 (beyond it a path would run eager, silently).
    torch._dynamo.config.recompile_limit = 64
    compiled = {name: torch.compile(fn, dynamic=False) for name, fn in paths.items()}
    checks, ms = {}, {}
    for name, fn in compiled.items():
        if name != "none":
            checks[name] = check(torch, fn, args)
            if name == "carved":
                checks[name].update(field_check(torch, fn, args))
            if abs(checks[name]["standard_errors_from_0.9"]) > 6 or checks[name]["max_rel_error_kept"] > 0.02 \
                    or max(checks[name].get("field_standard_errors_max", 0),
                           checks[name].get("pair_standard_errors_max", 0)) > 6:
                raise SystemExit(f"{name}: its masks are not dropout(0.1): {checks[name]}")
        ms[name] = round(timed(torch, fn, args, opts.repeats, cuda), 3)
        print(name, ms[name], checks.get(name, ""), flush=True)
    per_step = {name: round(value * LAYERS, 1) for name, value in ms.items()}
    result = {"benchmark": "LoRA dropout's element-wise cost per Falcon-7B layer, compiled, forward + backward",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(["torch", "triton"]), "tokens": tokens, "device": device,
              "ms_per_layer": ms, "ms_per_step": per_step, "checks": checks}
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    opts.results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'path':<10} {'ms per layer':>14} {'ms per step (32 layers)':>26}")
    for name in ms:
        print(f"{name:<10} {ms[name]:>14} {per_step[name]:>26}")
    print("dropout's cost per step: " + ", ".join(f"{per_step[name] - per_step['none']:.1f} ms ({name})"
                                                  for name in per_step if name != "none"))


if __name__ == "__main__":
    main()
