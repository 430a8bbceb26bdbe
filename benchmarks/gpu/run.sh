#!/usr/bin/env bash
# Every GPU check of hs_scale in one command, under 8 minutes on one H200 (docs/gpu.md):
#   benchmarks/gpu/run.sh [--dry-run] [--out DIR] [--budget-s SECONDS] [--only STEP,STEP]
# 1. installs the wheels carried in benchmarks/gpu/wheels/ (benchmarks/gpu/prepare_wheels.sh) into a private
#    folder; none there, or an install that fails: it goes on with what the machine has;
# 2. runs benchmarks/gpu/runner.py: environment report, pytest -m gpu, attention benchmark, train-step throughput
#    and MFU, a short bf16 training run; writes gpu_results.json, gpu_results.md and gpu_run.log into --out
#    (default: $OUT when set, as on the device machine, else benchmarks/results/gpu).
# --dry-run (any machine): installs nothing, runs the steps that need no CUDA, prints the commands of the others.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-$repo/benchmarks/results/gpu}
dry=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; args+=(--dry-run) ;;
    --out) out=$2; shift ;;
    --budget-s|--only) args+=("$1" "$2"); shift ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'; use --dry-run, --out DIR, --budget-s SECONDS, --only STEPS" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
wheels=$here/wheels
site=${HS_GPU_SITE:-/tmp/hs_gpu_site}
shopt -s nullglob
whls=("$wheels"/*.whl)
if [ ${#whls[@]} -eq 0 ]; then
  echo "no wheels in $wheels (benchmarks/gpu/prepare_wheels.sh makes them): using what is installed"
elif [ $dry = 1 ]; then
  echo "would install ${#whls[@]} wheels into $site: $(cd "$wheels" && echo *.whl)"
elif "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${whls[@]}"; then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#whls[@]} wheels into $site"
else
  echo "installing the wheels failed: going on with what is installed" >&2
fi
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu/runner.py --out "$out" "${args[@]}"
