#!/usr/bin/env bash
# Builds every image docker-compose.yml, docker-compose.cpu.yml and deploy/k8s name, with podman, and prints
# each one's build time and size: make images runs it. Usage: build-images.sh [TARGET...] (default: all).
# A build of every target also writes the table to docs/generated/images.md, which docs/deployment.md
# includes (tests/unit/test_docs_figures.py fails while the two differ).
#
# Environment, all optional:
#   BASE_IMAGE       the Dockerfile's base; unset, deploy/containers/base-image.sh makes a Debian one (no registry)
#   PIP_CA           a CA bundle pip must trust inside the build (default: $PIP_CERT, else pip's `global.cert`)
#   WHEELS_DIR       a directory of wheels pip prefers at equal versions (mounted read-only into the build)
#   TORCH_INDEX_URL  where the exporter's torch comes from (the Dockerfile's default is PyTorch's CPU index)
#   IMAGE_TAG        the tag of every image (default: the version in pyproject.toml)
#   PRUNE_BUILD_CACHE  1 removes the intermediate images afterwards (default: kept, so the next build
#                    reuses them: `make compose-test` builds every image again, mostly from this cache)
set -euo pipefail
cd "$(dirname "$0")/../.."

export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers/containers.conf}
if ! command -v podman > /dev/null || ! command -v runc > /dev/null; then
  apt-get update -q > /dev/null && apt-get install -y -q podman runc > /dev/null
fi

rows=()
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=localhost/embedstream-base:bookworm
  started=$(date +%s)
  deploy/containers/base-image.sh "$BASE_IMAGE"
  size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f", $1/1e6}')
  rows+=("| \`${BASE_IMAGE#localhost/}\` | (base-image.sh) | $size MB | $(( $(date +%s) - started )) s |")
fi
TAG=${IMAGE_TAG:-$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")}
PIP_CA=${PIP_CA:-${PIP_CERT:-$( (python3 -m pip config get global.cert 2> /dev/null || true) | tr -d "'\"")}}

args=(--format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" -f deploy/Dockerfile)
if [ -n "$PIP_CA" ]; then
  # At a path of its own: mounted over the image's ca-certificates.crt it would break apt's ca-certificates step.
  args+=(--volume "$PIP_CA:/run/pip-ca.crt:ro" --build-arg PIP_CERT=/run/pip-ca.crt)
fi
if [ -n "${WHEELS_DIR:-}" ]; then
  args+=(--volume "$WHEELS_DIR:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels)
fi
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

# Torch-free images first: they are the ones every deployment runs, and the quickest to build.
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(worker sink broker exporter triton-cpu prometheus)
report=()
for target in "${targets[@]}"; do
  image="embedstream-$target:$TAG"
  log=$(mktemp -t "embedstream-build-$target-XXXX.log")
  started=$(date +%s)
  if ! podman build "${args[@]}" --target "$target" -t "$image" . > "$log" 2>&1; then
    tail -40 "$log"
    echo "building $image failed; the whole log: $log" >&2
    exit 1
  fi
  rm -f "$log"
  seconds=$(( $(date +%s) - started ))
  size=$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f", $1/1e6}')
  report+=("$(printf '%-36s %8s MB %6s s' "$image" "$size" "$seconds")")
  rows+=("| \`$image\` | \`$target\` | $size MB | $seconds s |")
  echo "built $image: $size MB in $seconds s"
done
# Intermediate images are the layer cache of the next build (a few GB).
[ "${PRUNE_BUILD_CACHE:-0}" = 1 ] && podman image prune -f > /dev/null

echo
printf '%-36s %11s %8s\n' image size build
printf '%s\n' "${report[@]}"

if [ $# -eq 0 ]; then
  table=docs/generated/images.md
  mkdir -p "$(dirname "$table")"
  {
    echo "Written by \`make images\` at $(git rev-parse --short HEAD 2> /dev/null || echo 'an unknown commit')$(git diff --quiet HEAD 2> /dev/null || echo ' (with local changes)') on $(date -u +%Y-%m-%d): $(podman --version), $(nproc) cores, torch from ${TORCH_INDEX_URL:-the default index of the Dockerfile}${WHEELS_DIR:+, wheels preferred from WHEELS_DIR}; build times with the layer cache as this machine had it."
    echo
    echo "| image | target | size | build |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
  } > "$table"
  echo "wrote $table: copy it into docs/deployment.md's generated region"
fi
