#!/usr/bin/env bash
# A real Slurm with two fake nodes (node1, node2) on this one machine, to test examples/slurm/*.sbatch.
# Needs root and Debian's slurm packages (installed here with apt-get when missing). Recipe and measurements:
# docs/slurm.md.
#
#   bash scripts/slurm_local.sh up      # install if needed, configure, start munge/slurmctld/2 slurmd, wait idle
#   bash scripts/slurm_local.sh down    # cancel jobs, stop the daemons by PID, remove everything `up` added
#   bash scripts/slurm_local.sh env     # print `export SLURM_CONF=...` for clients (sbatch, squeue, scontrol)
#
# What `up` adds, and `down` removes again:
#   - $SLURM_LOCAL_DIR (default /tmp/megatron_est-slurm): slurm.conf, gres.conf, state, spool, logs, pidfiles,
#     fake GPU device files. The config is NOT written to /etc/slurm: clients need SLURM_CONF (see `env`).
#   - two lines in /etc/hosts ending in "# megatron_est-slurm-local" (node1 -> 127.0.0.11, node2 -> 127.0.0.12)
#   - the daemons: munged (only if munge was not already running), slurmctld, one slurmd per node, each slurmd in
#     its own UTS namespace so that `hostname` in a task says node1 / node2 (torchrun's c10d rendezvous needs it).
# Packages that `up` installed stay installed (slurmctld slurmd slurm-client munge, ~13 MB).
#
# Ports: slurmctld $SLURM_LOCAL_PORT (default 26817), slurmd +1 and +2. Each fake node claims
# $SLURM_LOCAL_CPUS CPUs (default 8) and $SLURM_LOCAL_GPUS GPUs (default 8; /dev/null-like char devices, nothing
# is bound), so production directives (--gpus-per-node, --cpus-per-task, --mem=0) schedule as written; the jobs
# themselves run on the CPU and must be told so (BACKEND=gloo in examples/slurm).
set -uo pipefail

S=${SLURM_LOCAL_DIR:-/tmp/megatron_est-slurm}
MARK="# megatron_est-slurm-local"
PORT=${SLURM_LOCAL_PORT:-26817}
CPUS=${SLURM_LOCAL_CPUS:-8}
GPUS=${SLURM_LOCAL_GPUS:-8}
NODES=(node1 node2)
ADDRS=(127.0.0.11 127.0.0.12)
export SLURM_CONF=$S/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

tail_log() { [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 30 "$1" >&2; }; }

# ------------------------------------------------------------------------------------------------ install
install_packages() {
  local missing=0 b
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/bin/munge; do
    [ -x "$b" ] || missing=1
  done
  [ $missing = 0 ] && return 0
  command -v apt-get >/dev/null \
    || die "slurm is not installed and apt-get is not available to install it (needs: ${PACKAGES[*]})"
  say "installing ${PACKAGES[*]} with apt-get (--no-install-recommends)"
  local t0=$SECONDS
  timeout 300 apt-get update -qq >"$S.apt.log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
         "${PACKAGES[@]}" >>"$S.apt.log" 2>&1
  local rc=$?
  if [ $rc != 0 ]; then
    tail -n 20 "$S.apt.log" >&2; rm -f "$S.apt.log"
    die "apt-get install ${PACKAGES[*]} failed (exit $rc)"
  fi
  rm -f "$S.apt.log"
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
    [ -x "$b" ] || die "$b is still missing after apt-get install ${PACKAGES[*]}"
  done
  say "installed in $((SECONDS - t0)) s"
}

# ------------------------------------------------------------------------------------------------ config
write_config() {
  mkdir -p "$S"/{etc,state,log,run,fakedev} "$S"/spool/node1 "$S"/spool/node2 || die "cannot create $S"
  local i gres_line=""
  if [ "$GPUS" -gt 0 ]; then
    for ((i = 0; i < GPUS; i++)); do mknod -m 0666 "$S/fakedev/nvidia$i" c 1 3 || die "mknod failed"; done
    echo "NodeName=node1,node2 Name=gpu File=$S/fakedev/nvidia[0-$((GPUS - 1))]" >"$S/etc/gres.conf"
    gres_line="Gres=gpu:$GPUS"
  fi
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_local.sh: two fake nodes on one machine (removed by 'slurm_local.sh down').
ClusterName=megatron-est-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$PORT
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
SlurmdParameters=config_overrides
$( [ -n "$gres_line" ] && echo GresTypes=gpu )
NodeName=node1 NodeHostname=localhost Port=$((PORT + 1)) CPUs=$CPUS RealMemory=4000 $gres_line State=UNKNOWN
NodeName=node2 NodeHostname=localhost Port=$((PORT + 2)) CPUs=$CPUS RealMemory=4000 $gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts_lines() {
  local i
  grep -q " node1 $MARK\$" /etc/hosts && return 0
  for i in 0 1; do printf '%s %s %s\n' "${ADDRS[$i]}" "${NODES[$i]}" "$MARK"; done >>/etc/hosts \
    || die "cannot append to /etc/hosts"
}

remove_hosts_lines() {
  grep -q "$MARK\$" /etc/hosts 2>/dev/null || return 0
  local tmp
  tmp=$(mktemp) || return 1
  grep -v "$MARK\$" /etc/hosts >"$tmp"
  cat "$tmp" >/etc/hosts  # in place: /etc/hosts may be a bind mount
  rm -f "$tmp"
}

# ------------------------------------------------------------------------------------------------ daemons
start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munge already running (left alone)"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey --create failed"
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
    || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$S/run/munged.pid"  # ours: `down` stops it
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer after starting munged"
}

start_slurm() {
  slurmctld -f "$SLURM_CONF" || { tail_log "$S/log/slurmctld.log"; die "slurmctld did not start"; }
  local n
  for n in "${NODES[@]}"; do
    # Own UTS namespace: tasks of this slurmd see `hostname` = $n. slurmd daemonizes; check its exit status.
    unshare --uts -- sh -c "hostname $n && exec slurmd -f '$SLURM_CONF' -N $n" \
      || { tail_log "$S/log/slurmd-$n.log"; die "slurmd -N $n did not start"; }
  done
  local i idle
  for ((i = 0; i < 120; i++)); do
    idle=$(timeout 10 sinfo -h -N -p debug -o %t 2>/dev/null | grep -c '^idle$')
    [ "$idle" = 2 ] && break
    sleep 0.5
  done
  if [ "$idle" != 2 ]; then
    timeout 10 sinfo -N -p debug >&2
    tail_log "$S/log/slurmctld.log"; tail_log "$S/log/slurmd-node1.log"
    die "nodes not idle after 60 s"
  fi
}

smoke_test() {
  local out
  out=$(timeout 60 srun --immediate=20 -N2 -n2 --ntasks-per-node=1 -l hostname 2>&1 | sort)
  if [ "$out" != $'0: node1\n1: node2' ]; then
    echo "$out" >&2
    die "srun -N2 hostname did not print node1 and node2"
  fi
}

# ------------------------------------------------------------------------------------------------ teardown
stop_pids() {  # stop_pids EXE PIDFILE...: TERM every live PID whose /proc/PID/exe is EXE, wait, KILL leftovers
  local exe pid f pids=()
  exe=$(readlink -f "$1"); shift
  for f in "$@"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    if [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$exe" ]; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then say "PID $pid did not exit on TERM: KILL"; kill -KILL "$pid"; fi
  done
  return 0
}

down() {
  if [ -f "$SLURM_CONF" ] && timeout 10 scontrol ping >/dev/null 2>&1; then
    local jobs i
    for ((i = 0; i < 60; i++)); do  # Slurm kills the jobs' processes (and slurmstepds) itself
      jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
      [ -z "$jobs" ] && break
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs  # again each round: a job that requeued itself is pending again
      sleep 0.5
    done
  fi
  stop_pids /usr/sbin/slurmd "$S"/run/slurmd-*.pid
  stop_pids /usr/sbin/slurmctld "$S/run/slurmctld.pid"
  stop_pids /usr/sbin/munged "$S/run/munged.pid"
  remove_hosts_lines
  rm -rf "$S"
}

# ------------------------------------------------------------------------------------------------ main
case "${1:-}" in
  up)
    [ "$(id -u)" = 0 ] || die "must run as root (starts daemons, edits /etc/hosts)"
    t0=$SECONDS
    install_packages
    command -v unshare >/dev/null || die "unshare (util-linux) is missing"
    if pid=$(cat "$S/run/slurmctld.pid" 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] \
       && [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f /usr/sbin/slurmctld)" ]; then
      die "a local Slurm is already up (slurmctld PID $pid, $S): another run may be using it; if it is a" \
          "leftover, run '$0 down' first"
    fi
    down  # whatever a crashed run left behind (by its pidfiles)
    write_config
    add_hosts_lines
    start_munge
    start_slurm
    smoke_test
    say "up in $((SECONDS - t0)) s: nodes node1 node2 idle; clients need: export SLURM_CONF=$SLURM_CONF"
    ;;
  down)
    [ "$(id -u)" = 0 ] || die "must run as root"
    t0=$SECONDS
    down
    say "down in $((SECONDS - t0)) s"
    ;;
  env)
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
  *)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
