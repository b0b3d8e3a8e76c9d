#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on localhost, for testing the slurm profile.
#
#   tests/slurm_cluster.sh install  apt-get install slurm-wlm munge unless already there
#   tests/slurm_cluster.sh start    install (apt) if needed, write slurm.conf, start munged,
#                                   slurmctld, slurmd; return once the node is idle
#   tests/slurm_cluster.sh stop     stop the three daemons by their pid files
#   tests/slurm_cluster.sh status   exit 0 if the node answers and is usable
#
# Both start and stop are idempotent. Needs root (it installs packages, starts daemons and
# writes /etc/slurm/slurm.conf, where sbatch/squeue look for it). A slurm.conf this script
# did not write is never overwritten: start refuses instead (exit status 3).
#
# No slurmdbd: AccountingStorageType=accounting_storage/none, so `sacct` does not work and
# the profile polls with `squeue` (MinJobAge=300 keeps finished jobs visible to squeue for
# 5 minutes). Every finished job is appended to $SD2_SLURM_DIR/jobcomp.log (jobcomp/filetxt),
# a record that survives MinJobAge and that the test uses as proof of what Slurm ran.
#
# Environment: SD2_SLURM_DIR (state, logs, pid files; default /var/tmp/sd2-slurm),
#              SD2_SLURM_TIMEOUT (seconds to wait for the node; default 60).
set -euo pipefail

STATE=${SD2_SLURM_DIR:-/var/tmp/sd2-slurm}
TIMEOUT=${SD2_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARK="# written by sd2 tests/slurm_cluster.sh"
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; refusing to touch a real cluster"
        exit 3
    fi
    local host node
    host=$(hostname -s)
    # The node line from the hardware itself: CPUs, sockets, cores, threads, RealMemory.
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C gave no node line: $node"
    mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm
    cat >"$CONF.new" <<EOF
$MARK (on $(date -u +%FT%TZ)); stop it with: tests/slurm_cluster.sh stop
ClusterName=sd2test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups / systemd in a container. proctrack/pgid, not linuxproc: a cancelled jobstep
# Snakemake can hang on SIGTERM after its parent shell died; reparented to init, linuxproc
# no longer finds it (seen once in three runs), while the process group still holds it.
ProctrackType=${SD2_SLURM_PROCTRACK:-proctrack/pgid}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# no slurmdbd: sacct is unavailable, jobs are polled with squeue, which sees a finished job
# for MinJobAge seconds; jobcomp.log keeps a line per finished job for good
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MinJobAge=300
# quick scancel (SIGTERM, then SIGKILL after KillWait seconds) and quick recovery
KillWait=5
ReturnToService=2
MpiDefault=none
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

start_munge() {
    if pid_alive "$MUNGE_PID" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    rm -f "$MUNGE_PID"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" || die "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged does not answer"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

start() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    install_packages
    if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" && [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; then
        log "already running (node $(node_state))"
        return 0
    fi
    write_conf
    start_munge
    pid_alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    pid_alive "$STATE/slurmd.pid" || /usr/sbin/slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"
    local state="" t0=$SECONDS
    while (( SECONDS - t0 < TIMEOUT )); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated) log "node $(hostname -s) is $state after $((SECONDS - t0)) s"; return 0 ;;
            down* | drain* | fail*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node not idle after ${TIMEOUT}s (state: '${state}'); logs in $STATE/log"
}

stop_pidfile() {  # name pidfile
    local pid
    pid_alive "$2" || { rm -f "$2"; return 0; }
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }; sleep 0.1; done
    log "$1 (pid $pid) ignored SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$2"
}

stop() {
    # cancel what is left so that no slurmstepd outlives the cluster
    if pid_alive "$STATE/slurmctld.pid" && [[ -n $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]]; then
        scancel --quiet $(squeue -h -t PD,R,CG,S -o %i) 2>/dev/null || true
        for _ in $(seq 30); do [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile munged "$MUNGE_PID"
    log "stopped"
}

status() {
    local state
    state=$(node_state)
    echo "node: ${state:-unreachable}"
    [[ $state =~ ^(idle|mixed|allocated) ]]
}

case ${1:-} in
    install) [[ $(id -u) == 0 ]] || die "must run as root"; install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
