#!/usr/bin/env bash
# A real single-node Slurm cluster (22.05, Debian 12) on this machine, for tests and trying it out.
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge if missing (apt-get), write
#                                   /etc/slurm/slurm.conf, start munged, slurmctld, slurmd, wait for
#                                   the node to be idle (needs root; a no-op when the cluster is up)
#   scripts/slurm-local.sh stop     cancel all jobs, stop slurmd, slurmctld, munged
#   scripts/slurm-local.sh status   sinfo + squeue --states=all; exit 1 when the cluster is not up
#
# No systemd, no cgroups (a container): daemons are started directly, processes are tracked by
# proctrack/linuxproc, no accounting (sacct does not work). Finished jobs stay visible in
# `squeue --states=all` / `scontrol show job` for an hour (MinJobAge=3600).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

log() { echo "slurm-local: $*"; }
die() {
    echo "slurm-local: error: $*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# the daemons live in /usr/sbin, which a non-login root shell may not have on PATH
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

pid_alive() { [[ -s $1 ]] && [[ -d /proc/$(cat "$1") ]]; }
# sinfo retries for ~10 s when no slurmctld answers: ask it only when a slurmctld runs here
ctld_running() { pid_alive "$CTLD_PID" || pgrep -x slurmctld >/dev/null 2>&1; }
node_state() {
    ctld_running || return 0
    timeout 10 sinfo -h -o %T 2>/dev/null | head -n1 || true
}
# up: munged, slurmctld and slurmd run here and the node is usable (slurmctld notices a dead
# slurmd only after SlurmdTimeout, so sinfo alone is not enough)
is_up() {
    munge_ok && ctld_running && { pid_alive "$SLURMD_PID" || pgrep -x slurmd >/dev/null 2>&1; } || return 1
    case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
    esac
}
munge_ok() { have munge && have unmunge && timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

# kill the daemon whose pid is in $1 (else any process named $2), wait up to 10 s for it to go
stop_daemon() {
    local pidfile=$1 name=$2 pid
    if pid_alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    if pgrep -x "$name" >/dev/null 2>&1; then
        pkill -x "$name" 2>/dev/null || true
        for _ in $(seq 50); do
            pgrep -x "$name" >/dev/null 2>&1 || break
            sleep 0.2
        done
        pkill -9 -x "$name" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

install_packages() {
    have slurmctld && have slurmd && have munged && have sinfo && return 0
    have apt-get || die "slurmctld/slurmd/munged not found and no apt-get to install slurm-wlm munge"
    log "installing slurm-wlm munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local out
    out=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        rm -f "$out"
        die "apt-get install slurm-wlm munge failed"
    fi
    rm -f "$out"
}

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if have mungekey; then
            mungekey --create --keyfile="$MUNGE_KEY"
        elif have create-munge-key; then
            create-munge-key -f
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    stop_daemon "$MUNGE_PID" munged
    # as the munge user when that works, else as root with --force (munged refuses root without it)
    if ! runuser -u munge -- munged </dev/null >>"$LOG_DIR/munged.out" 2>&1; then
        munged --force </dev/null >>"$LOG_DIR/munged.out" 2>&1 || true
    fi
    for _ in $(seq 50); do
        munge_ok && return 0
        sleep 0.2
    done
    tail -n 20 "$LOG_DIR/munged.out" /var/log/munge/munged.log 2>/dev/null >&2 || true
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    local host cpus mem_mb real_mb def_mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    # a bit under MemTotal: slurmd drains a node whose RealMemory is above what it measures
    real_mb=$((mem_mb * 95 / 100))
    # without a default, CR_Core_Memory gives each job the whole node's memory (one job at a time)
    def_mem=$((real_mb / cpus))
    mkdir -p "$CONF_DIR"
    cat >"$CONF" <<EOF
# written by scripts/slurm-local.sh (a single-node cluster for tests); rewritten on each start
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=5
OverTimeLimit=0
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    local t0 host state
    t0=$(date +%s.%N)
    if have sinfo && is_up; then
        log "cluster is up ($(hostname -s): $(node_state))"
        exit 0
    fi
    [[ $(id -u) -eq 0 ]] || die "start must run as root (it installs packages and starts daemons)"
    install_packages
    mkdir -p "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    start_munge
    # a half-started cluster (one daemon down, or an old config) is restarted as a whole
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    write_conf
    host=$(hostname -s)
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 || {
        tail -n 20 "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log" >&2 || true
        die "slurmctld did not start"
    }
    slurmd </dev/null >>"$LOG_DIR/slurmd.out" 2>&1 || {
        tail -n 20 "$LOG_DIR/slurmd.out" "$LOG_DIR/slurmd.log" >&2 || true
        die "slurmd did not start"
    }
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case "$state" in
        idle | mixed | allocated | completing)
            log "cluster is up ($host: $state) in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s"
            return 0
            ;;
        down* | drain* | fail*)
            scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $host not idle after ${WAIT_S} s (state: '${state:-no answer}'; logs in $LOG_DIR)"
}

cmd_stop() {
    local ids
    if have squeue && ctld_running && timeout 10 scontrol ping >/dev/null 2>&1; then
        ids=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    log "stopped"
}

cmd_status() {
    if ! have sinfo; then
        echo "slurm-local: slurm is not installed" >&2
        exit 1
    fi
    if ctld_running; then
        timeout 10 sinfo || true
        timeout 10 squeue --states=all || true
    fi
    is_up || {
        echo "slurm-local: cluster is not up" >&2
        exit 1
    }
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
