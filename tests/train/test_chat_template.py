"""Chat templates: the assistant-only mask checked token by token on a ChatML tokenizer (with and without
`{% generation %}` markers), the end-of-turn token trained, truncation with the mask, rows with nothing to learn
dropped and counted, bad templates as one error line, and a real training run whose held-out loss falls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oasst_tools.conversation import encode, encode_chat, render_chat
from oasst_tools.errors import OasstError
from tests.conftest import CHATML, IM_END, IM_START, chatml_tokenizer_of
from tests.train.conftest import GUANACO, RECIPES, STORIES, error_line, read_summary

_OPEN = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
_GEN_PROMPT = "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
TEMPLATES = {
    # ChatML as SmolLM3/Qwen3-style templates mark it: the reply and its <|im_end|> inside the generation span.
    "generation": (_OPEN + "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
                   "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
                   "{{ '\\n' }}" + _GEN_PROMPT),
    # A generation span that stops short of <|im_end|>: the closing token must still be trained.
    "generation-without-end": (_OPEN + "{% if message['role'] == 'assistant' %}{% generation %}"
                               "{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}"
                               "{% endif %}{{ '<|im_end|>\\n' }}" + _GEN_PROMPT),
    # Plain ChatML (Qwen2.5, SmolLM2): no markers, the assistant tokens come from rendering prefixes.
    "prefixes": CHATML,
}
SYSTEM_MULTI_TURN = [
    {"role": "system", "content": "You are a terse geography tutor."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871.\nIt was Turin before."},
]
CONVERSATIONS = {
    "system-multi-turn": SYSTEM_MULTI_TURN,
    "ends-on-user": SYSTEM_MULTI_TURN[1:4],
    "one-exchange": SYSTEM_MULTI_TURN[1:3],
}


def chatml_tokenizer(template: str = "prefixes", path: Path = STORIES) -> Any:
    """stories260K's tokenizer with ChatML's two special tokens and a ChatML chat template."""
    return chatml_tokenizer_of(path, TEMPLATES[template])


def chatml_by_hand(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML written without Jinja, and the character spans that must carry loss: each reply + its <|im_end|>."""
    text, spans = "", []
    for turn in messages:
        text += f"{IM_START}{turn['role']}\n"
        start = len(text)
        text += turn["content"] + IM_END
        if turn["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_mask_is_replies_and_their_end_of_turn_token_by_token(template: str, conversation: str) -> None:
    tokenizer = chatml_tokenizer(template)
    messages = CONVERSATIONS[conversation]
    text, spans = chatml_by_hand(messages)
    assert render_chat(tokenizer, messages) == text  # the template is the ChatML written by hand
    enc = encode_chat(tokenizer, messages)
    reference = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc.ids == reference.input_ids
    for position, ((a, b), bit) in enumerate(zip(reference.offset_mapping, enc.mask, strict=True)):
        expected = int(any(a < end and b > start for start, end in spans))
        assert bit == expected, f"token {position} {text[a:b]!r}: mask {bit}, expected {expected}"
    # Read back: the trained tokens are exactly the replies, each closed by <|im_end|>; no system or user text.
    trained = tokenizer.decode([i for i, bit in zip(enc.ids, enc.mask, strict=True) if bit])
    assert trained == "".join(t["content"] + IM_END for t in messages if t["role"] == "assistant")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    replies = sum(t["role"] == "assistant" for t in messages)
    assert enc.turns == replies and len(enc.ends) == replies
    assert all(enc.ids[e] == im_end and enc.mask[e] for e in enc.ends)


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_token_that_closes_a_reply_is_where_generation_stops(template: str) -> None:
    from oasst_tools.conversation import turn_end_ids

    tokenizer = chatml_tokenizer(template)
    assert turn_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(IM_END)]


def test_whole_conversation_loss_keeps_every_token_and_still_finds_the_turn_ends() -> None:
    tokenizer = chatml_tokenizer()
    assistant_only = encode_chat(tokenizer, SYSTEM_MULTI_TURN)
    everything = encode_chat(tokenizer, SYSTEM_MULTI_TURN, assistant_only=False)
    assert everything.ids == assistant_only.ids and set(everything.mask) == {1}
    assert everything.ends == assistant_only.ends


def test_prompter_and_human_roles_are_user_turns() -> None:
    tokenizer = chatml_tokenizer()
    renamed = [{**t, "role": {"user": "prompter"}.get(t["role"], t["role"])} for t in SYSTEM_MULTI_TURN]
    assert encode_chat(tokenizer, renamed) == encode_chat(tokenizer, SYSTEM_MULTI_TURN)


def test_truncation_cuts_the_mask_with_the_ids_and_is_counted() -> None:
    from oasst_train.data import Example, build_dataset

    tokenizer = chatml_tokenizer("generation")
    full = encode_chat(tokenizer, SYSTEM_MULTI_TURN)
    # Cut inside the second reply: its tokens after the cut and its <|im_end|> are lost, the first reply is whole.
    second = [i for i, bit in enumerate(full.mask) if bit][-1]
    cut = second - 3
    dataset, report = build_dataset(tokenizer, [Example(None, SYSTEM_MULTI_TURN, "data.jsonl:1")],
                                    format="chat-template", max_length=cut)
    assert dataset[0]["input_ids"] == full.ids[:cut] and dataset[0]["assistant_masks"] == full.mask[:cut]
    figures = report.to_dict()
    assert figures["rows"] == 1 and figures["rows_cut"] == 1 and figures["rows_dropped"] == 0
    assert figures["loss_tokens"] == sum(full.mask)
    assert figures["loss_tokens_trained"] == sum(full.mask[:cut])
    assert figures["loss_tokens_lost"] == sum(full.mask[cut:]) > 0
    assert (figures["assistant_turns"], figures["turn_ends_trained"], figures["rows_end_trained"]) == (2, 1, 1)
    assert (figures["tokens"], figures["tokens_kept"]) == (len(full.ids), cut)


@pytest.mark.parametrize("format", ["chat-template", "guanaco"])
def test_rows_with_nothing_to_learn_are_dropped_and_counted(format: str) -> None:  # noqa: A002
    from oasst_train.data import Example, build_dataset, require_trainable

    tokenizer = chatml_tokenizer()
    long_prompt = [{"role": "user", "content": "Tell me more. " * 40}, {"role": "assistant", "content": "No."}]
    no_reply = [{"role": "user", "content": "Hello?"}]
    short = SYSTEM_MULTI_TURN[1:3]
    rows = [Example(None, m, f"data/train.jsonl:{n}") for n, m in enumerate([no_reply, short, long_prompt], 1)]
    dataset, report = build_dataset(tokenizer, rows, format=format, max_length=64)
    assert dataset.num_rows == 1
    assert dataset[0]["input_ids"] == encode(tokenizer, short, format).ids  # the row that fits is kept
    assert (report.rows, report.rows_dropped, report.rows_without_reply) == (3, 2, 1)
    assert report.first_dropped == "data/train.jsonl:1" and report.rows_cut == 1
    require_trainable(report)  # one row is left: no error
    _, nothing = build_dataset(tokenizer, [rows[0], rows[2]], format=format, max_length=64)
    with pytest.raises(OasstError) as caught:
        require_trainable(nothing)
    assert str(caught.value) == ("no train row has a token to learn from (2 rows: 1 without an assistant reply, 1 "
                                 "whose replies all start after token 64; first: data/train.jsonl:1); use a larger "
                                 "--max-length")


def test_a_conversation_the_template_raises_on_is_one_error_naming_the_row() -> None:
    from oasst_train.data import Example, build_dataset

    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ message['content'] }}{% endfor %}")
    with pytest.raises(OasstError) as caught:
        build_dataset(tokenizer, [Example(None, SYSTEM_MULTI_TURN, "data/train.jsonl:7")], format="chat-template")
    assert str(caught.value) == (f"data/train.jsonl:7: the chat template of {STORIES} fails on this conversation: "
                                 "System role not supported")


def test_a_template_that_rewrites_earlier_turns_is_refused_rather_than_guessed() -> None:
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = "{{ messages | length }} turns\n" + TEMPLATES["prefixes"]
    with pytest.raises(OasstError, match=r"^row 3: the chat template of .* renders messages\[2\] differently once "
                                         r"later turns follow"):
        encode_chat(tokenizer, SYSTEM_MULTI_TURN, where="row 3")


def test_guanaco_text_rows_are_split_into_turns_for_a_chat_template() -> None:
    from oasst_train.data import Example, build_dataset, render_messages

    tokenizer = chatml_tokenizer()
    messages = SYSTEM_MULTI_TURN[1:]
    as_text, _ = build_dataset(tokenizer, [Example(render_messages(messages), None, "r")], format="chat-template")
    as_messages, _ = build_dataset(tokenizer, [Example(None, messages, "r")], format="chat-template")
    assert as_text[0] == as_messages[0]


def test_a_system_turn_has_no_place_in_the_guanaco_format() -> None:
    from oasst_train.data import Example, build_dataset

    tokenizer = chatml_tokenizer()
    with pytest.raises(OasstError) as caught:
        build_dataset(tokenizer, [Example(None, SYSTEM_MULTI_TURN, "data/train.jsonl:2")], format="guanaco")
    assert str(caught.value) == ("data/train.jsonl:2: messages[0] is a system turn, which the Guanaco format has no "
                                 "place for; train with format chat-template, or drop the system turns")


def test_format_resolution_follows_the_tokenizer() -> None:
    from transformers import AutoTokenizer

    from oasst_tools.conversation import resolve_format

    plain = AutoTokenizer.from_pretrained(STORIES)
    assert resolve_format("auto", chatml_tokenizer()) == "chat-template"
    assert resolve_format("auto", plain) == "guanaco"
    assert resolve_format("guanaco", chatml_tokenizer()) == "guanaco"
    with pytest.raises(OasstError, match=f"^format chat-template: the tokenizer of {STORIES} has no chat template; "
                                         r"train with format guanaco \(or auto\)$"):
        resolve_format("chat-template", plain)
    with pytest.raises(OasstError, match=r"^format 'chatml': expected one of auto, guanaco, chat-template$"):
        resolve_format("chatml", plain)


def independent_count(tokenizer: Any, max_length: int) -> tuple[int, int, int, int]:
    """(rows over max_length, assistant tokens trained, assistant tokens, rows left with none) of the Guanaco
    fixture's train split, counted from the texts alone: tokens per row, and the assistant tokens as the tokens of
    each reply and of the human marker or EOS that ends it."""
    from oasst_tools.conversation import ASSISTANT, HUMAN, HUMAN_STOP

    over = trained = total = dropped = 0
    for row in [json.loads(line) for line in (GUANACO / "train.jsonl").read_text(encoding="utf-8").splitlines()]:
        text = row["text"]
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
        length = len(enc.input_ids) + 1  # + EOS
        over += length > max_length
        loss_chars: set[int] = set()
        cursor = 0
        for turn in row["messages"]:
            marker = ASSISTANT if turn["role"] == "assistant" else HUMAN
            cursor = text.index(marker, cursor) + len(marker)
            if turn["role"] == "assistant":
                end = cursor + len(turn["content"])
                follows = text.find(HUMAN_STOP, end)
                loss_chars.update(range(cursor - 1, follows + len(HUMAN_STOP) if follows == end else end))
        bits = [int(b > a and a in loss_chars) for a, b in enc.offset_mapping]
        bits.append(int(row["messages"][-1]["role"] == "assistant"))  # EOS after a final reply
        total += sum(bits)
        trained += sum(bits[:max_length])
        dropped += not any(bits[:max_length])
    return over, trained, total, dropped


def test_tiny_cpu_recipe_data_report_matches_an_independent_count() -> None:
    """Issue 12 item 6's figures on the tiny CPU recipe (stories260K, max_length 256, fixtures/guanaco-en)."""
    import yaml
    from transformers import AutoTokenizer

    from oasst_train.data import build_dataset, read_rows

    max_length = yaml.safe_load((RECIPES / "tiny-cpu.yaml").read_text())["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    rows = read_rows(str(GUANACO))["train"]
    _, report = build_dataset(tokenizer, rows, format="guanaco", max_length=max_length)
    over, trained, total, dropped = independent_count(tokenizer, max_length)
    assert (report.rows, report.rows_cut, report.rows_dropped) == (171, over, dropped)
    assert (report.loss_tokens, report.loss_tokens_trained) == (total, trained)
    # What the issue saw, measured on this fixture: 161 of 171 rows exceed 256 tokens, 16.5% of assistant tokens
    # are trained, 9 rows have none left (trl used to drop them without a word).
    assert (over, dropped, round(trained / total, 3)) == (161, 9, 0.165)


def test_dry_run_prints_the_data_report_an_independent_count_gives_and_loads_no_weights(
        oasst, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`oasst train --dry-run` on the tiny CPU recipe: the printed figures are the independent count's; the model's
    weights are never loaded; --out, here a folder with files in it, is neither needed empty nor touched."""
    import re

    import yaml
    from transformers import AutoTokenizer

    import oasst_model.load

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("--dry-run loaded the model")

    monkeypatch.setattr(oasst_model.load, "load_model", no_weights)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", STORIES, "--data", GUANACO,
                   "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    max_length = yaml.safe_load((RECIPES / "tiny-cpu.yaml").read_text())["max_length"]
    over, trained, total, dropped = independent_count(AutoTokenizer.from_pretrained(STORIES), max_length)
    lines = result.stdout.splitlines()
    assert lines[0] == "format: guanaco (auto: the tokenizer has no chat template)"
    assert re.fullmatch(f"data train: 171 rows, {over} cut at {max_length} tokens, {dropped} dropped with no token "
                        r"to learn from \(first: \S+train\.jsonl:\d+\)", lines[1]), lines[1]
    assert lines[2].startswith(f"  {trained:,} of {total:,} assistant tokens trained ({trained / total:.1%}), "
                               f"{total - trained:,} lost to the cut; "), lines[2]
    assert lines[3].startswith("data test: 17 rows, ")
    assert re.fullmatch(r"example: \S+train\.jsonl:\d+ \(\d+ tokens; trained, masked\):", lines[5]), lines[5]


def test_dry_run_example_marks_exactly_the_trained_tokens_and_shows_markup_as_written(
        oasst, tmp_path: Path) -> None:
    from rich.text import Text
    from transformers import AutoTokenizer

    from oasst_tools.conversation import encode
    from oasst_train.preview import MASKED_STYLE, TRAINED_STYLE, example_text

    text = "### Human: Say [bold]hi[/bold].### Assistant: [red]Hi[/red]!"
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    enc = encode(tokenizer, text, "guanaco")
    shown = example_text(tokenizer, enc.ids, enc.mask)
    assert isinstance(shown, Text) and shown.plain == tokenizer.decode(enc.ids)
    trained = "".join(shown.plain[span.start:span.end] for span in shown.spans if span.style == TRAINED_STYLE)
    masked = "".join(shown.plain[span.start:span.end] for span in shown.spans if span.style == MASKED_STYLE)
    assert trained == " [red]Hi[/red]!</s>" and masked.endswith("### Assistant:")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
    result = oasst("train", "--model", STORIES, "--data", tmp_path / "data", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == tokenizer.decode(enc.ids)  # the markup printed as written


@pytest.mark.slow
def test_stories_with_a_chat_template_trains_on_it_and_its_held_out_loss_falls(
        oasst, chatml_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_train import trainer

    seen: list[Any] = []
    build_data = trainer.build_data
    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: seen.append(build_data(*a, **k)) or seen[-1])
    # No --format: auto picks the tokenizer's chat template.
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", chatml_model, "--data", GUANACO,
                   "--out", tmp_path / "out", "--max-steps", 40, "--eval-steps", 20, "--save-steps", 40, "-q")
    assert result.exit_code == 0, result.output
    (data,) = seen
    im_end = chatml_tokenizer(path=chatml_model).convert_tokens_to_ids(IM_END)
    assert data.format == "chat-template" and im_end in data.train[0]["input_ids"]
    assert data.report["train"]["rows_end_trained"] > 0
    summary = read_summary(tmp_path / "out")
    assert summary["format"] == "chat-template" and summary["data"] == data.report
    assert summary["global_step"] == 40
    # Measured: 4.43 -> 3.24 in 40 steps (train 4.37 -> 3.06); a clear margin.
    assert summary["eval_loss_last"] < summary["eval_loss_first"] - 0.5, summary


def test_a_template_that_raises_is_one_error_line_from_oasst_train(oasst, chatml_model: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chatml_model, model)
    tokenizer = chatml_tokenizer(path=model)
    tokenizer.chat_template = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ message['content'] }}{% endfor %}")
    tokenizer.save_pretrained(model)
    (tmp_path / "data").mkdir()
    rows = [{"messages": SYSTEM_MULTI_TURN[1:3]}, {"messages": SYSTEM_MULTI_TURN}]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = oasst("train", "--model", model, "--data", tmp_path / "data", "--out", tmp_path / "out", "--no-4bit",
                   "--format", "chat-template")
    assert error_line(result) == (f"error: {tmp_path / 'data' / 'train.jsonl'}:2: the chat template of {model} "
                                  "fails on this conversation: System role not supported")
