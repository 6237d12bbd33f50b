#!/usr/bin/env bash
# stop.sh DIR - stop the cluster start.sh started in DIR: cancel its jobs, then SIGTERM each daemon whose PID is
# recorded in DIR/pids (only if it still runs the expected program), SIGKILL after a grace period, and kill the job
# step daemons (slurmstepd) of this cluster with their processes. Leaves the logs; safe to run twice.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
DIR=$(cd "$1" && pwd)
GRACE=${VLFLOW_CLUSTER_STOP_GRACE:-10}
export SLURM_CONF=$DIR/slurm.conf
log() { echo "[cluster $(date +%T)] $*" >&2; }

recorded_pid() {  # recorded_pid NAME -> the pid if it still runs the program NAME names
  local file=$DIR/pids/$1.pid pid
  [ -s "$file" ] || return 1; pid=$(cat "$file")
  [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] \
    && grep -qx "${1%%-*}" "/proc/$pid/comm" 2>/dev/null && echo "$pid"
}
running() { local p; for p; do [ -r "/proc/$p/stat" ] && [ "$(awk '{print $3}' "/proc/$p/stat")" != Z ] && return 0; done; return 1; }
terminate() {  # terminate PID...: SIGTERM, wait up to GRACE s, then SIGKILL
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2> /dev/null; local deadline=$((SECONDS + GRACE))
  while running "$@"; do
    if [ $SECONDS -ge $deadline ]; then log "SIGKILL $*"; kill -KILL "$@" 2> /dev/null; sleep 0.2; return 0; fi
    sleep 0.1
  done
}
descendants() { local child; for child in $(ps -o pid= --ppid "$1" 2> /dev/null); do echo "$child"; descendants "$child"; done; }

if recorded_pid slurmctld > /dev/null; then
  jobs=$(timeout 5 squeue -h -o %i 2> /dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs $jobs"; timeout 5 scancel $jobs 2> /dev/null
    deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ] && [ -n "$(timeout 5 squeue -h -o %i 2> /dev/null)" ]; do sleep 0.2; done
  fi
fi
node_pids=()
for file in "$DIR"/pids/slurmd-*.pid; do
  [ -e "$file" ] || continue
  name=$(basename "$file" .pid); pid=$(recorded_pid "$name") && node_pids+=("$pid")
done
terminate "${node_pids[@]}"
# Step daemons of this cluster (they keep this cluster's slurmd log open) and whatever they started.
steps=()
for pid in $(pgrep -x slurmstepd 2> /dev/null); do
  for fd in /proc/$pid/fd/*; do case $(readlink "$fd" 2> /dev/null) in "$DIR"/*) steps+=("$pid"); break ;; esac; done
done
if [ ${#steps[@]} -gt 0 ]; then
  victims=("${steps[@]}"); for pid in "${steps[@]}"; do victims+=($(descendants "$pid")); done
  log "stopping job step daemons and their processes: ${victims[*]}"; terminate "${victims[@]}"
fi
pid=$(recorded_pid slurmctld) && terminate "$pid"
rm -rf "$DIR/pids"
log "stopped the cluster in $DIR"
