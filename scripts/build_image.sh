#!/usr/bin/env bash
# Build the axguard image: `make image` (IMAGE=axguard:0.2.0 by default).
#   - the engine scripts/container_engine.sh names: docker when its daemon answers, else
#     podman (overlay storage, deploy/podman/containers.conf);
#   - torch from TORCH_INDEX_URL (default: the CPU wheel index; a CUDA index makes the GPU
#     variant), other packages from PyPI plus PIP_EXTRA_ARGS;
#   - LOCAL_WHEELS=1 uses this machine's wheel store (/opt/pypi, /opt/pypi-more, /opt/wheels)
#     and CA bundle instead, for machines that reach PyPI but not the torch index;
#   - with podman and no registry, a missing python:3.11-slim-bookworm base is made from
#     Debian packages with debootstrap (same Debian release and Python 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-axguard:0.2.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}
BASE=docker.io/library/python:3.11-slim-bookworm
args=()
if [ "${LOCAL_WHEELS:-0}" = 1 ]; then
  TORCH_INDEX_URL=file:///opt/pypi-more/simple
  PIP_EXTRA_ARGS="--cert /etc/ssl/certs/host-ca.crt --extra-index-url https://pypi.org/simple --extra-index-url file:///opt/pypi/simple --find-links /opt/wheels${PIP_EXTRA_ARGS:+ $PIP_EXTRA_ARGS}"
  for d in /opt/pypi /opt/pypi-more /opt/wheels; do args+=(-v "$d:$d:ro"); done
  args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/host-ca.crt:ro)
fi
mapfile -t engine < <(bash scripts/container_engine.sh) || true
[ ${#engine[@]} -gt 0 ] || exit 2  # container_engine.sh said why
if [ "${engine[0]}" = podman ]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
  if ! "${engine[@]}" image exists "$BASE" && ! "${engine[@]}" pull -q "$BASE" 2>/dev/null; then
    command -v debootstrap >/dev/null || { echo "no $BASE and no debootstrap to make one" >&2; exit 2; }
    root=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$root" >/dev/null
    tar -C "$root" -c . | "${engine[@]}" import - "$BASE" >/dev/null
    rm -rf "$root"
  fi
fi
previous=$("${engine[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
"${engine[@]}" build -t "$IMAGE" "${args[@]}" \
  --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" --build-arg "PIP_EXTRA_ARGS=$PIP_EXTRA_ARGS" .
current=$("${engine[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# The image the tag pointed to before holds its own multi-GB copy of the venv; every source
# change would otherwise leave one behind and fill the disk. (The build-stage cache stays.)
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${engine[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
echo "built $IMAGE"
