//! Images a tenant registers through the daemon (`POST /v1/images`, seed
//! 000's `register_image(name, dockerfile, languages)`; `GET /v1/images`).
//!
//! The daemon never builds in its own address space. Each build is a
//! child process started from nanoclaw's own binary, as agent runs are
//! ([`crate::agents::run_child`]):
//!
//! ```text
//! nanoclaw image build -t localhost/TENANT/NAME:latest --json -f CTX/Dockerfile CTX
//! ```
//!
//! in a process group of its own, with the daemon's environment (so the
//! daemon's image store: `$NANOCLAW_DATA_DIR/images`, else the default)
//! and an empty private build context holding only the Dockerfile the
//! request gave (`COPY`/`ADD` have nothing to read). RUN steps run in
//! nanoclaw sandboxes with no network, as `nanoclaw image build` does by
//! default. The build is bounded: its Dockerfile's size, its wall time,
//! builds at once per tenant and in total.
//!
//! The image then becomes a template of that tenant only
//! ([`crate::backend::Backend::register_image`]): `POST /sandboxes` with
//! `templateID: NAME` and `POST /v1/run` with `template: NAME` run in its
//! root. Its `languages` are the interpreters it is registered for: a
//! `/v1/run` snippet in another language is refused. The registry is kept
//! in `DATA/images.json` and restored when the daemon starts.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agents::{error_line, run_child};
use crate::auth::TenantId;
use crate::backend::ImageTemplate;
pub use crate::slots::Slot;
use crate::slots::{Full, Slots};

/// Largest Dockerfile a request may give.
pub const MAX_DOCKERFILE: usize = 64 << 10;
/// Builds one tenant may have at once.
pub const BUILDS_PER_TENANT: usize = 1;
/// Builds the daemon has at once, over all tenants.
pub const BUILDS_TOTAL: usize = 2;
/// The longest a build may take before it is killed.
pub const BUILD_WALL: Duration = Duration::from_secs(15 * 60);
/// The `Retry-After` of a refused build.
pub const BUSY_RETRY: Duration = Duration::from_secs(5);
/// Images one tenant may register.
pub const MAX_PER_TENANT: usize = 64;
/// The languages an image may be registered for.
pub const LANGUAGES: [&str; 4] = ["python", "node", "bash", "sh"];
/// Most hosts a build's RUN steps may reach.
pub const MAX_ALLOW_HOSTS: usize = 16;
/// The audit record kind of a build (its outcome, reference and id).
pub const AUDIT_KIND: &str = "image_build";
/// The audit record kind of a removal (`DELETE /v1/images/{name}`).
pub const REMOVE_AUDIT_KIND: &str = "image_remove";

/// `POST /v1/images`'s body.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The template's name (`custom-python`).
    pub name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The languages the image is for (at least one).
    pub languages: Vec<String>,
    /// `HOST[:PORT]`s the RUN steps may reach through nanoclaw's egress
    /// proxy (e.g. `pypi.org`, `files.pythonhosted.org` for `pip
    /// install`); none by default: no network.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
}

/// A checked [`RegisterRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct Register {
    /// The name.
    pub name: String,
    /// The Dockerfile.
    pub dockerfile: String,
    /// The languages, without duplicates, in the order given.
    pub languages: Vec<String>,
    /// The hosts RUN steps may reach.
    pub allow_hosts: Vec<String>,
}

/// Whether `h` is `HOST[:PORT]`: a DNS name (a leading `*.` allowed) or an
/// IPv4 address, and a port of 1 to 65535.
fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    let name = host.strip_prefix("*.").unwrap_or(host);
    (1..=253).contains(&name.len())
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Whether `name` is a template name: 1 to 64 of `a-z 0-9`, with single
/// `.`, `_` or `-` between them (a path component of an image reference).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let sep = |c: &u8| matches!(c, b'.' | b'_' | b'-');
    (1..=64).contains(&b.len())
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || sep(c))
        && !b.windows(2).any(|w| sep(&w[0]) && sep(&w[1]))
}

impl RegisterRequest {
    /// Checks what serde cannot; the message names the field and its bound.
    pub fn check(self) -> Result<Register, String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "invalid name {:?}: use 1 to 64 lowercase letters and digits, with single \
                 '.', '_' or '-' between them (e.g. custom-python)",
                self.name
            ));
        }
        if self.name == "base" {
            return Err(
                "name \"base\" is the daemon's default template: give the image another name"
                    .into(),
            );
        }
        if self.dockerfile.trim().is_empty() {
            return Err("dockerfile must not be empty: give the Dockerfile's text".into());
        }
        if self.dockerfile.len() > MAX_DOCKERFILE {
            return Err(format!(
                "dockerfile is {} bytes: at most {MAX_DOCKERFILE}",
                self.dockerfile.len()
            ));
        }
        if self.dockerfile.contains('\0') {
            return Err("dockerfile contains a NUL byte".into());
        }
        if self.languages.is_empty() {
            return Err(format!(
                "languages must name at least one of {}",
                LANGUAGES.join(", ")
            ));
        }
        let mut languages: Vec<String> = Vec::new();
        for l in self.languages {
            if !LANGUAGES.contains(&l.as_str()) {
                return Err(format!(
                    "unknown language {l:?}: expected one of {}",
                    LANGUAGES.join(", ")
                ));
            }
            if !languages.contains(&l) {
                languages.push(l);
            }
        }
        if self.allow_hosts.len() > MAX_ALLOW_HOSTS {
            return Err(format!(
                "allow_hosts has {} hosts: at most {MAX_ALLOW_HOSTS}",
                self.allow_hosts.len()
            ));
        }
        if let Some(h) = self.allow_hosts.iter().find(|h| !valid_host(h)) {
            return Err(format!(
                "invalid allow_hosts entry {h:?}: give HOST or HOST:PORT (e.g. pypi.org, *.example.com:443)"
            ));
        }
        for h in &self.allow_hosts {
            crate::keepers::public_host_rule(h).map_err(|e| format!("allow_hosts {h:?}: {e}"))?;
        }
        Ok(Register {
            name: self.name,
            dockerfile: self.dockerfile,
            languages,
            allow_hosts: self.allow_hosts,
        })
    }
}

/// A registered image, as `GET /v1/images` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The template's name.
    pub name: String,
    /// Its reference in the image store.
    pub reference: String,
    /// The image id (config digest).
    pub id: String,
    /// The languages it is registered for.
    pub languages: Vec<String>,
    /// When it was built, Unix ms.
    pub created_ms: u64,
    /// How long the build took, ms.
    pub build_ms: u64,
    /// Bytes of the layers its build added to the image store (the store
    /// keeps about twice this: blobs and unpacked); counted against the
    /// tenant's [`DiskBounds::per_tenant`].
    #[serde(default)]
    pub bytes: u64,
}

/// How much disk tenants' builds may take in the image store (the bytes
/// of the layers they add, see [`nanoclaw_image::bound`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskBounds {
    /// One build: a RUN step writing past it is stopped, the build fails
    /// (422) and leaves no layer behind.
    pub per_build: u64,
    /// All of a tenant's registered images together: a build is refused
    /// (409) when they hold it all, and may use only what is left.
    pub per_tenant: u64,
}

impl Default for DiskBounds {
    fn default() -> DiskBounds {
        DiskBounds {
            per_build: 4 << 30,
            per_tenant: 16 << 30,
        }
    }
}

/// The least a build may be given: below it a tenant's bound counts as
/// used up.
const MIN_BUILD_BYTES: u64 = 1 << 20;

/// Why a build gave no image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Too many builds at once.
    #[error("{0}")]
    Busy(String),
    /// The tenant has [`MAX_PER_TENANT`] images.
    #[error("tenant {0} has {MAX_PER_TENANT} images already, the most a tenant may register")]
    TooMany(String),
    /// The tenant's images hold its [`DiskBounds::per_tenant`].
    #[error("{0}")]
    DiskQuota(String),
    /// The Dockerfile did not build (nanoclaw's error line).
    #[error("image build failed: {0}")]
    Build(String),
    /// The build outlived [`BUILD_WALL`] and was killed.
    #[error("the image build did not end within {} s and was killed", .0.as_secs())]
    Timeout(Duration),
    /// The build could not be started, or its image not read.
    #[error("{0}")]
    Internal(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Registry = BTreeMap<String, BTreeMap<String, Registered>>;

/// The daemon's image builds and its registry of tenants' images.
pub struct Images {
    exe: PathBuf,
    data: PathBuf,
    registry: Mutex<Registry>,
    slots: Slots,
    bounds: DiskBounds,
}

/// A temporary build context, removed when dropped.
struct Context(PathBuf);

impl Drop for Context {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Images {
    /// Builds with `exe`; keeps its registry in `data/images.json` (read
    /// now: a missing or unreadable file is an empty registry, reported).
    /// Removes `data/builds`: only a daemon holding the data folder's lock
    /// may open it.
    pub fn open(exe: PathBuf, data: PathBuf, bounds: DiskBounds) -> Images {
        // Build contexts a killed daemon left (the caller holds the data
        // folder's lock: no build of another daemon is running).
        let _ = std::fs::remove_dir_all(data.join("builds"));
        let path = data.join("images.json");
        let registry = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                eprintln!(
                    "nanoclaw serve: {}: {e}; no image is registered",
                    path.display()
                );
                Registry::new()
            }),
            Err(_) => Registry::new(),
        };
        Images {
            exe,
            data,
            registry: Mutex::new(registry),
            slots: Slots::default(),
            bounds,
        }
    }

    /// Every registered image: (tenant, entry).
    pub fn all(&self) -> Vec<(TenantId, Registered)> {
        lock(&self.registry)
            .iter()
            .flat_map(|(t, m)| {
                m.values()
                    .map(move |r| (TenantId::from(t.as_str()), r.clone()))
            })
            .collect()
    }

    /// `tenant`'s registered images, by name.
    pub fn list(&self, tenant: &TenantId) -> Vec<Registered> {
        lock(&self.registry)
            .get(tenant.as_str())
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The bytes `tenant`'s registered images hold in the store.
    pub fn used(&self, tenant: &TenantId) -> u64 {
        lock(&self.registry)
            .get(tenant.as_str())
            .map_or(0, |m| m.values().map(|r| r.bytes).sum())
    }

    /// The most one more build of `tenant` may add to the store.
    fn budget(&self, tenant: &TenantId) -> u64 {
        let left = self.bounds.per_tenant.saturating_sub(self.used(tenant));
        left.min(self.bounds.per_build)
    }

    /// Takes a slot for one of `tenant`'s builds, or says which limit is
    /// reached.
    pub fn admit(&self, tenant: &TenantId) -> Result<Slot, ImageError> {
        let known = lock(&self.registry)
            .get(tenant.as_str())
            .map_or(0, BTreeMap::len);
        if known >= MAX_PER_TENANT {
            return Err(ImageError::TooMany(tenant.0.clone()));
        }
        if self.budget(tenant) < MIN_BUILD_BYTES {
            return Err(ImageError::DiskQuota(format!(
                "tenant {tenant}'s images hold {} of the {} its images may take in the image store; \
                 no build fits (the operator sets the bound: nanoclaw serve --max-tenant-image-bytes)",
                nanoclaw_image::bound::human(self.used(tenant)),
                nanoclaw_image::bound::human(self.bounds.per_tenant)
            )));
        }
        self.slots
            .take(tenant.as_str(), BUILDS_PER_TENANT, BUILDS_TOTAL)
            .map_err(|full| {
                ImageError::Busy(match full {
                    Full::Tenant(n) => format!(
                        "image builds: at most {n} at once for tenant {tenant}; try again later"
                    ),
                    Full::Total(n) => {
                        format!("image builds: at most {n} at once on this daemon; try again later")
                    }
                })
            })
    }

    /// The store reference of `tenant`'s image `name`.
    pub fn reference(tenant: &TenantId, name: &str) -> String {
        format!("localhost/{tenant}/{name}:latest")
    }

    /// The child's arguments (after the binary): no network for the RUN
    /// steps, or only to `allow_hosts`; its FROM never names another
    /// tenant's image (`--from-scope`: the store is shared by all tenants).
    pub fn argv(
        reference: &str,
        ctx: &Path,
        allow_hosts: &[String],
        max_bytes: u64,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["image".into(), "build".into(), "-t".into()];
        a.push(reference.into());
        a.push("--json".into());
        a.push("--max-bytes".into());
        a.push(max_bytes.to_string().into());
        if let Some((scope, _)) = reference.rsplit_once('/') {
            a.push("--from-scope".into());
            a.push(format!("{scope}/").into());
        }
        if allow_hosts.is_empty() {
            a.extend(["--network".into(), "none".into()]);
        } else {
            a.extend(["--network".into(), "allowlist".into()]);
            for h in allow_hosts {
                a.push("--allow-host".into());
                a.push(h.into());
            }
        }
        a.push("-f".into());
        a.push(ctx.join("Dockerfile").into());
        a.push(ctx.into());
        a
    }

    /// Builds `req` for `tenant` in a child process and reads the image
    /// back from the store: its entry (not yet registered: see
    /// [`Images::record`]) and template. The caller holds a [`Slot`].
    pub async fn build(
        &self,
        tenant: &TenantId,
        req: &Register,
    ) -> Result<(Registered, ImageTemplate), ImageError> {
        let internal = |what: &str, e: std::io::Error| ImageError::Internal(format!("{what}: {e}"));
        let builds = self.data.join("builds");
        std::fs::create_dir_all(&builds).map_err(|e| internal("creating the builds folder", e))?;
        let token = crate::e2b::random_token()
            .ok_or_else(|| ImageError::Internal("no randomness for a build folder".into()))?;
        let ctx = Context(builds.join(&token[..16]));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&ctx.0)
                .map_err(|e| internal("creating a build context", e))?;
        }
        std::fs::write(ctx.0.join("Dockerfile"), &req.dockerfile)
            .map_err(|e| internal("writing the Dockerfile", e))?;
        let reference = Self::reference(tenant, &req.name);
        let t0 = Instant::now();
        let budget = self.budget(tenant);
        let done = run_child(
            &self.exe,
            &Self::argv(&reference, &ctx.0, &req.allow_hosts, budget),
            None,
            BUILD_WALL,
        )
        .await
        .map_err(|e| internal("starting nanoclaw image build", e))?;
        let build_ms = t0.elapsed().as_millis() as u64;
        drop(ctx);
        match done.status {
            None => return Err(ImageError::Timeout(BUILD_WALL)),
            Some(s) if !s.success() => return Err(ImageError::Build(error_line(&done.stderr))),
            Some(_) => {}
        }
        // What the build added, from its report (`--json`); unreadable:
        // all it was allowed (the bound errs on the safe side).
        let bytes = serde_json::from_slice::<serde_json::Value>(&done.stdout)
            .ok()
            .and_then(|v| v.get("new_bytes")?.as_u64())
            .unwrap_or(budget);
        let r = reference.clone();
        let root = tokio::task::spawn_blocking(move || {
            nanoclaw_image::Store::open_default().and_then(|s| s.resolve(&r))
        })
        .await
        .map_err(|e| ImageError::Internal(e.to_string()))?
        .map_err(|e| ImageError::Internal(format!("reading the built image {reference}: {e}")))?;
        let entry = Registered {
            name: req.name.clone(),
            reference: root.reference.clone(),
            id: root.id.to_string(),
            languages: req.languages.clone(),
            created_ms: crate::db::now_ms().max(0) as u64,
            build_ms,
            bytes,
        };
        let template = ImageTemplate {
            reference: root.reference,
            layers: root.layers,
            env: root.config.env,
            languages: req.languages.clone(),
        };
        Ok((entry, template))
    }

    /// Registers `entry` for `tenant` and saves the registry.
    pub fn record(&self, tenant: &TenantId, entry: Registered) -> Result<(), ImageError> {
        let mut reg = lock(&self.registry);
        reg.entry(tenant.0.clone())
            .or_default()
            .insert(entry.name.clone(), entry);
        self.save(&reg)
    }

    /// `tenant`'s image `name`, if registered.
    pub fn get(&self, tenant: &TenantId, name: &str) -> Option<Registered> {
        lock(&self.registry)
            .get(tenant.as_str())?
            .get(name)
            .cloned()
    }

    /// Unregisters `tenant`'s image `name` and saves the registry; its
    /// entry, or `None` when it was not registered.
    pub fn forget(&self, tenant: &TenantId, name: &str) -> Result<Option<Registered>, ImageError> {
        let mut reg = lock(&self.registry);
        let Some(images) = reg.get_mut(tenant.as_str()) else {
            return Ok(None);
        };
        let gone = images.remove(name);
        if images.is_empty() {
            reg.remove(tenant.as_str());
        }
        self.save(&reg)?;
        Ok(gone)
    }

    fn save(&self, reg: &Registry) -> Result<(), ImageError> {
        let bytes =
            serde_json::to_vec_pretty(reg).map_err(|e| ImageError::Internal(e.to_string()))?;
        let path = self.data.join("images.json");
        let tmp = self.data.join("images.json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ImageError::Internal(format!("saving {}: {e}", path.display())))
    }

    /// Removes an unregistered image's reference from the store, and
    /// those of its layers no other image uses (a base image's layers stay
    /// while the base is stored); returns how many layers went. The
    /// backend has refused the image to new sandboxes and seen none using
    /// it ([`crate::backend::Backend::unregister_image`]).
    pub fn remove_from_store(entry: &Registered) -> Result<usize, ImageError> {
        let store = nanoclaw_image::Store::open_default()
            .map_err(|e| ImageError::Internal(format!("opening the image store: {e}")))?;
        let rec = match store.remove(&entry.reference) {
            Ok(rec) => rec,
            // Gone already (removed by hand): nothing of it to free.
            Err(nanoclaw_image::ImageError::NotFound(_)) => return Ok(0),
            Err(e) => {
                return Err(ImageError::Internal(format!(
                    "removing {} from the image store: {e}",
                    entry.reference
                )))
            }
        };
        store.remove_unused_layers(&rec.layers).map_err(|e| {
            ImageError::Internal(format!("removing the layers of {}: {e}", entry.reference))
        })
    }

    /// The template of a registered image, read from the store again (at
    /// the daemon's start).
    pub fn template_of(entry: &Registered) -> Result<ImageTemplate, String> {
        let root = nanoclaw_image::Store::open_default()
            .and_then(|s| s.resolve(&entry.reference))
            .map_err(|e| e.to_string())?;
        Ok(ImageTemplate {
            reference: root.reference,
            layers: root.layers,
            env: root.config.env,
            languages: entry.languages.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<Register, String> {
        serde_json::from_str::<RegisterRequest>(json)
            .map_err(|e| e.to_string())?
            .check()
    }

    #[test]
    fn requests_are_checked() {
        let ok = req(
            r#"{"name":"custom-python","dockerfile":"FROM python:3.11-slim\nRUN pip install numpy pandas","languages":["python","python"]}"#,
        )
        .unwrap();
        assert_eq!(ok.languages, vec!["python"]);
        let ok = req(r#"{"name":"p","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["pypi.org","*.x.com:443","93.184.216.34:80"]}"#).unwrap();
        assert_eq!(ok.allow_hosts.len(), 3);
        for bad in [
            r#"{}"#,
            r#"{"name":"x","dockerfile":"FROM a"}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":[]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["cobol"]}"#,
            r#"{"name":"x","dockerfile":"  ","languages":["sh"]}"#,
            r#"{"name":"x","dockerfile":"FROM a\u0000","languages":["sh"]}"#,
            r#"{"name":"../x","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"X","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"a--b","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"-a","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"base","dockerfile":"FROM a","languages":["sh"]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"context":"/"}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["a b"]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["--network=open"]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["a.org:0"]}"#,
            // A literal non-public address would open the host's loopback
            // or a private network to the build.
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["127.0.0.1:8080"]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["10.0.0.1"]}"#,
            r#"{"name":"x","dockerfile":"FROM a","languages":["sh"],"allow_hosts":["169.254.169.254:80"]}"#,
        ] {
            assert!(req(bad).is_err(), "{bad}");
        }
        let long = format!(
            r#"{{"name":"x","dockerfile":"{}","languages":["sh"]}}"#,
            "a".repeat(MAX_DOCKERFILE + 1)
        );
        assert!(req(&long).is_err());
    }

    #[test]
    fn builds_are_bounded_per_tenant_and_in_total() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-images-{}", std::process::id()));
        let i = Images::open("/bin/false".into(), dir, DiskBounds::default());
        let (a, b, c) = (
            TenantId::from("a"),
            TenantId::from("b"),
            TenantId::from("c"),
        );
        let s1 = i.admit(&a).unwrap();
        assert!(matches!(i.admit(&a), Err(ImageError::Busy(m)) if m.contains("tenant a")));
        let _s2 = i.admit(&b).unwrap();
        assert!(matches!(i.admit(&c), Err(ImageError::Busy(m)) if m.contains("this daemon")));
        drop(s1);
        let _s3 = i.admit(&c).unwrap();
    }

    #[test]
    fn a_tenant_whose_images_hold_its_bound_gets_no_build() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-images-q-{}", std::process::id()));
        let bounds = DiskBounds {
            per_build: 100 << 20,
            per_tenant: 150 << 20,
        };
        let i = Images::open("/bin/false".into(), dir, bounds);
        let a = TenantId::from("a");
        assert_eq!(i.budget(&a), 100 << 20);
        let entry = |name: &str, bytes: u64| Registered {
            name: name.into(),
            reference: Images::reference(&a, name),
            id: "sha256:00".into(),
            languages: vec!["sh".into()],
            created_ms: 0,
            build_ms: 0,
            bytes,
        };
        lock(&i.registry)
            .entry("a".into())
            .or_default()
            .insert("one".into(), entry("one", 100 << 20));
        assert_eq!(
            i.budget(&a),
            50 << 20,
            "only what is left of the tenant's bound"
        );
        lock(&i.registry)
            .entry("a".into())
            .or_default()
            .insert("two".into(), entry("two", 50 << 20));
        let e = i.admit(&a).err().expect("refused");
        assert!(
            matches!(&e, ImageError::DiskQuota(m) if m.contains("--max-tenant-image-bytes")),
            "{e}"
        );
        assert!(i.admit(&TenantId::from("b")).is_ok(), "other tenants build");
    }

    #[test]
    fn the_child_builds_the_tenants_reference_from_the_context() {
        let r = Images::reference(&TenantId::from("acme"), "custom-python");
        assert_eq!(r, "localhost/acme/custom-python:latest");
        let argv = |hosts: &[String]| -> String {
            Images::argv(&r, Path::new("/d/builds/x"), hosts, 1 << 30)
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            argv(&[]),
            "image build -t localhost/acme/custom-python:latest --json --max-bytes 1073741824 --from-scope localhost/acme/ --network none -f /d/builds/x/Dockerfile /d/builds/x"
        );
        assert_eq!(
            argv(&["pypi.org".into(), "files.pythonhosted.org:443".into()]),
            "image build -t localhost/acme/custom-python:latest --json --max-bytes 1073741824 --from-scope localhost/acme/ --network allowlist --allow-host pypi.org --allow-host files.pythonhosted.org:443 -f /d/builds/x/Dockerfile /d/builds/x"
        );
    }
}
