#!/usr/bin/env bash
# System packages the launcher tests need (Debian/Ubuntu): a local Slurm cluster (slurmctld, slurmd, slurm-client,
# munge) and numactl (deepspeed --bind_cores_to_rank). Installs only where it can (root + apt-get); otherwise says
# why and exits 0 - the tests that need them then skip with that reason.
set -uo pipefail
PKGS=(slurmctld slurmd slurm-client munge numactl)
need=()
for b in slurmctld slurmd sbatch munged numactl; do
  command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || need+=("$b")
done
if [[ ${#need[@]} -eq 0 ]]; then echo "install_test_deps: Slurm, munge and numactl already installed"; exit 0; fi
if [[ "$(id -u)" != "0" ]]; then echo "install_test_deps: not root, cannot install ${PKGS[*]} (missing: ${need[*]})"; exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "install_test_deps: no apt-get, cannot install ${PKGS[*]}"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends "${PKGS[@]}" \
  || echo "install_test_deps: apt-get failed; Slurm tests will skip"
exit 0
