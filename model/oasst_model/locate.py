"""Check the model a user named before anything loads it: a local folder (its config.json and safetensors headers),
a `.gguf` file (its signature) or a hub id (the Hub reachable, else the id in the local cache); each failure is one
error line naming the path. The commands call `check_source` first, before torch is imported.

Apart from `load.py`, which resolves every model through `_resolve_source` and re-exports `check_source` and
`check_model_folder` (callers import them from there), because these checks need neither torch nor transformers:
standard library and oasst_tools only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from oasst_tools.errors import OasstError, describe_os_error


def check_source(model: str, gguf_file: str | None = None) -> None:
    """Fail fast, before importing torch, when `model` names a local path that is not a model (missing, a damaged
    config.json or weights file), or a hub id while the Hub cannot be reached and the id is not cached."""
    _resolve_source(model, gguf_file)


def check_model_folder(path: Path) -> None:
    """One error line naming the file when a model folder's config.json is not a JSON object or one of its
    safetensors files is missing, truncated or not safetensors (what from_pretrained would die on)."""
    from oasst_tools.files import check_safetensors, read_json_object

    config_file = path / "config.json"
    if not config_file.exists():
        raise OasstError(f"model folder {path} has no config.json")
    read_json_object(config_file, "model config")
    index = path / "model.safetensors.index.json"
    shards: set[str] = set()
    if index.exists():
        weight_map = read_json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise OasstError(f"{index}: no `weight_map` object naming the weight files")
        shards = {str(name) for name in weight_map.values()}
    for name in sorted(shards | {p.name for p in path.glob("*.safetensors")}):
        check_safetensors(path / name, "model weights")


def _resolve_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name) from what the user typed; missing local paths fail here."""
    from oasst_tools.hub import assume_offline, hub_cache_dir, hub_candidate, hub_reachable, in_hub_cache
    from oasst_tools.hub import offline_reason
    from oasst_tools.files import missing_file

    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            if path.exists():
                raise OasstError(f"model file {model} is a folder, not a .gguf file")
            raise missing_file(path, "model file")
        with _reading(path):
            with path.open("rb") as f:
                magic = f.read(4)
        if magic != b"GGUF":
            raise OasstError(f"{model}: not a GGUF file (it does not start with the GGUF signature)")
        return str(path.parent), path.name
    if path.exists() or not hub_candidate(model):
        if not path.is_dir():
            if path.exists():
                raise OasstError(f"model {model} is a file, not a folder (give a model folder or a .gguf file)")
            error = missing_file(path, "model folder")
            if "/" not in model and "\\" not in model:  # a legacy bare hub name such as `gpt2`
                error = OasstError(f"{error} (a hub model id has the form owner/name)")
            raise error
        if gguf_file is None:
            check_model_folder(path)
        elif not (path / gguf_file).is_file():
            raise missing_file(path / gguf_file, "model file")
        return model, gguf_file
    if not hub_reachable():
        if not in_hub_cache(model, "model"):
            raise OasstError(f"cannot load model {model} from the Hugging Face Hub ({offline_reason()}) and it is not "
                             f"in the local cache ({hub_cache_dir()}); pass --model PATH with a local model folder")
        # Only the local cache can have it now: let transformers look there without half a minute of retries.
        assume_offline()
    return model, gguf_file


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn an OSError while reading `path` into one error line naming it."""
    try:
        yield
    except OSError as exc:
        raise OasstError(f"cannot read {path}: {describe_os_error(exc)}") from None
