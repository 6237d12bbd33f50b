#!/usr/bin/env bash
# Installs what the one-host test cluster needs (Debian/Ubuntu, as root): Slurm 22.05 (controller, node daemon,
# client commands) and Open MPI with PMIx. Idempotent: does nothing when every binary is already there.
# apt must not start the packaged services (they would use /etc/slurm): start.sh runs its own daemons.
set -euo pipefail
needed=(slurmctld slurmd sbatch srun salloc mpirun)
missing=(); for b in "${needed[@]}"; do command -v "$b" > /dev/null || missing+=("$b"); done
dpkg-query -W -f='${Status}' libpmix-dev 2> /dev/null | grep -q 'ok installed' || missing+=(libpmix-dev)
[ ${#missing[@]} -eq 0 ] && { echo "cluster packages already installed"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "error: scripts/cluster/install.sh must run as root (apt-get); missing: ${missing[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then  # keeps apt from starting slurmctld/slurmd with the packaged config
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
fi
trap '[ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -q
# libpmix-dev before any slurmd starts, else `srun --mpi=pmix` times out
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client openmpi-bin libpmix-dev
