# Source on the GPU machine from the repo root: unpacks the carried wheels (.gpu/wheels, see ../shared/docs/gpu.md)
# into .gpu/site once and puts the checkout and them on PYTHONPATH, offline.
if [ ! -f .gpu/site/.done ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl && touch .gpu/site/.done
fi
export PYTHONPATH="$PWD:$PWD/model:$PWD/train:$PWD/eval:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
