#!/usr/bin/env bash
# torchrun launcher: every rank runs `hs-scale train --config CONFIG [overrides]` (the one training entry point).
#
#   single node:  launchers/torchrun.sh configs/synthetic.yaml --train.steps 200
#   multi-node:   on every node (same command):
#                 NNODES=2 RDZV_ENDPOINT=head-node:29500 RDZV_ID=myrun launchers/torchrun.sh CONFIG [overrides]
#
# Parameters (environment):
#   NPROC_PER_NODE  ranks per node (default: number of visible GPUs, else 1 on CPU)
#   NNODES          nodes, or MIN:MAX for elastic (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (multi-node; any node's reachable address, usually the first)
#   RDZV_ID         rendezvous id, the same on all nodes of one run (default: hs_scale)
#   MAX_RESTARTS    worker-group restarts on failure (default 0)
#   PYTHON          python interpreter with hs_scale installed (default: python)
set -euo pipefail

CONFIG=${1:?usage: launchers/torchrun.sh CONFIG [--section.field value ...]}
shift
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi

if [[ "$NNODES" == "1" && -z "${RDZV_ENDPOINT:-}" ]]; then
  # --standalone: a private c10d rendezvous on a free local port (several runs can share a machine).
  RDZV=(--standalone --nnodes=1)
else
  : "${RDZV_ENDPOINT:?multi-node needs RDZV_ENDPOINT=host:port (same on all nodes)}"
  RDZV=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-hs_scale}")
fi

exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-0}" -m hs_scale.cli train --config "$CONFIG" "$@"
