"""The nested reader's fast path (`_nested_items`, then the shared check `records.index_tree`): it accepts exactly the
plain, valid trees that the message-by-message walk (`_nested_records`) accepts, and leaves everything else to that
walk, so errors and odd values stay as they were."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from oasst_tools.errors import OasstInputError
from oasst_tools.filters import Selection
from oasst_tools.read import _check_roles, _nested_items, _nested_records, iter_raw_trees
from oasst_tools.records import index_tree
from tests.core.conftest import NESTED, assert_fast_path_agrees


def _tree() -> dict[str, Any]:
    """The first fixture tree with a reply that has replies of its own (three levels)."""
    with gzip.open(NESTED, "rt") as fh:
        for line in fh:
            tree = json.loads(line)
            if any(reply.get("replies") for reply in tree["prompt"].get("replies") or ()):
                return tree
    raise AssertionError("no deep tree in the fixture")


def _reply(prompt: dict) -> dict:
    return next(reply for reply in prompt["replies"] if reply.get("replies"))


def _set(field: str, value: Any, where: Callable[[dict], dict] = _reply) -> Callable[[dict], None]:
    def mutate(prompt: dict) -> None:
        where(prompt)[field] = value
    return mutate


def _drop(field: str, where: Callable[[dict], dict] = _reply) -> Callable[[dict], None]:
    def mutate(prompt: dict) -> None:
        del where(prompt)[field]
    return mutate


def _deep(prompt: dict) -> dict:
    return _reply(prompt)["replies"][0]


def _duplicate(prompt: dict) -> None:
    _deep(prompt)["message_id"] = prompt["message_id"]


MUTATIONS = {
    "unchanged": lambda prompt: None,
    "deleted reply": _set("deleted", True),
    "spam reply": _set("review_result", False),
    "reply without parent_id": _drop("parent_id", _deep),
    "wrong parent_id": _set("parent_id", "elsewhere", _deep),
    "root with a parent_id": _set("parent_id", "elsewhere", lambda prompt: prompt),
    "duplicate id": _duplicate,
    "duplicate id and a bad field after it": lambda prompt: (_duplicate(prompt), _set("lang", 3, _deep)(prompt)),
    "roles do not alternate": _set("role", "prompter"),
    "unknown role": _set("role", "bot", _deep),
    "float rank": _set("rank", 1.0),
    "negative rank": _set("rank", -1),
    "columnar labels": _set("labels", {"name": ["toxicity"], "value": [0.1]}),
    "empty list as labels": _set("labels", []),
    "labels of numbers": _set("labels", {"toxicity": 0.1}),
    "a label value a string": _set("labels", {"toxicity": {"value": 0.1, "count": 1}, "quality": "high"}),
    "a label value a string on the root": _set("labels", {"quality": "high"}, lambda prompt: prompt),
    "a label's value a string": _set("labels", {"toxicity": {"value": "high", "count": 1}}),
    "a label's value true": _set("labels", {"toxicity": {"value": True, "count": 1}}),
    "a columnar label value a list": _set("labels", {"name": ["toxicity"], "value": [[0.1]]}),
    "a label without a value": _set("labels", {"toxicity": {"count": 1}}),
    "columnar labels of different lengths": _set("labels", {"name": ["toxicity"], "value": [0.1, 0.2]}),
    "columnar labels without values": _set("labels", {"name": ["toxicity"]}),
    "replies an empty object": _set("replies", {}, _deep),
    "replies not objects": _set("replies", [1], _deep),
    "no text": _drop("text", _deep),
    "empty id": _set("message_id", "", _deep),
    "lang a number": _set("lang", 3, _deep),
    "replies false": _set("replies", False, _deep),
    "replies zero": _set("replies", 0, _deep),
    "a reply of another tree": _set("message_tree_id", "another", _deep),
    "a reply naming its own tree": _set("message_tree_id", "tree", _deep),
    "emojis columnar": _set("emojis", {"name": ["+1", "-1"], "count": [2, 1]}),
    "emojis export form": _set("emojis", {"+1": 2}),
    "emojis false": _set("emojis", False),
    "emoji count not a list": _set("emojis", {"name": ["+1"], "count": 5}),
    "emoji counts of another length": _set("emojis", {"name": ["+1"], "count": [1, 2]}),
    "emoji name a list": _set("emojis", {"name": [["+1"]], "count": [1]}),
    "emoji count a string": _set("emojis", {"name": ["+1"], "count": ["1"]}),
    "emoji count true": _set("emojis", {"+1": True}),
    "columnar label names lists": _set("labels", {"name": [["toxicity"]], "value": [0.1]}),
    "columnar label names numbers": _set("labels", {"name": [1], "value": [0.1]}),
}


# Plain and valid: the fast path must take these itself.
ACCEPTED = ("unchanged", "deleted reply", "spam reply", "roles do not alternate", "a reply naming its own tree",
            "emojis columnar", "emojis export form")


def _result(index: tuple | None, path: str) -> tuple | str:
    """What a reader makes of an index: (message ids, flagged ids, plain), or the role error it raises."""
    assert index is not None
    records, children, flagged, plain, ordered, alternates = index
    assert ordered  # depth first: parents before replies
    try:
        if not alternates:
            _check_roles(records, children, path)
    except OasstInputError as err:
        return str(err)
    links = {parent: [r["message_id"] for r in kids] for parent, kids in children.items() if parent is not None}
    return list(records), [record["message_id"] for record in flagged], plain, links


def _walked(prompt: dict, tree_id: str = "tree", path: str = "in.trees.jsonl") -> tuple | str:
    """What the message-by-message walk makes of a tree: (message ids, flagged ids, plain), or its error."""
    try:
        items = _nested_records(prompt, tree_id, path, 1)
    except OasstInputError as err:
        return str(err)
    return _result(index_tree(items, strict=False), path)


@pytest.mark.parametrize("name", MUTATIONS)
def test_the_nested_fast_path_accepts_only_what_the_walk_accepts_as_plain_and_agrees_on_it(name: str):
    prompt = copy.deepcopy(_tree()["prompt"])
    MUTATIONS[name](prompt)
    walked = _walked(prompt)
    items = _nested_items(prompt, "tree", 1)
    index = index_tree(items) if items is not None else None
    if index is None:
        assert name not in ACCEPTED
    else:
        assert _result(index, "in.trees.jsonl") == walked


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_nested_file_reads_selects_and_fails_as_the_walk_does(tmp_path: Path, name: str):
    tree = copy.deepcopy(_tree())
    MUTATIONS[name](tree["prompt"])
    path = tmp_path / "in.trees.jsonl"
    path.write_text(json.dumps(tree) + "\n")
    walked = _walked(copy.deepcopy(tree["prompt"]), tree["message_tree_id"], str(path))
    if isinstance(walked, str):
        with pytest.raises(OasstInputError) as err:
            list(iter_raw_trees(path))
        assert str(err.value) == walked
        return
    (raw,) = iter_raw_trees(path)
    links = {parent: [r["message_id"] for r in kids] for parent, kids in raw.children.items()}
    assert (list(raw.records), [record["message_id"] for record in raw.flagged], raw.plain, links) == walked
    for sel in (Selection(), Selection(label_max={"toxicity": 0.05})):
        assert_fast_path_agrees([raw], sel)
