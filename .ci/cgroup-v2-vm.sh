#!/bin/sh
# Runs the engine's cgroup tests on a pure cgroup v2 host: a throwaway VM
# (qemu, software emulation) booting Debian's cloud kernel with an initramfs
# that holds busybox and the sandbox crate's test binary. This is how CI
# exercises the v2 code paths (memory, pids, cpu, and a delegated rootless
# subtree) on a machine whose own controllers are on cgroup v1.
#
#   .ci/cgroup-v2-vm.sh            (as root; installs what it needs)
#
# Exit 0 only when both test runs inside the VM reported exit 0.
set -eu
cd "$(dirname "$(readlink -f "$0")")/.."
work=${CARGO_TARGET_DIR:-$PWD/target}/cgroup-v2-vm
mkdir -p "$work"

if ! command -v qemu-system-x86_64 >/dev/null || ! [ -x /bin/busybox ] || ! command -v cpio >/dev/null; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 busybox-static cpio >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; exit 1; }
fi

# Debian's cloud kernel (cgroup v2 only when booted with the unified hierarchy).
kernel=$(ls "$work"/k/boot/vmlinuz-* 2>/dev/null | head -1 || true)
if [ -z "$kernel" ]; then
	pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)
	[ -n "$pkg" ] || { echo "cgroup-v2-vm: cannot resolve linux-image-cloud-amd64 (apt-get update first)"; exit 1; }
	(cd "$work" && apt-get download -qq "$pkg")
	dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
	kernel=$(ls "$work"/k/boot/vmlinuz-* | head -1)
fi

# The sandbox crate's unit-test binary.
bin=$(cargo test -p nanoclaw-sandbox --release --lib --no-run --message-format=json 2>/dev/null |
	sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "cgroup-v2-vm: could not build the sandbox test binary"; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"
mkdir -p "$root"/bin "$root"/proc "$root"/sys "$root"/dev "$root"/tmp "$root"/etc
cp /bin/busybox "$root"/bin/busybox
cp "$bin" "$root"/t
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done
cat >"$root"/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "kernel $(uname -r); cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
NANOCLAW_EXPECT_CGROUP_V2=memory,pids,cpu /t --test-threads=2 --nocapture native::cgroup
echo "NANOCLAW-TESTS-EXIT=$?"
# Rootless with a delegated v2 subtree (what systemd does for user@UID.service).
mkdir -p /sys/fs/cgroup/deleg/self
echo "+memory +pids +cpu" >/sys/fs/cgroup/cgroup.subtree_control
echo "+memory +pids +cpu" >/sys/fs/cgroup/deleg/cgroup.subtree_control
chown -R 65534:65534 /sys/fs/cgroup/deleg
echo $$ >/sys/fs/cgroup/deleg/self/cgroup.procs
NANOCLAW_TEST_CGROUP_DELEGATED=1 /t --exact native::cgroup::tests::rootless_without_delegation_is_explained --nocapture
echo "NANOCLAW-DELEGATED-EXIT=$?"
poweroff -f
INIT
chmod +x "$root"/init
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

log="$work/vm.log"
timeout 600 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
	-kernel "$kernel" -initrd "$work/initrd.gz" -nographic -no-reboot \
	-append "console=ttyS0 panic=-1 quiet systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all" \
	</dev/null >"$log" 2>&1 || true
grep -E "^kernel |test result|NANOCLAW-" "$log" || true
grep -q "NANOCLAW-TESTS-EXIT=0" "$log" && grep -q "NANOCLAW-DELEGATED-EXIT=0" "$log" || {
	echo "cgroup-v2-vm: the cgroup tests failed on cgroup v2 (full console log: $log)"
	tail -40 "$log"
	exit 1
}
echo "cgroup-v2-vm: cgroup tests passed on a pure cgroup v2 kernel"
