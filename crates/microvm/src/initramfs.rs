//! The guest's initramfs, built at boot time: an uncompressed `newc` cpio
//! archive (the format the kernel unpacks into its rootfs) holding
//! nanoclaw's own binary as `/init` (the guest agent), the kernel modules
//! it loads, `/dev/console`, the mount points and the merged-`/usr`
//! symlinks (`/bin` → `usr/bin`, …) for the host's `/usr`, which virtiofs
//! shares read-only.

use std::io::{self, Write};

/// One archive entry.
enum Entry<'a> {
    Dir,
    File(&'a [u8], u32),
    Symlink(&'a str),
    CharDev(u32, u32),
}

/// Writes a `newc` archive to `out`, entry by entry.
struct Writer<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Writer<W> {
    fn entry(&mut self, name: &str, entry: Entry<'_>) -> io::Result<()> {
        let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (0o040_755, &[], (0, 0)),
            Entry::File(d, perm) => (0o100_000 | perm, d, (0, 0)),
            Entry::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
            Entry::CharDev(major, minor) => (0o020_600, &[], (major, minor)),
        };
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry over 4 GiB"))?;
        self.ino += 1;
        let namesize = name.len() + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if matches!(mode & 0o170_000, 0o040_000) { 2 } else { 1 },
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    /// Pads to the next multiple of 4 after `n` bytes.
    fn pad(&mut self, n: usize) -> io::Result<()> {
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..(4 - n % 4) % 4])
    }
}

/// The initramfs for an agent binary `init` and `modules` (file name,
/// contents), written to `out`.
pub fn write(out: impl Write, init: &[u8], modules: &[(String, Vec<u8>)]) -> io::Result<()> {
    let mut w = Writer { out, ino: 0 };
    for d in [
        "dev", "proc", "sys", "tmp", "run", "usr", "etc", "mnt", "modules", "root",
    ] {
        w.entry(d, Entry::Dir)?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        w.entry(link, Entry::Symlink(target))?;
    }
    w.entry("dev/console", Entry::CharDev(5, 1))?;
    w.entry(
        "etc/passwd",
        Entry::File(b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
    )?;
    w.entry("etc/group", Entry::File(b"root:x:0:\n", 0o644))?;
    for (name, data) in modules {
        w.entry(&format!("modules/{name}"), Entry::File(data, 0o644))?;
    }
    w.entry("init", Entry::File(init, 0o755))?;
    w.entry("TRAILER!!!", Entry::File(&[], 0))?;
    w.out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive is what `cpio` itself reads back.
    #[test]
    fn cpio_lists_and_extracts_the_archive() {
        let mut buf = Vec::new();
        write(&mut buf, b"#!/bin/sh\n", &[("m.ko".into(), vec![1, 2, 3])]).expect("write");
        assert_eq!(buf.len() % 4, 0);
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            println!("SKIPPED: no cpio here");
            return;
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&buf)
            .expect("feed");
        let out = child.wait_with_output().expect("cpio");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{list}");
        for want in ["init", "modules/m.ko", "dev/console", "bin", "etc/passwd"] {
            assert!(list.lines().any(|l| l == want), "{want} missing: {list}");
        }
    }
}
