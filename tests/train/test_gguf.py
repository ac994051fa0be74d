"""A `.gguf` model through the trainer's loader, offline: stories260K converted to GGUF at test time (the `stories_gguf`
fixture of tests/train/conftest.py), first checked against transformers' own GGUF path, then loaded in 4-bit by
load_model (which dequantizes it to a float folder and quantizes that, since transformers refuses GGUF + 4-bit) and
trained for a few steps by `oasst train`.

tests/train/test_model.py::test_gguf_model_loads_in_4bit stays the opt-in test on a real, block-quantized GGUF
(OASST_TEST_GGUF); this file needs nothing outside the repository and ../shared/models/stories260K.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.train.conftest import GUANACO, RECIPES, read_summary

TEXTS = (
    "Once upon a time, there was a little girl named Lily.",
    "### Human: What is a llama?### Assistant: A llama is an animal that lives in the mountains.",
    "Tom said, \"Let's go to the park!\"  Two  spaces,\na newline, émoji 🙂 and 中文 (byte fallback).",
)
# Transformers' GGUF loader reads F32 tensors back bit for bit, so the fixture's logits equal the original's; the
# bound only leaves room for a different matmul order. A misplaced weight moves them by whole units (see below).
GGUF_FLOAT_ATOL = 1e-4
# Both 4-bit loads quantize the same float32 weights with the same bitsandbytes call: measured difference 0.0 (CPU,
# bitsandbytes 0.50.2, transformers 5.24 and 5.25). Wrong weights land 3-4 orders of magnitude above the bound: rounded
# to bfloat16 before quantizing 3.5, one layer's q_proj left at its random init 7.7, none loaded 21.0 (planted in
# _gguf_in_4bit); in the float model, one linear layer zeroed 5.4-10.0, one q or k kept in llama.cpp's rotary order
# 5.2. NF4 alone moves stories260K's logits by 6.3 on TEXTS, hence 4-bit against 4-bit, never against the float model.
GGUF_4BIT_ATOL = 1e-3


def max_logit_difference(net: Any, reference: Any, tokenizer: Any) -> float:
    """Largest |logit difference| between two models over TEXTS, each text run alone (stories260K has no pad token)."""
    import torch

    with torch.no_grad():
        return max((net(ids).logits - reference(ids).logits).abs().max().item()
                   for ids in (tokenizer(text, return_tensors="pt").input_ids for text in TEXTS))


def test_gguf_fixture_loads_in_transformers_with_the_original_weights(stories_gguf: Path, stories: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_net = AutoModelForCausalLM.from_pretrained(stories_gguf.parent, gguf_file=stories_gguf.name,
                                                    dtype=torch.float32)
    net = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(gguf_net.config, key) == getattr(net.config, key), key
    # GGUF stores the epsilon as a float32: 1e-5 comes back as 9.9999997e-06.
    assert gguf_net.config.rms_norm_eps == pytest.approx(net.config.rms_norm_eps, rel=1e-6)
    assert gguf_net.config.rope_parameters["rope_theta"] == net.config.rope_parameters["rope_theta"]
    ours, theirs = gguf_net.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    # q and k included: transformers' un-permutation undoes the fixture's llama.cpp permutation exactly.
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    difference = max_logit_difference(gguf_net, net, AutoTokenizer.from_pretrained(stories))
    assert difference <= GGUF_FLOAT_ATOL, difference


def test_gguf_fixture_tokenizer_encodes_like_the_original(stories_gguf: Path, stories: Path) -> None:
    from transformers import AutoTokenizer

    import transformers
    from packaging.version import Version

    gguf_tokenizer = AutoTokenizer.from_pretrained(stories_gguf.parent, gguf_file=stories_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(stories)
    assert gguf_tokenizer.get_vocab() == tokenizer.get_vocab()
    if Version(transformers.__version__) < Version("5.24"):
        # transformers 5.17 takes `<s>` for EOS and adds no BOS (what oasst_model.load corrects, warning, and
        # what the 4-bit test below checks through load_model); 5.24 reads the file's ids.
        assert (gguf_tokenizer.eos_token_id, gguf_tokenizer("a").input_ids[0]) == (1, tokenizer("a").input_ids[1])
        return
    assert ((gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id, gguf_tokenizer.unk_token_id)
            == (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0))
    rows = [json.loads(line) for line in (GUANACO / "train.jsonl").read_text(encoding="utf-8").splitlines()[:20]]
    for text in (*TEXTS, "", *(row["text"] for row in rows)):
        ids = tokenizer(text).input_ids
        assert gguf_tokenizer(text).input_ids == ids, text
        assert gguf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_gguf_model_loads_in_4bit_with_the_weights_of_its_float_original(stories_gguf: Path, stories: Path) -> None:
    from oasst_model.load import count_linear4bit, load_model

    net, tokenizer = load_model(str(stories_gguf), load_in_4bit=True, compute_dtype="float32")
    reference, reference_tokenizer = load_model(str(stories), load_in_4bit=True, compute_dtype="float32")
    assert count_linear4bit(net) == count_linear4bit(reference) == 35  # 5 layers x 7; the tied head stays float
    assert net.name_or_path == net.config._name_or_path == str(stories_gguf)
    assert tokenizer.pad_token_id == reference_tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)  # the file's, on every transformers version
    assert [tokenizer(text).input_ids for text in TEXTS] == [reference_tokenizer(text).input_ids for text in TEXTS]
    difference = max_logit_difference(net, reference, reference_tokenizer)
    assert difference <= GGUF_4BIT_ATOL, difference


@pytest.mark.slow
def test_train_on_a_gguf_model_quantizes_it_and_names_it_in_the_adapter(oasst, stories_gguf: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories_gguf, "--data", GUANACO,
                   "--out", out, "--max-steps", 3, "--save-steps", 3, "--eval-rows", 4, "-q")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert (summary["global_step"], summary["linear4bit_layers"]) == (3, 35)
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == str(stories_gguf)
