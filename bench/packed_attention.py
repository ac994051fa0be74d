"""Packed rows on a GPU: flash's variable-length kernel against the block mask, and the padded batch they replace.

    python bench/packed_attention.py [--rows 20] [--results FILE]

Why: `packing: true` turns a batch into one padding-free row of packed examples (trl's collator). The fused Falcon
attention hid the other examples with a block-diagonal mask, so sdpa computed every pair of tokens in the row:
quadratic in 10,240 tokens for 20 rows of 512, where each example needs only its own causal triangle. The varlen
kernel (`torch.nn.attention.varlen`, patch `varlen_attention`) reads the example boundaries instead.

What it checks and times, on two Falcon-7B decoder layers (real width, 71 query heads, one key/value head, random
bf16 weights; no 4-bit or LoRA: attention is what differs), with real Guanaco example lengths (the English OASST1
validation threads in bench/data/guanaco-all, Falcon tokenizer, packed into rows of 512 as training packs them):
- hidden states and first-layer QKV weight gradients of each bf16 path against an fp32 reference (the same
  weights in fp32 through the block mask), for a next-token cross-entropy within each example, weights drawn with
  std 0.08 so the gradients are not rounding noise: the norm of the error over the norm of the reference; a wrong
  path (a leak, a wrong boundary, a wrong backward) stands out against the others;
- forward + backward milliseconds of the two layers: varlen, block mask, and the same examples as a padded batch
  (right padding to a multiple of 64, `is_causal`: the unpacked path), each warm (median of 5 after 2);
- tokens each path pushes through the layers (padding included) and the attention FLOPs it spends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import machine, versions  # noqa: E402 - bench/ is not a package

DATA = REPO / "bench" / "data" / "guanaco-all"
TOKENIZER = REPO / "bench" / "data" / "falcon-7b-tokenizer"
ROW = 512


def lengths(rows: int) -> list[list[int]]:
    """Example lengths of the first `rows` packed rows, packed as `oasst train --packing` packs them (trl's
    best-fit-decreasing `pack_dataset` into rows of ROW tokens)."""
    from datasets import Dataset, disable_progress_bars, load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = load_dataset(str(DATA), split="train")["text"]
    sizes = [min(ROW, len(tokenizer(t).input_ids) + 1) for t in texts]  # + EOS, cut at the row length
    bins = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in sizes]}), ROW, strategy="bfd")["seq_lengths"]
    # A mix like a training batch's: rows from across the packed set (its full rows come first), not only the full ones.
    step = max(1, len(bins) // rows)
    return bins[::step][:rows]


def build(torch, device: str, heads: int, dtype):  # noqa: ANN001, ANN201
    """Two Falcon-7B layers (`heads` x 64 wide) with the fused attention, in `dtype` on `device`."""
    from transformers import FalconConfig, FalconForCausalLM

    from oasst_model.attention import use_fused_attention

    config = FalconConfig(vocab_size=65024, hidden_size=heads * 64, num_attention_heads=heads, num_hidden_layers=2,
                          multi_query=True, parallel_attn=True, bias=False, alibi=False,
                          new_decoder_architecture=False, attention_dropout=0.0, hidden_dropout=0.0,
                          initializer_range=0.08)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FalconForCausalLM(config).to(device, dtype)
    model.config.use_cache = False
    assert use_fused_attention(model) == 2
    return model


def run(model, batch: dict, torch, targets=None) -> tuple[object, object]:  # noqa: ANN001
    """Hidden states of the real tokens ([tokens, width], in example order) and the first layer's QKV weight
    gradient, for one forward + backward: next-token cross-entropy against `targets` (-100: none), else a cheap
    loss (timing)."""
    model.zero_grad(set_to_none=True)
    out = model.transformer(**batch).last_hidden_state
    real = out[batch["attention_mask"].bool()] if "attention_mask" in batch else out.reshape(-1, out.shape[-1])
    if targets is None:
        real.float().square().mean().backward()
    else:
        logits = model.lm_head(real).float()
        torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100).backward()
    return real.detach().float(), model.transformer.h[0].self_attention.query_key_value.weight.grad.detach().float()


def timed(model, batch: dict, torch) -> float:  # noqa: ANN001
    """Median milliseconds of forward + backward through the two layers."""
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(7):
        sync()
        t0 = time.perf_counter()
        run(model, batch, torch)  # the cheap loss: the LM head would dilute the attention's share
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    """Check and time the three paths; print a table; write --results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (block mask only)")
    parser.add_argument("--heads", type=int, default=71, help="query heads of 64 (Falcon-7B: 71)")
    stamp = f"{datetime.now(timezone.utc):%F-%H%M}"
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / f"packed_attention-{stamp}.json")
    args = parser.parse_args()
    import torch

    from oasst_model import attention, patches

    packed_rows = lengths(args.rows)
    examples = [n for row in packed_rows for n in row]
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(10, 65000, (n,), generator=generator) for n in examples]
    flat = torch.cat(ids)[None].to(args.device)
    positions = torch.cat([torch.arange(n) for n in examples])[None].to(args.device)
    width = -(-max(examples) // 64) * 64
    padded = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, seq in enumerate(ids):
        padded[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    model = build(torch, args.device, args.heads, torch.bfloat16)
    targets = torch.cat([torch.cat([seq[1:], torch.tensor([-100])]) for seq in ids]).to(args.device)
    results: dict[str, object] = {"rows": len(packed_rows), "examples": len(examples), "real_tokens": sum(examples),
                                  "varlen_check": patches.check_all()["varlen_attention"]}
    outputs = {}
    modes = {}
    for name, devices in (("varlen", attention.VARLEN_DEVICES), ("block", ())):
        attention.VARLEN_DEVICES = devices
        batch = {"input_ids": flat, "position_ids": positions}
        outputs[name] = run(model, batch, torch, targets)
        modes[name] = model.transformer._oasst_plan.mode
        results[f"{name}_ms"] = timed(model, batch, torch)
    pad_batch = {"input_ids": padded.to(args.device), "attention_mask": mask.to(args.device)}
    outputs["padded"] = run(model, pad_batch, torch, targets)
    modes["padded"] = model.transformer._oasst_plan.mode
    results["padded_ms"] = timed(model, pad_batch, torch)
    results["modes"] = modes
    # The reference: the same weights in fp32, the block mask (sdpa takes fp32; flash does not).
    reference = build(torch, args.device, args.heads, torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    attention.VARLEN_DEVICES = ()
    h_ref, g_ref = run(reference, {"input_ids": flat, "position_ids": positions}, torch, targets)
    modes["reference"] = reference.transformer._oasst_plan.mode
    del reference
    results["error_vs_fp32"] = {
        name: {"hidden": float((h - h_ref).norm() / h_ref.norm()), "qkv_grad": float((g - g_ref).norm() / g_ref.norm())}
        for name, (h, g) in outputs.items()}
    heads, dim = args.heads, 64
    results["tokens"] = {"varlen": flat.shape[1], "block": flat.shape[1], "padded": len(examples) * width}
    # Attention score + value products, forward: 4 * heads * dim per (query, key) pair computed.
    results["attention_gflop_fwd"] = {
        "varlen": 4 * heads * dim * sum(n * (n + 1) / 2 for n in examples) / 1e9,
        "block": 4 * heads * dim * flat.shape[1] ** 2 / 1e9,
        "padded": 4 * heads * dim * len(examples) * width * (width + 1) / 2 / 1e9}
    results.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                   versions=versions(["torch", "transformers"]))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"2 Falcon-7B layers, {len(examples)} Guanaco examples in {len(packed_rows)} packed rows "
                        f"({sum(examples):,} real tokens), forward + backward")
    for column in ("path", "plan", "tokens", "attn GFLOP fwd", "ms", "x varlen"):
        table.add_column(column, justify="right")
    for name in ("varlen", "block", "padded"):
        table.add_row(name, modes[name], f"{results['tokens'][name]:,}",
                      f"{results['attention_gflop_fwd'][name]:.0f}", f"{results[f'{name}_ms']:.1f}",
                      f"{results[f'{name}_ms'] / results['varlen_ms']:.2f}")
    Console(stderr=True).print(table)
    for name, error in results["error_vs_fp32"].items():
        print(f"{name} (bf16) against fp32: hidden {error['hidden']:.2e}, qkv grad {error['qkv_grad']:.2e} (norm "
              f"of the error over the norm)")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
