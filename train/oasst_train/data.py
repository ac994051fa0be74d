"""Training rows: read a dataset, encode each conversation in a format, cut it to max_length, count what is learned.

    rows = read_rows("fixtures/guanaco-en")                          # {"train": [Example...], "test": [...]}
    dataset, report = build_dataset(tokenizer, rows["train"], format="guanaco", max_length=256)
    report.to_dict()                                                  # rows cut, tokens trained and lost, ...

The formats live in `oasst_tools.conversation`: Guanaco text (EOS appended; a reply is trained with the human
marker or EOS that ends it) or the tokenizer's chat template (assistant turns and their end-of-turn token). Both are
cut to max_length here, the loss mask with the ids, and a row left with no token to learn from is dropped and
counted, never trained on nothing (trl would drop it silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oasst_tools.conversation import Encoded, Format, check_messages, encode, encode_guanaco, render_guanaco
from oasst_tools.conversation import guanaco_prompt  # noqa: F401 - merge.py's check prompt imports it from here
from oasst_tools.errors import OasstError, OasstInputError
from oasst_tools.errors import kind as _kind
from oasst_tools.files import load_saved_dataset, saved_dataset_problem, split_rows


# The columns of a preference-pair row (`oasst build --pairs`, trl's preference format): method dpo reads them.
PAIR_COLUMNS = frozenset({"prompt", "chosen", "rejected"})
PAIRS_NOT_FOR_SFT = ("holds preference pairs (prompt, chosen, rejected), as `oasst build --pairs` writes them: train "
                     "them with --method dpo, or build conversations (without --pairs) for --method sft")


@dataclass(frozen=True)
class Example:
    """One conversation row: its Guanaco `text` and/or its `messages`, and where it was read (`file:line`)."""

    text: str | None
    messages: list[dict[str, str]] | None
    where: str

    def conversation(self, format: Format) -> str | list[dict[str, str]]:  # noqa: A002
        """What `format` encodes: Guanaco reads the messages (else the text), chat templates the messages (else
        the text, split at its markers)."""
        if format == "guanaco":
            # The messages when the format can hold them all (an `oasst build` row has both, the text rendered from
            # them): their turn boundaries mark the replies, where a marker quoted inside a turn would mislead a
            # search of the text. With a system turn (no place in Guanaco), the row's own text.
            plain = self.messages is not None and all(turn["role"] != "system" for turn in self.messages)
            return self.messages if plain or self.text is None else self.text  # type: ignore[return-value]
        return self.messages if self.messages is not None else self.text  # type: ignore[return-value]


def render_messages(messages: Sequence[dict[str, Any]], where: str = "messages") -> str:
    """A list of {role, content} turns as one Guanaco text; a turn of the wrong shape is an error at `where`."""
    return render_guanaco(messages, where)


def read_rows(data: str, eval_rows: int = 0) -> dict[str, list[Example]]:
    """The rows of the train split and, when there is one, the test split; every row checked."""
    from oasst_tools.files import build_split

    path = Path(data)
    train = build_split(path, "train") if path.is_dir() else None
    if train is not None:
        splits = {"train": _read_jsonl(train)}
        test = build_split(path, "test")
        if test is not None:
            splits["test"] = _read_jsonl(test)
        if not splits["train"]:
            raise OasstError(f"{train}: the train split has no rows")
    else:
        splits = _read_datasets(data)
    if not splits.get("train"):
        raise OasstError(f"{data}: the train split has no rows")
    if eval_rows and "test" in splits:
        splits["test"] = splits["test"][:eval_rows]
    _warn_odd_turns(splits)
    return splits


def _warn_odd_turns(splits: dict[str, list[Example]]) -> None:
    """One warning line for rows whose turns do not alternate user/assistant after any system turns (an assistant
    first, two users in a row) and one for turns with empty content: trainable, but rarely what was meant (`oasst
    build` writes neither)."""
    from oasst_train.report import warn

    odd: dict[str, list[str]] = {"do not alternate user and assistant": [], "have a turn with empty content": []}
    for examples in splits.values():
        for example in examples:
            turns = [t for t in example.messages or () if t["role"] != "system"]
            if any(t["role"] != ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(turns)):
                odd["do not alternate user and assistant"].append(example.where)
            if any(not t["content"].strip() for t in turns):
                odd["have a turn with empty content"].append(example.where)
    for what, places in odd.items():
        if places:
            warn(f"{len(places)} row(s) whose messages {what} (first: {places[0]})")


def tokenize_text(tokenizer: Any, text: str, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of Guanaco `text` + EOS, and a 0/1 mask of the tokens that carry loss."""
    enc = encode_guanaco(tokenizer, text, assistant_only)
    return enc.ids, enc.mask


@dataclass
class DataReport:
    """What one split gives the model to learn, counted before it learns it (issue 12, item 6)."""

    format: str
    max_length: int | None
    loss_on: str
    rows: int = 0  # rows read
    rows_cut: int = 0  # longer than max_length: cut, the mask with the ids
    rows_dropped: int = 0  # no token carries loss once cut: left out, never trained on nothing
    rows_without_reply: int = 0  # of the dropped rows, those with no loss token even before the cut
    first_dropped: str | None = None  # where the first dropped row was read (`file:line`)
    tokens: int = 0  # every token of every row, before the cut
    tokens_kept: int = 0  # ... after it (dropped rows included: they were cut too)
    loss_tokens: int = 0  # tokens under the loss mask before the cut (the assistant tokens with loss_on assistant)
    loss_tokens_trained: int = 0  # ... that survive the cut, in the rows kept
    assistant_turns: int = 0
    turn_ends_trained: int = 0  # replies whose closing token (end-of-turn, EOS, next human marker) is trained
    rows_end_trained: int = 0  # rows with at least one such closing token trained: the model sees how to stop

    def add(self, full: Encoded, kept: Encoded, where: str) -> bool:
        """Count one row (before and after the cut); whether it has a token to learn from."""
        trained = sum(kept.mask)
        self.rows += 1
        self.rows_cut += len(kept.ids) < len(full.ids)
        self.tokens += len(full.ids)
        self.tokens_kept += len(kept.ids)
        self.loss_tokens += sum(full.mask)
        self.assistant_turns += full.turns
        if not trained:
            self.rows_dropped += 1
            self.rows_without_reply += not any(full.mask)
            self.first_dropped = self.first_dropped or where
            return False
        self.loss_tokens_trained += trained
        self.turn_ends_trained += len(kept.ends)
        self.rows_end_trained += bool(kept.ends)
        return True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the tokens lost to the cut and the share trained."""
        out = dict(vars(self))
        out["loss_tokens_lost"] = self.loss_tokens - self.loss_tokens_trained
        out["share_trained"] = round(self.loss_tokens_trained / self.loss_tokens, 4) if self.loss_tokens else None
        return out


def build_dataset(tokenizer: Any, rows: Sequence[Example | str], assistant_only: bool = True, *,
                  format: Format = "guanaco", max_length: int | None = None) -> tuple[Any, DataReport]:  # noqa: A002
    """A `datasets.Dataset` of input_ids (+ assistant_masks) cut to `max_length`, the pre-tokenized form trl's
    SFTTrainer takes, and its report; rows with no token to learn from are left out (None when none is left).
    A plain string row is Guanaco text."""
    from datasets import Dataset

    report = DataReport(format=format, max_length=max_length, loss_on="assistant" if assistant_only else "all")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = Example(row, None, f"row {n}")
        full = encode(tokenizer, row.conversation(format), format, assistant_only, row.where)
        kept = full.cut(max_length)
        if report.add(full, kept, row.where):
            columns["input_ids"].append(kept.ids)
            columns["assistant_masks"].append(kept.mask)
    if not columns["input_ids"]:
        return None, report
    if not assistant_only:
        del columns["assistant_masks"]
    return Dataset.from_dict(columns), report


def require_trainable(report: DataReport, split: str = "train") -> None:
    """One error line when no row of `split` is left to learn from, saying why the rows went."""
    if report.rows > report.rows_dropped:
        return
    cut = report.rows_dropped - report.rows_without_reply
    why = [f"{report.rows_without_reply} without an assistant reply"] if report.rows_without_reply else []
    if cut:
        why.append(f"{cut} whose replies all start after token {report.max_length}")
    fixes = "use a larger --max-length" if cut else "use --loss-on all to train on the whole text"
    raise OasstError(f"no {split} row has a token to learn from ({report.rows} rows: {', '.join(why)}; first: "
                     f"{report.first_dropped}); {fixes}")


def _example(row: dict[str, Any], where: str) -> Example:
    """A row's `text` and `messages`, both checked when both are there."""
    text, messages = row.get("text"), row.get("messages")
    if text is not None and not isinstance(text, str):
        raise OasstError(f"{where}: `text` must be a string, not {_kind(text)}")
    turns = check_messages(messages, where) if messages is not None else None
    if text is None and turns is None:
        raise OasstError(f"{where}: row has neither a `text` string nor a `messages` list")
    return Example(text, turns, where)


def _read_jsonl(path: Path) -> list[Example]:
    """Rows of an `oasst build` JSONL split; every row is checked here, so a bad one is named with its line."""
    examples = []
    for n, row in split_rows(path, "`text` or `messages`"):
        if "text" not in row and "messages" not in row:
            if PAIR_COLUMNS <= row.keys():
                if examples:  # the rows before were threads: this one row is the odd one, named by its line
                    raise OasstInputError(path, n, "row is a preference pair (prompt, chosen, rejected) among "
                                                   "conversation rows")
                raise OasstError(f"{path} {PAIRS_NOT_FOR_SFT}")
            raise OasstInputError(path, n, f"row has no `text` or `messages` column (it has: {', '.join(row)})")
        try:
            examples.append(_example(row, f"{path}:{n}"))
        except OasstError as exc:
            raise OasstInputError(path, n, str(exc).removeprefix(f"{path}:{n}: ")) from None
    return examples


def _read_datasets(data: str) -> dict[str, list[Example]]:
    """Rows of a `save_to_disk` folder or a hub dataset, split by split."""
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
        loaded = load_saved_dataset(path) if not from_hub else datasets.load_dataset(data)
    except OasstError:
        raise
    except FileNotFoundError:
        if from_hub:
            raise OasstError(f"cannot load dataset {data} from the Hugging Face Hub: not found") from None
        raise saved_dataset_problem(path) or OasstError(f"dataset folder {data} has no train.jsonl and is not a "
                                                        "`datasets` folder") from None
    except Exception as exc:  # datasets raises many unrelated types for "cannot find/load this"
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = None if from_hub else saved_dataset_problem(path)
        if problem is not None:
            raise problem from None
        if from_hub and not hub_reachable():
            raise OasstError(f"cannot load dataset {data} from the Hugging Face Hub ({offline_reason()}) and it is "
                             "not in the local cache; pass --data PATH with an `oasst build` folder") from None
        raise OasstError(f"cannot load dataset {data}: {detail}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise OasstError(f"dataset {data} is not a table of rows (got {type(loaded).__name__})")
    splits: dict[str, list[Example]] = {}
    # The split words of oasst build (oasst_tools.rawtree._SPLIT_WORDS): validation and valid are held out as test.
    for split, name in (("train", "train"), ("test", "test"), ("test", "validation"), ("test", "valid")):
        if name not in loaded or split in splits:
            continue
        table = loaded[name]
        columns = [c for c in ("text", "messages") if c in table.column_names]
        if not columns and PAIR_COLUMNS <= set(table.column_names):
            raise OasstError(f"dataset {data} {PAIRS_NOT_FOR_SFT}")
        if not columns:
            raise OasstError(f"dataset {data} has no `text` or `messages` column (columns: "
                             f"{', '.join(table.column_names)})")
        values = [list(table[c]) for c in columns]
        splits[split] = [_example(dict(zip(columns, row)), f"dataset {data}[{name}] row {i}")
                         for i, row in enumerate(zip(*values))]
    if "train" not in splits:
        raise OasstError(f"dataset {data} has no train split (splits: {', '.join(loaded)})")
    return splits
