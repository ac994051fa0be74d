"""Quiet output: the README demo's steps (build -> train -> eval) print only our own lines on stderr, `-v` brings the
libraries' warnings and bars back, and `oasst eval`'s bars count requests in place of lm-eval's tqdm bars."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORIES

REPO = Path(__file__).resolve().parents[2]
# What the libraries print when nobody silences them: python warnings and their source lines, tqdm bars, transformers'
# and lm-eval's log lines, a settings dict dumped as Python.
NOISE = re.compile(r"Warning\b|warnings\.warn|deprecated|site-packages|\|[█▏▎▍▌▋▊▉ ]*\||\d(it|s)/(s|it)\]|"
                   r"examples/s\]|Token indices sequence length|Loading weights|\[transformers\]|^[{}]|"
                   r"^\s*'[a-z0-9_]+': |\{'[a-z0-9_]+': |Running loglikelihood|kernels|already-initialized model|"
                   r"Custom kwargs")


def _oasst(*args: object) -> subprocess.CompletedProcess:
    """`oasst ARGS` in a fresh interpreter from the repository root, as the demo runs it (library loggers bind stderr
    when they load, so only a subprocess sees what they print)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "oasst_tools", *map(str, args)], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _noise(stderr: str) -> list[str]:
    """Lines that are not ours: library noise, or a `warn` that is not our own `warning: ...` line."""
    return [line for line in stderr.splitlines()
            if NOISE.search(line) or ("warn" in line.lower() and not line.startswith("warning: "))]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """scripts/demo.sh's three steps, shorter (fewer training steps and eval items), each one's stderr."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    out = tmp_path_factory.mktemp("demo")
    fixtures = REPO / "fixtures" / "oasst1"
    build = _oasst("build", "--input", fixtures / "validation-en-sample.messages.jsonl", "--input",
                   fixtures / "en-20.trees.jsonl.gz", "--lang", "en", "--top-rank", "--test-size", "0.25", "--seed", 1,
                   "--out", out / "data")
    train = _oasst("train", "--config", REPO / "train" / "recipes" / "tiny-cpu.yaml", "--data", out / "data", "--out",
                   out / "adapter", "--max-steps", 4, "--eval-steps", 2)
    evaluate = _oasst("eval", "--model", STORIES, "--adapter", out / "adapter", "--compare-base", "--tasks",
                      "hellaswag,guanaco_test", "--data", out / "data", "--limit", 8, "--out", out / "eval")
    return {"out": out, "build": build.stderr, "train": train.stderr, "eval": evaluate.stderr}


@pytest.mark.slow
@pytest.mark.parametrize("step", ["build", "train", "eval"])
def test_demo_steps_print_only_our_own_lines_on_stderr(demo: dict[str, Any], step: str) -> None:
    assert _noise(demo[step]) == [], demo[step]


@pytest.mark.slow
def test_train_prints_one_line_for_its_config_and_eval_explains_long_texts_once(demo: dict[str, Any]) -> None:
    out = demo["out"]
    # The recipe's model, as the recipe writes it.
    assert (f"oasst train ../shared/models/stories260K on {out / 'data'} -> {out / 'adapter'} "
            f"(config: {out / 'adapter' / 'train_config.yaml'})") in demo["train"].splitlines()
    assert "learning_rate" not in demo["train"]
    # guanaco_test holds a 1,528-token conversation; stories260K's tokenizer declares 512.
    explained = [line for line in demo["eval"].splitlines() if line.startswith("texts longer than the model's")]
    assert explained == ["texts longer than the model's 512 tokens (one of 1528) are scored in windows of the "
                         "model's length (guanaco_test) or from the end of their context (choice tasks such as "
                         "hellaswag)"]


@pytest.mark.slow
def test_verbose_lets_library_warnings_and_bars_through(demo: dict[str, Any]) -> None:
    adapter = demo["out"] / "adapter"
    quiet = _oasst("generate", adapter, "--prompt", "Hi", "--max-new-tokens", 2)
    assert quiet.stderr == "[stopped: max_new_tokens, 2 tokens]\n"
    verbose = _oasst("generate", adapter, "--prompt", "Hi", "--max-new-tokens", 2, "-v")
    from importlib.metadata import version

    from packaging.version import Version

    # peft before 0.22 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning the quiet run
    # hides); peft 0.22 reads it under its new name and warns nothing here. The bar shows on every release.
    if Version(version("peft")) < Version("0.22"):
        assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in verbose.stderr
    assert "Loading weights" in verbose.stderr
    assert set(quiet.stderr.splitlines()) <= set(verbose.stderr.splitlines())
    assert verbose.stdout == quiet.stdout  # the same answer: -v changes what is printed, nothing else


class _FakeLM:
    """The LM interface lm-eval's evaluator calls, recording the disable_tqdm it was given."""

    def __init__(self) -> None:
        self.answered: Any = None
        self.calls: list[tuple[str, int, bool]] = []

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.calls.append(("loglikelihood", len(requests), disable_tqdm))
        self.answered(len(requests))  # FastHFLM reports each batch's answers
        return [(0.0, True)] * len(requests)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        self.calls.append(("loglikelihood_rolling", len(requests), disable_tqdm))
        return [0.0] * len(requests)


def test_request_bars_turn_lm_evals_bars_off_and_put_everything_back() -> None:
    from lm_eval.api import task as lm_eval_task

    from oasst_eval.progress import request_bars

    lm, original_tqdm = _FakeLM(), lm_eval_task.tqdm
    with request_bars(lm, "base"):
        assert lm_eval_task.tqdm is not original_tqdm
        assert list(lm_eval_task.tqdm(["a", "b"], total=2)) == ["a", "b"]  # the documents, as tqdm yields them
        assert lm.loglikelihood(["r"] * 3) == [(0.0, True)] * 3
        assert lm.loglikelihood_rolling(["r"] * 2) == [0.0, 0.0]
    assert lm.calls == [("loglikelihood", 3, True), ("loglikelihood_rolling", 2, True)]
    assert lm_eval_task.tqdm is original_tqdm
    assert "loglikelihood" not in vars(lm) and lm.answered is None


def test_tokenizer_threads_only_where_the_pool_is_off_by_our_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_model import quiet

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(quiet, "_PARALLELISM_OURS", False)
    with quiet.quiet():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        with quiet.tokenizer_threads():
            assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    # The user's own setting stays as it is, inside and out.
    monkeypatch.setattr(quiet, "_PARALLELISM_OURS", False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with quiet.quiet(), quiet.tokenizer_threads():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
