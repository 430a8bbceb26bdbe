#!/usr/bin/env bash
# DeepSpeed launcher: every rank runs `hs-scale train` with the DeepSpeed ZeRO engine (parallel.engine=deepspeed).
#
#   one node, all GPUs:  launchers/deepspeed/run.sh configs/x.yaml [overrides]
#   laptop (CPU ranks):  NUM_GPUS=2 launchers/deepspeed/run.sh configs/synthetic.yaml --train.device cpu
#   multi-node (ssh):    HOSTFILE=hostfile launchers/deepspeed/run.sh configs/x.yaml   (see hostfile.example,
#                        deepspeed_env.example; on Slurm: launchers/slurm/deepspeed.sbatch)
#
# Parameters (environment): NUM_GPUS (ranks per node; default all GPUs, 1 on CPU), ZERO_STAGE (default 2),
# HOSTFILE (multi-node), MASTER_PORT (default 29500), DEEPSPEED (the launcher command, default deepspeed),
# DS_LOG_LEVEL (the launcher's own log level, default warning: its INFO lines are per-process spawn banners).
# The ds_config is derived from the hs_scale config by the engine; print it with
#   python -m hs_scale.launch.ds_config --config configs/x.yaml --parallel.engine deepspeed --parallel.zero_stage 2
set -euo pipefail
CONFIG=${1:?usage: launchers/deepspeed/run.sh CONFIG [--section.field value ...]}
shift
ARGS=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --log_level "${DS_LOG_LEVEL:-warning}")
# No GPU here: say so (what DeepSpeed would detect anyway) instead of its "Setting accelerator to CPU. If you have
# GPU ..." warning in every process.
if ! (nvidia-smi -L 2>/dev/null || true) | grep -q '^GPU'; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
[[ -n "${NUM_GPUS:-}" ]] && ARGS+=(--num_gpus "$NUM_GPUS")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
# --no_local_rank: hs_scale reads LOCAL_RANK from the environment; --module: run `python -m hs_scale.cli`.
exec ${DEEPSPEED:-deepspeed} "${ARGS[@]}" --module hs_scale.cli train --config "$CONFIG" \
  --parallel.engine deepspeed --parallel.zero_stage "${ZERO_STAGE:-2}" "$@"
