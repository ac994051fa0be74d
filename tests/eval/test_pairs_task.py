"""`oasst eval --tasks guanaco_pairs --data PAIRS`: preference accuracy on the held-out pairs of `oasst build --pairs`.

The pairs are built from the real fixture (`--pairs all --test-size 0.5`: 32 test pairs). stories260K's window is
512 tokens and its 512-piece vocabulary spends many tokens on a reply, so only the pairs whose replies both fit are
scored; the tests derive that count, and the accuracies, independently with transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IM_END, STORIES, chatml_tokenizer_of
from tests.eval.conftest import GUANACO, REPO
from tests.hostile import assert_refused, assert_unchanged, snapshot

MESSAGES = REPO / "fixtures" / "oasst1" / "validation-en-sample.messages.jsonl"
TEST_PAIRS = 32
WINDOW = 512  # stories260K's max_position_embeddings: lm-eval's max_length


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`oasst build --pairs all --test-size 0.5` of the fixture sample: 32 held-out pairs in test.jsonl."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli

    out = tmp_path_factory.mktemp("pairs") / "build"
    result = CliRunner().invoke(core_cli.cli, ["build", "--input", str(MESSAGES), "--pairs", "all",
                                               "--test-size", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len((out / "test.jsonl").read_text(encoding="utf-8").splitlines()) == TEST_PAIRS
    return out


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()]


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "eval_summary.json").read_text(encoding="utf-8"))


def _guanaco(turns: list[dict[str, str]]) -> str:
    """Guanaco text written out here, not through oasst_tools.conversation."""
    return "".join(("### Assistant: " if t["role"] == "assistant" else "### Human: ") + t["content"] for t in turns)


@pytest.fixture(scope="module")
def independent(pairs_dir: Path) -> list[tuple[str, list[str], list[float]]]:
    """(context, [chosen, rejected] texts, their logliks) of every pair whose replies both fit the window: each
    reply's token log-probs given the prompt in the Guanaco format, summed, with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    assert model.config.max_position_embeddings == WINDOW
    scored = []
    for row in _rows(pairs_dir):
        context = _guanaco(row["prompt"]) + "### Assistant:"
        replies, lls = [" " + row[k][0]["content"] for k in ("chosen", "rejected")], []
        for reply in replies:
            whole = tokenizer(context + reply, verbose=False)["input_ids"]
            n = len(whole) - len(tokenizer(context, verbose=False)["input_ids"])
            if n > WINDOW:
                break
            # The model reads at most its window: the last WINDOW + 1 tokens, minus the last one.
            ids = torch.tensor([whole[-(WINDOW + 1):][:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, -n:].float(), dim=-1)
            lls.append(logp.gather(1, torch.tensor(whole[-n:])[:, None]).sum().item())
        if len(lls) == 2:
            scored.append((context, replies, lls))
    return scored


def test_acc_and_acc_norm_equal_an_independent_loglikelihood_comparison(
        oasst, pairs_dir: Path, independent: list[tuple[str, list[str], list[float]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_eval import run

    runs: list[Any] = []
    evaluate = run.evaluate

    def keep_runs(*args: Any, **kwargs: Any) -> Any:
        scored, settings = evaluate(*args, **kwargs)
        runs.extend(scored)  # with lm-eval's per-item samples, which the CLI does not write
        return scored, settings

    monkeypatch.setattr(run, "evaluate", keep_runs)
    result = oasst("eval", "--model", STORIES, "--tasks", "guanaco_pairs", "--data", pairs_dir, "--out", "o")
    assert result.exit_code == 0, result.output
    scores = _summary(tmp_path / "o")["base"]["guanaco_pairs"]
    n = len(independent)
    assert 0 < n < TEST_PAIRS and scores["n"] == n
    skipped = (f"warning: guanaco_pairs: {TEST_PAIRS - n} of {TEST_PAIRS} pairs have a reply longer than the model's "
               f"{WINDOW}-token window and are not scored (lm-eval scores a reply only whole)")
    assert skipped in result.stderr.splitlines()
    # lm-eval scored the same strings, and each reply's log-likelihood is the one computed here.
    samples = sorted(runs[0].samples["guanaco_pairs"], key=lambda s: s["doc_id"])
    assert [(s["doc"]["context"], s["doc"]["choices"]) for s in samples] == [(c, r) for c, r, _ in independent]
    for sample, (_, _, lls) in zip(samples, independent, strict=True):
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(lls, rel=1e-4)
    # No pair is a near tie, so float rounding cannot flip an outcome.
    assert min(abs(a - b) for _, _, (a, b) in independent) > 1e-2
    acc = sum(a >= b for _, _, (a, b) in independent) / n
    acc_norm = sum(a / len(ta) >= b / len(tb) for _, (ta, tb), (a, b) in independent) / n
    assert scores["acc"] == pytest.approx(acc) and scores["acc_norm"] == pytest.approx(acc_norm)
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert _summary(tmp_path / "o")["settings"]["format"] == "guanaco"


def test_compare_base_scores_base_and_adapter_on_the_same_pairs(oasst, pairs_dir: Path, adapter_dir: Path,
                                                                tmp_path: Path) -> None:
    result = oasst("eval", "--adapter", adapter_dir, "--compare-base", "--tasks", "guanaco_pairs", "--data",
                   pairs_dir, "--limit", 3, "--out", "o")
    assert result.exit_code == 0, result.output
    summary = _summary(tmp_path / "o")
    for label in ("base", "adapter"):
        scores = summary[label]["guanaco_pairs"]
        assert scores["n"] == 3 and set(scores) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(summary["difference"]["guanaco_pairs"]) == {"acc", "acc_norm"}
    assert result.stderr.count("warning: guanaco_pairs:") == 1  # said once, not per label or per read
    table = [line for line in result.stdout.splitlines() if "guanaco_pairs" in line]
    assert len(table) == 2 and "acc " in table[0] and "acc_norm" in table[1]


def test_chat_template_format_renders_the_prompt_through_the_template(chatml_model: Path, pairs_dir: Path) -> None:
    from oasst_eval.preference import pairs_dataset

    tokenizer = chatml_tokenizer_of(STORIES)
    docs = pairs_dataset(data=str(pairs_dir), tokenizer=str(chatml_model), format="chat-template")["test"]
    rows = _rows(pairs_dir)
    assert len(docs) == TEST_PAIRS
    for doc, row in zip(docs, rows, strict=True):
        assert doc["context"] == tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                               add_generation_prompt=True)
        assert doc["context"].endswith("<|im_start|>assistant\n")
        assert doc["choices"] == [row["chosen"][0]["content"] + IM_END, row["rejected"][0]["content"] + IM_END]
    # auto picks the template the tokenizer carries
    auto = pairs_dataset(data=str(pairs_dir), tokenizer=str(chatml_model), format="auto")["test"]
    assert auto["context"] == docs["context"]


def test_chat_template_format_end_to_end(oasst, chatml_model: Path, pairs_dir: Path, tmp_path: Path) -> None:
    result = oasst("eval", "--model", chatml_model, "--format", "chat-template", "--tasks", "guanaco_pairs",
                   "--data", pairs_dir, "--limit", 2, "--out", "o")
    assert result.exit_code == 0, result.output
    summary = _summary(tmp_path / "o")
    assert summary["settings"]["format"] == "chat-template" and summary["base"]["guanaco_pairs"]["n"] == 2


def test_a_template_whose_reply_turn_differs_from_its_generation_prompt_is_one_error(
        pairs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_eval import data
    from oasst_eval.preference import pairs_dataset
    from oasst_tools.errors import OasstError
    from tests.conftest import CHATML

    thinking = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    monkeypatch.setitem(data._TOKENIZERS, "thinking", chatml_tokenizer_of(STORIES, thinking))
    with pytest.raises(OasstError) as err:
        pairs_dataset(data=str(pairs_dir), tokenizer="thinking", format="chat-template")
    first = _rows(pairs_dir)[0]["chosen"][0]["content"][:30]
    assert str(err.value) == (
        f"{pairs_dir / 'test.jsonl'}:1: the chat template of {STORIES} renders a reply's turn differently from its "
        f"generation prompt (the prompt goes on '<think>\\n', the reply's turn {first!r}), so the reply cannot be "
        "cut from the conversation; score with --format guanaco")


def test_pairs_whose_replies_are_the_same_text_are_skipped_with_a_warning(
        pairs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from oasst_eval.preference import pairs_dataset

    rows = _rows(pairs_dir)[:3]
    rows[1]["rejected"] = rows[1]["chosen"]
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    docs = pairs_dataset(data="build", tokenizer=str(STORIES))["test"]
    assert docs["chosen_id"] == [rows[0]["chosen_id"], rows[2]["chosen_id"]]
    assert capsys.readouterr().err == ("warning: build/test.jsonl: 1 pair(s) whose chosen and rejected replies render "
                                       "to the same text were skipped: neither reply can be preferred\n")


# --- bad input: one line, before a model loads ---------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Hi?"}]
CHOSEN = [{"role": "assistant", "content": "Hello."}]
REJECTED = [{"role": "assistant", "content": "Go away."}]
GOOD = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}

BAD_PAIRS = {
    "no-rejected": ({"prompt": PROMPT, "chosen": CHOSEN},
                    "row has no `rejected` (it has: prompt, chosen)"),
    "prompt-a-string": (GOOD | {"prompt": "Hi?"},
                        "`prompt` must be a non-empty list of {role, content} messages, not a string"),
    "prompt-empty": (GOOD | {"prompt": []}, "`prompt` must be a non-empty list of {role, content} messages, not a list "
                                            "of 0"),
    "turn-a-string": (GOOD | {"prompt": ["Hi?"]}, "`prompt[0]` must be a {role, content} object, not a string"),
    "unknown-role": (GOOD | {"prompt": [{"role": "bot", "content": "x"}]},
                     "`prompt[0]` role must be user, assistant or system, not 'bot'"),
    "content-a-number": (GOOD | {"prompt": [{"role": "user", "content": 3}]},
                         "`prompt[0]` content must be a string, not a number"),
    "prompt-ends-with-a-reply": (GOOD | {"prompt": PROMPT + CHOSEN},
                                 "`prompt` must end with a user turn, which the replies answer, not 'assistant'"),
    "chosen-a-message": (GOOD | {"chosen": CHOSEN[0]},
                         "`chosen` must be a list with one assistant message, not an object"),
    "chosen-two-messages": (GOOD | {"chosen": CHOSEN + CHOSEN},
                            "`chosen` must be a list with one assistant message, not a list of 2"),
    "chosen-by-the-user": (GOOD | {"chosen": [{"role": "user", "content": "x"}]},
                           "`chosen[0]` role must be assistant, not 'user'"),
    "rejected-empty": (GOOD | {"rejected": [{"role": "assistant", "content": " \n"}]},
                       "`rejected[0]` content is empty"),
    "thread-row": ({"text": "### Human: Hi?### Assistant: Hello.", "messages": PROMPT + CHOSEN},
                   "row is a conversation thread (`text`, `messages`), not a preference pair: guanaco_pairs scores "
                   "the test.jsonl of `oasst build --pairs best|adjacent|all --test-size F`"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_pair_row_is_one_error_naming_file_and_line(oasst, tmp_path: Path, case: str) -> None:
    row, expected = BAD_PAIRS[case]
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "test.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    before = snapshot(tmp_path)
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "guanaco_pairs", "--data", "build"),
                          names="build/test.jsonl")
    assert line == f"error: build/test.jsonl:2: {expected}"
    assert_unchanged(before, tmp_path)


def test_a_thread_build_given_to_guanaco_pairs_says_to_build_with_pairs(oasst) -> None:
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "guanaco_pairs", "--data", GUANACO))
    assert line == (f"error: {GUANACO}/test.jsonl:1: row is a conversation thread (`text`, `messages`), not a "
                    "preference pair: guanaco_pairs scores the test.jsonl of `oasst build --pairs best|adjacent|all "
                    "--test-size F`")


def test_a_pairs_build_given_to_guanaco_test_names_guanaco_pairs(oasst, pairs_dir: Path) -> None:
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "guanaco_test", "--data", pairs_dir))
    assert line == (f"error: {pairs_dir}/test.jsonl:1: row is a preference pair (`prompt`, `chosen`, `rejected`), "
                    "not a conversation: score the test.jsonl of `oasst build --pairs` with --tasks guanaco_pairs")


@pytest.mark.parametrize(("flags", "expected"), [
    ((), "task guanaco_pairs needs --data DIR: the output folder of `oasst build --pairs MODE --test-size F` "
         "(with test.jsonl)"),
    (("--data", "build"), "build/test.jsonl not found: --data must be an `oasst build --pairs MODE --test-size F` "
                          "output folder with test.jsonl"),
    (("--data", "build", "--num-fewshot", "2"), "--num-fewshot 2: guanaco_pairs is scored zero-shot; its only split "
                                                "is the test pairs, which lm-eval would show the model as examples"),
], ids=["no-data", "no-test-split", "few-shot"])
def test_missing_pairs_or_few_shot_is_one_line(oasst, tmp_path: Path, flags: tuple[str, ...], expected: str) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    line = assert_refused(oasst("eval", "--model", STORIES, "--tasks", "guanaco_pairs", *flags))
    assert line == f"error: {expected}"
