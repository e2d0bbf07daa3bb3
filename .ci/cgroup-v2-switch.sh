#!/bin/sh
# Move cgroup controllers between v1 and the v2 (unified) hierarchy on a
# v1/v2 hybrid host, so that CI can run nanoclaw's cgroup tests once on v1
# and once on v2 on the same machine.
#
#   .ci/cgroup-v2-switch.sh            move pids and cpu/cpuacct to v2
#   .ci/cgroup-v2-switch.sh --restore  move them back to v1
#   .ci/cgroup-v2-switch.sh --status   only print where each controller is
#
# Then run the tests with the expectation spelled out, e.g.
#   NANOCLAW_EXPECT_CGROUP_V2=pids,cpu cargo test -p nanoclaw-sandbox --lib native::cgroup
#
# How it works: a v1 hierarchy with no child cgroups is destroyed when it is
# unmounted, and its controllers become available on v2. Moving back needs
# the controller disabled in every v2 cgroup.subtree_control first.
# The memory controller is never touched (on the CI VM an agent's processes
# sit in child memory cgroups; those hierarchies cannot move).
# Empty child cgroups of a moved hierarchy are removed (rmdir cannot touch
# a populated one); populated ones stop the move with a clear message.
# Idempotent: running it twice is harmless. Needs root.
set -eu

CONTROLLERS="pids cpu cpuacct"
MODE=switch
case "${1:-}" in
"") ;;
--restore) MODE=restore ;;
--status) MODE=status ;;
*)
	echo "usage: $0 [--restore|--status]" >&2
	exit 2
	;;
esac

# Mount point of the v2 hierarchy (from mountinfo: fields after " - ").
v2_mount() {
	awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo | head -n 1
}

# Mount points of the v1 hierarchy that has controller $1.
v1_mounts() {
	awk -v c="$1" '{ for (i = 7; i <= NF; i++) if ($i == "-") {
		if ($(i + 1) == "cgroup") { n = split($(i + 3), o, ","); for (j = 1; j <= n; j++) if (o[j] == c) print $5 }
		break } }' /proc/self/mountinfo
}

on_v2() { # controller
	[ -n "$V2" ] && tr ' ' '\n' <"$V2/cgroup.controllers" | grep -qx "$1"
}

where() { # controller -> "v1 (<mount>)", "v2 (<mount>)" or "absent"
	m=$(v1_mounts "$1" | head -n 1)
	if [ -n "$m" ]; then
		echo "v1 ($m)"
	elif on_v2 "$1"; then
		echo "v2 ($V2)"
	elif [ "$1" = cpuacct ] && on_v2 cpu; then
		echo "v2 ($V2, as part of cpu)"
	else
		echo "absent"
	fi
}

status() {
	for c in memory $CONTROLLERS; do
		printf '  %-8s %s\n' "$c:" "$(where "$c")"
	done
}

V2=$(v2_mount)
if [ "$MODE" = status ]; then
	status
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "$0: must run as root (it unmounts and mounts cgroup hierarchies)" >&2
	exit 1
fi
if [ -z "$V2" ]; then
	echo "$0: no cgroup v2 hierarchy is mounted: nothing to move controllers to (mount one: mount -t cgroup2 none /sys/fs/cgroup/unified)" >&2
	exit 1
fi

hierarchy_id() { # controller -> its hierarchy id in /proc/cgroups (0: the v2 one)
	awk -v c="$1" '$1 == c { print $2 }' /proc/cgroups
}

# Super options of the v1 mount at $1 without rw/ro (e.g. "cpu,cpuacct").
mount_opts() {
	awk -v m="$1" '$5 == m { for (i = 7; i <= NF; i++) if ($i == "-") { print $(i + 3); break } }' /proc/self/mountinfo |
		head -n 1 | tr ',' '\n' | grep -vx 'rw\|ro' | paste -sd, -
}

switch_one() { # controller
	c=$1
	mounts=$(v1_mounts "$c")
	if [ -z "$mounts" ]; then
		if [ "$(hierarchy_id "$c")" = 0 ]; then
			echo "$c: already on v2"
		else
			echo "$c: not mounted on v1 but bound to hierarchy $(hierarchy_id "$c") (mount it with: mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c)" >&2
			return 1
		fi
		return 0
	fi
	first=$(echo "$mounts" | head -n 1)
	opts=$(mount_opts "$first")
	attempt=0
	while [ $attempt -lt 10 ]; do
		attempt=$((attempt + 1))
		# Empty child cgroups (nanoclaw's own parents, an idle dockerd's
		# "docker" parent...) pin the hierarchy: remove them, deepest first.
		# rmdir only succeeds on a cgroup without processes, so no process
		# is ever affected; populated ones are reported below.
		find "$first" -depth -mindepth 1 -type d 2>/dev/null | while read -r d; do
			if rmdir "$d" 2>/dev/null; then echo "$c: removed empty child cgroup $d"; fi
		done
		children=$(find "$first" -mindepth 1 -maxdepth 1 -type d | head -n 5)
		if [ -n "$children" ]; then
			echo "$c: cannot move to v2: the v1 hierarchy at $first has child cgroups with processes:" >&2
			echo "$children" | sed 's/^/    /' >&2
			echo "  (move their processes out and rmdir them first)" >&2
			return 1
		fi
		unmounted=yes
		for m in $mounts; do
			umount "$m" 2>/dev/null || unmounted=no
		done
		if [ $unmounted = no ]; then
			# Something has a file open there right now: try again.
			sleep 0.2
			continue
		fi
		# The hierarchy is released asynchronously once it is unmounted and
		# has no children.
		i=0
		while [ "$(hierarchy_id "$c")" != 0 ] && [ $i -lt 20 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		if [ "$(hierarchy_id "$c")" = 0 ]; then
			echo "$c: moved from v1 ($first, -o $opts) to v2 ($V2)"
			return 0
		fi
		# A child cgroup was created between rmdir and umount: the hierarchy
		# lives on unmounted. Mount it back (same hierarchy) and retry.
		echo "$c: hierarchy still alive after umount (a cgroup was created meanwhile); remounting and retrying" >&2
		mount -t cgroup -o "$opts" cgroup "$first"
		mounts=$first
	done
	echo "$c: could not move to v2 after $attempt attempts (the mount stayed busy or kept getting child cgroups)" >&2
	return 1
}

restore_one() { # controller
	c=$1
	if [ -n "$(v1_mounts "$c")" ]; then
		echo "$c: already on v1 ($(v1_mounts "$c" | head -n 1))"
		return 0
	fi

	if [ "$c" != cpuacct ] && on_v2 "$c"; then
		# Disable it in every v2 cgroup, deepest first, then wait for the
		# kernel to release it.
		find "$V2" -depth -name cgroup.subtree_control | while read -r f; do
			if tr ' ' '\n' <"$f" | grep -qx "$c"; then
				echo "-$c" >"$f" || echo "$c: could not disable it in $f" >&2
			fi
		done
	fi
	dir=$(dirname "$V2")/$c
	mkdir -p "$dir"
	i=0
	until mount -t cgroup -o "$c" cgroup "$dir" 2>/dev/null; do
		i=$((i + 1))
		if [ $i -ge 50 ]; then
			echo "$c: could not mount it on v1 at $dir (still in use on v2? check cgroup.subtree_control files under $V2)" >&2
			return 1
		fi
		sleep 0.1
	done
	echo "$c: moved back to v1 ($dir)"
}

if [ "$MODE" = restore ] && [ "$V2" = /sys/fs/cgroup ]; then
	echo "pure cgroup v2 host (v2 at /sys/fs/cgroup): there is no v1 layout to restore"
	status
	exit 0
fi
rc=0
for c in $CONTROLLERS; do
	if [ "$MODE" = switch ]; then
		switch_one "$c" || rc=1
	else
		restore_one "$c" || rc=1
	fi
done
echo "now:"
status
echo "v2 controllers available: $(cat "$V2/cgroup.controllers")"
exit $rc
