"""Counts over a forest of trees: trees, messages, states, languages, roles, depth and branching."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from oasst_tools.schema import Tree
from oasst_tools.walk import depth, iter_messages


@dataclass
class ForestStats:
    """What `oasst stats` reports."""

    trees: int = 0
    messages: int = 0
    states: Counter[str] = field(default_factory=Counter)
    tree_langs: Counter[str] = field(default_factory=Counter)
    message_langs: Counter[str] = field(default_factory=Counter)
    roles: Counter[str] = field(default_factory=Counter)
    flags: Counter[str] = field(default_factory=Counter)
    depths: Counter[int] = field(default_factory=Counter)
    # Number of replies per message that has any, keyed by count.
    branching: Counter[int] = field(default_factory=Counter)
    leaves: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (counters sorted by key)."""
        out: dict[str, Any] = {"trees": self.trees, "messages": self.messages, "leaves": self.leaves}
        for name in ("states", "tree_langs", "message_langs", "roles", "flags", "depths", "branching"):
            counter = getattr(self, name)
            out[name] = {str(k): v for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))}
        return out


def forest_stats(trees: Iterable[Tree]) -> ForestStats:
    """Count trees, messages, states, languages, roles, flags, depth and branching in one pass."""
    stats = ForestStats()
    for tree in trees:
        stats.trees += 1
        stats.states[tree.tree_state or "unknown"] += 1
        stats.tree_langs[tree.prompt.lang or "unknown"] += 1
        stats.depths[depth(tree.prompt)] += 1
        for message in iter_messages(tree.prompt):
            stats.messages += 1
            stats.roles[message.role] += 1
            stats.message_langs[message.lang or "unknown"] += 1
            if message.deleted:
                stats.flags["deleted"] += 1
            if message.review_result is False:
                stats.flags["spam"] += 1
            if message.synthetic:
                stats.flags["synthetic"] += 1
            if message.rank is not None:
                stats.flags["ranked"] += 1
            if message.replies:
                stats.branching[len(message.replies)] += 1
            else:
                stats.leaves += 1
    return stats
