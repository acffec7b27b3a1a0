#!/usr/bin/env bash
# The GPU run, on the GPU machine, from a copy of the working tree with .gpu-bundle/ carried beside it:
# unpack the bundle, install into it only what the image lacks, check the machine, run, report under $OUT.
# Arguments go to `python deploy/gpu/measure.py` (--help lists them). docs/gpu.md has the method.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.gpu-bundle}
DEST=${BUNDLE_DEST:-.embedstream/gpu-run}
WORKDIR=${GPU_WORKDIR:-/tmp/embedstream-gpu}
OUT=${OUT:-gpu-out}
export OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

keep_logs() {
    # The stack's logs, each cut to its last 256 KiB, so a failed run says why.
    if [ -d "$WORKDIR/logs" ]; then
        mkdir -p "$OUT/logs"
        for f in "$WORKDIR"/logs/*; do tail -c 262144 "$f" > "$OUT/logs/$(basename "$f")" || true; done
    fi
}
trap keep_logs EXIT

echo "== $(date -u +%FT%TZ) embedstream GPU run, $($PY --version 2>&1) at $(command -v "$PY")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
$PY deploy/gpu/bundle.py unpack --bundle "$BUNDLE" --dest "$DEST" ${FORCE_INSTALL:+--force}
export PYTHONPATH="$PWD/workers:$PWD/$DEST/site${PYTHONPATH:+:$PYTHONPATH}"
export EMBEDSTREAM_BROKER_BIN="$PWD/$DEST/bin/tansu"
# The Python backend stub links libpython<ver>.so: make this interpreter's own findable.
LIBDIR=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
export LD_LIBRARY_PATH="${LIBDIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# SIGINT first, so the stack is stopped and report.json holds what was measured; the device's own limit is 600 s.
timeout --signal=INT --kill-after=20 "${RUN_TIMEOUT_S:-540}" \
    $PY deploy/gpu/measure.py --bundle "$DEST" --out "$OUT" --workdir "$WORKDIR" "$@"
