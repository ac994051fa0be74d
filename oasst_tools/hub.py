"""Is a name a Hugging Face Hub id, and can the Hub be reached? Decided once, in about a second, before any
library that would retry for half a minute is asked to download something.

    if looks_like_hub_id(text) and not Path(text).exists() and not hub_reachable():
        assume_offline()              # datasets/transformers then read their cache only, without retries

Standard library only: `oasst build`, `oasst train` and `oasst eval` call it before torch or datasets load.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

# Variables that switch the Hugging Face libraries to their local cache (any true-ish value).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
# What `owner/name` may hold on the Hub: letters, digits, `-`, `_`, `.`; no `--` or `..`, no leading `.` or `-`.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")
# A name ending like a file is a path someone mistyped, not a repository.
FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".zip",
                 ".tar", ".bz2", ".xz", ".zst", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".md")

_probe: dict[str, bool] = {}  # endpoint -> reachable, once per process
_offline_reason: list[str] = []
_assumed: list[bool] = []  # set by assume_offline: the offline variables are ours from then on


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub repository id, `owner/name`, and does not end like a file name.

    Text only: the caller decides what an existing local path means (see `hub_candidate`).
    """
    if not _HUB_ID.fullmatch(text) or "--" in text or ".." in text:
        return False
    return not text.lower().endswith(FILE_SUFFIXES)


def hub_candidate(text: str) -> bool:
    """Whether `text` should be looked up on the Hub: it looks like `owner/name`, and neither it nor its `owner`
    part exists on disk (`data/guanaco` with a local `data/` folder is a mistyped path, not a repository)."""
    if not looks_like_hub_id(text):
        return False
    try:
        return not Path(text).exists() and not Path(text.split("/", 1)[0]).exists()
    except OSError:  # a name too long for the file system, or similar: not a local path either
        return True


def offline_by_environment() -> str | None:
    """The offline variable that is set to a true value (HF_HUB_OFFLINE=1 ...), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hub answers: False at once when an offline variable is set, else one HTTP request to the
    endpoint ($HF_ENDPOINT or huggingface.co) that must answer within `timeout` seconds. Probed once per process.

    One HEAD request (a TCP connection alone proves nothing behind an intercepting proxy). Name resolution can
    hang far longer than a socket timeout, so the probe runs in a daemon thread and is abandoned when the time
    is up.
    """
    if _assumed:
        return False
    variable = offline_by_environment()
    if variable is not None:
        _note_offline(f"{variable} is set")
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    if endpoint not in _probe:
        _probe[endpoint] = _connects(endpoint, timeout)
        if not _probe[endpoint]:
            _note_offline(f"{urlsplit(endpoint).hostname or endpoint} did not answer within {timeout:g} s")
    return _probe[endpoint]


def offline_reason() -> str:
    """Why the Hub counts as unreachable (for error messages), e.g. `HF_HUB_OFFLINE is set`."""
    return _offline_reason[0] if _offline_reason else "the Hub is unreachable"


def assume_offline() -> None:
    """Make datasets, transformers and huggingface_hub read only their local cache from now on, so that a
    missing entry fails at once instead of after their retries (libraries already imported included)."""
    _assumed.append(True)
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    # These read the variables once, at import; a library imported earlier in this process is told directly.
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE")):
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(getattr(loaded, attribute, None), bool):
            setattr(loaded, attribute, True)


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (its own rule, read without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def in_hub_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether the local Hub cache holds any snapshot of `repo_id` (`kind`: model or dataset); offline, only such
    a repository can load, so anything else can fail before a heavy library is even imported."""
    folder = hub_cache_dir() / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def _note_offline(reason: str) -> None:
    if reason not in _offline_reason:
        _offline_reason.append(reason)


def _connects(endpoint: str, timeout: float) -> bool:
    """Whether an HTTP request to `endpoint` gets any answer (an error status counts: the server is there)."""
    import urllib.error
    import urllib.request

    result: list[bool] = []

    def attempt() -> None:
        try:
            # urllib honours HTTPS_PROXY/NO_PROXY as huggingface_hub does.
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except (OSError, ValueError):  # URLError, timeouts, TLS errors; ValueError: an endpoint that is no URL
            result.append(False)

    thread = threading.Thread(target=attempt, name="oasst-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
