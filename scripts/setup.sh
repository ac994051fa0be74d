#!/usr/bin/env bash
# Create .venv and install oasst-tools with every extra, torch pinned to the CPU wheel by constraints.txt.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[train,eval,dev]' \
    2> >(grep -v "^WARNING: Location" >&2)
