"""Results of `oasst eval`: eval_summary.json, the paired difference, the rich table and eval.png.

Standard error of a difference: both models score the same items, so it is the paired one,
sd(adapter_i - base_i) / sqrt(n), far smaller than the two standard errors combined. For per-token scores
(pairs of loglikelihood and token count) the difference of pooled losses is sum(d_i) / sum(tokens_i)
with d_i the per-document difference in negative loglikelihood, and its standard error treats the token
counts as fixed (they are the same for both models).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Iterable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from oasst_tools.files import optional_json

PACKAGES = ("oasst-tools", "lm_eval", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "gguf")


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s}` -> `{"acc": x, "acc_stderr": s, "n": items}` per task."""
    out: dict[str, dict[str, Any]] = {}
    for task, values in results["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            if "," not in key:
                continue  # name, alias, sample_len
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = None if value == "N/A" else value
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            metrics["n"] = n
        out[task] = metrics
    return out


def headline_metrics(results: dict[str, Any], task: str) -> list[str]:
    """The task's metrics in its own metric_list order (no stderr entries)."""
    values = results["results"].get(task, {})
    return [k.partition(",")[0] for k in values if "," in k and "_stderr" not in k]


def paired_difference(base: Sequence[Any], adapter: Sequence[Any]) -> tuple[float, float | None]:
    """(adapter - base, its standard error) over the same items; items are floats or (loglik, tokens) pairs."""
    if len(base) != len(adapter) or not base:
        raise ValueError("paired difference needs the same non-empty items for both models")
    if isinstance(base[0], (tuple, list)):
        tokens = [b[1] for b in base]
        # Loss is -loglik / tokens: the adapter's lower loss is a negative difference.
        d = [-(a[0] - b[0]) for a, b in zip(adapter, base)]
        mean_tokens = sum(tokens) / len(tokens)
        diff = sum(d) / sum(tokens)
        if len(d) < 2:
            return diff, None
        return diff, _sd(d) / (math.sqrt(len(d)) * mean_tokens)
    d = [float(a) - float(b) for a, b in zip(adapter, base)]
    diff = sum(d) / len(d)
    return diff, (_sd(d) / math.sqrt(len(d)) if len(d) > 1 else None)


def _sd(xs: Sequence[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def per_item(samples: Iterable[dict[str, Any]], metric: str) -> list[Any]:
    """One metric's per-item values, ordered by document id so two runs line up."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    return [s[metric] for s in rows if metric in s]


# Per-token metrics whose difference is in loss units; perplexities only get the model columns.
DIFFERENCE_OK = {"token_loss", "bits_per_byte"}
# The models an eval scores, in the order they are shown; each one's lm-eval results go to results_<label>.json.
LABELS = ("base", "adapter")
SUMMARY_NAME = "eval_summary.json"


def differences(runs: Sequence[Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """`{task: {metric: {"diff": d, "stderr": s}}}` for adapter minus base, when both were scored."""
    by_label = {r.label: r for r in runs}
    if not {"base", "adapter"} <= set(by_label):
        return {}
    base, adapter = by_label["base"], by_label["adapter"]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, samples in base.samples.items():
        for metric in headline_metrics(base.results, task):
            b, a = per_item(samples, metric), per_item(adapter.samples.get(task, []), metric)
            if not b or len(a) != len(b):
                continue
            if isinstance(b[0], (tuple, list)) and metric != "token_loss":
                if metric != "bits_per_byte":
                    continue
                # bits per byte = loss per byte / ln 2: same pairing with bytes as the weights.
                diff, se = paired_difference(b, a)
                diff, se = diff / math.log(2), (se / math.log(2) if se is not None else None)
            else:
                diff, se = paired_difference(b, a)
            out.setdefault(task, {})[metric] = {"diff": diff, "stderr": se}
    return out


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the numbers."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
            found["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return found


def summary(runs: Sequence[Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The eval_summary.json document: label -> task -> metrics, plus differences, settings, versions."""
    doc: dict[str, Any] = {run.label: metrics_of(run.results) for run in runs}
    diffs = differences(runs)
    if diffs:
        doc["difference"] = diffs
    doc["settings"] = settings
    doc["versions"] = versions()
    return doc


def write_temp(path: Path, data: bytes) -> Path:
    """`data` in a new file beside `path` (`.NAME.PID-RANDOM.tmp`), for a rename into place; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb"), not mkstemp: the file gets the umask's mode (mkstemp's 0600 made results unreadable to others).
    tmp = _temp_beside(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _temp_beside(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"


def write_outputs(out: Path, runs: Sequence[Any], doc: dict[str, Any]) -> dict[str, Path]:
    """lm-eval's results JSON per label, eval_summary.json and eval.png, put in place together; returns what was
    written. Each is written beside its name first and the renames run with SIGINT and SIGTERM held, so a failed
    write or a signal leaves the folder as it was, never one run's results beside another's summary."""
    from lm_eval.utils import handle_non_serializable

    from oasst_tools.errors import OasstError, describe_os_error
    from oasst_tools.output import signals_held

    made_out = not out.exists()
    earlier = _earlier_labels(out)
    contents = {f"results_{run.label}": (out / f"results_{run.label}.json", json.dumps(
        run.results, indent=2, default=handle_non_serializable, ensure_ascii=False).encode()) for run in runs}
    contents["summary"] = (out / SUMMARY_NAME, json.dumps(doc, indent=2, default=str).encode())
    temps: dict[str, tuple[Path, Path]] = {}  # key -> (temp file, its name once in place)
    path = out
    try:
        for key, (path, data) in contents.items():
            temps[key] = (write_temp(path, data), path)
        path = out / "eval.png"
        chart = _chart(doc, _temp_beside(path))
        if chart is not None:
            temps["chart"] = (chart, path)
        with signals_held():
            for tmp, path in temps.values():
                os.replace(tmp, path)
            # An earlier eval's files this run did not write (its adapter's results, a chart) would read as this
            # run's. Only what that eval_summary.json says it wrote: a shared folder's other files stay.
            stale = [out / f"results_{label}.json" for label in earlier or () if f"results_{label}" not in temps]
            stale += [] if "chart" in temps or earlier is None else [out / "eval.png"]
            for old in stale:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)
    except BaseException as exc:
        for tmp, _ in temps.values():
            tmp.unlink(missing_ok=True)
        if made_out:
            with contextlib.suppress(OSError):
                out.rmdir()
        if not isinstance(exc, OSError):
            raise
        where = os.fsdecode(exc.filename) if exc.filename is not None else str(path)
        if Path(where).name.startswith(".") and Path(where).name.endswith(".tmp"):
            where = str(path)  # the temp file: name the file the user will look for
        raise OasstError(f"cannot write {where}: {describe_os_error(exc)} (the scores are lost; nothing was "
                         "left half-written)") from None
    return {key: path for key, (_, path) in temps.items()}


def _chart(doc: dict[str, Any], tmp: Path) -> Path | None:
    """`plot` into `tmp`; a chart that cannot be drawn (a matplotlib error) is one warning, not the scores lost
    with it. A failed write (OSError) stays an error: the results files would fail the same way."""
    try:
        return plot(doc, tmp)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any drawing failure: the numbers matter more than the picture
        tmp.unlink(missing_ok=True)
        first = (str(exc).splitlines() or [""])[0]
        sys.stderr.write(f"warning: eval.png not written ({type(exc).__name__}: {first}); the results are written "
                         "without it\n")
        return None


def check_earlier(out: Path, overwrite: bool) -> None:
    """Refuse, before scoring, an `out` holding an earlier eval's results unless `overwrite` (they would be
    replaced: hours of scoring, say). Other files in `out` are never touched, so a shared folder is fine."""
    if overwrite or not out.is_dir():
        return
    from oasst_tools.errors import OasstError

    names = sorted(name for name in (SUMMARY_NAME, *(f"results_{label}.json" for label in LABELS))
                   if os.path.lexists(out / name))
    if names:
        raise OasstError(f"--out {out} holds an earlier eval ({', '.join(names)}); pass --overwrite to replace it, or "
                         "choose another --out")


def _earlier_labels(out: Path) -> list[str] | None:
    """The labels (base, adapter) whose results an earlier `oasst eval` wrote into `out`, from its eval_summary.json;
    None when there is none (or it cannot be read)."""
    doc = optional_json(out / SUMMARY_NAME)
    if not isinstance(doc, dict):
        return None
    return [label for label in LABELS if isinstance(doc.get(label), dict)]


def _fmt(value: Any, stderr: Any = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    # Perplexities run to millions: keep four significant digits there instead of four decimals.
    spec = ".4g" if abs(value) >= 1000 else ".4f"
    text = format(value, ("+" if signed else "") + spec)
    return f"{text} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else text


def loaded_as(base_loaded: dict[str, dict[str, Any]]) -> str:
    """`base loaded as: model M (flag), 4-bit nf4 (adapter record), compute_dtype float32 (adapter record)` from
    eval_summary.json's `settings.base_loaded`."""
    parts = []
    four_bit = base_loaded.get("load_in_4bit", {})
    for name, entry in base_loaded.items():
        if name in ("double_quant", "quant_type"):
            continue  # said with load_in_4bit
        if name == "load_in_4bit":
            quant = base_loaded.get("quant_type", {}).get("value", "")
            parts.append(f"{f'4-bit {quant}' if four_bit.get('value') else 'not quantized'} ({entry['from']})")
        else:
            parts.append(f"{name} {entry['value']} ({entry['from']})")
    return "base loaded as: " + ", ".join(parts)


def table(doc: dict[str, Any]) -> Table:
    """Tasks × metrics, one column per model label, plus adapter - base when both were scored."""
    labels = [k for k in LABELS if k in doc]
    diffs = doc.get("difference", {})
    out = Table(title="oasst eval", title_justify="left")
    out.add_column("task")
    out.add_column("metric")
    for label in labels:
        out.add_column(label, justify="right")
    if diffs:
        out.add_column("adapter - base", justify="right")
    out.add_column("n", justify="right")
    first = doc[labels[0]]
    for task, metrics in first.items():
        for metric in [m for m in metrics if not m.endswith("_stderr") and "_stderr," not in m and m != "n"]:
            cells = [_fmt(doc[label][task].get(metric), doc[label][task].get(f"{metric}_stderr")) for label in labels]
            if diffs:
                d = diffs.get(task, {}).get(metric)
                cells.append(_fmt(d["diff"], d["stderr"], signed=True) if d else "")
            out.add_row(escape(task), escape(metric), *cells, str(metrics.get("n", "")))
    return out


def show(doc: dict[str, Any], written: dict[str, Path], console: Console | None = None) -> None:
    """Print the result table, how the base model was loaded, and where the files went."""
    console = console or Console()
    console.print(table(doc))
    base_loaded = doc["settings"].get("base_loaded")
    if base_loaded:
        console.print(loaded_as(base_loaded), soft_wrap=True, markup=False, highlight=False)
    seconds = doc["settings"].get("seconds", {})
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    # markup=False: the paths are the user's and may hold `[/]`.
    console.print(f"scored in {timing}; wrote {', '.join(str(p) for p in written.values())}", soft_wrap=True,
                  markup=False, highlight=False)


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """One bar group per (task, metric): each model's value with its standard error (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        # The GPU machine has no matplotlib; the numbers matter more than the picture there.
        warnings.warn("matplotlib is not installed: eval.png not written", stacklevel=2)
        return None

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    labels = [k for k in LABELS if k in doc]
    panels = [(task, m) for task, metrics in doc[labels[0]].items() for m in metrics
              if not m.endswith("_stderr") and m != "n" and "perplexity" not in m]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(2.6 * max(len(panels), 1) + 1, 3.2), squeeze=False)
    colors = {"base": "#8c8c8c", "adapter": "#1f77b4"}
    for ax, (task, metric) in zip(axes[0], panels):
        values = [doc[label][task].get(metric) or 0.0 for label in labels]
        errors = [doc[label][task].get(f"{metric}_stderr") or 0.0 for label in labels]
        ax.bar(labels, values, yerr=errors, capsize=4, color=[colors[label] for label in labels])
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=110, format="png")  # format given: `path` may be a temp name without .png
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
