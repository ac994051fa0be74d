"""The Guanaco selection rules on real trees: exact threads for trees that exercise each rule."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oasst_tools.build import guanaco_text
from oasst_tools.filters import Selection, lang_matches, select_threads
from oasst_tools.read import read_trees
from tests.core.conftest import FLAT, NESTED, raw_records

RAW = raw_records(FLAT)
TREES = {t.message_tree_id: t for t in read_trees(FLAT)}


def ids(thread) -> list[str]:
    return [m.message_id[:8] for m in thread]


def only_thread(tree_id: str, sel: Selection = Selection()):
    (thread,) = select_threads(TREES[tree_id], sel)
    return thread


def expected_text(*prefixes: str) -> str:
    """The Guanaco text of messages named by id prefix, built from the raw records."""
    out = []
    for prefix in prefixes:
        (record,) = [r for mid, r in RAW.items() if mid.startswith(prefix)]
        out.append(("### Human: " if record["role"] == "prompter" else "### Assistant: ") + record["text"])
    return "".join(out)


def test_a_deleted_best_reply_is_dropped_with_its_subtree():
    # 46f5be28 (rank 0) survives but its only reply 8183f4d0 is deleted: the thread stops there,
    # it does not jump to the rank-1 branch.
    thread = only_thread("5c6a0593-e4ab-41e8-a23d-8244294fc12a")
    assert ids(thread) == ["5c6a0593", "46f5be28"]
    assert RAW[[m for m in RAW if m.startswith("8183f4d0")][0]]["deleted"] is True
    assert guanaco_text(thread) == expected_text("5c6a0593", "46f5be28")


def test_a_spam_reply_is_dropped_and_the_thread_ends_on_the_assistant_before_it():
    thread = only_thread("af41ec37-8558-4314-bfa5-29a9883f7530")
    assert ids(thread) == ["af41ec37", "8009b1fc", "1213b5c6", "f05f906e"]  # 2e6d52d2 ('hi') is spam
    assert guanaco_text(thread) == expected_text("af41ec37", "8009b1fc", "1213b5c6", "f05f906e")


def test_unranked_prompter_siblings_pick_the_oldest():
    thread = only_thread("75c98bff-568b-4cd8-b30b-6c8035fc2920")
    # five unranked prompter replies under 5337b427: 2b498092 (2023-01-27) is the oldest
    assert ids(thread) == ["75c98bff", "5337b427", "2b498092"]
    assert guanaco_text(thread) == expected_text("75c98bff", "5337b427", "2b498092")
    assert guanaco_text(thread).startswith("### Human: Why do we need AI assistants?### Assistant: ")


def test_a_thread_can_end_on_a_prompter_turn_or_be_trimmed_to_an_assistant_turn():
    thread = only_thread("bb5ae6b8-97b2-4464-b2b4-3c1f7adcb4fd")
    assert ids(thread) == ["bb5ae6b8", "141492b8", "4106f6b7"]
    assert thread[-1].role == "prompter"
    trimmed = only_thread("bb5ae6b8-97b2-4464-b2b4-3c1f7adcb4fd", Selection(end_with_assistant=True))
    assert ids(trimmed) == ["bb5ae6b8", "141492b8"]
    assert guanaco_text(trimmed) == expected_text("bb5ae6b8", "141492b8")


def test_label_limits_drop_failing_messages_with_subtrees_and_pass_messages_without_the_label():
    tree = TREES["5c6a0593-e4ab-41e8-a23d-8244294fc12a"]
    best = tree.prompt.replies[0]
    quality = best.labels["quality"]
    dropped: Counter[str] = Counter()
    thread = list(select_threads(tree, Selection(label_min={"quality": quality + 1e-9}), dropped))[0]
    assert best.message_id not in {m.message_id for m in thread}
    assert dropped["label_min:quality"] >= 1
    # A label that no message carries filters nothing.
    assert list(select_threads(tree, Selection(label_max={"no_such_label": 0.0}))) == list(
        select_threads(tree, Selection()))


def test_languages_match_regional_variants_unless_exact():
    assert lang_matches("pt-BR", frozenset({"pt"}))
    assert not lang_matches("pt-BR", frozenset({"pt"}), exact=True)
    assert lang_matches("pt-BR", frozenset({"pt-br"}), exact=True)
    assert not lang_matches("en", frozenset({"de", "pt"}))
    assert lang_matches("en", frozenset())
    assert not lang_matches(None, frozenset({"en"}))


def test_tree_state_and_language_drop_whole_trees():
    tree = next(iter(TREES.values()))
    dropped: Counter[str] = Counter()
    assert list(select_threads(tree, Selection(langs=frozenset({"de"})), dropped)) == []
    assert list(select_threads(tree, Selection(tree_states=frozenset({"growing"})), dropped)) == []
    assert dropped == {"tree:lang": 1, "tree:tree_state:ready_for_export": 1}


def test_synthetic_messages_can_be_dropped():
    trees = list(read_trees(NESTED))
    synthetic_roots = [t for t in trees if t.prompt.synthetic]
    assert synthetic_roots, "fixture must contain a synthetic root"
    kept = [t for t in trees if list(select_threads(t, Selection(drop_synthetic=True)))]
    assert len(kept) == len(trees) - len(synthetic_roots)


def test_all_threads_end_at_leaves_and_top_k_lies_between_top_rank_and_all():
    for tree in TREES.values():
        best = list(select_threads(tree, Selection()))
        top1 = list(select_threads(tree, Selection(mode="top-k", top_k=1)))
        top2 = list(select_threads(tree, Selection(mode="top-k", top_k=2)))
        every = list(select_threads(tree, Selection(mode="all-threads")))
        assert top1 == best
        as_set = lambda threads: {tuple(ids(t)) for t in threads}  # noqa: E731
        assert as_set(best) <= as_set(top2) <= as_set(every)
        assert all(not t[-1].replies for t in every)


@pytest.mark.parametrize("min_turns,max_turns", [(1, 2), (3, None), (2, 3)])
def test_turn_limits_cut_and_drop_threads(min_turns: int, max_turns: int | None):
    sel = Selection(mode="all-threads", min_turns=min_turns, max_turns=max_turns)
    for tree in TREES.values():
        threads = list(select_threads(tree, sel))
        assert all(min_turns <= len(t) <= (max_turns or 10**6) for t in threads)
        assert len({tuple(ids(t)) for t in threads}) == len(threads)  # cutting never duplicates rows


@given(st.lists(st.tuples(st.none() | st.integers(0, 3), st.sampled_from(["2023-01-02", "2023-01-01", None])),
                min_size=2, max_size=6))
def test_the_raw_best_reply_picks_the_message_the_rank_key_picks(replies: list[tuple[int | None, str | None]]):
    """`best_reply` (raw records) skips the key when one reply has rank 0; ties, unranked siblings and missing fields
    must still give what `min` by `rank_key` gives on the same replies as messages: one order for both paths."""
    from oasst_tools.filters import best_reply
    from oasst_tools.schema import Message
    from oasst_tools.walk import rank_key

    records = [{"message_id": f"m{i}", "rank": rank, "created_date": date} for i, (rank, date) in enumerate(replies)]
    for record in records:  # exports leave out null fields
        for name in ("rank", "created_date"):
            if record[name] is None and int(record["message_id"][1:]) % 2:
                del record[name]
    messages = [Message(message_id=r["message_id"], role="assistant", text="", rank=r.get("rank"),
                        created_date=r.get("created_date")) for r in records]
    assert best_reply(records)["message_id"] == min(messages, key=rank_key).message_id


@pytest.mark.parametrize(("fields", "expected"), [
    ({"langs": "en"}, "langs must be a set of strings (e.g. frozenset({'en'})), not 'en'"),  # was "e" and "n"
    ({"mode": "top_rank"}, "mode must be one of top-rank, all-threads, top-k, not 'top_rank'"),  # was all-threads
    ({"top_k": 0}, "top_k must be a whole number of at least 1, not 0"),
    ({"min_turns": None}, "min_turns must be a whole number of at least 1, not None"),
    ({"label_max": {"toxicity": "high"}}, "label_max must map label names to numbers, not {'toxicity': 'high'}"),
], ids=["langs-a-string", "mode-typo", "top-k-zero", "min-turns-none", "label-limit-text"])
def test_a_selection_a_library_caller_got_wrong_is_one_error_naming_the_field(fields: dict, expected: str) -> None:
    from oasst_tools.errors import OasstError

    with pytest.raises(OasstError) as err:
        Selection(**fields)
    assert str(err.value) == f"Selection: {expected}"


@pytest.mark.parametrize(("source", "on_error", "expected"), [
    (FLAT, "skpi", "on_error must be 'fail' or 'skip', not 'skpi'"),  # read as skip before
    (None, "fail", "source must be a path (str or os.PathLike) or a hub id, not None"),
    (b"in.jsonl", "fail", "source must be a path (str or os.PathLike) or a hub id, not b'in.jsonl'"),
], ids=["on-error-typo", "none", "bytes"])
def test_read_trees_refuses_what_is_no_source_or_mode(source: object, on_error: str, expected: str) -> None:
    from oasst_tools.errors import OasstError

    with pytest.raises(OasstError) as err:
        list(read_trees(source, on_error=on_error))  # type: ignore[arg-type]
    assert str(err.value) == expected
