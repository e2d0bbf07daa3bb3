#!/bin/sh
# Fetches the micro-VM backend's guest kernel: Debian 12's cloud kernel, one
# pinned build, checked by hash, unpacked into nanoclaw's cache (the kernel
# and the six modules the guest agent loads: virtio over MMIO, the virtio
# console for the control channel, FUSE and virtiofs for the shared /usr and
# mounts). nanoclaw checks the same hashes (crates/microvm/src/kernel.rs)
# before every boot.
#
#   .ci/microvm-kernel.sh [DIR]     default DIR: /var/cache/nanoclaw/microvm/6.1.0-57-cloud-amd64
#
# Moving to another build: change PKG, VERSION and every hash here and in
# kernel.rs together (the test `pinned_hashes_match_the_fetch_script` checks
# they agree).
set -eu
RELEASE=6.1.0-57-cloud-amd64
PKG=linux-image-$RELEASE
VERSION=6.1.192-3
DEB_SHA256=4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754
POOL=http://deb.debian.org/debian-security/pool/updates/main/l/linux-signed-amd64
dir=${1:-/var/cache/nanoclaw/microvm/$RELEASE}

sums() {
	cat <<SUMS
1a7ac0c40b10b98353b6f85fa9a0d4f2703287979567e19629d35ad2d777d124  vmlinuz
c526989f66b7104d8bf977edee007cd448e306fd555542faf341fceb5afd58ea  virtio_ring.ko
ac46fe2edb7f16abc8214bfdca6c6cce1d11604c4583af7d789d99ee5062548f  virtio.ko
040200960b8409795ba8545902fe6b69a390427dbf03d1f10d07f65db0d2ee5d  virtio_mmio.ko
3f9a6cf1ce2e2950268a203fb73d0ab327e6f35b79eba5837c895d349cd81cbd  virtio_console.ko
630b635ee6bb48edc4a405e1588ead01e006f1290ac02abb05543636996b04d2  fuse.ko
d527b8ac72a5494e2c4607b8481663471f4d65f4e2918f5a22b8956cd3c3f8b0  virtiofs.ko
SUMS
}

if [ -d "$dir" ] && (cd "$dir" && sums | sha256sum -c --quiet >/dev/null 2>&1); then
	echo "microvm-kernel: $PKG $VERSION already in $dir"
	exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
deb="$tmp/${PKG}_${VERSION}_amd64.deb"
# apt first (the machine's mirror and proxy); the pool URL when the index no
# longer lists this build.
(cd "$tmp" && apt-get download -qq "$PKG=$VERSION" >/dev/null 2>&1) ||
	curl -fsSL -o "$deb" "$POOL/${PKG}_${VERSION}_amd64.deb" ||
	{ echo "microvm-kernel: cannot download $PKG=$VERSION (apt-get update first, or check the network)"; exit 1; }
echo "$DEB_SHA256  $deb" | sha256sum -c --quiet || { echo "microvm-kernel: $deb has the wrong sha256"; exit 1; }
dpkg-deb -x "$deb" "$tmp/x"
m="$tmp/x/lib/modules/$RELEASE/kernel"
mkdir -p "$dir.new"
cp "$tmp/x/boot/vmlinuz-$RELEASE" "$dir.new/vmlinuz"
cp "$m/drivers/virtio/virtio_ring.ko" "$m/drivers/virtio/virtio.ko" "$m/drivers/virtio/virtio_mmio.ko" \
	"$m/drivers/char/virtio_console.ko" "$m/fs/fuse/fuse.ko" "$m/fs/fuse/virtiofs.ko" "$dir.new/"
(cd "$dir.new" && sums | sha256sum -c --quiet) || { echo "microvm-kernel: unpacked files have the wrong sha256"; exit 1; }
chmod 755 "$dir.new" && chmod 644 "$dir.new"/*
rm -rf "$dir" && mv "$dir.new" "$dir"
echo "microvm-kernel: $PKG $VERSION in $dir"
