"""What every reader yields and counts into: `RawTree` (one validated tree as its raw records), `ReadReport` (trees
and messages read; records skipped, orphaned or repeated), `OnError`, and the split a file name announces.

Apart from `read.py` because the flat and nested readers (`assemble.py`, `nested.py`) build these too, and `read.py`
imports those readers: kept here, below all of them, the imports run one way. `read.py` re-exports the public names.
Standard library only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from oasst_tools.dedup import IdRegistry
from oasst_tools.errors import OasstInputError
from oasst_tools.records import Item, make_message
from oasst_tools.schema import Message, Tree

OnError = Literal["fail", "skip"]
# A gzip stream that breaks mid-file: with on_error="skip", the input ends there and the cut is counted.
# Errors that end an input early: under on_error="skip" what came before is kept. After "trailing_gzip" (bytes
# after the last gzip member) every line before was whole, so the tree being read is kept too.
_CUT = frozenset(("truncated_gzip", "corrupt_gzip", "trailing_gzip"))
ORPHANS_KEPT = 100_000  # missing parents remembered for the split-tree check (a few MB at most)
_SPLIT_WORDS = (("validation", "validation"), ("valid", "validation"), ("test", "test"), ("train", "train"))


@dataclass
class ReadReport:
    """What the readers saw: counts of trees and messages, and what was dropped or skipped, by reason."""

    trees: int = 0
    messages: int = 0
    # Bad records or trees skipped with on_error="skip": one count per record or tree, by reason. A bad field
    # found while assembling a tree skips that whole tree; `skipped_messages` counts every message lost.
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_first: dict[str, str] = field(default_factory=dict)
    skipped_messages: int = 0
    # Messages whose parent is not in the input, dropped with their subtrees (not an error).
    orphaned: int = 0
    orphaned_first: str | None = None
    # The missing parents of orphaned messages -> where the first of their orphans is (path:line, message id); a
    # parent another input or tree holds means the inputs split a tree (`split_tree_error`). At most ORPHANS_KEPT.
    orphan_parents: dict[str, tuple[str, int | None, str]] = field(default_factory=dict)
    # Nested trees exported with `"prompt": null` (OASST2: the prompt was deleted), dropped whole (not an error).
    without_prompt: int = 0
    without_prompt_first: str | None = None
    # Tree and message ids read so far (every input of a build): one read twice is a duplicate.
    ids: IdRegistry = field(default_factory=IdRegistry, repr=False)

    def orphan(self, parent: str, path: str, line: int | None, message_id: str, messages: int) -> None:
        """Count one orphaned subtree of `messages` messages whose head `message_id` (at path:line) names a parent
        that its tree lacks."""
        self.orphaned += messages
        if self.orphaned_first is None:
            self.orphaned_first = (f"{path}:{line}: message {message_id} has an empty parent_id (a root's is null)"
                                   if parent == "" else
                                   f"{path}:{line}: message {message_id}'s parent {parent} is not in its tree there")
        if len(self.orphan_parents) < ORPHANS_KEPT:
            self.orphan_parents.setdefault(parent, (path, line, message_id))

    def split_tree_error(self) -> OasstInputError | None:
        """The first orphan whose missing parent was read after all, in another input or under another tree id: the
        inputs split one tree, and its replies were lost. None when every missing parent is missing everywhere."""
        for parent, (path, line, message_id) in self.orphan_parents.items():
            found = self.ids.tree_of(parent) if parent else None
            if found is not None:
                tree_id, where, at = found
                return OasstInputError(path, line, f"message {message_id}'s parent {parent} is in tree {tree_id} at "
                                       f"{where}:{at}: one tree's messages are split over inputs or tree ids, and "
                                       "its replies would be lost (give every message of a tree in one input, "
                                       "with one message_tree_id)", reason="split_tree")
        return None

    def settle_split_trees(self, on_error: OnError) -> None:
        """After the last input: raise `split_tree_error` (on_error="fail"), or count it as skipped (its replies
        were counted as orphans already)."""
        error = self.split_tree_error()
        if error is not None:
            if on_error == "fail":
                raise error
            self.skip(error, 0)

    def skip(self, exc: OasstInputError, messages: int = 1) -> None:
        """Count one skipped record or tree (of `messages` messages) under the error's reason."""
        self.skipped[exc.reason] += 1
        self.skipped_messages += messages
        self.skipped_first.setdefault(exc.reason, str(exc))

    def claim(self, tree_id: str, ids: Collection[str], line: int | None, on_error: OnError) -> None:
        """Register one tree's ids (`IdRegistry`); a repeat raises. Under on_error="skip" a repeated tree leaves no
        trace (it is skipped), and only the first one's error searches the inputs for the message's lines."""
        if on_error == "fail":
            self.ids.add(tree_id, ids, line)
        else:
            self.ids.claim(tree_id, ids, line, locate=not self.skipped.get("duplicate_tree"))


def split_of(name: str) -> str | None:
    """The split a file name announces (`validation-en.messages.jsonl` -> validation), or None."""
    stem = Path(name).name.lower()
    for word, split in _SPLIT_WORDS:
        if re.search(rf"(^|[^a-z]){word}([^a-z]|$)", stem):
            return split
    return None


@dataclass(slots=True)
class RawTree:
    """One validated tree as its raw records, the same from every reader: what `read_trees` turns into `Message`s,
    and what the build's fast path selects from directly (constructing 90k frozen messages costs more than parsing
    them)."""

    tree_id: str
    state: str | None
    split: str | None
    source: str
    root: str
    # message_id -> (line, parent id, record), parents before their replies; only the root's subtree (orphans
    # removed). The line is the tree's for a nested export.
    records: dict[str, Item]
    # message_id -> its reply records in input order (messages without replies are absent; entries under the
    # parents of orphans may remain, out of reach from the root).
    children: dict[str | None, list[dict[str, Any]]]
    # The records that rule 1 drops (`records.FLAG_REASON`), parents before their replies, found while the records
    # were checked, so the top-rank selection need not visit every message again.
    flagged: list[dict[str, Any]] = field(default_factory=list)
    # True when every record has exactly the JSON types (no float ranks or datetime dates from a table),
    # so the raw records can be compared and selected as they are.
    plain: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_tree(self) -> Tree:
        """The frozen `Tree`, built children first."""
        records, children, path = self.records, self.children, self.source
        built: dict[str, Message] = {}
        for node in reversed(records):
            line, _, record = records[node]
            kids = children.get(node)
            replies = tuple(built.pop(kid["message_id"]) for kid in kids) if kids else ()
            built[node] = make_message(record, path, line, replies)
        return Tree(message_tree_id=self.tree_id, prompt=built[self.root], tree_state=self.state, split=self.split,
                    source=path, extra=self.extra)
