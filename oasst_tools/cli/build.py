"""`oasst build`: OASST trees -> a Guanaco-style dataset folder."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import click

from oasst_tools.build import FILE_FORMATS, BuildConfig, BuildReport, NoRowsError, build_dataset, parse_label_limits
from oasst_tools.cli.params import FolderPath, switch
from oasst_tools.errors import printable
from oasst_tools.filters import Selection
from oasst_tools.output import Interrupted
from oasst_tools.pairs import PAIR_MODES
from oasst_tools.read import Progress, ReadReport
from oasst_tools.sources import input_size


def _comma_list(value: tuple[str, ...], what: str, example: str) -> set[str]:
    """Repeated, comma-separated option values as one set; an empty one (`""`, `,`) is a usage error, not "all"."""
    found: set[str] = set()
    for item in value:
        items = {part.strip() for part in item.split(",") if part.strip()}
        if not items:
            raise click.BadParameter(f"{item!r} names no {what}; give {example}")
        found |= items
    return found


def _langs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> frozenset[str]:
    """--lang values as a set of codes."""
    return frozenset(_comma_list(value, "language", "codes such as en,de (or leave --lang out for all languages)"))


def _states(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> frozenset[str]:
    """--tree-state values as a set (as --lang takes them); 'any' among them keeps every state."""
    states = _comma_list(value, "tree state", "states such as ready_for_export,growing (or 'any')")
    return frozenset() if "any" in states else frozenset(states)


def _fraction(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--test-size: FloatRange refuses 0, 1 and the infinities but lets NaN through (every comparison is false)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a fraction between 0 and 1 (e.g. 0.1)")
    return value


def _help(cls: type, name: str) -> str:
    """The help text a config field documents, so the flag and the dataclass never disagree."""
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@click.command()
@click.option("--input", "inputs", multiple=True, metavar="PATH_OR_HUB_ID", help=_help(BuildConfig, "inputs")
              + " Flat (.jsonl, .jsonl.gz, .parquet, save_to_disk folder) or nested (.trees.jsonl[.gz]); "
              "default: OpenAssistant/oasst1 from the hub.")
@click.option("--out", type=FolderPath(), required=True, help=_help(BuildConfig, "out"))
@click.option("--lang", "langs", multiple=True, metavar="CODES", callback=_langs, help="Comma-separated languages "
              "of the root prompt to keep, e.g. en,de (default: all). 'pt' also matches 'pt-BR'.")
@switch("--lang-exact", help=_help(Selection, "lang_exact"))
@click.option("--top-rank", is_flag=True, help="One thread per tree: the best-ranked reply at every step (Guanaco). "
              "The default.")
@click.option("--all-threads", is_flag=True, help="Every root-to-leaf thread.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, metavar="N", help=_help(Selection, "top_k"))
@click.option("--pairs", type=click.Choice(PAIR_MODES), default=None, help=_help(BuildConfig, "pairs")
              + " Rows in trl's conversational preference format; not with --top-rank, --all-threads or --top-k.")
@click.option("--tree-state", "tree_states", multiple=True, default=("ready_for_export",), show_default=True,
              callback=_states, help="Comma-separated tree states to keep; 'any' keeps all (OASST2 has more states).")
@click.option("--label-max", multiple=True, metavar="NAME=X", help=_help(Selection, "label_max")
              + " E.g. toxicity=0.5. A message without the label passes.")
@click.option("--label-min", multiple=True, metavar="NAME=X", help=_help(Selection, "label_min")
              + " E.g. quality=0.6.")
@switch("--no-synthetic", help=_help(Selection, "drop_synthetic"))
@switch("--end-with-assistant", help=_help(Selection, "end_with_assistant"))
@click.option("--min-turns", type=click.IntRange(min=1), default=1, show_default=True,
              help=_help(Selection, "min_turns"))
@click.option("--max-turns", type=click.IntRange(min=1), default=None, help=_help(Selection, "max_turns"))
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              callback=_fraction, help=_help(BuildConfig, "test_size"))
@click.option("--seed", type=int, default=0, show_default=True, help=_help(BuildConfig, "seed"))
@click.option("--file-format", type=click.Choice(FILE_FORMATS), default="jsonl",
              show_default=True, help=_help(BuildConfig, "file_format"))
# The old name of --file-format, read with a warning: train, eval, generate and chat's --format is the conversation
# format, and one name must not mean two settings.
@click.option("--format", "old_format", type=click.Choice(FILE_FORMATS), default=None, hidden=True)
@switch("--overwrite", help=_help(BuildConfig, "overwrite"))
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help=_help(BuildConfig, "on_error"))
@switch("--quiet", "-q", help="No progress bar and no summary table.")
def build(inputs: tuple[str, ...], out: Path, langs: frozenset[str], lang_exact: bool, top_rank: bool,
          all_threads: bool, top_k: int | None, pairs: str | None, tree_states: frozenset[str],
          label_max: tuple[str, ...], label_min: tuple[str, ...], no_synthetic: bool, end_with_assistant: bool,
          min_turns: int, max_turns: int | None, test_size: float | None, seed: int, file_format: str,
          old_format: str | None, overwrite: bool, on_error: str, quiet: bool) -> None:
    """Build a Guanaco-style dataset from OpenAssistant conversation trees.

    \b
        oasst build --input ../shared/data/oasst1/validation-en.messages.jsonl \\
                    --lang en --top-rank --test-size 0.1 --out data/guanaco-en
        oasst build --input oasst1-train.jsonl.gz --input oasst1-valid.jsonl.gz --out guanaco
        oasst build --input 2023-04-12_oasst_ready.trees.jsonl.gz --all-threads \\
                    --label-max toxicity=0.5 --end-with-assistant --out sft
        oasst build --input ../shared/data/oasst1/validation-en.messages.jsonl \\
                    --lang en --pairs all --test-size 0.1 --out data/pairs-en
    """
    # One selection: two given would leave one silently unused (click would keep the last of two flags).
    chosen = [flag for flag, given in (("--top-rank", top_rank), ("--all-threads", all_threads),
                                       ("--top-k", top_k is not None)) if given]
    if pairs is not None:
        _check_pairs(chosen, end_with_assistant, min_turns, max_turns)
    if len(chosen) > 1:
        raise click.UsageError(f"{chosen[0]} and {chosen[1]} are mutually exclusive: choose one thread selection")
    mode = "all-threads" if all_threads else "top-rank"
    if max_turns is not None and min_turns > max_turns:
        raise click.BadParameter(f"--min-turns {min_turns} is above --max-turns {max_turns}: no thread could be kept",
                                 param_hint="'--min-turns'")
    selection = Selection(
        mode="top-k" if top_k is not None else mode,  # type: ignore[arg-type]
        top_k=top_k or 1,
        langs=langs,
        lang_exact=lang_exact,
        tree_states=tree_states,
        label_max=parse_label_limits(label_max, "--label-max"),
        label_min=parse_label_limits(label_min, "--label-min"),
        drop_synthetic=no_synthetic,
        end_with_assistant=end_with_assistant,
        min_turns=min_turns,
        max_turns=max_turns,
    )
    cfg = replace(BuildConfig(), out=out, selection=selection, pairs=pairs, test_size=test_size, seed=seed,
                  file_format=_file_format(file_format, old_format), overwrite=overwrite,  # type: ignore[arg-type]
                  on_error=on_error)
    if inputs:
        cfg = replace(cfg, inputs=tuple(inputs))
    try:
        with _progress(cfg.inputs, quiet) as advance, _quick_gil_handoff():
            report = build_dataset(cfg, advance)
    except Interrupted as exc:  # the shell's convention: 128 + the signal's number
        click.echo(f"error: {exc}", err=True)
        sys.exit(128 + exc.signum)
    except NoRowsError as exc:  # what was skipped or orphaned is the likely cause: said before the error line
        _warn(exc.report, cfg)
        raise
    _warn(report, cfg)
    if not quiet:
        show_summary(report, cfg.out)


def _file_format(file_format: str, old_format: str | None) -> str:
    """--file-format, or the old --format with a warning; both, naming different formats, is a usage error."""
    if old_format is None:
        return file_format
    given = click.get_current_context().get_parameter_source("file_format") != click.core.ParameterSource.DEFAULT
    if given and file_format != old_format:
        raise click.UsageError(f"--file-format {file_format} and --format {old_format} disagree: --format is the old "
                               "name of --file-format, give one")
    click.echo("warning: oasst build --format is now --file-format (--format is the conversation format of train, "
               "eval, generate and chat); the old name still works", err=True)
    return old_format


def _check_pairs(chosen: list[str], end_with_assistant: bool, min_turns: int, max_turns: int | None) -> None:
    """--pairs with a thread selection (`chosen`: the flags given) is a usage error; the turn rules shape threads,
    so each gets a warning."""
    if chosen:
        raise click.UsageError(f"--pairs and {chosen[0]} are mutually exclusive: --pairs writes preference pairs "
                               "instead of threads")
    for flag, given in (("--end-with-assistant", end_with_assistant), ("--min-turns", min_turns != 1),
                        ("--max-turns", max_turns is not None)):
        if given:
            click.echo(f"warning: {flag} shapes threads and is ignored with --pairs", err=True)


@contextmanager
def _quick_gil_handoff(seconds: float = 0.001) -> Iterator[None]:
    """A shorter GIL switch interval while the build runs. The thread that inflates a .gz input
    (`oasst_tools.lines`) takes the GIL back about ten times per block; at the default 5 ms it waits up to
    50 ms a block for the parsing thread to let go and falls behind it (OASST1-sized export: 1.82 s at 5 ms,
    1.57 s at 1 ms, medians of 25)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextmanager
def _progress(inputs: tuple[str, ...], quiet: bool) -> Iterator[Progress | None]:
    if quiet:  # before importing rich: start-up time counts on small inputs
        yield None
        return
    from oasst_tools.cli.console import stderr

    if not stderr.is_terminal:  # a bar in a log file is noise
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TimeElapsedColumn, TransferSpeedColumn

    total = sum(input_size(i) for i in inputs) or None
    with Bar("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
             TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task("reading", total=total)
        yield lambda n: bar.advance(task, n)


def _warn(report: BuildReport, cfg: BuildConfig) -> None:
    warn_read(report.read)
    sel = cfg.selection
    for name in report.labels_not_found:
        flag = "--label-max" if name in sel.label_max else "--label-min"
        _warning(f"{flag} {name}: no message of the input has this label, so this filter dropped nothing (a typo?)")
    for line in empty_split_warnings(report, cfg):
        _warning(line)


def empty_split_warnings(report: BuildReport, cfg: BuildConfig) -> list[str]:
    """A line for each output split the build was asked for that came out empty (and so has no file): train
    always, test with --test-size or when the inputs carry a validation or test split."""
    made = {split for split, count in report.rows.items() if count}
    if not made:
        return []  # nothing selected: the build's own error says why
    if cfg.test_size is None and not report.splits_from_input:
        return []  # one input split and no --test-size: everything goes to train, as asked
    lines = []
    for split in ("train", "test"):
        if split in made:
            continue
        if cfg.test_size is not None:
            why = (f"--test-size {cfg.test_size} put "
                   f"{'every selected tree' if split == 'train' else 'none of the selected trees'} in test")
            need = "oasst train needs it" if split == "train" else "a larger --test-size makes one"
        else:
            why = f"the input's {'train' if split == 'train' else 'validation and test'} split(s) gave no " + (
                "pairs" if cfg.pairs is not None else "rows")
            need = "oasst train needs it" if split == "train" else "--test-size makes one"
        lines.append(f"{why}: no {split} split is written ({split}.{cfg.file_format}; {need})")
    return lines


def warn_read(read: ReadReport) -> None:
    """One warning line per kind of thing the readers dropped or skipped (build and stats)."""
    if read.orphaned:
        _warning(f"dropped {read.orphaned} message(s) whose parent is missing, with their subtrees (first: "
                 f"{read.orphaned_first})")
    if read.without_prompt:
        _warning(f"dropped {read.without_prompt} tree(s) whose prompt is null (deleted in the export; first: "
                 f"{read.without_prompt_first})")
    for reason, count in sorted(read.skipped.items()):
        first = read.skipped_first[reason]
        if reason == "duplicate_input":
            _warning(f"read {count} input(s) once that were named twice (first: {first})")
        elif reason == "trailing_gzip":
            _warning(f"{first}: ignored, every tree before it was built")
        elif reason in ("truncated_gzip", "corrupt_gzip"):
            _warning(f"{first}; the trees before that line were built, the one it cuts was dropped")
        elif reason == "duplicate_tree":
            _warning(f"dropped {count} tree(s) already read, keeping the first (first: {first})")
        elif reason == "split_tree":
            _warning(first)
        else:
            _warning(f"skipped {count} bad {reason} record(s) (first: {first})")


def _warning(message: str) -> None:
    """One `warning:` line on stderr; ids, labels and names in it come from the data and are shown escaped."""
    click.echo(f"warning: {printable(message)}", err=True)


def show_summary(report: BuildReport, out: Path) -> None:
    """A rich table of what was read, dropped, skipped and written."""
    from rich.table import Table
    from rich.text import Text

    from oasst_tools.cli.console import stdout

    # Text, not markup, escaped: paths, reasons and languages come from the user and the data (`[/]` must print
    # as is, an escape sequence must not reach the terminal).
    table = Table(title=Text(printable(f"oasst build -> {out}")), show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("trees read", f"{report.read.trees:,}")
    table.add_row("messages read", f"{report.read.messages:,}")
    if report.read.orphaned:
        table.add_row("orphaned messages dropped", f"{report.read.orphaned:,}")
    for reason, count in sorted(report.read.skipped.items()):
        table.add_row(Text(printable(f"skipped: {reason}")), f"{count:,}")
    for reason, count in sorted(report.dropped.items()):
        table.add_row(Text(printable(f"dropped: {reason}")), f"{count:,}")
    for split, prompts in sorted(report.prompts.items(), key=lambda item: (item[0] != "train", item[0])):
        for outcome, count in sorted(prompts.items()):
            table.add_row(Text(f"prompts {split}: {outcome.replace('_', ' ')}"), f"{count:,}")
    unit = "rows" if report.pairs is None else f"pairs ({report.pairs})"
    for split in sorted(report.rows, key=lambda s: (s != "train", s)):
        langs = ", ".join(f"{k} {v}" for k, v in report.rows_by_lang[split].most_common(5))
        table.add_row(Text(printable(f"{unit} {split} ({langs})")), f"{report.rows[split]:,}", style="bold green")
    table.caption = f"{report.seconds:.2f} s"
    stdout.print(table)
