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


def _reference_paths(root: Message, children, keep) -> list[tuple[str, ...]]:
    """Recursive reference walk: a new tuple per node (fine on the small random trees below)."""
    out: list[tuple[str, ...]] = []

    def visit(message: Message, path: tuple[str, ...]) -> None:
        path = (*path, message.message_id)
        below = children(message)
        if keep(message, below):
            out.append(path)
        for child in below:
            visit(child, path)

    visit(root, ())
    return out


def _random_tree(seed: int) -> Message:
    import random

    rng = random.Random(seed)
    counter = iter(range(10**6))

    def grow(role: str, level: int) -> Message:
        n = rng.choice([0, 1, 1, 2, 3]) if level < 6 else 0
        other = "assistant" if role == "prompter" else "prompter"
        replies = tuple(grow(other, level + 1) for _ in range(n))
        rank = rng.choice([None, 0, 1, 2]) if role == "assistant" else None
        return msg(f"m{next(counter)}", role, *replies, rank=rank, date=f"2023-0{rng.randint(1, 9)}")

    return grow("prompter", 0)


def test_every_walk_yields_what_a_new_tuple_per_node_walk_yields_on_random_trees() -> None:
    """The walks share one path list cut back per depth: each yielded thread must still be its own, complete path,
    in the same depth-first order as the plain recursive walk, for all nodes, leaves and top-k; `path_to` through
    `parent_map` gives the same path as the walk."""
    from oasst_tools.walk import parent_map, path_to, ranked_replies

    for seed in range(40):
        root = _random_tree(seed)

        def ids(threads) -> list[tuple[str, ...]]:
            return [tuple(m.message_id for m in t) for t in threads]

        assert ids(iter_threads(root)) == _reference_paths(root, lambda m: m.replies, lambda m, b: True)
        assert ids(leaf_threads(root)) == _reference_paths(root, lambda m: m.replies, lambda m, b: not b)
        parents = parent_map(root)
        assert ids(path_to(path[-1], parents) for path in iter_threads(root)) == ids(iter_threads(root))
        for k in (1, 2, 3):
            assert ids(top_k_threads(root, k)) == _reference_paths(
                root, lambda m, k=k: ranked_replies(m)[:k], lambda m, b: not b)
        assert ids(top_k_threads(root, 1)) == ids([best_thread(root)])


def test_threads_of_a_200k_deep_chain_take_linear_time() -> None:
    """A new path tuple per node made --all-threads, --top-k and --pairs quadratic in depth (a 200,000-message chain
    ran for minutes); linear they take about a second. Run in a child process so a regression fails, not hangs."""
    code = (
        "from oasst_tools.schema import Message, Tree\n"
        "from oasst_tools.walk import leaf_threads, top_k_threads, parent_map, path_to\n"
        "from oasst_tools.filters import Selection\n"
        "from oasst_tools.pairs import preference_pairs\n"
        "from collections import Counter\n"
        "node = Message('leaf', 'assistant', 'x', rank=0)\n"
        "for i in range(200_000):\n"
        "    node = Message(f'n{i}', 'prompter' if i % 2 == 0 else 'assistant', 'x', rank=0, replies=(node,))\n"
        "assert [len(t) for t in leaf_threads(node)] == [200_001]\n"
        "assert [len(t) for t in top_k_threads(node, 2)] == [200_001]\n"
        "assert len(path_to(next(iter(leaf_threads(node)))[-1], parent_map(node))) == 200_001\n"
        "prompts = Counter()\n"
        "tree = Tree('t', node, tree_state='ready_for_export')\n"
        "assert preference_pairs(tree, Selection(langs=frozenset()), 'all', prompts=prompts) == []\n"
        "print(dict(prompts))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'fewer_than_two_ranked': 100000}"
