"""README guarantees a mutation review (2026-12-07) found no test holding at their edges: `--label-min` at its limit,
`--seed` moving the `--test-size` split, an `--out` inside a real `save_to_disk` input, an orphan counted with its
subtree, how `oasst build --pairs` counts prompts, a pair's `lang`, and the whole library importing nothing heavy.
Each builds small flat trees through the CLI and checks the output against values worked out by hand."""

from __future__ import annotations

import hashlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.core.conftest import FLAT, read_jsonl
from tests.hostile import assert_refused, assert_unchanged, snapshot


def _msg(mid: str, parent: str | None, role: str, text: str, *, tree: str, rank: int | None = None,
         lang: str = "en", labels: dict[str, float] | None = None) -> dict[str, Any]:
    names = sorted(labels or {})
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "role": role, "text": text,
            "lang": lang, "rank": rank, "review_result": True, "deleted": False, "synthetic": False,
            "tree_state": "ready_for_export", "created_date": f"2023-02-0{len(mid) % 9 + 1}T00:00:00+00:00",
            "labels": {"name": names, "value": [labels[n] for n in names], "count": [3] * len(names)} if labels
            else None}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "build_report.json").read_text())


@pytest.mark.parametrize(("flag", "quality", "kept"), [
    ("--label-min", 0.6, True), ("--label-min", 0.59, False),   # "below" the limit drops; at it, kept
    ("--label-max", 0.6, True), ("--label-max", 0.61, False),   # "above" the limit drops; at it, kept
])
def test_a_label_exactly_at_its_limit_passes(run, tmp_path: Path, flag: str, quality: float, kept: bool) -> None:
    _write(tmp_path / "in.jsonl", [
        _msg("p", None, "prompter", "Why is the sky blue?", tree="p"),
        _msg("a1", "p", "assistant", "Rayleigh scattering.", tree="p", rank=0, labels={"quality": quality}),
        _msg("a2", "p", "assistant", "It reflects the sea.", tree="p", rank=1, labels={"quality": 0.0}
             if flag == "--label-min" else {"quality": 1.0}),
    ])
    result = run("build", "--input", "in.jsonl", "--out", "out", flag, "quality=0.6", "-q")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    # a2 fails the filter either way; a1 decides whether the tree keeps a reply or only its prompt.
    assert [r["messages"][-1]["content"] for r in rows] == ["Rayleigh scattering." if kept else "Why is the sky blue?"]


def test_the_seed_moves_the_test_split_and_a_tree_goes_where_its_hash_says(run, tmp_path: Path) -> None:
    trees = sorted({r["message_tree_id"] for r in read_jsonl(FLAT)})
    split: dict[int, set[str]] = {}
    for seed in (0, 1):
        result = run("build", "--input", FLAT, "--out", f"s{seed}", "--test-size", "0.3", "--seed", seed, "-q")
        assert result.exit_code == 0, result.output
        split[seed] = {r["message_tree_id"] for r in read_jsonl(tmp_path / f"s{seed}" / "test.jsonl")}
    assert split[0] != split[1]
    # The rule as the README states it, computed here rather than through the build's own function.
    for seed in (0, 1):
        expected = {t for t in trees
                    if int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest()[:8], "big") / 2**64 < 0.3}
        assert split[seed] <= expected and split[seed]


def test_out_inside_a_real_save_to_disk_input_is_refused_before_reading(run, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(read_jsonl(FLAT)[:40]).save_to_disk(str(tmp_path / "ds"))
    before = snapshot(tmp_path / "ds")
    line = assert_refused(run("build", "--input", "ds", "--out", "ds/guanaco"))
    assert line == "error: --out ds/guanaco lies inside the input folder ds; choose another --out"
    assert_unchanged(before, tmp_path / "ds")


def test_an_orphan_is_counted_with_its_whole_subtree(run, tmp_path: Path) -> None:
    _write(tmp_path / "in.jsonl", [
        _msg("p", None, "prompter", "Hello?", tree="p"),
        _msg("a", "p", "assistant", "Hi.", tree="p", rank=0),
        _msg("o", "gone", "assistant", "An orphan.", tree="p"),   # its parent is not in the tree
        _msg("o2", "o", "prompter", "Its reply.", tree="p"),
        _msg("o3", "o2", "assistant", "And its reply.", tree="p"),
    ])
    result = run("build", "--input", "in.jsonl", "--out", "out", "--on-error", "skip", "-q")
    assert result.exit_code == 0, result.output
    report = _report(tmp_path / "out")
    assert report["orphaned_messages"] == 3


def test_pairs_count_each_prompt_by_its_outcome_and_carry_the_roots_lang(run, tmp_path: Path) -> None:
    _write(tmp_path / "in.jsonl", [
        # Tree t: P (en) -> A ranked 0 / B ranked 1 -> P2 (de) under A -> C ranked 0 / D ranked 0: one pair at P,
        # P2's two ranked replies share one rank.
        _msg("P", None, "prompter", "Question one", tree="t"),
        _msg("A", "P", "assistant", "Good answer", tree="t", rank=0),
        _msg("B", "P", "assistant", "Worse answer", tree="t", rank=1),
        _msg("P2", "A", "prompter", "Frage zwei", tree="t", lang="de"),
        _msg("C", "P2", "assistant", "Antwort C", tree="t", rank=0, lang="de"),
        _msg("D", "P2", "assistant", "Antwort D", tree="t", rank=0, lang="de"),
        # Tree u: one ranked reply only.
        _msg("Q", None, "prompter", "Lonely question", tree="u"),
        _msg("E", "Q", "assistant", "Only answer", tree="u", rank=0),
    ])
    result = run("build", "--input", "in.jsonl", "--out", "out", "--pairs", "all", "--lang", "en,de", "-q")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [(r["chosen_id"], r["rejected_id"], r["lang"]) for r in rows] == [("A", "B", "en")]
    prompts = _report(tmp_path / "out")["prompts"]["train"]
    # P paired; P2 (under A, a reply of the pair) two ranked replies of one rank; Q one ranked reply.
    assert prompts == {"paired": 1, "fewer_than_two_ranked": 1, "equal_ranks_only": 1, "unusable_replies_only": 0}

    _write(tmp_path / "in2.jsonl", [
        _msg("R", None, "prompter", "Root in English", tree="v"),
        _msg("F", "R", "assistant", "Reply", tree="v", rank=0),
        _msg("R2", "F", "prompter", "Zweite Frage", tree="v", lang="de"),
        _msg("G", "R2", "assistant", "Besser", tree="v", rank=0, lang="de"),
        _msg("H", "R2", "assistant", "Schlechter", tree="v", rank=1, lang="de"),
    ])
    result = run("build", "--input", "in2.jsonl", "--out", "out2", "--pairs", "best", "--lang", "en,de", "-q")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "out2" / "train.jsonl")
    # The pair sits under a German prompt; its row's lang is the tree's (the root's), as every row's is.
    assert [(r["chosen_id"], r["lang"]) for r in rows] == [("G", "en")]


def test_importing_every_module_of_the_library_loads_nothing_heavy() -> None:
    import oasst_tools

    names = sorted(m.name for m in pkgutil.walk_packages(oasst_tools.__path__, "oasst_tools."))
    assert {"oasst_tools.hub", "oasst_tools.stats", "oasst_tools.pairs"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'polars', 'datasets', 'transformers', 'pyarrow', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
