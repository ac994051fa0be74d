"""What each sdpa backend costs the first time it meets a shape, and after: eval's and training's attention calls.

    python bench/sdpa_backends.py [--results FILE]

Why: a profiled HellaSwag run (H100, 2,000 items, shared contexts) spent 4.5 s of 11 s inside
`scaled_dot_product_attention` over 416 calls (13 forwards x 32 layers), ~10 ms a call, where the kernel alone
measured 0.62 ms. Every eval forward has a new (rows, width): if a backend builds a plan per shape (cuDNN's
graphs), the first call of each shape pays for it, 13 times in the shared path and 20 in the unshared one.

Shapes are Falcon-7B's (71 query heads, one key/value head expanded as the fused attention passes it, head dim
64, bf16) at the eval token budget (16,384 tokens: rows = 16384 // width):
- `block`: the shared-context rows (a context of 40% of the row, then 4 endings), a boolean block mask, 13 widths;
- `causal`: the unshared rows, `is_causal=True`, 20 widths;
- `train`: 8 rows, widths in steps of 64 (pad_to_multiple_of 64), forward + backward, `is_causal=True`;
- `decode`: what `oasst generate` / `chat` run per new token: one row, one query against a key cache one longer at
  every step (64 steps from 128 keys), no mask. torch's cuDNN check accepts one query (not one key), so if cuDNN
  comes first every token is a new shape.
Each (mode, backend) runs in its own process, so no plan cache carries over from another backend.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

HEADS, HEAD_DIM, BUDGET = 71, 64, 16384
MODES = {
    "block": [344 - 20 * i for i in range(13)],
    "causal": [190 - 7 * i for i in range(20)],
    "train": [256 + 64 * i for i in range(8)],
    "decode": [128 + i for i in range(64)],
}
BACKENDS = ["default", "cudnn", "efficient", "flash", "math"]
WARM_CALLS = 5


def _segments(width: int, torch):  # noqa: ANN001, ANN202
    """A shared-context row: context (segment 0), then 4 endings (segments 1..4), padding (-1) to `width`."""
    context = int(width * 0.4)
    ending = (width - context) // 4
    seg = [0] * context + [k for k in range(1, 5) for _ in range(ending)]
    seg += [-1] * (width - len(seg))
    return torch.tensor(seg, dtype=torch.int32)


def one(mode: str, backend: str) -> dict[str, object]:
    """Cold and warm seconds of every shape of `mode` under `backend`, in this process."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from oasst_eval.shared import block_mask

    chosen = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
              "flash": [SDPBackend.FLASH_ATTENTION], "math": [SDPBackend.MATH]}.get(backend)
    dev = torch.device("cuda")
    rows_of = {"train": lambda w: 8, "decode": lambda w: 1}.get(mode, lambda w: BUDGET // w)
    shapes = []
    for width in MODES[mode]:
        rows = rows_of(width)
        grad = mode == "train"
        queries = 1 if mode == "decode" else width
        q = torch.randn(rows, HEADS, queries, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=grad)
        kv = torch.randn(rows, 2, width, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=grad)
        mask = None
        if mode == "block":
            mask = block_mask(_segments(width, torch).to(dev).expand(rows, width), "bool")

        def call() -> None:
            k = kv[:, :1].expand(rows, HEADS, width, HEAD_DIM)
            v = kv[:, 1:].expand(rows, HEADS, width, HEAD_DIM)
            if mode == "decode":  # the newest token sees every cached key: no mask, not causal
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            elif mask is None:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if grad:
                out.sum().backward()

        try:
            with sdpa_kernel(chosen) if chosen else nullcontext():
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                cold = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(WARM_CALLS):
                    call()
                torch.cuda.synchronize()
                warm = (time.perf_counter() - start) / WARM_CALLS
        except RuntimeError as exc:  # the backend refuses this input: record why, in one line
            return {"error": str(exc).splitlines()[0][:200]}
        shapes.append({"rows": rows, "width": width, "cold_ms": round(cold * 1e3, 3), "warm_ms": round(warm * 1e3, 3)})
    return {"shapes": shapes, "cold_s": round(sum(s["cold_ms"] for s in shapes) / 1e3, 3),
            "warm_s": round(sum(s["warm_ms"] for s in shapes) / 1e3, 4),
            "first_call_extra_s": round(sum(s["cold_ms"] - s["warm_ms"] for s in shapes) / 1e3, 3)}


def main() -> None:
    """Every (mode, backend) in its own process; a table last and the JSON in bench/results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = f"{datetime.now(timezone.utc):%F-%H%M}"
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / f"sdpa_backends-{stamp}.json")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    runs: dict[str, dict[str, object]] = {}
    for mode in MODES:
        for backend in BACKENDS:
            if backend == "flash" and mode == "block":
                continue  # flash takes no mask
            done = subprocess.run([sys.executable, __file__, "--one", mode, backend], capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            runs[f"{mode}/{backend}"] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    import torch

    rows = {"train": "8", "decode": "1 (one query)"}
    result = {"benchmark": "sdpa first-call and warm cost per shape and backend (Falcon-7B heads)",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(["torch"]), "cudnn": torch.backends.cudnn.version(),
              "modes": {m: {"widths": w, "rows": rows.get(m, f"{BUDGET} // width")} for m, w in MODES.items()},
              "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'mode/backend':22} {'shapes':>6} {'cold s':>8} {'warm s':>8} {'1st-call extra s':>16}")
    for name, run in runs.items():
        if "error" in run:
            print(f"{name:22} error: {run['error'][:90]}")
        else:
            print(f"{name:22} {len(run['shapes']):6d} {run['cold_s']:8.3f} {run['warm_s']:8.4f} "
                  f"{run['first_call_extra_s']:16.3f}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
