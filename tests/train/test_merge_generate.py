"""`oasst merge`, `oasst generate`, `oasst chat` on a real 4-bit-trained stories260K adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import error_line


@pytest.mark.slow
def test_merge_matches_base_plus_adapter_and_reloads_as_a_plain_model(oasst, stories_run: Path,
                                                                       tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oasst_train.generate import load_for_inference
    from oasst_train.merge import CHECK_PROMPT

    out = tmp_path / "merged"
    result = oasst("merge", stories_run, "--out", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, _, settings = load_for_inference(stories_run)
    assert settings["load_in_4bit"] is True
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base_only = reference.get_base_model()
        with reference.disable_adapter():
            without = base_only(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert (without - want).abs().max() > 0.1  # the adapter matters, so the comparison above means something


@pytest.mark.slow
def test_merge_refuses_a_non_empty_out_and_leaves_it_alone(oasst, stories_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = oasst("merge", stories_run, "--out", out)
    assert error_line(result) == f"error: --out {out} already exists and is not empty; choose another folder"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_generate_with_a_missing_adapter_is_one_clear_error(oasst, tmp_path: Path) -> None:
    result = oasst("generate", tmp_path / "nope", "--prompt", "hi")
    assert error_line(result) == f"error: adapter folder {tmp_path / 'nope'} does not exist"


NAMES = ["Anna", "Ben", "Carla", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ida", "Jack", "Kim", "Leo", "Mia", "Noah",
         "Olga", "Paul", "Rosa", "Sam", "Tina", "Umar", "Vera", "Will", "Yara", "Zoe"]


@pytest.fixture(scope="module")
def greeter(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained on short exchanges whose end (the next `### Human:` or EOS) lies inside max_length.

    The Guanaco fixture rows are ~1,400 stories260K tokens: cut at 256, none of them shows where a reply ends.
    stories260K was pretrained without EOS (llama2.c separates stories with BOS), so in a few LoRA steps it learns
    the `### Human:` turn marker that ends a reply long before it learns EOS; either ends generation.
    """
    import json

    from tests.train.conftest import RECIPES, invoke

    data = tmp_path_factory.mktemp("greetings")
    rows = [{"text": f"### Human: Please greet {name}.### Assistant: Hello {name}, nice to meet you!"
                     f"### Human: Thank you."} for name in NAMES]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("greeter") / "run"
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", data,
                    "--out", out, "--max-steps", 40, "--save-steps", 40, "--no-4bit", "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_generate_streams_an_answer_in_the_guanaco_format(oasst, greeter: Path) -> None:
    result = oasst("generate", greeter, "--prompt", "Please greet Lisa.", "--max-new-tokens", 100)
    assert result.exit_code == 0, result.output
    answer = result.stdout.strip()
    stop = result.stderr.strip().splitlines()[-1]
    assert answer.startswith("Hello") and "### Human:" not in answer
    # stories260K does not reliably learn to stop within a CPU test's budget (it confuses the byte tokens of
    # "#" and "$", and its EOS embedding was never pretrained); the stop logic itself is checked by the
    # streamer test below. Here: the reason is reported and the budget is respected.
    reason, count = stop.removeprefix("[stopped: ").removesuffix(" tokens]").split(", ")
    assert reason in ("eos", "human_turn", "max_new_tokens") and 0 < int(count) <= 100


def test_streamer_holds_back_a_human_marker_and_stops_there() -> None:
    from transformers import AutoTokenizer

    from oasst_train.generate import _GuanacoStreamer
    from tests.train.conftest import STORIES

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    pieces: list[str] = []
    streamer = _GuanacoStreamer(tokenizer, lambda text, nl=True: pieces.append(text))
    streamer.put(tokenizer("prompt", return_tensors="pt").input_ids)  # the prompt is not echoed
    for token in tokenizer(" The cat sat.### Human: more", add_special_tokens=False).input_ids:
        streamer.put(__import__("torch").tensor([token]))
    streamer.end()
    assert "".join(pieces).strip() == "The cat sat." and streamer.saw_human


@pytest.mark.slow
def test_chat_answers_each_line_until_an_empty_one(oasst, stories_run: Path) -> None:
    result = oasst("chat", stories_run, "--max-new-tokens", 40, "--temperature", 0,
                   input="Tell me a story.\nWhat happened next?\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("bot:") == 2
    replies = [part.split("you", 1)[0].strip() for part in result.stdout.split("bot:")[1:]]
    assert all(len(reply) > 0 for reply in replies)
