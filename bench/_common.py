"""What every benchmark records beside its numbers: package versions and the machine."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

# `python -c` code that runs `oasst` with the train plug-in registered in-process: the GPU machine runs the repo
# from PYTHONPATH, without installed entry points.
TRAIN_LAUNCHER = "import oasst_tools.cli as c; c.EXTRA_COMMANDS['train'] = 'oasst_train.cli:train'; c.main()"


def versions(names: Iterable[str]) -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # Carried wheels unpacked with --target have no installed metadata; ask the module instead.
            try:
                found[name] = str(__import__(name).__version__)
            except Exception:  # a missing or broken optional package: leave it out
                continue
    return found


def machine() -> dict[str, object]:
    """GPU, CPU count and host, for reading the times later."""
    import torch

    info: dict[str, object] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def median_ms(torch: Any, once: Callable[[], None], repeats: int, cuda: bool, warmup: int = 3) -> float:
    """Median milliseconds of `once()` after `warmup` calls: CUDA events on a GPU (the device's own timeline),
    the host clock on a CPU."""
    import statistics
    import time

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            once()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def add_trainer_callback(make: Callable[[], Any]) -> None:
    """Give every trainer `oasst train` builds in this process the callback `make()` returns (instrumentation)."""
    import oasst_train.trainer as trainer_module

    build = trainer_module._build_trainer

    def with_callback(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.add_callback(make())
        return trainer

    trainer_module._build_trainer = with_callback
