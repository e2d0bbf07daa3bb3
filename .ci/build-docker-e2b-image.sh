#!/usr/bin/env bash
# Build the local Docker image the daemon's multi-backend test (crates/cli/tests/
# serve_backends.rs) runs E2B sandboxes in: the Docker backend's test image
# (/bin/sh, python3, busybox's tools) plus the host's bash and the libraries it
# needs, because the e2b SDK runs every command as `/bin/bash -l -c CMD`. No
# registry: FROM the local nanoclaw-docker-test image
# (.ci/build-docker-test-image.sh builds it).
#
# Usage: .ci/build-docker-e2b-image.sh [TAG]   (default nanoclaw-e2b-docker:latest)
# Env:   FORCE=1 rebuilds even if the image exists.
set -euo pipefail

TAG="${1:-nanoclaw-e2b-docker:latest}"
BASE="nanoclaw-docker-test:latest"
if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "build-docker-e2b-image: $TAG already present, skipping (FORCE=1 to rebuild)"
    exit 0
fi
here="$(cd "$(dirname "$0")" && pwd)"
docker image inspect "$BASE" >/dev/null 2>&1 || "$here/build-docker-test-image.sh" "$BASE"
ctx="$(mktemp -d /tmp/nanoclaw-e2b-docker.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
BASH_BIN="$(readlink -f /usr/bin/bash)"
mkdir -p "$ctx/root/usr/bin"
cp "$BASH_BIN" "$ctx/root/usr/bin/bash"
# The shared libraries bash needs that the base image may lack (at their
# real paths; the base image is usrmerged like Debian 12).
ldd "$BASH_BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
    real="$(readlink -f "$lib")"
    mkdir -p "$ctx/root$(dirname "$real")"
    cp "$real" "$ctx/root$real"
    # The name the loader looks for, under /usr (/lib is a symlink to
    # usr/lib in the image: a /lib directory in the context would replace it).
    name="/usr${lib#/usr}"
    if [[ "$real" != "$name" ]]; then
        mkdir -p "$ctx/root$(dirname "$name")"
        ln -sf "$(basename "$real")" "$ctx/root$name"
    fi
done
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $BASE
COPY root/ /
RUN ["/usr/bin/bash", "-c", "true"]
DOCKERFILE
docker build --network none -q -t "$TAG" "$ctx"
echo "build-docker-e2b-image: built $TAG"
