"""Tree and message ids across everything one build reads: an id read twice is a duplicate.

One set of message ids for the whole build, merged tree by tree in C (`set.update` on the tree's own id set or
dict, whose hashes are already computed) with a size check: about 2% of a build, mostly the cache misses of a set
of 100,000 strings. (Appending ids to lists and checking them in batches cost more: each id is touched again once
cold; sets of their hashes cost more instructions and missed about as often.) The ids are also kept in order, so
the slow path can name where a repeated id was first read and, reading the inputs again where it can, both lines
of a repeated message.

    ids = IdRegistry()
    ids.add_source("a.jsonl", rereadable=True)
    ids.add(tree_id, message_ids, line)                  # raises OasstInputError(reason="duplicate_tree")
    ids.claim(tree_id, message_ids, line, locate=True)   # the same, but a repeat leaves no trace (the caller skips)

About 12 MB for 100,000 messages (the id strings, kept alive). Standard library only.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection
from pathlib import Path

from oasst_tools.errors import OasstInputError

_ADVICE = "--on-error skip keeps the first"


class IdRegistry:
    """The tree ids and message ids of every tree registered so far, with where each tree was read."""

    def __init__(self) -> None:
        # Inputs in reading order: (name, whether it can be read again, index of its first tree).
        self.sources: list[tuple[str, bool, int]] = []
        self.tree_ids: list[str] = []
        self._lines: list[int | None] = []
        self._ids: list[str] = []  # every message id, tree after tree
        self._ends: list[int] = []  # where each tree's ids end in `_ids`
        self._tree_seen: set[str] = set()
        self._id_seen: set[str] = set()

    def add_source(self, name: str, rereadable: bool) -> None:
        """Note an input about to be read: the places of its trees name it."""
        self.sources.append((name, rereadable, len(self.tree_ids)))

    def add(self, tree_id: str, ids: Collection[str], line: int | None) -> None:
        """Register a tree (read at `line` of the latest source) and its message ids, which must not repeat among
        themselves; raise `OasstInputError` (reason `duplicate_tree`) naming both places when the tree id or one of
        the message ids was registered before. For callers that stop at the error: the ids stay registered."""
        seen = self._id_seen
        size = len(seen)
        seen.update(ids)
        self.tree_ids.append(tree_id)
        self._lines.append(line)
        self._ids.extend(ids)
        self._ends.append(len(self._ids))
        if len(seen) - size != len(ids) or tree_id in self._tree_seen:
            raise self._repeat(len(self.tree_ids) - 1)
        self._tree_seen.add(tree_id)

    def claim(self, tree_id: str, ids: Collection[str], line: int | None, *, locate: bool = True) -> None:
        """`add`, but a repeat registers nothing: for callers that skip the tree and go on. `locate=False` spares
        the search for the lines of a repeated message (every skipped tree after the first)."""
        if tree_id in self._tree_seen:
            raise self._tree_error(tree_id, self._current(), line, self.tree_ids.index(tree_id))
        if not self._id_seen.isdisjoint(ids):
            dup = next(i for i in ids if i in self._id_seen)
            raise self._message_error(tree_id, self._current(), line, dup, locate)
        self.add(tree_id, ids, line)

    def tree_of(self, message_id: str) -> tuple[str, str, int | None] | None:
        """(tree id, source name, line) of the registered tree holding `message_id`, or None (the slow path: for
        the few ids the readers found no parent for)."""
        if message_id not in self._id_seen:
            return None
        tree = bisect.bisect_right(self._ends, self._ids.index(message_id))
        return (self.tree_ids[tree], *self._where(tree))

    # ------------------------------------------------------------------------------------------ the error path

    def _current(self) -> str:
        return self.sources[-1][0] if self.sources else "?"

    def _where(self, tree: int) -> tuple[str, int | None]:
        """(source name, line) of the tree registered at index `tree`."""
        starts = [start for _, _, start in self.sources]
        index = bisect.bisect_right(starts, tree) - 1
        return (self.sources[index][0] if index >= 0 else "?"), self._lines[tree]

    def _repeat(self, k: int) -> OasstInputError:
        """The error for registered tree `k`, which repeats the tree id or a message id of an earlier tree."""
        tree_id = self.tree_ids[k]
        path, line = self._where(k)
        if tree_id in self._tree_seen:
            return self._tree_error(tree_id, path, line, self.tree_ids.index(tree_id))
        start = self._ends[k - 1] if k else 0
        earlier = set(self._ids[:start])
        dup = next(i for i in self._ids[start:self._ends[k]] if i in earlier)
        return self._message_error(tree_id, path, line, dup, True)

    def _tree_error(self, tree_id: str, path: str, line: int | None, first: int) -> OasstInputError:
        where, at = self._where(first)
        return OasstInputError(path, line, f"tree {tree_id} was already read at {where}:{at} (the same tree twice; "
                               f"{_ADVICE})", reason="duplicate_tree")

    def _message_error(self, tree_id: str, path: str, line: int | None, dup: str, locate: bool) -> OasstInputError:
        first = bisect.bisect_right(self._ends, self._ids.index(dup))
        where, at = self._where(first)
        firstly = f"{where}:{at}"
        if locate:  # both lines of the message itself, where the inputs can be read again
            found = self._lines_of(dup)
            if len(found) > 1:
                firstly = found[0]
                path, _, number = found[1].rpartition(":")
                line = int(number)
        return OasstInputError(path, line, f"message {dup} of tree {tree_id} was already read at {firstly}, in tree "
                               f"{self.tree_ids[first]} (the same message twice; {_ADVICE})", reason="duplicate_tree")

    def _lines_of(self, message_id: str) -> list[str]:
        """`path:line` of the first two lines, in the inputs that can be read again, that hold `message_id` as a
        message's id."""
        import re

        from oasst_tools.lines import iter_lines  # late: the error path only

        pattern = re.compile(rb'"message_id"\s*:\s*"' + re.escape(message_id.encode("utf-8", "replace")) + rb'"')
        found: list[str] = []
        for name, rereadable, _ in self.sources:
            if not rereadable or name.endswith(".parquet"):
                continue
            try:
                lines = iter_lines(Path(name))
                try:
                    for number, raw in lines:
                        if pattern.search(raw):
                            found.append(f"{name}:{number}")
                            if len(found) == 2:
                                return found
                finally:
                    lines.close()  # type: ignore[attr-defined]
            except (OSError, OasstInputError):  # the lines are a nicety: the error stands without them
                continue
        return found
