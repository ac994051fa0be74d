#!/usr/bin/env bash
# The test suite on the newest releases of the libraries whose internals oasst-tools patches (transformers, peft,
# trl, bitsandbytes, accelerate, lm-eval, tokenizers; datasets too, and the core's polars, click, rich and orjson),
# in a separate environment (.venv-latest), as `pip install oasst-tools[train,eval]` resolves them for a user.
# Not part of CI, which stays on constraints.txt.
# torch stays pinned to the CPU wheel of constraints.txt (an open range pulls a multi-GB CUDA build), unless
# OASST_LATEST_TORCH=1: then the newest torch too, in .venv-latest-torch (~7 GB; on the project machines pip's own
# config caps torch at 2.14.1: PIP_CONFIG_FILE=/dev/null lifts it for the one command).
#   bash scripts/test-latest.sh                          # versions, the patch checks, then the whole suite
#   bash scripts/test-latest.sh tests/train/test_patches.py   # arguments go to pytest
#   OASST_LATEST_TORCH=1 PIP_CONFIG_FILE=/dev/null bash scripts/test-latest.sh   # torch 2.15.0 on 2026-12-07
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LATEST_TORCH=${OASST_LATEST_TORCH:-0}
VENV=${OASST_LATEST_VENV:-$([ "$LATEST_TORCH" = 1 ] && echo .venv-latest-torch || echo .venv-latest)}
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
if [ "$LATEST_TORCH" = 1 ]; then : > "$VENV/torch-pin.txt"; torch=torch; else
    grep '^torch==' constraints.txt > "$VENV/torch-pin.txt"; torch=; fi
quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/torch-pin.txt" -U -e '.[train,eval,dev]' \
    transformers peft trl bitsandbytes accelerate lm-eval datasets tokenizers polars click rich orjson $torch
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" - <<'PYEOF' 2> >(grep -v "kernels" >&2)
"""Print the installed versions beside the pins, and each patch's check on them."""
import importlib.metadata as md
import re
from pathlib import Path

pins = dict(re.findall(r"^([\w-]+)==(\S+)", Path("constraints.txt").read_text(), re.M))
print(f"{'library':<14}{'pinned':>10}{'installed':>12}")
for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "lm-eval", "datasets", "tokenizers",
             "polars", "click", "rich", "orjson"):
    print(f"{name:<14}{pins.get(name, '-'):>10}{md.version(name):>12}")
from oasst_model import patches

for name, problem in patches.check_all().items():
    print(f"patch {name:<30} {'ok' if problem is None else 'CHANGED: ' + problem}")
PYEOF
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n logical --maxprocesses 4 "$@"  # workers as scripts/test.sh
