#!/usr/bin/env bash
# Start a throwaway local SLURM cluster with N "nodes" on ONE Debian 12 host (no systemd),
# for tests that submit real sbatch jobs. Loopback only.
#
# Debian's slurmd is built with MULTIPLE_SLURMD=Yes: every node is its own slurmd
# (slurmd -N nX) on its own port 1700X with NodeAddr 127.0.10.X. All nodes share the
# host's hostname; SLURMD_NODENAME / SLURM_NODEID / SLURM_JOB_NODELIST tell them apart.
# /etc/slurm/slurm.conf -> $BASE/etc/slurm.conf, so plain sbatch/srun/squeue/scontrol work.
# "nX" names are added to /etc/hosts so that
#   scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1
# resolves to a loopback address, as multi-node torch launchers need.
#
# Env: SLURM_LOCAL_DIR (default /tmp/local-slurm), SLURM_LOCAL_NODES (default 2),
#      SLURM_LOCAL_CPUS (default nproc), SLURM_LOCAL_KEEP_STATE=1 (keep job state)
# Stop with stop.sh (kills the daemons by pid file).
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/local-slurm}
NNODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
CONF=$BASE/etc/slurm.conf
T0=$(date +%s.%N)

log() { echo "[local-slurm] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- install (idempotent)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm + munge via apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
      slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi
log "$(slurmctld -V), $(munged -V 2>&1 | head -1), nodes=$NNODES"

mkdir -p "$BASE"/{etc,run,log,state/ctld,munge}

# already running? (all pid files alive -> nothing to do)
all_alive=1
alive "$BASE/run/slurmctld.pid" || all_alive=0
for i in $(seq 1 "$NNODES"); do alive "$BASE/run/slurmd-n$i.pid" || all_alive=0; done
if [ "$all_alive" = 1 ] && sinfo >/dev/null 2>&1; then
  log "already running"; sinfo; exit 0
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
chown munge:munge "$BASE/munge"; chmod 700 "$BASE/munge"
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged \
      --pid-file="$BASE/munge/munged.pid" \
      --log-file="$BASE/munge/munged.log" \
      --seed-file="$BASE/munge/munged.seed"
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
  cp "$BASE/munge/munged.pid" "$BASE/run/munged.pid"
fi

# ---------------------------------------------------------------- /etc/hosts (loopback names)
# rewrite in place (cat >, not sed -i: /etc/hosts may be a bind mount)
hosts_new=$(grep -v '# local-slurm$' /etc/hosts || true)
for i in $(seq 1 "$NNODES"); do hosts_new+=$'\n'"127.0.10.$i n$i # local-slurm"; done
printf '%s\n' "$hosts_new" >/etc/hosts

# ---------------------------------------------------------------- config
MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
NODE_MEM=$(( MEM_MB * 8 / 10 / NNODES ))
NODE_NAMES=$(seq -s, -f 'n%g' 1 "$NNODES")
{
cat <<CONF
ClusterName=localci
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime: a requeued job is eligible again ~11 s later (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule every 2 s (defaults: 60 s main, 30 s backfill): a requeued job restarts as soon
# as it is eligible again instead of waiting for the next pass (tests wait less)
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# no accounting, so no sacct: one line per finished job goes here instead
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.log
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
CONF
for i in $(seq 1 "$NNODES"); do
  echo "NodeName=n$i NodeHostname=$(hostname) NodeAddr=127.0.10.$i Port=$((17000 + i)) CPUs=$CPUS RealMemory=$NODE_MEM State=UNKNOWN"
  mkdir -p "$BASE/state/slurmd-n$i"
done
echo "PartitionName=debug Nodes=$NODE_NAMES Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=15"
echo "PartitionName=high Nodes=$NODE_NAMES Default=NO MaxTime=INFINITE State=UP PriorityTier=10"
} >"$CONF"

mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
  mv /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.orig-$(date +%s)"
fi
ln -sfn "$CONF" /etc/slurm/slurm.conf

# ---------------------------------------------------------------- daemons
if [ "${SLURM_LOCAL_KEEP_STATE:-0}" != 1 ]; then
  rm -rf "$BASE/state/ctld"/* ; rm -f "$BASE"/log/*.log
fi
if ! alive "$BASE/run/slurmctld.pid"; then
  nohup slurmctld -D -f "$CONF" >"$BASE/log/slurmctld.out" 2>&1 &
  echo $! >"$BASE/run/slurmctld.pid"
fi
for i in $(seq 1 "$NNODES"); do
  alive "$BASE/run/slurmd-n$i.pid" && continue
  nohup slurmd -D -N "n$i" -f "$CONF" >"$BASE/log/slurmd-n$i.out" 2>&1 &
  echo $! >"$BASE/run/slurmd-n$i.pid"
done

# ---------------------------------------------------------------- wait for idle
ok=0
for _ in $(seq 1 120); do
  if [ "$(sinfo -h -p debug -t idle -o '%D' 2>/dev/null)" = "$NNODES" ]; then ok=1; break; fi
  sleep 0.5
done
if [ "$ok" != 1 ]; then
  log "cluster did not become idle within 60 s"; sinfo -N -l || true
  tail -n 20 "$BASE"/log/*.log "$BASE"/log/*.out || true
  exit 1
fi
sinfo
log "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "ready in %.1f s", b-a}')"
