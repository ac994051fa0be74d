"""Click parameters shared by the commands of the core and the plug-ins. Imports click only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class Option(click.Option):
    """A click option whose descriptive default (`show_default="auto"`) reads `[default: auto]`, not click's
    `[default: (auto)]`; every command's options use it, the core's and the plug-ins'."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        """Click's help line, with the parentheses around a descriptive default dropped."""
        record = super().get_help_record(ctx)
        if record is None or not isinstance(self.show_default, str):
            return record
        names, text = record
        return names, text.replace(f"default: ({self.show_default})", f"default: {self.show_default}")


def switch(*decls: str, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # noqa: A002
    """An on/off flag that is off unless given, reading `[default: off]` in --help (every command's switches)."""
    return click.option(*decls, is_flag=True, show_default="off", cls=Option, help=help)


def argument_or_option(name: str, flag_metavar: str, what: str, help: str, *, dest: str | None = None,  # noqa: A002
                       then: str | None = None, kind: Any = None,
                       **option_extra: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A path a command takes as its argument `NAME` or as `--name FLAG_METAVAR`, the flag another command uses for
    it (`oasst show INPUT` or `--input PATH`, as `oasst build --input`). One of them is required (`what` says what
    it is when neither is given); both naming different paths is a usage error. `then` names a required argument
    after NAME (show's TREE_ID): with the flag, the one argument given is that one. The command gets the path as
    its keyword `dest` (default: `name`)."""
    upper, dest = name.upper(), dest or name

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from oasst_tools.files import same_path

            given, flagged = kwargs.pop(dest), kwargs.pop(f"{dest}_flag")
            if then is not None and flagged is not None and kwargs[then] is None:
                given, kwargs[then] = None, given  # `show --input X TREE_ID`: click gave TREE_ID to INPUT
            if given is None and flagged is None:
                raise click.UsageError(f"Missing argument '{upper}' (or --{name} {flag_metavar}): {what}")
            if given is not None and flagged is not None and not same_path(given, flagged):
                raise click.UsageError(f"two {name}s given: {given} and --{name} {flagged}; give one")
            if then is not None and kwargs[then] is None:
                raise click.UsageError(f"Missing argument '{then.upper()}'")
            return fn(*args, **{dest: given if given is not None else flagged}, **kwargs)

        run = click.option(f"--{name}", f"{dest}_flag", type=kind, default=None, metavar=flag_metavar, help=help,
                           **option_extra)(run)
        if then is not None:
            run = click.argument(then, required=False, metavar=then.upper())(run)
        return click.argument(dest, type=kind, metavar=upper, required=False)(run)

    return decorate


class FolderPath(click.Path):
    """A folder to write as a `pathlib.Path`; an empty value (`--out ""`, an unset shell variable) is a usage error,
    not the current folder that `Path("")` is."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Refuse an empty or blank value, then convert as click.Path does."""
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: give a folder", param, ctx)
        return super().convert(value, param, ctx)
