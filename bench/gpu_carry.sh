#!/usr/bin/env bash
# Make what a GPU call carries (git-ignored, ~25 MiB; see ../shared/docs/gpu.md and bench/gpu_session.sh), from the
# repo root on a machine with registry access: `bash bench/gpu_carry.sh`. Idempotent: what exists is kept.
#   .whl          bitsandbytes (CUDA 13.0 + CPU libraries only), trl, datasets and its pure-Python needs
#   .whl-lmeval   lm-eval and what it imports that the GPU image lacks (sdist-only ones built here, pure Python)
#   bench/data    the Falcon-7B tokenizer and config, HellaSwag validation, guanaco-all (oasst build)
# Versions are those the GPU image pairs with (Python 3.12, manylinux x86_64); the GPU image brings torch,
# transformers, peft, accelerate, numpy, pandas, pyarrow: never carry those.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
get=(-m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --abi cp312)
if [ ! -f .whl/.done ]; then
    rm -rf .whl && mkdir -p .whl
    "$PY" "${get[@]}" --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
    "$PY" "${get[@]}" --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19
    # The bitsandbytes wheel holds a native library per CUDA version (43 MB): keep CUDA 13.0's and the CPU one.
    "$PY" - <<'EOF'
import glob, os, re, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
tmp = src + ".tmp"
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    dropped = {i.filename for i in zin.infolist() if i.filename.endswith(".so") and not keep.search(i.filename)}
    for info in zin.infolist():
        if info.filename in dropped:
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if line.split(b",")[0].decode() not in dropped)
        zout.writestr(info, data)
os.replace(tmp, src)
print(f"bitsandbytes slimmed: {len(dropped)} native libraries dropped, {os.path.getsize(src) / 2**20:.1f} MiB")
EOF
    touch .whl/.done
fi
if [ ! -f .whl-lmeval/.done ]; then
    rm -rf .whl-lmeval && mkdir -p .whl-lmeval
    "$PY" "${get[@]}" --platform manylinux_2_17_x86_64 -d .whl-lmeval lm_eval==0.4.13 evaluate==0.4.6 \
        pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
        pathvalidate==3.3.1 chardet==6.0.0.post1 pytz==2026.6 defusedxml==0.7.1 more-itertools==11.2.1 nltk==3.10.4
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w .whl-lmeval sqlitedict==2.1.0 word2number==1.1 \
        rouge_score==0.1.2
    touch .whl-lmeval/.done
fi
mkdir -p bench/data
[ -d bench/data/falcon-7b-tokenizer ] || cp -r ../shared/models/falcon-7b-tokenizer bench/data/
[ -d bench/data/hellaswag ] || cp -r ../shared/data/hellaswag bench/data/
if [ ! -d bench/data/guanaco-all ]; then
    .venv/bin/oasst build --input ../shared/data/oasst1/validation-en.messages.jsonl --all-threads --test-size 0.05 \
        --out bench/data/guanaco-all
fi
du -sh .whl .whl-lmeval bench/data/falcon-7b-tokenizer bench/data/hellaswag bench/data/guanaco-all
