#!/usr/bin/env bash
# Build the local Docker image the Docker backend's tests use: the benchmark
# image (/bin/sh, python3) plus the host's static busybox for the everyday
# tools a sandbox test needs (sleep, cat, tar, stat, kill, ...). No registry:
# FROM the local nanoclaw-bench image (.ci/build-bench-image.sh builds it).
#
# Usage: .ci/build-docker-test-image.sh [TAG]   (default nanoclaw-docker-test:latest)
# Env:   FORCE=1 rebuilds even if the image exists.
set -euo pipefail

TAG="${1:-nanoclaw-docker-test:latest}"
BASE="${NANOCLAW_BENCH_IMAGE:-nanoclaw-bench:latest}"
if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "build-docker-test-image: $TAG already present, skipping (FORCE=1 to rebuild)"
    exit 0
fi
here="$(cd "$(dirname "$0")" && pwd)"
docker image inspect "$BASE" >/dev/null 2>&1 || "$here/build-bench-image.sh" "$BASE"
BUSYBOX="$(command -v busybox || true)"
if [[ -z "$BUSYBOX" ]] || ! file "$(readlink -f "$BUSYBOX")" 2>/dev/null | grep -q 'statically linked'; then
    # busybox-static is in .ci/run's package list.
    [[ -x /bin/busybox ]] && BUSYBOX=/bin/busybox || { echo "build-docker-test-image: needs busybox-static" >&2; exit 1; }
fi
ctx="$(mktemp -d /tmp/nanoclaw-docker-test.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT
cp "$(readlink -f "$BUSYBOX")" "$ctx/busybox"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $BASE
COPY busybox /bin/busybox
RUN ["/bin/busybox", "mkdir", "-p", "/usr/local/bin"]
RUN ["/bin/busybox", "--install", "-s", "/usr/local/bin"]
DOCKERFILE
docker build --network none -q -t "$TAG" "$ctx"
echo "build-docker-test-image: built $TAG"
