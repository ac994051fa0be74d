"""Load a base model (+ tokenizer) the way QLoRA needs it, and attach LoRA adapters.

Shared by `oasst train`, `oasst merge`, `oasst generate`, `oasst chat` and the `oasst eval` plug-in:

    from oasst_model.load import load_model, load_adapter, count_linear4bit
    model, tokenizer = load_model("../shared/models/stories260K")
    model = load_adapter(model, "out/adapter")

What this module guarantees that a bare `from_pretrained` does not:
- a 4-bit request really quantizes (Falcon's `FalconLinear` included) and fails loudly when nothing was;
- the tokenizer has a pad token distinct from EOS, so EOS stays a trained, generated token;
- no remote code runs unless asked; a `.gguf` path is accepted as the model (its own steps: `from_gguf`).

What the user named is checked first, without torch, by `locate` (`check_source`, re-exported here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oasst_model.from_gguf import _gguf_in_4bit, _match_gguf_special_tokens
# check_source and check_model_folder are re-exported: callers import them from here.
from oasst_model.locate import _resolve_source, check_model_folder, check_source  # noqa: F401
from oasst_tools.errors import OasstError, clipped

DTYPES = ("bfloat16", "float16", "float32")


def load_model(
    model: str,
    *,
    load_in_4bit: bool = False,
    compute_dtype: str = "bfloat16",
    quant_type: str = "nf4",
    double_quant: bool = True,
    gguf_file: str | None = None,
    device_map: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    fused_attention: bool = True,
) -> tuple[Any, Any]:
    """Base model and tokenizer from a local folder, a hub id or a `.gguf` file, optionally in 4-bit.

    `fused_attention` switches Falcon's multi-query attention to sdpa's fused kernels (oasst_model.attention);
    it does nothing for other models or when another attention implementation is asked for.
    """
    import torch

    if compute_dtype not in DTYPES:
        raise OasstError(f"compute dtype {compute_dtype!r} is not one of {', '.join(DTYPES)}")
    if quant_type not in ("nf4", "fp4"):
        raise OasstError(f"quant type {quant_type!r} is not one of nf4, fp4")
    source, gguf_file = _resolve_source(model, gguf_file)
    dtype = getattr(torch, compute_dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise OasstError("attn_implementation flash_attention_2 needs the flash-attn package (pip install "
                             "flash-attn, CUDA GPUs only); use sdpa")
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(compute_dtype, quant_type, double_quant)
    # In 4-bit mode this is the dtype of what stays unquantized (norms, embeddings, head), as in QLoRA.
    kwargs["dtype"] = dtype

    config = _load_config(source, kwargs)
    tokenizer = _load_tokenizer(source, gguf_file, trust_remote_code)
    net = _from_pretrained(source, config, kwargs)
    if load_in_4bit:
        n = count_linear4bit(net)
        if n == 0:
            raise OasstError(
                f"4-bit loading of {model} quantized 0 linear layers (bitsandbytes skipped them all); "
                "refusing to train a full-precision model by accident: use --no-load-in-4bit to train without "
                "quantization"
            )
        _keep_cpu_weights_unpacked(net)
        left = _unquantized_linears(net)
        if left:
            warnings.warn(f"{len(left)} linear layers stayed unquantized in 4-bit mode: {', '.join(left[:5])}",
                          stacklevel=2)
    set_pad_token(tokenizer, net)
    if fused_attention and getattr(net.config, "_attn_implementation", None) == "sdpa":
        from oasst_model.attention import use_fused_attention

        use_fused_attention(net)
    return net, tokenizer


def load_tokenizer(model: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer `load_model(model)` returns (GGUF fixes and pad token included), without loading the weights."""
    source, gguf_file = _resolve_source(model, None)
    tokenizer = _load_tokenizer(source, gguf_file, trust_remote_code)
    set_pad_token(tokenizer)
    return tokenizer


def count_linear4bit(model: Any) -> int:
    """Number of `bitsandbytes.nn.Linear4bit` modules in `model` (0 when bitsandbytes is absent)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def load_adapter(model: Any, adapter_dir: str, *, is_trainable: bool = False, base: str | None = None) -> Any:
    """`model` wrapped as a `PeftModel` with the LoRA adapter in `adapter_dir`, checked to fit it first and to have
    loaded whole after; `base` names the model in messages (default: the name it was loaded under)."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    adapter_config = read_adapter_config(folder)
    _check_adapter_fits(model, folder, adapter_config)
    with warnings.catch_warnings():
        # peft warns when the stored base name differs from the loaded path; the shape check above is the real test.
        warnings.simplefilter("ignore", UserWarning)
        try:
            wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        # LoraConfig(**adapter_config.json) with a key or value it does not take (a value of another shape fails
        # where peft first uses it: an AttributeError).
        except (TypeError, AttributeError) as exc:
            raise OasstError(f"{folder / 'adapter_config.json'}: peft cannot read this adapter config "
                             f"({_first_line(exc)})") from None
        except (RuntimeError, ValueError, KeyError) as exc:  # peft's words for an adapter of another base
            raise OasstError(_peft_mismatch(folder, adapter_config, base or model_name(model), exc)) from None
    _check_adapter_loaded(wrapped, folder)
    return wrapped


def _peft_mismatch(folder: Path, adapter_config: dict[str, Any], base: str, exc: BaseException) -> str:
    """The error line for a peft load failure: the adapter does not fit the model named `base` (a layer's size, a
    target module it lacks), said as which adapter, which base, and peft's reason in one line."""
    import re

    message = str(exc)
    size = re.search(r"size mismatch for (?:base_model\.model\.)?(\S+?)(?:\.default)?\.weight: copying a param "
                     r"with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape in current model is "
                     r"torch\.Size\(\[([\d, ]*)\]\)", message)
    if size:
        why = f"{size.group(1)} is [{size.group(2)}] in the adapter but [{size.group(3)}] in the model"
    elif isinstance(exc, KeyError) and exc.args:  # peft looked up a tensor or module by a name (modules_to_save)
        why = (f"peft found no {exc.args[0]!r} in the adapter's weights or the model (adapter_config.json's "
               "modules_to_save or target_modules name it)")
    else:
        why = (message.strip().splitlines()[0] if message.strip() else "its weights do not load")[:300]
    trained_on = adapter_config.get("base_model_name_or_path") or "an unnamed model"
    return f"{adapter_mismatch(folder, trained_on, base)}: {why}"


def _check_adapter_loaded(model: Any, folder: Path) -> None:
    """Refuse an adapter whose file lacks weights its config's layers need, or holds NaN or infinite values.

    peft loads whatever keys match and leaves the rest at their initial values (lora_B zero: the layer acts as the
    base), warning at most: an adapter with its tensors renamed or dropped would score as the base model, silently.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    def adapter_state(embeddings: bool) -> dict[str, Any]:
        with warnings.catch_warnings():  # save_embedding_layers="auto" would look the named base up, and warn
            warnings.simplefilter("ignore", UserWarning)
            return get_peft_model_state_dict(model, save_embedding_layers=embeddings)

    weights = folder / "adapter_model.safetensors"
    needed = adapter_state(False)
    with safe_open(str(weights), framework="pt") as f:
        held = set(f.keys())
    missing = [key for key in needed if key not in held]
    if missing:
        raise OasstError(f"{weights}: {len(missing)} of the {len(needed)} weights the layers in adapter_config.json "
                         f"need are not in the file (first: {missing[0]}): those layers would act untrained")
    extra = held - needed.keys()
    if extra:  # an adapter may also hold embeddings (a resized vocabulary), which peft loads: asked for only then
        extra -= adapter_state(True).keys()
    if extra:
        sys.stderr.write(f"warning: {weights}: {len(extra)} tensor(s) match no adapted layer and are ignored "
                         f"(first: {min(extra)})\n")
    bad = next((key for key, value in needed.items() if not bool(torch.isfinite(value).all())), None)
    if bad is not None:
        raise OasstError(f"{weights}: {bad} holds NaN or infinite values (a run that diverged?): the adapter is "
                         "unusable")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter_config.json of a LoRA adapter folder, checked (with its weights file) before any model loads:
    one error line naming the file for a missing folder, a config that is not a LoRA config, or weights that
    are missing, truncated or not safetensors."""
    from oasst_tools.files import check_safetensors, missing_file, read_json_object

    if not folder.is_dir():
        if folder.exists():
            raise OasstError(f"adapter {folder} is a file, not a folder (give the folder `oasst train` wrote)")
        raise missing_file(folder, "adapter folder")
    config_file = folder / "adapter_config.json"
    if not config_file.exists():
        raise OasstError(f"{folder} is not a LoRA adapter: it has no adapter_config.json")
    config = read_json_object(config_file, "adapter config")
    if config.get("peft_type") != "LORA":
        found = f"peft_type {config['peft_type']!r}" if "peft_type" in config else "no peft_type"
        raise OasstError(f"{config_file}: not a LoRA adapter config ({found}; expected \"peft_type\": \"LORA\")")
    for key, kinds, what in (("r", (int,), "a positive integer"), ("lora_alpha", (int, float), "a number")):
        value = config.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
            raise OasstError(f"{config_file}: `{key}` must be {what}, not {value!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
                                    and 0 <= dropout < 1):
        raise OasstError(f"{config_file}: `lora_dropout` must be a number in [0, 1), not {dropout!r}")
    for key, kinds, what in (("rank_pattern", (int,), "positive integers"), ("alpha_pattern", (int, float), "numbers")):
        pattern = config.get(key)  # per-layer overrides of r and lora_alpha: {layer name pattern: value}
        if pattern is not None and not (isinstance(pattern, dict) and all(
                isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in pattern.values())):
            raise OasstError(f"{config_file}: `{key}` must map layer names to {what}, not {clipped(repr(pattern))}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise OasstError(f"{config_file}: `target_modules` must name the adapted layers, not {targets!r}")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise OasstError(f"{folder} has no adapter_model.safetensors (the adapter's weights)")
    check_safetensors(weights, "adapter weights")
    return config


def lora_target_modules(model: Any) -> list[str]:
    """Names (last path part) of every linear layer but the output head: QLoRA's choice, per architecture."""
    import torch

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    return sorted(names - head_names)


def set_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    """Give the tokenizer a pad token that is not EOS, reusing an existing special token when there is one.

    With pad == EOS, collators that mask padding also mask every EOS, and the model never learns to stop.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise OasstError(f"tokenizer of {tokenizer.name_or_path} has no EOS token; cannot teach the model to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
        tokenizer.pad_token = _pick_pad_token(tokenizer)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def model_name(model: Any) -> str:
    """The name or path a model was loaded from (for messages and summaries)."""
    return str(getattr(model.config, "_name_or_path", "") or model.__class__.__name__)


def _pick_pad_token(tokenizer: Any) -> str:
    """An existing non-EOS, non-BOS special token (unk first), else a new `<pad>` added to the vocabulary."""
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    candidates = [tokenizer.unk_token] if tokenizer.unk_token else []
    candidates += [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for token in candidates:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id not in taken and token_id < len(tokenizer):
            return token
    # Only reached by tokenizers without any spare special token; the id lands past the embedding matrix,
    # so the caller must resize embeddings. No model shipped here needs it.
    raise OasstError(f"tokenizer of {tokenizer.name_or_path} has no special token to pad with besides EOS; "
                     "add a pad token to the tokenizer first")


def _bnb_config(compute_dtype: str, quant_type: str, double_quant: bool) -> Any:
    """A 4-bit `BitsAndBytesConfig`, or a clear error when bitsandbytes is not installed."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401 - only checking that it is there
    except ImportError:
        raise OasstError("4-bit loading needs bitsandbytes, which is not installed: "
                         "pip install bitsandbytes, or pass --no-load-in-4bit") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def _load_config(source: str, kwargs: dict[str, Any]) -> Any:
    """The model config, with `auto_map` dropped unless remote code was asked for."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=kwargs["trust_remote_code"],
                                            **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    except (OSError, ValueError) as exc:
        raise OasstError(f"cannot load the config of {source}: {_first_line(exc)}") from None
    if not kwargs["trust_remote_code"] and hasattr(config, "auto_map"):
        # A stale auto_map (Falcon's points at remote code) must not be saved with adapters or merged models.
        del config.auto_map
    return config


def _load_tokenizer(source: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    """The model's tokenizer (from the GGUF file when there is one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
        if gguf_file:
            _match_gguf_special_tokens(tokenizer, Path(source) / gguf_file)
        return tokenizer
    except (OSError, ValueError, TypeError) as exc:
        raise OasstError(f"cannot load the tokenizer of {source}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a damaged file
        raise OasstError(f"cannot load the tokenizer of {source}: {_first_line(exc)}") from None


def _from_pretrained(source: str, config: Any, kwargs: dict[str, Any]) -> Any:
    """`AutoModelForCausalLM.from_pretrained` with Falcon's linear layers made quantizable."""
    from transformers import AutoModelForCausalLM

    quantize = "quantization_config" in kwargs
    if quantize and "gguf_file" in kwargs:
        return _gguf_in_4bit(source, config, kwargs)
    with _plain_falcon_linear(enabled=quantize and config.model_type == "falcon"):
        try:
            return AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        except (OSError, ValueError) as exc:
            raise OasstError(f"cannot load model {source}: {_first_line(exc)}") from None
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":
                raise
            # check_model_folder reads headers only; a file damaged inside its tensor data shows up here.
            raise OasstError(f"cannot load model {source}: a weights file is damaged ({_first_line(exc)})") from None


@contextlib.contextmanager
def _plain_falcon_linear(enabled: bool) -> Iterator[None]:
    """Build Falcon with plain `nn.Linear` layers so bitsandbytes replaces them.

    transformers 5.x (checked 5.17, 5.24 and 5.25) replaces only `type(module) is nn.Linear`; Falcon's `FalconLinear`
    subclass (same weights, forward = x @ W.T + b) is skipped and the model silently stays in 16 bits. Registered as
    the `falcon_4bit_linear` patch (oasst_model.patches): when FalconLinear changed, the swap is skipped with a warning
    and the 4-bit count check decides. Delete when `replace_with_bnb_linear` accepts `nn.Linear` subclasses.
    """
    from oasst_model import patches

    if not enabled or not patches.applies("falcon_4bit_linear"):
        yield
        return
    import torch
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.FalconLinear
    modeling_falcon.FalconLinear = torch.nn.Linear
    try:
        yield
    finally:
        modeling_falcon.FalconLinear = original
    patches.activated("falcon_4bit_linear")


def _keep_cpu_weights_unpacked(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50.2 repacks a Linear4bit's weight in place on the first no-grad CPU forward (on CPUs with
    AVX512-BF16) and asserts out_features % 32 == 0 there (stories260K's 172-wide MLP fails); the repacked weight
    also no longer dequantizes with `dequantize_4bit`, which `oasst merge` needs. Registered as the
    `bnb_cpu_weights_unpacked` patch. Delete when that is fixed.
    """
    import bitsandbytes as bnb

    from oasst_model import patches

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers or not patches.applies("bnb_cpu_weights_unpacked"):
        return
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    patches.activated("bnb_cpu_weights_unpacked", len(layers))


def _unquantized_linears(model: Any) -> list[str]:
    """Names of linear layers (other than the head) that a 4-bit load left in full precision."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit) and m is not head]


def adapter_mismatch(folder: Any, trained_on: Any, base: Any) -> str:
    """The start of the error for an adapter whose weights do not fit a base model (named as the adapter names its
    base, or not)."""
    from oasst_tools.files import same_path

    if same_path(str(trained_on), str(base)):  # one model, perhaps named by another path
        return f"adapter {folder} does not fit {base}, the model it names as its base (changed since it was trained?)"
    return f"adapter {folder} was trained on {trained_on}, not on {base}"


def _check_adapter_fits(model: Any, folder: Path, adapter_config: dict[str, Any]) -> None:
    """Raise a one-line OasstError when the adapter's LoRA matrices do not match `model`'s layers."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    trained_on = adapter_config.get("base_model_name_or_path") or "an unnamed model"
    base = model_name(model)
    if not weights.is_file():
        raise OasstError(f"{folder} has no adapter_model.safetensors")
    modules = dict(model.named_modules())
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError: either way the file cannot be used
        raise OasstError(f"{weights}: cannot be read as safetensors ({_first_line(exc)})") from None
    with handle as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            module_path = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            module = modules.get(module_path)
            if module is None:
                raise OasstError(f"{adapter_mismatch(folder, trained_on, base)}: "
                                 f"{base} has no layer {module_path}")
            rows, cols = f.get_slice(key).get_shape()
            rank = adapter_config["r"]
            if rows != rank and not adapter_config.get("rank_pattern"):
                # The adapter's own two files disagree: not the base's fault, whatever peft's size message says.
                raise OasstError(f"{folder}: adapter_config.json says r {rank}, but {key} in "
                                 f"adapter_model.safetensors has rank {rows}: the config is not these weights' own")
            in_features = getattr(module, "in_features", None)
            if in_features is not None and in_features != cols:
                raise OasstError(f"{adapter_mismatch(folder, trained_on, base)}: layer "
                                 f"{module_path} takes {in_features} inputs, the adapter expects {cols}")
            b_key = key.replace(".lora_A.", ".lora_B.")
            out_features = getattr(module, "out_features", None)
            if out_features is not None and b_key in f.keys() and f.get_slice(b_key).get_shape()[0] != out_features:
                raise OasstError(f"{adapter_mismatch(folder, trained_on, base)}: layer "
                                 f"{module_path} has {out_features} outputs, the adapter "
                                 f"{f.get_slice(b_key).get_shape()[0]}")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (library errors can span screens)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__
