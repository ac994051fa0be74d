"""Read OASST exports into `Tree`s, one tree at a time.

Shapes, detected automatically:
- flat messages, one per line (`.jsonl`, `.jsonl.gz`), as parquet, as a `datasets.save_to_disk` folder, or as a
  hub id such as `OpenAssistant/oasst1` (online only);
- nested tree exports (`*.trees.jsonl[.gz]`, OASST1 and OASST2), one tree per line.

Nested files stream tree by tree, so memory does not grow with the number of trees. Flat exports are written
with each tree contiguous, so they stream too; an interleaved file raises `NotContiguousError`, and
`read_trees(..., buffered=True)` groups it in memory instead (as it always does for a pipe, which cannot be read
twice). Each input is opened once and its shape sniffed from bytes the reader is handed again (`sources.py`).

Ids are unique across everything one `ReadReport` sees (all inputs of a build): a tree or message id read twice is
an error, or, with on_error="skip", the later tree is dropped and counted (`duplicate_tree`). Lines nested deeper
than orjson's limit are parsed by `deepjson`; a gzip cut or corrupt mid-stream ends the input with the trees before
the cut under on_error="skip", the cut counted.

The readers themselves live beside this module, which detects the shape and hands the input over: `assemble.py`
groups flat records into trees, `nested.py` reads tree exports, `jsonrecords.py` parses JSON lines, and `rawtree.py`
holds `RawTree` and `ReadReport` (re-exported here, as are the names the tests and `filters.py` import).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Re-exported: `filters.py` and the tests import these from here.
from oasst_tools.assemble import _check_roles, _group_flat, subtree_records  # noqa: F401
from oasst_tools.errors import OasstError, OasstInputError, os_input_error, shown
from oasst_tools.jsonrecords import _json_records, _ParsedFile, _short
from oasst_tools.lines import FileLines, Progress, Source, iter_lines
from oasst_tools.nested import _nested_items, _nested_records, _read_nested  # noqa: F401
from oasst_tools.rawtree import OnError, RawTree, ReadReport, split_of
from oasst_tools.schema import Tree
from oasst_tools.sources import Shape, check_input, input_size, open_input

__all__ = ["ReadReport", "RawTree", "Shape", "detect_shape", "input_size", "iter_raw_trees", "read_trees",
           "input_splits", "split_of", "subtree_records"]


def detect_shape(source: str | Path) -> Shape:
    """Which reader handles `source`: a file's first record (or its name, for parquet); a folder is a
    `save_to_disk` folder; a missing `owner/name` is a hub id. Opens and closes a file: readers sniff their own."""
    shape, src = open_input(source)
    if src is not None:
        src.close()
    return shape


def read_trees(
    source: str | Path,
    *,
    on_error: OnError = "fail",
    report: ReadReport | None = None,
    progress: Progress | None = None,
    buffered: bool = False,
) -> Iterator[Tree]:
    """Every tree of one input (file, folder or hub id), validated; bad input raises `OasstInputError`."""
    raws = iter_raw_trees(source, on_error=on_error, report=report, progress=progress, buffered=buffered)
    return (raw.to_tree() for raw in raws)


def _parquet_records(src: Source, progress: Progress | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import io

    import polars as pl  # late: only parquet input needs it

    with src:
        try:
            # A pipe cannot seek, and parquet keeps its index at the end: read it whole.
            data: Any = src.name if src.regular else io.BytesIO(src.take_head() + src.fh.read())
            frame = pl.read_parquet(data)
        except OSError as exc:
            raise os_input_error(exc, src.name, doing="cannot read") from None
        except Exception as exc:  # polars raises several unrelated types for a bad file
            raise OasstInputError(src.name, None, f"cannot read parquet ({_short(exc)})",
                                  reason="bad_parquet") from None
    if progress is not None:
        progress(src.size)
    for number, row in enumerate(frame.iter_rows(named=True), start=1):
        yield number, row


def iter_raw_trees(
    source: str | Path,
    *,
    on_error: OnError = "fail",
    report: ReadReport | None = None,
    progress: Progress | None = None,
    buffered: bool = False,
) -> Iterator[RawTree]:
    """Like `read_trees`, but yields validated `RawTree`s (records, not `Message`s)."""
    if on_error not in ("fail", "skip"):
        raise OasstError(f"on_error must be 'fail' or 'skip', not {on_error!r}")  # a typo read as skip before
    if not isinstance(source, (str, os.PathLike)) or not isinstance(os.fspath(source), str) or "\0" in os.fspath(
            source):
        raise OasstError(f"source must be a path (str or os.PathLike) or a hub id, not {shown(source)}")
    report = report if report is not None else ReadReport()
    shape, src = open_input(source)
    if src is None:
        return _read_datasets(str(source), shape, on_error, report, buffered)
    # A pipe cannot be read again after a NotContiguousError: group it in memory from the start.
    buffered = buffered or not src.regular
    report.ids.add_source(src.name, src.regular)
    if shape == "nested":
        return _read_nested(src, on_error, report, progress)
    if shape == "flat":
        records: Any = None
        if progress is None and src.regular and not src.is_gzip():
            lines = iter_lines(src)
            if isinstance(lines, FileLines):
                records = _ParsedFile(lines, on_error, report)
        if records is None:
            records = _json_records(src, on_error, report, progress)
        return _group_flat(records, src.name, split_of(src.name), on_error, report, buffered)
    return _group_flat(_parquet_records(src, progress), src.name, split_of(src.name), on_error, report, buffered)


# ---------------------------------------------------------------------------- datasets folders and hub ids


def _read_datasets(source: str, shape: Shape, on_error: OnError, report: ReadReport,
                   buffered: bool) -> Iterator[RawTree]:
    if shape == "hub":
        from oasst_tools import hub  # late: hub ids only

        # One probe (1.5 s at most) rather than datasets' 25 s of retries; offline, only a cached copy can load.
        if not hub.hub_reachable():
            if not hub.in_hub_cache(source, "dataset"):
                raise OasstError(_hub_advice(source, hub.offline_reason()))
            hub.assume_offline()
    try:
        import datasets
    except ImportError:
        raise OasstError(f"reading {source} needs the `datasets` package: pip install 'oasst-tools[hf]'") from None
    try:
        if shape == "disk":
            from oasst_tools.files import load_saved_dataset

            loaded = load_saved_dataset(Path(source))
        else:
            loaded = datasets.load_dataset(source)
    except Exception as exc:  # network, auth and format errors all end here; the user needs one line
        if shape == "hub":
            raise OasstError(_hub_advice(source, _short(exc))) from None
        from oasst_tools.files import saved_dataset_problem

        problem = saved_dataset_problem(Path(source))
        if problem is not None:
            raise problem from None
        raise OasstInputError(source, None, f"cannot load dataset ({_short(exc)})", reason="bad_dataset") from None
    if isinstance(loaded, dict):
        # An empty split beside others holds nothing to lose (the build warns when an output split is empty); only
        # a dataset with no rows at all is an empty input.
        splits = [(name, table) for name, table in loaded.items() if len(table)] or list(loaded.items())[:1]
    else:  # one split saved alone: its folder's name or the split it was loaded as says which
        splits = [(split_of(source) or getattr(loaded, "split", None), loaded)]
    for split, table in splits:
        label = f"{source}[{split}]" if split else source
        report.ids.add_source(label, False)
        rows = ((number, row) for number, row in enumerate(table, start=1))
        # A split named "valid" is a validation split, as in file names.
        yield from _group_flat(rows, label, split_of(str(split)) or split if split else None, on_error, report,
                               buffered)


def input_splits(source: str | Path) -> set[str]:
    """The splits an input announces before it is read: a file's or folder's name, a save_to_disk DatasetDict's
    split names, the split a saved Dataset was loaded as; a hub id announces its own (OASST1: train, validation)."""
    from oasst_tools.files import optional_json

    info = check_input(source)
    if info.kind == "hub":
        return {"train", "validation"}
    folder = Path(info.name)
    if info.kind == "folder" and (folder / "dataset_dict.json").is_file():
        # A DatasetDict's own split names decide, whatever its folder is called (`oasst1-train` holds both).
        record = optional_json(folder / "dataset_dict.json")  # unreadable: the reader says so, with the file's name
        names = record.get("splits") if isinstance(record, dict) else None
        if isinstance(names, list):
            return {split_of(n) or n for n in names if isinstance(n, str) and n}
        return set()
    named = {split_of(info.name)} - {None}
    if info.kind == "folder" and not named:  # one split saved alone: the split it was loaded as
        state = optional_json(folder / "state.json")
        loaded_as = state.get("_split") if isinstance(state, dict) else None
        if isinstance(loaded_as, str) and loaded_as:
            named = {split_of(loaded_as) or loaded_as}
    return named  # type: ignore[return-value]


def _hub_advice(source: str, why: str) -> str:
    return (f"cannot load {source} from the Hugging Face Hub ({why}); offline, pass --input PATH with a local "
            "export (.jsonl, .jsonl.gz, .parquet, .trees.jsonl.gz or a save_to_disk folder)")
