"""Fixtures every plug-in's tests share. Standard library and pytest only: tests/eval/conftest.py must still set
the offline variables before anything imports datasets or huggingface_hub."""

from __future__ import annotations

from pathlib import Path

import pytest

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories() -> Path:
    """The real, trained 260K-parameter Llama (vocab 512, no pad token)."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not present")
    return STORIES
