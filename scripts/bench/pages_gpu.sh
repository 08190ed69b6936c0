#!/usr/bin/env bash
# The GPU checks of the device page path, as one short script for a lent GPU machine (about 5 minutes on an H100):
#   1. tests marked gpu: pages made on the GPU equal the HF processor's on the CPU, bit for bit;
#   2. pages/s: the HF processor in 4/8/16 DataLoader workers vs our path on the GPU (2048 document pages);
#   3. a training step of the 2b layout at batch 64 (GradCache, mini-batch 16, checkpointing): the fraction of wall
#      time spent waiting for data, with the processor in 8 workers vs our path with 8 decoding workers.
# Usage (from the repository root): OUT=bench_out bash scripts/bench/pages_gpu.sh
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

"$PY" -m pytest -m gpu tests/test_pages.py -q -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
"$PY" scripts/bench/pages.py --device cuda --pages 2048 --batch 64 \
    --routes processor:4 processor:8 processor:16 device:4 device:8 device:16 --out "$OUT/pages.jsonl" \
    2>&1 | tee "$OUT/pages.txt"
for route in processor device; do
  "$PY" scripts/bench/batch_memory.py --preset 2b --device cuda --dtype bfloat16 --page 1024 \
      --min-pixels 16384 --max-pixels 360000 --settings cached:64:16:gc --steps 3 --workers 8 \
      --page-preprocessing "$route" --out "$OUT/step_wait.jsonl" 2>&1 | tail -3 | tee -a "$OUT/step_wait.txt"
done
