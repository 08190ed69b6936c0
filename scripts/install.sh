#!/usr/bin/env bash
# Installs vdr into a virtual environment (.venv, or $VDR_VENV) with a matching torch/torchvision pair.
# torch 2.14.1 + torchvision 0.29.1: PyPI's torchvision only loads beside its own torch release, and the
# torchvision-backed Qwen image processor is the one GPU users run (the parity reference for our collator).
# On a GPU machine that already has a working torch + torchvision, set VDR_KEEP_TORCH=1 to keep them.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VDR_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "${VDR_KEEP_TORCH:-0}" != "1" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
echo "installed vdr into $venv"
