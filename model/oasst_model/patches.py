"""Every place oasst-tools replaces or wraps another library's internals, in one registry, each guarded.

    from oasst_model import patches
    if patches.applies("falcon_fused_attention"):   # checks the target; warns and says False when it changed
        ...patch...
        patches.activated("falcon_fused_attention", layers)
    summary["patches"] = patches.report()            # what train_summary.json / eval_summary.json record

A patch is written against one shape of its target (a signature, attribute names). Before patching, its check
reads the installed target; when the target changed, the patch is not applied, the library's own code runs, and one
warning line names the patch, the installed version and what changed. Checks are cheap (signatures, `hasattr`) and
run every time a patch is asked for, so a library swapped at run time (a test, a notebook) is seen.

Standard library only at import: the checks import their targets when they run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# A check returns None when the target is as the patch expects, else what changed (one short phrase).
Check = Callable[[], "str | None"]


@dataclass(frozen=True)
class Patch:
    """One replacement of, or wrapper around, a third-party internal."""

    name: str
    library: str  # the distribution whose internals it touches (its installed version goes into warnings)
    target: str  # what it replaces or wraps
    written_for: str  # versions it was written for and tested on
    why: str  # what it buys
    fallback: str  # what runs when its check fails
    check: Check
    # When set and returning False, the patch has nothing to do on this install (e.g. the bug it works around is
    # gone): it is skipped quietly, without a warning.
    needed: Callable[[], bool] | None = None


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


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch(
        name="falcon_4bit_linear",
        library="transformers",
        target=f"{FALCON}.FalconLinear (built as torch.nn.Linear while the model loads in 4-bit)",
        written_for="transformers 5.17.0, 5.24.0, 5.25.0",
        why="transformers 5 quantizes only exact nn.Linear; Falcon's FalconLinear subclass would stay 16-bit",
        fallback="FalconLinear as transformers builds it; the 4-bit count check then refuses a load that "
                 "quantized nothing",
        check=_check_falcon_linear,
        needed=_falcon_linear_subclass,
    ),
    Patch(
        name="falcon_fused_attention",
        library="transformers",
        target=f"{FALCON}.FalconAttention.forward (per instance) and a forward pre-hook on FalconModel",
        written_for="transformers 5.17.0, 5.24.0 (forward(hidden_states, alibi, attention_mask, ...)) and 5.25.0 "
                    "(forward(hidden_states, attention_mask, ...))",
        why="multi-query keys/values expanded so sdpa's fused kernels run; a leak-free block mask for packed rows",
        fallback="transformers' own FalconAttention.forward (packing then refused on transformers < 5.24)",
        check=_check_falcon_attention,
    ),
    Patch(
        name="fused_lora",
        library="peft",
        target="peft.tuners.lora.layer.Linear.forward and peft.tuners.lora.bnb.Linear4bit.forward (per instance)",
        written_for="peft 0.21.0, 0.21.2",
        why="the LoRA update added inside one addmm instead of a clone, a scale and an add over the layer output",
        fallback="peft's own LoRA forward",
        check=_check_peft_lora,
    ),
    Patch(
        name="eval_folded_4bit_lora",
        library="peft",
        target="peft.tuners.lora.bnb.Linear4bit.forward (per instance, during oasst eval) with "
               "bitsandbytes.functional.dequantize_4bit",
        written_for="peft 0.21.2, bitsandbytes 0.50.2",
        why="a LoRA adapter over a 4-bit base scored as one product per layer (adapter folded into dequant(W))",
        fallback="peft's own LoRA forward over the 4-bit layer",
        check=_check_bnb_fold,
    ),
    Patch(
        name="bnb_cpu_weights_unpacked",
        library="bitsandbytes",
        target="bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu (set False per instance)",
        written_for="bitsandbytes 0.50.2",
        why="0.50.2 repacks 4-bit weights in place on the first no-grad CPU forward and then asserts "
            "out_features % 32 == 0; repacked weights no longer dequantize for oasst merge",
        fallback="bitsandbytes' own CPU path (repacking)",
        check=_check_bnb_cpu_packing,
        needed=_bnb_packs_for_cpu,
    ),
    Patch(
        name="cast_norm_outputs",
        library="torch",
        target="forward hooks on every torch.nn.LayerNorm (public hook API, autocast dtype queries)",
        written_for="torch 2.11.0, 2.13.0",
        why="LayerNorm outputs handed on in the autocast dtype once instead of fp32 that every consumer casts",
        fallback="no hooks: fp32 norm outputs as autocast returns them",
        check=_check_autocast,
    ),
    Patch(
        name="lm_eval_fast_loglikelihood",
        library="lm-eval",
        target="lm_eval.models.huggingface.HFLM.loglikelihood and _loglikelihood_tokens (subclass FastHFLM), "
               "lm_eval.models.utils.Collator, _add_special_kwargs, has_bos_prefix",
        written_for="lm-eval 0.4.13",
        why="logits only at the continuation positions, one transfer per batch, token-budget batches",
        fallback="lm-eval's own HFLM",
        check=_check_lm_eval_loglikelihood,
    ),
    Patch(
        name="lm_eval_shared_context",
        library="transformers",
        target="the model's forward with a caller's [batch, 1, query, key] attention mask and position ids "
               "(transformers.masking_utils.create_causal_mask returns a 4-D mask as it is), under FastHFLM",
        written_for="transformers 5.17, 5.24, 5.25 (sdpa and eager attention)",
        why="a multiple-choice context runs once for all its choices (HellaSwag: half the model tokens)",
        fallback="one row per request (FastHFLM's unshared path; also when the first batch's shared and unshared "
                 "log-likelihoods differ)",
        check=_check_shared_context,
    ),
    Patch(
        name="lm_eval_env_info_prefetch",
        library="lm-eval",
        target="lm_eval.evaluator.add_env_info and get_git_commit_hash (replaced during oasst eval)",
        written_for="lm-eval 0.4.13",
        why="the environment report simple_evaluate writes after every run (torch's collect_env: pip list, "
            "nvidia-smi, ...; git describe) costs 2-3 s per run; gathered once, in a thread, while the model loads",
        fallback="lm-eval's own report, gathered inside each simple_evaluate",
        check=_check_lm_eval_env_info,
    ),
    Patch(
        name="compile_layers",
        library="torch",
        target="torch.nn.Module.compile on each decoder block (transformers' _no_split_modules), "
               "torch._dynamo.config.suppress_errors / cache_size_limit (train option compile_layers)",
        written_for="torch 2.11.0, 2.13.0",
        why="fuses the element-wise kernels between a layer's matrix products; one compilation for all layers",
        fallback="eager layers (and, per block, eager where dynamo cannot compile)",
        check=_check_compile,
    ),
    Patch(
        name="lm_eval_template_cache",
        library="lm-eval",
        target="lm_eval.utils.apply_template (replaced during oasst eval)",
        written_for="lm-eval 0.4.13",
        why="each prompt template compiled once instead of once per document",
        fallback="lm-eval's own apply_template",
        check=_check_lm_eval_templates,
    ),
    Patch(
        name="lm_eval_hellaswag_docs_cache",
        library="lm-eval",
        target="lm_eval.tasks.hellaswag.utils.process_docs (called once per dataset by the shipped hellaswag task)",
        written_for="lm-eval 0.4.13",
        why="lm-eval re-runs process_docs over all 10,042 rows each time a task reads its documents",
        fallback="lm-eval's own process_docs, uncached (one error line if it is gone: the shipped task needs it)",
        check=_check_lm_eval_hellaswag,
    ),
    Patch(
        name="lm_eval_request_bars",
        library="lm-eval",
        target="lm_eval.api.task.tqdm (the bar Task.build_all_requests draws per task; replaced while oasst eval "
               "scores, without -v)",
        written_for="lm-eval 0.4.13",
        why="one rich bar over every task's documents instead of a tqdm bar per task and model",
        fallback="lm-eval's own tqdm bars while requests are built",
        check=_check_lm_eval_request_bars,
    ),
)}

# name -> what happened in this run: "active (N)", "fallback: ...", "not needed: ...". Reset by `begin_run`.
_RUN: dict[str, str] = {}
_COUNTS: dict[str, int] = {}  # name -> places an active patch was applied to in this run
_WARNED: set[str] = set()


def begin_run() -> None:
    """Forget what the previous command recorded (one process may run several commands: tests, notebooks)."""
    _RUN.clear()
    _COUNTS.clear()
    _WARNED.clear()


def applies(name: str, *, problem: str | None = None) -> bool:
    """Whether patch `name` may be applied now: its target is as expected (else one warning, and False).

    `problem` lets a caller report what an instance-level check found (attributes set in `__init__`)."""
    patch = PATCHES[name]
    if patch.needed is not None and not _safe(patch.needed, True):
        _RUN.setdefault(name, "not needed on this install")
        return False
    if problem is None:
        problem = _safe_check(patch)
    if problem is None:
        return True
    fallback(name, problem)
    return False


def fallback(name: str, problem: str, *, seen_at_run_time: bool = False) -> None:
    """Record that patch `name` is off because its target changed (or, `seen_at_run_time`, because a check of its
    results failed), and say so once on stderr."""
    patch = PATCHES[name]
    _RUN[name] = f"fallback: {problem}"
    if name not in _WARNED:
        _WARNED.add(name)
        why = (f"{problem} ({patch.library} {installed(patch.library)})" if seen_at_run_time else
               f"{patch.library} {installed(patch.library)} changed its target ({problem})")
        sys.stderr.write(f"warning: patch {name} is off: {why}; running {patch.fallback} (written for "
                         f"{patch.written_for})\n")
        sys.stderr.flush()


def not_applicable(name: str, why: str) -> None:
    """Record that patch `name` has nothing to do for this model (`why`), without a warning."""
    _RUN.setdefault(name, f"not needed: {why}")


def activated(name: str, count: int = 1, *, once: bool = False) -> None:
    """Record that patch `name` was applied to `count` places in this run (`once`: unless it is active already,
    for a patch that runs at every call rather than being installed)."""
    if once and _RUN.get(name) == "active":
        return
    if count > 0:
        _COUNTS[name] = _COUNTS.get(name, 0) + count if _RUN.get(name) == "active" else count
        _RUN[name] = "active"


def report() -> dict[str, dict[str, Any]]:
    """What `train_summary.json` / `eval_summary.json` record: each patch this run considered, its state, where
    it applied, the installed version of its library and the versions it was written for."""
    out = {}
    for name, state in _RUN.items():
        patch = PATCHES[name]
        out[name] = {"state": state.split(":")[0], "detail": state.partition(": ")[2] or None,
                     "places": _COUNTS.get(name, 0) if state == "active" else 0,
                     "library": f"{patch.library} {installed(patch.library)}", "written_for": patch.written_for}
    return out


def check_all() -> dict[str, str | None]:
    """Patch name -> None when its target is as expected, else what changed (for `scripts/test-latest.sh`)."""
    return {name: _safe_check(patch) for name, patch in PATCHES.items()}


def _safe_check(patch: Patch) -> str | None:
    try:
        return patch.check()
    except Exception as exc:  # noqa: BLE001 - a check that cannot read its target means the target changed
        return f"check failed: {type(exc).__name__}: {exc}"


def _safe(func: Callable[[], bool], default: bool) -> bool:
    try:
        return bool(func())
    except Exception:  # noqa: BLE001 - when in doubt, let the check decide
        return default
