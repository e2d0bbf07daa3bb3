//! `image import`: hand-made OCI layouts (directory and tar), the classic
//! `docker save` form, and real `docker save` output when docker runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use nanoclaw_image::{Digest, ImageError, Store, UnpackMode};

fn store(dir: &Path) -> Store {
    Store::open_as(dir.join("store"), UnpackMode::Rootless).unwrap()
}

#[test]
fn oci_layout_directory_and_tar() {
    let t = tempfile::tempdir().unwrap();
    let a = TestImage::new(vec![base_layer()], true, &["X=1"], "amd64");
    let b = TestImage::new(
        vec![base_layer(), layer(&[E::File("b", b"b", 0o644)])],
        false,
        &[],
        "amd64",
    );
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &[("example.com/a:1", &a), ("b", &b)]);
    let s = store(t.path());
    let recs = s.import(&layout, None).unwrap();
    let names: Vec<&str> = recs.iter().map(|r| r.reference.as_str()).collect();
    assert_eq!(names, vec!["example.com/a:1", "docker.io/library/b:latest"]);
    let ra = s.resolve("example.com/a:1").unwrap();
    let rb = s.resolve("b").unwrap();
    assert_eq!(ra.layers[0], rb.layers[0], "shared base layer");
    assert_eq!(ra.config.env, vec!["X=1"]);
    let st = s.stats().unwrap();
    assert_eq!((st.layers_fetched, st.layers_reused), (2, 0));

    // The same layout as a tar, into the same store: nothing new unpacked.
    let tarball = t.path().join("layout.tar");
    tar_dir(&layout, &tarball);
    s.import(&tarball, None).unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.layers_fetched, st.layers_reused), (2, 2));
    assert!(std::fs::read_dir(s.root().join("tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn oci_layout_with_a_corrupt_blob_stores_nothing() {
    let t = tempfile::tempdir().unwrap();
    let a = TestImage::new(
        vec![base_layer(), layer(&[E::File("x", b"x", 0o644)])],
        true,
        &[],
        "amd64",
    );
    let layout = t.path().join("layout");
    write_oci_layout(&layout, &[("example.com/a:1", &a)]);
    // Replace the second layer's bytes with another valid gzip tar.
    let p = layout.join("blobs/sha256").join(digest(&a.blobs[1]).hex());
    std::fs::write(&p, gzip(&layer(&[E::File("y", b"evil", 0o644)]))).unwrap();
    let s = store(t.path());
    let err = s.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_eq!(store_contents(s.root()), Vec::<String>::new());
}

#[test]
fn classic_docker_save_tarball() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("save");
    let l1 = base_layer();
    let l2 = layer(&[E::File("app", b"app", 0o755)]);
    let diff: Vec<Digest> = vec![digest(&l1), digest(&l2)];
    let cfg = config_json(&diff, &["K=V"], &["/app"], "amd64");
    let cfg_name = format!("{}.json", digest(&cfg).hex());
    std::fs::create_dir_all(dir.join("l1")).unwrap();
    std::fs::create_dir_all(dir.join("l2")).unwrap();
    std::fs::write(dir.join("l1/layer.tar"), &l1).unwrap();
    std::fs::write(dir.join("l2/layer.tar"), &l2).unwrap();
    std::fs::write(dir.join(&cfg_name), &cfg).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "RepoTags": ["myapp:1.0", "localhost:5000/myapp:1.0"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}])).unwrap(),
    )
    .unwrap();
    let tarball = t.path().join("save.tar");
    tar_dir(&dir, &tarball);
    let s = store(t.path());
    let recs = s.import(&tarball, None).unwrap();
    assert_eq!(recs.len(), 2);
    let r = s.resolve("myapp:1.0").unwrap();
    assert_eq!(r.config.cmd, vec!["/app"]);
    assert_eq!(
        r.layers,
        s.resolve("localhost:5000/myapp:1.0").unwrap().layers
    );
    assert_eq!(r.id, digest(&cfg));
    assert!(r.layers[1].join("app").is_file());
    // --tag renames; a gzip-compressed save works too.
    let gz = t.path().join("save.tar.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&tarball).unwrap())).unwrap();
    let recs = s.import(&gz, Some("renamed:2")).unwrap();
    assert_eq!(recs[0].reference, "docker.io/library/renamed:2");

    // A layer that does not match the config's diff_id.
    std::fs::write(
        dir.join("l2/layer.tar"),
        layer(&[E::File("app", b"other", 0o755)]),
    )
    .unwrap();
    let s2 = Store::open_as(t.path().join("store2"), UnpackMode::Rootless).unwrap();
    let err = s2.import(&dir, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_eq!(store_contents(s2.root()), Vec::<String>::new());

    // Not an image archive at all.
    let junk = t.path().join("junk.tar");
    std::fs::write(&junk, layer(&[E::File("hello", b"x", 0o644)])).unwrap();
    let err = s2.import(&junk, None).unwrap_err();
    assert!(
        err.to_string().contains("neither a `docker save` tarball"),
        "{err}"
    );
}

#[test]
fn real_docker_save() {
    let docker_ok = std::process::Command::new("docker")
        .args(["image", "inspect", "nanoclaw-bench:latest"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !docker_ok {
        if std::env::var("NANOCLAW_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!(
                "docker with image nanoclaw-bench:latest is required (NANOCLAW_REQUIRE_DOCKER=1)"
            );
        }
        eprintln!("SKIP: no docker daemon or no nanoclaw-bench:latest image");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tarball = t.path().join("bench.tar");
    let st = std::process::Command::new("docker")
        .args([
            "save",
            "-o",
            tarball.to_str().unwrap(),
            "nanoclaw-bench:latest",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let s = store(t.path());
    let recs = s.import(&tarball, None).unwrap();
    assert!(
        recs.iter()
            .any(|r| r.reference == "docker.io/library/nanoclaw-bench:latest"),
        "{recs:?}"
    );
    let root = s.resolve("nanoclaw-bench").unwrap();
    assert!(!root.layers.is_empty());
    // The id docker shows is the config digest.
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", "nanoclaw-bench:latest"])
        .output()
        .unwrap();
    let docker_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ours = root.id.to_string();
    // With the containerd store docker shows the manifest digest instead.
    let rec = s.record("nanoclaw-bench").unwrap();
    assert!(
        docker_id == ours
            || docker_id == rec.manifest_digest.to_string()
            || !docker_id.starts_with("sha256:"),
        "{docker_id} vs {ours}"
    );
    // Something runnable is in there.
    let has_sh = root.layers.iter().any(|l| {
        l.join("bin/sh").symlink_metadata().is_ok()
            || l.join("usr/bin/sh").symlink_metadata().is_ok()
    });
    assert!(has_sh, "no /bin/sh in {:?}", root.layers);
    // Importing twice reuses every layer.
    let before = s.stats().unwrap();
    s.import(&tarball, None).unwrap();
    let after = s.stats().unwrap();
    assert_eq!(after.layers_fetched, before.layers_fetched);
    assert_eq!(
        after.layers_reused - before.layers_reused,
        root.layers.len() as u64
    );
}
