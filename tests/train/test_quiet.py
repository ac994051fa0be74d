"""oasst_model.quiet: the known library warnings, logs and bars are silenced, nothing else is, `verbose` changes
nothing, and everything is put back afterwards."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from oasst_model.quiet import ENVIRONMENT, LOGGERS, TOKENIZER_LOGGER, quiet

DEPRECATED = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`"
TOO_LONG = ("Token indices sequence length is longer than the specified maximum sequence length for this model "
            "(1528 > 512). Running this sequence through the model will result in indexing errors")


def _warn(message: str, category: type[Warning], module: str) -> None:
    """A warning as `module` raises it (what warnings.filterwarnings' `module` matches)."""
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def _shown(verbose: bool, *raised: tuple[str, type[Warning], str]) -> list[str]:
    """The messages of `raised` that get through quiet(verbose)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet(verbose):
            for message, category, module in raised:
                _warn(message, category, module)
    return [str(w.message) for w in seen]


def test_known_library_warnings_are_silenced_and_other_warnings_still_show() -> None:
    shown = _shown(False,
                   (DEPRECATED, FutureWarning, "transformers.modeling_utils"),
                   ("`torch.jit.script_method` is deprecated.", DeprecationWarning, "torch.jit._script"),
                   ("something a user should read", UserWarning, "transformers.modeling_utils"),
                   (DEPRECATED, FutureWarning, "oasst_train.trainer"))  # our own code calling the old name
    assert shown == ["something a user should read", DEPRECATED]


def test_verbose_lets_every_library_warning_through() -> None:
    assert _shown(True, (DEPRECATED, FutureWarning, "transformers.modeling_utils")) == [DEPRECATED]


def test_library_loggers_are_quiet_below_error_and_put_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    before = {name: logging.getLogger(name).level for name in LOGGERS}
    with quiet():
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.ERROR for name in LOGGERS)
        assert all(os.environ[name] == value for name, value in ENVIRONMENT.items())
    assert {name: logging.getLogger(name).level for name in LOGGERS} == before
    assert not any(name in os.environ for name in ENVIRONMENT)
    with quiet(verbose=True):
        assert {name: logging.getLogger(name).level for name in LOGGERS} == before


def test_a_variable_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    with quiet():
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_hugging_face_progress_bars_are_off_inside_and_as_before_after() -> None:
    import sys

    import datasets  # noqa: F401 - loaded, so that its bars are switched through its API
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    datasets_tqdm = sys.modules["datasets.utils.tqdm"]

    def bars() -> tuple[bool, bool, bool]:
        return (not hub.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled(),
                not datasets_tqdm.are_progress_bars_disabled())

    before = bars()
    with quiet():
        assert bars() == (False, False, False)
    assert bars() == before


def test_the_too_long_tokenizer_warning_is_said_once_in_the_commands_words(capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger(TOKENIZER_LOGGER)
    with quiet(long_text=lambda tokens, maximum: f"our line: {tokens} > {maximum}"):
        logger.warning(TOO_LONG)
        logger.warning(TOO_LONG)  # a second tokenizer says it again
        logger.warning("another tokenizer warning")
    assert capsys.readouterr().err == "our line: 1528 > 512\n"
    assert not logger.filters


class _Records(logging.Handler):
    """Keeps the records a logger hands it (transformers' loggers need not propagate to pytest's root handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_too_long_tokenizer_warning_passes_with_verbose() -> None:
    logger, handler = logging.getLogger(TOKENIZER_LOGGER), _Records()
    logger.addHandler(handler)
    try:
        with quiet(True, long_text=lambda tokens, maximum: "ours"):
            logger.warning(TOO_LONG)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == [TOO_LONG]
