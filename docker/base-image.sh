#!/usr/bin/env bash
# Builds the local test base image (Debian bookworm minbase with python3 and python3-venv) with
# debootstrap and `docker import`, for machines that reach Debian's package mirror but no
# container registry.  The image is cached by tag: if it exists, nothing is built.
#
#   docker/base-image.sh [TAG]        # default tag: batchfeed-base:bookworm
#
# Then: docker build --build-arg BASE_IMAGE=batchfeed-base:bookworm -t batchfeed .
# Needs root (debootstrap), debootstrap and a running Docker engine.  Prints the tag on stdout.
set -euo pipefail

tag="${1:-batchfeed-base:bookworm}"
suite=bookworm

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base-image: $tag exists; not rebuilding (docker rmi $tag to force)" >&2
    echo "$tag"
    exit 0
fi

# The mirror apt already uses on this machine (deb822 sources first, then sources.list).
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" && -r /etc/apt/sources.list.d/debian.sources ]]; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
if [[ -z "$mirror" && -r /etc/apt/sources.list ]]; then
    mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

rootfs="$(mktemp -d /tmp/batchfeed-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "base-image: debootstrap $suite from $mirror into $rootfs ..." >&2
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# Nothing in the image needs apt's caches.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv $suite" \
    - "$tag" >/dev/null
echo "base-image: built $tag in $((SECONDS - start)) s" >&2
echo "$tag"
