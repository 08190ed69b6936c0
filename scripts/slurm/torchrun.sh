#!/bin/bash
# Multi-node without SLURM: run this on every node, with the same NNODES, MASTER_ADDR and MASTER_PORT and each node's
# own NODE_RANK (0 .. NNODES-1). torchrun starts one process per GPU; Lightning reads torchrun's environment.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS=8 bash scripts/slurm/torchrun.sh fit --config ...   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS=8 bash scripts/slurm/torchrun.sh fit --config ...   # node 1
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${GPUS:?set GPUS}"
PYTHON="${PYTHON:-.venv/bin/python}"
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  -m vdr.cli "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS"
