//! Pulling from an OCI / Docker registry (distribution API v2): manifest
//! lists and OCI indexes with platform selection, bearer-token and basic
//! auth (credentials from the Docker config file), digest verification of
//! every byte, bounded parallel layer downloads, HTTPS unless `--insecure`.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;

use crate::digest::Hasher;
use crate::oci::{
    ConfigFile, Descriptor, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::progress::Progress;
use crate::store::{ImageRecord, LayerInfo, Txn};
use crate::{Digest, ImageError, Platform, Reference, Store};

/// Options for [`Store::pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Talk plain HTTP (never chosen automatically, not even for localhost).
    pub insecure: bool,
    /// The platform to pick from a manifest list (default: this host's).
    pub platform: Option<Platform>,
    /// Draw a progress bar on stderr (only if stderr is a terminal).
    pub progress: bool,
    /// At most this many layer downloads at once (at least 1).
    pub parallel: usize,
    /// The Docker config file with credentials (default
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure: false,
            platform: None,
            progress: true,
            parallel: 3,
            docker_config: None,
        }
    }
}

const MAX_DOC: u64 = 16 << 20;

struct Client {
    agent: ureq::Agent,
    base: String,
    registry: String,
    repository: String,
    creds: Option<(String, String)>,
    auth: Mutex<Option<String>>,
    insecure: bool,
    local: bool,
}

fn docker_config_path(opts: &PullOptions) -> Option<PathBuf> {
    if let Some(p) = &opts.docker_config {
        return Some(p.clone());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// user:password for `registry` from a Docker config file's `auths`.
fn credentials(opts: &PullOptions, registry: &str) -> Option<(String, String)> {
    let text = std::fs::read(docker_config_path(opts)?).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let keys: Vec<String> = if registry == "docker.io" {
        [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    } else {
        vec![registry.to_string()]
    };
    for (k, entry) in auths {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        if !keys.iter().any(|want| want == k || want == host) {
            continue;
        }
        if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()?;
            let s = String::from_utf8(raw).ok()?;
            let (u, p) = s.split_once(':')?;
            return Some((u.to_string(), p.to_string()));
        }
        if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|u| u.as_str()),
            entry.get("password").and_then(|p| p.as_str()),
        ) {
            return Some((u.to_string(), p.to_string()));
        }
    }
    None
}

/// Parse `Bearer realm="…",service="…",scope="…"` into (scheme, params).
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(k, val.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl Client {
    fn new(r: &Reference, opts: &PullOptions) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("nanoclaw/", env!("CARGO_PKG_VERSION")))
            .build();
        let scheme = if opts.insecure { "http" } else { "https" };
        Client {
            agent,
            base: format!("{scheme}://{}", r.api_host()),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            creds: credentials(opts, &r.registry),
            auth: Mutex::new(None),
            insecure: opts.insecure,
            local: r.is_local(),
        }
    }

    fn err(&self, message: impl Into<String>) -> ImageError {
        ImageError::Registry {
            registry: self.registry.clone(),
            message: message.into(),
        }
    }

    fn transport_err(&self, url: &str, e: &ureq::Transport) -> ImageError {
        let mut m = format!("cannot reach {url}: {e}");
        if !self.insecure {
            m.push_str(if self.local {
                "; if this local registry serves plain HTTP, pass --insecure (nanoclaw never falls back to HTTP on its own, not even for localhost)"
            } else {
                "; if it serves plain HTTP, pass --insecure"
            });
        }
        self.err(m)
    }

    fn current_auth(&self) -> Option<String> {
        self.auth.lock().map_or(None, |g| g.clone())
    }

    fn set_auth(&self, v: String) {
        if let Ok(mut g) = self.auth.lock() {
            *g = Some(v);
        }
    }

    fn basic(&self) -> Option<String> {
        self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// Answer a 401 challenge: fetch a bearer token, or use basic credentials.
    fn authenticate(&self, challenge: Option<&str>) -> Result<(), ImageError> {
        let Some(ch) = challenge else {
            return Err(self.err("401 Unauthorized without a WWW-Authenticate challenge"));
        };
        let (scheme, params) = parse_challenge(ch);
        match scheme.as_str() {
            "basic" => match self.basic() {
                Some(b) => {
                    self.set_auth(b);
                    Ok(())
                }
                None => Err(self.err(format!(
                    "authentication required and no credentials for {} in the Docker config file (~/.docker/config.json `auths`); run `docker login {}`",
                    self.registry, self.registry
                ))),
            },
            "bearer" => {
                let realm = params
                    .get("realm")
                    .ok_or_else(|| self.err("bearer challenge without a realm"))?;
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                let mut req = self.agent.get(realm).query("scope", &scope);
                if let Some(s) = params.get("service") {
                    req = req.query("service", s);
                }
                if let Some(b) = self.basic() {
                    req = req.set("Authorization", &b);
                }
                let resp = match req.call() {
                    Ok(r) => r,
                    Err(ureq::Error::Status(code, _)) => {
                        return Err(self.err(format!(
                            "the token service {realm} refused ({code}){}",
                            if self.creds.is_some() {
                                ": check the credentials for this registry in ~/.docker/config.json"
                            } else {
                                ": this image may need credentials (`docker login`)"
                            }
                        )))
                    }
                    Err(ureq::Error::Transport(t)) => return Err(self.transport_err(realm, &t)),
                };
                let v: serde_json::Value = read_json(resp, MAX_DOC)
                    .map_err(|e| self.err(format!("bad token response from {realm}: {e}")))?;
                let tok = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| self.err(format!("token response from {realm} has no token")))?;
                self.set_auth(format!("Bearer {tok}"));
                Ok(())
            }
            other => Err(self.err(format!("unsupported authentication scheme {other:?}"))),
        }
    }

    /// GET `path` (under /v2/<repo>/), authenticating once on 401.
    fn get(&self, path: &str, accept: &str) -> Result<ureq::Response, ImageError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let mut retried = false;
        loop {
            let mut req = self.agent.get(&url).set("Accept", accept);
            if let Some(a) = self.current_auth() {
                req = req.set("Authorization", &a);
            }
            match req.call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, resp)) if !retried => {
                    retried = true;
                    let ch = resp.header("www-authenticate").map(str::to_string);
                    self.authenticate(ch.as_deref())?;
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    let hint = match code {
                        401 | 403 => " (access denied: check the credentials in ~/.docker/config.json, or that the repository exists)",
                        404 => " (not found: check the repository name and tag)",
                        _ => "",
                    };
                    let body = body.chars().take(200).collect::<String>();
                    return Err(
                        self.err(format!("GET {url} answered {code}{hint}: {}", body.trim()))
                    );
                }
                Err(ureq::Error::Transport(t)) => return Err(self.transport_err(&url, &t)),
            }
        }
    }

    /// Fetch a manifest or index; verify its digest.
    fn manifest(
        &self,
        reference: &str,
        expect: Option<&Digest>,
    ) -> Result<(Vec<u8>, String, Digest), ImageError> {
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let resp = self.get(&format!("manifests/{reference}"), &accept)?;
        let ct = resp.content_type().to_string();
        let header = resp.header("docker-content-digest").map(str::to_string);
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_DOC + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.err(format!("reading manifest {reference}: {e}")))?;
        if bytes.len() as u64 > MAX_DOC {
            return Err(self.err(format!("manifest {reference} is larger than 16 MiB")));
        }
        let actual = Digest::of(&bytes);
        let expected = expect
            .cloned()
            .or_else(|| header.as_deref().and_then(|h| Digest::parse(h).ok()));
        if let Some(e) = expected {
            if e != actual {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest {}/{}:{reference}", self.registry, self.repository),
                    expected: e.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok((bytes, ct, actual))
    }

    /// Fetch a small blob into memory; verify digest and size.
    fn small_blob(&self, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
        if d.size > MAX_DOC {
            return Err(self.err(format!("config blob {} is larger than 16 MiB", d.digest)));
        }
        let resp = self.get(&format!("blobs/{}", d.digest), "*/*")?;
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_DOC + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.err(format!("reading blob {}: {e}", d.digest)))?;
        let actual = Digest::of(&bytes);
        if actual != d.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {}", d.digest),
                expected: d.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    /// Download a blob into `dest`, hashing as it comes; verify.
    fn download(
        &self,
        d: &Descriptor,
        dest: &std::path::Path,
        store: &Store,
        progress: &Progress,
        abort: &AtomicBool,
    ) -> Result<(), ImageError> {
        let resp = self.get(&format!("blobs/{}", d.digest), "*/*")?;
        let mut reader = resp.into_reader();
        let f = File::create(dest).map_err(|e| store.write_err(dest, "storing a download", e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total: u64 = 0;
        loop {
            if abort.load(Ordering::Relaxed) {
                return Err(self.err("download cancelled after another layer failed"));
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.err(format!(
                        "download of blob {} broke off after {n_total} of {} bytes: {e}; nothing was stored, pull again",
                        d.digest, d.size
                    )))
                }
            };
            n_total += n as u64;
            if n_total > d.size {
                return Err(ImageError::DigestMismatch {
                    what: format!(
                        "blob {} (more bytes than the manifest's size {})",
                        d.digest, d.size
                    ),
                    expected: d.digest.to_string(),
                    actual: "(longer content)".into(),
                });
            }
            h.update(&buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|e| store.write_err(dest, "storing a download", e))?;
            progress.advance(n as u64);
        }
        let f = w
            .into_inner()
            .map_err(|e| store.write_err(dest, "storing a download", e.into_error()))?;
        f.sync_all()
            .map_err(|e| store.write_err(dest, "storing a download", e))?;
        if n_total < d.size {
            return Err(self.err(format!(
                "download of blob {} ended after {n_total} of {} bytes (connection closed); nothing was stored, pull again",
                d.digest, d.size
            )));
        }
        let actual = h.finish();
        if actual != d.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {} from {}", d.digest, self.registry),
                expected: d.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }
}

fn read_json(resp: ureq::Response, max: u64) -> io::Result<serde_json::Value> {
    let mut bytes = Vec::new();
    resp.into_reader().take(max).read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

impl Store {
    /// Pull `reference` from its registry into the store and record it
    /// under its canonical name. Layers already in the store (by diff_id),
    /// or whose blob is, are not downloaded. Every blob is verified against
    /// its digest; on any error nothing is stored.
    pub fn pull(&self, reference: &str, opts: &PullOptions) -> Result<ImageRecord, ImageError> {
        let r = Reference::parse(reference)?;
        let client = Client::new(&r, opts);
        let want = opts.platform.clone().unwrap_or_else(Platform::host);

        let (mut bytes, mut ct, mut digest) =
            client.manifest(&r.manifest_ref(), r.digest.as_ref())?;
        let mut m = Manifest::parse(&bytes, Some(&ct))?;
        if m.is_index(Some(&ct)) {
            let pick = m
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
                .cloned()
                .ok_or_else(|| ImageError::NoPlatform {
                    reference: r.to_string(),
                    wanted: want.to_string(),
                    available: m
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .filter(|p| !p.starts_with("unknown"))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            (bytes, ct, digest) = client.manifest(&pick.digest.to_string(), Some(&pick.digest))?;
            m = Manifest::parse(&bytes, Some(&ct))?;
            if m.is_index(Some(&ct)) {
                return Err(ImageError::invalid(
                    "manifest",
                    "an index inside an index is not supported",
                ));
            }
        }
        let cdesc = m
            .config
            .clone()
            .ok_or_else(|| ImageError::invalid("manifest", "no config descriptor"))?;
        let cfg_bytes = client.small_blob(&cdesc)?;
        let cfg = ConfigFile::parse(&cfg_bytes)?;
        if cfg.rootfs.diff_ids.len() != m.layers.len() {
            return Err(ImageError::invalid(
                "image config",
                format!(
                    "{} diff_ids for {} layers",
                    cfg.rootfs.diff_ids.len(),
                    m.layers.len()
                ),
            ));
        }
        if !want.matches(&cfg.platform()) && !cfg.architecture.is_empty() {
            return Err(ImageError::NoPlatform {
                reference: r.to_string(),
                wanted: want.to_string(),
                available: cfg.platform().to_string(),
            });
        }

        let txn = self.begin("pull")?;
        let progress = Progress::new(opts.progress, format!("pulling {r}"));
        // Unique layers; those already present cost nothing.
        let mut todo: VecDeque<(Descriptor, Digest)> = VecDeque::new();
        let mut seen = std::collections::HashSet::new();
        let mut infos: HashMap<Digest, LayerInfo> = HashMap::new();
        for (d, diff) in m.layers.iter().zip(cfg.rootfs.diff_ids.iter()) {
            if !seen.insert(diff.clone()) {
                continue;
            }
            if self.has_layer(diff) {
                txn.note_reused(diff, d.size);
                infos.insert(
                    diff.clone(),
                    LayerInfo {
                        diff_id: diff.clone(),
                        blob: d.digest.clone(),
                        blob_size: d.size,
                        media_type: d.media_type.clone(),
                    },
                );
            } else if self.has_blob(&d.digest) {
                let f = File::open(self.blob_path(&d.digest))
                    .map_err(|e| ImageError::io(format!("reading blob {}", d.digest), e))?;
                let mut info =
                    txn.add_layer(f, &d.digest.to_string(), Some(&d.digest), Some(diff))?;
                info.media_type = d.media_type.clone();
                infos.insert(diff.clone(), info);
            } else {
                progress.add_total(d.size);
                todo.push_back((d.clone(), diff.clone()));
            }
        }
        let results = download_all(&client, &txn, todo, opts.parallel.max(1), &progress)?;
        progress.finish();
        for info in results {
            infos.insert(info.diff_id.clone(), info);
        }
        let mut layers = Vec::new();
        for diff in &cfg.rootfs.diff_ids {
            let info = infos
                .get(diff)
                .cloned()
                .ok_or_else(|| ImageError::invalid("pull", format!("layer {diff} went missing")))?;
            layers.push(info);
        }
        let config_digest = txn.put_blob(&cfg_bytes)?;
        let manifest_digest = txn.put_blob(&bytes)?;
        debug_assert_eq!(manifest_digest, digest);
        let rec = ImageRecord {
            reference: r.to_string(),
            manifest_digest,
            config_digest,
            layers,
            config: cfg.image_config(),
            platform: cfg.platform(),
            source: "pull".into(),
            stored_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        txn.commit(std::slice::from_ref(&rec))?;
        Ok(rec)
    }
}

/// Download and unpack `todo` with at most `parallel` workers. The first
/// error stops the others.
fn download_all(
    client: &Client,
    txn: &Txn<'_>,
    todo: VecDeque<(Descriptor, Digest)>,
    parallel: usize,
    progress: &Progress,
) -> Result<Vec<LayerInfo>, ImageError> {
    let workers = parallel.min(todo.len());
    let queue = Mutex::new(todo);
    let abort = AtomicBool::new(false);
    let results: Mutex<Vec<LayerInfo>> = Mutex::new(Vec::new());
    let first_err: Mutex<Option<ImageError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((d, diff)) = next else { return };
                let res = (|| -> Result<LayerInfo, ImageError> {
                    let tmp = txn.temp_path("download");
                    client.download(&d, &tmp, txn.store, progress, &abort)?;
                    let f = File::open(&tmp)
                        .map_err(|e| ImageError::io(format!("reading {}", tmp.display()), e))?;
                    let mut info = txn.add_layer(f, &d.digest.to_string(), Some(&d.digest), Some(&diff))?;
                    info.media_type = d.media_type.clone();
                    txn.adopt_blob_file(&tmp, &d.digest)?;
                    Ok(info)
                })();
                match res {
                    Ok(info) => {
                        if let Ok(mut r) = results.lock() {
                            r.push(info);
                        }
                    }
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        if let Ok(mut fe) = first_err.lock() {
                            // Keep the root cause, not "cancelled" from a sibling.
                            let cancelled = matches!(&e, ImageError::Registry { message, .. } if message.contains("cancelled"));
                            if fe.is_none() || !cancelled && fe.as_ref().is_some_and(|x| matches!(x, ImageError::Registry { message, .. } if message.contains("cancelled"))) {
                                *fe = Some(e);
                            }
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "basic");
        assert_eq!(p["realm"], "Registry Realm");
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let opts = PullOptions {
            docker_config: Some(p),
            ..Default::default()
        };
        assert_eq!(
            credentials(&opts, "127.0.0.1:5000"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(
            credentials(&opts, "docker.io"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(credentials(&opts, "example.com"), None);
    }
}
