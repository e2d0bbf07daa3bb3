#!/bin/sh
# Stand-in for `nanoclaw run [OPTIONS] -- CMD...` while the real CLI is being
# written: skips the options and runs CMD under bubblewrap. Only for exercising
# the benchmark harness (`--nanoclaw bench/placeholder-nanoclaw.sh`); its numbers
# mean nothing about nanoclaw.
[ "${1:-}" = run ] || { echo "placeholder-nanoclaw: only 'run' is supported" >&2; exit 125; }
shift
while [ $# -gt 0 ] && [ "$1" != -- ]; do shift; done
[ "${1:-}" = -- ] && shift
exec bwrap --unshare-all --new-session --cap-drop ALL --die-with-parent --clearenv \
    --setenv PATH /usr/local/bin:/usr/bin:/bin --uid 1000 --gid 1000 \
    --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
    --proc /proc --dev /dev --tmpfs /tmp --remount-ro / "$@"
