#!/usr/bin/env bash
# A real single-node Slurm (slurmctld + slurmd + munge, Debian's packages) on this machine, for the
# cluster tests and for trying `diffdis submit slurm` without a cluster. Needs root (CI runs as root).
#   bash scripts/slurm-local.sh install   apt-get the packages (~15 s after apt-get update); idempotent
#   bash scripts/slurm-local.sh start     install if needed, write slurm.conf, start the daemons, wait
#                                         until the node is idle; prints "slurm-local: ready"
#   bash scripts/slurm-local.sh stop      scontrol shutdown, then munged by the PID in its pid file
#   bash scripts/slurm-local.sh status    exit 0 when sinfo answers
# Why these settings: ../shared/notes/slurm-local.md (measured). AuthInfo=cred_expire=10 makes a
# requeued job restart after ~17 s instead of ~120 s; no slurmdbd, so no sacct (status comes from
# squeue / scontrol show job). CPUs defaults to the machine's core count (SLURM_LOCAL_CPUS overrides).
set -euo pipefail
action="${1:-start}"
conf_dir=/etc/slurm
state_file=/run/slurm-local.started   # written by `start`, so `stop` only stops what it started

log() { echo "slurm-local: $*" >&2; }

need_root() {
    [ "$(id -u)" -eq 0 ] || { log "must run as root (installs packages, starts daemons)"; exit 1; }
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus="${SLURM_LOCAL_CPUS:-$(getconf _NPROCESSORS_ONLN)}"  # not nproc: it honours OMP_NUM_THREADS
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB; half, leaves room for the rest
    mkdir -p "$conf_dir"
    if [ -f "$conf_dir/slurm.conf" ] && ! grep -q "written by scripts/slurm-local.sh" "$conf_dir/slurm.conf" \
        && [ -z "${SLURM_LOCAL_FORCE:-}" ]; then
        log "$conf_dir/slurm.conf exists and is not ours (a real Slurm installation?): not overwriting it;"
        log "set SLURM_LOCAL_FORCE=1 to replace it"
        exit 1
    fi
    cat > "$conf_dir/slurm.conf" <<CONF
# written by scripts/slurm-local.sh (diffdis test set-up): one machine, CPU only
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
AuthInfo=cred_expire=10
AccountingStorageType=accounting_storage/none
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
    local i
    for i in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return 0
        fi
        sleep 0.5
    done
    log "the node did not become idle in 30 s; sinfo says: $(sinfo 2>&1 || true)"
    log "logs: /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log"
    return 1
}

start() {
    need_root
    install_packages
    if pid_alive /run/slurmctld.pid && pid_alive /run/slurmd.pid && sinfo >/dev/null 2>&1; then
        wait_idle
        log "already running"; echo "slurm-local: ready"; return 0
    fi
    write_conf
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { log "no /etc/munge/munge.key (the munge package creates it)"; exit 1; }
    pid_alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    # -c: a controller this script starts begins with no jobs. Jobs saved by an earlier controller
    # (a run killed mid-test) would otherwise come back "RUNNING" with their processes long gone,
    # hold the node's CPUs, and leave every new job pending on Resources.
    pid_alive /run/slurmctld.pid || /usr/sbin/slurmctld -c
    pid_alive /run/slurmd.pid || /usr/sbin/slurmd
    touch "$state_file"
    # a node left DOWN by an earlier unclean stop comes back here
    scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
    wait_idle
    echo "slurm-local: ready"
}

wait_gone() {  # wait up to 15 s for the given PIDs to exit (pid files vanish before the processes do)
    local pid
    for _ in $(seq 1 60); do
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
        [ -z "$pid" ] && return 0
        sleep 0.25
    done
    log "still running after 15 s: $*"
}

stop() {
    need_root
    local pids=() pid_file
    for pid_file in /run/slurmctld.pid /run/slurmd.pid; do
        pid_alive "$pid_file" && pids+=("$(cat "$pid_file")")
    done
    if [ "${#pids[@]}" -gt 0 ]; then
        scontrol shutdown >/dev/null 2>&1 || true
        wait_gone "${pids[@]}"
    fi
    if pid_alive /run/munge/munged.pid; then
        pid=$(cat /run/munge/munged.pid)
        kill "$pid" || true
        wait_gone "$pid"
    fi
    rm -f "$state_file"
    log "stopped"
}

case "$action" in
    install) need_root; install_packages ;;
    start) start ;;
    stop) stop ;;
    status) sinfo >/dev/null 2>&1 ;;
    *) log "usage: $0 install|start|stop|status"; exit 2 ;;
esac
