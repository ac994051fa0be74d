"""Find the newest checkpoint that was written to the end, so `--resume` never picks a half-written one.

transformers' Trainer writes a checkpoint file by file (adapter, optimizer, scheduler, RNG, trainer_state.json
last) straight into `checkpoint-N/`; a run killed in between leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from oasst_tools.errors import OasstError

CHECKPOINTS = "checkpoints"
# Everything Trainer.train(resume_from_checkpoint=...) reads back to continue exactly where it stopped.
REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} missing"
    if not any(folder.glob("rng_state*.pth")):
        return "rng_state.pth missing"
    # torch.save writes zip archives whose directory sits at the end: a cut file cannot be opened.
    for name in TORCH_FILES + tuple(p.name for p in folder.glob("rng_state*.pth")):
        try:
            with zipfile.ZipFile(folder / name):
                pass
        except (zipfile.BadZipFile, OSError):
            return f"{name} is truncated"
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return "trainer_state.json is truncated"
    if f"checkpoint-{state.get('global_step')}" != folder.name:
        return f"trainer_state.json says step {state.get('global_step')}"
    if not _safetensors_complete(folder / "adapter_model.safetensors"):
        return "adapter_model.safetensors is truncated"
    return None


def last_complete_checkpoint(out: Path) -> Path | None:
    """The complete `checkpoint-N` with the highest N under `out/checkpoints`, or None."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-", 1)[1].isdigit())
    for _, path in reversed(steps):
        if incomplete_reason(path) is None:
            return path
    return None


def require_checkpoint(out: Path) -> Path:
    """The checkpoint `--resume` continues from, or a one-line error saying why there is none."""
    found = last_complete_checkpoint(out)
    if found is not None:
        return found
    partial = sorted((out / CHECKPOINTS).glob("checkpoint-*")) if (out / CHECKPOINTS).is_dir() else []
    if partial:
        reasons = "; ".join(f"{p.name}: {incomplete_reason(p)}" for p in partial)
        raise OasstError(f"--resume: no complete checkpoint in {out / CHECKPOINTS} ({reasons})")
    raise OasstError(f"--resume: no checkpoint in {out / CHECKPOINTS}; start without --resume")


def _safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is as long as its header says."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size >= 8 + size + end
