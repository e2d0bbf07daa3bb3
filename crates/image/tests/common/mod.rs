//! Test fixtures: layer tars built from files, a real local registry
//! (Debian's docker-registry on 127.0.0.1), a push helper speaking the
//! registry API, and a scriptable fake registry for failure cases.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_image::Digest;

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One entry of a test layer.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    FileOwned(&'a str, &'a [u8], u32, u64, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    CharDev(&'a str, u32, u32),
}

/// A tar from entries (ustar/GNU, as docker writes them).
pub fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::FileOwned(p, data, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::CharDev(p, maj, min) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A tar entry with a raw (possibly hostile) name, bypassing the tar crate's checks.
pub fn raw_entry_tar(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Concatenate raw tar pieces and add the end-of-archive marker.
pub fn finish_tar(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = pieces.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn digest(data: &[u8]) -> Digest {
    Digest::of(data)
}

/// An OCI image config over `diff_ids`.
pub fn config_json(diff_ids: &[Digest], env: &[&str], cmd: &[&str], arch: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Env": env, "Cmd": cmd, "WorkingDir": "/work", "User": "1000:1000" },
        "rootfs": { "type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>() },
    }))
    .unwrap()
}

pub fn manifest_json(config: &[u8], blobs: &[Vec<u8>]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config).to_string(), "size": config.len() },
        "layers": blobs.iter().map(|b| serde_json::json!({
            "mediaType": if b.starts_with(&[0x1f, 0x8b]) { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" },
            "digest": digest(b).to_string(), "size": b.len() })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// A test image: layer tars (uncompressed), the blobs as pushed, config, manifest.
pub struct TestImage {
    pub tars: Vec<Vec<u8>>,
    pub blobs: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl TestImage {
    pub fn new(tars: Vec<Vec<u8>>, compress: bool, env: &[&str], arch: &str) -> TestImage {
        let diff_ids: Vec<Digest> = tars.iter().map(|t| digest(t)).collect();
        let blobs: Vec<Vec<u8>> = tars
            .iter()
            .map(|t| if compress { gzip(t) } else { t.clone() })
            .collect();
        let config = config_json(&diff_ids, env, &["/bin/sh"], arch);
        let manifest = manifest_json(&config, &blobs);
        TestImage {
            tars,
            blobs,
            config,
            manifest,
        }
    }
    pub fn manifest_digest(&self) -> Digest {
        digest(&self.manifest)
    }
}

/// The base layer: a static busybox (when Debian's busybox-static is
/// installed) or a small script, plus /etc files.
pub fn base_layer() -> Vec<u8> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .next()
        .unwrap_or_else(|| b"#!/bin/sh\necho no busybox\n".to_vec());
    layer(&[
        E::Dir("bin", 0o755),
        E::File("bin/busybox", &busybox, 0o755),
        E::Symlink("bin/sh", "busybox"),
        E::Dir("etc", 0o755),
        E::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        E::File("etc/motd", b"hello\n", 0o644),
        E::Dir("opt", 0o755),
        E::Dir("opt/old", 0o755),
        E::File("opt/old/file", b"old", 0o644),
    ])
}

/// Write an OCI image layout for `images` (name → image) into `dir`.
pub fn write_oci_layout(dir: &Path, images: &[(&str, &TestImage)]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut manifests = Vec::new();
    for (name, img) in images {
        for b in img.blobs.iter().chain([&img.config, &img.manifest]) {
            std::fs::write(dir.join("blobs/sha256").join(digest(b).hex()), b).unwrap();
        }
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest().to_string(),
            "size": img.manifest.len(),
            "annotations": { "io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest" }
        }));
    }
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})).unwrap(),
    )
    .unwrap();
}

/// Tar a directory (for "OCI layout as a tar" and docker-save tarballs).
pub fn tar_dir(dir: &Path, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Everything (relative paths) under the store's content folders.
pub fn store_contents(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs/sha256", "layers", "images", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(root.join(sub)) {
            for e in rd.flatten() {
                out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// --- the real registry -------------------------------------------------------

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A docker-registry process on 127.0.0.1; killed on drop.
pub struct Registry {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub auth: Option<(String, String)>,
}

/// None (and a printed reason) when the registry binary is missing and
/// NANOCLAW_REQUIRE_REGISTRY is not 1.
pub fn registry(htpasswd: Option<(&str, &str)>) -> Option<Registry> {
    if !Path::new(REGISTRY_BIN).exists() {
        if std::env::var("NANOCLAW_REQUIRE_REGISTRY").as_deref() == Ok("1") {
            panic!("{REGISTRY_BIN} is missing (apt-get install docker-registry) and NANOCLAW_REQUIRE_REGISTRY=1");
        }
        eprintln!("SKIP: {REGISTRY_BIN} not installed (Debian package docker-registry); set NANOCLAW_REQUIRE_REGISTRY=1 to fail instead");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut auth_cfg = String::new();
    if let Some((u, p)) = htpasswd {
        let out = Command::new("htpasswd")
            .args(["-Bbn", u, p])
            .output()
            .expect("htpasswd (apache2-utils) is needed for the basic-auth test");
        assert!(out.status.success());
        std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
        auth_cfg = format!(
            "auth:\n  htpasswd:\n    realm: nanoclaw-test\n    path: {}\n",
            dir.path().join("htpasswd").display()
        );
    }
    let cfg = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_cfg}",
        dir.path().join("data").display()
    );
    std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reg = Registry {
        child,
        port,
        dir,
        auth: htpasswd.map(|(u, p)| (u.to_string(), p.to_string())),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(reg)
}

impl Registry {
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn req(&self, method: &str, url: &str) -> ureq::Request {
        let r = ureq::request(method, url);
        match &self.auth {
            Some((u, p)) => {
                use base64::Engine as _;
                r.set(
                    "Authorization",
                    &format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                    ),
                )
            }
            None => r,
        }
    }

    pub fn push_blob(&self, repo: &str, data: &[u8]) {
        let base = format!("http://{}", self.host());
        let resp = self
            .req("POST", &format!("{base}/v2/{repo}/blobs/uploads/"))
            .call()
            .unwrap();
        let loc = resp.header("location").unwrap().to_string();
        let loc = if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.req("PUT", &format!("{loc}{sep}digest={}", digest(data)))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .unwrap();
    }

    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, data: &[u8]) {
        self.req(
            "PUT",
            &format!("http://{}/v2/{repo}/manifests/{reference}", self.host()),
        )
        .set("Content-Type", media_type)
        .send_bytes(data)
        .unwrap();
    }

    pub fn push(&self, repo: &str, tag: &str, img: &TestImage) {
        for b in &img.blobs {
            self.push_blob(repo, b);
        }
        self.push_blob(repo, &img.config);
        self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &img.manifest,
        );
    }

    /// The registry's file for a blob (to corrupt it).
    pub fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- a fake registry for failure cases ---------------------------------------

/// What the fake answers for one request.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send only this many body bytes, then close (a registry dying mid-transfer).
    pub cut_after: Option<usize>,
}

impl Reply {
    pub fn ok(body: Vec<u8>, ct: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), ct.into())],
            body,
            cut_after: None,
        }
    }
    pub fn status(status: u16, headers: &[(&str, &str)]) -> Reply {
        Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
            cut_after: None,
        }
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers with `handler(method,
/// path_and_query, headers)`; one thread per connection.
pub struct Fake {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

pub type Handler = dyn Fn(&str, &str, &[(String, String)]) -> Reply + Send + Sync;

impl Fake {
    pub fn start(handler: Arc<Handler>) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let h = handler.clone();
                        std::thread::spawn(move || serve(s, &*h));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Fake { port, stop }
    }
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(s: TcpStream, h: &Handler) {
    s.set_nonblocking(false).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                return;
            }
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse().unwrap_or(0);
                }
                headers.push((k, v.trim().to_string()));
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        let reply = h(&method, &path, &headers);
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        let n = reply
            .cut_after
            .unwrap_or(reply.body.len())
            .min(reply.body.len());
        if w.write_all(&reply.body[..n]).is_err() {
            return;
        }
        if reply.cut_after.is_some() {
            let _ = w.flush();
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// A fake registry serving `images` (repo → image) with optional bearer auth.
pub fn fake_registry(
    images: Vec<(String, TestImage)>,
    token: Option<&'static str>,
    tamper: impl Fn(&str, &mut Reply) + Send + Sync + 'static,
) -> Fake {
    let images = Arc::new(images);
    let port_cell: Arc<std::sync::OnceLock<u16>> = Arc::new(std::sync::OnceLock::new());
    let pc = port_cell.clone();
    let fake = Fake::start(Arc::new(
        move |_m: &str, path: &str, headers: &[(String, String)]| {
            let port = *pc.get().unwrap();
            if let Some(q) = path.strip_prefix("/token?") {
                assert!(
                    q.contains("scope=repository"),
                    "token request without scope: {q}"
                );
                let body = format!("{{\"token\":\"{}\"}}", token.unwrap_or(""));
                return Reply::ok(body.into_bytes(), "application/json");
            }
            if let Some(t) = token {
                let ok = headers
                    .iter()
                    .any(|(k, v)| k == "authorization" && v == &format!("Bearer {t}"));
                if !ok {
                    let ch = format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:x:pull\"");
                    return Reply::status(401, &[("WWW-Authenticate", &ch)]);
                }
            }
            for (repo, img) in images.iter() {
                let prefix = format!("/v2/{repo}/");
                let Some(rest) = path.strip_prefix(&prefix) else {
                    continue;
                };
                let mut reply = if let Some(r) = rest.strip_prefix("manifests/") {
                    if r == "latest" || r == img.manifest_digest().to_string() {
                        let mut rep = Reply::ok(
                            img.manifest.clone(),
                            "application/vnd.oci.image.manifest.v1+json",
                        );
                        rep.headers.push((
                            "Docker-Content-Digest".into(),
                            img.manifest_digest().to_string(),
                        ));
                        rep
                    } else {
                        Reply::status(404, &[])
                    }
                } else if let Some(d) = rest.strip_prefix("blobs/") {
                    match img
                        .blobs
                        .iter()
                        .chain([&img.config])
                        .find(|b| digest(b).to_string() == d)
                    {
                        Some(b) => Reply::ok(b.clone(), "application/octet-stream"),
                        None => Reply::status(404, &[]),
                    }
                } else {
                    Reply::status(404, &[])
                };
                tamper(rest, &mut reply);
                return reply;
            }
            Reply::status(404, &[])
        },
    ));
    port_cell.set(fake.port).unwrap();
    fake
}
