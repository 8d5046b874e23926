#!/usr/bin/env bash
# Build a minimal Debian base image with python3 + venv from Debian packages
# (no public container registry needed) and import it into the local engine.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: docker/make-base-image.sh [NAME:TAG]

Build a minimal Debian image (debootstrap --variant=minbase) that contains
python3 and a working `python3 -m venv` (with pip), and import it into the
local Docker engine as NAME:TAG (default: harness/base-cpu:bookworm).
Needs root, debootstrap and a running Docker engine. Only a Debian mirror is
needed, no container registry, so it also works on offline / air-gapped sites
that have a local Debian mirror.

Environment:
  MIRROR   Debian mirror URL (e.g. http://deb.debian.org/debian or
           file:///srv/mirror/debian). Default: the first URIs: line of
           /etc/apt/sources.list.d/debian.sources, else the first deb line of
           /etc/apt/sources.list.
  SUITE    Debian suite (default: bookworm).
  INCLUDE  Comma-separated Debian packages to add (default:
           python3,python3-venv,ca-certificates).

Push the result yourself, e.g.:
  docker tag harness/base-cpu:bookworm 127.0.0.1:5000/harness/base-cpu:bookworm
  docker push 127.0.0.1:5000/harness/base-cpu:bookworm
EOF
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -le 1 ] || { usage >&2; exit 2; }

IMAGE="${1:-harness/base-cpu:bookworm}"
SUITE="${SUITE:-bookworm}"
# python3-venv pulls python3.X-venv, which carries the ensurepip wheels (pip,
# setuptools): `python3 -m venv` then creates venvs with pip, fully offline.
INCLUDE="${INCLUDE:-python3,python3-venv,ca-certificates}"

log() { echo "make-base-image: $*"; }
die() { echo "make-base-image: ERROR: $*" >&2; exit 1; }

if [ -z "${MIRROR:-}" ]; then
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "${MIRROR:-}" ] && [ -r /etc/apt/sources.list ]; then
        # "deb [options] URL suite comp..." -> URL (skip an optional [..] block)
        MIRROR="$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)"
    fi
fi
[ -n "${MIRROR:-}" ] || die "no Debian mirror found in /etc/apt/sources.list{.d/debian.sources,}; set MIRROR=..."

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
docker info >/dev/null 2>&1 || die "docker engine not answering (docker info)"

ROOTFS="$(mktemp -d /var/tmp/harness-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

start=$SECONDS
log "debootstrap $SUITE from $MIRROR (include: $INCLUDE) ..."
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS" "$MIRROR" \
        > "$ROOTFS.log" 2>&1; then
    tail -n 30 "$ROOTFS.log" >&2
    die "debootstrap failed (full log: $ROOTFS.log)"
fi
rm -f "$ROOTFS.log"
# Drop caches that only bloat the image (apt lists are refetched by apt-get update).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
log "debootstrap ok ($((SECONDS - start)) s, $(du -sh "$ROOTFS" | cut -f1))"

start=$SECONDS
log "docker import $IMAGE ..."
# --numeric-owner: keep uid/gid of the rootfs, not the host's names for them.
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null
log "docker import ok ($((SECONDS - start)) s)"

# Later images run `python3 -m venv /opt/venv && /opt/venv/bin/pip install
# --no-index ...`: prove that works here, offline, before anyone uses the image.
log "checking python3 -m venv inside $IMAGE ..."
docker run --rm --network none "$IMAGE" sh -c \
    'python3 -m venv /tmp/v && /tmp/v/bin/pip --version' >/dev/null \
    || die "python3 -m venv (with pip) does not work inside $IMAGE"
log "ok: $IMAGE"
