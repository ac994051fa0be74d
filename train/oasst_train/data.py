"""Training rows: read a dataset, render Guanaco text, tokenize with EOS appended and an assistant-only mask.

    rows = read_rows("fixtures/guanaco-en")             # {"train": [...texts], "test": [...texts]}
    ids, mask = tokenize_text(tokenizer, rows["train"][0])

Guanaco format: `### Human: {prompt}### Assistant: {reply}### Human: ...`, no separators. With loss on the
assistant only, the loss covers each reply and what ends it: the next `### Human:` marker (where `oasst generate`
stops) or the appended EOS. Human turns and the `### Assistant:` headers are masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError, OasstInputError

HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
ROLE_MARKERS = {"user": HUMAN, "prompter": HUMAN, "human": HUMAN, "assistant": ASSISTANT}
_MARKER = re.compile(r"### (?:Human|Assistant):")


def guanaco_prompt(prompt: str) -> str:
    """The generation prompt for one human turn: `### Human: {prompt}### Assistant:`."""
    return f"{HUMAN} {prompt}{ASSISTANT}"


def render_messages(messages: Sequence[dict[str, Any]], where: str = "messages") -> str:
    """A list of {role, content} turns as one Guanaco text; a turn of the wrong shape is an error at `where`."""
    if not isinstance(messages, (list, tuple)):
        raise OasstError(f"{where}: `messages` must be a list of {{role, content}} objects, not {_kind(messages)}")
    parts = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise OasstError(f"{where}: messages[{i}] must be a {{role, content}} object, not {_kind(turn)}")
        if "role" not in turn:
            raise OasstError(f"{where}: messages[{i}] has no `role`")
        role = turn["role"]
        marker = ROLE_MARKERS.get(role.lower()) if isinstance(role, str) else None
        if marker is None:
            raise OasstError(f"{where}: messages[{i}] role {role!r} is not user or assistant")
        content = turn.get("content")
        if not isinstance(content, str):
            raise OasstError(f"{where}: messages[{i}] content must be a string, not {_kind(content)}")
        parts.append(f"{marker} {content}")
    return "".join(parts)


def _kind(value: Any) -> str:
    """How a JSON value is called in messages: `a number`, `null`, `an object`..."""
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def read_rows(data: str, eval_rows: int = 0) -> dict[str, list[str]]:
    """Guanaco texts of the train split and, when there is one, the test split."""
    path = Path(data)
    if path.is_dir() and (path / "train.jsonl").exists():
        splits = {"train": _read_jsonl(path / "train.jsonl")}
        if (path / "test.jsonl").exists():
            splits["test"] = _read_jsonl(path / "test.jsonl")
        if not splits["train"]:
            raise OasstError(f"{path / 'train.jsonl'}: the train split has no rows")
    else:
        splits = _read_datasets(data)
    if not splits.get("train"):
        raise OasstError(f"{data}: the train split has no rows")
    if eval_rows and "test" in splits:
        splits["test"] = splits["test"][:eval_rows]
    return splits


def tokenize_text(tokenizer: Any, text: str, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of `text` + EOS, and a 0/1 mask of the tokens that carry loss."""
    if not tokenizer.is_fast:
        raise OasstError(f"tokenizer of {tokenizer.name_or_path} is not a fast tokenizer; "
                         "the assistant-only mask needs character offsets")
    # verbose=False: rows longer than the model's window are expected here; truncation happens later.
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids, offsets = ids[:-1], offsets[:-1]  # tokenizers that add EOS themselves: keep exactly one
    ids.append(tokenizer.eos_token_id)
    if not assistant_only:
        return ids, [1] * len(ids)
    spans, ends_in_reply = assistant_spans(text)
    mask = [int(_inside(start, end, spans)) for start, end in offsets]
    mask.append(int(ends_in_reply))
    return ids, mask


def assistant_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Character spans that carry loss (reply + the `### Human:` after it), and whether the text ends in a reply."""
    markers = list(_MARKER.finditer(text))
    spans = []
    for i, m in enumerate(markers):
        if m.group() != ASSISTANT:
            continue
        nxt = markers[i + 1] if i + 1 < len(markers) else None
        spans.append((m.end(), nxt.end() if nxt is not None else len(text)))
    ends_in_reply = bool(markers) and markers[-1].group() == ASSISTANT
    return spans, ends_in_reply


def build_dataset(tokenizer: Any, texts: Sequence[str], assistant_only: bool) -> Any:
    """A `datasets.Dataset` of input_ids (+ assistant_masks), the pre-tokenized form trl's SFTTrainer accepts."""
    from datasets import Dataset

    columns: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    for text in texts:
        ids, mask = tokenize_text(tokenizer, text, assistant_only)
        columns["input_ids"].append(ids)
        columns["assistant_masks"].append(mask)
    if assistant_only and not any(any(m) for m in columns["assistant_masks"]):
        raise OasstError(f"no row has an `{ASSISTANT}` turn to learn from; use --loss-on all to train on "
                         "the whole text")
    if not assistant_only:
        del columns["assistant_masks"]
    return Dataset.from_dict(columns)


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a token starting at `start` lies in a loss span (special tokens have empty offsets: never)."""
    if end <= start:
        return False
    return any(a <= start < b for a, b in spans)


def _row_text(row: dict[str, Any], where: str) -> str:
    """A row's Guanaco text: its `text`, or its `messages` rendered; both are checked when both are there."""
    text, messages = row.get("text"), row.get("messages")
    if text is not None and not isinstance(text, str):
        raise OasstError(f"{where}: `text` must be a string, not {_kind(text)}")
    rendered = render_messages(messages, where) if messages is not None else None
    if text is not None:
        return text
    if rendered is not None:
        return rendered
    raise OasstError(f"{where}: row has neither a `text` string nor a `messages` list")


def _read_jsonl(path: Path) -> list[str]:
    """Texts of an `oasst build` JSONL split; every row is checked here, so a bad one is named with its line."""
    from oasst_tools.files import decode_utf8, read_bytes

    texts = []
    # One read: the files are a few MB, and bytes let a bad byte be reported with its line.
    for n, raw in enumerate(read_bytes(path, "data file").split(b"\n"), 1):
        if not raw.strip():
            continue
        line = decode_utf8(raw, path, n)
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OasstInputError(path, n, f"not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise OasstInputError(path, n, "JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise OasstInputError(path, n, f"a row must be a JSON object with `text` or `messages`, not {_kind(row)}")
        if "text" not in row and "messages" not in row:
            raise OasstInputError(path, n, f"row has no `text` or `messages` column (it has: {', '.join(row)})")
        try:
            texts.append(_row_text(row, f"{path}:{n}"))
        except OasstError as exc:
            raise OasstInputError(path, n, str(exc).removeprefix(f"{path}:{n}: ")) from None
    return texts


def _read_datasets(data: str) -> dict[str, list[str]]:
    """Texts of a `save_to_disk` folder or a hub dataset, split by split."""
    from oasst_tools.hub import assume_offline, hub_candidate, hub_reachable, in_hub_cache, offline_reason
    from oasst_tools.files import path_problem

    path = Path(data)
    from_hub = False
    if not path.is_dir():
        if path.exists():
            raise OasstError(f"dataset {data} is neither an `oasst build` folder (no train.jsonl) nor a folder")
        if not hub_candidate(data):
            problem = path_problem(path)
            raise OasstError(f"dataset folder {data} does not exist" + (f" ({problem})" if problem else ""))
        from_hub = True
        if not hub_reachable():
            if not in_hub_cache(data, "dataset"):
                raise OasstError(f"cannot load dataset {data} from the Hugging Face Hub ({offline_reason()}) and it is "
                                 "not in the local cache; pass --data PATH with an `oasst build` folder")
            assume_offline()  # the local cache may have it: let datasets look there instead of retrying the Hub

    import datasets

    try:
        loaded = datasets.load_from_disk(str(path)) if not from_hub else datasets.load_dataset(data)
    except OasstError:
        raise
    except FileNotFoundError:
        if from_hub:
            raise OasstError(f"cannot load dataset {data} from the Hugging Face Hub: not found") from None
        raise OasstError(f"dataset folder {data} has no train.jsonl and is not a `datasets` folder") from None
    except Exception as exc:  # datasets raises many unrelated types for "cannot find/load this"
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        if from_hub and not hub_reachable():
            raise OasstError(f"cannot load dataset {data} from the Hugging Face Hub ({offline_reason()}) and it is "
                             "not in the local cache; pass --data PATH with an `oasst build` folder") from None
        raise OasstError(f"cannot load dataset {data}: {detail}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise OasstError(f"dataset {data} is not a table of rows (got {type(loaded).__name__})")
    splits: dict[str, list[str]] = {}
    for split, name in (("train", "train"), ("test", "test"), ("test", "validation")):
        if name not in loaded or split in splits:
            continue
        table = loaded[name]
        if "text" in table.column_names:
            texts = list(table["text"])
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise OasstError(f"dataset {data}[{name}] row {bad}: `text` must be a string, not "
                                 f"{_kind(texts[bad])}")
            splits[split] = texts
        elif "messages" in table.column_names:
            splits[split] = [render_messages(m, f"dataset {data}[{name}] row {i}")
                             for i, m in enumerate(table["messages"])]
        else:
            raise OasstError(f"dataset {data} has no `text` or `messages` column (columns: "
                             f"{', '.join(table.column_names)})")
    if "train" not in splits:
        raise OasstError(f"dataset {data} has no train split (splits: {', '.join(loaded)})")
    return splits
