#!/usr/bin/env bash
# Submit an hs_scale training run to a running Ray cluster (`ray job submit`): N Ray Train workers, each running
# hs_scale.training.run.train with the same config. Blocks and streams the logs; exits non-zero if the job failed.
#
#   RAY_ADDRESS=http://head:8265 NUM_WORKERS=16 USE_GPU=1 STORAGE_PATH=/shared/ray_results \
#     launchers/ray/submit.sh configs/x.yaml [--section.field value ...]
#   laptop: ray start --head --num-cpus 2 --dashboard-host 127.0.0.1; NUM_WORKERS=2 launchers/ray/submit.sh configs/synthetic.yaml
#
# Parameters (environment):
#   RAY_ADDRESS      dashboard address of the cluster (default http://127.0.0.1:8265)
#   NUM_WORKERS      training workers = ranks (default 1)
#   USE_GPU          1: one GPU per worker, nccl (default 0: CPU, gloo)
#   CPUS_PER_WORKER  CPUs reserved per worker (default 1)
#   STORAGE_PATH     where Ray persists checkpoints: a path every node sees (NFS/Lustre) or s3://... (default ~/ray_results)
#   RUN_NAME         run folder under STORAGE_PATH (default hs_scale)
#   MAX_FAILURES     worker-group restarts from the last checkpoint (default 1)
#   WORKING_DIR      upload this folder as the job's working dir (default: none - hs_scale installed on every node);
#                    pass "." to ship the repo (runs/ and .git are excluded)
set -euo pipefail
CONFIG=${1:?usage: launchers/ray/submit.sh CONFIG [--section.field value ...]}
shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
RUNTIME=()
if [[ -n "${WORKING_DIR:-}" ]]; then
  RUNTIME=(--runtime-env-json "{\"working_dir\": \"$WORKING_DIR\", \"excludes\": [\"runs/\", \".git/\", \"*.pt\"]}")
else
  CONFIG=$(realpath "$CONFIG")   # no working dir: the driver does not run in our cwd
fi
GPU=(); [[ "${USE_GPU:-0}" == "1" ]] && GPU=(--use-gpu)
STORAGE_PATH=${STORAGE_PATH:-$HOME/ray_results}
[[ "$STORAGE_PATH" == *://* ]] || STORAGE_PATH=$(realpath -m "$STORAGE_PATH")
exec ray job submit "${RUNTIME[@]}" -- python -m hs_scale.launch.ray_train --config "$CONFIG" \
  --num-workers "${NUM_WORKERS:-1}" "${GPU[@]}" --cpus-per-worker "${CPUS_PER_WORKER:-1}" \
  --storage-path "$STORAGE_PATH" --name "${RUN_NAME:-hs_scale}" --max-failures "${MAX_FAILURES:-1}" "$@"
