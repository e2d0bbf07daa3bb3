#!/usr/bin/env bash
# Build nanoclaw, make sure the pinned SDK venv (e2b + docker) and the docker
# image are there, then run bench/e2b_bench.py: `nanoclaw serve` driven by the
# real e2b SDK, side by side with Docker through its Engine API.
#
#   bench/e2b_bench.sh --quick --out          # report in bench/results/<date>-e2b.md (+ .json)
#   bench/e2b_bench.sh --full --idle 1000 --out
#   bench/e2b_bench.sh --sections ab          # only (a) and (b)
#
# Env: CARGO_TARGET_DIR (where nanoclaw is built; default ./target),
#      NANOCLAW_VENV (the venv; default $CARGO_TARGET_DIR/venv, see .ci/python-venv.sh),
#      NANOCLAW_BENCH_IMAGE (default nanoclaw-bench:latest).
# Needs root for the isolated daemon (a private mount namespace) and dockerd running
# (as root: .ci/start-dockerd.sh). Only loopback and the local docker socket are used.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p nanoclaw
VENV="$(.ci/python-venv.sh | tail -1)"
if [[ $EUID -eq 0 ]]; then
    .ci/start-dockerd.sh
    .ci/build-bench-image.sh "${NANOCLAW_BENCH_IMAGE:-nanoclaw-bench:latest}"
fi
exec "$VENV/bin/python" bench/e2b_bench.py \
    --nanoclaw "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/nanoclaw" "$@"
