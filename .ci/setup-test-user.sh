#!/usr/bin/env bash
# Prepare the host for rootless tests. Idempotent.
#   - an unprivileged user (default nanotest, uid/gid 1500, home /home/nanotest,
#     login shell /bin/sh) with subordinate uid/gid ranges for newuidmap/newgidmap;
#   - unprivileged user namespaces enabled (the Debian/Ubuntu sysctl knobs that exist);
#   - the given directories (the cargo target dir) readable by that user, and every
#     ancestor directory traversable (o+x only, never o+r).
# Usage: .ci/setup-test-user.sh [DIR...]
# Env:   NANOCLAW_TEST_USER (nanotest), NANOCLAW_TEST_UID (1500)
set -euo pipefail

USER_NAME="${NANOCLAW_TEST_USER:-nanotest}"
USER_ID="${NANOCLAW_TEST_UID:-1500}"
SUB_START=$((USER_ID * 100000 + 100000))   # 150100000..: far from real users' ranges
SUB_COUNT=65536

if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --gid "$USER_ID" "$USER_NAME"
fi
if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    useradd --uid "$USER_ID" --gid "$USER_ID" --create-home --home-dir "/home/$USER_NAME" \
        --shell /bin/sh --no-user-group "$USER_NAME"
fi
actual_uid="$(id -u "$USER_NAME")"
if [[ "$actual_uid" != "$USER_ID" ]]; then
    echo "setup-test-user: user $USER_NAME exists with uid $actual_uid, expected $USER_ID" >&2
    exit 1
fi
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$USER_NAME:" "$f"; then
        echo "$USER_NAME:$SUB_START:$SUB_COUNT" >>"$f"
    fi
done

# Unprivileged user namespaces.
if [[ -e /proc/sys/kernel/unprivileged_userns_clone ]]; then
    sysctl -qw kernel.unprivileged_userns_clone=1
fi
if [[ -e /proc/sys/kernel/apparmor_restrict_unprivileged_userns ]]; then
    sysctl -qw kernel.apparmor_restrict_unprivileged_userns=0
fi
if [[ "$(cat /proc/sys/user/max_user_namespaces)" -lt 1000 ]]; then
    sysctl -qw user.max_user_namespaces=15000
fi
# Prove it: an unprivileged user can create a user namespace (bwrap does exactly that).
if ! runuser -u "$USER_NAME" -- unshare --user --map-root-user true; then
    echo "setup-test-user: $USER_NAME cannot create a user namespace" >&2
    exit 1
fi

# Delegate a cgroup v1 subtree per controller to the test user, as an
# administrator would (`nanoclaw doctor` prints these commands): the rootless
# tests of memory, cpu and pids limits need it, those of pause/resume the
# freezer, and a long-lived sandbox's cpu usage (inspect) cpuacct where it
# is a hierarchy of its own. Tests of the undelegated path point
# NANOCLAW_CGROUP_PARENT elsewhere. (Pure v2 hosts: .ci/cgroup-v2-vm.sh;
# v2 freezing needs no controller.)
for c in cpu cpuacct memory pids freezer; do
    if [[ -d "/sys/fs/cgroup/$c" ]] && grep -q " /sys/fs/cgroup/$c[, ]\| /sys/fs/cgroup/[a-z,]*$c[, ]" /proc/self/mountinfo; then
        mkdir -p "/sys/fs/cgroup/$c/nanoclaw-$USER_ID"
        chown -R "$USER_ID:$USER_ID" "/sys/fs/cgroup/$c/nanoclaw-$USER_ID"
    fi
done

# Make build outputs reachable by the test user.
for dir in "$@"; do
    [[ -d "$dir" ]] || continue
    d="$(readlink -f "$dir")"
    chmod -R o+rX "$d"
    p="$(dirname "$d")"
    while [[ "$p" != / ]]; do
        if [[ "$(stat -c %A "$p")" != ?????????[xt] ]]; then
            echo "setup-test-user: chmod o+x $p (so $USER_NAME can reach $d)"
            chmod o+x "$p"
        fi
        p="$(dirname "$p")"
    done
done
echo "setup-test-user: $USER_NAME uid $USER_ID, subuid $(grep "^$USER_NAME:" /etc/subuid), max_user_namespaces $(cat /proc/sys/user/max_user_namespaces)"
