#!/usr/bin/env bash
# Build nanoclaw and the benchmark, make sure docker and its image are there,
# then run the side-by-side start-up benchmark and keep the results.
#
#   bench/run.sh [nanoclaw-bench options...]     e.g. bench/run.sh --iterations 100
#
# Results: bench/results/<date>-<host>.md and .json (markdown table for the README).
# As root it also starts dockerd and builds the image if needed (see .ci/).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p nanoclaw -p nanoclaw-bench
if [[ $EUID -eq 0 ]]; then
    .ci/start-dockerd.sh
    .ci/build-bench-image.sh
fi
out="bench/results/$(date -u +%F)-$(hostname -s)"
mkdir -p bench/results
"$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/nanoclaw-bench" --nanoclaw "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/nanoclaw" \
    --json-out "$out.json" "$@" | tee "$out.md"
echo "bench/run.sh: results in $out.md and $out.json" >&2
