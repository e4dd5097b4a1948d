#!/usr/bin/env bash
# Set up and start a single-node Slurm "cluster" on this machine (for `make test-slurm`).
#
#   scripts/setup_local_slurm.sh
#
# Installs Debian's `slurm-wlm` and `munge` if missing, writes a munge key and a minimal
# /etc/slurm/slurm.conf for this host (NodeName = `hostname -s`, CPUs = 2 (or fewer if the machine has
# fewer), RealMemory from /proc/meminfo, select/cons_tres, proctrack/linuxproc, task/none, no
# accounting), starts munged, slurmctld and slurmd directly (no systemd) and waits until `sinfo`
# shows the node idle.
#
# Exit codes: 0 = Slurm is up (already running counts); 77 = this machine cannot install or start
# Slurm (not root, no apt-get, a daemon does not come up...): the message on stderr says why.
# Idempotent: run it again and it only (re)starts what is not running.
#
# Not for a real cluster: it runs every daemon as root and disables accounting. On a real cluster use
# its own Slurm and only `snakemake --profile profiles/slurm` (see README "Run on a Slurm cluster").
set -uo pipefail

SKIP=77
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
SPOOL=/var/lib/slurm
MARK="# written by layer1-engine scripts/setup_local_slurm.sh"
WAIT_S=${SLURM_SETUP_WAIT_S:-60}

say() { echo "setup_local_slurm: $*" >&2; }
skip() { say "SKIP: $*"; exit "$SKIP"; }

node_state() {  # state of our node as sinfo sees it ("" if sinfo does not answer)
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#$@+ '
}

NODE=$(hostname -s 2>/dev/null || hostname)
[ -n "$NODE" ] || skip "cannot determine the short host name (hostname -s)"

# ---------------------------------------------------------------- already up?
if command -v sinfo >/dev/null 2>&1; then
    st=$(node_state)
    if [ "$st" = "idle" ] || [ "$st" = "mixed" ] || [ "$st" = "allocated" ]; then
        say "Slurm already up: node $NODE is $st"
        exit 0
    fi
fi

[ "$(id -u)" = "0" ] || skip "needs root to install and start Slurm (running as $(id -un))"

# ---------------------------------------------------------------- install
need_install=0
for b in munged slurmctld slurmd sbatch sinfo squeue; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # package scripts may try to start services; there is no init system to talk to, so tell
    # invoke-rc.d not to (exit 101 = action forbidden) for the duration of the install only
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    apt-get update -qq >/dev/null 2>&1 || say "warning: apt-get update failed; trying the install anyway"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/tmp/setup_local_slurm.apt.log 2>&1
    rc=$?
    [ "$made_policy" = 1 ] && rm -f "$policy"
    if [ "$rc" != 0 ]; then
        tail -n 20 /tmp/setup_local_slurm.apt.log >&2
        skip "apt-get install slurm-wlm munge failed (exit $rc; log /tmp/setup_local_slurm.apt.log)"
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
for b in munged slurmctld slurmd sbatch sinfo; do
    command -v "$b" >/dev/null 2>&1 || skip "$b not found after installing slurm-wlm and munge"
done
SLURM_VERSION=$(slurmd -V 2>/dev/null | awk '{print $2}')
say "Slurm ${SLURM_VERSION:-?} on node $NODE"

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
chown -R "$MUNGE_USER:$MUNGE_USER" /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged (as $MUNGE_USER)"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    if [ "$MUNGE_USER" = root ]; then
        munged --force >/tmp/setup_local_slurm.munged.log 2>&1
    else
        runuser -u munge -- munged >/tmp/setup_local_slurm.munged.log 2>&1 \
            || su -s /bin/sh munge -c munged >>/tmp/setup_local_slurm.munged.log 2>&1
    fi
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 \
        || { cat /tmp/setup_local_slurm.munged.log >&2; skip "munged did not start (munge -n | unmunge fails)"; }
fi

# ---------------------------------------------------------------- slurm.conf
NCPU=$(nproc 2>/dev/null || echo 1)
CPUS=2
[ "$NCPU" -lt 2 ] && CPUS=$NCPU
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
[ -n "$MEM_KB" ] || skip "cannot read MemTotal from /proc/meminfo"
# slurmd drains a node that reports less memory than configured: stay a little below MemTotal
REAL_MB=$(( MEM_KB / 1024 * 95 / 100 ))

mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd"
NEW_CONF=$(cat <<EOF
$MARK
# Single-node Slurm for local tests: every daemon runs as root, no accounting, no cgroups.
ClusterName=layer1local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Keep finished jobs visible to squeue for 10 minutes: without accounting, squeue is the only way
# the Snakemake executor can see that a job has COMPLETED (--slurm-status-command squeue).
MinJobAge=600
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    skip "$CONF exists and was not written by this script; not touching a configured Slurm"
fi
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    say "writing $CONF (CPUs=$CPUS RealMemory=$REAL_MB)"
    printf '%s\n' "$NEW_CONF" >"$CONF"
fi
# Slurm 22.05 does not know CgroupPlugin=disabled (added in 23.x) and slurmd refuses to start
# with it; with proctrack/linuxproc + task/none no cgroup.conf is needed at all.
if [ -f "$CONF_DIR/cgroup.conf" ] && grep -qi '^ *CgroupPlugin *= *disabled' "$CONF_DIR/cgroup.conf"; then
    case "$SLURM_VERSION" in
        2[0-2].*) say "removing $CONF_DIR/cgroup.conf (CgroupPlugin=disabled is unknown to Slurm $SLURM_VERSION)"
                  rm -f "$CONF_DIR/cgroup.conf" ;;
    esac
fi

# ---------------------------------------------------------------- daemons
running() {  # running PIDFILE NAME: the pid in the file is alive and is that daemon (pids get reused)
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "^$2" "/proc/$pid/comm" 2>/dev/null
}

if ! running /run/slurmctld.pid slurmctld; then
    say "starting slurmctld"
    # -c: start from a clean state (no jobs left over from an earlier boot of this test cluster)
    slurmctld -c -i >/tmp/setup_local_slurm.slurmctld.log 2>&1 \
        || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null; skip "slurmctld did not start"; }
fi
for _ in $(seq 1 30); do
    timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' && break
    sleep 0.5
done
timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' \
    || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null; skip "slurmctld does not answer scontrol ping"; }

if ! running /run/slurmd.pid slurmd; then
    say "starting slurmd"
    slurmd -N "$NODE" >/tmp/setup_local_slurm.slurmd.log 2>&1 \
        || { tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null; skip "slurmd did not start"; }
fi

# ---------------------------------------------------------------- wait for the node
say "waiting up to ${WAIT_S}s for node $NODE to be idle"
resumed=0
for _ in $(seq 1 $(( WAIT_S * 2 ))); do
    st=$(node_state)
    case "$st" in
        idle|mixed|allocated)
            say "Slurm is up: node $NODE is $st"
            sinfo >&2
            exit 0 ;;
        down|drained|draining|drain|fail)
            if [ "$resumed" = 0 ]; then
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    sleep 0.5
done
sinfo -N -l >&2 2>/dev/null
tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null
skip "node $NODE did not become idle within ${WAIT_S}s (state: ${st:-no answer from sinfo})"
