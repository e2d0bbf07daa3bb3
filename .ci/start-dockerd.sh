#!/usr/bin/env bash
# Start Debian's dockerd in the background if no daemon answers, and wait (bounded)
# until `docker info` works. Idempotent.
#
# Flags, chosen for this kind of host (Firecracker VM, ext4 root, cgroup v1/v2
# hybrid, no systemd as pid 1):
#   --iptables=false --ip-masq=false  docker must not touch the host firewall: with
#       iptables on it sets the FORWARD policy to DROP and adds NAT rules, which would
#       break nanoclaw's own veth/nftables network tests. Benchmarks and tests only
#       use `--network none`.
#   --storage-driver  overlay2 (works on this ext4 root); vfs as a fallback if the
#       daemon does not come up with overlay2 (e.g. an overlayfs root).
#   --exec-opt native.cgroupdriver=cgroupfs  no systemd here.
# Log: $DOCKERD_LOG (default /var/log/nanoclaw-ci-dockerd.log).
set -euo pipefail

LOG="${DOCKERD_LOG:-/var/log/nanoclaw-ci-dockerd.log}"
WAIT="${DOCKERD_WAIT_SECONDS:-60}"

if docker info >/dev/null 2>&1; then
    echo "start-dockerd: a docker daemon is already running"
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "start-dockerd: must run as root to start dockerd" >&2
    exit 1
fi

try_start() {
    local driver="$1" i pid
    echo "start-dockerd: starting dockerd (storage driver $driver), log $LOG"
    # A stale pid file from a killed daemon makes dockerd refuse to start.
    if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    setsid dockerd \
        --host=unix:///var/run/docker.sock \
        --iptables=false --ip-masq=false \
        --storage-driver="$driver" \
        --exec-opt native.cgroupdriver=cgroupfs \
        </dev/null >>"$LOG" 2>&1 &
    pid=$!
    for ((i = 0; i < WAIT; i++)); do
        if docker info >/dev/null 2>&1; then
            echo "start-dockerd: dockerd (pid $pid) ready after ${i}s"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "start-dockerd: dockerd exited early; last log lines:" >&2
            tail -n 15 "$LOG" >&2 || true
            return 1
        fi
        sleep 1
    done
    echo "start-dockerd: dockerd not ready after ${WAIT}s; last log lines:" >&2
    tail -n 15 "$LOG" >&2 || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

try_start overlay2 || try_start vfs || {
    echo "start-dockerd: could not start dockerd; see $LOG" >&2
    exit 1
}
echo "$(docker info --format 'start-dockerd: server {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}} ({{.CgroupDriver}})')"
