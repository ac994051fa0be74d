"""guanaco_test scores the conversation format the model was trained in: Guanaco text by default, the tokenizer's
chat template on request (or with auto, when the tokenizer has one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oasst_eval import data
from oasst_tools.errors import OasstError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}")


def _rows(guanaco_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (guanaco_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]


def test_guanaco_format_scores_the_text_oasst_build_wrote(stories: Path, guanaco_dir: Path) -> None:
    from oasst_tools.conversation import render_guanaco

    ds = data.guanaco_test_dataset(data=str(guanaco_dir), pretrained=str(stories), format="auto")["test"]
    assert ds["text"] == [row["text"] for row in _rows(guanaco_dir)]
    assert ds["text"] == [render_guanaco(row["messages"]) for row in _rows(guanaco_dir)]


def test_chat_template_format_scores_the_messages_through_the_template(stories: Path, guanaco_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories)
    tokenizer.chat_template = CHATML
    monkeypatch.setitem(data._TOKENIZERS, "chatml", tokenizer)
    for fmt in ("chat-template", "auto"):
        ds = data.guanaco_test_dataset(data=str(guanaco_dir), tokenizer="chatml", format=fmt)["test"]
        want = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in _rows(guanaco_dir)]
        assert ds["text"] == want and ds["text"][0].startswith("<|im_start|>user\n")
        assert ds["num_tokens"] == [len(tokenizer.encode(t)) for t in want]


def test_chat_template_format_without_a_template_is_one_error(stories: Path, guanaco_dir: Path) -> None:
    # Another test may have registered a loaded tokenizer under this name (its folder is then the one named).
    with pytest.raises(OasstError, match=r"^format chat-template: the tokenizer of \S+ has no chat template; "):
        data.guanaco_test_dataset(data=str(guanaco_dir), pretrained=str(stories), format="chat-template")
