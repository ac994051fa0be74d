#!/usr/bin/env bash
# One call of a GPU session, on the GPU machine from the repo root: `bash bench/gpu_session.sh PHASE [ARGS...]`.
#   eval     bench/eval_falcon_speed.py run --limit 2000 (its default configurations) ARGS
#   train    bench/train_throughput.py ARGS (e.g. --steps 30 --profile --only classic,colab,...)
#   smollm2  bench/eval_hellaswag_smollm2.py on the GGUF joined from the parts gathered so far, ARGS
#   packed   bench/packed_attention.py ARGS (varlen kernel vs block mask vs padded batch, against fp32; seconds)
#   lora     bench/lora_gemm.py ARGS (a 4-bit LoRA linear's paths per Falcon-7B shape, fwd + bwd; ~2 min)
#   dropout  bench/dropout_cost.py ARGS (what LoRA dropout costs per Falcon-7B layer, compiled, fwd + bwd; ~1 min)
# Every phase first makes what it needs and a cold machine lacks: the carried wheels (.whl, .whl-lmeval, see
# ../shared/docs/gpu.md) unpacked once into $SITE, the random Falcon-7B (eval_falcon_speed.py prepare, ~2 min).
# The SmolLM2 GGUF (98 MB) cannot travel in one call (64 MiB): carry one of bench/data/smollm2-3/gguf.part-NN per
# call; each call adds what it carried to /root/smol, where the smollm2 phase joins them (sha256 checked).
# Carry (64 MiB per call in all): .whl and .whl-lmeval (git-ignored wheel folders), bench/data/falcon-7b-tokenizer,
# bench/data/hellaswag, bench/data/guanaco-all (`oasst build --input ../shared/data/oasst1/validation-en.messages.jsonl
# --all-threads --test-size 0.05 --out bench/data/guanaco-all`) and one GGUF part: about 59 MiB.
# Results go to $OUT (the device's fetched folder) when set, else bench/results; eval and smollm2 files carry the
# time (each is one machine's runs: a second call the same day must not replace the first), train's calls append.
set -euo pipefail
phase=${1:?phase: eval, train, smollm2, packed, lora or dropout}
shift
case $phase in
    eval|train|smollm2|packed|lora|dropout) ;;
    *) echo "unknown phase $phase (eval, train, smollm2, packed, lora or dropout)" >&2; exit 2 ;;  # before minutes of set-up
esac
SITE=${SITE:-/root/site}
RESULTS=${OUT:-bench/results}
DAY=$(date -u +%F)
STAMP=$(date -u +%F-%H%M)
if [ ! -f "$SITE/.done" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl .whl-lmeval/*.whl
    touch "$SITE/.done"
fi
export PYTHONPATH="$SITE:$PWD:$PWD/model:$PWD/train:$PWD/eval"
# TOKENIZERS_PARALLELISM stays unset, as for a user: oasst eval then tokenizes its batch on every core.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /root/smol
cp bench/data/smollm2-3/gguf.part-* /root/smol/ 2>/dev/null || true
echo "gguf parts gathered: $(ls /root/smol | tr '\n' ' ')"
needs_falcon=$([ "$phase" = eval ] || [ "$phase" = train ] && echo yes || echo no)
if [ "$needs_falcon" = yes ] && [ ! -f bench/data/falcon7b-random/model.safetensors.index.json ]; then
    python3 bench/eval_falcon_speed.py prepare
fi
case $phase in
    eval) python3 bench/eval_falcon_speed.py run --limit 2000 --results "$RESULTS/eval_falcon_speed-$STAMP.json" "$@" \
              2>&1 | grep -v -e '^Map' -e 'it/s]' ;;
    train) python3 bench/train_throughput.py --results "$RESULTS/train_throughput-$DAY.json" "$@" ;;
    packed) python3 bench/packed_attention.py --results "$RESULTS/packed_attention-$STAMP.json" "$@" ;;
    lora) python3 bench/lora_gemm.py --results "$RESULTS/lora_gemm-$STAMP.json" "$@" ;;
    dropout) python3 bench/dropout_cost.py --results "$RESULTS/dropout_cost-$STAMP.json" "$@" ;;
    smollm2) python3 bench/eval_hellaswag_smollm2.py --gguf /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
                 --out "$RESULTS/eval_hellaswag_smollm2-$STAMP.json" "$@" ;;
esac
