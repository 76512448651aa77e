#!/bin/sh
# Makes the Dockerfile's base image, python:3.11-slim, when it is neither present nor pullable.
#
#   sh infra/images/base-image.sh [ENGINE]      # ENGINE: podman (default)
#
# A machine with a registry pulls python:3.11-slim and this script does nothing more. Without
# one (a build machine that reaches only Debian's package mirror and PyPI), it builds an image
# under that very name from Debian 12's own packages: debootstrap's minimal system plus python3
# (3.11 on Debian 12), python3-venv and the CA certificates, and imports it. The Dockerfile then
# builds unchanged. The mirror is the one this machine's apt already uses; nothing is written
# into the project about it.
set -eu

ENGINE=${1:-podman}
NAME=docker.io/library/python:3.11-slim

if "$ENGINE" image exists "$NAME" 2>/dev/null; then
    exit 0
fi
# A short pull attempt first: with a registry this is all there is to do.
if timeout 60 "$ENGINE" pull --quiet "$NAME" >/dev/null 2>&1; then
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "$NAME cannot be pulled and debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "$NAME cannot be pulled; making it with debootstrap needs root" >&2
    exit 1
fi

# The Debian mirror apt uses here (deb822 sources first, then the one-line format).
MIRROR=$(grep -rhs '^URIs: http' /etc/apt/sources.list.d/ | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)
if [ -z "$MIRROR" ]; then
    MIRROR=$(grep -rhs '^deb http' /etc/apt/sources.list /etc/apt/sources.list.d/ | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)
fi
if [ -z "$MIRROR" ]; then
    echo "no Debian mirror found in this machine's apt sources" >&2
    exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bucketml-base.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs
echo "making $NAME from Debian 12 packages (debootstrap)"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
echo "deb $MIRROR bookworm main" >"$ROOTFS/etc/apt/sources.list"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
chroot "$ROOTFS" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv python-is-python3 ca-certificates && apt-get clean' \
    >"$WORK/packages.log" 2>&1 || { tail -20 "$WORK/packages.log" >&2; exit 1; }
# The image must not keep this machine's mirror or resolver; documentation is dead weight.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS/etc/apt/sources.list" "$ROOTFS/etc/resolv.conf" \
    "$ROOTFS"/var/cache/apt/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
: >"$ROOTFS/etc/apt/sources.list"
# pip inside the build verifies PyPI against this machine's trust store (which may hold a
# proxy's authority that Debian's bundle lacks).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
tar -C "$ROOTFS" -cf "$WORK/base.tar" .
"$ENGINE" import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$WORK/base.tar" "$NAME" >/dev/null
echo "made $NAME ($("$ENGINE" image inspect --format '{{.Size}}' "$NAME" | awk '{printf "%d MB", $1/1000000}'))"
