"""Property tests on random forests: thread invariants, and flat and nested readers agreeing."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oasst_tools.filters import Selection, drop_reason, prune, select_threads
from oasst_tools.read import read_trees
from oasst_tools.walk import iter_messages, rank_key
from tests.core.conftest import assert_fast_path_agrees
from tests.core.test_read import as_messages


@st.composite
def forests(draw) -> list[dict]:
    """Nested OASST-style trees with alternating roles, random ranks, deletions, spam and dates."""
    counter = iter(range(10**9))
    trees = []
    for _ in range(draw(st.integers(1, 4))):
        def node(role: str, depth: int, parent: str | None) -> dict:
            mid = f"m{next(counter):05d}"
            child_role = "assistant" if role == "prompter" else "prompter"
            n = draw(st.integers(0, 3)) if depth < 5 else 0
            ranked = draw(st.booleans()) and role == "prompter"  # prompter replies are never ranked
            ranks = draw(st.permutations(list(range(n)))) if ranked else [None] * n
            replies = [node(child_role, depth + 1, mid) for _ in range(n)]
            for reply, rank in zip(replies, ranks):
                reply["rank"] = rank
            return {
                "message_id": mid, "parent_id": parent, "role": role, "text": f"text {mid}", "lang": "en",
                "rank": None, "deleted": draw(st.booleans()) and draw(st.booleans()),
                "review_result": draw(st.sampled_from([True, True, True, None, False])),
                "synthetic": False, "created_date": f"2023-01-{draw(st.integers(1, 28)):02d}",
                "labels": {"toxicity": {"value": draw(st.floats(0, 1)), "count": 3}},
                "replies": replies,
            }

        root = node("prompter", 0, None)
        trees.append({"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root})
    return trees


def write_both(trees: list[dict], folder: Path) -> tuple[Path, Path]:
    nested = folder / "f.trees.jsonl.gz"
    flat = folder / "f.jsonl"
    with gzip.open(nested, "wt") as fh:
        fh.writelines(json.dumps(t) + "\n" for t in trees)
    with flat.open("w") as fh:
        for tree in trees:
            stack = [tree["prompt"]]
            while stack:
                node = stack.pop()
                record = {k: v for k, v in node.items() if k != "replies"}
                record["labels"] = {"name": list(node["labels"]), "value": [v["value"] for v in node["labels"].values()],
                                    "count": [v["count"] for v in node["labels"].values()]}
                record.update(message_tree_id=tree["message_tree_id"], tree_state=tree["tree_state"])
                fh.write(json.dumps(record) + "\n")
                stack.extend(reversed(node["replies"]))
    return flat, nested


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests())
def test_flat_and_nested_readers_agree_on_random_forests(trees: list[dict]):
    with tempfile.TemporaryDirectory() as tmp:
        flat, nested = write_both(trees, Path(tmp))
        from_flat, from_nested = list(read_trees(flat)), list(read_trees(nested))
        assert from_flat == from_nested
        assert as_messages(from_flat) == as_messages(from_nested)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests(), st.floats(0.2, 1.0))
def test_top_rank_threads_follow_the_best_surviving_child_to_a_leaf(trees: list[dict], max_toxicity: float):
    sel = Selection(label_max={"toxicity": max_toxicity})
    with tempfile.TemporaryDirectory() as tmp:
        flat, _ = write_both(trees, Path(tmp))
        for tree in read_trees(flat):
            threads = list(select_threads(tree, sel))
            pruned = prune(tree.prompt, sel)
            if pruned is None:
                assert threads == []
                continue
            (thread,) = threads
            assert thread[0].message_id == tree.prompt.message_id  # starts at the root
            assert all(a.role != b.role for a, b in zip(thread, thread[1:]))  # alternates
            assert all(drop_reason(m, sel) is None for m in thread)  # only surviving messages
            for parent, child in zip(thread, thread[1:]):
                survivors = [r for r in parent.replies if drop_reason(r, sel) is None]
                assert child.message_id == min(survivors, key=rank_key).message_id  # the best survivor
            assert not thread[-1].replies  # ends at a leaf of the pruned tree
            leaves = {m.message_id for m in iter_messages(pruned) if not m.replies}
            assert thread[-1].message_id in leaves


@settings(max_examples=40, deadline=None)
@given(forests())
def test_every_all_threads_row_is_a_distinct_surviving_root_to_leaf_path(trees: list[dict]):
    with tempfile.TemporaryDirectory() as tmp:
        flat, _ = write_both(trees, Path(tmp))
        for tree in read_trees(flat):
            pruned = prune(tree.prompt, Selection())
            threads = list(select_threads(tree, Selection(mode="all-threads")))
            n_leaves = 0 if pruned is None else sum(1 for m in iter_messages(pruned) if not m.replies)
            assert len(threads) == n_leaves
            assert len({tuple(m.message_id for m in t) for t in threads}) == len(threads)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests(), st.builds(
    Selection,
    label_max=st.dictionaries(st.just("toxicity"), st.floats(0, 1), max_size=1),
    label_min=st.dictionaries(st.just("toxicity"), st.floats(0, 1), max_size=1),
    end_with_assistant=st.booleans(), min_turns=st.integers(1, 4), max_turns=st.none() | st.integers(1, 5),
))
def test_the_build_fast_path_selects_exactly_what_the_library_selects(trees: list[dict], sel: Selection):
    from oasst_tools.read import iter_raw_trees

    with tempfile.TemporaryDirectory() as tmp:
        flat, nested = write_both(trees, Path(tmp))
        for source in (flat, nested):
            for raw in iter_raw_trees(source):
                assert_fast_path_agrees([raw], sel)


def test_the_build_fast_path_agrees_with_the_library_on_the_real_validation_trees():
    from oasst_tools.read import iter_raw_trees
    from tests.core.conftest import FLAT_FULL, NESTED_FULL

    for source in (FLAT_FULL, NESTED_FULL):
        for sel in (Selection(), Selection(end_with_assistant=True, label_max={"toxicity": 0.4})):
            assert_fast_path_agrees(iter_raw_trees(source), sel)
