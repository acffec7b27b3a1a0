#!/usr/bin/env bash
# Build the bundle the GPU run carries (.gpu-bundle/: bundle.tar.xz + manifest.json), here, from PyPI and
# this checkout's venv (the `local` extra). Usage: deploy/gpu/pack.sh [PYTHON_VERSION [OUT_DIR]]
# PYTHON_VERSION is the target machine's (3.12 for the GPU machine; 3.11 for the local rehearsal).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PYTHONPATH="$PWD/workers" $PY deploy/gpu/bundle.py pack \
    --python "${1:-3.12}" --out "${2:-.gpu-bundle}" --repo . ${WHEELS:+--wheels "$WHEELS"}
