"""The selection rules of `../shared/docs/guanaco.md`: prune trees, then pick and shape threads.

1. deleted messages and spam (`review_result == false`) go with their subtrees; label filters and
   `drop_synthetic` act the same way (a message without the label passes);
2. a tree is kept when its state is selected, its root survived and its root's language is selected;
3. threads: best-ranked (`top-rank`), every leaf thread (`all-threads`) or the k best replies at each step (`top-k`);
4. then cut to `max_turns`, trim a trailing prompter turn (`end_with_assistant`) and drop threads under `min_turns`.

Standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import count, repeat
from typing import TYPE_CHECKING, Any, Literal, get_args

from oasst_tools.errors import OasstError, OasstInputError, shown
from oasst_tools.records import FLAG_REASON, NUMBER_TYPES, normalize_labels
from oasst_tools.read import subtree_records
from oasst_tools.schema import Message, Tree
from oasst_tools.walk import Thread, best_thread, leaf_threads, sibling_key, top_k_threads

if TYPE_CHECKING:
    from oasst_tools.read import RawTree

Mode = Literal["top-rank", "all-threads", "top-k"]


@dataclass(frozen=True)
class Selection:
    """Which trees, messages and threads to keep."""

    mode: Mode = field(default="top-rank", metadata={"help": "top-rank: the best-ranked thread of each tree; "
                       "all-threads: every root-to-leaf thread; top-k: threads through the k best replies."})
    top_k: int = field(default=1, metadata={"help": "k for --top-k: follow the k best-ranked replies at each step."})
    langs: frozenset[str] = field(default=frozenset(), metadata={"help": "Languages of the root prompt to keep "
                                  "(empty: all). 'pt' also matches 'pt-BR' unless lang_exact."})
    lang_exact: bool = field(default=False, metadata={"help": "Match language codes exactly ('pt' not 'pt-BR')."})
    tree_states: frozenset[str] = field(default=frozenset({"ready_for_export"}),
                                        metadata={"help": "Tree states to keep (empty: any)."})
    label_max: Mapping[str, float] = field(default_factory=dict,
                                           metadata={"help": "Drop a message (and its subtree) whose label is above."})
    label_min: Mapping[str, float] = field(default_factory=dict,
                                           metadata={"help": "Drop a message (and its subtree) whose label is below."})
    drop_synthetic: bool = field(default=False, metadata={"help": "Drop synthetic messages with their subtrees."})
    end_with_assistant: bool = field(default=False, metadata={"help": "Trim a trailing prompter turn."})
    min_turns: int = field(default=1, metadata={"help": "Drop threads with fewer messages than this."})
    max_turns: int | None = field(default=None, metadata={"help": "Cut threads after this many messages."})

    def __post_init__(self) -> None:
        """One `OasstError` naming the field for a value the selection cannot use (a library caller's typo would
        otherwise select something else silently: `langs="en"` is the languages "e" and "n")."""
        problem = _selection_problem(self)
        if problem is not None:
            raise OasstError(f"Selection: {problem}")


MODES: tuple[str, ...] = get_args(Mode)


def _selection_problem(sel: Selection) -> str | None:
    """What is wrong with one field of `sel`, or None."""
    if sel.mode not in MODES:
        return f"mode must be one of {', '.join(MODES)}, not {sel.mode!r}"
    for name in ("top_k", "min_turns"):
        value = getattr(sel, name)
        if type(value) is not int or value < 1:
            return f"{name} must be a whole number of at least 1, not {value!r}"
    if sel.max_turns is not None and (type(sel.max_turns) is not int or sel.max_turns < 1):
        return f"max_turns must be None or a whole number of at least 1, not {sel.max_turns!r}"
    for name in ("langs", "tree_states"):
        value = getattr(sel, name)
        if isinstance(value, (str, bytes)) or not isinstance(value, Collection) or not all(
                isinstance(item, str) for item in value):
            return f"{name} must be a set of strings (e.g. frozenset({{'en'}})), not {shown(value)}"
    for name in ("label_max", "label_min"):
        value = getattr(sel, name)
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and type(v) in (int, float) for k, v in value.items()):
            return f"{name} must map label names to numbers, not {shown(value)}"
    for name in ("lang_exact", "drop_synthetic", "end_with_assistant"):
        if not isinstance(getattr(sel, name), bool):
            return f"{name} must be True or False, not {getattr(sel, name)!r}"
    return None


def lang_matches(lang: str | None, langs: frozenset[str], exact: bool = False) -> bool:
    """True when `lang` is selected: empty `langs` selects all; 'pt' selects 'pt-BR' unless `exact`."""
    if not langs:
        return True
    if lang is None:
        return False
    lang = lang.lower()
    for want in langs:
        want = want.lower()
        if lang == want or (not exact and lang.startswith(want + "-")):
            return True
    return False


def drop_reason(message: Message, sel: Selection) -> str | None:
    """Why rule 1 or 6 drops `message` (with its subtree), or None when it stays. A label value that a filter
    cannot compare (a string, a list, true) raises `OasstInputError` at the message's line (path None: the caller
    knows the file)."""
    return _drop_reason(message.deleted, message.review_result, message.synthetic, message.labels, sel, message.line)


def record_drop_reason(record: Mapping[str, Any], sel: Selection, line: int | None = None) -> str | None:
    """`drop_reason` for a raw, validated input record (the build's fast path), read at `line`."""
    labels = record.get("labels")
    if labels and (sel.label_max or sel.label_min):
        labels = normalize_labels(labels, None, line)
    return _drop_reason(record.get("deleted"), record.get("review_result"), record.get("synthetic"), labels, sel,
                        line)


def _drop_reason(deleted: bool | None, review_result: bool | None, synthetic: bool | None,
                 labels: Mapping[str, float] | None, sel: Selection, line: int | None = None) -> str | None:
    reason = FLAG_REASON[deleted][review_result]
    if reason is not None:
        return reason
    if sel.drop_synthetic and synthetic:
        return "synthetic"
    if labels and (sel.label_max or sel.label_min):
        # Label values are checked here, where a filter compares them, not for every message read: a filter's
        # labels only (a string compared with a number would otherwise fail far from its line).
        for name, limit in sel.label_max.items():
            value = labels.get(name)
            if value is not None:
                if type(value) not in NUMBER_TYPES:
                    raise _bad_label(name, value, line)
                if value > limit:
                    return f"label_max:{name}"
        for name, limit in sel.label_min.items():
            value = labels.get(name)
            if value is not None:
                if type(value) not in NUMBER_TYPES:
                    raise _bad_label(name, value, line)
                if value < limit:
                    return f"label_min:{name}"
    return None


def _bad_label(name: str, value: Any, line: int | None) -> OasstInputError:
    text = repr(value)
    return OasstInputError(None, line, f"field 'labels.{name}' must be a number or null for --label-max/--label-min, "
                           f"got {text if len(text) <= 40 else text[:37] + '...'}", reason="wrong_type")


def located(err: OasstInputError, path: str | None) -> OasstInputError:
    """`err` with the file it came from, when the code that raised it knew only the line."""
    if err.path is not None or path is None:
        return err
    return OasstInputError(path, err.line, err.msg, reason=err.reason)


def filter_labels(records: Iterable[tuple[Any, ...]], names: Collection[str]) -> set[str]:
    """Which of `names` (the labels of --label-max/--label-min) the (line, ..., record) items carry; raises
    `OasstInputError` (path None) at the line of a value of one of them that is not a number or null, even on a
    message the filters would never reach. Only builds with label filters pay for this pass."""
    found: set[str] = set()
    for item in records:
        line, record = item[0], item[-1]
        raw = record.get("labels")
        if not raw:
            continue
        labels = normalize_labels(raw, None, line)
        for name in names:
            if name in labels:
                found.add(name)
                value = labels[name]
                if type(value) not in NUMBER_TYPES:
                    raise _bad_label(name, value, line)
    return found


def prune(root: Message, sel: Selection, dropped: Counter[str] | None = None) -> Message | None:
    """The tree without dropped messages and their subtrees (None when the root goes); counts by reason."""
    reason = drop_reason(root, sel)
    if reason is not None:
        if dropped is not None:
            dropped[reason] += _size(root)
        return None
    # Post-order rebuild that copies only the messages whose replies changed.
    order: list[Message] = []
    stack = [root]
    while stack:
        message = stack.pop()
        order.append(message)
        for reply in message.replies:
            why = drop_reason(reply, sel)
            if why is None:
                stack.append(reply)
            elif dropped is not None:
                dropped[why] += _size(reply)
    kept: dict[int, Message] = {}
    for message in reversed(order):
        replies = tuple(kept[id(r)] for r in message.replies if id(r) in kept)
        same = len(replies) == len(message.replies) and all(a is b for a, b in zip(replies, message.replies))
        kept[id(message)] = message if same else replace(message, replies=replies)
    return kept[id(root)]


def _size(message: Message) -> int:
    count = 0
    stack = [message]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.replies)
    return count


def tree_drop_reason(tree: Tree, sel: Selection) -> str | None:
    """Why rule 2 drops a whole tree (state or language), or None."""
    return state_lang_reason(tree.tree_state, tree.prompt.lang, sel)


def state_lang_reason(state: str | None, lang: str | None, sel: Selection) -> str | None:
    """Rule 2 on a tree's state and its root prompt's language."""
    if sel.tree_states and state is not None and state not in sel.tree_states:
        return f"tree_state:{state}"
    if not lang_matches(lang, sel.langs, sel.lang_exact):
        return "lang"
    return None


def shape_thread(thread: Thread, sel: Selection) -> Thread | None:
    """Apply max_turns, end_with_assistant and min_turns to one thread (None when it is dropped)."""
    keep = kept_turns([m.role for m in thread], sel)
    return None if keep is None else thread[:keep]


def kept_turns(roles: Sequence[str], sel: Selection) -> int | None:
    """How many leading messages of a thread with these roles survive the turn rules (None: drop it)."""
    keep = len(roles) if sel.max_turns is None else min(len(roles), sel.max_turns)
    if sel.end_with_assistant and keep and roles[keep - 1] == "prompter":
        keep -= 1
    return keep if keep >= max(sel.min_turns, 1) else None


def best_raw_thread(raw: RawTree, sel: Selection, dropped: Counter[str] | None = None) -> list[dict] | None:
    """`select_threads` in top-rank mode on raw records: the same rules without building `Message`s."""
    try:  # a label value a filter cannot compare is raised with its line: the file is added here
        records, children = raw.records, raw.children
        root = records[raw.root][2]
        why = state_lang_reason(raw.state, root.get("lang"), sel)
        if why is None:
            if not (sel.drop_synthetic or sel.label_max or sel.label_min):
                gone = _flagged_ids(raw, dropped) if raw.flagged else _NONE  # rule 1 alone: the reader's list
            else:
                gone = _pruned_ids(raw, sel, dropped)
            if raw.root in gone:
                why = "root_dropped"
        if why is not None:
            if dropped is not None:
                dropped[f"tree:{why}"] += 1
            return None
        node = root
        thread = [root]
        while kids := children.get(node["message_id"]):
            if gone:
                kids = [kid for kid in kids if kid["message_id"] not in gone]
                if not kids:
                    break
            node = kids[0] if len(kids) == 1 else best_reply(kids)
            thread.append(node)
        if sel.max_turns is None and not sel.end_with_assistant and len(thread) >= sel.min_turns:
            return thread  # what `kept_turns` keeps of any thread under the default turn rules
        keep = kept_turns([r["role"] for r in thread], sel)
        if keep is None:
            if dropped is not None:
                dropped["thread:too_short"] += 1
            return None
        return thread[:keep]
    except OasstInputError as err:
        raise located(err, raw.source) from None


_NONE: frozenset[str] = frozenset()


def _flagged_ids(raw: RawTree, dropped: Counter[str] | None) -> set[str]:
    """Ids of the messages rule 1 drops, with their subtrees, from the records the reader flagged (parents first):
    each dropped subtree counted under its head's reason, as `prune` counts, without visiting every message."""
    if dropped is None:  # the path only needs the heads: a reply of a message on it is dropped only as one
        return {record["message_id"] for record in raw.flagged}
    gone: set[str] = set()
    for record in raw.flagged:
        if record["message_id"] not in gone:  # else under a dropped ancestor, counted with it
            lost = subtree_records([record], raw.children)
            gone.update([r["message_id"] for r in lost])
            dropped[FLAG_REASON[record.get("deleted")][record.get("review_result")]] += len(lost)  # type: ignore
    return gone


def _pruned_ids(raw: RawTree, sel: Selection, dropped: Counter[str] | None) -> set[str]:
    """Ids of the messages rules 1 and 6 drop, with their subtrees: every message reached from the root tested in
    `prune`'s order (so a label value no filter can compare is raised at the same message), counted alike."""
    records, children = raw.records, raw.children
    line, _, root = records[raw.root]
    reason = record_drop_reason(root, sel, line)
    if reason is not None:
        if dropped is not None:
            dropped[reason] += len(records)
        return set(records)
    gone: set[str] = set()
    stack = [root]
    while stack:
        for kid in children.get(stack.pop()["message_id"], ()):
            reason = record_drop_reason(kid, sel, records[kid["message_id"]][0])
            if reason is None:
                stack.append(kid)
                continue
            lost = subtree_records([kid], children)
            gone.update([r["message_id"] for r in lost])
            if dropped is not None:
                dropped[reason] += len(lost)
    return gone


def best_reply(replies: list[dict]) -> dict:
    """The best of several sibling records by `walk.sibling_key`. A sole rank 0 is the best (ranks are non-negative
    integers) and is found without a key per reply: most ranked parents have one."""
    ranks = list(map(dict.get, replies, repeat("rank")))
    if ranks.count(0) == 1:
        return replies[ranks.index(0)]
    keys = map(sibling_key, ranks, map(dict.get, replies, repeat("created_date")),
               map(dict.__getitem__, replies, repeat("message_id")))
    return replies[min(zip(keys, count()))[1]]


def surviving_root(tree: Tree, sel: Selection, dropped: Counter[str] | None = None) -> Message | None:
    """Rules 1, 2 and 6 on one tree: its pruned root (what threads and pairs come from), or None, counted."""
    why = tree_drop_reason(tree, sel)
    if why is not None:
        if dropped is not None:
            dropped[f"tree:{why}"] += 1
        return None
    try:
        root = prune(tree.prompt, sel, dropped)
    except OasstInputError as err:
        raise located(err, tree.source) from None
    if root is None and dropped is not None:
        dropped["tree:root_dropped"] += 1
    return root


def select_threads(tree: Tree, sel: Selection, dropped: Counter[str] | None = None) -> Iterator[Thread]:
    """The threads of one tree under every rule, in depth-first order, without duplicates."""
    root = surviving_root(tree, sel, dropped)
    if root is None:
        return
    if sel.mode == "top-rank":
        candidates: Iterator[Thread] = iter((best_thread(root),))
    elif sel.mode == "top-k":
        candidates = top_k_threads(root, sel.top_k)
    else:
        candidates = leaf_threads(root)
    seen: set[tuple[str, ...]] = set()
    for thread in candidates:
        shaped = shape_thread(thread, sel)
        if shaped is None:
            if dropped is not None:
                dropped["thread:too_short"] += 1
            continue
        key = tuple(m.message_id for m in shaped)
        if key not in seen:  # cutting turns can make two leaf threads the same
            seen.add(key)
            yield shaped
