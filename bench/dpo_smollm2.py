"""SFT then DPO on SmolLM2-135M-Instruct (real weights): held-out preference accuracy of the base, the SFT adapter
and the SFT+DPO adapter side by side, on pairs split by tree from the English OASST1 validation trees.

1. SFT: `oasst train` (library `run_training`) on train/recipes/smollm2-135m-guanaco.yaml in the model's chat
   template, on the top-rank Guanaco build (`oasst build --top-rank --test-size 0.1 --seed 0`);
2. DPO: `--method dpo --init-adapter SFT` on the pairs build (`oasst build --pairs best --test-size 0.1 --seed 0`:
   the same seed hashes the same trees into the test split, so no held-out tree was seen by SFT or DPO);
3. preference accuracy on the held-out pairs, each model scored alike: the context is the prompt rendered as the
   model was trained (chat template with its generation prompt), each choice the reply as the template closes it
   (`oasst_eval.preference.reply_choice`, what `oasst eval --tasks guanaco_pairs` scores), summed log-likelihood
   (`acc`) and per byte (`acc_norm`), stderr sqrt(p(1-p)/(n-1)) as lm-eval computes it. One 4-bit base in memory:
   the base is scored with the adapters disabled, then the SFT and the DPO adapter in turn.

    # GPU machine, repo root (GGUF parts in bench/data/smollm2, data folders carried):
    PYTHONPATH=/root/site:.:model:train:eval python bench/dpo_smollm2.py
    # CPU smoke (2 steps each, results in /tmp):
    PYTHONPATH=.:model:train:eval .venv/bin/python bench/dpo_smollm2.py --cpu-smoke

Writes bench/results/dpo_smollm2-<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, versions  # bench/ is on sys.path when run as a script
from train_smollm2 import GGUF_NAME, SMOL_DIR, find_gguf

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "train" / "recipes" / "smollm2-135m-guanaco.yaml"
DPO_RECIPE = REPO / "train" / "recipes" / "smollm2-135m-dpo.yaml"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf")
SMOKE = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 128, "eval_rows": 2, "warmup_steps": 0,
         "compute_dtype": "float32", "precision": "fp32", "gradient_checkpointing": False, "logging_steps": 1,
         "eval_steps": 0}


def count_rows(path: Path) -> int:
    """Non-empty lines of a jsonl file."""
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


def train(recipe: Path, values: dict[str, Any]) -> dict[str, Any]:
    """One `oasst train` through the library; its train_summary (log history left out)."""
    from oasst_train.config import resolve_config
    from oasst_train.trainer import run_training

    cfg = resolve_config(recipe, values)
    print(f"train {recipe.name}: {json.dumps({k: v for k, v in values.items() if k not in ('model',)})}", flush=True)
    summary = run_training(cfg, progress=True)
    summary.pop("log_history", None)
    return summary


def preference_accuracy(sft: Path, dpo: Path, pairs: Path, limit: int | None) -> dict[str, Any]:
    """acc / acc_norm (with stderr) of the base, SFT and SFT+DPO on the held-out pairs, one base in memory."""
    import torch

    from oasst_eval.preference import reply_choice
    from oasst_model.spec import ModelSpec, load, recorded_format
    from oasst_tools.conversation import resolve_format

    model, tok = load(ModelSpec.from_adapter(sft))
    model.load_adapter(str(dpo), adapter_name="dpo")
    model.eval()
    fmt = resolve_format(recorded_format(sft), tok)
    rows = [json.loads(line) for line in (pairs / "test.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rows = rows[:limit] if limit else rows
    items = []
    for n, row in enumerate(rows, 1):
        where = f"{pairs / 'test.jsonl'}:{n}"
        context, chosen = reply_choice(tok, fmt, row["prompt"], row["chosen"], where)
        _, rejected = reply_choice(tok, fmt, row["prompt"], row["rejected"], where)
        if chosen != rejected:
            items.append((context, chosen, rejected))
    device = next(model.parameters()).device

    def loglik(context: str, choice: str) -> float:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(logp[len(ctx) - 1:].sum())

    def score(label: str) -> dict[str, Any]:
        right = right_norm = 0
        sums = [0.0, 0.0]
        for context, chosen, rejected in items:
            a, b = loglik(context, chosen), loglik(context, rejected)
            sums[0] += a
            sums[1] += b
            right += a > b
            right_norm += a / len(chosen.encode()) > b / len(rejected.encode())
        n = len(items)
        # The mean log-likelihoods show each model was scored with its own weights (and how DPO moved them).
        out: dict[str, Any] = {"n": n, "mean_loglik_chosen": sums[0] / n, "mean_loglik_rejected": sums[1] / n}
        for name, k in (("acc", right), ("acc_norm", right_norm)):
            p = k / n
            out[name] = p
            out[f"{name}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
        print(f"{label}: acc {out['acc']:.4f} ± {out['acc_stderr']:.4f}, acc_norm {out['acc_norm']:.4f}", flush=True)
        return out

    results = {}
    with model.disable_adapter():
        results["base"] = score("base")
    model.set_adapter("default")
    results["sft"] = score("sft")
    model.set_adapter("dpo")
    results["sft+dpo"] = score("sft+dpo")
    results["format"] = fmt
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=SMOL_DIR / GGUF_NAME)
    parser.add_argument("--sft-data", type=Path, default=REPO / "bench" / "data" / "guanaco-top-rank")
    parser.add_argument("--pairs", type=Path, default=REPO / "bench" / "data" / "pairs-best")
    parser.add_argument("--sft-epochs", type=float, default=3.0)
    parser.add_argument("--dpo-epochs", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None, help="held-out pairs scored (default: all)")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dpo-smollm2-"))
    gguf = find_gguf(args.gguf.resolve(), work)
    if gguf is None:
        sys.exit(f"{args.gguf} not found and no gguf.part-* beside it")
    for folder in (args.sft_data, args.pairs):
        if not (folder / "test.jsonl").is_file():
            sys.exit(f"{folder} has no test.jsonl: build it (see the module docstring)")
    sft_rows, pair_rows = count_rows(args.sft_data / "train.jsonl"), count_rows(args.pairs / "train.jsonl")
    test_pairs = count_rows(args.pairs / "test.jsonl")
    common = {"model": str(gguf), "save_steps": 100_000, "format": "chat-template"}
    sft_over: dict[str, Any] = dict(SMOKE) if args.cpu_smoke else {"pad_to_multiple_of": 64}
    dpo_over: dict[str, Any] = dict(SMOKE) if args.cpu_smoke else {"pad_to_multiple_of": 64}
    if not args.cpu_smoke:
        sft_over["max_steps"] = max(1, math.ceil(args.sft_epochs * sft_rows / 16))
        sft_over["eval_steps"] = max(1, sft_over["max_steps"] // 3)
        sft_over["logging_steps"] = max(1, sft_over["max_steps"] // 10)
        dpo_over["max_steps"] = max(1, math.ceil(args.dpo_epochs * pair_rows / 16))
        dpo_over["eval_steps"] = max(1, dpo_over["max_steps"] // 3)
        dpo_over["logging_steps"] = max(1, dpo_over["max_steps"] // 10)
    sft = train(SFT_RECIPE, {**common, **sft_over, "data": str(args.sft_data), "out": str(work / "sft")})
    dpo = train(DPO_RECIPE, {**common, **dpo_over, "data": str(args.pairs), "out": str(work / "dpo"),
                             "init_adapter": str(work / "sft"), "beta": args.beta})
    accuracy = preference_accuracy(work / "sft", work / "dpo", args.pairs, args.limit or (4 if args.cpu_smoke else None))
    import torch

    result = {
        "benchmark": "SFT then DPO (QLoRA NF4, chat template) on SmolLM2-135M-Instruct: held-out preference accuracy "
                     "of base, SFT and SFT+DPO on the pairs (--pairs best) of the English OASST1 validation trees, "
                     "split by tree (10%)",
        "smoke": args.cpu_smoke,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(LIBRARIES),
        "data": {"sft_train_rows": sft_rows, "pairs_train": pair_rows, "pairs_test": test_pairs,
                 "pairs_build_report": json.loads((args.pairs / "build_report.json").read_text(encoding="utf-8"))},
        "accuracy": accuracy,
        "sft": {k: sft.get(k) for k in ("global_step", "eval_loss_first", "eval_loss_last", "real_tokens_per_second",
                                        "peak_memory_bytes", "linear4bit_layers", "format", "train_seconds")},
        "dpo": {k: v for k, v in dpo.items() if k.startswith(("reward_", "logps_")) or k in (
            "global_step", "real_tokens_per_second", "peak_memory_bytes", "linear4bit_layers", "format",
            "train_seconds", "method", "beta", "loss_type", "init_adapter", "eval_loss_first", "eval_loss_last")},
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
        "wall_seconds": time.perf_counter() - started,
    }
    results_dir = Path("/tmp") if args.cpu_smoke else REPO / "bench" / "results"
    path = results_dir / f"dpo_smollm2{'-smoke' if args.cpu_smoke else ''}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    table(result, path)


def table(r: dict[str, Any], path: Path) -> None:
    """The three models' held-out accuracy, then the DPO run's own figures."""
    from rich.console import Console
    from rich.table import Table

    acc = r["accuracy"]
    t = Table(title=f"{'CPU smoke: ' if r['smoke'] else ''}held-out preference accuracy, SmolLM2-135M-Instruct "
                    f"({acc['base']['n']} pairs, {acc['format']})")
    for col in ("model", "acc", "acc_norm"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for label in ("base", "sft", "sft+dpo"):
        a = acc[label]
        t.add_row(label, f"{a['acc']:.4f} ± {a['acc_stderr'] or 0:.4f}", f"{a['acc_norm']:.4f} ± "
                  f"{a['acc_norm_stderr'] or 0:.4f}")
    d = r["dpo"]
    t.add_row("DPO steps / tok/s", str(d.get("global_step")), f"{d.get('real_tokens_per_second') or 0:,.0f}")
    t.add_row("reward acc first -> last", f"{d.get('reward_accuracy_first')}", f"{d.get('reward_accuracy_last')}")
    t.add_row("reward margin first -> last", f"{d.get('reward_margin_first')}", f"{d.get('reward_margin_last')}")
    Console(width=120).print(t)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
