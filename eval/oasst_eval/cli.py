"""`oasst eval`: score a base model and its adapter with lm-eval-harness, offline, side by side.

Imports only click, the standard library and oasst_tools at the top, so `oasst --help` stays instant;
torch, transformers, peft and lm_eval load when the command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from oasst_eval.config import help_for, parse_tasks, resolve_config, shown_for
from oasst_model.flags import load_options, option, take_aliases, verbose_option
from oasst_model.spec import INT_LIMIT, LOAD_FIELDS
from oasst_tools.conversation import FORMATS

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """The flag of EvalConfig field `name`, with its help and its default as `--help` shows it."""
    return option(name, help=help_for(name), default=shown_for(name), **kwargs)


@click.command(name="eval")
@load_options(inference=True, skip=tuple(n for n in LOAD_FIELDS if n != "model"))
@_option("adapter", metavar="DIR")
@_option("tasks", metavar="A,B,...")
@_option("compare_base", kind=bool)
@_option("num_fewshot", kind=click.IntRange(min=0, max=INT_LIMIT))
@_option("limit", kind=click.IntRange(min=1, max=INT_LIMIT))
@_option("batch_size", metavar="INTEGER|AUTO")
@_option("max_batch_size", kind=click.IntRange(min=1, max=INT_LIMIT))
@_option("max_batch_tokens", kind=click.IntRange(min=1, max=INT_LIMIT))
@_option("shared_context", kind=bool)
@_option("cudnn_attention", kind=bool)
@_option("merge_adapter", kind=bool)
@load_options(inference=True, skip=("model",))
@_option("device")
@_option("data_dir", metavar="DIR")
@_option("data", metavar="DIR")
@_option("format", choices=FORMATS)
@_option("out", metavar="DIR")
@_option("overwrite", kind=bool)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML file with any of these settings (flags win over it).")
@verbose_option
def eval_command(config_file: Path | None, tasks: str | None, verbose: bool, **flags: object) -> None:
    """Score a model, and its adapter against it, with lm-eval-harness.

    Runs offline: hellaswag reads local files (--data-dir, $OASST_EVAL_DATA or the fixture subset) with
    lm-eval's own preprocessing and metrics; guanaco_test scores per-token loss on `oasst build`'s test.jsonl;
    guanaco_pairs scores how often the chosen reply of a held-out pair (`oasst build --pairs`) is the likelier one.

    The adapter's base loads as it was trained (its train_config.yaml: 4-bit stays 4-bit), unless flags say
    otherwise; the results table and eval_summary.json say how it was loaded.

    \b
        oasst eval --adapter runs/tiny --compare-base --tasks hellaswag,guanaco_test --data out/build --limit 40
        oasst eval --model HuggingFaceTB/SmolLM2-135M-Instruct --tasks hellaswag --data-dir ../shared/data
        oasst eval --adapter runs/tiny --compare-base --tasks guanaco_pairs --data out/pairs
    """
    from rich.console import Console

    from oasst_eval.report import check_earlier, show, summary, write_outputs
    from oasst_eval.run import evaluate
    from oasst_model.quiet import for_command
    from oasst_tools.output import check_apart, run_lock
    from oasst_tools.files import check_out_folder

    console = Console(stderr=True)
    flags = take_aliases(flags)
    notes: list[str] = []
    cfg = resolve_config(config_file, {**flags, "tasks": parse_tasks(tasks) if tasks is not None else None}, notes)
    for line in notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    # Before scoring, which can take hours: an --out that cannot be written, or that would mix its files into an
    # input, fails now.
    check_apart(cfg.out, [("--adapter", cfg.adapter), ("--model", cfg.model), ("--data", cfg.data),
                          ("--data-dir", cfg.data_dir)])
    out_folder = Path(cfg.out)
    check_out_folder(out_folder, "--out")
    check_earlier(out_folder, cfg.overwrite)
    for_command(verbose, long_text=_long_text)
    # Held from before scoring to the last rename: two evals into one --out would delete each other's files.
    with run_lock(out_folder, "oasst eval"):
        check_earlier(out_folder, cfg.overwrite)  # again: one may have ended since
        runs, settings = evaluate(cfg, log=lambda msg: console.print(msg, soft_wrap=True, highlight=False,
                                                                     markup=False), verbose=verbose)
        doc = summary(runs, settings)
        written = write_outputs(out_folder, runs, doc)
    out = Console()
    if not out.is_terminal:
        # Piped or captured output would wrap the table at 80 columns; a log file has room.
        out.width = max(out.width, 120)
    show(doc, written, out)


def _long_text(tokens: int, maximum: int) -> str:
    """transformers' too-long-text warning, said as what lm-eval does about it (nothing is wrong)."""
    return (f"texts longer than the model's {maximum} tokens (one of {tokens}) are scored in windows of the model's "
            f"length (guanaco_test) or from the end of their context (choice tasks such as hellaswag)")
