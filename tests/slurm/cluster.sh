#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for the `slurm` tests (and for trying
# `hydra/launcher=slurm_gpu` on a laptop). Everything lives in one folder it owns:
#
#   tests/slurm/cluster.sh start [DIR]   install (Debian packages, if missing) and start munged,
#                                        slurmdbd (on its own MariaDB), slurmctld and slurmd; wait
#                                        until `sinfo` shows the node idle
#   tests/slurm/cluster.sh stop  [DIR]   stop every daemon it started, by the PIDs it recorded
#   tests/slurm/cluster.sh env   [DIR]   the variables a shell needs: eval "$(tests/slurm/cluster.sh env)"
#   tests/slurm/cluster.sh optuna-db [DIR]  create (once) a database `optuna` and a user `optuna` with a
#                                        random password (kept in DIR/optuna.password, mode 600) on the
#                                        cluster's MariaDB, and print the Optuna storage URL for it:
#                                        hydra.sweeper.storage=env:OPTUNA_STORAGE after
#                                        export OPTUNA_STORAGE=$(tests/slurm/cluster.sh optuna-db)
#
# DIR defaults to $SD3EXP_SLURM_DIR or /tmp/sd3exp-slurm. Client commands (sbatch, squeue, sacct,
# the submitit launcher) find this cluster through SLURM_CONF=DIR/slurm.conf. Accounting (slurmdbd on
# MariaDB) is there because submitit polls job states with `sacct`: without it a job killed by Slurm
# (time limit, node failure) is never seen as finished. The node has no GPUs; run sweeps on it with
# hydra.launcher.partition=debug hydra.launcher.gpus_per_node=0 (see docs/sweeps.md).
set -euo pipefail

CMD=${1:-}
DIR=$(realpath -m "${2:-${SD3EXP_SLURM_DIR:-/tmp/sd3exp-slurm}}")
NODE=$(hostname -s)
PORT=${SD3EXP_SLURM_PORT:-6917}          # slurmctld; slurmd, slurmdbd and MariaDB use the next ones
CPUS=${SD3EXP_SLURM_CPUS:-$(nproc)}
MARGIN_MB=${SD3EXP_SLURM_MEM_MARGIN_MB:-2048}
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"   # stop order
PACKAGES="slurm-wlm slurm-client munge slurmdbd mariadb-server mariadb-client"

log() { echo "cluster.sh: $*" >&2; }

install_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd sbatch slurmdbd mariadbd; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing $PACKAGES (missing: ${missing[*]})"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends $PACKAGES
}

write_configs() {
  local mem
  mem=$(( $(free -m | awk '/^Mem:/ {print $2}') - MARGIN_MB ))
  mkdir -p "$DIR"/{state,spool,log,mysql}
  [ -f "$DIR/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none; chmod 400 "$DIR/munge.key"; }
  cat > "$DIR/slurm.conf" <<EOF
# written by tests/slurm/cluster.sh: a one-node cluster on localhost
ClusterName=sd3exp
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=30
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$DIR/munge.socket
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=$(id -un)
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=sd3exp
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  log "timed out after ${limit}s waiting for $what (logs: $DIR/log)"; return 1
}

start_mariadb() {
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --datadir="$DIR/mysql" --user="$(id -un)" --auth-root-authentication-method=socket \
      --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1
  fi
  mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$DIR/mysql.sock" --port=$((PORT + 3)) \
    --bind-address=127.0.0.1 --pid-file="$DIR/mariadbd.pid" --user="$(id -un)" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --no-defaults --socket="$DIR/mysql.sock" -e 'SELECT 1'
  mariadb --no-defaults --socket="$DIR/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' \
    IDENTIFIED BY 'sd3exp'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start() {
  local t0=$SECONDS
  install_packages
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    log "already running ($DIR)"; return 0
  fi
  write_configs
  trap 'log "start failed: stopping what it started"; stop' ERR
  export SLURM_CONF="$DIR/slurm.conf"
  munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed" --force
  start_mariadb
  slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 60 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$((PORT + 2))"
  sacctmgr -i add cluster sd3exp >/dev/null 2>&1 || true
  slurmctld -f "$DIR/slurm.conf"
  wait_for 60 slurmctld scontrol ping
  slurmd -f "$DIR/slurm.conf"
  wait_for 90 "node $NODE idle" bash -c "sinfo -h -n $NODE -o %t | grep -qx idle"
  sinfo
  log "one-node cluster up in $((SECONDS - t0)) s: export SLURM_CONF=$DIR/slurm.conf"
}

stop() {
  local name pid
  for name in $DAEMONS; do
    [ -f "$DIR/$name.pid" ] || continue
    pid=$(cat "$DIR/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      log "stopped $name ($pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
}

optuna_db() {  # a database for an Optuna study shared by the sweep and its jobs (docs/sweeps.md)
  local password port
  [ -S "$DIR/mysql.sock" ] || { log "no MariaDB at $DIR/mysql.sock: run $0 start first"; exit 1; }
  if [ ! -s "$DIR/optuna.password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$DIR/optuna.password")
  fi
  password=$(cat "$DIR/optuna.password")
  port=$(sed -n 's/^StoragePort=//p' "$DIR/slurmdbd.conf")   # MariaDB's port, as `start` chose it
  mariadb --no-defaults --socket="$DIR/mysql.sock" -e "CREATE DATABASE IF NOT EXISTS optuna; \
    CREATE USER IF NOT EXISTS 'optuna'@'127.0.0.1' IDENTIFIED BY '$password'; \
    GRANT ALL ON optuna.* TO 'optuna'@'127.0.0.1'; FLUSH PRIVILEGES;"
  echo "mysql+pymysql://optuna:$password@127.0.0.1:$port/optuna"
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
  optuna-db) optuna_db ;;
  *) echo "usage: $0 start|stop|env|optuna-db [DIR]" >&2; exit 2 ;;
esac
