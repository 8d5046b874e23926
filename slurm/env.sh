#!/usr/bin/env bash
# Bring up a single-node Slurm cluster (munged, slurmctld, slurmd) on this machine.
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
die() { echo "slurm-env: ERROR: $*" >&2; exit 1; }
# Process ids of a daemon, zombies excluded: a killed daemon can stay <defunct> for a
# while here because PID 1 (not an init) reaps late, and pgrep would still match it.
pids_of() { { ps -C "$1" -o pid=,stat= || true; } | awk '$2 !~ /^Z/ {print $1}'; }
running() { [[ -n $(pids_of "$1") ]]; }
logs() {  # tail of the daemon logs, for error messages
    local f
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.out" \
             "$LOGDIR/slurmd.out" /var/log/munge/munged.log; do
        [[ -s $f ]] && { echo "--- tail $f"; tail -n 8 "$f"; }
    done >&2
    return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

# 1. Packages -----------------------------------------------------------------------
missing=0
for cmd in sbatch slurmctld slurmd munged; do command -v "$cmd" >/dev/null || missing=1; done
if [[ $missing -eq 1 ]]; then
    say "installing slurm packages ..."
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
    pkgs=(slurm-wlm slurmctld slurmd slurm-client munge)
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

# 3. Config --------------------------------------------------------------------------
mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
new="$(sed "s/@CPUS@/$(nproc)/g" "$HERE/slurm.conf.in")"
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    say "writing $CONF"
    printf '%s\n' "$new" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    changed=1
fi

# 4. Daemons ---------------------------------------------------------------------------
stop() {  # stop a daemon by its process ids and wait until it is gone
    local pids i
    pids="$(pids_of "$1")"
    [[ -n $pids ]] || return 0
    say "stopping $1 (config changed)"
    kill $pids 2>/dev/null || true
    for i in $(seq 50); do running "$1" || return 0; sleep 0.2; done
    kill -9 $pids 2>/dev/null || true
}
if [[ $changed -eq 1 ]]; then stop slurmd; stop slurmctld; fi

# Both daemonize (setsid, own session), so they outlive this script; their stdio goes to
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
if ! running slurmd; then
    say "starting slurmd ..."
    slurmd -N localhost </dev/null >>"$LOGDIR/slurmd.out" 2>&1 || { logs; die "slurmd failed to start"; }
    say "starting slurmd ... ok"
fi

# Wait until the node can take jobs. idle/mixed/allocated are all healthy (jobs may run).
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down|drained|draining|drain)  # e.g. left down by an earlier crash
            if [[ $resumed -eq 0 ]]; then
                say "node is $state, resuming it"
                scontrol update nodename=localhost state=resume || true
                resumed=1
            fi ;;
    esac
    if ((SECONDS >= deadline)); then
        logs
        scontrol show node localhost 2>&1 | grep -E 'State|Reason' >&2 || true
        die "node not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}')"
    fi
    sleep 0.2
done
say "node localhost is $state ($(sinfo -V))"
