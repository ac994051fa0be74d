"""Turn raw input records (JSON objects or table rows) into validated message fields, and one tree's records into
a validated index: the record rules, each stated once.

- `make_message`: one record -> `Message`, raising `OasstInputError` naming the field that is wrong;
- `index_tree`: one tree's records checked (the same acceptance, as one expression for plain JSON types), linked
  parent to child and sorted by rule 1 (`FLAG_REASON`): the fast path of every reader.

Shared by every reader, so flat files, tree exports, parquet and `datasets` folders accept and reject
exactly the same things. Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

from oasst_tools.errors import OasstInputError, shown
from oasst_tools.schema import ROLES, Message

# Fields that `Message` interprets; anything else in a record lands in `Message.extra`.
MESSAGE_FIELDS = frozenset(
    (
        "message_id", "parent_id", "role", "text", "lang", "rank", "deleted", "review_result", "synthetic",
        "created_date", "model_name", "review_count", "labels", "emojis", "replies",
        # Tree-level fields that flat exports repeat on every message.
        "message_tree_id", "tree_state",
    )
)

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer"}
# Types a label value may have (JSON numbers; null for a label without a value, which filters treat as absent).
# `bool` is not among them: `type(True) is bool`, so true/false are rejected, not compared as 1/0.
NUMBER_TYPES: frozenset[type] = frozenset((int, float, type(None)))

# Rule 1 of the selection (../shared/docs/guanaco.md), its one statement: a message goes with its subtree when it is
# deleted, or reviewed as spam (`review_result` false; null, not reviewed yet, stays). The reason, by a validated
# record's [deleted][review_result] (each true, false or null). A table rather than a function: `index_tree` looks it
# up for every message read, and a call there cost 20 times the lookup.
FLAG_REASON: dict[bool | None, dict[bool | None, str | None]] = {
    None: {None: None, True: None, False: "spam"},
    False: {None: None, True: None, False: "spam"},
    True: {None: "deleted", True: "deleted", False: "deleted"},
}

# One record as a reader holds it: (line, parent id, record); the line is the tree's for a nested export.
Item = tuple[int | None, str | None, dict[str, Any]]
INT64_LIMIT = 1 << 63  # ranks and counts beyond it cannot be written to parquet or read back by most JSON readers
DICT_ONLY = frozenset((dict,))  # `DICT_ONLY.issuperset(map(type, xs))`: every x is an object, tested in C
STR_ONLY, INT_ONLY = frozenset((str,)), frozenset((int,))


def _wrong_type(path: str | None, line: int | None, name: str, want: str, value: Any) -> OasstInputError:
    return OasstInputError(
        path, line, f"field '{name}' must be {want}, got {shown(value)}", reason="wrong_type"
    )


def optional_str(record: Mapping[str, Any], name: str, path: str, line: int | None) -> str | None:
    """`record[name]` as a string or None; raises on any other type."""
    value = record.get(name)
    if value is None or type(value) is str:
        return value
    if hasattr(value, "isoformat"):  # parquet and datasets give timestamps as datetime objects
        return value.isoformat()
    raise _wrong_type(path, line, name, "a string or null", value)


def required_str(record: Mapping[str, Any], name: str, path: str, line: int | None) -> str:
    """`record[name]` as a non-empty string; raises when missing, null, empty or of another type."""
    if name not in record:
        raise OasstInputError(path, line, f"missing required field '{name}'", reason="missing_field")
    value = record[name]
    if type(value) is not str:
        raise _wrong_type(path, line, name, "a string", value)
    if not value and name != "text":
        raise OasstInputError(path, line, f"field '{name}' is empty", reason="missing_field")
    return value


def _flag(record: Mapping[str, Any], name: str, path: str, line: int | None) -> bool | None:
    value = record.get(name)
    if value is None or type(value) is bool:
        return value
    raise _wrong_type(path, line, name, "true, false or null", value)


def _count_field(record: Mapping[str, Any], name: str, path: str, line: int | None) -> int | None:
    """`rank` or `review_count`: a non-negative integer that fits 64 bits (what parquet and JSON readers hold), or
    None."""
    value = record.get(name)
    if value is None or (type(value) is int and 0 <= value < INT64_LIMIT):
        return value
    # Parquet copies of OASST store nullable integers as float64 (0.0, 1.0, NaN).
    if type(value) is float:
        if value != value:
            return None
        if value.is_integer() and 0 <= value < INT64_LIMIT:
            return int(value)
    raise _wrong_type(path, line, name, "a non-negative integer below 2^63, or null", value)


def normalize_labels(value: Any, path: str | None, line: int | None) -> dict[str, float]:
    """Labels as {name: value} from the columnar HF form or the export's {name: {value, count}} form."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise _wrong_type(path, line, "labels", "an object", value)
    names = value.get("name")
    if type(names) is list:
        values = value.get("value")
        if type(values) is not list or len(values) != len(names):
            raise OasstInputError(
                path, line, "field 'labels' has 'name' and 'value' lists of different lengths", reason="wrong_type"
            )
        if not STR_ONLY.issuperset(map(type, names)):  # a name that is a number, a list or an object
            raise _wrong_type(path, line, "labels.name", "a list of strings", names)
        out = dict(zip(names, values))
    else:
        out = {}
        for name, item in value.items():
            if type(item) is dict:
                out[name] = item.get("value")
            elif item is None or type(item) in (int, float):  # null as in the columnar form: a label not given
                out[name] = item
            else:
                raise _wrong_type(path, line, f"labels.{name}", "an object with a 'value'", item)
    return out


def normalize_emojis(value: Any, path: str, line: int | None) -> dict[str, int]:
    """Emojis as {name: count} from the columnar HF form ({name: [...], count: [...]}) or the export's {name: count}
    form; what `index_tree` accepts without a call, and nothing else."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise _wrong_type(path, line, "emojis", "an object", value)
    if "name" not in value:
        for name, count in value.items():
            if type(count) is not int:
                raise _wrong_type(path, line, f"emojis.{name}", "a whole number", count)
        return dict(value)
    names, counts = value.get("name"), value.get("count")
    if type(names) is not list or not STR_ONLY.issuperset(map(type, names)):
        raise _wrong_type(path, line, "emojis.name", "a list of strings", names)
    if type(counts) is not list or len(counts) != len(names) or not INT_ONLY.issuperset(map(type, counts)):
        raise _wrong_type(path, line, "emojis.count", f"a list of {len(names)} whole number(s), one per name", counts)
    return dict(zip(names, counts))


def make_message(
    record: Mapping[str, Any],
    path: str,
    line: int | None,
    replies: tuple[Message, ...] = (),
    parent_id: str | None = None,
) -> Message:
    """A validated `Message` from one record; raises `OasstInputError` naming the field that is wrong."""
    message_id = required_str(record, "message_id", path, line)
    role = required_str(record, "role", path, line)
    if role not in ROLES:
        raise OasstInputError(
            path, line, f"message {message_id} has unknown role '{role}' (expected 'prompter' or 'assistant')",
            reason="unknown_role",
        )
    text = required_str(record, "text", path, line)
    review_count = _count_field(record, "review_count", path, line)
    unknown = record.keys() - MESSAGE_FIELDS
    extra = {k: record[k] for k in unknown} if unknown else {}
    return Message(
        message_id=message_id,
        role=role,  # type: ignore[arg-type]  # checked against ROLES above
        text=text,
        parent_id=parent_id if parent_id is not None else optional_str(record, "parent_id", path, line),
        lang=optional_str(record, "lang", path, line),
        rank=_count_field(record, "rank", path, line),
        deleted=bool(_flag(record, "deleted", path, line)),
        review_result=_flag(record, "review_result", path, line),
        synthetic=bool(_flag(record, "synthetic", path, line)),
        created_date=optional_str(record, "created_date", path, line),
        model_name=optional_str(record, "model_name", path, line),
        review_count=review_count,
        labels=normalize_labels(record.get("labels"), path, line),
        emojis=normalize_emojis(record.get("emojis"), path, line),
        extra=extra,
        replies=replies,
        line=line,
    )


def index_tree(items: Iterable[Item], strict: bool = True) -> tuple[
        dict[str, Item], dict[str | None, list[dict[str, Any]]], list[dict[str, Any]], bool, bool, bool] | None:
    """One tree's records checked and linked: (by_id, children, flagged, plain, ordered, alternates).

    by_id: message_id -> item, in input order; children: parent id -> reply records, in input order (roots under
    None); flagged: the records rule 1 drops (`FLAG_REASON`), in input order; plain: every record valid with exactly
    the JSON types (no float rank, no datetime), so selections can use the records as they are; ordered: every reply
    came after its parent, so the input order is parents first; alternates: every root is a prompter and every
    reply's role differs from its parent's. None when a message id repeats, or (strict) when a record is not plain
    and valid: the reader then raises the first error in its own order and, every record known valid, calls again
    with strict=False."""
    by_id: dict[str, Item] = {}
    children: dict[str | None, list[dict[str, Any]]] = {}
    flagged: list[dict[str, Any]] = []
    tables: list[dict[str, Any]] = []  # labels in the export's {name: {value, count}} form, checked at the end
    # Columnar labels' name lists, emojis' name lists and their counts (lists, or the export form's values): their
    # items' types checked at the end, in C.
    label_names: list[Any] = []
    emoji_names: list[Any] = []
    emoji_counts: list[Any] = []
    reasons = FLAG_REASON
    plain = ordered = alternates = True
    for item in items:
        line, parent, record = item
        g = record.get
        message_id = g("message_id")
        role = g("role")
        rank = g("rank")
        labels = g("labels")
        deleted = g("deleted")
        review = g("review_result")
        # `make_message`'s acceptance for plain JSON types as one boolean expression, no Python calls: this loop
        # visits every message of every input, and a call per record cost a quarter of it (a per-field tuple of
        # types checked against a set of allowed tuples measured slower; so did `type(x) in {T, NoneType}`). Labels
        # in the {name: {value, count}} form are set aside for one C-level pass over the tree's label values (a
        # pass per message cost 0.3 us of set-up each).
        if not (
            type(message_id) is str and message_id and type(role) is str and role in ROLES
            and type(g("text")) is str
            and ((value := g("lang")) is None or type(value) is str)
            and ((value := g("created_date")) is None or type(value) is str)
            and ((value := g("model_name")) is None or type(value) is str)
            and (rank is None or (type(rank) is int and 0 <= rank < INT64_LIMIT))
            and ((value := g("review_count")) is None or (type(value) is int and 0 <= value < INT64_LIMIT))
            and (deleted is None or type(deleted) is bool) and (review is None or type(review) is bool)
            and ((value := g("synthetic")) is None or type(value) is bool)
            and ((value := g("emojis")) is None or (type(value) is dict and (
                (type(names := value.get("name")) is list and type(counts := value.get("count")) is list
                 and len(names) == len(counts) and not emoji_names.append(names) and not emoji_counts.append(counts))
                or ("name" not in value and not emoji_counts.append(value.values())))))
            and (labels is None or (type(labels) is dict and (
                (type(names := labels.get("name")) is list and type(values := labels.get("value")) is list
                 and len(names) == len(values) and not label_names.append(names))
                or ("name" not in labels and not tables.append(labels)))))
        ):
            if strict:
                return None
            plain = False  # valid once converted (the caller checked it)
            message_id, role = record["message_id"], record["role"]
        if message_id in by_id:
            return None
        if parent is None:
            if role != "prompter":
                alternates = False
        elif (up := by_id.get(parent)) is None:  # looked up before this record is added: a self-parent is caught
            ordered = False
        elif up[2]["role"] == role:
            alternates = False
        if reasons[deleted][review]:
            flagged.append(record)
        by_id[message_id] = item
        kids = children.get(parent)
        if kids is None:
            children[parent] = [record]
        else:
            kids.append(record)
    if tables and not DICT_ONLY.issuperset(map(type, chain.from_iterable(map(dict.values, tables)))):
        if strict:
            return None
        plain = False  # label values that are numbers, not {value, count}: valid, converted by `normalize_labels`
    if strict and not (STR_ONLY.issuperset(map(type, chain.from_iterable(label_names + emoji_names)))
                       and INT_ONLY.issuperset(map(type, chain.from_iterable(emoji_counts)))):
        return None  # the reader checks each record and names the first bad one
    return by_id, children, flagged, plain, ordered, alternates
