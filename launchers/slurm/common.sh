# Sourced by the sbatch templates (bash): head node and a robust head address for the current allocation.
#
# HEAD_NODE: first node of the allocation. HEAD_ADDR: an address of it the other nodes can reach - the first
# non-loopback IPv4 of `hostname --ip-address` / `hostname -I` on that node (Debian maps the hostname to 127.0.1.1,
# which other nodes cannot reach); 127.0.0.1 when all nodes are one machine. Override with HEAD_ADDR=... (e.g. the
# InfiniBand/IPoIB address) when the first address is the wrong network.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NNODES=${SLURM_JOB_NUM_NODES:-1}
if [[ -z "${HEAD_ADDR:-}" ]]; then
  # All "nodes" on one machine (a laptop or test cluster): loopback is the right address.
  _hosts=$(srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 hostname 2>/dev/null | sort -u | wc -l)
  [[ "$_hosts" == "1" ]] && HEAD_ADDR=127.0.0.1
fi
if [[ -z "${HEAD_ADDR:-}" ]]; then
  _addrs=$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" bash -c 'hostname --ip-address; hostname -I' 2>/dev/null | tr ' ' '\n')
  HEAD_ADDR=$(echo "$_addrs" | grep -E '^[0-9]+(\.[0-9]+){3}$' | grep -v '^127\.' | head -n 1)
  [[ -n "$HEAD_ADDR" ]] || HEAD_ADDR=$(echo "$_addrs" | grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n 1)
  [[ -n "$HEAD_ADDR" ]] || { echo "cannot resolve an address of $HEAD_NODE; set HEAD_ADDR" >&2; exit 1; }
fi
# A port derived from the job id: concurrent jobs sharing a node do not collide.
JOB_PORT=${JOB_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
echo "hs_scale: job ${SLURM_JOB_ID:-?} nodes=$NNODES head=$HEAD_NODE ($HEAD_ADDR) port=$JOB_PORT"

# Preemption and time limits (docs/reliability.md). The templates ask for SIGUSR1 on this batch shell 90 s ahead
# (`#SBATCH --signal=B:USR1@90`) and allow requeueing (`#SBATCH --requeue`). hs_run_preemptible runs the job
# step in the background; on USR1 (or TERM) it sends SIGTERM to srun, which forwards it to the launcher (torchrun
# / deepspeed) and on to every rank: the ranks agree at the next step boundary, save a checkpoint and exit 75.
# The job is then requeued and its next start resumes from that checkpoint (the output dir's lock records the job
# id, so the requeued job may take over a lock its previous run could not release).
hs_run_preemptible() {
  "$@" &
  local pid=$! rc=0
  HS_PREEMPTED=0
  trap 'HS_PREEMPTED=1; echo "hs_scale: preemption/time-limit warning: asking every rank to save and stop"; kill -TERM "$pid" 2>/dev/null || true' USR1 TERM
  while :; do
    set +e; wait "$pid"; rc=$?; set -e
    kill -0 "$pid" 2>/dev/null || break  # wait returns early when a trap runs: the step may still be saving
  done
  trap - USR1 TERM
  if [[ "$HS_PREEMPTED" == 1 || "$rc" == 75 ]] && [[ "${HS_REQUEUE:-1}" == 1 ]]; then
    echo "hs_scale: stopped at a checkpoint (exit $rc); requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
