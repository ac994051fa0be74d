"""Find the newest checkpoint that was written to the end, so `--resume` never picks a half-written one.

transformers' Trainer writes a checkpoint file by file (adapter, optimizer, scheduler, RNG, trainer_state.json
last) straight into `checkpoint-N/`; a run killed in between, a full disk or a damaged file leaves a folder that
looks like a checkpoint. `--resume` takes the newest one that passes every check below and says, in one warning
line, which newer ones it skipped and why.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from oasst_model.spec import CHECKPOINTS  # noqa: F401 - defined beside the record each checkpoint holds a copy of
from oasst_tools.errors import OasstError
from oasst_train import report
# Everything Trainer.train(resume_from_checkpoint=...) reads back to continue exactly where it stopped.
REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
_NAME = re.compile(r"checkpoint-([0-9]+)")


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is. Never raises: a file that cannot even be
    read is a reason too."""
    try:
        return _incomplete_reason(folder)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file does, the answer is "not usable"
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc).strip() else ''})"


def _incomplete_reason(folder: Path) -> str | None:
    from oasst_tools.files import safetensors_problem

    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} missing"
    rng = sorted(p.name for p in folder.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth missing"
    # torch.save writes zip archives whose directory sits at the end: a cut file cannot be opened.
    for name in TORCH_FILES + tuple(rng):
        try:
            with zipfile.ZipFile(folder / name) as archive:
                if not archive.namelist():
                    return f"{name} is empty"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return f"{name} is truncated"
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
        return "trainer_state.json is truncated"
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object"
    if f"checkpoint-{state.get('global_step')}" != folder.name:
        return f"trainer_state.json says step {state.get('global_step')}"
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
        return "adapter_config.json is not valid JSON"
    if not isinstance(adapter_config, dict):
        return "adapter_config.json is not a JSON object"
    problem = safetensors_problem(folder / "adapter_model.safetensors")
    if problem is not None:
        return f"adapter_model.safetensors: {problem}"
    return None


def checkpoint_folders(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` under `out/checkpoints`, by step (numerically: 5 before 10)."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def last_complete_checkpoint(out: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The complete `checkpoint-N` with the highest N under `out/checkpoints`, or None; newer incomplete ones
    are appended to `skipped` with the reason."""
    for _, path in reversed(checkpoint_folders(out)):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        if skipped is not None:
            skipped.append((path, reason))
    return None


def require_checkpoint(out: Path, warn: Callable[[str], None] | None = None) -> Path:
    """The checkpoint `--resume` continues from, or a one-line error saying why there is none. Newer checkpoints
    that had to be skipped are named in one warning line (through `warn`, else on stderr)."""
    skipped: list[tuple[Path, str]] = []
    found = last_complete_checkpoint(out, skipped)
    if found is not None:
        if skipped:
            reasons = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
            (warn or report.warn)(f"--resume: skipping {reasons}; resuming from {found.name}")
        return found
    if skipped:
        reasons = "; ".join(f"{p.name}: {reason}" for p, reason in reversed(skipped))
        raise OasstError(f"--resume: no complete checkpoint in {out / CHECKPOINTS} ({reasons})")
    raise OasstError(f"--resume: no checkpoint in {out / CHECKPOINTS}; start without --resume")


def finished_at(checkpoint: Path, max_steps: int, epochs: float) -> int | None:
    """The step of `checkpoint` when it already reached the run's end (`max_steps`, or with -1 the steps its epochs
    came to, unless `epochs` is now more than the run planned), else None: a --resume from it has no step left to
    train (transformers would train one more)."""
    import json

    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        done, planned = int(state["global_step"]), int(state.get("max_steps") or 0)
        planned_epochs = float(state.get("num_train_epochs") or 0)
    # `require_checkpoint` checked it
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if max_steps <= 0 and epochs > planned_epochs:
        return None  # more epochs asked for on resume: transformers trains them
    target = max_steps if max_steps > 0 else planned
    return done if target > 0 and done >= target else None
