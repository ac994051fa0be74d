"""One vocabulary of command-line flags: a setting is `--field-name` in every command (booleans `--x/--no-x`), its
`--help` shows the default, and former spellings stay accepted as hidden aliases for one release.

    @load_options(inference=True)          # --model, --load-in-4bit, --compute-dtype, ... as oasst_model.spec defines them
    def generate(adapter, **flags):
        flags = take_aliases(flags)        # --dtype -> compute_dtype, --4bit -> load_in_4bit

Every flag defaults to None, so that a command can tell a flag that was given from one that was not (a recipe or an
adapter's record decides then); the default the user gets is what `--help` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from oasst_model.spec import LOAD_FIELDS, OPTIONS, flag
from oasst_tools.cli.params import Option, switch

F = TypeVar("F", bound=Callable[..., Any])
ALIAS_PREFIX = "alias__"
# What an inference command (eval, merge, generate, chat) does for a loading option the user leaves out.
AS_TRAINED = {"model": "the adapter's base", "load_in_4bit": "as trained, else off",
              "compute_dtype": "as trained, else auto"}


def shown(default: Any) -> str | None:
    """How `--help` writes a default: on/off for switches, nothing for an empty value (no default)."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == "" or default == ():
        return None
    if isinstance(default, (list, tuple)):
        return ",".join(str(d) for d in default)
    return str(default)


class AutoInt(click.ParamType):
    """A whole number, or `auto` (the device decides when the run starts)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """`auto` as it is, anything else as click's INT reads it."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return click.INT.convert(value, param, ctx)


AUTO_INT = AutoInt()


class NonNegative(click.ParamType):
    """A number >= 0, never NaN (`FloatRange(min=0)` lets NaN through: every comparison with it is false); infinity
    only where `infinite` says what it means."""

    name = "float"

    def __init__(self, infinite: bool = False) -> None:
        self.infinite = infinite

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """click's FLOAT reading, then the range."""
        number = click.FLOAT.convert(value, param, ctx)
        if not (number >= 0 and (self.infinite or number != float("inf"))):
            self.fail(f"{value!r} is not a {'' if self.infinite else 'finite '}number >= 0", param, ctx)
        return number


NON_NEGATIVE = NonNegative()


def option(name: str, *, help: str, default: str | None = None, kind: Any = str,  # noqa: A002 - click's word
           choices: tuple[str, ...] = (), metavar: str | None = None, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """The flag of setting `name` (value None unless given; `default` is the text `--help` shows), plus its hidden
    `aliases` (collected under `alias__NAME`, see `take_aliases`)."""
    extra: dict[str, Any] = {}
    if kind is not bool:
        extra["type"] = click.Choice(choices) if choices else kind
        if metavar:
            extra["metavar"] = metavar
    decls = f"{flag(name)}/--no-{flag(name)[2:]}" if kind is bool else flag(name)

    def decorate(fn: F) -> F:
        for alias in reversed(aliases):
            fn = click.option(alias, ALIAS_PREFIX + name, default=None, hidden=True, **extra)(fn)
        return click.option(decls, name, cls=Option, default=None, show_default=default or False, help=help,
                            **extra)(fn)

    return decorate


def load_options(*, inference: bool, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Every loading option of oasst_model.spec.OPTIONS as a flag. For inference commands a flag left out means
    "as the adapter was trained" (its train_config.yaml), else the option's own default."""

    def decorate(fn: F) -> F:
        for name in reversed(LOAD_FIELDS):
            if name in skip:
                continue
            o = OPTIONS[name]
            default = shown(o.default)
            if inference:
                default = AS_TRAINED.get(name, f"as trained, else {default}")
            kind = bool if isinstance(o.default, bool) else str
            metavar = "PATH_OR_HUB_ID" if name == "model" else None
            fn = option(name, help=o.help, default=default, kind=kind, choices=o.choices, metavar=metavar,
                        aliases=o.aliases)(fn)
        return fn

    return decorate


def take_aliases(flags: dict[str, Any]) -> dict[str, Any]:
    """`flags` with each hidden alias's value moved to its setting; both spellings with different values are one
    error line (which one was meant cannot be told)."""
    out = {k: v for k, v in flags.items() if not k.startswith(ALIAS_PREFIX)}
    for key, value in flags.items():
        if key.startswith(ALIAS_PREFIX) and value is not None:
            name = key[len(ALIAS_PREFIX):]
            if out.get(name) is None:
                out[name] = value
            elif out[name] != value:
                from oasst_tools.errors import OasstError, shown

                raise OasstError(f"{flag(name)} is given twice, also under a former spelling, with different values "
                                 f"({shown(out[name])} and {shown(value)}): give {flag(name)} once")
    return out


def verbose_option(fn: F) -> F:
    """`-v/--verbose`, the same flag on every command that loads a model (oasst_model.quiet says what it shows)."""
    return switch("--verbose", "-v",
                  help="Show every library warning, log line and progress bar, and the full settings.")(fn)
