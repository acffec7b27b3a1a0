#!/usr/bin/env bash
# The hand-off rehearsed on this (CPU) machine: the working tree copied as the device copies it (tracked
# and untracked-not-ignored files) plus a bundle packed for this Python, into a fresh scratch directory,
# then deploy/gpu/run.sh there with --device cpu and small counts. Every wheel is installed (FORCE_INSTALL)
# because this venv already has them all. Usage: deploy/gpu/rehearse.sh BUNDLE_DIR [SCRATCH] [run.sh args]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=$(cd "${1:?usage: rehearse.sh BUNDLE_DIR [SCRATCH] [args]}" && pwd)
SCRATCH=${2:-/tmp/gpu-rehearsal}
shift $(( $# >= 2 ? 2 : 1 ))
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH/repo"
(cd "$REPO" && git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
    [ -f "$f" ] && cp --parents -- "$f" "$SCRATCH/repo/"; done)
cp -r "$BUNDLE" "$SCRATCH/repo/.gpu-bundle"
du -sh "$SCRATCH/repo" "$SCRATCH/repo/.gpu-bundle"
cd "$SCRATCH/repo"
PYTHON="$REPO/.venv/bin/python" FORCE_INSTALL=1 OUT="$SCRATCH/out" GPU_WORKDIR="$SCRATCH/work" bash deploy/gpu/run.sh \
    --device cpu --batch 16 --workers 2 --instances 1 --image-count 192 --text-count 640 --photo-pool 48 \
    --bare-batches 2 --bare-seconds 2 "$@"
