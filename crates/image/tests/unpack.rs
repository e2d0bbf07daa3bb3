//! Layer unpacking: overlayfs format per mode, ownership, and refusal of
//! hostile layers (path traversal, symlink escapes, devices).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use nanoclaw_image::{unpack_layer, ImageError, Store, UnpackMode};
use nanoclaw_sandbox::native::ROOTFUL_ID_BASE;

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let cn = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid strings and buffer.
    let n =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn sample() -> Vec<u8> {
    layer(&[
        E::Dir("etc", 0o755),
        E::File("etc/.wh.motd", b"", 0o644),
        E::Dir("opt", 0o750),
        E::File("opt/.wh..wh..opq", b"", 0o644),
        E::File("opt/new", b"new", 0o644),
        E::FileOwned("usr/bin/su", b"suid", 0o4755, 0, 0),
        E::FileOwned("home/u/f", b"x", 0o600, 1000, 1001),
        E::FileOwned("big/uid", b"x", 0o644, 100_000, 100_000),
        E::Hardlink("usr/bin/su2", "usr/bin/su"),
        E::Symlink("abs", "/etc/passwd"),
        E::CharDev("dev/sda", 8, 0),
        E::File("plain/.wh..wh.plnk", b"", 0o644),
    ])
}

#[test]
fn unpack_rootless_format() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("l");
    let rep = unpack_layer(&sample()[..], &dest, UnpackMode::Rootless, "sample").unwrap();
    // Whiteout: char device 0:0 named like the deleted file.
    let wh = std::fs::symlink_metadata(dest.join("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!dest.join("etc/.wh.motd").exists());
    // Opaque dir: user.overlay.opaque=y, and never the trusted one.
    assert_eq!(
        xattr(&dest.join("opt"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&dest.join("opt"), "trusted.overlay.opaque"), None);
    assert!(!dest.join("opt/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::metadata(dest.join("opt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    // setuid kept; hard link shares the inode; symlink kept as is; device skipped.
    let su = std::fs::metadata(dest.join("usr/bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::metadata(dest.join("usr/bin/su2")).unwrap().ino(),
        su.ino()
    );
    assert_eq!(
        std::fs::read_link(dest.join("abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(!dest.join("dev/sda").exists());
    assert!(
        rep.skipped.iter().any(|s| s.contains("dev/sda")),
        "{:?}",
        rep.skipped
    );
    assert!(!dest.join("plain/.wh..wh.plnk").exists());
    // Rootless: everything owned by the caller.
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    assert_eq!(std::fs::metadata(dest.join("home/u/f")).unwrap().uid(), me);
    assert_eq!(rep.whiteouts, 1);
    assert_eq!(rep.opaque_dirs, 1);
    assert_eq!(rep.diff_id, nanoclaw_image::Digest::of(&sample()));
    // Mtimes from the tar, directories included.
    assert_eq!(
        std::fs::metadata(dest.join("opt")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn unpack_rootful_format() {
    if !is_root() {
        eprintln!("SKIP: rootful unpacking needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("l");
    let gz = gzip(&sample());
    let rep = unpack_layer(&gz[..], &dest, UnpackMode::Rootful, "sample").unwrap();
    assert_eq!(rep.compression, "gzip");
    assert_eq!(rep.diff_id, nanoclaw_image::Digest::of(&sample()));
    assert_eq!(rep.blob_digest, nanoclaw_image::Digest::of(&gz));
    // user.* even as root: overlayfs is mounted inside the sandbox's user
    // namespace with `userxattr`, where trusted.* would be ignored.
    assert_eq!(
        xattr(&dest.join("opt"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&dest.join("opt"), "trusted.overlay.opaque"), None);
    let f = std::fs::metadata(dest.join("home/u/f")).unwrap();
    assert_eq!(
        (f.uid(), f.gid()),
        (ROOTFUL_ID_BASE + 1000, ROOTFUL_ID_BASE + 1001)
    );
    let su = std::fs::metadata(dest.join("usr/bin/su")).unwrap();
    assert_eq!(su.uid(), ROOTFUL_ID_BASE);
    assert_eq!(
        su.permissions().mode() & 0o7777,
        0o4755,
        "setuid survives the chown"
    );
    // Implicit parents belong to the image's root too.
    assert_eq!(
        std::fs::metadata(dest.join("home")).unwrap().uid(),
        ROOTFUL_ID_BASE
    );
    // Ids beyond the sandbox's 65536 become its nobody, not another host range.
    assert_eq!(
        std::fs::metadata(dest.join("big/uid")).unwrap().uid(),
        ROOTFUL_ID_BASE + 65534
    );
    assert_eq!(
        std::fs::symlink_metadata(dest.join("abs")).unwrap().uid(),
        ROOTFUL_ID_BASE
    );
}

#[test]
fn unpack_zstd() {
    let tar = sample();
    let out = std::process::Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = out else {
        eprintln!("SKIP: zstd CLI not installed");
        return;
    };
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&tar).unwrap();
    }
    let z = child.wait_with_output().unwrap().stdout;
    let t = tempfile::tempdir().unwrap();
    let rep = unpack_layer(&z[..], &t.path().join("l"), UnpackMode::Rootless, "z").unwrap();
    assert_eq!(rep.compression, "zstd");
    assert_eq!(rep.diff_id, nanoclaw_image::Digest::of(&tar));
    assert_eq!(std::fs::read(t.path().join("l/opt/new")).unwrap(), b"new");
}

fn refused(tar: Vec<u8>, outside: &Path) -> String {
    let t = tempfile::tempdir().unwrap();
    let err =
        unpack_layer(&tar[..], &t.path().join("l"), UnpackMode::Rootless, "evil").unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    assert!(!outside.exists(), "{} was written", outside.display());
    err.to_string()
}

#[test]
fn hostile_layers_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("pwned");
    let rel = format!("../../../../../../..{}", outside.display());
    let msg = refused(
        finish_tar(&[raw_entry_tar(&rel, tar::EntryType::Regular, None, b"x")]),
        &outside,
    );
    assert!(msg.contains(".."), "{msg}");
    let abs = outside.display().to_string();
    let msg = refused(
        finish_tar(&[raw_entry_tar(&abs, tar::EntryType::Regular, None, b"x")]),
        &outside,
    );
    assert!(msg.contains("absolute"), "{msg}");
    // A symlink to outside, then a write through it.
    let msg = refused(
        finish_tar(&[
            raw_entry_tar(
                "esc",
                tar::EntryType::Symlink,
                Some(&t.path().display().to_string()),
                b"",
            ),
            raw_entry_tar("esc/pwned", tar::EntryType::Regular, None, b"x"),
        ]),
        &outside,
    );
    assert!(msg.contains("symlink"), "{msg}");
    // Relative symlink chain: a/b -> ../.., then a/b/... escapes.
    refused(
        finish_tar(&[
            raw_entry_tar("a/", tar::EntryType::Directory, None, b""),
            raw_entry_tar(
                "a/b",
                tar::EntryType::Symlink,
                Some("../../../../../../../.."),
                b"",
            ),
            raw_entry_tar(
                &format!("a/b{}", outside.display()),
                tar::EntryType::Regular,
                None,
                b"x",
            ),
        ]),
        &outside,
    );
    // A hard link to a host file.
    std::fs::write(t.path().join("secret"), b"s").unwrap();
    let msg = refused(
        finish_tar(&[raw_entry_tar(
            "h",
            tar::EntryType::Link,
            Some(&t.path().join("secret").display().to_string()),
            b"",
        )]),
        &outside,
    );
    assert!(msg.contains("hard link"), "{msg}");
    refused(
        finish_tar(&[raw_entry_tar(
            "h",
            tar::EntryType::Link,
            Some("../secret"),
            b"",
        )]),
        &outside,
    );
    // A whiteout of ".." (would delete the parent).
    refused(
        finish_tar(&[raw_entry_tar(
            "x/.wh...",
            tar::EntryType::Regular,
            None,
            b"",
        )]),
        &outside,
    );
}

#[test]
fn hostile_layer_through_the_store_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open_as(t.path().join("store"), UnpackMode::Rootless).unwrap();
    let evil = finish_tar(&[raw_entry_tar(
        "../../escape",
        tar::EntryType::Regular,
        None,
        b"x",
    )]);
    let img = TestImage::new(vec![base_layer(), evil], true, &[], "amd64");
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &[("example.com/evil:1", &img)]);
    let err = store.import(&layout, None).unwrap_err();
    assert!(err.to_string().contains("refusing layer"), "{err}");
    assert_eq!(store_contents(store.root()), Vec::<String>::new());
    assert!(!t.path().join("escape").exists());
}

#[test]
fn add_layer_from_dir_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open_as(t.path().join("store"), UnpackMode::Rootless).unwrap();
    // The parent image.
    let base = TestImage::new(vec![base_layer()], true, &["PATH=/bin"], "amd64");
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &[("example.com/base:1", &base)]);
    store.import(&layout, None).unwrap();
    // An overlay upper dir as the kernel leaves it after a RUN step.
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("opt")).unwrap();
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("opt/fresh"), b"fresh").unwrap();
    std::fs::write(upper.join("etc/a"), b"a").unwrap();
    std::fs::hard_link(upper.join("etc/a"), upper.join("etc/b")).unwrap();
    std::os::unix::fs::symlink("a", upper.join("etc/c")).unwrap();
    let cp = std::ffi::CString::new(upper.join("opt").to_str().unwrap()).unwrap();
    // SAFETY: valid strings.
    let r = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, 0);
    let wh = std::ffi::CString::new(upper.join("etc/motd").to_str().unwrap()).unwrap();
    // SAFETY: valid string; char 0:0 is allowed unprivileged since Linux 5.8.
    let r = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());

    let info = store.add_layer_from_dir(&upper).unwrap();
    assert_eq!(info.blob, info.diff_id, "uncompressed tar blob");
    let blob = std::fs::read(store.blob_path(&info.blob)).unwrap();
    let names: Vec<String> = tar::Archive::new(&blob[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.contains(&"etc/.wh.motd".to_string()), "{names:?}");
    assert!(names.contains(&"opt/.wh..wh..opq".to_string()), "{names:?}");
    // Same tree, same digest.
    assert_eq!(
        store.add_layer_from_dir(&upper).unwrap().diff_id,
        info.diff_id
    );

    let mut cfg = store.resolve("example.com/base:1").unwrap().config;
    cfg.cmd = vec!["/bin/echo".into(), "hi".into()];
    let rec = store
        .commit_image(
            "example.com/built:1",
            Some("example.com/base:1"),
            std::slice::from_ref(&info),
            &cfg,
        )
        .unwrap();
    assert_eq!(rec.layers.len(), 2);
    let root = store.resolve("example.com/built:1").unwrap();
    assert_eq!(root.layers.len(), 2);
    assert_eq!(
        root.layers[0],
        store.resolve("example.com/base:1").unwrap().layers[0]
    );
    assert_eq!(root.config.cmd, vec!["/bin/echo", "hi"]);
    assert_eq!(root.config.env, vec!["PATH=/bin"]);
    let top = &root.layers[1];
    assert!(std::fs::symlink_metadata(top.join("etc/motd"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(
        xattr(&top.join("opt"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        std::fs::metadata(top.join("etc/a")).unwrap().ino(),
        std::fs::metadata(top.join("etc/b")).unwrap().ino()
    );
    // Prune keeps what images use.
    let rep = store.prune().unwrap();
    assert_eq!(rep.layers_removed, 0);
    assert!(store.resolve("example.com/built:1").is_ok());
}

/// Compressed layers are decoded on a second thread: a layer spanning many
/// channel chunks arrives intact with both digests right; a truncated
/// stream and a hostile entry found mid-stream are errors that stop both
/// threads, with nothing written outside.
#[test]
fn compressed_layers_through_the_decoder_thread() {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut entries = vec![E::File("a/big", &big[..], 0o644)];
    let names: Vec<String> = (0..300).map(|i| format!("a/s{i}")).collect();
    for n in &names {
        entries.push(E::File(n, b"small", 0o644));
    }
    let tar = layer(&entries);
    let gz = gzip(&tar);
    let t = tempfile::tempdir().unwrap();
    let rep = unpack_layer(&gz[..], &t.path().join("l"), UnpackMode::Rootless, "big").unwrap();
    assert_eq!(rep.diff_id, nanoclaw_image::Digest::of(&tar));
    assert_eq!(rep.blob_digest, nanoclaw_image::Digest::of(&gz));
    assert_eq!(rep.tar_size, tar.len() as u64);
    assert_eq!(std::fs::read(t.path().join("l/a/big")).unwrap(), big);
    assert_eq!(std::fs::read(t.path().join("l/a/s299")).unwrap(), b"small");

    let cut = &gz[..gz.len() / 2];
    let err = unpack_layer(cut, &t.path().join("cut"), UnpackMode::Rootless, "cut").unwrap_err();
    assert!(err.to_string().contains("layer cut"), "{err}");

    let outside = t.path().join("pwned");
    let evil = finish_tar(&[
        raw_entry_tar("a/big", tar::EntryType::Regular, None, &big),
        raw_entry_tar(
            &format!("../../../../../..{}", outside.display()),
            tar::EntryType::Regular,
            None,
            b"x",
        ),
    ]);
    let err = unpack_layer(
        &gzip(&evil)[..],
        &t.path().join("evil"),
        UnpackMode::Rootless,
        "evil",
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    assert!(!outside.exists());
}
