#!/usr/bin/env bash
# A venv with the lent GPU machine's versions (the device tool's KINDS.md, as read in 2026-11: torch 2.11.0,
# transformers 5.17.0, sentence-transformers 6.0.1, lightning 2.6.6...), plus the wheels prepare_gpu.sh carries at
# this checkout's versions, so the suite can run here, on the CPU, as the GPU call's code will run there:
#   bash scripts/bench/gpu_image_env.sh [VENV]           (default: /tmp/vdr-gpu-image; about 5 GB, a few minutes)
#   /tmp/vdr-gpu-image/bin/python -m pytest -q           (and -m slow: the demos on these versions)
# PyPI's torch 2.11.0 for x86-64 Linux is a CUDA build; it runs on the CPU. peft's version there is not on record:
# the newest is taken. Python is this machine's (3.11 here, 3.12.3 there).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-/tmp/vdr-gpu-image}"
# What the GPU image lacks, at this checkout's versions, as the call will carry them.
mapfile -t carried < <(bash scripts/bench/prepare_gpu.sh --pins)
[ "${#carried[@]}" -gt 0 ] || { echo "gpu_image_env.sh: prepare_gpu.sh --pins printed no pins" >&2; exit 2; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  "torch==2.11.0" "torchvision==0.26.0" "transformers==5.17.0" "huggingface_hub==1.33.0" "tokenizers==0.23.2" \
  "safetensors==0.8.0" "torchmetrics==1.9.0" "sentence-transformers==6.0.1" "lightning==2.6.6" \
  "pytorch-lightning==2.6.6" "accelerate==1.15.0" "${carried[@]}" peft tensorboard tqdm matplotlib pypdfium2 \
  pytest pytrec-eval-terrier
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e .
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
