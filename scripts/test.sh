#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One worker per core, up to 4: the suite is mostly single-threaded Python (13 -> 9 min on 2 cores).
# OASST_TEST_WORKERS=0 runs it in this process (pdb, -s); a later -n in the arguments wins too.
n=$(nproc 2>/dev/null || echo 2)
exec .venv/bin/python -m pytest -q -n "${OASST_TEST_WORKERS:-$((n < 4 ? n : 4))}" "$@"
