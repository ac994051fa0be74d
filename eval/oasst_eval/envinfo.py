"""lm-eval's environment report, gathered once while the model loads instead of inside every scoring run.

lm-eval 0.4.13's `simple_evaluate` ends each run with `get_git_commit_hash()` (`git describe` in the working
folder) and `add_env_info()` (torch's `collect_env`: `pip list`, `conda list`, `nvidia-smi`, `nvcc`, `gcc`, ...):
2.3 s on this 2-core machine, about 3 s of a 12 s HellaSwag run on the GPU machine, paid again for the base model
under `--compare-base`. Here both run once, in a thread started before the model loads; lm-eval's two names in
`lm_eval.evaluator` then hand over what the thread gathered, so the results JSON holds the same keys and text.
The `git describe` runs with its stderr discarded (lm-eval lets "fatal: not a git repository" through to ours).
Registered as the `lm_eval_env_info_prefetch` patch: when lm-eval changed these names, nothing is replaced.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PATCH = "lm_eval_env_info_prefetch"


def _git_hash() -> str | None:
    """lm-eval's `get_git_commit_hash`, with git's complaints kept off our stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"],  # noqa: S607 - as lm-eval runs it
                                       stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError, OSError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def env_info_prefetched() -> Iterator[None]:
    """Gather lm-eval's environment report in a thread from here on, and make `simple_evaluate` use it inside."""
    from oasst_model import patches

    if not patches.applies(PATCH):
        yield
        return
    from lm_eval import evaluator

    own_add, own_git = evaluator.add_env_info, evaluator.get_git_commit_hash
    found: dict[str, Any] = {}

    def gather() -> None:
        try:
            found["git"] = _git_hash()
            report: dict[str, Any] = {}
            own_add(report)
            found["env"] = report
        except Exception:  # noqa: BLE001 - lm-eval's own call then runs in simple_evaluate and reports it
            pass

    thread = threading.Thread(target=gather, name="oasst-env-info", daemon=True)
    thread.start()

    def add_env_info(storage: dict[str, Any]) -> None:
        thread.join()
        if "env" in found:
            storage.update(found["env"])
        else:
            own_add(storage)

    def get_git_commit_hash() -> str | None:
        thread.join()
        return found["git"] if "git" in found else own_git()

    evaluator.add_env_info, evaluator.get_git_commit_hash = add_env_info, get_git_commit_hash
    patches.activated(PATCH)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = own_add, own_git
