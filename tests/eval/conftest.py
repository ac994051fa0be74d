"""Shared fixtures for the `oasst eval` tests: offline Hub, a CLI runner, stories260K and a trained adapter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import STORIES

# datasets and huggingface_hub read these once, at import: set them before anything imports either.
_HF_CACHE = tempfile.mkdtemp(prefix="oasst-eval-hf-")
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": _HF_CACHE})

REPO = Path(__file__).resolve().parents[2]
GUANACO = REPO / "fixtures" / "guanaco-en"
HELLASWAG_FIXTURE = REPO / "fixtures" / "hellaswag" / "validation.jsonl"
TASKS_DIR = REPO / "eval" / "oasst_eval" / "tasks"
TRAIN_STEPS = 30
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="session")
def guanaco_dir() -> Path:
    """The `oasst build` sample: train.jsonl (171 rows) and test.jsonl (17 rows)."""
    return GUANACO


@pytest.fixture(scope="session")
def lm_eval_tasks_dir() -> Path:
    """The task YAMLs this package ships, for `lm_eval --include_path`."""
    return TASKS_DIR


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in its own folder, offline, with no data-location variables inherited."""
    monkeypatch.chdir(tmp_path)
    for name in ("OASST_EVAL_DATA", "OASST_EVAL_GUANACO"):
        monkeypatch.delenv(name, raising=False)
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    # In case another test module imported datasets before this conftest set the variables.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(_HF_CACHE))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


@pytest.fixture
def oasst(monkeypatch: pytest.MonkeyPatch) -> Callable[..., object]:
    """Run `oasst ARGS...` in-process with only our plug-ins registered; returns click's Result."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli
    from oasst_eval.cli import eval_command

    monkeypatch.setattr(core_cli, "DISCOVER_ENTRY_POINTS", False)
    monkeypatch.setattr(core_cli, "EXTRA_COMMANDS", {"eval": eval_command})

    def run(*args: object) -> object:
        return CliRunner().invoke(core_cli.cli, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for stories260K trained on fixtures/guanaco-en/train.jsonl.

    Trained by `oasst train` when the train plug-in runs; otherwise by a tiny peft loop, with a warning,
    so the eval tests do not depend on the train plug-in being finished.
    """
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    root = tmp_path_factory.mktemp("adapter")
    adapter = _train_with_oasst(root / "oasst-train")
    if adapter is None:
        adapter = root / "peft-loop"
        _train_with_peft(adapter)
    assert (adapter / "adapter_config.json").is_file()
    return adapter


def _train_with_oasst(out: Path) -> Path | None:
    try:
        from click.testing import CliRunner

        import oasst_tools.cli as core_cli
        from oasst_train.cli import train
    except ImportError as exc:
        warnings.warn(f"oasst train unavailable ({exc}); training the test adapter with a plain peft loop",
                      stacklevel=2)
        return None
    old = core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS
    core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = {"train": train}, False
    try:
        # tiny-cpu recipe settings minus 4-bit (faster on CPU), no checkpoints or periodic evaluation.
        result = CliRunner().invoke(core_cli.cli, [
            "train", "--model", str(STORIES), "--data", str(GUANACO), "--no-load-in-4bit", "--max-steps", str(TRAIN_STEPS),
            "--learning-rate", "5e-3", "--batch-size", "8", "--grad-accum", "1", "--max-length", "256", "--compute-dtype",
            "float32", "--precision", "fp32", "--no-gradient-checkpointing", "--save-steps", "100000",
            "--eval-steps", "100000", "--quiet", "--out", str(out),
        ])
    finally:
        core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = old
    if result.exit_code != 0 or not (out / "adapter_config.json").is_file():
        warnings.warn(f"oasst train failed (exit {result.exit_code}): {result.output[-500:]}; "
                      f"training the test adapter with a plain peft loop", stacklevel=2)
        return None
    return out


def _train_with_peft(out: Path, steps: int = 40) -> None:
    """40 AdamW steps of LoRA r16 on all linear layers (a few seconds): guanaco_test loss falls by about 1 nat."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.pad_token = tokenizer.eos_token  # stories260K has no pad token
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ))
    texts = [json.loads(line)["text"] for line in (GUANACO / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(steps):
        batch = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=256)
        loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama half the width of stories260K, with its tokenizer: a base the adapter cannot fit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    out = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(STORIES)
    config.hidden_size, config.intermediate_size, config.head_dim, config.num_hidden_layers = 32, 86, 4, 2
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copy2(STORIES / name, out / name)
    return out
