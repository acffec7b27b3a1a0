#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11 and venv, made from Debian's packages with no image
# registry: debootstrap + podman import. deploy/Dockerfile builds FROM it with
#   --build-arg BASE_IMAGE=localhost/embedstream-base:bookworm
# (users build FROM the default python:3.11-slim instead). Does nothing when the image exists.
set -euo pipefail

IMAGE=${1:-localhost/embedstream-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
command -v debootstrap > /dev/null || (apt-get update -q > /dev/null && apt-get install -y -q debootstrap > /dev/null)

rootfs=$(mktemp -d -t embedstream-rootfs-XXXX)
trap 'rm -rf "$rootfs"' EXIT
started=$(date +%s)
# python-is-python3: the Dockerfile calls `python`, as on the slim image.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# Package lists and caches are refetched by any later apt-get update; docs, manuals and translations
# of messages are not read.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/locale/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" > /dev/null
echo "base image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')," \
  "made in $(( $(date +%s) - started )) s"
