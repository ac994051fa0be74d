"""Frozen dataclasses that match the OASST export: one `Message` per node, one `Tree` per conversation.

No I/O and no third-party imports: parsing lives in `read.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["prompter", "assistant"]
ROLES: frozenset[str] = frozenset(("prompter", "assistant"))


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation tree with its replies (a subtree)."""

    message_id: str
    role: Role
    text: str
    parent_id: str | None = None
    lang: str | None = None
    rank: int | None = None
    deleted: bool = False
    review_result: bool | None = None
    synthetic: bool = False
    created_date: str | None = None
    model_name: str | None = None
    review_count: int | None = None
    # Labels normalized to {name: value}, from either the columnar HF form or the export's dict form.
    labels: Mapping[str, float] = field(default_factory=dict)
    emojis: Mapping[str, int] = field(default_factory=dict)
    # Every other field of the input record (user_id, detoxify, events, ...), kept but not interpreted.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    replies: tuple[Message, ...] = ()
    # Where the record was read from, for error messages; not part of the data.
    line: int | None = field(default=None, compare=False, repr=False)

    def __hash__(self) -> int:
        """By id: the generated hash would hash the label and emoji dicts (TypeError); equal messages share an id."""
        return hash(self.message_id)

    def __repr__(self) -> str:
        """The fields, with replies as their count: the generated repr recursed through the whole subtree (a deep
        tree's repr raised RecursionError where every walk over it works)."""
        return (f"Message(message_id={self.message_id!r}, role={self.role!r}, text={self.text[:60]!r}, "
                f"rank={self.rank!r}, lang={self.lang!r}, replies=<{len(self.replies)}>)")


@dataclass(frozen=True, slots=True)
class Tree:
    """A conversation tree: the root prompt and the tree-level fields of the export."""

    message_tree_id: str
    prompt: Message
    tree_state: str | None = None
    # Input split the tree came from ("train", "validation", ...), when the input tells.
    split: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def lang(self) -> str | None:
        """Language of the root prompt (the tree's language, as Guanaco and OASST define it)."""
        return self.prompt.lang
