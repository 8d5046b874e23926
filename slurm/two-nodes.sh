# Two more Slurm nodes, n1 and n2, on this one machine. Sourced by slurm/env.sh, which
# calls pair_hosts, pair_network, pair_stop_stale and pair_start at the right moments; it
# uses say, slurmd_pids and LOGDIR from there.
#
# Each node is a network namespace (harness-n1, harness-n2) with its own address, plus a UTS
# namespace with its own hostname, running its own `slurmd -N nX`. Partition `pair` holds
# both, so a job can span 2 nodes, and its tasks really talk over a network: localhost on
# n1 is not n2, and a port opened on n1 is not open on n2. The filesystem is shared.
#
#   host:        harness-host  10.77.0.1/24    slurmctld (listens on 0.0.0.0) and srun reach
#                                              the nodes through it
#   harness-n1:  eth0          10.77.0.11/24   hostname n1, slurmd -N n1
#   harness-n2:  eth0          10.77.0.12/24   hostname n2, slurmd -N n2
#
# The three interfaces are macvlans (mode bridge) on one veth pair (harness-trunk and
# harness-trunk-p). Why not a Linux bridge with veth pairs: once Docker is installed (make
# docker-env) the FORWARD policy is DROP and bridge-nf-call-iptables=1, so frames that the
# bridge forwards between n1 and n2 go through iptables and are dropped (measured: host<->n1
# worked, n1<->n2 timed out). Traffic between macvlans of one lower device never reaches
# netfilter's bridge hooks. The veth pair is only there as that lower device: a macvlan needs
# one that is up and has carrier, and this kernel has no `dummy` module.
#
# Names: n1/n2 resolve to their addresses everywhere (host /etc/hosts and the namespaces'
# own hosts file). torch's gloo picks its address by resolving gethostname(), so each slurmd
# (and every task it starts) runs with hostname n1 or n2. slurmctld is named `harness-ctld`
# in slurm.conf (SlurmctldHost=localhost(harness-ctld)): 127.0.0.1 on the host, 10.77.0.1
# inside the namespaces, where /etc/netns/harness-nX/hosts is bind-mounted over /etc/hosts
# (as `ip netns exec` does; slurmd and its jobs inherit that mount namespace).

PAIR_NODES=(n1 n2)
declare -A PAIR_ADDR=([n1]=10.77.0.11 [n2]=10.77.0.12)
PAIR_HOST_ADDR=10.77.0.1
PAIR_PREFIX=24
PAIR_MARK="# harness slurm (slurm/two-nodes.sh)"

# Write FILE only when its content differs, in place (same inode): /etc/hosts may be a bind
# mount (containers), and the namespaces' bind mounts of /etc/netns/*/hosts keep pointing to
# the old inode if the file is replaced by a rename.
write_if_changed() {  # FILE CONTENT
    [[ -f $1 && "$(cat "$1")" == "$2" ]] && return 0
    say "writing $1"
    printf '%s\n' "$2" >"$1"
}

# /etc/hosts of the host (our lines end with PAIR_MARK; other lines are kept) and of the
# namespaces. Needed before slurmctld starts: every Slurm command resolves harness-ctld.
pair_hosts() {
    local node ours="127.0.0.1 harness-ctld $PAIR_MARK" ns_hosts
    for node in "${PAIR_NODES[@]}"; do ours+=$'\n'"${PAIR_ADDR[$node]} $node $PAIR_MARK"; done
    write_if_changed /etc/hosts "$(grep -vF "$PAIR_MARK" /etc/hosts || true)"$'\n'"$ours"
    ns_hosts="# /etc/hosts inside the harness-n* network namespaces (written by slurm/two-nodes.sh)
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
$PAIR_HOST_ADDR harness-ctld"
    for node in "${PAIR_NODES[@]}"; do ns_hosts+=$'\n'"${PAIR_ADDR[$node]} $node"; done
    for node in "${PAIR_NODES[@]}"; do
        mkdir -p "/etc/netns/harness-$node"
        write_if_changed "/etc/netns/harness-$node/hosts" "$ns_hosts"
    done
}

# True when every interface and address is in place (a few ms).
pair_network_ok() {
    local node
    ip -br addr show dev harness-host 2>/dev/null \
        | awk -v a="$PAIR_HOST_ADDR/$PAIR_PREFIX" '$2 == "UP" && $3 == a {ok=1} END {exit !ok}' \
        || return 1
    for node in "${PAIR_NODES[@]}"; do
        ip -n "harness-$node" -br addr show 2>/dev/null | awk -v a="${PAIR_ADDR[$node]}/$PAIR_PREFIX" '
            $1 == "lo" && $3 == "127.0.0.1/8" {lo=1}
            $1 ~ /^eth0@/ && $2 == "UP" && $3 == a {eth=1}
            END {exit !(lo && eth)}' || return 1
    done
}

pair_network_down() {  # remove whatever is left of ours; deleting the trunk removes its macvlans
    local node
    for node in "${PAIR_NODES[@]}"; do ip netns del "harness-$node" 2>/dev/null || true; done
    ip link del harness-trunk 2>/dev/null || true
    ip link del harness-host 2>/dev/null || true
}

# Build the network from scratch unless it is complete. Returns non-zero (with the failing
# command's message on stderr) where namespaces or macvlans are not allowed, e.g. in a
# container without CAP_NET_ADMIN.
pair_network() {
    local node
    pair_network_ok && return 0
    say "creating network namespaces ${PAIR_NODES[*]/#/harness-} ..."
    command -v ip >/dev/null || { echo "ip not found (package iproute2)" >&2; return 1; }
    pair_network_down
    ip link add harness-trunk type veth peer name harness-trunk-p || return 1
    ip link set harness-trunk up && ip link set harness-trunk-p up || return 1
    ip link add harness-host link harness-trunk type macvlan mode bridge || return 1
    ip addr add "$PAIR_HOST_ADDR/$PAIR_PREFIX" dev harness-host && ip link set harness-host up \
        || return 1
    for node in "${PAIR_NODES[@]}"; do
        ip netns add "harness-$node" || return 1
        ip link add "harness-$node" link harness-trunk type macvlan mode bridge || return 1
        ip link set "harness-$node" netns "harness-$node" name eth0 || return 1
        ip -n "harness-$node" link set lo up || return 1
        ip -n "harness-$node" addr add "${PAIR_ADDR[$node]}/$PAIR_PREFIX" dev eth0 || return 1
        ip -n "harness-$node" link set eth0 up || return 1
    done
    pair_network_ok || { echo "network incomplete after setup" >&2; return 1; }
    say "creating network namespaces ... ok"
}

# Stop any slurmd of n1/n2 that is not in its namespace, e.g. one left in a namespace that
# lost its name when the network was rebuilt (its interfaces are gone with the trunk).
pair_stop_stale() {
    local node pid i
    for node in "${PAIR_NODES[@]}"; do
        for pid in $(slurmd_pids "$node"); do
            [[ "$(ip netns identify "$pid" 2>/dev/null)" == "harness-$node" ]] && continue
            say "slurmd -N $node (pid $pid) is not in namespace harness-$node, stopping it"
            kill "$pid" 2>/dev/null || true
            for i in $(seq 50); do [[ -z $(slurmd_pids "$node") ]] && break; sleep 0.2; done
            [[ -z $(slurmd_pids "$node") ]] || kill -9 "$pid" 2>/dev/null || true
        done
    done
}

# One slurmd per node, inside its namespace, unless it runs already.
pair_start() {
    local node
    for node in "${PAIR_NODES[@]}"; do
        [[ -z $(slurmd_pids "$node") ]] || continue
        say "starting slurmd -N $node in namespace harness-$node ..."
        # Not `ip netns exec`: it mounts a fresh /sys without /sys/fs/cgroup, and slurmd then
        # fails ("No filesystem mounted on /sys/fs/cgroup"). Instead: enter the network
        # namespace, and make a mount namespace only to bind the namespace's hosts file, and a
        # UTS namespace for the hostname (so that gethostname() in jobs says n1/n2).
        nsenter --net="/run/netns/harness-$node" \
            unshare --mount --propagation slave --uts \
            sh -c 'mount --bind "/etc/netns/harness-$1/hosts" /etc/hosts &&
                   hostname "$1" && exec slurmd -N "$1"' sh "$node" \
            </dev/null >>"$LOGDIR/slurmd-$node.out" 2>&1 || return 1
        say "starting slurmd -N $node in namespace harness-$node ... ok"
    done
}
