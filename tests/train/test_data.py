"""Data: Guanaco rendering, EOS appended, assistant-only loss mask checked token by token, bad datasets.

Chat templates: tests/train/test_chat_template.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oasst_tools.conversation import ASSISTANT_CUE, HUMAN_STOP
from oasst_train.data import Example, read_rows, render_messages, tokenize_text
from tests.train.conftest import FALCON_TOKENIZER, GUANACO, STORIES, error_line

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    from oasst_model.load import set_pad_token

    if not path.is_dir():
        pytest.skip(f"{path} not present")
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_pad_token(tokenizer)
    return tokenizer


def test_messages_render_exactly_as_guanaco_text() -> None:
    assert render_messages(CONVERSATION) == (
        "### Human: What is the capital of France?### Assistant: Paris is the capital of France."
        "### Human: And of Italy?### Assistant: Rome, since 1871.")


def test_fixture_messages_and_text_columns_agree() -> None:
    rows = [json.loads(line) for line in (GUANACO / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(render_messages(row["messages"]) == row["text"] for row in rows)


@pytest.mark.parametrize("model", [STORIES, FALCON_TOKENIZER], ids=["stories260K-sentencepiece", "falcon-bpe"])
@pytest.mark.parametrize("turns", [4, 3], ids=["ends-on-assistant", "ends-on-human"])
def test_assistant_only_mask_covers_replies_and_their_terminators_token_by_token(model: Path, turns: int) -> None:
    tokenizer = _tokenizer(model)
    text = render_messages(CONVERSATION[:turns])
    ids, mask = tokenize_text(tokenizer, text, assistant_only=True)
    enc = tokenizer(text, return_offsets_mapping=True)
    assert ids[:-1] == enc.input_ids and ids[-1] == tokenizer.eos_token_id
    # Independent of the implementation: where each reply and the turn marker after it sit in the text.
    loss_chars: set[int] = set()
    cursor = 0
    for i, turn in enumerate(CONVERSATION[:turns]):
        start = text.index(turn["content"], cursor)
        cursor = start + len(turn["content"])
        if turn["role"] == "assistant":
            end = cursor + len(HUMAN_STOP) if i + 1 < turns else cursor
            loss_chars.update(range(start - 1, end))  # -1: the space after "### Assistant:"
    for position, ((a, b), bit) in enumerate(zip(enc.offset_mapping, mask[:-1], strict=True)):
        piece = tokenizer.decode([ids[position]])
        expected = int(b > a and a in loss_chars)
        assert bit == expected, f"token {position} {piece!r} at {a}:{b}: mask {bit}, expected {expected}"
    assert mask[-1] == int(turns % 2 == 0)  # EOS is learned only after a reply
    trained = tokenizer.decode([i for i, bit in zip(ids, mask, strict=True) if bit], skip_special_tokens=True)
    for turn in CONVERSATION[:turns]:
        assert (turn["content"] in trained) == (turn["role"] == "assistant")
    assert ASSISTANT_CUE not in trained


def test_whole_conversation_loss_keeps_every_token(stories: Path) -> None:
    tokenizer = _tokenizer(stories)
    ids, mask = tokenize_text(tokenizer, render_messages(CONVERSATION), assistant_only=False)
    assert set(mask) == {1} and ids[-1] == tokenizer.eos_token_id


def test_eos_is_appended_once_and_pad_is_not_eos(stories: Path) -> None:
    tokenizer = _tokenizer(stories)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids, _ = tokenize_text(tokenizer, "### Human: hi### Assistant: hello")
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_read_rows_takes_the_build_folder_splits() -> None:
    rows = read_rows(str(GUANACO))
    assert (len(rows["train"]), len(rows["test"])) == (171, 17)
    assert read_rows(str(GUANACO), eval_rows=5)["test"] == rows["test"][:5]


def test_datasets_folder_with_messages_column_is_rendered(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"messages": [CONVERSATION]})}).save_to_disk(tmp_path / "ds")
    where = f"dataset {tmp_path / 'ds'}[train] row 0"
    assert read_rows(str(tmp_path / "ds")) == {"train": [Example(None, CONVERSATION, where)]}
    assert render_messages(read_rows(str(tmp_path / "ds"))["train"][0].messages) == render_messages(CONVERSATION)


def test_build_folder_without_text_or_messages_is_one_clear_error(oasst, stories: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "hi", "answer": "hello"}) + "\n")
    result = oasst("train", "--model", stories, "--data", data, "--out", tmp_path / "out", "--no-4bit")
    assert error_line(result) == (f"error: {data / 'train.jsonl'}:1: row has no `text` or `messages` column "
                                  "(it has: prompt, answer)")
    assert not (tmp_path / "out").exists()


def test_datasets_folder_without_text_or_messages_is_one_clear_error(oasst, stories: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(tmp_path / "ds")
    result = oasst("train", "--model", stories, "--data", tmp_path / "ds", "--out", tmp_path / "out", "--no-4bit")
    assert error_line(result) == (f"error: dataset {tmp_path / 'ds'} has no `text` or `messages` column "
                                  "(columns: question, answer)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("turns", [4, 3], ids=["ends-on-assistant", "ends-on-human"])
def test_a_tokenizer_that_appends_eos_itself_gets_no_second_one(stories: Path, turns: int) -> None:
    from tokenizers.processors import TemplateProcessing

    from oasst_train.data import build_dataset

    text = render_messages(CONVERSATION[:turns])
    plain = _tokenizer(stories)
    want_ids, want_mask = tokenize_text(plain, text)
    appending = _tokenizer(stories)
    bos, eos = appending.bos_token, appending.eos_token
    appending.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, appending.bos_token_id), (eos, appending.eos_token_id)])
    assert appending(text).input_ids[-2:] != [appending.eos_token_id] * 2
    assert appending(text).input_ids[-1] == appending.eos_token_id  # it really appends EOS on its own
    ids, mask = tokenize_text(appending, text)
    assert ids.count(appending.eos_token_id) == 1 and ids[-1] == appending.eos_token_id
    assert (ids, mask) == (want_ids, want_mask)  # same tokens, same loss mask, EOS learned only after a reply
    row = build_dataset(appending, [text], assistant_only=True)[0][0]
    assert (row["input_ids"], row["assistant_masks"]) == (want_ids, want_mask)


def test_a_damaged_datasets_folder_names_its_file_and_line(oasst, stories: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"messages": [CONVERSATION]}).save_to_disk(tmp_path / "ds")
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [\n')  # datasets: "Expecting value: line 2 ..."
    result = oasst("train", "--model", stories, "--data", tmp_path / "ds", "--out", tmp_path / "out", "--no-4bit")
    assert error_line(result) == f"error: {tmp_path / 'ds' / 'state.json'}:2: not valid JSON (Expecting value)"
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_shipped_with_pad_equal_to_eos_gets_another_pad(stories: Path, tmp_path: Path) -> None:
    # SmolLM2-Instruct and many chat models ship pad = EOS: a collator masking padding would hide every EOS.
    import shutil

    from transformers import AutoTokenizer

    from oasst_model.load import load_tokenizer

    model = tmp_path / "stories-pad-eos"
    shutil.copytree(stories, model)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((model / name).read_text())
        settings["pad_token"] = settings["eos_token"]
        (model / name).write_text(json.dumps(settings))
    assert AutoTokenizer.from_pretrained(model).pad_token == "</s>"  # as shipped
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.pad_token == "<unk>"
    ids, mask = tokenize_text(tokenizer, render_messages(CONVERSATION), assistant_only=True)
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1  # the final EOS is learned


def test_a_datasets_folder_valid_split_is_held_out_as_test(tmp_path: Path) -> None:
    # oasst build's split words: validation and valid are held-out rows, as in file names.
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"messages": [CONVERSATION] * 3}),
                 "valid": Dataset.from_dict({"messages": [CONVERSATION[:2]]})}).save_to_disk(tmp_path / "ds")
    rows = read_rows(str(tmp_path / "ds"))
    assert (len(rows["train"]), len(rows["test"])) == (3, 1)
    assert rows["test"][0].where == f"dataset {tmp_path / 'ds'}[valid] row 0"


def test_a_datasets_folder_with_an_empty_test_split_trains_on_its_train_split(tmp_path: Path) -> None:
    """datasets 5.2 saves an empty split it cannot load back (IndexError: 'cannot load dataset ds: list index out
    of range'); it is read as what it is, no held-out rows."""
    from datasets import Dataset, DatasetDict

    full = Dataset.from_dict({"messages": [CONVERSATION] * 3})
    DatasetDict({"train": full, "test": full.select([])}).save_to_disk(tmp_path / "ds")
    rows = read_rows(str(tmp_path / "ds"))
    assert (len(rows["train"]), len(rows.get("test", []))) == (3, 0)
