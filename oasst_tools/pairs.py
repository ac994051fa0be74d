"""Preference pairs from ranked sibling replies, for DPO-style training (`oasst build --pairs best|adjacent|all`).

    for pair in preference_pairs(tree, Selection(langs=frozenset({"en"})), "all"):
        row = pair_row(tree, pair)   # trl's conversational preference format: prompt, chosen, rejected, ...

The tree is pruned as `filters.select_threads` prunes it (tree state, root language, deleted and spam messages,
label filters and synthetic messages, each with its subtree). Then, for every surviving prompter message P, its
surviving replies that carry a rank are ordered by `walk.rank_key` (rank, created_date, message_id) and paired:

- `best`: the first with each of the others;
- `adjacent`: each with the next one;
- `all`: every two.

A pair is made only when the two ranks differ (the better rank is chosen): equal ranks say neither is preferred,
so a tie makes no pair in any mode (in `best`, a reply tied with the first is paired with nobody). A pair whose two
replies are the same text (stripped), or whose either reply is empty, is left out and counted (`pair:same_text`,
`pair:empty_reply`): there is nothing to prefer, and `oasst train --method dpo` and `oasst eval --tasks
guanaco_pairs` skip or refuse such rows. The prompt is the surviving path from the root to P. Standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from oasst_tools.conversation import chat_messages
from oasst_tools.filters import Selection, surviving_root
from oasst_tools.schema import Message, Tree
from oasst_tools.walk import Thread, iter_messages, parent_map, path_to, rank_key

PairMode = Literal["best", "adjacent", "all"]
PAIR_MODES: tuple[str, ...] = ("best", "adjacent", "all")
# How each surviving prompter message counted: it gave pairs, it had fewer than two ranked replies (a leaf, one
# reply, or replies without ranks), its ranked replies all share one rank, or its only pairs of differing ranks
# were left out (same text, or an empty reply).
PROMPT_OUTCOMES: tuple[str, ...] = ("paired", "fewer_than_two_ranked", "equal_ranks_only", "unusable_replies_only")


@dataclass(frozen=True, slots=True)
class Pair:
    """One preference pair: the conversation up to a prompt, a better-ranked reply to it and a worse-ranked one."""

    prompt: Thread  # root .. P, surviving messages only; P (a prompter message) last
    chosen: Message
    rejected: Message


def ranked_pairs(replies: Sequence[Message], mode: PairMode) -> list[tuple[Message, Message]]:
    """(chosen, rejected) among `replies` that carry a rank, ordered by `rank_key`; equal ranks make no pair."""
    ranked = sorted((r for r in replies if r.rank is not None), key=rank_key)
    if mode == "best":
        return [(ranked[0], r) for r in ranked[1:] if r.rank != ranked[0].rank]
    if mode == "adjacent":
        return [(a, b) for a, b in zip(ranked, ranked[1:]) if a.rank != b.rank]
    if mode == "all":
        return [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a.rank != b.rank]
    raise ValueError(f"pair mode {mode!r}: expected one of {', '.join(PAIR_MODES)}")


def preference_pairs(tree: Tree, sel: Selection, mode: PairMode, dropped: Counter[str] | None = None,
                     prompts: Counter[str] | None = None) -> list[Pair]:
    """The pairs of one tree, prompts depth first; counts drops in `dropped`, prompts by outcome in `prompts`."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode {mode!r}: expected one of {', '.join(PAIR_MODES)}")
    root = surviving_root(tree, sel, dropped)
    if root is None:
        return []
    pairs: list[Pair] = []
    # Only prompts that give pairs get their path built: a path per message is quadratic on a deep chain.
    parents = parent_map(root)
    for prompt in iter_messages(root):
        if prompt.role != "prompter":
            continue
        if sum(r.rank is not None for r in prompt.replies) < 2:
            if prompts is not None:
                prompts["fewer_than_two_ranked"] += 1
            continue
        ranked_found = ranked_pairs(prompt.replies, mode)
        found = []
        for chosen, rejected in ranked_found:
            why = unusable_pair(chosen.text, rejected.text)
            if why is None:
                found.append((chosen, rejected))
            elif dropped is not None:
                dropped[f"pair:{why}"] += 1
        if found:
            path = path_to(prompt, parents)
            pairs.extend(Pair(path, chosen, rejected) for chosen, rejected in found)
        if prompts is not None:
            prompts["paired" if found else "unusable_replies_only" if ranked_found else "equal_ranks_only"] += 1
    return pairs


def unusable_pair(chosen: str, rejected: str) -> str | None:
    """Why two reply texts make no preference pair (`empty_reply`, `same_text`), or None when they do."""
    if not chosen.strip() or not rejected.strip():
        return "empty_reply"
    return "same_text" if chosen.strip() == rejected.strip() else None


def pair_row(tree: Tree, pair: Pair) -> dict[str, Any]:
    """One output row in trl's conversational preference format, with the ids and ranks it came from."""
    return {
        "prompt": chat_messages((m.role, m.text) for m in pair.prompt),
        "chosen": chat_messages([(pair.chosen.role, pair.chosen.text)]),
        "rejected": chat_messages([(pair.rejected.role, pair.rejected.text)]),
        "prompt_id": pair.prompt[-1].message_id,
        "chosen_id": pair.chosen.message_id,
        "rejected_id": pair.rejected.message_id,
        "chosen_rank": pair.chosen.rank,
        "rejected_rank": pair.rejected.rank,
        "message_tree_id": tree.message_tree_id,
        "lang": tree.prompt.lang,
    }
