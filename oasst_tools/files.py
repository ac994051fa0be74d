"""Reading and writing the files of a run so that whatever the file system or a user's file does ends as one
`OasstError` line naming the file (and line) instead of a traceback.

    text = read_text(Path("recipe.yaml"))                    # UTF-8, errors name path:line
    problem = safetensors_problem(Path("adapter_model.safetensors"))   # "truncated: ..." or None
    check_out_folder(Path("runs/x"), "--out")                # before anything heavy loads

Standard library only: the CLI calls these before torch is imported.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oasst_tools.errors import (OasstError, OasstInputError, clipped, describe_os_error, first_bytes_hint, kind,
                                 os_error_text)

# A safetensors header is a few KB per thousand tensors; more than this is a file that is not safetensors.
MAX_SAFETENSORS_HEADER = 100 * 2**20


def decode_utf8(data: bytes, path: str | Path, line: int | None = None) -> str:
    """`data` as UTF-8 text, or an error naming the file, the line and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        if line is None:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        else:
            column = exc.start + 1
        hint = first_bytes_hint(data) if line == 1 else None
        raise OasstInputError(path, line, f"not valid UTF-8 text (byte 0x{bad} at column {column}"
                                          f"{'; ' + hint if hint else ''})", reason="encoding") from None


def read_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of `path`, or one error line naming it and what the operating system said."""
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise OasstError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise OasstError(f"cannot read {what} {_named(exc, path)}") from None


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; unreadable files and bad bytes are one error line naming path (and line)."""
    return decode_utf8(read_bytes(path, what), path)


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """The JSON object in `path`, or one error line: unreadable, not UTF-8, not JSON, or not an object."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OasstInputError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise OasstError(f"{path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise OasstError(f"{path}: expected a JSON object, got {kind(value)}")
    return value


def optional_json(path: Path) -> Any:
    """The JSON value in `path`, or None when it is missing, unreadable, not UTF-8, not JSON or nested past the
    parser's limit: for side files whose absence the caller already handles (records, markers, earlier results)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def read_yaml_mapping(path: Path, what: str = "config file", hint: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """The mapping of settings in a YAML file and `PATH:LINE` of each key (for messages about its value), or one
    error line: missing, unreadable, not UTF-8, not YAML (`hint` says what to do then), not a mapping of names."""
    import yaml

    if not path.exists():
        raise missing_file(path, what)
    text = read_text(path, what).removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a character YAML refuses (NUL, other control characters)
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise OasstError(f"{path}:{line}: not valid YAML (the character U+{code:04X} is not allowed in YAML){hint}"
                         ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise OasstError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}){hint}") from None
    except RecursionError:
        raise OasstError(f"{path}: not valid YAML (nested too deeply){hint}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OasstError(f"{path}: expected a mapping of settings, got {kind(raw)}")
    not_text = [k for k in raw if not isinstance(k, str)]
    if not_text:
        raise OasstError(f"{path}: setting names must be text, not {', '.join(repr(k) for k in not_text)}")
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:  # parsed above, so this cannot fail; no line numbers rather than an error
        node = None
    lines: dict[Any, int] = {}
    for key, line in _mapping_keys(node):
        if key in lines:  # YAML keeps one silently: which one the user meant is not ours to guess
            raise OasstError(f"{path}:{line}: {key} is set twice (first at line {lines[key]}); keep one")
        lines[key] = line
    return raw, {k: f"{path}:{lines[k]}" if k in lines else str(path) for k in raw}


def _mapping_keys(node: Any) -> Iterator[tuple[str, int]]:
    """(key, line) of each setting of a composed YAML mapping, the keys a `<<` merge brings in included."""
    import yaml

    for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
        if not isinstance(key, yaml.ScalarNode):
            continue
        if key.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` or `<<: [*a, *b]`: their keys are set here too
            for merged in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                yield from _mapping_keys(merged)
            continue
        yield key.value, key.start_mark.line + 1


def override_lines(from_file: dict[str, Any], where: dict[str, str], flags: dict[str, Any]) -> list[str]:
    """One line per flag that replaces a different value the config file set (`--lora-r 16 overrides recipe.yaml:9
    (lora_r: 64)`), so that a recipe's value a flag changed is never a surprise."""
    def as_given(value: Any) -> str:  # a list as its flag spells it (a,b), cut short as every error value is
        return clipped(",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value))

    return [f"--{name.replace('_', '-')} {as_given(value)} overrides {where[name]} ({name}: "
            f"{as_given(from_file[name])})"
            for name, value in flags.items()
            if value is not None and name in from_file and value != from_file[name]]


def unknown_keys_error(path: Path, unknown: list[str], known: Any, command: str) -> OasstError:
    """One error for every unknown key of a config file, each with the known key it most likely meant (`lr` has
    none; `learning-rate` is learning_rate, `max_seq_length` max_length)."""
    import difflib

    names = sorted(known)
    shown = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key.replace("-", "_").lower(), names, n=1, cutoff=0.75)
        shown.append(f"{key} ({close[0]}?)" if close else key)
    return OasstError(f"{path}: unknown config keys: {', '.join(shown)} (see `oasst {command} --help` for the known "
                      "ones)")


def same_path(a: Any, b: Any) -> bool:
    """Whether two recorded paths name the same thing (one may be relative, one absolute, one through a link)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


def build_split(folder: Path, split: str) -> Path | None:
    """The file of one split of an `oasst build` output folder: `SPLIT.jsonl`, or `SPLIT.parquet` (--format
    parquet); None when the folder has neither. One error line when a split's name is not a file, or both are
    there (which one is meant cannot be told: one would be ignored silently)."""
    found = []
    for suffix in (".jsonl", ".parquet"):
        path = folder / f"{split}{suffix}"
        if path.is_file():
            found.append(path)
        elif path.exists():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise OasstError(f"{path} is {what}: the {split} split of an `oasst build` output is a file")
    if len(found) > 1:
        raise OasstError(f"{folder} holds both {found[0].name} and {found[1].name}: which one is the {split} split "
                         "cannot be told; keep one")
    return found[0] if found else None


def split_rows(path: Path, columns: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of every non-empty line of a `.jsonl` or `.jsonl.gz` file, or (row number, row) of a
    `.parquet` one; a line that is not a JSON object (its message names the `columns` a row should have), bad bytes,
    a cut or damaged gzip stream or an unreadable file is one error naming `path:line`."""
    if path.suffix == ".parquet":  # `oasst build --format parquet`
        yield from parquet_rows(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    should = f" with {columns}" if columns else ""
    lineno = 0
    try:
        if opener is gzip.open:
            with open(path, "rb") as raw_file:
                if raw_file.read(2) != b"\x1f\x8b":  # gzip's own message for this depends on the file's length
                    raise OasstInputError(path, 1, "not a gzip file (named .gz, but without gzip's first bytes)")
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                line = decode_utf8(raw, path, lineno)
                try:
                    # A byte-order mark some editors write.
                    row = json.loads(line.removeprefix("\ufeff") if lineno == 1 else line)
                except json.JSONDecodeError as exc:
                    raise OasstInputError(path, lineno, f"not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise OasstInputError(path, lineno, "JSON nested too deeply") from None
                except ValueError:  # Python's limit on the digits of an integer it converts
                    raise OasstInputError(path, lineno, f"a number with more than {sys.get_int_max_str_digits():,} "
                                                        "digits") from None
                if not isinstance(row, dict):
                    raise OasstInputError(path, lineno, f"a row must be a JSON object{should}, not {kind(row)}")
                # `\ud800` alone is valid JSON but no text a tokenizer (or a UTF-8 file) takes; only lines that
                # spell a surrogate escape are walked.
                if ("\\ud" in line or "\\uD" in line) and _has_lone_surrogate(row):
                    raise OasstInputError(path, lineno, "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                                        "without its pair): not text", reason="encoding")
                yield lineno, row
    except EOFError:
        raise OasstInputError(path, lineno + 1, "gzip file is truncated: the stream ends inside this line") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise OasstInputError(path, lineno + 1, f"not a readable gzip file ({exc})") from None
    except IsADirectoryError:
        raise OasstError(f"data file {path} is a folder, not a file") from None
    except OSError as exc:
        raise OasstError(f"cannot read data file {_named(exc, path)}") from None


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value (keys included) cannot be written as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a parquet split (`oasst build --format parquet`), read with pyarrow (installed
    with datasets); an unreadable file is one error line."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OasstError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or rebuild with --format "
                         "jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except OSError as exc:
        raise OasstError(f"cannot read {path}: {describe_os_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types for a damaged file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OasstError(f"{path}: not a readable parquet file ({first[:120]})") from None
    yield from enumerate(rows, 1)


def path_problem(path: Path) -> str | None:
    """Why `path` cannot exist as given (a component that is a file, no permission to look), or None."""
    for parent in reversed(path.parents):
        if str(parent) in ("", "."):
            continue
        try:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a folder"
        except OSError as exc:
            return os_error_text(exc)
    return None


def missing_file(path: Path, what: str) -> OasstError:
    """The error for a file that is not there, saying why when a parent is the reason."""
    problem = path_problem(path)
    return OasstError(f"{what} {path} does not exist" + (f" ({problem})" if problem else ""))


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (missing, truncated, garbage header), or None when the
    header parses and the data is exactly as long as the header says: what `safe_open` itself requires."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated safetensors file ({size} bytes, not even a header)"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                if length > MAX_SAFETENSORS_HEADER:
                    return (f"not a safetensors file (its first 8 bytes announce a {length:,}-byte header in a "
                            f"{size:,}-byte file)")
                return (f"truncated safetensors file (the header alone needs {length + 8:,} bytes, the file has "
                        f"{size:,})")
            raw = f.read(length)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({describe_os_error(exc)})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"not a safetensors file (tensor {name!r} has no valid data_offsets)"
        end = max(end, offsets[1])
    data = size - 8 - length
    if data < end:
        return f"truncated safetensors file (the header promises {end:,} bytes of tensors, the file holds {data:,})"
    if data > end:
        return f"safetensors file with {data - end:,} bytes more than its header describes"
    return None


def check_safetensors(path: Path, what: str) -> None:
    """One error line naming `path` unless it is a complete safetensors file."""
    problem = safetensors_problem(path)
    if problem == "missing":
        raise missing_file(path, what)
    if problem is not None:
        raise OasstError(f"{path}: {problem}")


def load_saved_dataset(folder: Path) -> Any:
    """`datasets.load_from_disk(folder)`; a split saved with no rows (`_data_files` empty, which load_from_disk
    cannot read back: an IndexError in datasets 5.2) comes back as an empty Dataset of its recorded features."""
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except IndexError:
        index = optional_json(folder / "dataset_dict.json")
        names = index.get("splits") if isinstance(index, dict) else None
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            return _split_or_empty(folder)
        return datasets.DatasetDict({name: _split_or_empty(folder / name) for name in names})


def _split_or_empty(folder: Path) -> Any:
    """One saved split: empty (of its features) when it has no data files, else what load_from_disk reads."""
    import datasets

    state = optional_json(folder / "state.json")
    if isinstance(state, dict) and state.get("_data_files") == []:
        features = datasets.DatasetInfo.from_directory(str(folder)).features
        if features is not None:
            return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.load_from_disk(str(folder))


def saved_dataset_problem(folder: Path) -> OasstError | None:
    """The first file of a `datasets.save_to_disk` folder that `load_from_disk` would choke on (bad JSON, a split
    or data file it lists that is missing, a truncated Arrow file), as one error naming it; None when its
    bookkeeping holds or `folder` holds none of a save_to_disk folder's files. Called once `load_from_disk` failed:
    the library's own message names neither the file nor the line."""
    from oasst_tools.sources import DATASETS_FILES

    if not any((folder / name).exists() for name in DATASETS_FILES):
        return None
    try:
        _check_saved_dataset(folder)
    except OasstError as exc:
        return exc
    return None


def _check_saved_dataset(folder: Path) -> None:
    """Raise `saved_dataset_problem`'s error for `folder`."""
    splits = [folder]
    if (folder / "dataset_dict.json").exists():
        names = read_json_object(folder / "dataset_dict.json", "dataset file").get("splits")
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            raise OasstError(f"{folder / 'dataset_dict.json'}: its \"splits\" is not a list of split names")
        splits = [folder / name for name in names]
    for split in splits:
        if not split.is_dir():
            raise OasstError(f"{folder}: split folder {split.name} is missing")
        _saved_json(split / "dataset_info.json")
        files = _saved_json(split / "state.json").get("_data_files")
        if not (isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                                for f in files)):
            raise OasstError(f"{split / 'state.json'}: its \"_data_files\" is not a list of data files")
        for entry in files:
            if not (split / entry["filename"]).is_file():
                raise OasstError(f"{split / 'state.json'}: lists data file {entry['filename']}, which is missing")
            problem = _arrow_stream_problem(split / entry["filename"])
            if problem is not None:
                raise OasstError(f"{split / entry['filename']}: {problem}")


def _saved_json(path: Path) -> dict[str, Any]:
    """The JSON object of one bookkeeping file of a save_to_disk folder, or its error."""
    if not path.exists():
        raise missing_file(path, "dataset file")
    return read_json_object(path, "dataset file")


def _arrow_stream_problem(path: Path) -> str | None:
    """Why the Arrow stream `path` (a save_to_disk data file) cannot be read to its end, or None (also when pyarrow,
    which only `datasets` brings, is not installed: then the library's own message stands)."""
    try:
        import pyarrow.ipc
    except ImportError:
        return None
    try:
        with pyarrow.ipc.open_stream(str(path)) as reader:
            for _ in reader:
                pass
    except OSError as exc:
        return f"cannot read it ({describe_os_error(exc)})" if exc.errno else f"not a complete Arrow file ({exc})"
    except Exception as exc:  # pyarrow's ArrowInvalid and kin: a truncated or foreign file
        return f"not a complete Arrow file ({str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return None


def check_out_folder(out: Path, flag: str) -> bool:
    """Refuse, before anything heavy runs, an output folder that cannot be made or written; returns whether it
    exists already. Writability is tried (a hidden folder made and removed), since root ignores permissions
    and `os.access` cannot tell a read-only mount in every case."""
    try:
        if out.exists() and not out.is_dir():
            raise OasstError(f"{flag} {out} is a file, not a folder")
    except OSError as exc:  # a name too long for the file system, a loop of symbolic links...
        raise OasstError(f"{flag} {out}: {describe_os_error(exc)}") from None
    problem = path_problem(out)
    if problem is not None:
        raise OasstError(f"{flag} {out} cannot be created: {problem}")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    try:
        probe = tempfile.mkdtemp(prefix=".oasst-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as exc:
        raise OasstError(f"{flag} {out}: cannot write in {existing} ({describe_os_error(exc)})") from None
    return out.exists()


@contextmanager
def removed_on_failure(out: Path, existed: bool) -> Iterator[None]:
    """Remove `out` again when the block fails and `out` did not exist before it (no half-made output left)."""
    try:
        yield
    except BaseException:
        if not existed and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise


def write_failure(exc: BaseException) -> str | None:
    """What the system said when `exc` is a failed write, in words, or None for any other error.

    Not every writer raises OSError: safetensors raises its own error carrying `(os error 28)`, and torch.save
    a RuntimeError from its zip writer (`unexpected pos`, `file write failed`) with no errno at all.
    """
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "os error" in text:
        match = re.search(r"os error (\d+)", text)
        return os.strerror(int(match.group(1))) if match else text.splitlines()[0]
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "torch.save could not write the file (a full disk or a file-size limit?)"
    return None


def write_error(exc: OSError, path: Path | None, what: str) -> OasstError:
    """One line for a failed write: the file (from the error, else `path`) and what the system said."""
    return OasstError(f"cannot write {what} {_named(exc, path)}")


def _named(exc: OSError, path: Path | None) -> str:
    """`PATH: reason`, with the error's own file name when it carries one."""
    if exc.filename is not None:
        return os_error_text(exc)
    reason = describe_os_error(exc)
    return f"{path}: {reason}" if path is not None else reason
