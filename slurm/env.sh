#!/usr/bin/env bash
# Bring up a small Slurm cluster (munged, slurmctld, slurmd) on this machine: node localhost
# in partition debug (the default), and nodes n1 and n2, each in its own network namespace,
# in partition pair (for jobs that span 2 nodes; see slurm/two-nodes.sh). A failure of the
# two-node part is only a warning: partition debug works without it.
# Idempotent: on a machine where everything already runs it changes nothing (~1 s).
# Needs root; no systemd (daemons are started directly and detach themselves).
set -euo pipefail
export PATH="/usr/sbin:/sbin:$PATH"  # daemons live in /usr/sbin, not on every PATH
trap 'echo "slurm-env: ERROR: command failed at line $LINENO" >&2' ERR

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
TIMEOUT="${SLURM_ENV_TIMEOUT:-60}"

say() { echo "slurm-env: $*"; }
warn() { echo "slurm-env: WARNING: $*" >&2; }
die() { echo "slurm-env: ERROR: $*" >&2; exit 1; }
# Process ids of a daemon, zombies excluded: a killed daemon can stay <defunct> for a
# while here because PID 1 (not an init) reaps late, and pgrep would still match it.
pids_of() { { ps -C "$1" -o pid=,stat= || true; } | awk '$2 !~ /^Z/ {print $1}'; }
running() { [[ -n $(pids_of "$1") ]]; }
# Process ids of the slurmd started as `slurmd -N NODE` (three slurmd run here).
slurmd_pids() {
    { ps -C slurmd -o pid=,stat=,args= || true; } \
        | awk -v n="$1" '$2 !~ /^Z/ && $(NF-1) == "-N" && $NF == n {print $1}'
}
logs() {  # tail of the daemon logs, for error messages
    local f
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR"/slurmd-*.log "$LOGDIR/slurmctld.out" \
             "$LOGDIR"/slurmd-*.out /var/log/munge/munged.log; do
        [[ -s $f ]] && { echo "--- tail $f"; tail -n 8 "$f"; }
    done >&2
    return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
# shellcheck source=slurm/two-nodes.sh
source "$HERE/two-nodes.sh"

# 1. Packages -----------------------------------------------------------------------
missing=0
for cmd in sbatch slurmctld slurmd munged ip; do command -v "$cmd" >/dev/null || missing=1; done
if [[ $missing -eq 1 ]]; then
    say "installing slurm packages ..."
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
    pkgs=(slurm-wlm slurmctld slurmd slurm-client munge iproute2)
    # Fresh machines may have no package lists; stale lists make install fail: update, retry.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || die "apt-get update failed"
    fi
    if ! apt-get install "${apt_opts[@]}" "${pkgs[@]}" >/tmp/slurm-env-apt.log 2>&1; then
        apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || die "apt-get update failed"
        apt-get install "${apt_opts[@]}" "${pkgs[@]}" >/tmp/slurm-env-apt.log 2>&1 \
            || { tail -n 20 /tmp/slurm-env-apt.log >&2; die "apt-get install failed"; }
    fi
    say "installing slurm packages ... ok"
fi

# 2. Munge ---------------------------------------------------------------------------
# /run/munge is normally made by systemd-tmpfiles; the key by the package's postinst.
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating munge key"
    runuser -u munge -- mungekey -c -k /etc/munge/munge.key \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
# munged refuses to start unless the key belongs to munge and is private.
[[ $(stat -c %U:%a /etc/munge/munge.key) == munge:400 ]] \
    || { chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
if ! running munged; then
    say "starting munged ..."
    runuser -u munge -- munged </dev/null >/dev/null 2>&1 || { logs; die "munged failed to start"; }
    say "starting munged ... ok"
fi
munge -n | unmunge >/dev/null 2>&1 || { logs; die "munge does not work (munge -n | unmunge)"; }

# 3. Names and network for nodes n1 and n2 (slurm/two-nodes.sh) --------------------------
# /etc/hosts first and always: slurm.conf names the controller harness-ctld.
pair_hosts
pair_ok=1
pair_network || { pair_ok=0; warn "no network namespaces for n1/n2 (error above): partition pair stays down"; }

# 4. Config --------------------------------------------------------------------------
mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd/{localhost,n1,n2}
new="$(sed "s/@CPUS@/$(nproc)/g" "$HERE/slurm.conf.in")"
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    say "writing $CONF"
    printf '%s\n' "$new" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    changed=1
fi

# 5. Daemons ---------------------------------------------------------------------------
stop() {  # stop a daemon (all its instances) by its process ids and wait until it is gone
    local pids i
    pids="$(pids_of "$1")"
    [[ -n $pids ]] || return 0
    say "stopping $1 (config changed)"
    kill $pids 2>/dev/null || true
    for i in $(seq 50); do running "$1" || return 0; sleep 0.2; done
    kill -9 $pids 2>/dev/null || true
}
if [[ $changed -eq 1 ]]; then stop slurmd; stop slurmctld; fi

# All daemonize (setsid, own session), so they outlive this script; their stdio goes to
# a file so that `make` or CI never waits on an inherited pipe.
if ! running slurmctld; then
    say "starting slurmctld ..."
    slurmctld </dev/null >>"$LOGDIR/slurmctld.out" 2>&1 || { logs; die "slurmctld failed to start"; }
    # It forks before loading its plugins, so a bad config only shows once it is gone.
    deadline=$((SECONDS + TIMEOUT))
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        { running slurmctld && ((SECONDS < deadline)); } || { logs; die "slurmctld is not answering"; }
        sleep 0.2
    done
    say "starting slurmctld ... ok"
fi
if [[ -z $(slurmd_pids localhost) ]]; then
    say "starting slurmd -N localhost ..."
    slurmd -N localhost </dev/null >>"$LOGDIR/slurmd-localhost.out" 2>&1 \
        || { logs; die "slurmd failed to start"; }
    say "starting slurmd -N localhost ... ok"
fi
pair_stop_stale
if [[ $pair_ok -eq 1 ]]; then
    pair_start || { pair_ok=0; warn "slurmd for n1/n2 failed to start (error above)"; }
fi

# 6. Wait until the nodes can take jobs ------------------------------------------------
# Sets STATE; idle/mixed/allocated/completing are all healthy (jobs may run). A node left
# down or drained (e.g. by an earlier crash) is resumed once. Returns 1 after TIMEOUT s.
wait_idle() {
    local node=$1 resumed=0 deadline=$((SECONDS + TIMEOUT))
    while :; do
        STATE="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true)"
        case "$STATE" in
            idle|mixed|allocated|completing) return 0 ;;
            down|drained|draining|drain)
                if [[ $resumed -eq 0 ]]; then
                    say "node $node is $STATE, resuming it"
                    scontrol update nodename="$node" state=resume || true
                    resumed=1
                fi ;;
        esac
        if ((SECONDS >= deadline)); then
            logs
            scontrol show node "$node" 2>&1 | grep -E 'State|Reason' >&2 || true
            echo "node $node not idle after ${TIMEOUT}s" \
                "(state: '${STATE:-no answer from slurmctld}')" >&2
            return 1
        fi
        sleep 0.2
    done
}
wait_idle localhost || die "node localhost is not usable"
say "node localhost is $STATE ($(sinfo -V))"
if [[ $pair_ok -eq 1 ]]; then
    for node in "${PAIR_NODES[@]}"; do
        wait_idle "$node" || { pair_ok=0; break; }
    done
fi
if [[ $pair_ok -eq 1 ]]; then
    say "nodes ${PAIR_NODES[*]} (partition pair) are up"
else
    # Down with a reason, so that `sinfo -R` says why; a later successful run brings them
    # back (ReturnToService=2 returns a down node to service when its slurmd registers).
    scontrol update nodename="$(IFS=,; echo "${PAIR_NODES[*]}")" state=down \
        reason="two-node setup failed (make slurm-env)" 2>/dev/null || true
    warn "partition pair (nodes ${PAIR_NODES[*]}) is not usable; partition debug is"
fi
