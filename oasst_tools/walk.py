"""Walk conversation trees: messages depth first, root-to-node threads, best-ranked and top-k threads.

Standard library only, so any project can `import oasst_tools.walk` without torch, polars or datasets.
Stacks instead of recursion: real trees are shallow, but generated or hostile ones need not be.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def iter_threads(root: Message) -> Iterator[Thread]:
    """Every root-to-node path, depth first, parents before children."""
    stack: list[Thread] = [(root,)]
    while stack:
        path = stack.pop()
        yield path
        stack.extend(path + (child,) for child in reversed(path[-1].replies))


def leaf_threads(root: Message) -> Iterator[Thread]:
    """Every root-to-leaf path, depth first."""
    return (path for path in iter_threads(root) if not path[-1].replies)


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
    stack: list[Thread] = [(root,)]
    while stack:
        path = stack.pop()
        children = ranked_replies(path[-1])[:k]
        if not children:
            yield path
        stack.extend(path + (child,) for child in reversed(children))


def depth(root: Message) -> int:
    """Number of messages on the longest root-to-leaf path."""
    best = 0
    stack = [(root, 1)]
    while stack:
        message, d = stack.pop()
        best = max(best, d)
        stack.extend((child, d + 1) for child in message.replies)
    return best
