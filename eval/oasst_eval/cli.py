"""`oasst eval`: score a base model and its adapter with lm-eval-harness, offline, side by side.

Imports only click, the standard library and oasst_tools at the top, so `oasst --help` stays instant;
torch, transformers, peft and lm_eval load when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from oasst_eval.config import help_for, parse_tasks, resolve_config


@click.command(name="eval")
@click.option("--model", "model", default=None, help=help_for("model"))
@click.option("--adapter", default=None, help=help_for("adapter"))
@click.option("--tasks", default=None, help=help_for("tasks"))
@click.option("--compare-base/--no-compare-base", "compare_base", default=None, help=help_for("compare_base"))
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help=help_for("num_fewshot"))
@click.option("--limit", type=click.IntRange(min=1), default=None, help=help_for("limit"))
@click.option("--batch-size", default=None, help=help_for("batch_size"))
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None, help=help_for("max_batch_size"))
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=None, help=help_for("max_batch_tokens"))
@click.option("--merge-adapter/--no-merge-adapter", "merge_adapter", default=None, help=help_for("merge_adapter"))
@click.option("--load-in-4bit/--no-load-in-4bit", "load_in_4bit", default=None, help=help_for("load_in_4bit"))
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default=None,
              help=help_for("dtype"))
@click.option("--device", default=None, help=help_for("device"))
@click.option("--data-dir", default=None, help=help_for("data_dir"))
@click.option("--data", default=None, help=help_for("data"))
@click.option("--out", default=None, help=help_for("out"))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML file with any of these settings (flags win over it).")
def eval_command(config_file: Path | None, tasks: str | None, **flags: object) -> None:
    """Score a model, and its adapter against it, with lm-eval-harness.

    Runs offline: hellaswag reads local files (--data-dir, $OASST_EVAL_DATA or the fixture subset) with
    lm-eval's own preprocessing and metrics; guanaco_test scores per-token loss on `oasst build`'s test.jsonl.

    \b
        oasst eval --model ../shared/models/stories260K --adapter out/adapter --compare-base \\
            --tasks hellaswag,guanaco_test --data out/build --limit 40
        oasst eval --model HuggingFaceTB/SmolLM2-135M-Instruct --tasks hellaswag --data-dir ../shared/data
    """
    from rich.console import Console

    from oasst_eval.report import show, summary, write_outputs
    from oasst_eval.run import evaluate
    from oasst_tools.output import check_apart
    from oasst_tools.files import check_out_folder

    console = Console(stderr=True)
    cfg = resolve_config(config_file, {**flags, "tasks": parse_tasks(tasks) if tasks is not None else None})
    # Before scoring, which can take hours: an --out that cannot be written, or that would mix its files into an
    # input, fails now.
    check_apart(cfg.out, [("--adapter", cfg.adapter), ("--model", cfg.model), ("--data", cfg.data),
                          ("--data-dir", cfg.data_dir)])
    check_out_folder(Path(cfg.out), "--out")
    runs, settings = evaluate(cfg, log=lambda msg: console.print(msg, soft_wrap=True, highlight=False, markup=False))
    doc = summary(runs, settings)
    written = write_outputs(Path(cfg.out), runs, doc)
    out = Console()
    if not out.is_terminal:
        # Piped or captured output would wrap the table at 80 columns; a log file has room.
        out.width = max(out.width, 120)
    show(doc, written, out)
