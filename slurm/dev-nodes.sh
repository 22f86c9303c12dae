# Sourced by slurm/dev-cluster.sh: the several-node mode (`start --nodes N`), one slurmd per "host".
#
# Each node is a network namespace with its own address on a private bridge, its own host name (a UTS namespace)
# and its own /etc/hosts (a private mount namespace bind-mounts $ETC/hosts over it, so the node names resolve
# there and nothing is written to the machine's /etc): node K is `nodeK` at $NET.(10+K), the bridge (and with it
# slurmctld, which listens on every address of the root namespace) is $NET.1. munged, MariaDB, slurmdbd and
# slurmctld stay in the root namespace and are shared; munge's socket is a file, reachable from every namespace.
# A job's ranks on two nodes can only talk over the bridge: what a two-host cluster gives, on one machine.
#
# Names carry the controller's port so that two clusters never share them: bridge lh<port>br, namespaces
# lh<port>-nodeK, host-side veth ends lh<port>vK. Addresses: LORA_HPO_SLURM_NET (default 10.201.0, a /24 that
# must be private and unused here). `kill-node nodeK` powers a node off (SIGKILL to every process in its
# namespace: its slurmd, job steps and tasks); `start` brings it back. `stop` removes namespaces and bridge.

node_names() {  # the NodeName of every node of this cluster
    if ((NODES > 1)); then seq -f 'node%g' 1 "$NODES"; else echo "$NODE"; fi
}

net_names() {
    NET=${LORA_HPO_SLURM_NET:-10.201.0}
    [[ $NET =~ ^(10\.[0-9]+\.[0-9]+|192\.168\.[0-9]+|172\.(1[6-9]|2[0-9]|3[01])\.[0-9]+)$ ]] ||
        die "LORA_HPO_SLURM_NET=$NET must be the first three numbers of a private /24 (10.x.y, 172.16-31.x, 192.168.x)"
    NET_PREFIX=lh$CTLD_PORT BRIDGE=lh${CTLD_PORT}br
}

netns_of() { echo "$NET_PREFIX-$1"; }   # the namespace of node NAME
addr_of() { echo "$NET.$((10 + ${1#node}))"; }

write_hosts() {
    {
        echo "# Written by $PROG: the names of the dev cluster's nodes, seen from inside them."
        echo "127.0.0.1 localhost"
        echo "$NET.1 $NODE"
        local name
        for name in $(node_names); do echo "$(addr_of "$name") $name"; done
    } | write_if_changed "$ETC/hosts" 644
}

net_up() {  # idempotent: the bridge, and one namespace + veth pair per node
    net_names
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        if ip -o -4 addr show | grep -q " $NET\.[0-9]*/"; then
            die "$NET.0/24 is already in use on this machine: choose another with LORA_HPO_SLURM_NET"
        fi
        ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (needs CAP_NET_ADMIN)"
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local name ns veth
    for name in $(node_names); do
        ns=$(netns_of "$name") veth=${NET_PREFIX}v${name#node}
        ip netns list | grep -qw "^$ns" || ip netns add "$ns" || die "cannot create network namespace $ns"
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip netns exec "$ns" ip addr add "$(addr_of "$name")/24" dev eth0
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set eth0 up
    done
}

kill_in_netns() {  # SIGKILL every process in node NAME's namespace (all of them were started by its slurmd)
    local ns pids
    ns=$(netns_of "$1")
    ip netns list | grep -qw "^$ns" || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

net_down() {
    net_names
    local name ns
    for name in $(node_names); do
        kill_in_netns "$name"
        ip link del "${NET_PREFIX}v${name#node}" 2>/dev/null || true
        ns=$(netns_of "$name")
        ip netns list | grep -qw "^$ns" && ip netns del "$ns"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do  # the kernel removes the links of a deleted namespace asynchronously
        ip -o link show | grep -q " ${NET_PREFIX}" || return 0
        sleep 0.1
    done
    log "warning: links named ${NET_PREFIX}* are still there after 5 s"
}

start_node_slurmd() {  # start node NAME's slurmd inside its namespaces (unless it runs)
    local name=$1 ns
    running_pid "slurmd-$name" >/dev/null && return 0
    ns=$(netns_of "$name")
    mkdir -p "$DIR/spool/slurmd-$name"
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup tree slurmd reads
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private /bin/sh -c \
        'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1"' sh "$name" "$ETC/hosts" \
        </dev/null >>"$LOGS/slurmd-$name.log" 2>&1 9>&- ||
        fail_with_log "slurmd-$name" "$LOGS/slurmd-$name.log" "slurmd of $name exited with an error"
    wait_for 15 "slurmd-$name" running_pid "slurmd-$name" ||
        fail_with_log "slurmd-$name" "$LOGS/slurmd-$name.log" "slurmd of $name is not running"
}

cmd_kill_node() {  # kill-node NAME: the node loses power
    load_settings
    ((NODES > 1)) || die "kill-node needs a cluster started with --nodes N (this one has one node)"
    [[ -n ${KILL_NODE:-} ]] && node_names | grep -qx "$KILL_NODE" ||
        die "kill-node needs a node name: one of $(node_names | tr '\n' ' ')"
    net_names
    kill_in_netns "$KILL_NODE"
    rm -f "$(pid_file "slurmd-$KILL_NODE")"
    log "$KILL_NODE powered off (every process in $(netns_of "$KILL_NODE") killed); 'start' brings it back"
}
