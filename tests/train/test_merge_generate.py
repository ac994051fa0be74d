"""`oasst merge`, `oasst generate`, `oasst chat` on a real 4-bit-trained stories260K adapter, and the two stop
conditions of `oasst generate` on a tiny Falcon whose greedy output is forced to run past them."""

from __future__ import annotations

import json
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
    result = oasst("merge", stories_run, "--out", out, "--compute-dtype", "float32")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, _, settings = load_for_inference(stories_run)
    assert settings.load_in_4bit is True
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


@pytest.mark.slow
def test_merge_keeps_a_users_folder_named_like_its_temp_and_never_replaces_a_filled_out(
        oasst, stories_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It saved into `OUT.tmp` (removing whatever was there first) and renamed that over --out."""
    from oasst_train import merge

    (tmp_path / "merged.tmp").mkdir()
    (tmp_path / "merged.tmp" / "notes.txt").write_text("mine")
    (tmp_path / "merged").mkdir()  # empty: replaced
    assert oasst("merge", stories_run, "--out", tmp_path / "merged").exit_code == 0
    assert (tmp_path / "merged.tmp" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / ".oasst-build").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.tmp"]

    made = merge.temp_folder

    def another_program_fills_out(out: Path) -> Path:
        (out / "theirs.txt").write_text("theirs")
        return made(out)

    monkeypatch.setattr(merge, "temp_folder", another_program_fills_out)
    (tmp_path / "second").mkdir()
    result = oasst("merge", stories_run, "--out", tmp_path / "second")
    assert error_line(result) == (f"error: --out {tmp_path / 'second'}: written by another program while this merge "
                                  "ran; nothing replaced (choose another --out)")
    assert [p.name for p in (tmp_path / "second").iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.tmp", "second"]  # no temp folder left


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
    from tests.train.conftest import RECIPES, invoke

    data = tmp_path_factory.mktemp("greetings")
    rows = [{"text": f"### Human: Please greet {name}.### Assistant: Hello {name}, nice to meet you!"
                     f"### Human: Thank you."} for name in NAMES]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("greeter") / "run"
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", data,
                    "--out", out, "--max-steps", 40, "--save-steps", 40, "--no-load-in-4bit", "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_generate_streams_an_answer_in_the_guanaco_format(oasst, greeter: Path) -> None:
    result = oasst("generate", greeter, "--prompt", "Please greet Lisa.", "--max-new-tokens", 100)
    assert result.exit_code == 0, result.output
    answer = result.stdout.strip()
    stop = result.stderr.strip().splitlines()[-1]
    assert answer.startswith("Hello") and "### Human:" not in answer
    # The reason and the count must be what plain greedy decoding of the same model says, found independently:
    # the first EOS or the first completed `### Human:` in transformers' own 100 tokens, else the budget.
    assert stop == "[stopped: {}, {} tokens]".format(*_expected_stop(greeter, "Please greet Lisa.", 100))
    # `--adapter DIR`, as `oasst eval` takes it, is the same command; the positional and the flag agreeing too.
    for spelled in (("--adapter", greeter), (greeter, "--adapter", greeter)):
        again = oasst("generate", *spelled, "--prompt", "Please greet Lisa.", "--max-new-tokens", 100)
        assert (again.exit_code, again.stdout, again.stderr.splitlines()[-1]) == (0, result.stdout, stop)


@pytest.mark.parametrize("command", ["merge", "generate", "chat"])
def test_the_adapter_is_given_once_as_argument_or_flag(oasst, command: str, tmp_path: Path) -> None:
    extra = {"merge": ("--out", tmp_path / "m"), "generate": ("--prompt", "hi"), "chat": ()}[command]
    missing = oasst(command, *extra)
    assert missing.exit_code == 2 and "Error: Missing argument 'ADAPTER' (or --adapter DIR)" in missing.output
    both = oasst(command, tmp_path / "a", "--adapter", tmp_path / "b", *extra)
    assert both.exit_code == 2
    assert f"Error: two adapters given: {tmp_path / 'a'} and --adapter {tmp_path / 'b'}; give one" in both.output
    flag = oasst(command, "--adapter", tmp_path / "nope", *extra)
    assert error_line(flag) == f"error: adapter folder {tmp_path / 'nope'} does not exist"


def _expected_stop(adapter: Path, prompt: str, budget: int) -> tuple[str, int]:
    """(reason, tokens) for greedy decoding read off transformers' generate without any stopping rule."""
    import torch

    from oasst_tools.conversation import HUMAN_STOP, guanaco_prompt
    from oasst_train.generate import load_for_inference

    model, tokenizer, _ = load_for_inference(adapter)
    ids = tokenizer(guanaco_prompt(prompt), return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                             min_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    for k in range(1, len(new) + 1):
        if new[k - 1] == tokenizer.eos_token_id:
            return "eos", k
        if HUMAN_STOP in tokenizer.decode(new[:k], skip_special_tokens=True):
            return "human_turn", k
    return "max_new_tokens", budget


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


# What the forced models say after `### Assistant:` when nothing stops them (greedy, token for token).
FORCED = {
    # Ends its reply with the next human turn, then answers again: ":" is followed by " Hello" each time.
    "human_turn": " Hello Lisa.### Human: Hello Lisa.",
    # Ends its reply with EOS, then keeps talking.
    "eos": " Bye.<|endoftext|> Again Again",
}


def _forced_adapter(folder: Path, script: str) -> Path:
    """A 1-layer Falcon (real tokenizer) whose greedy continuation of any text ending in `:` is `script`, with an
    identity LoRA adapter on top, saved as `oasst train` saves one.

    Attention and MLP output projections are zero, so the residual stream is the current token's embedding and
    the model is a bigram table: each scripted token gets its own embedding axis, and the untied head maps that
    axis to the token that follows it in the script.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, FalconConfig, FalconForCausalLM

    from tests.train.conftest import FALCON_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(FALCON_TOKENIZER)
    config = json.loads((FALCON_TOKENIZER / "config.json").read_text(encoding="utf-8"))
    config.pop("auto_map")
    config.update(hidden_size=16, num_attention_heads=4, num_hidden_layers=1, tie_word_embeddings=False)
    model = FalconForCausalLM(FalconConfig(**config))
    chain = tokenizer(":" + script, add_special_tokens=False).input_ids
    following: dict[int, int] = {}
    for token, after in zip(chain, chain[1:]):
        assert following.setdefault(token, after) == after, "a bigram table cannot follow one token two ways"
    axis = {token: i for i, token in enumerate(dict.fromkeys(chain))}
    assert len(axis) <= config["hidden_size"]
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        for token, i in axis.items():
            model.transformer.word_embeddings.weight[token, i] = 1.0
        for token, after in following.items():
            model.lm_head.weight[after, axis[token]] = 1.0
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    adapter = folder / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(adapter)
    (adapter / "train_config.yaml").write_text(f"model: {folder / 'base'}\nload_in_4bit: false\n"
                                               "compute_dtype: float32\n", encoding="utf-8")
    return adapter


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One forced adapter per stop condition, keyed like FORCED."""
    from tests.train.conftest import FALCON_TOKENIZER

    if not FALCON_TOKENIZER.is_dir():
        pytest.skip(f"{FALCON_TOKENIZER} not present")
    return {name: _forced_adapter(tmp_path_factory.mktemp(name), script) for name, script in FORCED.items()}


@pytest.mark.parametrize(("stop", "pieces", "new_tokens"), [
    ("human_turn", [" Hello", " Lisa", "."], 6),  # " Hello", " Lisa", ".", "###", " Human", ":"
    ("eos", [" Bye", "."], 3),  # " Bye", ".", "<|endoftext|>"
])
def test_reply_stops_exactly_at_the_next_human_turn_or_eos_and_streams_the_same_text(
        forced: dict[str, Path], stop: str, pieces: list[str], new_tokens: int) -> None:
    import torch

    from oasst_tools.conversation import guanaco_prompt
    from oasst_train.generate import Chatbot

    bot = Chatbot.load(forced[stop])
    # Unstopped greedy decoding really runs past the stop: the cut below is the stop logic's doing.
    ids = bot.tokenizer(guanaco_prompt("Please greet Lisa."), return_tensors="pt").input_ids
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in bot.tokenizer(FORCED[stop], add_special_tokens=False).input_ids:
            ids = torch.cat([ids, bot.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert bot.tokenizer.decode(ids[0, prompt_length:]) == FORCED[stop]

    streamed: list[tuple[str, bool]] = []
    reply = bot.reply("Please greet Lisa.", max_new_tokens=50, stream=lambda text, nl=True: streamed.append((text, nl)))
    assert (reply.stop, reply.new_tokens, reply.text) == (stop, new_tokens, "".join(pieces))
    # Token by token, never a character of `### Human:`, then the end of the line.
    assert streamed == [(piece, False) for piece in pieces] + [("", True)]


@pytest.mark.parametrize(("stop", "max_new_tokens", "stdout", "reason"), [
    ("human_turn", 50, " Hello Lisa.\n", "[stopped: human_turn, 6 tokens]"),
    ("eos", 50, " Bye.\n", "[stopped: eos, 3 tokens]"),
    ("human_turn", 2, " Hello Lisa\n", "[stopped: max_new_tokens, 2 tokens]"),
])
def test_generate_command_prints_the_answer_up_to_the_stop_and_says_why_it_stopped(
        oasst, forced: dict[str, Path], stop: str, max_new_tokens: int, stdout: str, reason: str) -> None:
    result = oasst("generate", forced[stop], "--prompt", "Please greet Lisa.", "--max-new-tokens", max_new_tokens)
    assert result.exit_code == 0, result.output
    assert result.stdout == stdout
    assert result.stderr.strip().splitlines()[-1] == reason


@pytest.mark.slow
def test_generate_and_chat_keep_cudnn_attention_off_unless_asked(oasst, stories_run: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding meets a new key length at every token (a new cuDNN plan each): cuDNN attention is off while
    generating unless --cudnn-attention; torch's switch is back afterwards; the answer is the same."""
    import torch

    from tests.sdpa import record_cudnn_switch

    seen = record_cudnn_switch(monkeypatch)
    off = oasst("generate", stories_run, "--prompt", "Tell me a story.", "--max-new-tokens", 8)
    assert off.exit_code == 0, off.output
    assert seen and not any(seen) and torch.backends.cuda.cudnn_sdp_enabled()
    seen.clear()
    on = oasst("generate", stories_run, "--prompt", "Tell me a story.", "--max-new-tokens", 8, "--cudnn-attention")
    assert on.exit_code == 0, on.output
    assert seen and all(seen) and on.stdout == off.stdout
    seen.clear()
    chat = oasst("chat", stories_run, "--max-new-tokens", 4, input="Hello\n\n")
    assert chat.exit_code == 0, chat.output
    assert seen and not any(seen)
