#!/usr/bin/env bash
# A real Slurm cluster on this machine, for trying `sslscale submit` and for tests/slurm.
#
#   slurm/local-cluster.sh start    install slurm-wlm + munge if missing (Debian, root), write a
#                                   config under $SSLSCALE_SLURM_DIR, start munged, slurmctld and
#                                   one slurmd per emulated node, wait until the nodes are idle,
#                                   and print `export SLURM_CONF=...` (eval it, or source env.sh)
#   slurm/local-cluster.sh stop     cancel the cluster's jobs, stop the daemons by their pid files
#                                   and remove the node names from /etc/hosts
#   slurm/local-cluster.sh status   print whether it runs, its nodes and its queue (exit 3: not running)
#   slurm/local-cluster.sh install  only install slurm-wlm + munge if missing (exit 1 if it cannot)
#
# Environment: SSLSCALE_SLURM_DIR (state folder, default /tmp/sslscale-slurm),
# SSLSCALE_SLURM_NODES (emulated nodes, default 2), SSLSCALE_SLURM_PORT (slurmctld port, default
# 16817; slurmd i listens on PORT+i). Needs root: munged's key, slurmd and /etc/hosts.
# Emulated nodes share the machine's CPUs (each declares all of them) and its `hostname`: jobs
# must take node identity from SLURM_NODEID / SLURMD_NODENAME. Debian's build of Slurm 22.05 has
# MULTIPLE_SLURMD, which lets several slurmd (`slurmd -N NAME`) run on one host.
set -euo pipefail

STATE=${SSLSCALE_SLURM_DIR:-/tmp/sslscale-slurm}
NODES=${SSLSCALE_SLURM_NODES:-2}
PORT=${SSLSCALE_SLURM_PORT:-16817}
PREFIX=sslnode  # node names sslnode1..N at 127.0.1.1..N
HOSTS_BEGIN="# >>> sslscale local Slurm cluster ($STATE) >>>"
HOSTS_END="# <<< sslscale local Slurm cluster ($STATE) <<<"
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
export SLURM_CONF=$STATE/slurm.conf

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

alive() {  # alive PIDFILE: the process in PIDFILE runs
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  local missing=0 cmd
  for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing=1; done
  ((missing)) || return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing: install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >/dev/null \
    || die "apt-get install ${PACKAGES[*]} failed"
}

hosts_remove() {  # drop our block from /etc/hosts (rewritten in place: it may be a bind mount)
  grep -qF "$HOSTS_BEGIN" /etc/hosts || return 0
  local kept
  kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip' /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
}

hosts_add() {
  hosts_remove
  { echo "$HOSTS_BEGIN"
    for i in $(seq 1 "$NODES"); do echo "127.0.1.$i $PREFIX$i"; done
    echo "$HOSTS_END"; } >> /etc/hosts
}

write_config() {
  local cores host i
  cores=$(nproc)
  host=$(hostname -s)
  {
    cat <<EOF
# Written by slurm/local-cluster.sh: $NODES emulated nodes on $host, state in $STATE.
ClusterName=sslscale
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
MailProg=/bin/true
EOF
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=$PREFIX$i NodeAddr=127.0.1.$i Port=$((PORT + i)) Sockets=1 CoresPerSocket=$cores ThreadsPerCore=1 State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=${PREFIX}[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  } > "$SLURM_CONF"
}

start_munge() {
  alive "$STATE/run/munged.pid" && return 0
  [[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key" --force
  chmod 0400 "$STATE/munge/munge.key"
  munged --force --socket="$STATE/munge/munge.socket.2" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
}

wait_idle() {  # wait until every node is idle (or mixed/allocated: up and usable)
  local deadline=$((SECONDS + 60)) states
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n $states && $(sinfo -h -N -o '%N' | wc -l) -eq $NODES && \
          ! $states =~ (down|drain|unknown|not_responding|fail) ]]; then
      return 0
    fi
    sleep 1
  done
  sinfo -N -l >&2 || true
  die "nodes not idle after 60 s (logs: $STATE/log)"
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (munged key, slurmd, /etc/hosts)"
  ((NODES >= 1)) || die "SSLSCALE_SLURM_NODES must be >= 1"
  install_packages
  if alive "$STATE/run/slurmctld.pid"; then
    log "already running (state $STATE)"
    wait_idle
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  mkdir -p "$STATE"/{ctld,run,log,munge}
  chmod 0755 "$STATE" "$STATE/munge"  # munged refuses a group/world-writable socket folder
  local i
  for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/$PREFIX$i"; done  # slurmd does not
  write_config
  hosts_add
  start_munge
  slurmctld -i -c
  for i in $(seq 1 "$NODES"); do slurmd -N "$PREFIX$i"; done
  wait_idle
  echo "export SLURM_CONF=$SLURM_CONF" > "$STATE/env.sh"
  log "up: $NODES nodes (${PREFIX}1..$NODES), partition 'local'; logs in $STATE/log"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM, wait up to 10 s, then SIGKILL
  local file=$1 pid i
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$file"
}

stop() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  local file i
  if alive "$STATE/run/slurmctld.pid"; then  # end the jobs first: their slurmstepd outlive slurmd
    scancel --partition=local 2>/dev/null || true
    for i in $(seq 1 30); do
      [[ -z $(squeue -h -t running,completing,configuring -o %i 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  for file in "$STATE"/run/slurmd-*.pid; do [[ -e $file ]] && stop_pidfile "$file"; done
  stop_pidfile "$STATE/run/slurmctld.pid"
  stop_pidfile "$STATE/run/munged.pid"
  hosts_remove
  rm -f "$STATE/env.sh"
  log "stopped"
}

status() {
  if ! alive "$STATE/run/slurmctld.pid"; then echo "not running (state $STATE)"; return 3; fi
  echo "running: SLURM_CONF=$SLURM_CONF"
  sinfo -N
  squeue
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) [[ $(id -u) == 0 ]] || command -v slurmctld >/dev/null || die "must run as root to install"
           install_packages ;;
  *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
