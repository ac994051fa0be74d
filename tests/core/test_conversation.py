"""The conversation module: Guanaco rendering identical to what `oasst build` writes, the markers defined once,
messages checked with one line per fault, standard library only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from oasst_tools import conversation
from oasst_tools.conversation import (ASSISTANT, HUMAN, check_messages, guanaco_prompt, guanaco_spans,
                                      guanaco_text, parse_guanaco, render_guanaco, resolve_format)
from oasst_tools.errors import OasstError

REPO = Path(__file__).resolve().parents[2]
GUANACO = REPO / "fixtures" / "guanaco-en"
FIXTURE_ROWS = [json.loads(line) for split in ("train", "test")
                for line in (GUANACO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_markers_are_guanacos() -> None:
    assert (HUMAN, ASSISTANT) == ("### Human: ", "### Assistant: ")
    assert guanaco_prompt("Hi there.") == "### Human: Hi there.### Assistant:"


def test_rendering_messages_gives_the_text_oasst_build_wrote_on_every_fixture_row() -> None:
    assert len(FIXTURE_ROWS) == 188
    assert all(render_guanaco(row["messages"]) == row["text"] for row in FIXTURE_ROWS)


def test_the_build_rows_are_the_conversation_modules_rendering() -> None:
    from oasst_tools.build import _record_row, make_row

    for row in FIXTURE_ROWS:
        turns = [("prompter" if m["role"] == "user" else "assistant", m["content"]) for m in row["messages"]]
        records = [{"role": role, "text": text, "lang": row["lang"]} for role, text in turns]
        assert make_row(row["message_tree_id"], row["lang"], turns)["text"] == guanaco_text(turns) == row["text"]
        assert _record_row(row["message_tree_id"], records) == make_row(row["message_tree_id"], row["lang"], turns)


def test_guanaco_text_parses_back_into_its_messages() -> None:
    assert all(parse_guanaco(row["text"]) == row["messages"] for row in FIXTURE_ROWS)
    with pytest.raises(OasstError, match=r"^data.jsonl:3: `text` does not start with '### Human:' or "):
        parse_guanaco("Once upon a time", "data.jsonl:3")


def test_loss_spans_cover_each_reply_and_the_human_marker_that_ends_it() -> None:
    text = render_guanaco([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}])
    spans, ends_in_reply = guanaco_spans(text)
    assert [text[a:b] for a, b in spans] == [" Hello### Human:"] and not ends_in_reply
    longer = text + ASSISTANT + "See you"
    spans, ends_in_reply = guanaco_spans(longer)
    assert [longer[a:b] for a, b in spans] == [" Hello### Human:", " See you"] and ends_in_reply


def test_the_marker_strings_are_written_in_one_module() -> None:
    """Code spells the markers only in oasst_tools/conversation.py; the rest import them. Lines of text for people
    that still spell out the format: the dataset card's column line, the generate command's help (two lines)."""
    documentation = {"oasst_tools/card.py": 1, "train/oasst_train/cli.py": 2}
    found: dict[str, int] = {}
    for folder in ("oasst_tools", "train", "eval", "model"):
        for path in sorted((REPO / folder).rglob("*.py")):
            hits = sum(bool(re.search(r"### (?:Human|Assistant)", line))
                       for line in path.read_text(encoding="utf-8").splitlines())
            if hits:
                found[path.relative_to(REPO).as_posix()] = hits
    assert found.pop("oasst_tools/conversation.py") == 2
    assert {k: v for k, v in found.items() if v > documentation.get(k, 0)} == {}


BAD_MESSAGES = {
    "not-a-list": ("hi", "r: `messages` must be a list of {role, content} objects, not a string"),
    "turn-not-an-object": (["hi"], "r: messages[0] must be a {role, content} object, not a string"),
    "no-role": ([{"content": "hi"}], "r: messages[0] has no `role`"),
    "unknown-role": ([{"role": "robot", "content": "hi"}], "r: messages[0] role 'robot' is not user, assistant or "
                                                           "system"),
    "role-not-text": ([{"role": 3, "content": "hi"}], "r: messages[0] role 3 is not user, assistant or system"),
    "content-null": ([{"role": "user", "content": None}], "r: messages[0] content must be a string, not null"),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_bad_messages_are_one_line_naming_the_row_and_turn(case: str) -> None:
    messages, expected = BAD_MESSAGES[case]
    with pytest.raises(OasstError) as caught:
        check_messages(messages, "r")
    assert str(caught.value) == expected


def test_roles_are_matched_without_case_and_oasst_names_become_chat_roles() -> None:
    turns = check_messages([{"role": "Prompter", "content": "a"}, {"role": "ASSISTANT", "content": "b"},
                            {"role": "human", "content": "c"}, {"role": "System", "content": "d"}])
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "system"]


def test_format_auto_picks_the_chat_template_only_when_there_is_one() -> None:
    with_template = SimpleNamespace(chat_template="{{ messages }}", name_or_path="m")
    without = SimpleNamespace(chat_template=None, name_or_path="m")
    assert resolve_format("auto", with_template) == "chat-template"
    assert resolve_format("auto", without) == "guanaco"
    assert resolve_format("guanaco", with_template) == "guanaco"
    with pytest.raises(OasstError, match="^format chat-template: the tokenizer of m has no chat template"):
        resolve_format("chat-template", without)


def test_cut_keeps_the_mask_and_turn_ends_in_step_with_the_ids() -> None:
    enc = conversation.Encoded(ids=[1, 5, 6, 7, 2, 8, 9, 2], mask=[0, 0, 1, 1, 1, 0, 1, 1], ends=(4, 7), turns=2)
    assert enc.cut(None) is enc and enc.cut(8) is enc
    assert enc.cut(5) == conversation.Encoded([1, 5, 6, 7, 2], [0, 0, 1, 1, 1], (4,), 2)
    assert enc.cut(4) == conversation.Encoded([1, 5, 6, 7], [0, 0, 1, 1], (), 2)


def test_importing_the_module_loads_nothing_heavy() -> None:
    code = ("import sys, oasst_tools.conversation; print(sorted(m for m in ('torch', 'transformers', 'jinja2', "
            "'polars', 'datasets', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
