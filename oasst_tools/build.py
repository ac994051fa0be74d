"""Threads -> a dataset folder that `datasets.load_dataset` opens: one file per split, a card and a report.

Every row: `text` (Guanaco format), `messages` (chat format), `message_tree_id`, `lang`, `num_turns`; with
`pairs`, preference pairs instead (`oasst_tools.pairs`: `prompt`, `chosen`, `rejected`, their ids and ranks).
Writes go to a temporary folder beside the output, renamed at the end, so a failed or interrupted build leaves
nothing; `output.py` keeps --out from ever being an input, a folder someone else wrote, or a race's loser.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from oasst_tools.card import dataset_card
from oasst_tools.conversation import ASSISTANT, HUMAN
from oasst_tools.conversation import guanaco_text as _text
from oasst_tools.errors import NotContiguousError, OasstError, OasstInputError
from oasst_tools.filters import Selection, best_raw_thread, filter_labels, located, select_threads
from oasst_tools.output import (check_out, clean_stale, parents_made, publish, signals_as_errors, temp_folder,
                                 write_error)
from oasst_tools.pairs import PROMPT_OUTCOMES, PairMode, pair_row, preference_pairs
from oasst_tools.read import OnError, Progress, ReadReport, iter_raw_trees
from oasst_tools.schema import Tree
from oasst_tools.settings import build_command, build_settings
from oasst_tools.sources import InputInfo, check_input
from oasst_tools.walk import Thread

try:
    import orjson

    _EncodeError: type[Exception] = orjson.JSONEncodeError

    def _dumps_line(row: dict[str, Any]) -> bytes:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
except ImportError:  # pragma: no cover - orjson is a core dependency
    import json

    _EncodeError = UnicodeEncodeError

    def _dumps_line(row: dict[str, Any]) -> bytes:
        return json.dumps(row, ensure_ascii=False).encode() + b"\n"


DEFAULT_HUB_ID = "OpenAssistant/oasst1"
FileFormat = Literal["jsonl", "parquet"]
FILE_FORMATS: tuple[str, ...] = get_args(FileFormat)


@dataclass(frozen=True)
class BuildConfig:
    """Everything `oasst build` needs, resolved once."""

    inputs: tuple[str, ...] = field(default=(DEFAULT_HUB_ID,), metadata={"help": "Files, folders or hub ids."})
    out: Path = field(default=Path("data"), metadata={"help": "Output folder."})
    selection: Selection = field(default_factory=Selection)
    pairs: PairMode | None = field(default=None, metadata={"help": "Write preference pairs of ranked replies "
                                   "instead of threads: best (the best-ranked reply against each other one), "
                                   "adjacent (each against the next in rank), all (every two with different "
                                   "ranks)."})
    test_size: float | None = field(default=None, metadata={"help": "Fraction of trees for a test split "
                                    "(by a hash of message_tree_id), instead of the input's own splits."})
    seed: int = field(default=0, metadata={"help": "Seed of the tree hash used by --test-size."})
    file_format: FileFormat = field(default="jsonl", metadata={"help": "Output file format."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    on_error: OnError = field(default="fail", metadata={"help": "fail: stop at the first bad record; "
                              "skip: skip bad records and trees, counting them by reason."})


@dataclass
class BuildReport:
    """What a build read, dropped, skipped and wrote (written as `build_report.json`)."""

    inputs: list[str]
    read: ReadReport = field(default_factory=ReadReport)
    dropped: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    rows_by_lang: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: float = 0.0
    # --label-max/--label-min names that no message of the input carries (a typo keeps everything).
    labels_not_found: list[str] = field(default_factory=list)
    # The tree states of the trees read (a --tree-state that none has is a warning).
    states_seen: set[str] = field(default_factory=set)
    # With --pairs: the mode, and per split the surviving prompter messages by `pairs.PROMPT_OUTCOMES`.
    pairs: PairMode | None = None
    prompts: dict[str, Counter[str]] = field(default_factory=dict)
    # Whether the inputs' own splits decide the output's (they carry more than one, and no --test-size is given).
    splits_from_input: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`pairs` and `prompts` only for a build of preference pairs; `rows` are its pairs)."""
        out: dict[str, Any] = {
            "inputs": self.inputs,
            "trees_read": self.read.trees,
            "messages_read": self.read.messages,
            "orphaned_messages": self.read.orphaned,
            "trees_without_prompt": self.read.without_prompt,
            "orphaned_first": self.read.orphaned_first,
            "dropped": dict(sorted(self.dropped.items())),
            "skipped": dict(sorted(self.read.skipped.items())),
            "skipped_first": dict(sorted(self.read.skipped_first.items())),
            "skipped_messages": self.read.skipped_messages,
            "rows": dict(self.rows),
            "rows_by_lang": {split: dict(sorted(c.items())) for split, c in self.rows_by_lang.items()},
            "labels_not_found": self.labels_not_found,
            "seconds": round(self.seconds, 3),
        }
        if self.pairs is not None:
            out["pairs"] = self.pairs
            out["prompts"] = {split: {k: self.prompts.get(split, Counter())[k] for k in PROMPT_OUTCOMES}
                              for split in sorted(self.prompts, key=lambda s: (s != "train", s))}
        return out


def guanaco_text(thread: Thread) -> str:
    """A thread in the Guanaco format (`oasst_tools.conversation`), turns concatenated with no separator."""
    return _text([(m.role, m.text) for m in thread])


def thread_row(tree: Tree, thread: Thread) -> dict[str, Any]:
    """One output row for a thread of `tree`."""
    return make_row(tree.message_tree_id, tree.prompt.lang, [(m.role, m.text) for m in thread])


def make_row(tree_id: str, lang: str | None, turns: list[tuple[str, str]]) -> dict[str, Any]:
    """The output row for one thread given as (role, text) turns."""
    # The Guanaco text (conversation.guanaco_text, inlined) and the messages in one pass: this runs for every row.
    parts: list[str] = []
    messages: list[dict[str, str]] = []
    for role, text in turns:
        if role == "prompter":
            parts.append(HUMAN)
            messages.append({"role": "user", "content": text})
        else:
            parts.append(ASSISTANT)
            messages.append({"role": "assistant", "content": text})
        parts.append(text)
    return {"text": "".join(parts), "messages": messages, "message_tree_id": tree_id, "lang": lang,
            "num_turns": len(turns)}


def _record_row(tree_id: str, thread: list[dict[str, Any]]) -> dict[str, Any]:
    """`make_row` for a thread of raw records (the build's fast path), without the (role, text) list first: one
    list and a tuple per turn less for every row (about 1% of a build)."""
    parts: list[str] = []
    messages: list[dict[str, str]] = []
    for record in thread:
        text = record["text"]
        if record["role"] == "prompter":
            parts.append(HUMAN)
            messages.append({"role": "user", "content": text})
        else:
            parts.append(ASSISTANT)
            messages.append({"role": "assistant", "content": text})
        parts.append(text)
    return {"text": "".join(parts), "messages": messages, "message_tree_id": tree_id, "lang": thread[0].get("lang"),
            "num_turns": len(thread)}


def hash_split(tree_id: str, test_size: float, seed: int) -> str:
    """'test' for a deterministic `test_size` fraction of tree ids, else 'train'."""
    import hashlib  # late: 5 ms of OpenSSL set-up at start-up, for --test-size only

    digest = hashlib.sha256(f"{seed}:{tree_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_size else "train"


def tree_split(tree_id: str, input_split: str | None, cfg: BuildConfig, input_splits: bool) -> str:
    """Which output split a tree goes to: --test-size by hash, else the input's split, else train."""
    if cfg.test_size is not None:
        return hash_split(tree_id, cfg.test_size, cfg.seed)
    if input_splits and input_split in ("validation", "test"):
        return "test"
    return "train"


def iter_rows(
    cfg: BuildConfig, report: BuildReport, progress: Progress | None = None, buffered: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(split, row) for every selected thread of every input."""
    from oasst_tools.read import input_splits as announced

    # Input splits are kept only when the inputs carry more than one (train + validation, as OASST1 does).
    input_splits = len(set().union(*(announced(src) for src in cfg.inputs))) > 1
    report.splits_from_input = input_splits and cfg.test_size is None
    sel = cfg.selection
    fast = sel.mode == "top-rank" and cfg.pairs is None
    # The labels of --label-max/--label-min: their values are checked on every message, and a name no message
    # carries gets a warning (a typo would keep everything).
    labels = set(sel.label_max) | set(sel.label_min)
    unseen = set(labels)
    by_hash = cfg.test_size is not None
    states_seen = report.states_seen
    for source in cfg.inputs:
        for raw in iter_raw_trees(source, on_error=cfg.on_error, report=report.read, progress=progress,
                                  buffered=buffered):
            if raw.state is not None:
                states_seen.add(raw.state)
            split = (tree_split(raw.tree_id, raw.split, cfg, input_splits) if by_hash  # inlined: every tree
                     else "test" if input_splits and raw.split in ("validation", "test") else "train")
            try:
                if labels:
                    try:
                        unseen -= filter_labels(raw.records.values(), labels)
                    except OasstInputError as err:
                        raise located(err, raw.source) from None
                if fast and raw.plain:
                    # The common case on raw records: the same rules as `select_threads`, tested to agree.
                    thread = best_raw_thread(raw, sel, report.dropped)
                    if thread is not None:
                        yield split, _record_row(raw.tree_id, thread)
                    continue
                tree = raw.to_tree()
                if cfg.pairs is not None:
                    prompts: Counter[str] = Counter()
                    rows = [pair_row(tree, pair)
                            for pair in preference_pairs(tree, sel, cfg.pairs, report.dropped, prompts)]
                    report.prompts.setdefault(split, Counter()).update(prompts)
                else:
                    rows = [thread_row(tree, thread) for thread in select_threads(tree, sel, report.dropped)]
            except OasstInputError as err:  # a label value a filter cannot compare
                if cfg.on_error == "fail":
                    raise
                report.read.skip(err, len(raw.records))
                continue
            for row in rows:
                yield split, row
    report.labels_not_found = sorted(unseen)
    report.read.settle_split_trees(cfg.on_error)


def distinct_inputs(infos: Sequence[InputInfo], on_error: OnError, report: ReadReport | None = None) -> list[
        InputInfo]:
    """The inputs without repeats of one file (same device and inode: another name, a link, `..`): an error, or
    with on_error="skip" the later names dropped and counted (`duplicate_input`)."""
    first: dict[tuple[Any, ...], InputInfo] = {}
    kept = []
    for info in infos:
        earlier = first.get(info.identity)
        if earlier is None:
            first[info.identity] = info
            kept.append(info)
            continue
        err = OasstInputError(info.name, None, f"is the same file as --input {earlier.name}: every tree would be "
                              "read twice (--on-error skip reads it once)", reason="duplicate_input")
        if on_error == "fail":
            raise err
        if report is not None:
            report.skip(err, messages=0)
    return kept


def build_dataset(cfg: BuildConfig, progress: Progress | None = None) -> BuildReport:
    """Read, select and write one dataset folder; returns the report (also written beside the data).

    Before anything is read: every input is classified (a missing path fails at once), the same file named twice
    is refused (or read once under on_error="skip"), and --out is checked (`output.check_out`). A pipe among the
    inputs cannot be read twice, so an interleaved flat input is then grouped in memory from the start."""
    out = Path(cfg.out)
    if cfg.test_size is not None and not 0 < cfg.test_size < 1:  # NaN fails this too
        raise OasstError(f"test_size {cfg.test_size}: a fraction between 0 and 1 is needed (e.g. 0.1)")
    infos = [check_input(source) for source in cfg.inputs]
    repeats = ReadReport()
    infos = distinct_inputs(infos, cfg.on_error, repeats)
    check_out(out, infos, cfg.overwrite)
    cfg = replace(cfg, inputs=tuple(info.name for info in infos))
    rereadable = all(info.rereadable for info in infos)
    with signals_as_errors() as disarm, parents_made(out):
        clean_stale(out)
        for attempt in range(2):
            report = BuildReport(inputs=list(cfg.inputs), pairs=cfg.pairs)
            report.read.skipped.update(repeats.skipped)
            report.read.skipped_first.update(repeats.skipped_first)
            started = time.perf_counter()
            tmp: Path | None = None
            try:
                tmp = temp_folder(out)
                try:
                    _write(cfg, report, tmp, progress, buffered=attempt == 1 or not rereadable)
                except NotContiguousError:
                    if attempt or not rereadable:
                        raise
                    continue  # an interleaved flat input discovered late: start again, grouped in memory
                report.seconds = time.perf_counter() - started
                _write_json(tmp / "build_report.json",
                            {**report.to_dict(), "settings": build_settings(cfg), "command": build_command(cfg)})
                (tmp / "README.md").write_text(dataset_card(cfg, report), encoding="utf-8",
                                               errors="backslashreplace")
                publish(tmp, out, cfg.overwrite, done=disarm)
                return report
            except OSError as exc:  # reading errors are OasstInputErrors by now: this is the output
                raise write_error(exc, out) from None
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError("unreachable")


def _write(cfg: BuildConfig, report: BuildReport, folder: Path, progress: Progress | None, buffered: bool) -> None:
    if cfg.file_format == "jsonl":
        handles: dict[str, Any] = {}
        try:
            for split, row in iter_rows(cfg, report, progress, buffered):
                fh = handles.get(split)
                if fh is None:
                    fh = handles[split] = open(folder / f"{split}.jsonl", "wb", buffering=1 << 20)
                try:
                    fh.write(_dumps_line(row))
                except _EncodeError as exc:  # readers refuse what JSON cannot carry; a last guard, not a path
                    raise OasstError(f"tree {row['message_tree_id']}: cannot write its row ({exc})") from None
                _count(report, split, row)
        finally:
            for fh in handles.values():
                fh.close()
    else:
        import polars as pl  # late: only parquet output needs it

        rows: dict[str, list[dict[str, Any]]] = {}
        for split, row in iter_rows(cfg, report, progress, buffered):
            rows.setdefault(split, []).append(row)
            _count(report, split, row)
        for split, items in rows.items():
            # Every row decides the column types: a lang that is null in the first 100 rows is text later.
            pl.DataFrame(items, infer_schema_length=None).write_parquet(folder / f"{split}.parquet")
    if not report.rows:
        raise NoRowsError(_no_rows_message(cfg, report), report)


class NoRowsError(OasstError):
    """A build that selected nothing; `report` says what was read, skipped and dropped (the CLI warns from it)."""

    def __init__(self, msg: str, report: BuildReport) -> None:
        super().__init__(msg)
        self.report = report


def _no_rows_message(cfg: BuildConfig, report: BuildReport) -> str:
    """Why nothing was selected, as specific as the report allows."""
    read = report.read
    lost = []
    if read.skipped:
        lost.append(f"{sum(read.skipped.values())} bad record(s) or tree(s) skipped")
    if read.orphaned:
        lost.append(f"{read.orphaned} message(s) without their parent dropped")
    if read.without_prompt:
        lost.append(f"{read.without_prompt} tree(s) with a null prompt dropped")
    if not read.trees:
        why = "no tree was read from the input"
    elif cfg.pairs is not None:
        why = "no surviving prompt has two replies of different ranks"
    else:
        why = f"every tree of {read.trees} was filtered out"
    if cfg.selection.tree_states and report.states_seen and not cfg.selection.tree_states & report.states_seen:
        why += (f"; no tree has tree_state {', '.join(sorted(cfg.selection.tree_states))} "
                f"(seen: {', '.join(sorted(report.states_seen))})")
    # Trees were read: the filters decided. None was: what the reader dropped did (its warnings come first).
    details = f" ({'; '.join(lost)}: see the warnings)" if lost and not read.trees else " (see the filters in the command)"
    what = "pairs" if cfg.pairs is not None else "rows"
    return f"no {what} selected: {why}{details}; nothing written"


def _count(report: BuildReport, split: str, row: dict[str, Any]) -> None:
    report.rows[split] += 1
    by_lang = report.rows_by_lang.get(split)
    if by_lang is None:  # not setdefault(split, Counter()): that builds a Counter for every row
        by_lang = report.rows_by_lang[split] = Counter()
    by_lang[row["lang"] or "unknown"] += 1


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    # backslashreplace: a path given with bytes that are not UTF-8 (a surrogate in Python) is still written
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8",
                    errors="backslashreplace")


def parse_label_limits(items: Sequence[str], flag: str) -> dict[str, float]:
    """`["toxicity=0.5", ...]` -> `{"toxicity": 0.5}`; a malformed item raises one clear error."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            limit = float(value)
            if limit != limit:  # NaN compares false with every label: the filter would keep everything
                raise ValueError
        except ValueError:
            raise OasstError(f"{flag} {item!r}: expected NAME=NUMBER, e.g. {flag} toxicity=0.5") from None
        if name.strip() in out:  # which of two limits was meant is not ours to guess
            raise OasstError(f"{flag} {name.strip()} is given twice ({out[name.strip()]:g} and {limit:g}); give it once")
        out[name.strip()] = limit
    return out

