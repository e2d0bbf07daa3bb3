//! The guest kernel: one pinned build of Debian 12's cloud kernel, checked
//! by hash before every boot.
//!
//! `.ci/microvm-kernel.sh` fetches it (`apt-get download` of the pinned
//! package version, the package's own hash checked, the kernel and the six
//! modules below unpacked) into [`default_dir`]. The cloud kernel builds
//! virtio, virtio-mmio, the virtio console and virtiofs as modules, so the
//! guest agent loads them from the initramfs, in [`MODULES`] order (each
//! after what it depends on).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The kernel's release (`uname -r` in the guest).
pub const RELEASE: &str = "6.1.0-57-cloud-amd64";
/// The Debian package it comes from.
pub const PACKAGE: &str = "linux-image-6.1.0-57-cloud-amd64";
/// The package's version.
pub const PACKAGE_VERSION: &str = "6.1.192-3";
/// The package's sha256.
pub const PACKAGE_SHA256: &str = "4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754";

/// The kernel image's file name and sha256.
pub const VMLINUZ: (&str, &str) = (
    "vmlinuz",
    "1a7ac0c40b10b98353b6f85fa9a0d4f2703287979567e19629d35ad2d777d124",
);

/// The modules the guest loads, in load order, with their sha256.
pub const MODULES: [(&str, &str); 6] = [
    (
        "virtio_ring.ko",
        "c526989f66b7104d8bf977edee007cd448e306fd555542faf341fceb5afd58ea",
    ),
    (
        "virtio.ko",
        "ac46fe2edb7f16abc8214bfdca6c6cce1d11604c4583af7d789d99ee5062548f",
    ),
    (
        "virtio_mmio.ko",
        "040200960b8409795ba8545902fe6b69a390427dbf03d1f10d07f65db0d2ee5d",
    ),
    (
        "virtio_console.ko",
        "3f9a6cf1ce2e2950268a203fb73d0ab327e6f35b79eba5837c895d349cd81cbd",
    ),
    (
        "fuse.ko",
        "630b635ee6bb48edc4a405e1588ead01e006f1290ac02abb05543636996b04d2",
    ),
    (
        "virtiofs.ko",
        "d527b8ac72a5494e2c4607b8481663471f4d65f4e2918f5a22b8956cd3c3f8b0",
    ),
];

/// What is wrong with the kernel directory.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not the pinned build.
    #[error("{path} has sha256 {got}, not the pinned {want}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Its hash.
        got: String,
        /// The pinned hash.
        want: &'static str,
    },
}

/// Where `.ci/microvm-kernel.sh` puts the kernel: `$NANOCLAW_MICROVM_KERNEL_DIR`,
/// else `/var/cache/nanoclaw/microvm/<release>`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("NANOCLAW_MICROVM_KERNEL_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => Path::new("/var/cache/nanoclaw/microvm").join(RELEASE),
    }
}

/// The checked kernel: its image's path and the modules' contents.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// (file name, contents), in load order.
    pub modules: Vec<(String, Vec<u8>)>,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn checked(dir: &Path, (name, want): (&str, &'static str)) -> Result<Vec<u8>, KernelError> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(|source| KernelError::Read {
        path: path.clone(),
        source,
    })?;
    let got = sha256_hex(&data);
    if got != want {
        return Err(KernelError::Hash { path, got, want });
    }
    Ok(data)
}

/// The kernel in `dir`, every file checked against its pinned hash.
pub fn locate(dir: &Path) -> Result<Kernel, KernelError> {
    checked(dir, VMLINUZ)?;
    let modules = MODULES
        .iter()
        .map(|m| checked(dir, *m).map(|data| (m.0.to_string(), data)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Kernel {
        vmlinuz: dir.join(VMLINUZ.0),
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fetch script and this module pin the same build.
    #[test]
    fn pinned_hashes_match_the_fetch_script() {
        let script = include_str!("../../../.ci/microvm-kernel.sh");
        assert!(script.contains(&format!("RELEASE={RELEASE}")));
        assert!(script.contains(&format!("VERSION={PACKAGE_VERSION}")));
        assert!(script.contains(&format!("DEB_SHA256={PACKAGE_SHA256}")));
        assert_eq!(PACKAGE, format!("linux-image-{RELEASE}"));
        for (name, sum) in std::iter::once(VMLINUZ).chain(MODULES) {
            assert!(
                script.contains(&format!("{sum}  {name}")),
                "{name} is pinned differently in .ci/microvm-kernel.sh"
            );
        }
    }

    #[test]
    fn a_changed_file_is_refused_by_hash() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("vmlinuz"), b"not a kernel").expect("write");
        let e = locate(&dir).expect_err("a wrong kernel");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.to_string().contains("not the pinned 1a7ac0c4"), "{e}");
    }
}
