"""The GGUF-only steps of loading a model from a `.gguf` file: the tokenizer's BOS, EOS and add-BOS rule set to what
the file declares, and a 4-bit load through a dequantized float32 folder (transformers will not quantize a GGUF load).

`load.py` calls both (`_load_tokenizer`, `_from_pretrained`) and is what callers use. They are apart from it because
they concern GGUF files only and each works around a transformers limit, with its own condition for deletion. Named
`from_gguf`, not `gguf`, so it is never mistaken for the `gguf` package it imports. Nothing heavy at import.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError


def _match_gguf_special_tokens(tokenizer: Any, path: Path) -> None:
    """Give a GGUF tokenizer the BOS/EOS the file declares, and its add-BOS rule, with one warning when they differ.

    transformers 5.17 converts a sentencepiece ("llama") GGUF vocabulary with EOS = `<s>` (the BOS) and without
    adding BOS (5.24 reads the file's ids): trained that way, a model learns to end its replies with BOS. Delete when
    transformers < 5.24 is no longer supported.
    """
    import gguf

    fields = gguf.GGUFReader(str(path)).fields

    def scalar(key: str) -> Any:
        entry = fields.get(key)
        return entry.parts[entry.data[0]].tolist()[0] if entry is not None and entry.data else None

    fixed = []
    for role in ("bos", "eos"):
        want = scalar(f"tokenizer.ggml.{role}_token_id")
        if want is not None and 0 <= want < len(tokenizer) and getattr(tokenizer, f"{role}_token_id") != want:
            before = getattr(tokenizer, f"{role}_token")
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(want))
            fixed.append(f"{role} {before!r} -> {tokenizer.convert_ids_to_tokens(want)!r}")
    add_bos = scalar("tokenizer.ggml.add_bos_token")
    if add_bos is not None and tokenizer.bos_token_id is not None:
        adds = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
        if bool(add_bos) != adds and hasattr(tokenizer, "update_post_processor"):
            tokenizer.add_bos_token = bool(add_bos)
            tokenizer.update_post_processor()
            fixed.append(f"add BOS {adds} -> {bool(add_bos)}")
    if fixed:
        import transformers

        sys.stderr.write(f"warning: transformers {transformers.__version__} read the tokenizer of {path} otherwise "
                         f"than the file declares; corrected: {'; '.join(fixed)}\n")


def _gguf_in_4bit(source: str, config: Any, kwargs: dict[str, Any]) -> Any:
    """A GGUF model quantized to 4 bits: dequantized to a float32 folder first, since transformers refuses to
    quantize a GGUF load ("You cannot combine Quantization and loading a model from a GGUF file", 5.17 and 5.24).

    The folder lives only for the load; the model keeps the GGUF path as its name (adapters record it).
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    # Late: load.py imports this module; and a test's patch of load._plain_falcon_linear applies here too.
    from oasst_model.load import _first_line, _plain_falcon_linear

    gguf_file = kwargs["gguf_file"]
    plain = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, config=config, **(plain | {"dtype": torch.float32}))
    except (OSError, ValueError) as exc:
        raise OasstError(f"cannot load model {source}/{gguf_file}: {_first_line(exc)}") from None
    # The weights are plain floats now, but transformers still marks the model GGUF-quantized and will not save
    # it; a model built from the same config without the mark takes the same state dict.
    float_config = loaded.config
    if hasattr(float_config, "quantization_config"):
        del float_config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(float_config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    with tempfile.TemporaryDirectory(prefix="oasst-gguf-") as folder:
        rebuilt.save_pretrained(folder)
        del rebuilt
        rest = {k: v for k, v in kwargs.items() if k != "gguf_file"}
        with _plain_falcon_linear(enabled=float_config.model_type == "falcon"):
            net = AutoModelForCausalLM.from_pretrained(folder, **rest)
    name = str(Path(source) / gguf_file)
    net.config._name_or_path = net.name_or_path = name
    return net
