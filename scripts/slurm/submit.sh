#!/bin/bash
# Submits `vdr SUBCOMMAND ARGS...` to SLURM with the nodes x GPUs its config asks for (trainer.num_nodes,
# trainer.devices), so the allocation and the trainer cannot disagree.
#   bash scripts/slurm/submit.sh fit --config configs/experiments/X.yaml --trainer.num_nodes 2 --trainer.devices 8
# Extra sbatch options go in SBATCH_ARGS (e.g. SBATCH_ARGS="--partition=gpu --account=me").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VDR="${VDR:-.venv/bin/vdr}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$VDR")")/python}"
config="$("$VDR" "$@" --print_config)"
sizes="$(echo "$config" | "$PYTHON" -c '
import sys, yaml
trainer = yaml.safe_load(sys.stdin).get("trainer", {})
nodes, devices = trainer.get("num_nodes") or 1, str(trainer.get("devices"))
if not devices.isdigit() or int(devices) < 1:
    sys.exit(f"submit.sh: set trainer.devices to the GPUs per node (an integer), got {devices!r}")
print(nodes, devices)')"
read -r nodes devices <<< "$sizes"
echo "submitting ${nodes} node(s) x ${devices} GPU(s): vdr $*"
# shellcheck disable=SC2086
exec sbatch ${SBATCH_ARGS:-} --nodes="$nodes" --ntasks-per-node="$devices" --gpus-per-node="$devices" \
  "$here/vdr.sbatch" "$@"
