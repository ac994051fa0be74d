"""The `oasst` command line: built-in commands plus plug-in commands loaded lazily from entry points.

Plug-ins declare commands in the entry-point group `oasst` (name = command name, value = a
`click.Command`). Nothing is imported until the command is asked for, so `oasst build --help`
never imports torch. A first-party command whose extra is not installed is listed as needing it and
answers with one line. Whatever a command raises ends as one `error:` line (OASST_DEBUG=1 for tracebacks).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from oasst_tools.errors import OasstError, os_error_text, printable

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

# The extra a first-party command needs and the packages it cannot start without (bitsandbytes is left out:
# without it 4-bit loading says so itself, and --no-4bit still works).
TRAIN_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors")
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", TRAIN_PACKAGES),
    "merge": ("train", TRAIN_PACKAGES),
    "generate": ("train", TRAIN_PACKAGES),
    "chat": ("train", TRAIN_PACKAGES),
    "eval": ("eval", (*TRAIN_PACKAGES, "lm_eval")),
}
DEBUG_VARIABLE = "OASST_DEBUG"

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
        # The plug-in modules import with click alone, so a core install would load them and fail later, deep
        # inside the command: look for the extra's packages first (find_spec imports nothing).
        if name in EXTRAS and not isinstance(target, click.Command) and missing_packages(EXTRAS[name][1]):
            return _missing_extra(name)
        try:
            return _load(target)
        except ImportError as exc:
            return _missing_extra(name, exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with terminate_as_exception():
                return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report_error re-raises what it does not own
            code = report_error(exc)
            if code is None:
                raise
            ctx.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: the command unwinds like on Ctrl-C (temporary outputs removed) and says one line."""


@contextlib.contextmanager
def terminate_as_exception() -> Any:
    """While the block runs, SIGTERM raises Terminated in the main thread (the default would kill the process with
    no line and leave temporary files); a handler someone else installed is left alone."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def missing_packages(names: Sequence[str]) -> list[str]:
    """The top-level packages among `names` that cannot be imported (looked up, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed package: as good as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _missing_extra(name: str, exc: ImportError | None = None) -> click.Command:
    """A stand-in command that names the extra to install instead of failing with a traceback."""
    extra = EXTRAS.get(name, ("",))[0]
    if extra:
        hint = f"needs the {extra} extra: pip install 'oasst-tools[{extra}]'"
    else:
        hint = f"cannot be loaded ({exc})"
    # Raised as the error line; a failed import of a command whose packages are all present says what failed.
    message = f"oasst {name} {hint}" + (f" ({exc})" if extra and exc is not None else "")

    @click.command(name=name, help=f"({hint})", short_help=f"({hint})", add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def unavailable() -> None:
        raise OasstError(message)

    return unavailable


def one_line(text: str) -> str:
    """`text` with line breaks (and every other control character) shown as escapes, so that a message is always
    a single line of output that a terminal prints as it is."""
    return printable(text)


def report_error(exc: BaseException) -> int | None:
    """Print one `error:` line for `exc` and return the exit code, or None when it must propagate (click's own
    exits and usage errors, SystemExit, anything but an OasstError under OASST_DEBUG=1)."""
    if isinstance(exc, OasstError):
        _print_error(str(exc))
        return 1
    if isinstance(exc, (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)):
        return None
    if not isinstance(exc, (Exception, KeyboardInterrupt)) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        return None
    if isinstance(exc, Terminated):
        _print_error("stopped by SIGTERM")
        return 143  # 128 + SIGTERM, as a shell reports a process the signal ended
    if isinstance(exc, KeyboardInterrupt):
        _print_error("interrupted")
        return 130
    if isinstance(exc, BrokenPipeError):
        # The reader of our output went away (`oasst ... | head`): nothing to tell it; keep the interpreter
        # from complaining about the closed stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(exc, OSError):
        _print_error(os_error_text(exc))
        return 1
    if isinstance(exc, UnicodeDecodeError):
        _print_error(f"input is not valid {exc.encoding} text: {exc.reason} at byte {exc.start}")
        return 1
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        detail = str(exc).splitlines()[0] if str(exc).strip() else ""
        _print_error("out of memory" + (f" ({detail[:200]})" if detail else "")
                     + "; lower --batch-size or --max-length, or use a machine with more memory")
        return 1
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        _print_error(f"the package {exc.name} is missing: pip install 'oasst-tools[train,eval]' installs what "
                     "the plug-ins need")
        return 1
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _print_error(f"unexpected {type(exc).__name__}: {detail[:300]} (a bug in oasst-tools; rerun with "
                 f"{DEBUG_VARIABLE}=1 for the traceback)")
    return 1


def _print_error(message: str) -> None:
    click.echo(f"error: {one_line(message)}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="oasst-tools")
def cli() -> None:
    """Build Guanaco-style datasets from OpenAssistant trees, train QLoRA adapters, evaluate them.

    \b
        oasst build --input fixtures/oasst1/validation-en-sample.messages.jsonl --lang en --top-rank --out data
        oasst train --config train/recipes/tiny-cpu.yaml --data data --out adapter
        oasst eval --model MODEL --adapter adapter --tasks hellaswag --compare-base
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="oasst")


def run_safely(fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning what it raises into one `error:` line and an exit code, as the CLI group does (for
    non-Click callers: scripts, `python -m` entry points)."""
    try:
        with terminate_as_exception():
            return fn()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report_error re-raises what it does not own
        code = report_error(exc)
        if code is None:
            raise
        sys.exit(code)
