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
    """A list of {role, content} turns as one Guanaco text."""
    parts = []
    for turn in messages:
        marker = ROLE_MARKERS.get(str(turn.get("role", "")).lower())
        if marker is None:
            raise OasstError(f"{where}: role {turn.get('role')!r} is not user or assistant")
        parts.append(f"{marker} {turn.get('content', '')}")
    return "".join(parts)


def read_rows(data: str, eval_rows: int = 0) -> dict[str, list[str]]:
    """Guanaco texts of the train split and, when there is one, the test split."""
    path = Path(data)
    if path.is_dir() and (path / "train.jsonl").is_file():
        splits = {"train": _read_jsonl(path / "train.jsonl")}
        if (path / "test.jsonl").is_file():
            splits["test"] = _read_jsonl(path / "test.jsonl")
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
    """A row's Guanaco text: its `text`, or its `messages` rendered."""
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("messages"), list):
        return render_messages(row["messages"], where)
    raise OasstError(f"{where}: row has neither a `text` string nor a `messages` list")


def _read_jsonl(path: Path) -> list[str]:
    """Texts of an `oasst build` JSONL split."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OasstInputError(path, n, f"not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or ("text" not in row and "messages" not in row):
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise OasstInputError(path, n, f"row has no `text` or `messages` column (it has: {keys})")
            texts.append(_row_text(row, f"{path}:{n}"))
    return texts


def _read_datasets(data: str) -> dict[str, list[str]]:
    """Texts of a `save_to_disk` folder or a hub dataset, split by split."""
    import datasets

    path = Path(data)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        elif path.exists() or data.startswith((".", "/", "~")):
            raise OasstError(f"dataset {data} is neither an `oasst build` folder (no train.jsonl) nor a folder")
        else:
            loaded = datasets.load_dataset(data)
    except OasstError:
        raise
    except FileNotFoundError:
        raise OasstError(f"dataset folder {data} has no train.jsonl and is not a `datasets` folder") from None
    except Exception as exc:  # datasets raises many unrelated types for "cannot find/load this"
        raise OasstError(f"cannot load dataset {data}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits: dict[str, list[str]] = {}
    for split, name in (("train", "train"), ("test", "test"), ("test", "validation")):
        if name not in loaded or split in splits:
            continue
        table = loaded[name]
        if "text" in table.column_names:
            splits[split] = list(table["text"])
        elif "messages" in table.column_names:
            splits[split] = [render_messages(m, f"{data}[{name}]") for m in table["messages"]]
        else:
            raise OasstError(f"dataset {data} has no `text` or `messages` column (columns: "
                             f"{', '.join(table.column_names)})")
    if "train" not in splits:
        raise OasstError(f"dataset {data} has no train split (splits: {', '.join(loaded)})")
    return splits
