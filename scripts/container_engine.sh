#!/usr/bin/env bash
# Print the container engine command, one word per line: the one rule that
# scripts/build_image.sh and tests/test_image.py share.
#   - docker only when its daemon answers (`docker info` succeeds): a docker client with no
#     daemon behind it, as on a fresh machine here, does not count;
#   - else podman with overlay storage (vfs copies gigabytes per layer) and this
#     repository's containers.conf (runc, cgroupfs), set by the caller via CONTAINERS_CONF;
#   - else exit 2 naming the packages to install (`make test` installs them).
set -euo pipefail
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo docker
elif command -v podman >/dev/null 2>&1; then
  printf '%s\n' podman --storage-driver overlay
else
  echo "no container engine: docker's daemon does not answer (docker info) and podman is" \
       "not installed; apt-get install podman buildah runc debootstrap catatonit" \
       "(make system-deps does)" >&2
  exit 2
fi
