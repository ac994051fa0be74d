"""`oasst merge`: fold a LoRA adapter into a copy of its base model (16- or 32-bit: the run's compute dtype, or
--compute-dtype), checked against base + adapter.

    result = merge_adapter(Path("runs/stories"), Path("runs/stories-merged"))

An adapter trained on a 4-bit base learned to correct the *dequantized* 4-bit weights, not the original ones,
so the merge starts from those: each Linear4bit is dequantized into the copy before the LoRA update is added.
The merged logits are then compared with the 4-bit base + adapter on a Guanaco prompt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from oasst_model.spec import check_value
from oasst_tools.errors import OasstError
from oasst_tools.files import write_failure
from oasst_tools.output import MARKER, RENAME_BLOCKED, clean_stale, parents_made, temp_folder
from oasst_train.data import guanaco_prompt

CHECK_PROMPT = guanaco_prompt("Write two sentences about a friendly dog and explain why dogs wag their tails.")


def merge_adapter(adapter: Path, out: Path, *, compute_dtype: str | None = None, tolerance: float | None = None,
                  **flags: Any) -> dict[str, Any]:
    """Write the merged model (+ tokenizer) to `out`; returns dtype, parameters and the logit check.

    The base loads as the adapter's train_config.yaml says, unless loading `flags` (None = not given) say otherwise;
    `compute_dtype` is the merged model's dtype (default: the one it was trained with; auto: by device).
    """
    import dataclasses

    from oasst_tools.output import check_apart
    from oasst_tools.files import check_out_folder
    from oasst_train.generate import base_settings

    if out.is_symlink():  # the rename at the end would fail on it, after the whole merge
        raise OasstError(f"--out {out} is a symbolic link; pass the folder itself or another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OasstError(f"--out {out} already exists and is not empty; choose another folder")
    spec = base_settings(adapter, **flags)
    if compute_dtype is not None:
        spec = dataclasses.replace(spec, compute_dtype=check_value("compute_dtype", compute_dtype, "--compute-dtype"))
    check_apart(out, [("adapter", adapter), ("--model", spec.model)])
    check_out_folder(out, "--out")

    import torch

    from oasst_model.load import load_adapter
    from oasst_model.spec import device_profile, load

    dtype = spec.resolved(device_profile()).compute_dtype
    # The check runs in float32 so that it can be tight: the reference dequantizes the same 4-bit weights whatever
    # the compute dtype, and a float32 merge differs from it only by summation order.
    reference, tokenizer = load(dataclasses.replace(spec, compute_dtype="float32"))
    reference.eval()
    plain, _ = load(dataclasses.replace(spec, load_in_4bit=False, compute_dtype="float32", adapter=None,
                                        tokenizer=None), device="cpu")
    if spec.load_in_4bit:
        _copy_dequantized(reference, plain)
    merged = load_adapter(plain, str(adapter)).merge_and_unload()
    device = next(reference.parameters()).device
    merged = merged.to(device=device).eval()

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        want = reference(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
        diff = float((want - got).abs().max())
        if tolerance is None:
            tolerance = 1e-3 * max(1.0, float(want.abs().max()))
        if not diff <= tolerance:
            raise OasstError(f"merged logits differ from base + adapter by {diff:.3g} (tolerance {tolerance:.3g}); "
                             "the merged model was not written")
        merged = merged.to(getattr(torch, dtype))
        rounded = float((want - merged(input_ids=ids).logits.float()).abs().max())

    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    _publish(merged, tokenizer, out)
    return {"dtype": dtype, "parameters": sum(p.numel() for p in merged.parameters()), "max_logit_diff": diff,
            "tolerance": tolerance, "max_logit_diff_saved": rounded, "from_4bit": spec.load_in_4bit}


def _publish(merged: Any, tokenizer: Any, out: Path) -> None:
    """Save into a folder of this process's own beside `out` (`.{out}.tmp-{pid}-{random}`, as oasst build does:
    a fixed `out.tmp` name deleted a user's folder of that name), then rename it into place: an empty `out` is
    replaced, one that another program filled meanwhile is not. A failed save leaves nothing behind."""
    with parents_made(out):
        clean_stale(out)  # what merges that were killed left
        tmp: Path | None = None
        try:
            tmp = temp_folder(out)  # its marker lets clean_stale tell it from a user's folder
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).unlink()  # a merged model is no build output: `oasst build --overwrite` must not replace it
            try:
                os.rename(tmp, out)  # rename(2) replaces an empty folder, never a non-empty one
            except OSError as exc:
                if exc.errno not in RENAME_BLOCKED:
                    raise
                raise OasstError(f"--out {out}: written by another program while this merge ran; nothing replaced "
                                 "(choose another --out)") from None
        except BaseException as exc:
            if tmp is not None:  # a full disk or a file-size limit mid-save: no half-written model is left
                shutil.rmtree(tmp, ignore_errors=True)
            reason = write_failure(exc)
            if reason is None:
                raise
            raise OasstError(f"--out {out}: {reason} (writing the merged model)") from None


def _copy_dequantized(quantized: Any, plain: Any) -> None:
    """Overwrite each linear weight of `plain` with the dequantized 4-bit weight the adapter was trained on."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    plain_modules = dict(plain.named_modules())
    base = quantized.get_base_model()
    copied = 0
    for name, module in base.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        # peft wraps the quantized layer as `<name>.base_layer`; the plain model has it at `<name>`.
        target_name = name.removesuffix(".base_layer")
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
        with torch.no_grad():
            plain_modules[target_name].weight.copy_(weight.to(dtype=torch.float32, device="cpu").reshape(
                plain_modules[target_name].weight.shape))
        copied += 1
    if copied == 0:
        raise OasstError("the adapter was trained in 4-bit but the reloaded base has no 4-bit layers to dequantize")
