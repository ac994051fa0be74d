"""A build's settings under their `oasst build` flag names, and the command line that makes the same build.

build_report.json records both (`settings`, `command`) and the dataset card prints the command, so a dataset says
how to rebuild it in the names the user types: `--label-max` is `label_max`, never the internal `Selection` field.

Standard library only.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oasst_tools.build import BuildConfig


def build_settings(cfg: BuildConfig) -> dict[str, Any]:
    """Every setting that shapes the output, keyed by its flag's name (`--no-synthetic` -> `no_synthetic`)."""
    sel = cfg.selection
    out: dict[str, Any] = {"input": list(cfg.inputs)}
    if cfg.pairs is None:
        out.update(top_rank=sel.mode == "top-rank", all_threads=sel.mode == "all-threads",
                   top_k=sel.top_k if sel.mode == "top-k" else None)
    else:
        out["pairs"] = cfg.pairs
    out.update(lang=sorted(sel.langs), lang_exact=sel.lang_exact, tree_state=sorted(sel.tree_states) or ["any"],
               label_max=dict(sorted(sel.label_max.items())), label_min=dict(sorted(sel.label_min.items())),
               no_synthetic=sel.drop_synthetic)
    if cfg.pairs is None:  # the turn rules shape threads; a pair build ignores them
        out.update(end_with_assistant=sel.end_with_assistant, min_turns=sel.min_turns, max_turns=sel.max_turns)
    out.update(test_size=cfg.test_size, seed=cfg.seed, file_format=cfg.file_format, on_error=cfg.on_error,
               out=str(cfg.out))
    return out


def build_command(cfg: BuildConfig) -> str:
    """The `oasst build` command line (shell-quoted) that makes this build again; defaults are left out."""
    from oasst_tools.build import BuildConfig  # at call time: build imports this module

    settings = build_settings(cfg)
    # The defaults are BuildConfig's and Selection's own, so a default changed there needs no change here.
    defaults = build_settings(BuildConfig())
    args = ["oasst", "build"]
    for name in settings.pop("input"):
        args += ["--input", name]
    out = settings.pop("out")  # required: never left out
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif isinstance(value, dict):
            for label, limit in value.items():
                args += [flag, f"{label}={limit!r}"]
        elif value is not None and value != defaults.get(name):
            args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join([*args, "--out", out])
