#!/usr/bin/env bash
# start.sh DIR - start a real one-host Slurm 22.05 cluster under DIR (created if missing), as root, no systemd:
# one slurmctld and one slurmd per fake node n1..nN, all on 127.0.0.1, auth/none (loopback only, no munged).
# Daemons run in the background with their PIDs in DIR/pids (stop.sh DIR stops exactly those).
# Prints nothing but the path of DIR/env.sh on stdout; `source DIR/env.sh` sets SLURM_CONF (every Slurm client command
# needs it) and the Open MPI variables for running as root across fake nodes.
# Returns when every node is idle, or fails after VLFLOW_CLUSTER_TIMEOUT seconds. A healthy cluster already running
# in DIR is kept as is.
# Knobs: VLFLOW_CLUSTER_NODES (2), VLFLOW_CLUSTER_CPUS (CPUs per node, nproc), VLFLOW_CLUSTER_PORT (controller port,
# nodes use the next N; default: the first free block from 17817), VLFLOW_CLUSTER_TIMEOUT (60),
# VLFLOW_CLUSTER_EXTRA_CONF (lines appended to slurm.conf, e.g. "PreemptType=...").
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$1
NODES=${VLFLOW_CLUSTER_NODES:-2}
# nproc honours OMP_NUM_THREADS (tests run with 1): count the cores this host really offers
CPUS=${VLFLOW_CLUSTER_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
TIMEOUT=${VLFLOW_CLUSTER_TIMEOUT:-60}
log() { echo "[cluster $(date +%T)] $*" >&2; }
fail() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "start.sh must run as root (slurmd starts job steps as their user)"
for b in slurmctld slurmd sinfo scontrol; do
  command -v "$b" > /dev/null || fail "$b not found: run scripts/cluster/install.sh first"
done
mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

# pid_alive NAME: DIR/pids/NAME.pid names a live (not zombie) process running the expected program
pid_alive() {
  local file=$DIR/pids/$1.pid pid
  [ -s "$file" ] || return 1; pid=$(cat "$file")
  [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] \
    && grep -qx "${1%%-*}" "/proc/$pid/comm" 2>/dev/null
}
daemons=(slurmctld); for i in $(seq 1 "$NODES"); do daemons+=("slurmd-n$i"); done
all_idle() {
  local states; states=$(timeout 5 sinfo -h -N -o %T 2>/dev/null) || return 1
  [ "$(grep -cx idle <<< "$states")" = "$NODES" ]
}

if [ -d "$DIR/pids" ]; then
  healthy=1; for d in "${daemons[@]}"; do pid_alive "$d" || healthy=0; done
  if [ $healthy = 1 ] && [ "$(cat "$DIR/nodes" 2>/dev/null)" = "$NODES" ] && all_idle; then
    log "cluster already running in $DIR"; echo "$DIR/env.sh"; exit 0
  fi
  log "stopping the partial or different cluster left in $DIR"
  bash "$HERE/stop.sh" "$DIR" >&2
fi

port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
block_free() { local p; for p in $(seq "$1" $(($1 + NODES))); do port_free "$p" || return 1; done; }
if [ -n "${VLFLOW_CLUSTER_PORT:-}" ]; then
  PORT=$VLFLOW_CLUSTER_PORT; block_free "$PORT" || fail "ports $PORT-$((PORT + NODES)) are not all free"
else
  PORT=17817; until block_free "$PORT"; do PORT=$((PORT + NODES + 1)); [ "$PORT" -lt 18817 ] || fail "no free ports"; done
fi

rm -rf "$DIR/state" "$DIR/spool" "$DIR/tmp" "$DIR/log" "$DIR/pids"
mkdir -p "$DIR/state" "$DIR/log" "$DIR/pids"
for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
cat > "$CONF" <<CONF
# written by scripts/cluster/start.sh: a one-host test cluster, loopback only
ClusterName=vlflow-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
# no munged: acceptable only because every daemon listens on 127.0.0.1 of one machine
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
# fake nodes share the host: each needs its own spool and tmp dirs
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmdPidFile=$DIR/spool/%n/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
DependencyParameters=kill_invalid_depend
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to "scontrol show job" (no accounting database here) for 5 minutes
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=30
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + NODES)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
${VLFLOW_CLUSTER_EXTRA_CONF:-}
CONF
cat > "$DIR/env.sh" <<ENV
# written by scripts/cluster/start.sh; source it to use the cluster in $DIR
export SLURM_CONF=$CONF
# Open MPI refuses root without these; fake nodes share one host, where its shared-memory transport misbehaves
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,tcp
ENV
echo "$NODES" > "$DIR/nodes"

# start NAME COMMAND...: in the background, in a session of its own, output to DIR/log/NAME.out, pid recorded
start() { local name=$1; shift; setsid "$@" < /dev/null > "$DIR/log/$name.out" 2>&1 & echo $! > "$DIR/pids/$name.pid"; }
started=$(date +%s%N)
start slurmctld slurmctld -D -f "$CONF"
for i in $(seq 1 "$NODES"); do start "slurmd-n$i" slurmd -D -N "n$i" -f "$CONF"; done
deadline=$((SECONDS + TIMEOUT))
until all_idle; do
  for d in "${daemons[@]}"; do
    pid_alive "$d" || { tail -5 "$DIR/log/$d.out" >&2; bash "$HERE/stop.sh" "$DIR" >&2; fail "$d exited during start (logs in $DIR/log)"; }
  done
  if [ $SECONDS -ge $deadline ]; then
    timeout 5 sinfo -N >&2 || true; bash "$HERE/stop.sh" "$DIR" >&2
    fail "nodes not idle after $TIMEOUT s (logs in $DIR/log)"
  fi
  sleep 0.2
done
log "$NODES node(s) idle after $((($(date +%s%N) - started) / 1000000)) ms; controller on 127.0.0.1:$PORT, logs in $DIR/log"
echo "$DIR/env.sh"
