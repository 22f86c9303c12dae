#!/usr/bin/env bash
# A real SLURM cluster (with accounting and fake GPUs) on this machine, for development and tests.
#
#   slurm/dev-cluster.sh start [--profile fast|production] [--gpus N] [--cpus N] [--mem-gb N] [--nodes N] [--dir DIR]
#   eval "$(slurm/dev-cluster.sh env)"      # exports SLURM_CONF for sbatch/sacct/submitit
#   slurm/dev-cluster.sh status             # exit 0 running, 3 stopped, 1 partly running
#   slurm/dev-cluster.sh stop
#   slurm/dev-cluster.sh kill-node node2    # --nodes N only: power a node off (start brings it back)
#
# Debian 12, as root, no systemd needed. Installs its Debian packages when missing, then runs a private
# munged, MariaDB, slurmdbd, slurmctld and slurmd, each with its own pid file. Everything it writes lives
# under one folder (default ${LORA_HPO_SLURM_DIR:-/var/tmp/lora-hpo-slurm}); the clients find the cluster
# through SLURM_CONF, nothing is written to /etc. Accounting is on because submitit reads job states
# from sacct. `start` is idempotent and returns once the node is idle and sacct answers; settings given
# once (--profile, --gpus, --cpus, --mem-gb) are remembered by later starts. `stop` ends only the daemons it
# started (by pid file), after cancelling the jobs still queued.
#
# One node by default, named after this machine. `--nodes N` (N >= 2) runs N slurmd, each in its own network
# namespace with its own address on a private bridge and its own host name (slurm/dev-nodes.sh): jobs that span
# nodes really cross hosts. Run it beside the single-node cluster with its own --dir and port base.
#
# Profiles: `fast` (default) for development: short KillWait and credential expiry, a scheduler pass every
# 2 s. `production`: what sites usually run, and what the project is tested against too: KillWait=30, the
# scheduler's defaults (batch_sched_delay 3 s, sched_interval 60 s), credential expiry 120 s (a requeued job
# is held that long), DefMemPerCPU, a partition MaxTime, memory enforced by accounting (OverMemoryKill), and
# partition-priority preemption: jobs in `urgent` preempt jobs in `gpu` (PreemptMode=REQUEUE) and in
# `scavenger` (PreemptMode=CANCEL).
#
# Environment: LORA_HPO_SLURM_DIR (folder), LORA_HPO_SLURM_PORT_BASE (default 16817: slurmctld, slurmd,
# slurmdbd and MariaDB use BASE..BASE+3), LORA_HPO_SLURM_TIMEOUT_S (readiness wait, default 90).
set -euo pipefail

PROG=$(basename "$0")
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server iproute2)  # iproute2: the two-node mode's namespaces
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop goes backwards
CLUSTER_NAME=lorahpo

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
usage() {
    sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- arguments and layout
parse_args() {
    CMD=${1:-}
    [[ -n $CMD ]] || usage
    shift
    DIR=${LORA_HPO_SLURM_DIR:-/var/tmp/lora-hpo-slurm}
    OPT_GPUS="" OPT_CPUS="" OPT_MEM_GB="" OPT_PROFILE="" OPT_NODES="" KILL_NODE=""
    [[ $CMD == kill-node && $# -gt 0 && $1 != -* ]] && { KILL_NODE=$1; shift; }
    while [[ $# -gt 0 ]]; do
        case $1 in
            --profile) OPT_PROFILE=${2:?--profile needs fast or production}; shift 2 ;;
            --gpus) OPT_GPUS=${2:?--gpus needs a number}; shift 2 ;;
            --cpus) OPT_CPUS=${2:?--cpus needs a number}; shift 2 ;;
            --mem-gb) OPT_MEM_GB=${2:?--mem-gb needs a number}; shift 2 ;;
            --nodes) OPT_NODES=${2:?--nodes needs a number}; shift 2 ;;
            --dir) DIR=${2:?--dir needs a folder}; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown argument '$1' (valid: --profile fast|production, --gpus N, --cpus N, --mem-gb N, --nodes N, --dir DIR)" ;;
        esac
    done
    [[ -z $OPT_PROFILE || $OPT_PROFILE == fast || $OPT_PROFILE == production ]] ||
        die "--profile must be fast or production, got '$OPT_PROFILE'"
    for pair in "--gpus:$OPT_GPUS" "--cpus:$OPT_CPUS" "--mem-gb:$OPT_MEM_GB" "--nodes:$OPT_NODES"; do
        [[ -z ${pair#*:} || ${pair#*:} =~ ^[0-9]+$ ]] || die "${pair%%:*} must be a whole number, got '${pair#*:}'"
    done
    [[ $DIR == /* ]] || DIR="$(pwd)/$DIR"
    ETC=$DIR/etc RUN=$DIR/run LOGS=$DIR/log
    export SLURM_CONF=$ETC/slurm.conf
    MUNGE_SOCKET=$DIR/munge/munged.sock
    MY_CNF=$DIR/mysql/my.cnf
    set_ports "${LORA_HPO_SLURM_PORT_BASE:-16817}"
    TIMEOUT_S=${LORA_HPO_SLURM_TIMEOUT_S:-90}
    NODE=$(hostname -s)
}

set_ports() {
    PORT_BASE=$1
    CTLD_PORT=$PORT_BASE D_PORT=$((PORT_BASE + 1)) DBD_PORT=$((PORT_BASE + 2)) DB_PORT=$((PORT_BASE + 3))
}

pid_file() {
    case $1 in
        munged) echo "$DIR/munge/munged.pid" ;;
        mariadbd) echo "$DIR/mysql/mariadbd.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}

# Alive only if the pid file names a live process of the expected program (guards against pid reuse).
running_pid() {
    local f pid
    f=$(pid_file "$1")
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${1%%-*}" ]] || return 1  # slurmd-node2 runs as slurmd
    echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || return 1
        sleep 0.2
    done
}

fail_with_log() {  # fail_with_log DAEMON LOGFILE MESSAGE
    log "$3"
    [[ -f $2 ]] && { log "last lines of $2:"; tail -n 15 "$2" >&2; }
    die "$1 did not start (logs: $LOGS)"
}

# ---------------------------------------------------------------- installation
policy_blocks() {  # does this policy-rc.d forbid invoke-rc.d from starting services?
    local rc=0
    [[ -x $1 ]] || return 1
    "$1" dummy start >/dev/null 2>&1 || rc=$?
    [[ $rc -eq 101 ]]
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    command -v ip >/dev/null || missing+=(iproute2)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null ||
        die "missing ${missing[*]} and apt-get is not available: install ${PACKAGES[*]} yourself"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    mkdir -p "$LOGS"
    # postinst scripts must start nothing: we run our own private daemons.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if ! policy_blocks "$policy"; then
        [[ -e $policy ]] && cp -p "$policy" "$policy.lora-hpo-saved"
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } \
        >"$LOGS/apt.log" 2>&1 || rc=$?
    if [[ -n $made_policy ]]; then
        rm -f "$policy"
        [[ -e $policy.lora-hpo-saved ]] && mv "$policy.lora-hpo-saved" "$policy"
    fi
    if [[ $rc -ne 0 ]]; then
        tail -n 20 "$LOGS/apt.log" >&2
        die "apt-get failed (exit $rc); full log: $LOGS/apt.log"
    fi
}

# ---------------------------------------------------------------- configuration
load_settings() {
    GPUS=4 CPUS=8 MEM_GB=64 PROFILE=fast NODES=1
    # shellcheck disable=SC1091
    [[ -f $ETC/settings ]] && source "$ETC/settings"
    GPUS=${OPT_GPUS:-$GPUS} CPUS=${OPT_CPUS:-$CPUS} MEM_GB=${OPT_MEM_GB:-$MEM_GB} PROFILE=${OPT_PROFILE:-$PROFILE}
    NODES=${OPT_NODES:-$NODES}
    ((NODES >= 1)) || die "--nodes must be at least 1, got $NODES"
    # a several-node cluster remembers its port base: its namespaces and bridge are named after it
    [[ -z ${LORA_HPO_SLURM_PORT_BASE:-} && -n ${SAVED_PORT_BASE:-} ]] && set_ports "$SAVED_PORT_BASE"
    return 0
    ((CPUS >= 1)) || die "--cpus must be at least 1, got $CPUS"
    ((MEM_GB >= 1)) || die "--mem-gb must be at least 1, got $MEM_GB"
}

write_if_changed() {  # write_if_changed FILE MODE < content; sets CHANGED=1 when the file changed
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$1"
        CHANGED=1
    fi
}

profile_settings() {  # the slurm.conf lines that differ between the profiles
    local nodes="Nodes=ALL"
    if [[ $PROFILE == production ]]; then
        CRED_EXPIRE="" KILL_WAIT=30
        SCHEDULER="# The scheduler's defaults: batch_sched_delay=3, sched_interval=60."
        PREEMPTION="PreemptType=preempt/partition_prio
PreemptMode=REQUEUE"
        ACCT_GATHER="JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill"
        PARTITIONS="PartitionName=gpu $nodes Default=YES MaxTime=1-00:00:00 DefaultTime=60 PriorityTier=1 PreemptMode=REQUEUE State=UP
PartitionName=scavenger $nodes MaxTime=1-00:00:00 DefaultTime=60 PriorityTier=1 PreemptMode=CANCEL State=UP
PartitionName=urgent $nodes MaxTime=04:00:00 DefaultTime=60 PriorityTier=10 PreemptMode=OFF State=UP
PartitionName=debug $nodes MaxTime=01:00:00 DefaultTime=30 PriorityTier=1 PreemptMode=REQUEUE State=UP"
    else
        CRED_EXPIRE=",cred_expire=5" KILL_WAIT=2
        SCHEDULER="# Without batch_sched_delay=0 every job waits about 3 s before it starts; a requeued job becomes eligible
# with no event to wake the scheduler, so it waits for the next pass (sched_interval, default 60 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2"
        PREEMPTION="PreemptType=preempt/none"
        ACCT_GATHER="JobAcctGatherType=jobacct_gather/none"
        PARTITIONS="PartitionName=gpu $nodes Default=YES MaxTime=7-00:00:00 DefaultTime=60 State=UP
PartitionName=debug $nodes MaxTime=7-00:00:00 DefaultTime=60 State=UP"
    fi
}

make_layout() {
    mkdir -p "$ETC" "$RUN" "$LOGS" "$DIR/spool/slurmctld" "$DIR/spool/slurmd" "$DIR/dev" "$DIR/munge" "$DIR/mysql"
    chmod 755 "$DIR" "$DIR/munge" "$DIR/mysql"
    chown munge:munge "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    [[ -s $ETC/db.pass ]] || { (umask 077; head -c 18 /dev/urandom | base64 | tr '+/' 'xy' >"$ETC/db.pass"); }
    local i name
    for name in $(node_names); do
        for ((i = 0; i < GPUS; i++)); do
            # A /dev/null clone: slurmd only needs a device file per GPU to count and hand out.
            [[ -c $(gpu_file "$name" "$i") ]] || mknod -m 666 "$(gpu_file "$name" "$i")" c 1 3 ||
                die "cannot create device file $(gpu_file "$name" "$i") (is $DIR on a 'nodev' mount? use --dir)"
        done
    done
}

gpu_file() {  # gpu_file NODE INDEX: one node keeps the historical names
    if ((NODES > 1)); then echo "$DIR/dev/$1-fakegpu$2"; else echo "$DIR/dev/fakegpu$2"; fi
}

node_conf() {  # the slurm.conf lines that differ between one node and several
    local cpu_line="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$1$2 State=UNKNOWN"
    if ((NODES == 1)); then
        CTLD_ADDR=127.0.0.1 SLURMD_FILE=slurmd SLURMD_TIMEOUT=""
        NODE_LINES="NodeName=$NODE NodeAddr=127.0.0.1 $cpu_line"
        return
    fi
    net_names
    # %n: each slurmd its own spool, pid file and log; a lost node is noticed within SlurmdTimeout (default 300 s)
    CTLD_ADDR=$NET.1 SLURMD_FILE=slurmd-%n SLURMD_TIMEOUT="SlurmdTimeout=20"
    NODE_LINES=$(for name in $(node_names); do
        echo "NodeName=$name NodeAddr=$(addr_of "$name") NodeHostname=$name $cpu_line"
    done)
}

write_configs() {
    CHANGED=""
    local gres_line="" mem_mb=$((MEM_GB * 1024)) i name
    ((GPUS > 0)) && gres_line=" Gres=gpu:$GPUS"
    { printf 'GPUS=%s\nCPUS=%s\nMEM_GB=%s\nPROFILE=%s\n' "$GPUS" "$CPUS" "$MEM_GB" "$PROFILE"
      if ((NODES > 1)); then printf 'NODES=%s\nSAVED_PORT_BASE=%s\n' "$NODES" "$PORT_BASE"; fi; } |
        write_if_changed "$ETC/settings" 644
    profile_settings
    node_conf "$mem_mb" "$gres_line"
    if ((NODES > 1)); then write_hosts; fi
    write_if_changed "$ETC/slurm.conf" 644 <<EOF
# Written by $PROG: $( ((NODES > 1)) && echo "$NODES-node" || echo single-node) development cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back that long before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/$SLURMD_FILE
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/$SLURMD_FILE.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/$SLURMD_FILE.log
# Portable process tracking without cgroups; nothing is confined (the GPUs are fake anyway).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
${SLURMD_TIMEOUT:+$SLURMD_TIMEOUT
}$SCHEDULER
# Advertise more CPUs than the machine has so that several jobs run at once.
SlurmdParameters=config_overrides
# Grace between SIGTERM and SIGKILL (a signalled job of this project saves its checkpoint and exits at once).
KillWait=$KILL_WAIT
$PREEMPTION
InactiveLimit=0
MinJobAge=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# slurmctld takes its munge socket for slurmdbd from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
$ACCT_GATHER
JobCompType=jobcomp/none
$NODE_LINES
$PARTITIONS
EOF
    {
        echo "# Written by $PROG: fake GPUs (device files cloned from /dev/null)."
        echo "AutoDetect=off"
        for name in $(node_names); do
            for ((i = 0; i < GPUS; i++)); do echo "NodeName=$name Name=gpu File=$(gpu_file "$name" "$i")"; done
        done
    } | write_if_changed "$ETC/gres.conf" 644
    write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF
# Written by $PROG.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
    write_if_changed "$MY_CNF" 644 <<EOF
# Written by $PROG: a private MariaDB for slurmdbd only.
[mysqld]
user=mysql
datadir=$DIR/mysql/data
socket=$DIR/mysql/mariadbd.sock
pid-file=$DIR/mysql/mariadbd.pid
log-error=$LOGS/mariadb.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_log_file_size=32M
innodb_lock_wait_timeout=900
max_connections=50
[client]
socket=$DIR/mysql/mariadbd.sock
port=$DB_PORT
EOF
}

# ---------------------------------------------------------------- daemons
start_munged() {
    running_pid munged >/dev/null && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    touch "$LOGS/munged.log" && chown munge:munge "$LOGS/munged.log"
    runuser -u munge -- setsid munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$(pid_file munged)" --log-file="$LOGS/munged.log" --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$LOGS/munged.log" 2>&1 9>&- ||
        fail_with_log munged "$LOGS/munged.log" "munged exited with an error"
    wait_for 10 munge bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" ||
        fail_with_log munged "$LOGS/munged.log" "munge self-test (munge -n | unmunge) failed"
}

db() { mariadb --defaults-file="$MY_CNF" -u root "$@"; }

start_mariadbd() {
    if ! running_pid mariadbd >/dev/null; then
        if [[ ! -d $DIR/mysql/data/mysql ]]; then
            log "initialising MariaDB in $DIR/mysql/data"
            mkdir -p "$DIR/mysql/data" && chown mysql:mysql "$DIR/mysql/data"
            mariadb-install-db --defaults-file="$MY_CNF" --auth-root-authentication-method=socket \
                --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 9>&- ||
                fail_with_log mariadbd "$LOGS/mariadb-install.log" "mariadb-install-db failed"
        fi
        chown mysql:mysql "$DIR/mysql"
        setsid mariadbd --defaults-file="$MY_CNF" </dev/null >>"$LOGS/mariadb.log" 2>&1 9>&- &
        wait_for 60 mariadb mariadb-admin --defaults-file="$MY_CNF" -u root ping ||
            fail_with_log mariadbd "$LOGS/mariadb.log" "MariaDB did not answer within 60 s"
    fi
    local pass
    pass=$(cat "$ETC/db.pass")
    db <<EOF || die "cannot create the slurm database user in MariaDB"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    if ! running_pid slurmdbd >/dev/null; then
        setsid slurmdbd </dev/null >>"$LOGS/slurmdbd.log" 2>&1 9>&- ||
            fail_with_log slurmdbd "$LOGS/slurmdbd.log" "slurmdbd exited with an error"
    fi
    wait_for 30 sacctmgr sacctmgr -n -P list cluster ||
        fail_with_log slurmdbd "$LOGS/slurmdbd.log" "slurmdbd did not answer sacctmgr within 30 s"
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr could not add cluster $CLUSTER_NAME"
    fi
}

start_slurm_daemon() {  # slurmctld or slurmd
    running_pid "$1" >/dev/null && return 0
    setsid "$1" </dev/null >>"$LOGS/$1.log" 2>&1 9>&- || fail_with_log "$1" "$LOGS/$1.log" "$1 exited with an error"
    wait_for 15 "$1" running_pid "$1" || fail_with_log "$1" "$LOGS/$1.log" "$1 is not running"
}

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1; }

slurmds() {  # the slurmd daemons' names (pid files): slurmd, or slurmd-node1 slurmd-node2 ...
    if ((NODES > 1)); then node_names | sed 's/^/slurmd-/'; else echo slurmd; fi
}

wait_until_ready() {
    local t0=$SECONDS state="" resumed="" name ready
    while ((SECONDS - t0 < TIMEOUT_S)); do
        ready=1
        for name in $(node_names); do
            state=$(node_state "$name" || true)
            case $state in
                idle | mixed | allocated | completing) ;;
                drained* | draining* | down*)
                    ready=""
                    # A node drained by an earlier run (for instance after a config change): take it back once.
                    if [[ " $resumed " != *" $name "* ]] && ((SECONDS - t0 > 3)); then
                        scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
                        resumed="$resumed $name"
                    fi ;;
                *) ready="" ;;
            esac
        done
        [[ -n $ready ]] && sacct -n -X -S now >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "node states: $(sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ';')"
    fail_with_log cluster "$LOGS/$(slurmds | tail -n 1).log" \
        "the nodes did not become idle with sacct answering within $TIMEOUT_S s"
}

cmd_start() {
    local name
    [[ $(id -u) -eq 0 ]] || die "must run as root (it starts munged, MariaDB and the SLURM daemons)"
    install_packages
    load_settings
    make_layout
    write_configs
    if [[ -n $CHANGED ]] && { running_pid slurmctld >/dev/null || any_slurmd_running; }; then
        log "configuration changed: restarting slurmctld and slurmd"
        # shellcheck disable=SC2046
        stop_daemons $(slurmds) slurmctld
    fi
    if ((NODES > 1)); then net_up; fi
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurm_daemon slurmctld
    if ((NODES > 1)); then
        for name in $(node_names); do start_node_slurmd "$name"; done
    else
        start_slurm_daemon slurmd
    fi
    wait_until_ready
    log "cluster up ($PROFILE profile): node(s) $(node_names | tr '\n' ' ')with $CPUS CPUs, $GPUS GPUs, ${MEM_GB} GB each, partitions $(sinfo -h -o %P | tr '\n' ' ')"
    echo "export SLURM_CONF=$SLURM_CONF"
}

any_slurmd_running() {
    local d
    for d in $(slurmds); do running_pid "$d" >/dev/null && return 0; done
    return 1
}

stop_daemons() {  # stop_daemons NAME...: SIGTERM them together, wait up to 15 s, then SIGKILL
    local name pid entry alive i entries=()
    for name in "$@"; do
        if pid=$(running_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            entries+=("$name:$pid")
        fi
    done
    for ((i = 0; i <= 150; i++)); do
        alive=()
        for entry in ${entries[@]+"${entries[@]}"}; do
            kill -0 "${entry#*:}" 2>/dev/null && alive+=("$entry")
        done
        [[ ${#alive[@]} -eq 0 ]] && break
        ((i < 150)) && sleep 0.1
    done
    for entry in ${alive[@]+"${alive[@]}"}; do
        log "${entry%%:*} (pid ${entry#*:}) ignored SIGTERM for 15 s: sending SIGKILL"
        kill -KILL "${entry#*:}" 2>/dev/null || true
    done
    for name in "$@"; do rm -f "$(pid_file "$name")"; done
}

cancel_jobs() {  # a stopped dev cluster runs nothing: cancel what is queued and wait for it to leave
    local ids t0=$SECONDS
    running_pid slurmctld >/dev/null || return 0
    ids=$(squeue -h -o %A 2>/dev/null) || return 0
    [[ -n $ids ]] || return 0
    log "cancelling $(wc -w <<<"$ids") queued or running job(s)"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS - t0 < 30)); do sleep 0.5; done
}

kill_orphan_steps() {  # slurmstepd of this cluster left behind by slurmd: they would retry forever
    local d pid
    for d in /proc/[0-9]*; do
        [[ $(cat "$d/comm" 2>/dev/null) == slurmstepd ]] || continue
        tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" || continue
        pid=${d#/proc/}
        log "ending leftover slurmstepd (pid $pid)"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

cmd_stop() {
    load_settings
    cancel_jobs
    # slurmctld keeps accounting messages that slurmdbd did not take in its state folder and sends them at
    # the next start, so the SLURM daemons may stop together; MariaDB and munged go once they are gone.
    # shellcheck disable=SC2046
    stop_daemons $(slurmds) slurmctld slurmdbd
    kill_orphan_steps
    stop_daemons mariadbd munged
    if ((NODES > 1)); then net_down; fi
    log "stopped (state kept in $DIR)"
}

cmd_status() {
    local d pid up=0
    load_settings
    # shellcheck disable=SC2207
    DAEMONS=(munged mariadbd slurmdbd slurmctld $(slurmds))
    for d in "${DAEMONS[@]}"; do
        if pid=$(running_pid "$d"); then
            echo "$d: running (pid $pid)"
            up=$((up + 1))
        else
            echo "$d: stopped"
        fi
    done
    if ((up == ${#DAEMONS[@]})); then
        sinfo -N -o '%N %P %T %c %m %G' 2>&1 || true
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    ((up == 0)) && return 3
    return 1
}

# shellcheck source=slurm/dev-nodes.sh
source "$(dirname "$0")/dev-nodes.sh"

main() {
    parse_args "$@"
    case $CMD in
        start | stop | kill-node)
            mkdir -p "$DIR"
            # fd 9 holds the lock; every daemon is spawned with "9>&-" so that none inherits it.
            exec 9>"$DIR/.lock"
            flock -w 120 9 || die "another $PROG start or stop has held $DIR/.lock for 120 s"
            "cmd_${CMD//-/_}" ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$SLURM_CONF" ;;
        profile) load_settings; echo "$PROFILE" ;;
        *) die "unknown command '$CMD' (valid: start, stop, status, env, profile, kill-node)" ;;
    esac
}

main "$@"
