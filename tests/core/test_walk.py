"""The walker: traversal orders, best-ranked and top-k threads, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

from oasst_tools.schema import Message
from oasst_tools.walk import best_thread, depth, iter_messages, iter_threads, leaf_threads, rank_key, top_k_threads


def msg(mid: str, role: str, *replies: Message, rank: int | None = None, date: str = "2023") -> Message:
    return Message(message_id=mid, role=role, text=mid, rank=rank, created_date=date, replies=tuple(replies))


TREE = msg(
    "r", "prompter",
    msg("a1", "assistant", msg("p1", "prompter", date="2023-03"), msg("p2", "prompter", date="2023-01"), rank=1),
    msg("a0", "assistant", rank=0),
    msg("a_unranked", "assistant", msg("p3", "prompter")),
)


def test_iter_messages_is_depth_first_parents_before_children_in_input_order():
    assert [m.message_id for m in iter_messages(TREE)] == ["r", "a1", "p1", "p2", "a0", "a_unranked", "p3"]


def test_iter_threads_yields_every_root_to_node_path_depth_first():
    paths = [[m.message_id for m in t] for t in iter_threads(TREE)]
    assert paths == [["r"], ["r", "a1"], ["r", "a1", "p1"], ["r", "a1", "p2"], ["r", "a0"],
                     ["r", "a_unranked"], ["r", "a_unranked", "p3"]]


def test_leaf_threads_end_at_leaves():
    assert [[m.message_id for m in t][-1] for t in leaf_threads(TREE)] == ["p1", "p2", "a0", "p3"]


def test_best_thread_takes_ranked_before_unranked_then_rank_then_oldest():
    assert [m.message_id for m in best_thread(TREE)] == ["r", "a0"]
    sub = TREE.replies[0]  # a1's prompter replies are unranked: the oldest (p2) wins
    assert [m.message_id for m in best_thread(sub)] == ["a1", "p2"]
    assert sorted(TREE.replies, key=rank_key)[-1].message_id == "a_unranked"


def test_top_k_one_is_the_best_thread_and_k_widens_by_rank():
    assert [tuple(m.message_id for m in t) for t in top_k_threads(TREE, 1)] == [("r", "a0")]
    assert [tuple(m.message_id for m in t) for t in top_k_threads(TREE, 2)] == [
        ("r", "a0"), ("r", "a1", "p2"), ("r", "a1", "p1")]


def test_depth_counts_messages_on_the_longest_path():
    assert depth(TREE) == 3
    assert depth(msg("x", "prompter")) == 1


def test_deep_trees_do_not_hit_the_recursion_limit():
    node = msg("leaf", "assistant")
    for i in range(5000):
        node = msg(f"n{i}", "prompter" if i % 2 == 0 else "assistant", node)
    assert len(best_thread(node)) == 5001
    assert depth(node) == 5001


def test_importing_the_library_and_walking_trees_does_not_import_heavy_packages():
    code = (
        "import sys, oasst_tools, oasst_tools.walk, oasst_tools.read, oasst_tools.filters, oasst_tools.build\n"
        "from oasst_tools.read import read_trees\n"
        "from oasst_tools.walk import best_thread\n"
        "n = sum(len(best_thread(t.prompt)) for t in read_trees(sys.argv[1]))\n"
        "assert n > 0\n"
        "print(sorted(m for m in ('torch', 'polars', 'datasets', 'transformers') if m in sys.modules))\n"
    )
    from tests.core.conftest import FLAT  # noqa: PLC0415 - path only

    out = subprocess.run([sys.executable, "-c", code, str(FLAT)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_oasst_build_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from oasst_tools.cli import main\n"
        "try:\n    main(['build', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'polars' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
    assert "--top-rank" in out.stdout


def test_a_message_hashes_by_id_and_a_deep_chain_has_a_short_repr() -> None:
    """The generated hash hashed the label dicts (TypeError); the generated repr recursed through the subtree."""
    from oasst_tools.schema import Message

    message = Message("leaf", "assistant", "y", labels={"quality": 0.5})
    for i in range(20_000):
        message = Message(f"m{i}", "prompter" if i % 2 == 0 else "assistant", "x", replies=(message,))
    assert len({message, message}) == 1 and hash(message) == hash("m19999")
    assert repr(message) == ("Message(message_id='m19999', role='assistant', text='x', rank=None, lang=None, "
                             "replies=<1>)")
