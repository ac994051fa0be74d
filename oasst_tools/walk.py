"""Walk conversation trees: messages depth first, root-to-node threads, best-ranked and top-k threads.

Standard library only, so any project can `import oasst_tools.walk` without torch, polars or datasets.
Stacks instead of recursion: real trees are shallow, but generated or hostile ones need not be.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from oasst_tools.schema import Message

Thread = tuple[Message, ...]


def sibling_key(rank: int | None, created_date: str | None, message_id: str) -> tuple[bool, int, str, str]:
    """Rule 3's order of siblings, best first: ranked before unranked, then best rank, then oldest, then id. The one
    definition: `rank_key` (messages) and the build's selection on raw records (`filters.best_reply`) use it."""
    return (rank is None, rank if rank is not None else 0, created_date or "", message_id)


def rank_key(message: Message) -> tuple[bool, int, str, str]:
    """`sibling_key` of a message: sort replies with it, best first."""
    return sibling_key(message.rank, message.created_date, message.message_id)


def ranked_replies(message: Message) -> list[Message]:
    """The replies of `message`, best first by `rank_key`."""
    return sorted(message.replies, key=rank_key)


def iter_messages(root: Message) -> Iterator[Message]:
    """Every message of the subtree, depth first, parents before children, replies in input order."""
    stack = [root]
    while stack:
        message = stack.pop()
        yield message
        stack.extend(reversed(message.replies))


def _paths(root: Message, children: Callable[[Message], Sequence[Message]],
           keep: Callable[[Message, Sequence[Message]], bool]) -> Iterator[Thread]:
    """Root-to-node paths, depth first, of the nodes `keep(node, its children)` accepts.

    One shared path, cut back to each node's depth, so a chain of n messages costs O(n) plus what is yielded, not
    the O(n^2) of a new tuple per node.
    """
    path: list[Message] = []
    stack: list[tuple[Message, int]] = [(root, 0)]
    while stack:
        message, at = stack.pop()
        del path[at:]
        path.append(message)
        below = children(message)
        if keep(message, below):
            yield tuple(path)
        stack.extend((child, at + 1) for child in reversed(below))


def _replies(message: Message) -> Sequence[Message]:
    """The replies of `message` in input order."""
    return message.replies


def iter_threads(root: Message) -> Iterator[Thread]:
    """Every root-to-node path, depth first, parents before children."""
    return _paths(root, _replies, lambda _, __: True)


def path_to(message: Message, parents: dict[int, Message]) -> Thread:
    """The root-to-`message` path, through `parents` (`parent_map`): one message's path without walking them all."""
    path = [message]
    while id(path[-1]) in parents:
        path.append(parents[id(path[-1])])
    return tuple(reversed(path))


def parent_map(root: Message) -> dict[int, Message]:
    """Each message's parent, keyed by the `id()` of the message object (ids in hostile input need not be unique)."""
    return {id(child): message for message in iter_messages(root) for child in message.replies}


def leaf_threads(root: Message) -> Iterator[Thread]:
    """Every root-to-leaf path, depth first."""
    return _paths(root, _replies, lambda _, below: not below)


def best_thread(root: Message) -> Thread:
    """The thread that starts at `root` and steps to the best-ranked reply until a leaf."""
    path = [root]
    while path[-1].replies:
        path.append(min(path[-1].replies, key=rank_key))
    return tuple(path)


def top_k_threads(root: Message, k: int) -> Iterator[Thread]:
    """Root-to-leaf threads that take one of the `k` best-ranked replies at every step (k=1: `best_thread`)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return _paths(root, lambda message: ranked_replies(message)[:k], lambda _, below: not below)


def depth(root: Message) -> int:
    """Number of messages on the longest root-to-leaf path."""
    best = 0
    stack = [(root, 1)]
    while stack:
        message, d = stack.pop()
        best = max(best, d)
        stack.extend((child, d + 1) for child in message.replies)
    return best
