"""Preference pairs (`oasst build --pairs`, `pairs.preference_pairs`): exact pairs on real trees, agreement with an
independent re-derivation of the rules on the whole English validation file and on random forests, and the CLI."""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oasst_tools.build import hash_split
from oasst_tools.filters import Selection, select_threads
from oasst_tools.pairs import PAIR_MODES, Pair, preference_pairs
from oasst_tools.read import read_trees
from tests.core.conftest import FLAT, FLAT_FULL, NESTED_FULL, read_jsonl
from tests.core.test_properties import forests, write_both

EN = Selection(langs=frozenset({"en"}))
Triple = tuple[str, str, str]

# ------------------------------------------------------------------------------------------ the reference


def flat_records(path: Path) -> list[dict[str, Any]]:
    """Every message of a flat or nested export as a flat record, labels as {name: value}."""
    out = []
    for row in read_jsonl(path):
        if "prompt" not in row:  # flat HF layout: columnar labels
            labels = row.get("labels") or {"name": [], "value": []}
            out.append({**row, "labels": dict(zip(labels["name"], labels["value"]))})
            continue
        stack = [(row["prompt"], None)]
        while stack:
            node, parent = stack.pop()
            out.append({**{k: v for k, v in node.items() if k != "replies"}, "parent_id": parent,
                        "message_tree_id": row["message_tree_id"], "tree_state": row.get("tree_state"),
                        "labels": {k: v["value"] for k, v in (node.get("labels") or {}).items()}})
            stack.extend((reply, node["message_id"]) for reply in node.get("replies", ()))
    return out


def reference_pairs(records: list[dict[str, Any]], mode: str, lang: str | None = "en",
                    drop: Callable[[dict[str, Any]], bool] = lambda r: False) -> tuple[dict[Triple, str],
                                                                                       dict[str, Counter[str]]]:
    """The rules re-derived from raw records: (prompt, chosen, rejected) -> tree id, and prompt outcomes per tree."""
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        children[record["parent_id"]].append(record)

    def gone(record: dict[str, Any]) -> bool:
        return bool(record.get("deleted")) or record.get("review_result") is False or drop(record)

    pairs: dict[Triple, str] = {}
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for root in children[None]:  # an orphan's parent is missing: it is never reached from a root
        if root.get("tree_state") not in (None, "ready_for_export") or gone(root):
            continue
        if lang is not None and root.get("lang") != lang:
            continue
        tree = root["message_tree_id"]
        todo = [root]
        while todo:
            node = todo.pop()
            kept = [kid for kid in children[node["message_id"]] if not gone(kid)]
            todo.extend(kept)
            if node["role"] != "prompter":
                continue
            ranked = sorted((kid for kid in kept if kid.get("rank") is not None),
                            key=lambda r: (r["rank"], r.get("created_date") or "", r["message_id"]))
            if mode == "best":
                found = [(ranked[0], r) for r in ranked if r["rank"] > ranked[0]["rank"]]
            elif mode == "adjacent":
                found = [(a, b) for i, a in enumerate(ranked[:-1]) for b in ranked[i + 1:i + 2]
                         if b["rank"] > a["rank"]]
            else:
                found = [(a, b) for a in ranked for b in ranked if a["rank"] < b["rank"]]
            # Two replies of one text, or an empty one: nothing to prefer.
            usable = [(a, b) for a, b in found
                      if a["text"].strip() and b["text"].strip() and a["text"].strip() != b["text"].strip()]
            for a, b in usable:
                pairs[(node["message_id"], a["message_id"], b["message_id"])] = tree
            outcome = ("paired" if usable else "unusable_replies_only" if found else
                       "fewer_than_two_ranked" if len(ranked) < 2 else "equal_ranks_only")
            outcomes[tree][outcome] += 1
    return pairs, outcomes


def triples(pairs: Iterable[Pair]) -> set[Triple]:
    return {(p.prompt[-1].message_id, p.chosen.message_id, p.rejected.message_id) for p in pairs}


def row_triples(rows: Iterable[dict[str, Any]]) -> set[Triple]:
    return {(r["prompt_id"], r["chosen_id"], r["rejected_id"]) for r in rows}


def short(found: set[Triple]) -> set[Triple]:
    return {(a[:8], b[:8], c[:8]) for a, b, c in found}


FLAT_TREES = {t.message_tree_id[:8]: t for t in read_trees(FLAT)}
FULL = flat_records(FLAT_FULL)

# ------------------------------------------------------------------------------------------ exact pairs


def test_a_deleted_ranked_reply_leaves_its_prompt_unpaired_and_depth_three_prompts_pair() -> None:
    # af41ec37: root -> 8009b1fc (rank 0) / 806736d2 (rank 1). At depth 3, 1213b5c6 has f05f906e (rank 0) and the
    # deleted cb29944e (rank 1): one ranked reply survives, no pair. 3993485b (depth 3) has one unranked reply.
    tree = FLAT_TREES["af41ec37"]
    for mode in PAIR_MODES:
        prompts: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        assert short(triples(preference_pairs(tree, EN, mode, dropped, prompts))) == {
            ("af41ec37", "8009b1fc", "806736d2")}
        assert prompts == {"paired": 1, "fewer_than_two_ranked": 2}  # 2e6d52d2 (spam) is no prompt any more
        assert dropped == {"deleted": 2, "spam": 1}


EXPECTED_835 = {
    "best": {("835d3696", "842b9fb4", "33d0467b"), ("835d3696", "842b9fb4", "be75c6e7"),
             ("99d9d764", "070f9dec", "2944268d"), ("99d9d764", "070f9dec", "e579f57b"),
             ("10733e48", "6f391218", "62d5213a")},
    "adjacent": {("835d3696", "842b9fb4", "33d0467b"), ("835d3696", "33d0467b", "be75c6e7"),
                 ("99d9d764", "070f9dec", "2944268d"), ("99d9d764", "2944268d", "e579f57b"),
                 ("10733e48", "6f391218", "62d5213a")},
    "all": {("835d3696", "842b9fb4", "33d0467b"), ("835d3696", "842b9fb4", "be75c6e7"),
            ("835d3696", "33d0467b", "be75c6e7"), ("99d9d764", "070f9dec", "2944268d"),
            ("99d9d764", "070f9dec", "e579f57b"), ("99d9d764", "2944268d", "e579f57b"),
            ("10733e48", "6f391218", "62d5213a")},
}


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_a_spam_unranked_sibling_is_dropped_and_deep_prompts_pair_by_mode(mode: str) -> None:
    # 835d3696: the root's replies are ranked 0, 1, 2 plus b88de7ae (spam, unranked); 99d9d764 (depth 3) has three
    # ranked replies; 10733e48 (depth 5) has two; 90ed9267 (depth 5) is a leaf.
    prompts: Counter[str] = Counter()
    found = preference_pairs(FLAT_TREES["835d3696"], EN, mode, None, prompts)  # type: ignore[arg-type]
    assert short(triples(found)) == EXPECTED_835[mode]
    assert prompts == {"paired": 3, "fewer_than_two_ranked": 1}
    assert all(p.chosen.rank < p.rejected.rank for p in found)  # type: ignore[operator]
    deep = next(p for p in found if p.prompt[-1].message_id.startswith("10733e48"))
    assert [m.message_id[:8] for m in deep.prompt] == ["835d3696", "be75c6e7", "99d9d764", "e579f57b", "10733e48"]


def test_a_surviving_unranked_reply_makes_no_pair(tmp_path: Path) -> None:
    # The same tree with the spam flag of the unranked b88de7ae cleared (unreviewed): it survives, pairs do not move.
    lines = [json.loads(line) for line in FLAT.read_text().splitlines()]
    tree_lines = [r for r in lines if r["message_tree_id"].startswith("835d3696")]
    for record in tree_lines:
        if record["message_id"].startswith("b88de7ae"):
            record["review_result"] = None
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tree_lines))
    (tree,) = read_trees(tmp_path / "t.jsonl")
    assert any(m.message_id.startswith("b88de7ae") for t in select_threads(tree, Selection(mode="all-threads"))
               for m in t)
    for mode in PAIR_MODES:
        assert short(triples(preference_pairs(tree, EN, mode))) == EXPECTED_835[mode]  # type: ignore[arg-type]


def test_equal_ranks_make_no_pair_in_any_mode(tmp_path: Path) -> None:
    # No real tree has tied ranks: tie 33d0467b (rank 1) with 842b9fb4 (rank 0, older), then tie all three.
    lines = [json.loads(line) for line in FLAT.read_text().splitlines()]
    tree_lines = [r for r in lines if r["message_tree_id"].startswith("835d3696")]
    for record in tree_lines:
        if record["message_id"].startswith("33d0467b"):
            record["rank"] = 0
    (tmp_path / "tie.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tree_lines))
    (tree,) = read_trees(tmp_path / "tie.jsonl")

    def at_root(mode: str) -> set[Triple]:
        return {t for t in short(triples(preference_pairs(tree, EN, mode))) if t[0] == "835d3696"}  # type: ignore

    assert at_root("best") == {("835d3696", "842b9fb4", "be75c6e7")}  # 33d0467b ties the first: paired with nobody
    assert at_root("adjacent") == {("835d3696", "33d0467b", "be75c6e7")}
    assert at_root("all") == {("835d3696", "842b9fb4", "be75c6e7"), ("835d3696", "33d0467b", "be75c6e7")}
    for record in tree_lines:
        if record["message_id"].startswith("be75c6e7"):
            record["rank"] = 0
    (tmp_path / "tie.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tree_lines))
    (tree,) = read_trees(tmp_path / "tie.jsonl")
    prompts: Counter[str] = Counter()
    for mode in PAIR_MODES:
        assert at_root(mode) == set()
    preference_pairs(tree, EN, "all", None, prompts)
    assert prompts == {"paired": 2, "fewer_than_two_ranked": 1, "equal_ranks_only": 1}


def test_an_empty_reply_or_two_of_one_text_make_no_pair(tmp_path: Path) -> None:
    """Nothing to prefer: `oasst train --method dpo` would learn nothing from them, eval's guanaco_pairs skips them."""
    lines = [json.loads(line) for line in FLAT.read_text().splitlines()]
    tree_lines = [r for r in lines if r["message_tree_id"].startswith("835d3696")]
    texts = {r["message_id"][:8]: r for r in tree_lines}
    texts["be75c6e7"]["text"] = " \n"  # ranked last at the root
    texts["33d0467b"]["text"] = texts["842b9fb4"]["text"] + " "  # the second ranked: the first's text again
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tree_lines))
    (tree,) = read_trees(tmp_path / "odd.jsonl")
    dropped: Counter[str] = Counter()
    prompts: Counter[str] = Counter()
    found = short(triples(preference_pairs(tree, EN, "all", dropped, prompts)))
    assert not {t for t in found if t[0] == "835d3696"}
    assert dropped["pair:empty_reply"] == 2 and dropped["pair:same_text"] == 1
    assert prompts["unusable_replies_only"] == 1


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pair mode 'worst': expected one of best, adjacent, all"):
        preference_pairs(FLAT_TREES["835d3696"], EN, "worst")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_the_library_gives_the_reference_pairs_on_the_whole_english_validation_file(mode: str) -> None:
    expected, outcomes = reference_pairs(FULL, mode)
    prompts: Counter[str] = Counter()
    found = [p for tree in read_trees(FLAT_FULL) for p in preference_pairs(tree, EN, mode, None, prompts)]
    assert triples(found) == set(expected) and len(found) == len(expected)
    assert prompts == sum(outcomes.values(), Counter())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests(), st.data(), st.sampled_from(PAIR_MODES))
def test_the_library_gives_the_reference_pairs_on_random_forests_with_ties(trees: list[dict], data: st.DataObject,
                                                                           mode: str) -> None:
    for tree in trees:  # ranks redrawn with ties and unranked replies beside ranked ones
        stack = [tree["prompt"]]
        while stack:
            node = stack.pop()
            for reply in node["replies"]:
                if reply["role"] == "assistant":
                    reply["rank"] = data.draw(st.none() | st.integers(0, 2))
                stack.append(reply)
    with tempfile.TemporaryDirectory() as tmp:
        flat, nested = write_both(trees, Path(tmp))
        expected, outcomes = reference_pairs(flat_records(flat), mode)
        for source in (flat, nested):
            prompts: Counter[str] = Counter()
            found = [p for t in read_trees(source)
                     for p in preference_pairs(t, EN, mode, None, prompts)]  # type: ignore[arg-type]
            assert triples(found) == set(expected) and len(found) == len(expected)
            assert prompts == sum(outcomes.values(), Counter())


# ------------------------------------------------------------------------------------------ oasst build --pairs

COUNTS = {"best": 710, "adjacent": 711, "all": 1021}  # pairs of the English validation file (README.md)


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_build_writes_the_reference_pairs_of_the_english_validation_file(run, tmp_path: Path, mode: str) -> None:
    result = run("build", "--input", FLAT_FULL, "--lang", "en", "--pairs", mode, "--out", "out")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    expected, outcomes = reference_pairs(FULL, mode)
    assert row_triples(rows) == set(expected) and len(rows) == len(expected) == COUNTS[mode]
    by_id = {r["message_id"]: r for r in FULL}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "prompt_id", "chosen_id", "rejected_id", "chosen_rank",
                            "rejected_rank", "message_tree_id", "lang"}
        path = [by_id[row["prompt_id"]]]
        while path[0]["parent_id"] is not None:
            path.insert(0, by_id[path[0]["parent_id"]])
        assert row["prompt"] == [{"role": "user" if r["role"] == "prompter" else "assistant", "content": r["text"]}
                                 for r in path]
        chosen, rejected = by_id[row["chosen_id"]], by_id[row["rejected_id"]]
        assert row["chosen"] == [{"role": "assistant", "content": chosen["text"]}]
        assert row["rejected"] == [{"role": "assistant", "content": rejected["text"]}]
        assert (row["chosen_rank"], row["rejected_rank"]) == (chosen["rank"], rejected["rank"])
        assert chosen["rank"] < rejected["rank"] and chosen["parent_id"] == rejected["parent_id"] == row["prompt_id"]
        assert (row["message_tree_id"], row["lang"]) == (path[0]["message_tree_id"], "en")
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["rows"] == {"train": COUNTS[mode]} and report["pairs"] == mode
    assert report["prompts"] == {"train": {"paired": 416, "fewer_than_two_ranked": 335, "equal_ranks_only": 0,
                                           "unusable_replies_only": 0}}
    assert report["prompts"]["train"] == {**dict.fromkeys(report["prompts"]["train"], 0),
                                          **sum(outcomes.values(), Counter())}
    # "Jay's brother is John." twice, ranks 0 and 2: a pair in best and all, none in adjacent (rank 1 is between).
    same = {} if mode == "adjacent" else {"pair:same_text": 1}
    assert report["dropped"] == {"deleted": 40, "spam": 43, **same}
    assert f"pairs ({mode}) train (en {COUNTS[mode]})" in result.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# Preference pairs built by `oasst build`" in card and f"| train | en | {COUNTS[mode]} |" in card


def test_pairs_split_by_tree_open_with_datasets_and_report_counts_per_split(run, tmp_path: Path) -> None:
    import datasets

    result = run("build", "--input", FLAT_FULL, "--lang", "en", "--pairs", "all", "--test-size", "0.3", "--seed",
                 "1", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    cache = str(tmp_path / "cache")
    by_json = datasets.load_dataset("json", data_dir=str(tmp_path / "out"), cache_dir=cache)
    by_dir = datasets.load_dataset(str(tmp_path / "out"), cache_dir=cache)
    assert set(by_json) == set(by_dir) == {"train", "test"}
    assert by_json["train"][0]["prompt"][0]["role"] == "user" and by_json["train"][0]["chosen"][0]["role"] == \
        "assistant"
    expected, outcomes = reference_pairs(FULL, "all")
    splits = {s: row_triples(by_json[s]) for s in ("train", "test")}
    assert splits["train"] | splits["test"] == set(expected) and not splits["train"] & splits["test"]
    trees = {s: set(by_dir[s]["message_tree_id"]) for s in ("train", "test")}
    assert not trees["train"] & trees["test"]  # split by tree, never by row
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["rows"] == {s: len(by_json[s]) for s in ("train", "test")}
    for split in ("train", "test"):
        assert all(hash_split(t, 0.3, 1) == split for t in trees[split])
        # the prompts of every kept tree of that split, trees without pairs too
        want = sum((c for t, c in outcomes.items() if hash_split(t, 0.3, 1) == split), Counter())
        assert report["prompts"][split] == {**dict.fromkeys(report["prompts"][split], 0), **want}


def test_parquet_pairs_open_with_datasets(run, tmp_path: Path) -> None:
    import datasets

    result = run("build", "--input", FLAT_FULL, "--lang", "en", "--pairs", "adjacent", "--file-format", "parquet",
                 "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    ds = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))["train"]
    assert row_triples(ds) == set(reference_pairs(FULL, "adjacent")[0])
    assert ds[0]["rejected"][0]["role"] == "assistant"


def test_load_dataset_of_a_rebuilt_folder_gives_the_new_rows(run, tmp_path: Path) -> None:
    """datasets 5.2 caches a local folder by its name and YAML: the card's fingerprint keeps a rebuild apart."""
    import datasets

    loaded = {}
    for mode in ("best", "adjacent"):
        result = run("build", "--input", FLAT_FULL, "--lang", "en", "--pairs", mode, "--out", "out", "--overwrite",
                     "-q")
        assert result.exit_code == 0, result.output
        ds = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))["train"]
        loaded[mode] = row_triples(ds)
        assert loaded[mode] == set(reference_pairs(FULL, mode)[0])
    assert loaded["best"] != loaded["adjacent"]


@pytest.mark.parametrize("flag", [("--top-rank",), ("--all-threads",), ("--top-k", "2")])
def test_pairs_with_a_thread_selection_is_a_usage_error(run, tmp_path: Path, flag: tuple[str, ...]) -> None:
    result = run("build", "--input", FLAT, "--pairs", "best", *flag, "--out", "out")
    assert result.exit_code == 2
    assert f"--pairs and {flag[0]} are mutually exclusive" in result.stderr
    assert not (tmp_path / "out").exists()


def test_turn_options_are_ignored_with_a_warning(run, tmp_path: Path) -> None:
    result = run("build", "--input", FLAT, "--pairs", "best", "--max-turns", "2", "--out", "out", "-q")
    assert result.exit_code == 0
    assert "warning: --max-turns shapes threads and is ignored with --pairs\n" in result.stderr
    plain = run("build", "--input", FLAT, "--pairs", "best", "--out", "plain", "-q")
    assert plain.exit_code == 0
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == (tmp_path / "plain" / "train.jsonl").read_bytes()


def test_label_filters_apply_to_pairs(run, tmp_path: Path) -> None:
    result = run("build", "--input", FLAT_FULL, "--lang", "en", "--pairs", "all", "--label-max", "toxicity=0.05",
                 "--label-min", "quality=0.3", "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    failing = lambda r: r["labels"].get("toxicity", 0) > 0.05 or r["labels"].get("quality", 1) < 0.3  # noqa: E731
    expected, _ = reference_pairs(FULL, "all", drop=failing)
    found = row_triples(read_jsonl(tmp_path / "out" / "train.jsonl"))
    assert found == set(expected) and len(found) < COUNTS["all"]
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["dropped"]["label_max:toxicity"] > 0 and report["dropped"]["label_min:quality"] > 0


def test_no_synthetic_drops_synthetic_replies_and_trees_from_pairs(run, tmp_path: Path) -> None:
    records = flat_records(NESTED_FULL)
    assert sum(bool(r.get("synthetic")) for r in records) == 22
    for flags, out in (((), "all"), (("--no-synthetic",), "real")):
        result = run("build", "--input", NESTED_FULL, "--pairs", "all", *flags, "--out", out, "-q")
        assert result.exit_code == 0, result.output
    expected, _ = reference_pairs(records, "all", lang=None, drop=lambda r: bool(r.get("synthetic")))
    every = row_triples(read_jsonl(tmp_path / "all" / "train.jsonl"))
    real = row_triples(read_jsonl(tmp_path / "real" / "train.jsonl"))
    assert real == set(expected) and real < every
    synthetic = {r["message_id"] for r in records if r.get("synthetic")}
    assert not any(set(t) & synthetic for t in real) and any(set(t) & synthetic for t in every)
    assert json.loads((tmp_path / "real" / "build_report.json").read_text())["dropped"]["synthetic"] > 0


def test_skip_mode_builds_the_pairs_of_every_good_tree(run, tmp_path: Path) -> None:
    lines = FLAT_FULL.read_text().splitlines()
    first = json.loads(lines[1])
    lines[1] = json.dumps({**first, "rank": "best"})  # a bad field: its whole tree is skipped
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    assert run("build", "--input", "mixed.jsonl", "--lang", "en", "--pairs", "all", "--out", "out").exit_code == 1
    assert not (tmp_path / "out").exists()
    result = run("build", "--input", "mixed.jsonl", "--lang", "en", "--pairs", "all", "--on-error", "skip",
                 "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    expected, _ = reference_pairs(FULL, "all")
    kept = {t for t, tree in expected.items() if tree != first["message_tree_id"]}
    assert row_triples(read_jsonl(tmp_path / "out" / "train.jsonl")) == kept and len(kept) < len(expected)
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["skipped"] == {"wrong_type": 1}


def test_no_pairs_at_all_is_one_clear_error(run, tmp_path: Path) -> None:
    result = run("build", "--input", FLAT, "--lang", "de", "--pairs", "all", "--out", "out")
    assert result.exit_code == 1
    *warnings, error = result.stderr.splitlines()
    assert error == ("error: no pairs selected: no surviving prompt has two replies of different ranks (see the "
                     "filters in the command); nothing written")
    # What the reader dropped on the way is said as on a build that succeeds (the sample has one orphan).
    assert [w.split(" (first:")[0] for w in warnings] == [
        "warning: dropped 1 message(s) whose parent is missing, with their subtrees"]
    assert list(tmp_path.iterdir()) == []


def test_build_help_documents_pairs(run) -> None:
    result = run("build", "--help")
    assert result.exit_code == 0 and "--pairs [best|adjacent|all]" in result.stdout
