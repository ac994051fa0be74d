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

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The helpers are public here too: callers ask the registry (patches.missing_params, patches.installed, ...).
from oasst_model.targets import (FALCON, FALCON_ATTENTION_ATTRS, FALCON_ATTENTION_PARAMS,  # noqa: F401
                                 FALCON_CONFIG_ATTRS, HFLM_INSTANCE_ATTRS, check_hflm_instance, check_lora_module,
                                 describe_missing, installed, missing_attrs, missing_params,
                                 trainer_keeps_running_loss)
from oasst_model.targets import (
    _bnb_packs_for_cpu, _check_autocast, _check_bnb_cpu_packing, _check_bnb_fold, _check_compile,
    _check_falcon_attention, _check_falcon_linear, _check_lm_eval_env_info, _check_lm_eval_hellaswag,
    _check_lm_eval_loglikelihood, _check_lm_eval_request_bars, _check_lm_eval_templates, _check_lazy_metrics,
    _check_resume_non_blocking,
    _check_backend_tokenize, _check_carved_dropout, _check_collated_boundaries, _check_concat_lora, _check_peft_lora,
    _check_shared_context, _check_varlen, _falcon_linear_subclass)

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
        name="varlen_attention",
        library="torch",
        target="torch.nn.attention.varlen.varlen_attn (called by the fused Falcon attention for packed rows on a GPU)",
        written_for="torch 2.10 (is_causal) to 2.13 (window_size, enable_gqa)",
        why="packed examples attend within themselves only, each at its own length, instead of through a mask over "
            "every pair of tokens in the row",
        fallback="the block-diagonal mask through sdpa (the same values, quadratic in the packed row)",
        check=_check_varlen,
    ),
    Patch(
        name="collated_boundaries",
        library="trl",
        target="trl's DataCollatorForLanguageModeling (padding_free) batch keys cu_seq_lens_q/_k and max_length_q/_k, "
               "recomputed on the host and taken by the fused attention's planner (train option async_inputs)",
        written_for="trl 1.16.0",
        why="no host wait for the GPU at every forward of a packed batch: the varlen kernel's boundaries come with "
            "the batch instead of being read back from the GPU",
        fallback="the planner reads the example starts back from the GPU (one host wait per forward)",
        check=_check_collated_boundaries,
    ),
    Patch(
        name="resume_non_blocking",
        library="transformers",
        target="transformers.trainer.skip_first_batches (wrapped while a resumed run trains) and the _non_blocking "
               "attribute of the accelerate DataLoaderShard it returns (train option async_inputs, on a GPU)",
        written_for="transformers 5.17.0, 5.24.0, 5.25.0; accelerate 1.15.0, 1.16.0",
        why="the loader rebuilt to skip a resumed epoch's seen batches keeps the non-blocking copy (accelerate builds "
            "it blocking): no host wait for the GPU at every step of that epoch",
        fallback="the rest of the resumed epoch copies each batch with a wait (later epochs do not)",
        check=_check_resume_non_blocking,
    ),
    Patch(
        name="fused_lora",
        library="peft",
        target="peft.tuners.lora.layer.Linear.forward and peft.tuners.lora.bnb.Linear4bit.forward (per instance)",
        written_for="peft 0.21.0, 0.21.2, 0.22.0",
        why="the LoRA update added inside one addmm instead of a clone, a scale and an add over the layer output",
        fallback="peft's own LoRA forward",
        check=_check_peft_lora,
    ),
    Patch(
        name="concat_lora",
        library="bitsandbytes",
        target="bitsandbytes.nn.Linear4bit.forward (not called: reproduced for LoRA layers over it, with "
               "bitsandbytes.functional.dequantize_4bit) inside the fused_lora forward",
        written_for="bitsandbytes 0.50.2, peft 0.21.0, 0.21.2, 0.22.0",
        why="a 4-bit linear and its LoRA update as one GEMM over [x | lora_A(dropout(x))] and [dequant(W) | s B], "
            "forward and backward",
        fallback="fused_lora's addmm over bitsandbytes' own 4-bit product",
        check=_check_concat_lora,
    ),
    Patch(
        name="carved_lora_dropout",
        library="torch",
        target="torch.nn.Dropout as peft's LoRA dropout modules (lora_dropout; not called inside compiled layers: "
               "reproduced with four 15-bit uniforms to a random word) inside the fused_lora forward",
        written_for="torch 2.11, 2.13, 2.15; peft 0.21.0, 0.21.2, 0.22.0",
        why="LoRA dropout masks from a quarter of the random draws inside compiled layers (one Philox call per four "
            "elements instead of one per element)",
        fallback="peft's dropout module as it is (torch's dropout, one random draw per element)",
        check=_check_carved_dropout,
    ),
    Patch(
        name="eval_folded_4bit_lora",
        library="peft",
        target="peft.tuners.lora.bnb.Linear4bit.forward (per instance, during oasst eval) with "
               "bitsandbytes.functional.dequantize_4bit",
        written_for="peft 0.21.2, 0.22.0, bitsandbytes 0.50.2",
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
        name="lazy_metrics",
        library="trl",
        target="trl.SFTTrainer.compute_loss and .log, transformers Trainer._track_num_input_tokens and "
               "get_train_dataloader (per trainer instance), TrainingArguments.logging_nan_inf_filter "
               "(train option lazy_metrics)",
        written_for="trl 1.16.0 with transformers 5.17.0, 5.24.0, 5.25.0",
        why="no host wait for the GPU inside a step: trl's metrics read when logged, tokens counted at collate",
        fallback="trl's compute_loss and the Trainer's token count, with their waits for the GPU",
        check=_check_lazy_metrics,
    ),
    Patch(
        name="lm_eval_backend_tokenize",
        library="tokenizers",
        target="a fast tokenizer's backend Tokenizer.encode_batch(strings, add_special_tokens=...) and Encoding.ids, "
               "called by FastHFLM instead of the tokenizer's __call__ (checked against it on the first 32 strings)",
        written_for="tokenizers 0.23.3 with transformers 5.24, 5.25; the GPU image's with transformers 5.17",
        why="transformers converts each encoding in Python: 0.37 s of HellaSwag's 0.56 s tokenizing, GPU idle",
        fallback="the tokenizer's own __call__ (also when the first strings' ids differ)",
        check=_check_backend_tokenize,
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
