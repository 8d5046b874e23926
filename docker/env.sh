#!/usr/bin/env bash
# Bring up the container environment on this machine (idempotent, run as root):
#   docker engine + local registry on 127.0.0.1:5000 + a digest-pinned base image.
# The pinned reference is written to $HARNESS_STATE_DIR/base-cpu.ref and printed
# as the last line. On a machine where everything already runs it changes nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REGISTRY=127.0.0.1:5000
REPO=harness/base-cpu
TAG=bookworm
REGISTRY_DIR="${HARNESS_REGISTRY_DIR:-/var/lib/harness-registry}"
STATE_DIR="${HARNESS_STATE_DIR:-$HOME/.local/state/harness}"
# A docker 20.10 engine pushes Docker v2 manifests; also accept OCI just in case.
ACCEPT="application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json"

log() { echo "docker-env: $*"; }
die() { echo "docker-env: ERROR: $*" >&2; exit 1; }
trap 'echo "docker-env: ERROR: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
[ "$(id -u)" = 0 ] || die "must run as root"

# Two concurrent runs (make + CI) must not both start daemons or build the image.
mkdir -p /run/lock
# (Daemons started below get `9>&-`, else they would hold this lock forever.)
exec 9>/run/lock/harness-docker-env.lock
flock -w 600 9 || die "another docker/env.sh still holds /run/lock/harness-docker-env.lock"

# wait_for SECONDS CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
}

# --- 1. packages --------------------------------------------------------------
# The machine may ship a docker *client* only, so test for dockerd, not docker.
missing=()
command -v dockerd >/dev/null         || missing+=(docker.io)
command -v debootstrap >/dev/null     || missing+=(debootstrap)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v curl >/dev/null            || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    start=$SECONDS
    log "installing ${missing[*]} ..."
    APT=(apt-get -o DPkg::Lock::Timeout=600 -q -y)
    export DEBIAN_FRONTEND=noninteractive
    if ! { "${APT[@]}" update && "${APT[@]}" install --no-install-recommends "${missing[@]}"; } \
            >/var/log/harness-apt.log 2>&1; then
        tail -n 20 /var/log/harness-apt.log >&2
        die "apt-get failed (log: /var/log/harness-apt.log)"
    fi
    log "installing ... ok ($((SECONDS - start)) s)"
fi

# --- 2. docker engine -----------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    start=$SECONDS
    log "starting dockerd ..."
    # No systemd: run it detached in its own session so it outlives this script.
    setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null 9>&- &
    if ! wait_for 60 docker info; then
        tail -n 20 /var/log/dockerd.log >&2
        die "dockerd did not answer 'docker info' within 60 s (log: /var/log/dockerd.log)"
    fi
    log "starting dockerd ... ok ($((SECONDS - start)) s)"
fi

# --- 3. local registry ----------------------------------------------------------
registry_up() { curl -fs -o /dev/null "http://$REGISTRY/v2/"; }
if ! registry_up; then
    start=$SECONDS
    log "starting registry on $REGISTRY ..."
    mkdir -p "$REGISTRY_DIR/data"
    cat >"$REGISTRY_DIR/config.yml" <<EOF
# Written by docker/env.sh: local, unauthenticated registry for harness images.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    setsid nohup docker-registry serve "$REGISTRY_DIR/config.yml" \
        >/var/log/harness-registry.log 2>&1 </dev/null 9>&- &
    if ! wait_for 30 registry_up; then
        tail -n 20 /var/log/harness-registry.log >&2
        die "registry did not answer http://$REGISTRY/v2/ within 30 s (log: /var/log/harness-registry.log)"
    fi
    log "starting registry ... ok ($((SECONDS - start)) s)"
fi

# --- 4. base image in the registry ----------------------------------------------
# Prints the manifest digest of $REPO:$TAG in the registry, or fails if absent.
registry_digest() {
    curl -fs -I -H "Accept: $ACCEPT" "http://$REGISTRY/v2/$REPO/manifests/$TAG" \
        | tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" {print $2}' | grep .
}
# Whether the registry's base was written by docker/make-base-image.sh as it is now
# (reproducible: the same Debian packages give the same image id; org.harness.base-format
# names the recipe). An older base is built again once.
base_is_reproducible() {
    local config
    config="$(curl -fs -H "Accept: $ACCEPT" "http://$REGISTRY/v2/$REPO/manifests/$TAG" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])')" \
        || return 1
    curl -fs "http://$REGISTRY/v2/$REPO/blobs/$config" | grep -q '"org.harness.base-format":"2"'
}
if ! digest="$(registry_digest)" || ! base_is_reproducible; then
    start=$SECONDS
    log "building base image $REPO:$TAG (debootstrap, 1-2 min) ..."
    "$HERE/make-base-image.sh" "$REPO:$TAG"
    docker tag "$REPO:$TAG" "$REGISTRY/$REPO:$TAG"
    docker push "$REGISTRY/$REPO:$TAG" >/dev/null
    digest="$(registry_digest)" || die "pushed $REGISTRY/$REPO:$TAG but the registry does not list it"
    log "building base image ... ok ($((SECONDS - start)) s)"
fi
REF="$REGISTRY/$REPO@$digest"

# --- 5. pin -----------------------------------------------------------------------
# Make sure the engine can resolve the exact pinned reference (FROM uses it).
# Skipped when the engine already has it, so a re-run stays fast and offline.
if ! docker image inspect "$REF" >/dev/null 2>&1; then
    log "pulling $REF ..."
    docker pull -q "$REF" >/dev/null || die "docker pull $REF failed"
fi
if [ "$(cat "$STATE_DIR/base-cpu.ref" 2>/dev/null)" != "$REF" ]; then
    mkdir -p "$STATE_DIR"
    tmp="$(mktemp "$STATE_DIR/.base-cpu.ref.XXXXXX")"   # same dir: mv is atomic
    echo "$REF" >"$tmp"
    mv -f "$tmp" "$STATE_DIR/base-cpu.ref"
fi
echo "$REF"
