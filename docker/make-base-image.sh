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
trap 'rm -rf "$ROOTFS" "$ROOTFS.image.tar"' EXIT

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

# Reproducible: the same package versions give the same image id, on any machine, any day.
# What debootstrap writes that says when rather than what:
# - /etc/shadow's "last password change" day: the day of the build. Fixed at the suite's
#   release day (bookworm: 2023-06-10), not 0, which would mean "change it at next login".
# - Debian's .pyc files are checked against their source's mtime, which the image's
#   normalized layer sets to 0: compiled again, checked-hash, with a fixed hash seed.
# - logs, ldconfig's aux-cache and dpkg/debconf backups: removed.
# - what debootstrap copies from this host or names of it: /etc/hostname and
#   /etc/resolv.conf (the engine mounts its own over both) are emptied, and apt's source
#   names Debian's canonical mirror, not the one this machine fetched from.
# The layer itself is written by harness/containers/oci.py: sorted, every mtime 0, owners by number.
# org.harness.base-format counts changes to that recipe: docker/env.sh rebuilds an older one.
sed -i -E "s/^([^:]*:[^:]*:)[0-9]+:/\1${SHADOW_DAY:-19518}:/" "$ROOTFS/etc/shadow"
chroot "$ROOTFS" sh -c 'PYTHONHASHSEED=0 python3 -m compileall -qq -f \
    --invalidation-mode unchecked-hash /usr/lib/python3* /usr/lib/python3/dist-packages' \
    || true  # like Debian's own step: a file that does not compile stays source only
find "$ROOTFS/var/log" -type f -delete
: > "$ROOTFS/etc/hostname"
rm -f "$ROOTFS/etc/resolv.conf" && : > "$ROOTFS/etc/resolv.conf"
echo "deb http://deb.debian.org/debian $SUITE main" > "$ROOTFS/etc/apt/sources.list"
rm -f "$ROOTFS"/var/cache/ldconfig/aux-cache "$ROOTFS"/var/cache/debconf/*-old \
      "$ROOTFS"/var/lib/dpkg/*-old
PACKAGES="$(chroot "$ROOTFS" dpkg-query -W -f '${Package}=${Version}\n' | LC_ALL=C sort \
    | paste -sd' ')"

start=$SECONDS
log "docker load $IMAGE (normalized layer) ..."
# --numeric-owner: keep uid/gid of the rootfs, not the host's names for them. The labels
# list what the image holds: a lock names the base's packages through them.
HARNESS_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tar --numeric-owner -C "$ROOTFS" -c . \
    | PYTHONPATH="$HARNESS_SRC" python3 -m harness.containers.oci rootfs "$IMAGE" \
        --env LANG=C.UTF-8 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["/bin/bash"]' \
        --label "org.harness.base-format=2" \
        --label "org.harness.debian-suite=$SUITE" \
        --label "org.harness.debian-packages=$PACKAGES" \
        --created-by "debootstrap --variant=minbase --include=$INCLUDE $SUITE" \
        > "$ROOTFS.image.tar"
docker load -q -i "$ROOTFS.image.tar" >/dev/null
rm -f "$ROOTFS.image.tar"
log "docker load ok ($((SECONDS - start)) s): $(docker image inspect -f '{{.Id}}' "$IMAGE")"

# Later images run `python3 -m venv /opt/venv && /opt/venv/bin/pip install
# --no-index ...`: prove that works here, offline, before anyone uses the image.
log "checking python3 -m venv inside $IMAGE ..."
docker run --rm --network none "$IMAGE" sh -c \
    'python3 -m venv /tmp/v && /tmp/v/bin/pip --version' >/dev/null \
    || die "python3 -m venv (with pip) does not work inside $IMAGE"
log "ok: $IMAGE"
