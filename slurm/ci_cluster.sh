#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for CI.
#
#   slurm/ci_cluster.sh install   # Debian's slurmctld, slurmd, slurm-client, munge (apt; needs root)
#   slurm/ci_cluster.sh start     # munged, slurmctld, and slurmd for virtual nodes n1 and n2
#   slurm/ci_cluster.sh stop      # stops the daemons it started, by their PIDs
#
# Both nodes are this host (NodeAddr 127.0.0.1, distinct slurmd ports; n1/n2 are added to /etc/hosts
# so that a launcher can use a node name as its rendezvous address). Each node offers all CPUs of the
# host and no GPUs. Configuration, state and logs live in $SLURM_CI_DIR (default /tmp/k2think-slurm).
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/k2think-slurm}
CONF=$DIR/slurm.conf

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(( $(free -m | awk '/^Mem:/ {print $2}') / 4 ))  # per virtual node, well below the host's
    mkdir -p "$DIR"/{state,log,spool/n1,spool/n2}
    cat > "$CONF" <<EOF
ClusterName=k2ci
SlurmctldHost=$host
SlurmctldPort=17500
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17601-17602] CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=ci Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    for node in n1 n2; do
        grep -qE "^127\.0\.0\.1[[:space:]].*\b$node\b" /etc/hosts || echo "127.0.0.1 $node" >> /etc/hosts
    done
}

start() {
    install_packages
    write_config
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        su -s /bin/sh munge -c /usr/sbin/munged
        echo "$(pgrep -u munge -x munged | head -n1)" > "$DIR/munged.pid"
    fi
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF" -D > "$DIR/log/slurmctld.out" 2>&1 &
    echo $! > "$DIR/slurmctld.daemon.pid"
    for node in n1 n2; do
        slurmd -f "$CONF" -D -N "$node" > "$DIR/log/slurmd-$node.out" 2>&1 &
        echo $! > "$DIR/slurmd-$node.daemon.pid"
    done
    for _ in $(seq 60); do  # both nodes idle within a few seconds
        if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c idle)" = 2 ]; then
            echo "slurm: nodes n1, n2 idle (SLURM_CONF=$CONF)"
            return
        fi
        sleep 1
    done
    echo "slurm: nodes did not come up; logs in $DIR/log" >&2
    sinfo -N >&2 || true
    exit 1
}

stop() {
    for pidfile in "$DIR"/slurmd-n1.daemon.pid "$DIR"/slurmd-n2.daemon.pid "$DIR"/slurmctld.daemon.pid "$DIR"/munged.pid; do
        if [ -s "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
