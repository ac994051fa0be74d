"""What each patch of the registry (oasst_model.patches) reaches into, and the checks that read it.

A check returns None when its target has the shape the patch was written for, else what changed (one short
phrase). Checks are cheap (signatures, `hasattr`) and import their targets only when they run: standard library
only at import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable
from typing import Any


def installed(library: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def missing_params(func: Any, required: Iterable[str]) -> list[str]:
    """Names in `required` that `func` does not accept by name (a `**kwargs` does not count: the patch reads them
    by position or relies on their meaning, which a catch-all does not promise)."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return list(required)
    return [name for name in required if name not in params
            or params[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def missing_attrs(obj: Any, names: Iterable[str]) -> list[str]:
    """Names in `names` that `obj` does not have."""
    return [name for name in names if not hasattr(obj, name)]


def _import(module: str) -> Any:
    """`module`, or None when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a module that fails to import for any reason is a changed target
        return None


def _module_with(name: str, attrs: Iterable[str]) -> tuple[Any, str | None]:
    """(module `name`, None) when it imports and has `attrs`; else (None, what is wrong), as the checks word it."""
    module = _import(name)
    if module is None:
        return None, f"{name} does not import"
    missing = missing_attrs(module, attrs)
    return (None, describe_missing((name, missing))) if missing else (module, None)


def describe_missing(*parts: tuple[str, list[str]]) -> str | None:
    """One phrase from (what, missing names) pairs, or None when nothing is missing."""
    found = [f"{what} lacks {', '.join(names)}" for what, names in parts if names]
    return "; ".join(found) or None


# ------------------------------------------------------------------------------------------------ the checks

FALCON = "transformers.models.falcon.modeling_falcon"
FALCON_ATTENTION_PARAMS = ("hidden_states", "attention_mask", "position_ids", "layer_past", "use_cache",
                           "output_attentions", "position_embeddings")
FALCON_ATTENTION_ATTRS = ("query_key_value", "dense", "num_heads", "head_dim", "num_kv_heads", "layer_idx", "config")
FALCON_CONFIG_ATTRS = ("multi_query", "new_decoder_architecture", "alibi", "attention_dropout")


def _check_falcon_attention() -> str | None:
    falcon, problem = _module_with(FALCON, ("FalconAttention", "FalconModel", "apply_rotary_pos_emb"))
    if problem:
        return problem
    return describe_missing(
        ("FalconAttention.forward", missing_params(falcon.FalconAttention.forward, FALCON_ATTENTION_PARAMS)),
        ("FalconModel.forward", missing_params(falcon.FalconModel.forward, ("attention_mask", "position_ids"))),
        ("apply_rotary_pos_emb", missing_params(falcon.apply_rotary_pos_emb, ("q", "k", "cos", "sin"))),
    )


def _falcon_linear_subclass() -> bool:
    falcon = _import(FALCON)
    if falcon is None or not hasattr(falcon, "FalconLinear"):
        return False
    import torch

    return falcon.FalconLinear is not torch.nn.Linear


def _check_falcon_linear() -> str | None:
    import torch

    falcon = _import(FALCON)
    if falcon is None:
        return f"{FALCON} does not import"
    if not (isinstance(falcon.FalconLinear, type) and issubclass(falcon.FalconLinear, torch.nn.Linear)):
        return "FalconLinear is no longer an nn.Linear subclass"
    # The swap builds nn.Linear(in_features, out_features, bias=...) where Falcon builds FalconLinear: the same
    # weights only while FalconLinear adds nothing but its forward (x @ W.T + b).
    own = set(vars(falcon.FalconLinear)) - {"__module__", "__doc__", "__qualname__", "__firstlineno__",
                                             "__static_attributes__", "forward"}
    if own:
        return f"FalconLinear defines {', '.join(sorted(own))} beside forward"
    return None


LORA_LAYER_ATTRS = ("lora_A", "lora_B", "scaling", "lora_dropout", "base_layer", "disable_adapters", "merged",
                    "active_adapters", "lora_variant", "use_dora")


def _check_peft_lora() -> str | None:
    layer = _import("peft.tuners.lora.layer")
    if layer is None or not hasattr(layer, "Linear"):
        return "peft.tuners.lora.layer.Linear is gone"
    parts = [("lora.Linear", missing_attrs(layer.Linear, ("_cast_input_dtype", "get_base_layer", "forward")))]
    try:
        params = list(inspect.signature(layer.Linear.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    if len(params) < 2 or params[1].name != "x":
        parts.append(("lora.Linear.forward", ["(self, x, ...)"]))
    bnb = _import("peft.tuners.lora.bnb")
    if bnb is not None and hasattr(bnb, "Linear4bit"):
        parts.append(("lora.bnb.Linear4bit", missing_attrs(bnb.Linear4bit, ("_cast_input_dtype", "forward"))))
    return describe_missing(*parts)


def check_lora_module(module: Any) -> str | None:
    """What a peft LoRA layer instance lacks of the attributes the fused and folded forwards read, or None."""
    return describe_missing((type(module).__name__, missing_attrs(module, LORA_LAYER_ATTRS)))


def _check_bnb_fold() -> str | None:
    problem = _check_peft_lora()
    if problem:
        return problem
    functional = _import("bitsandbytes.functional")
    bnb = _import("peft.tuners.lora.bnb")
    if functional is None:
        return "bitsandbytes.functional does not import"
    return describe_missing(
        ("bitsandbytes.functional", missing_attrs(functional, ("dequantize_4bit",))),
        ("dequantize_4bit", missing_params(functional.dequantize_4bit, ("A", "quant_state"))
         if hasattr(functional, "dequantize_4bit") else []),
        ("peft.tuners.lora.bnb", missing_attrs(bnb, ("Linear4bit",)) if bnb is not None else ["(module)"]),
    )


def _check_concat_lora() -> str | None:
    problem = _check_bnb_fold()  # peft's LoRA layers and bitsandbytes' dequantize_4bit(A, quant_state)
    if problem:
        return problem
    modules, problem = _module_with("bitsandbytes.nn.modules", ("Linear4bit",))
    if problem:
        return problem
    # The concatenated GEMM reproduces Linear4bit.forward: the input in compute_dtype, matmul_4bit with the weight's
    # quant_state and the bias. A forward that does more (or other) than that must run as it is.
    source = _source(modules.Linear4bit.forward)
    unread = [name for name in ("compute_dtype", "matmul_4bit", "quant_state", "bias") if name not in source]
    return describe_missing(("Linear4bit.forward", [f"(reads {name})" for name in unread]))


def _check_carved_dropout() -> str | None:
    problem = _check_peft_lora()  # the fused forward it runs inside, which reads the module's lora_dropout
    if problem:
        return problem
    nn, problem = _module_with("torch.nn", ("Dropout",))
    if problem:
        return problem
    # The carving reproduces F.dropout(x, p, training) from the module's own fields; a Dropout with other state
    # (or none of these) must run as it is.
    return describe_missing(("torch.nn.Dropout", missing_attrs(nn.Dropout(0.1), ("p", "inplace", "training"))))


def _check_bnb_cpu_packing() -> str | None:
    modules = _import("bitsandbytes.nn.modules")
    if modules is None:
        return "bitsandbytes.nn.modules does not import"
    source = _source(modules.Linear4bit.__init__) + _source(modules.Linear4bit.forward)
    if "support_avx512bf16_for_cpu" not in source:
        return "Linear4bit no longer sets or reads support_avx512bf16_for_cpu"
    return None


def _bnb_packs_for_cpu() -> bool:
    modules = _import("bitsandbytes.nn.modules")
    return modules is not None and "packing_format_for_cpu" in _source(modules.Linear4bit.forward)


def _source(func: Any) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


HFLM_METHODS = ("loglikelihood", "_loglikelihood_tokens", "_model_call", "tok_encode")
COLLATOR_METHODS = ("get_batched", "get_cache", "get_original")


def _check_lm_eval_loglikelihood() -> str | None:
    hf = _import("lm_eval.models.huggingface")
    utils = _import("lm_eval.models.utils")
    if hf is None or utils is None:
        return "lm_eval.models.huggingface or lm_eval.models.utils does not import"
    missing = missing_attrs(utils, ("Collator", "_add_special_kwargs", "has_bos_prefix")) + missing_attrs(hf, ("HFLM",))
    if missing:
        return describe_missing(("lm_eval", missing))
    return describe_missing(
        ("HFLM", missing_attrs(hf.HFLM, HFLM_METHODS)),
        ("HFLM._loglikelihood_tokens", missing_params(hf.HFLM._loglikelihood_tokens,
                                                      ("requests", "disable_tqdm", "override_bs"))),
        ("HFLM._model_call", missing_params(hf.HFLM._model_call, ("inps",))),
        ("Collator", missing_attrs(utils.Collator, COLLATOR_METHODS)),
        ("Collator.get_cache", missing_params(utils.Collator.get_cache,
                                              ("req_str", "cxt_toks", "cont_toks", "logits"))),
    )


HFLM_INSTANCE_ATTRS = ("backend", "tokenizer", "prefix_token_id", "add_bos_token", "logits_cache", "softmax_dtype",
                       "cache_hook", "batch_size", "max_length", "device", "rank", "model")


def check_hflm_instance(lm: Any) -> str | None:
    """What a constructed HFLM lacks of the attributes FastHFLM reads, or None."""
    return describe_missing(("HFLM instance", missing_attrs(lm, HFLM_INSTANCE_ATTRS)))


def _check_shared_context() -> str | None:
    masking, problem = _module_with("transformers.masking_utils", ("create_causal_mask",))
    if problem:
        return problem
    return describe_missing(("create_causal_mask", missing_params(masking.create_causal_mask,
                                                                  ("attention_mask", "position_ids"))))


def _check_compile() -> str | None:
    import torch

    dynamo, problem = _module_with("torch._dynamo", ("config",))
    if problem:
        return problem
    return describe_missing(("torch.nn.Module", missing_attrs(torch.nn.Module, ("compile",))),
                            ("torch._dynamo.config", missing_attrs(dynamo.config,
                                                                   ("suppress_errors", "cache_size_limit"))))


def _check_varlen() -> str | None:
    varlen, problem = _module_with("torch.nn.attention.varlen", ("varlen_attn",))
    if problem:
        return problem
    missing = missing_params(varlen.varlen_attn, ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"))
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        missing.append("window_size or is_causal")
    return describe_missing(("varlen_attn", missing))


def _check_collated_boundaries() -> str | None:
    """trl's padding-free collator still names the keys async_inputs fills (None), else what it lacks."""
    from oasst_model.attention import COLLATED_KEYS

    sft, problem = _module_with("trl.trainer.sft_trainer", ("DataCollatorForLanguageModeling",))
    if problem:
        return problem
    source = _source(sft.DataCollatorForLanguageModeling)
    return describe_missing(("DataCollatorForLanguageModeling", [f'"{key}"' for key in COLLATED_KEYS
                                                                 if f'"{key}"' not in source]))


def _check_resume_non_blocking() -> str | None:
    """transformers' Trainer still rebuilds a resumed run's loader through a module-level `skip_first_batches`, and
    accelerate's loader still keeps its copy mode in `_non_blocking` (None), else what changed."""
    _, problem = _module_with("transformers.trainer", ("skip_first_batches",))
    if problem:
        return problem
    loader, problem = _module_with("accelerate.data_loader", ("DataLoaderShard",))
    if problem:
        return problem
    if "self._non_blocking" not in _source(loader.DataLoaderShard):
        return "accelerate.data_loader.DataLoaderShard lacks _non_blocking"
    return None


# What trl's SFTTrainer.compute_loss must still read and write for lazy_metrics to reproduce it (train option).
TRL_COMPUTE_LOSS_NAMES = ("fused_lm_head=True", "log_probs", "label_mask", "entropy", "is_top1",
                          '"mean_token_accuracy"', '"num_tokens"', "_total_train_tokens")


def trainer_keeps_running_loss() -> bool:
    """Whether transformers' Trainer keeps its running loss on the instance (`self._tr_loss`, 5.17-5.25), where
    lazy_metrics can reset it after each log (else it keeps the Trainer's NaN filter on)."""
    trainer = _import("transformers.trainer")
    return trainer is not None and "self._tr_loss" in _source(trainer)


def _check_lazy_metrics() -> str | None:
    sft, problem = _module_with("trl.trainer.sft_trainer", ("SFTTrainer",))
    if problem:
        return problem
    trainer, problem = _module_with("transformers.trainer", ("Trainer",))
    if problem:
        return problem
    import transformers

    source = _source(sft.SFTTrainer.compute_loss)
    loop = _source(trainer)
    return describe_missing(
        ("SFTTrainer.compute_loss", missing_params(sft.SFTTrainer.compute_loss, ("model", "inputs", "return_outputs",
                                                                                "num_items_in_batch"))
         + [name for name in TRL_COMPUTE_LOSS_NAMES if name not in source]),
        ("SFTTrainer", missing_attrs(sft.SFTTrainer, ("log", "get_train_dataloader", "_track_num_input_tokens"))),
        ("transformers.trainer", [] if "self._track_num_input_tokens(" in loop else ["a _track_num_input_tokens call"]),
        ("TrainingArguments", [name for name in ("logging_nan_inf_filter", "include_num_input_tokens_seen")
                               if name not in getattr(transformers.TrainingArguments, "__dataclass_fields__", {})]))


def _check_lm_eval_env_info() -> str | None:
    evaluator, problem = _module_with("lm_eval.evaluator", ("add_env_info", "get_git_commit_hash", "simple_evaluate"))
    if problem:
        return problem
    _, problem = _module_with("lm_eval.loggers.utils", ("get_commit_from_path",))
    if problem:
        return problem
    # simple_evaluate must look both names up in its module when it runs (not hold its own references).
    source = _source(evaluator.simple_evaluate)
    missing = [name for name in ("add_env_info(", "get_git_commit_hash(") if name not in source]
    return describe_missing(("lm_eval.evaluator.add_env_info", missing_params(evaluator.add_env_info, ("storage",))),
                            ("simple_evaluate", [name.rstrip("(") + " call" for name in missing]))


def _check_lm_eval_templates() -> str | None:
    utils, problem = _module_with("lm_eval.utils", ("apply_template", "env"))
    if problem:
        return problem
    return describe_missing(("lm_eval.utils.apply_template", missing_params(utils.apply_template, ("template", "doc"))),
                     ("lm_eval.utils.env", missing_attrs(utils.env, ("from_string",))))


def _check_backend_tokenize() -> str | None:
    tokenizers, problem = _module_with("tokenizers", ("Tokenizer", "Encoding"))
    if problem:
        return problem
    return describe_missing(("tokenizers.Tokenizer.encode_batch",
                             missing_params(tokenizers.Tokenizer.encode_batch, ("add_special_tokens",))),
                            ("tokenizers.Encoding", missing_attrs(tokenizers.Encoding, ("ids",))),
                            ("tokenizers.Tokenizer", missing_attrs(tokenizers.Tokenizer, ("truncation", "padding"))))


def _check_lm_eval_hellaswag() -> str | None:
    hellaswag = _import("lm_eval.tasks.hellaswag.utils")
    if hellaswag is None or not callable(getattr(hellaswag, "process_docs", None)):
        return "lm_eval.tasks.hellaswag.utils.process_docs is gone"
    return describe_missing(("process_docs", missing_params(hellaswag.process_docs, ("dataset",))))


def _check_lm_eval_request_bars() -> str | None:
    task, problem = _module_with("lm_eval.api.task", ("tqdm", "Task"))
    if problem:
        return problem
    # The replacement yields the documents it is handed: the loop must iterate what tqdm wraps, nothing more.
    if "in tqdm(" not in _source(getattr(task.Task, "build_all_requests", None)):
        return "Task.build_all_requests no longer loops over tqdm(...)"
    return None


def _check_autocast() -> str | None:
    import torch

    return describe_missing(("torch", missing_attrs(torch, ("get_autocast_dtype", "is_autocast_enabled"))))
