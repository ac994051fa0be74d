"""The `oasst` command line: built-in commands plus plug-in commands loaded lazily from entry points.

Plug-ins declare commands in the entry-point group `oasst` (name = command name, value = a
`click.Command`). Nothing is imported until the command is asked for, so `oasst build --help`
never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from oasst_tools.errors import OasstError

# Built-in commands go through the same lazy mechanism as plug-ins.
BUILTIN_COMMANDS: dict[str, str] = {
    "build": "oasst_tools.cli.build:build",
    "stats": "oasst_tools.cli.inspect:stats",
    "show": "oasst_tools.cli.inspect:show",
}

# What pyproject.toml declares, for runs without installed metadata (a checkout on PYTHONPATH).
FIRST_PARTY: dict[str, str] = {
    "train": "oasst_train.cli:train",
    "merge": "oasst_train.cli:merge",
    "generate": "oasst_train.cli:generate",
    "chat": "oasst_train.cli:chat",
    "eval": "oasst_eval.cli:eval_command",
}

# Set by tests to register plug-ins in-process and ignore whatever happens to be installed.
DISCOVER_ENTRY_POINTS = True
EXTRA_COMMANDS: dict[str, str | click.Command] = {}


def _load(target: str | click.Command) -> click.Command:
    if isinstance(target, click.Command):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def plugin_commands() -> dict[str, str | click.Command]:
    """Command name -> `module:attr` (or command) from built-ins, entry points and test registrations."""
    found: dict[str, str | click.Command] = dict(BUILTIN_COMMANDS)
    if DISCOVER_ENTRY_POINTS:
        from importlib.metadata import entry_points  # 60 ms: only when plug-ins are looked up

        declared = entry_points(group="oasst")
        for ep in declared:
            found.setdefault(ep.name, ep.value)
        if not declared:  # run from a source checkout on PYTHONPATH (no installed metadata): first-party plug-ins
            for name, target in FIRST_PARTY.items():
                if importlib.util.find_spec(target.partition(".")[0]) is not None:
                    found.setdefault(name, target)
    found.update(EXTRA_COMMANDS)
    return found


class LazyGroup(click.Group):
    """A group whose commands are imported only when used (or when `--help` lists them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(plugin_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        # Built-ins first: scanning installed entry points costs ~0.1 s of start-up.
        target = EXTRA_COMMANDS.get(name) or BUILTIN_COMMANDS.get(name) or plugin_commands().get(name)
        if target is None:
            return None
        try:
            return _load(target)
        except ImportError as exc:
            return _missing_extra(name, exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OasstError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def _missing_extra(name: str, exc: ImportError) -> click.Command:
    """A stand-in command that explains which extra to install instead of a traceback."""

    @click.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(unavailable: {exc})")
    def unavailable() -> None:
        extra = "eval" if name == "eval" else "train"
        raise OasstError(f"`oasst {name}` needs the '{extra}' extra ({exc}); run: pip install 'oasst-tools[{extra}]'")

    return unavailable


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="oasst-tools")
def cli() -> None:
    """Build Guanaco-style datasets from OpenAssistant trees, train QLoRA adapters, evaluate them.

    \b
        oasst build --input fixtures/oasst1/validation-en-30.messages.jsonl --lang en --top-rank --out data
        oasst train --config train/recipes/tiny-cpu.yaml --data data --out adapter
        oasst eval --model MODEL --adapter adapter --tasks hellaswag --compare-base
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="oasst")


def run_safely(fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning an `OasstError` into one `error:` line and exit 1 (for non-Click callers)."""
    try:
        return fn()
    except OasstError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
