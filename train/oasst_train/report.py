"""What a training run reports: `train_summary.json`, `loss.png`, the final rich table, and the report_to check."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError


def warn(message: str) -> None:
    """One `warning:` line on stderr: how `oasst train` says what it went on with."""
    import click

    click.echo(f"warning: {message}", err=True)


# report_to value -> the packages transformers can write it with (any one will do).
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "oasst-tools")


def versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (absent ones as "-")."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def check_report_to(report_to: str) -> None:
    """Fail before loading anything when `report_to` names a logger that is not installed.

    transformers would otherwise raise a RuntimeError with a traceback after the model has loaded.
    """
    packages = REPORTERS.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise OasstError(f"--report-to {report_to} needs the {packages[0]} package, which is not installed: "
                         f"pip install {packages[0]}, or pass --report-to none")


@contextlib.contextmanager
def tensorboard_dir(folder: Path) -> Iterator[None]:
    """Send transformers' TensorBoard events to `folder` during one run (unless TENSORBOARD_LOGGING_DIR is set).

    transformers 5.24 opens its writer at the first log call and only learns output_dir in on_train_begin; the
    step-0 evaluation logs before train(), so without this the whole run's events land in ./runs of the working
    directory. A --resume appends to the same folder, so TensorBoard shows one continuous curve. Delete when a
    transformers release opens the writer under output_dir on the first log call.
    """
    name = "TENSORBOARD_LOGGING_DIR"
    if name in os.environ:
        yield
        return
    os.environ[name] = str(folder)
    try:
        yield
    finally:
        del os.environ[name]


def device_name() -> str:
    """The accelerator the run used, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def losses(log_history: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one logged metric, in step order, one per step (the last logged wins)."""
    by_step = {int(entry["step"]): float(entry[key]) for entry in log_history if key in entry and "step" in entry}
    return sorted(by_step.items())


def plot_losses(log_history: Sequence[dict[str, Any]], path: Path) -> None:
    """Training and eval loss against optimizer step, as a PNG (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        # The numbers are in train_summary.json; a machine without matplotlib should not lose the run over a plot.
        warnings.warn("matplotlib is not installed: loss.png not written", stacklevel=2)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o-")):
        points = losses(log_history, key)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_table(summary: dict[str, Any], title: str) -> Any:
    """The run's key figures as a rich table."""
    from rich.table import Table

    def num(value: Any, fmt: str) -> str:
        try:
            return format(value, fmt) if isinstance(value, (int, float)) else "-"
        except ValueError:  # a float where a count belongs (",d"), in a summary read back from disk
            return "-"

    from rich.markup import escape

    table = Table(title=escape(title), show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    # .get throughout: a finished run's summary read back from disk may be older (eval_loss_last was eval_loss)
    # or hand-edited; the table shows "-" for what it lacks.
    get = summary.get
    peak = get("peak_memory_bytes")
    rows = [
        ("steps", num(get("global_step"), ",d")),
        ("train loss first -> last", f"{num(get('train_loss_first'), '.4f')} -> {num(get('train_loss_last'), '.4f')}"),
        ("eval loss first -> last", f"{num(get('eval_loss_first'), '.4f')} -> "
                                    f"{num(get('eval_loss_last', get('eval_loss')), '.4f')}"),
        *([("reward accuracy first -> last", f"{num(get('reward_accuracy_first'), '.3f')} -> "
                                             f"{num(get('reward_accuracy_last'), '.3f')}"),
           ("reward margin first -> last", f"{num(get('reward_margin_first'), '.4f')} -> "
                                           f"{num(get('reward_margin_last'), '.4f')}")]
          if get("method") == "dpo" else []),
        ("real tokens/s", num(get("real_tokens_per_second"), ",.0f")),
        ("tokens seen", num(get("tokens_seen"), ",d")),
        ("4-bit layers", num(get("linear4bit_layers"), ",d")),
        ("trainable parameters", num(get("trainable_parameters"), ",d")),
        ("peak memory", f"{peak / 2**30:.2f} GiB" if isinstance(peak, (int, float)) else "-"),
        ("device", str(get("device", "-"))),
    ]
    for what, value in rows:
        table.add_row(what, escape(value))  # the device name comes from the system, the title from the user
    return table


def replica_checksums(model: Any) -> list[str]:
    """A digest of the trainable weights from every process, rank order: data-parallel replicas must agree.

    A collective under torch.distributed: every rank calls it (run_training does, before rank 0 writes).
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        return [str(g) for g in gathered]
    return [mine]
