#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One worker per core, up to 4: the suite is mostly single-threaded Python (13 -> 9 min on 2 cores).
# PYTEST_XDIST_AUTO_NUM_WORKERS=0 (xdist's own) runs it in this process, as --pdb does; a later -n wins too.
exec .venv/bin/python -m pytest -q -n logical --maxprocesses 4 "$@"
