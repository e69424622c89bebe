#!/usr/bin/env bash
# Start a single-node SLURM 22.05 cluster on this host (munged, slurmctld, slurmd).
#
# Used by `.ci/run` and `make slurm-up` so that the SLURM backend and tests/test_slurm_cluster.py
# run against a real scheduler. Idempotent: running it again leaves a healthy cluster alone,
# rewrites the config and restarts the daemons only when the config changed, and brings a node
# that is down or drained back. There is no accounting database (no slurmdbd), so the final state
# and exit code of a job are read from `scontrol show job`; MinJobAge keeps finished jobs there
# for an hour.
#
# Needs root and the Debian packages slurm-wlm and munge. Environment knobs:
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_PARTITION    partition name (default debug)
#   SLURM_CLUSTER_NAME cluster name (default workflow)
set -euo pipefail

TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
PARTITION="${SLURM_PARTITION:-debug}"
CLUSTER="${SLURM_CLUSTER_NAME:-workflow}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_RUN=/run/munge
MUNGE_KEY=/etc/munge/munge.key

say() { printf '[slurm-up] %s\n' "$*"; }
die() {
    printf '[slurm-up] ERROR: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it writes $CONF and starts system daemons)"
for bin in munged slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin not found: apt-get install -y slurm-wlm munge"
done
id munge >/dev/null 2>&1 || die "user munge missing (is the munge package installed?)"
id slurm >/dev/null 2>&1 || die "user slurm missing (is the slurm-wlm package installed?)"

# A pid file names a live process of the expected program.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -d "/proc/$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

stop_pidfile() {
    local pidfile=$1 name=$2 pid i
    pid_alive "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

# --- munge ---------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
if [ ! -s "$MUNGE_KEY" ]; then
    say "creating $MUNGE_KEY"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

if pid_alive "$MUNGE_RUN/munged.pid" munged && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    stop_pidfile "$MUNGE_RUN/munged.pid" munged
    rm -f "$MUNGE_RUN/munge.socket.2" "$MUNGE_RUN/munge.socket.2.lock" "$MUNGE_RUN/munged.pid"
    say "starting munged as user munge"
    runuser -u munge -- /usr/sbin/munged --force
    for i in $(seq 1 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf ----------------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
TOTAL_MB=$(free -m | awk '/^Mem:/ {print $2}')
# Leave 5% (at least 256 MB) so slurmd never reports less than configured and drains the node.
MARGIN=$((TOTAL_MB / 20))
[ "$MARGIN" -ge 256 ] || MARGIN=256
REAL_MB=$((TOTAL_MB - MARGIN))
[ "$REAL_MB" -ge 256 ] || REAL_MB=256

install -d -m 0755 "$CONF_DIR"
install -d -o slurm -g slurm -m 0755 /var/lib/slurm "$STATE_DIR" "$LOG_DIR" "$RUN_DIR"
install -d -o root -g root -m 0755 "$SPOOL_DIR"

NEW_CONF=$(mktemp)
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# Written by scripts/slurm-up.sh: a single-node cluster for tests and the laptop demo.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works in containers and sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No accounting database: final state and exit code come from scontrol, kept for MinJobAge.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

CHANGED=0
if [ ! -f "$CONF" ] || ! cmp -s "$NEW_CONF" "$CONF"; then
    say "writing $CONF (node $HOST, $CPUS CPUs, ${REAL_MB} MB, partition $PARTITION)"
    install -m 0644 "$NEW_CONF" "$CONF"
    CHANGED=1
fi

# --- daemons -------------------------------------------------------------------------------------
if [ "$CHANGED" -eq 1 ]; then
    stop_pidfile "$RUN_DIR/slurmd.pid" slurmd
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
fi

if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    say "slurmctld already running"
else
    say "starting slurmctld"
    slurmctld
fi
ctld_up=0
for i in $(seq 1 "$((TIMEOUT * 2))"); do
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then
        ctld_up=1
        break
    fi
    sleep 0.5
done
if [ "$ctld_up" -ne 1 ]; then
    scontrol ping || true
    tail -n 40 "$LOG_DIR/slurmctld.log" >&2 || true
    die "slurmctld did not answer within ${TIMEOUT}s"
fi

if pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    say "slurmd already running"
else
    say "starting slurmd"
    slurmd
fi

# --- wait for the node ---------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=0
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in
    idle | mixed | allocated | completing)
        say "node $HOST is $state; partition $PARTITION ready"
        sinfo
        exit 0
        ;;
    down* | drain* | drained*)
        # A node left down by an earlier run (or a changed config) comes back once.
        if [ "$resumed" -eq 0 ]; then
            say "node $HOST is $state; resuming it"
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        ;;
    esac
    sleep 1
done

{
    echo "[slurm-up] node $HOST did not become idle within ${TIMEOUT}s (last state: '${state:-none}')"
    echo "--- sinfo"
    sinfo -N -l 2>&1 || true
    echo "--- scontrol show node"
    scontrol show node "$HOST" 2>&1 || true
    echo "--- slurmctld.log"
    tail -n 40 "$LOG_DIR/slurmctld.log" 2>&1 || true
    echo "--- slurmd.log"
    tail -n 40 "$LOG_DIR/slurmd.log" 2>&1 || true
} >&2
exit 1
