"""Quiet output for `oasst train`, `merge`, `generate`, `chat` and `eval`: what the libraries print that does not
concern the user (deprecation notices meant for library authors, info logs, per-file and per-batch progress bars) is
silenced for the duration of a command, and the few library messages that do concern the user are said once, in one
line of ours. `-v/--verbose` changes nothing: every library speaks as it would without oasst-tools.

    from oasst_model.quiet import quiet
    with quiet(verbose):
        ...  # the command's work

What is silenced, and only that (a warning not listed here still shows):
- python warnings in `WARNINGS`, each by category, message and the library module raising it;
- the loggers in `LOGGERS` below ERROR (errors still show);
- Hugging Face progress bars (transformers' "Loading weights", datasets' map/filter bars, hub downloads).
lm-eval's tqdm bars are replaced by rich bars in `oasst_eval.progress`.

Standard library only at import, and nothing heavy is imported: a library already loaded is switched off through
its public API, one not loaded yet through the environment variables it reads when it loads. What it changed is put
back on exit, so one process may run several commands (tests, notebooks); a library that first loaded inside keeps
its bars off, as it read the variable only then.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

# Where library warnings are raised (or attributed to, with a stacklevel): a warning our own code causes still shows.
LIBRARIES = r"(transformers|peft|trl|torch|accelerate|bitsandbytes|datasets|lm_eval|huggingface_hub)(\.|$)"
# (category, message regex, module regex): library warnings about the libraries' own internals, nothing a user of
# oasst-tools can act on. Messages match from their start (warnings.filterwarnings semantics).
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # transformers 5.24 renamed gradient checkpointing to activation checkpointing; peft 0.21 and trl 1.16 still
    # call the old names. Delete with transformers v6, when the callers have moved.
    (FutureWarning, r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` "
                    r"is deprecated", LIBRARIES),
    # torch 2.13 deprecates TorchScript; dependencies still decorate with it when they load.
    (DeprecationWarning, r"`torch\.jit\.[a-z_]+` is deprecated", LIBRARIES),
    # peft, saving an adapter offline, cannot ask the Hub whether the base model's vocabulary changed; our loader
    # checks the adapter against the base itself (oasst_model.load).
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified", LIBRARIES),
    # bitsandbytes runs a paged optimizer unpaged on a CPU, once per parameter; `oasst train` says it once instead.
    (UserWarning, r"Paged optimizers are not supported on CPU", LIBRARIES),
)
# Loggers of the libraries we drive; below ERROR they log progress and internals, not user errors.
LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "peft", "trl", "bitsandbytes", "lm_eval",
           "lm-eval", "kernels", "torchao")
# Read by the libraries when they load: the verbosity of their loggers and whether they draw progress bars.
ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# transformers' tokenizer, when a text is longer than the model's declared maximum (once per tokenizer).
TOO_LONG = re.compile(r"Token indices sequence length is longer than the specified maximum sequence length for this "
                      r"model \((\d+) > (\d+)\)")
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"

# Says what a too-long text means for this command: (tokens, model maximum) -> our one line, or None for nothing.
LongText = Callable[[int, int], "str | None"]


class _Explain(logging.Filter):
    """On the tokenizer's logger: the too-long warning becomes one line of ours (once), anything else below ERROR
    is dropped as on the other library loggers."""

    def __init__(self, long_text: LongText | None) -> None:
        """`long_text` says what a too-long text means for the running command (None: nothing to say)."""
        super().__init__()
        self.long_text = long_text
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        """False for every record below ERROR; the first too-long warning is explained on stderr."""
        match = TOO_LONG.search(record.getMessage())
        if match and not self.said and self.long_text is not None:
            self.said = True
            line = self.long_text(int(match[1]), int(match[2]))
            if line:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        return record.levelno >= logging.ERROR


_PARALLELISM_OURS = False  # whether TOKENIZERS_PARALLELISM=false is our default, not the user's


@contextmanager
def tokenizer_threads() -> Iterator[None]:
    """Let a fast tokenizer use its thread pool for one batched call that forks nothing meanwhile (`quiet` turns
    the pool off for the whole command; the user's own TOKENIZERS_PARALLELISM is left alone)."""
    if not _PARALLELISM_OURS or os.environ.get("TOKENIZERS_PARALLELISM") != "false":
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextmanager
def quiet(verbose: bool = False, *, long_text: LongText | None = None) -> Iterator[None]:
    """Silence library output that does not concern the user until the block exits; `verbose`: change nothing.

    `long_text(tokens, maximum)` turns transformers' "Token indices sequence length is longer than ..." into one
    line of the command's own (printed once), or returns None when the command handles long texts itself."""
    # Not output: tokenizers warns after a fork once its thread pool ran, and a forked pool can deadlock.
    global _PARALLELISM_OURS
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _PARALLELISM_OURS = True
    if verbose:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())  # restores the filters on exit
        for category, message, module in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        stack.callback(_restore_env, _set_env(ENVIRONMENT))
        stack.callback(_restore_levels, _set_levels(LOGGERS, logging.ERROR))
        stack.callback(_restore_bars, _disable_bars())
        explain = _Explain(long_text)
        tokenizer_logger = logging.getLogger(TOKENIZER_LOGGER)
        level = tokenizer_logger.level
        # WARNING on this one logger so that its records reach the filter, which drops all but ours.
        tokenizer_logger.setLevel(logging.WARNING)
        tokenizer_logger.addFilter(explain)
        stack.callback(tokenizer_logger.setLevel, level)
        stack.callback(tokenizer_logger.removeFilter, explain)
        yield


def _set_env(values: dict[str, str]) -> list[str]:
    """Set each variable the user has not set; returns the names set."""
    names = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in names})
    return names


def _restore_env(names: list[str]) -> None:
    """Unset the variables `_set_env` set."""
    for name in names:
        os.environ.pop(name, None)


def _set_levels(names: tuple[str, ...], level: int) -> dict[str, int]:
    """Raise each logger to at least `level`; returns the levels to put back."""
    before = {}
    for name in names:
        logger = logging.getLogger(name)
        before[name] = logger.level
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    return before


def _restore_levels(before: dict[str, int]) -> None:
    """Put the logger levels `_set_levels` changed back."""
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def _disable_bars() -> list[Callable[[], None]]:
    """Switch off the progress bars of the Hugging Face libraries already loaded (those loading later read
    `ENVIRONMENT`); returns the calls that switch back on what was on."""
    undo: list[Callable[[], None]] = []
    if "huggingface_hub" in sys.modules and _may_disable("HF_HUB_DISABLE_PROGRESS_BARS"):
        from huggingface_hub import utils as hub

        if not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            undo.append(hub.enable_progress_bars)
        if "transformers.utils.logging" in sys.modules:
            from transformers.utils import logging as transformers_logging

            if transformers_logging.is_progress_bar_enabled():
                transformers_logging.disable_progress_bar()
                undo.append(transformers_logging.enable_progress_bar)
    if "datasets.utils.tqdm" in sys.modules and _may_disable("HF_DATASETS_DISABLE_PROGRESS_BARS"):
        datasets_tqdm = sys.modules["datasets.utils.tqdm"]  # `datasets.utils.tqdm` the attribute is the class

        if not datasets_tqdm.are_progress_bars_disabled():
            datasets_tqdm.disable_progress_bars()
            undo.append(datasets_tqdm.enable_progress_bars)
    return undo


def _may_disable(variable: str) -> bool:
    """False when the user set `variable` to keep the bars on (0, false, ...): the library would refuse to turn them
    off then, with a warning."""
    return os.environ.get(variable, "1").upper() in ("1", "ON", "YES", "TRUE")


def _restore_bars(undo: list[Callable[[], None]]) -> None:
    """Switch back on the bars `_disable_bars` switched off."""
    for call in reversed(undo):
        call()


def for_command(verbose: bool, *, long_text: LongText | None = None) -> None:
    """`quiet(verbose)` until the running click command returns (its context closes), without indenting the
    command's body into a `with` block; later calls in the same command change nothing."""
    import click

    ctx = click.get_current_context()
    # The first call of a command decides (a helper it calls may ask again, without knowing about -v).
    if ctx.meta.get("oasst_model.quiet"):
        return
    ctx.meta["oasst_model.quiet"] = True
    ctx.with_resource(quiet(verbose, long_text=long_text))
