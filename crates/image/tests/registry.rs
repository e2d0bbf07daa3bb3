//! Pull from a real local registry (Debian's docker-registry on 127.0.0.1)
//! and from a scripted fake one for auth and failure cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use nanoclaw_image::{ImageError, Platform, PullOptions, Store, UnpackMode};

fn opts() -> PullOptions {
    PullOptions {
        insecure: true,
        progress: false,
        ..Default::default()
    }
}

fn store(dir: &Path) -> Store {
    Store::open_as(dir.join("store"), UnpackMode::Rootless).unwrap()
}

fn app_layer(name: &str) -> Vec<u8> {
    let body = format!("app {name}\n");
    layer(&[
        E::Dir("etc", 0o755),
        E::File("etc/.wh.motd", b"", 0o644),
        E::Dir("opt", 0o755),
        E::File("opt/.wh..wh..opq", b"", 0o644),
        E::File(
            Box::leak(format!("opt/{name}").into_boxed_str()),
            Box::leak(body.into_boxed_str()).as_bytes(),
            0o644,
        ),
    ])
}

#[test]
fn pull_share_and_second_pull_downloads_nothing() {
    let Some(reg) = registry(None) else { return };
    let base = base_layer();
    let a = TestImage::new(
        vec![base.clone(), app_layer("a")],
        true,
        &["A=1", "PATH=/bin"],
        "amd64",
    );
    let b = TestImage::new(vec![base.clone(), app_layer("b")], true, &["B=1"], "amd64");
    reg.push("team/a", "v1", &a);
    reg.push("team/b", "latest", &b);
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());

    // Not local yet: resolve says how to get it.
    let host = reg.host();
    let err = s.resolve(&format!("{host}/team/a:v1")).unwrap_err();
    assert!(err.to_string().contains("nanoclaw image pull"), "{err}");

    let rec = s.pull(&format!("{host}/team/a:v1"), &opts()).unwrap();
    assert_eq!(rec.manifest_digest, a.manifest_digest());
    assert_eq!(rec.reference, format!("{host}/team/a:v1"));
    let st = s.stats().unwrap();
    assert_eq!((st.layers_fetched, st.layers_reused), (2, 0));

    let root = s.resolve(&format!("{host}/team/a:v1")).unwrap();
    assert_eq!(root.layers.len(), 2);
    assert!(root.rootless_xattrs);
    assert_eq!(root.config.env, vec!["A=1", "PATH=/bin"]);
    assert_eq!(root.config.cmd, vec!["/bin/sh"]);
    assert_eq!(root.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(root.config.user.as_deref(), Some("1000:1000"));
    assert!(root.layers[0].join("bin/busybox").is_file());
    assert!(root.layers[1].join("opt/a").is_file());
    // Blobs verified and kept.
    for bl in &a.blobs {
        assert!(s.has_blob(&digest(bl)));
    }

    // A second image shares the base layer: one download.
    s.pull(&format!("{host}/team/b"), &opts()).unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.layers_fetched, st.layers_reused), (3, 1));
    let rb = s.resolve(&format!("{host}/team/b:latest")).unwrap();
    assert_eq!(
        rb.layers[0], root.layers[0],
        "the base layer is shared, unpacked once"
    );

    // The same image again: no layer download at all. Stop the registry's
    // blob endpoint from mattering by checking the counters.
    s.pull(&format!("{host}/team/a:v1"), &opts()).unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.layers_fetched, st.layers_reused), (3, 3));
    assert_eq!(st.images, 2);
    assert_eq!(st.layers, 3);

    // Pull by digest.
    let by_digest = format!("{host}/team/a@{}", a.manifest_digest());
    let rec = s.pull(&by_digest, &opts()).unwrap();
    assert_eq!(rec.reference, by_digest);
    assert!(s.resolve(&by_digest).is_ok());
    // By image id prefix.
    let id = digest(&a.config).hex()[..12].to_string();
    assert_eq!(s.resolve(&id).unwrap().layers, root.layers);

    // rm keeps shared layers; prune removes only what nothing uses.
    s.remove(&format!("{host}/team/b:latest")).unwrap();
    let rep = s.prune().unwrap();
    assert_eq!(rep.layers_removed, 1, "only b's own layer");
    assert!(s.resolve(&format!("{host}/team/a:v1")).is_ok());
    assert!(s.resolve(&format!("{host}/team/b")).is_err());
}

#[test]
fn manifest_list_platform_selection() {
    let Some(reg) = registry(None) else { return };
    let amd = TestImage::new(vec![app_layer("amd")], true, &["ARCH=amd64"], "amd64");
    let arm = TestImage::new(vec![app_layer("arm")], true, &["ARCH=arm64"], "arm64");
    reg.push("multi", "amd", &amd);
    reg.push("multi", "arm", &arm);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm.manifest_digest().to_string(), "size": arm.manifest.len(), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd.manifest_digest().to_string(), "size": amd.manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }))
    .unwrap();
    reg.push_manifest(
        "multi",
        "latest",
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let r = format!("{}/multi", reg.host());
    let mut o = opts();
    o.platform = Some(Platform::parse("linux/arm64").unwrap());
    let rec = s.pull(&r, &o).unwrap();
    assert_eq!(rec.manifest_digest, arm.manifest_digest());
    assert_eq!(s.resolve(&r).unwrap().config.env, vec!["ARCH=arm64"]);
    o.platform = Some(Platform::parse("linux/amd64").unwrap());
    s.pull(&r, &o).unwrap();
    assert_eq!(s.resolve(&r).unwrap().config.env, vec!["ARCH=amd64"]);
    o.platform = Some(Platform::parse("linux/riscv64").unwrap());
    let err = s.pull(&r, &o).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
}

#[test]
fn basic_auth_with_docker_config() {
    let Some(reg) = registry(Some(("alice", "pw-123"))) else {
        return;
    };
    let img = TestImage::new(vec![app_layer("secret")], true, &[], "amd64");
    reg.push("private/x", "1", &img);
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let r = format!("{}/private/x:1", reg.host());
    let mut o = opts();
    o.docker_config = Some(t.path().join("none.json"));
    let err = s.pull(&r, &o).unwrap_err();
    assert!(err.to_string().contains("docker login"), "{err}");
    use base64::Engine as _;
    let cfg = t.path().join("config.json");
    let bad = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{}":{{"auth":"{bad}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    o.docker_config = Some(cfg.clone());
    let err = s.pull(&r, &o).unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let good = base64::engine::general_purpose::STANDARD.encode("alice:pw-123");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{good}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    s.pull(&r, &o).unwrap();
    assert!(s.resolve(&r).is_ok());
}

#[test]
fn https_is_the_default_even_for_localhost() {
    let Some(reg) = registry(None) else { return };
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let mut o = opts();
    o.insecure = false;
    let err = s.pull(&format!("{}/x", reg.host()), &o).unwrap_err();
    let m = err.to_string();
    eprintln!("https: {m}");
    assert!(m.contains("--insecure") && m.contains("localhost"), "{m}");
}

#[test]
fn corrupted_blob_in_registry_stores_nothing() {
    let Some(reg) = registry(None) else { return };
    let img = TestImage::new(vec![base_layer(), app_layer("c")], true, &[], "amd64");
    reg.push("corrupt", "1", &img);
    // Flip a byte of the second layer's blob in the registry's storage.
    let f = reg.blob_file(&digest(&img.blobs[1]));
    let mut data = std::fs::read(&f).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&f, data).unwrap();
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let err = s
        .pull(&format!("{}/corrupt:1", reg.host()), &opts())
        .unwrap_err();
    eprintln!("corrupted blob: {err}");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("nothing was stored"), "{err}");
    assert_eq!(
        store_contents(s.root()),
        Vec::<String>::new(),
        "the good layer is not kept either"
    );
    assert_eq!(s.stats().unwrap().layers_fetched, 0);
}

#[test]
fn registry_killed_mid_pull_leaves_nothing() {
    // The real registry, killed while serving: a 24 MB random layer and a
    // registry process that is SIGKILLed as soon as the download starts.
    let Some(mut reg) = registry(None) else {
        return;
    };
    let mut big = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let img = TestImage::new(
        vec![layer(&[E::File("big", &big, 0o644)])],
        false,
        &[],
        "amd64",
    );
    reg.push("big", "1", &img);
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let pid = reg.child.id() as i32;
    let root = s.root().to_path_buf();
    // Kill the registry once the download has begun writing into staging.
    let killer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let started = std::fs::read_dir(root.join("tmp"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|d| {
                    std::fs::read_dir(d.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|f| f.file_name().to_string_lossy().contains("download"))
                });
            if started {
                // SAFETY: pid is our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return true;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        false
    });
    let res = s.pull(&format!("{}/big:1", reg.host()), &opts());
    let killed = killer.join().unwrap();
    let _ = reg.child.wait();
    if res.is_ok() {
        // Loopback was faster than the killer; the fake-registry test below
        // covers the cut deterministically.
        eprintln!("NOTE: the pull finished before the registry was killed (killed={killed})");
        return;
    }
    let err = res.unwrap_err();
    eprintln!("registry killed mid-pull: {err}");
    assert!(matches!(err, ImageError::Registry { .. }), "{err}");
    assert_eq!(store_contents(s.root()), Vec::<String>::new(), "{err}");
}

#[test]
fn transfer_cut_short_leaves_nothing() {
    let img = TestImage::new(vec![base_layer(), app_layer("cut")], true, &[], "amd64");
    let cut = digest(&img.blobs[0]).to_string();
    let fake = fake_registry(vec![("cut".into(), img)], None, move |rest, reply| {
        if rest == format!("blobs/{cut}") {
            reply.cut_after = Some(reply.body.len() / 3);
        }
    });
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let err = s
        .pull(&format!("{}/cut", fake.host()), &opts())
        .unwrap_err();
    let m = err.to_string();
    assert!(m.contains("broke off") || m.contains("ended after"), "{m}");
    assert_eq!(store_contents(s.root()), Vec::<String>::new());
}

#[test]
fn wrong_digests_are_refused() {
    // A manifest whose bytes do not match the digest pulled.
    let img = TestImage::new(vec![app_layer("w")], true, &[], "amd64");
    let want = img.manifest_digest();
    let fake = fake_registry(vec![("w".into(), img)], None, |rest, reply| {
        if rest.starts_with("manifests/") {
            reply.body.push(b' '); // tampered in transit
        }
    });
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let err = s
        .pull(&format!("{}/w@{want}", fake.host()), &opts())
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    // By tag: the Docker-Content-Digest header no longer matches either.
    let err = s.pull(&format!("{}/w", fake.host()), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    // A layer blob replaced by other (valid gzip) content.
    let img = TestImage::new(vec![app_layer("x")], true, &[], "amd64");
    let other = gzip(&app_layer("y"));
    let fake = fake_registry(vec![("x".into(), img)], None, move |rest, reply| {
        if rest.starts_with("blobs/") && reply.body.starts_with(&[0x1f, 0x8b]) {
            let mut o = other.clone();
            o.truncate(reply.body.len());
            reply.body = o;
        }
    });
    let err = s.pull(&format!("{}/x", fake.host()), &opts()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_eq!(store_contents(s.root()), Vec::<String>::new());
}

#[test]
fn bearer_token_auth() {
    let img = TestImage::new(vec![app_layer("tok")], true, &["T=1"], "amd64");
    let fake = fake_registry(vec![("org/tok".into(), img)], Some("tkn-42"), |_, _| {});
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let rec = s
        .pull(&format!("{}/org/tok", fake.host()), &opts())
        .unwrap();
    assert_eq!(rec.config.env, vec!["T=1"]);
}

#[test]
fn stale_staging_of_a_killed_process_is_cleaned() {
    let img = TestImage::new(vec![app_layer("s")], true, &[], "amd64");
    let fake = fake_registry(vec![("s".into(), img)], None, |_, _| {});
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    // What a SIGKILLed pull leaves: a staging folder named after a dead pid.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = s.root().join(format!("tmp/{dead}-0-0"));
    std::fs::create_dir_all(stale.join("1-layer/usr")).unwrap();
    s.pull(&format!("{}/s", fake.host()), &opts()).unwrap();
    assert!(!stale.exists());
    assert!(std::fs::read_dir(s.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn concurrent_pulls_of_the_same_image() {
    let Some(reg) = registry(None) else { return };
    let img = TestImage::new(vec![base_layer(), app_layer("cc")], true, &[], "amd64");
    reg.push("cc", "1", &img);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("store");
    Store::open_as(&dir, UnpackMode::Rootless).unwrap();
    let r = Arc::new(format!("{}/cc:1", reg.host()));
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            let r = r.clone();
            std::thread::spawn(move || Store::open(&dir).unwrap().pull(&r, &opts()).map(|_| ()))
        })
        .collect();
    for h in hs {
        h.join().unwrap().unwrap();
    }
    let s = Store::open(&dir).unwrap();
    assert_eq!(s.resolve(&r).unwrap().layers.len(), 2);
    assert_eq!(s.stats().unwrap().layers, 2);
    assert!(std::fs::read_dir(s.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn disk_full_store_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIP: mounting a small tmpfs needs root");
        return;
    }
    let img = TestImage::new(
        vec![
            base_layer(),
            layer(&[E::File("fill", &vec![7u8; 3 << 20], 0o644)]),
        ],
        false,
        &[],
        "amd64",
    );
    let fake = fake_registry(vec![("full".into(), img)], None, |_, _| {});
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    // A 4 MiB tmpfs: the base layer fits, the 3 MiB blob plus its unpacked copy do not.
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "nanoclaw-test",
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let s = Store::open_as(&mnt, UnpackMode::Rootless).unwrap();
    let err = s
        .pull(&format!("{}/full", fake.host()), &opts())
        .unwrap_err();
    eprintln!("disk full: {err}");
    assert!(matches!(err, ImageError::DiskFull(..)), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(store_contents(s.root()), Vec::<String>::new());
}
