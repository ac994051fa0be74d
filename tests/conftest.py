"""Fixtures every plug-in's tests share. Standard library and pytest only: tests/eval/conftest.py must still set
the offline variables before anything imports datasets or huggingface_hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
FALCON_TOKENIZER = STORIES.parent / "falcon-7b-tokenizer"


@pytest.fixture(scope="session")
def stories() -> Path:
    """The real, trained 260K-parameter Llama (vocab 512, no pad token)."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    return STORIES


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Plain ChatML (Qwen2.5, SmolLM2): no `{% generation %}` markers; the assistant tokens come from rendering prefixes.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer_of(path: Path, template: str = CHATML) -> object:
    """The tokenizer in `path` with ChatML's two special tokens, a pad token and `template` as its chat template."""
    from transformers import AutoTokenizer

    from oasst_model.load import set_pad_token

    if not path.is_dir():
        pytest.skip(f"{path} not present")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = template
    set_pad_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def chatml_model(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K with ChatML's tokens (embedding grown by two rows) and a ChatML template without markers."""
    from transformers import AutoModelForCausalLM

    tokenizer = chatml_tokenizer_of(stories)
    out = tmp_path_factory.mktemp("stories-chatml")
    model = AutoModelForCausalLM.from_pretrained(stories)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Falcon-7B's architecture and real tokenizer, scaled down to 2 layers of width 64, random weights."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    if not FALCON_TOKENIZER.is_dir():
        pytest.skip(f"{FALCON_TOKENIZER} not present")
    out = tmp_path_factory.mktemp("falcon-tiny")
    config = json.loads((FALCON_TOKENIZER / "config.json").read_text(encoding="utf-8"))
    config.pop("auto_map")  # names remote code; the native FalconForCausalLM is what we test
    config.update(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    FalconForCausalLM(FalconConfig(**config)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(FALCON_TOKENIZER / name, out / name)
    return out
