//! The content-addressed store: layout, transactions (stage then rename),
//! image records, resolve, rm, prune, stats, and the build helpers.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::is_enospc;
use crate::lock::{lock, LockGuard};
use crate::oci::{ConfigFile, Descriptor, Manifest, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST};
use crate::unpack::{remove_tree, unpack_layer, UnpackMode, UnpackReport};
use crate::{Digest, ImageConfig, ImageError, Platform, Reference};

/// The on-disk format version written to `store.json`.
pub const STORE_VERSION: u32 = 1;

/// An image store (see the crate docs for the layout).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    mode: UnpackMode,
}

/// What the engine needs to build a sandbox root from an image.
#[derive(Debug, Clone)]
pub struct ImageRoot {
    /// Unpacked layer directories, lowest (base) first, absolute. For
    /// overlayfs `lowerdir=` list them in reverse (topmost first).
    pub layers: Vec<PathBuf>,
    /// The image's run defaults.
    pub config: ImageConfig,
    /// True when the layers use `user.overlay.*` xattrs (rootless store):
    /// mount overlayfs with `userxattr` (both modes now use `user.overlay.*`).
    pub rootless_xattrs: bool,
    /// The canonical reference the image was found under.
    pub reference: String,
    /// The image id (config digest).
    pub id: Digest,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// sha256 of the uncompressed tar: names the unpacked dir `layers/<hex>`.
    pub diff_id: Digest,
    /// The blob's digest as distributed (compressed, or = diff_id for plain tar).
    pub blob: Digest,
    /// Size of the blob in bytes.
    pub blob_size: u64,
    /// The blob's media type.
    pub media_type: String,
}

/// An image as recorded in `images/<ref>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Canonical reference (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// Digest of the image manifest (stored in blobs/).
    pub manifest_digest: Digest,
    /// Digest of the config blob: the image id.
    pub config_digest: Digest,
    /// Layers, lowest first.
    pub layers: Vec<LayerInfo>,
    /// Run defaults from the config.
    pub config: ImageConfig,
    /// The platform of the image.
    pub platform: Platform,
    /// Where it came from: `pull`, `import <file>`, `build`.
    pub source: String,
    /// When it was stored (seconds since the Unix epoch).
    pub stored_at: u64,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Unpacked layers removed.
    pub layers_removed: u64,
    /// Blobs removed.
    pub blobs_removed: u64,
    /// Leftover staging entries removed.
    pub staging_removed: u64,
    /// Bytes freed (approximate: file sizes).
    pub bytes_freed: u64,
}

/// Layer cache statistics across every pull, import and build of this store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Layers an operation needed that were already in the store.
    pub layers_reused: u64,
    /// Layers that had to be downloaded, imported or built.
    pub layers_fetched: u64,
    /// Bytes downloaded for layers.
    pub bytes_fetched: u64,
    /// Bytes not downloaded because the layer was cached.
    pub bytes_reused: u64,
    /// layers_reused / (layers_reused + layers_fetched); 0 when nothing happened.
    pub hit_ratio: f64,
    /// Images in the store.
    pub images: u64,
    /// Unpacked layers in the store.
    pub layers: u64,
}

/// Where a layer came from (used in stats lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerSource {
    /// Already in the store.
    Reused,
    /// Downloaded, imported or built.
    Fetched,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreMeta {
    version: u32,
    rootless: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StatLine {
    op: String,
    layer: Digest,
    source: LayerSource,
    bytes: u64,
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Escape a canonical reference into a file name.
fn escape(reference: &str) -> String {
    let mut s = String::with_capacity(reference.len() + 8);
    for c in reference.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            ':' => s.push_str("%3A"),
            '@' => s.push_str("%40"),
            c => s.push(c),
        }
    }
    s
}

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The default store folder: `$NANOCLAW_DATA_DIR/images`, else
    /// `/var/lib/nanoclaw/images` as root, else
    /// `$XDG_DATA_HOME/nanoclaw/images` (`~/.local/share/nanoclaw/images`).
    pub fn default_dir() -> Result<PathBuf, ImageError> {
        if let Some(d) = std::env::var_os("NANOCLAW_DATA_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d).join("images"));
        }
        if euid() == 0 {
            return Ok(PathBuf::from("/var/lib/nanoclaw/images"));
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(x).join("nanoclaw/images"));
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(h) => Ok(PathBuf::from(h).join(".local/share/nanoclaw/images")),
            None => Err(ImageError::invalid(
                "environment",
                "neither HOME nor XDG_DATA_HOME is set, so there is no place for the image store; set NANOCLAW_DATA_DIR",
            )),
        }
    }

    /// Open (creating if needed) the default store.
    pub fn open_default() -> Result<Store, ImageError> {
        Store::open(Store::default_dir()?)
    }

    /// Open (creating if needed) the store in `dir`. A new store is rootful
    /// when created by root, rootless otherwise.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, ImageError> {
        let mode = if euid() == 0 {
            UnpackMode::Rootful
        } else {
            UnpackMode::Rootless
        };
        Store::open_inner(dir.as_ref(), mode, false)
    }

    /// Open (creating if needed) a store whose layers are laid out for
    /// `mode`; an existing store in the other mode is an error. Root may
    /// create rootless stores (tests, or a store prepared for a user).
    pub fn open_as(dir: impl AsRef<Path>, mode: UnpackMode) -> Result<Store, ImageError> {
        Store::open_inner(dir.as_ref(), mode, true)
    }

    fn open_inner(dir: &Path, mode: UnpackMode, strict: bool) -> Result<Store, ImageError> {
        let dir_mode = if euid() == 0 { 0o755 } else { 0o700 };
        let mk = |p: &Path| -> Result<(), ImageError> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(p)
                .map_err(|e| {
                    ImageError::io(
                        format!(
                            "creating image store folder {} (set NANOCLAW_DATA_DIR to a writable folder)",
                            p.display()
                        ),
                        e,
                    )
                })
        };
        mk(dir)?;
        let root = dir
            .canonicalize()
            .map_err(|e| ImageError::io(format!("resolving {}", dir.display()), e))?;
        for sub in ["blobs/sha256", "layers", "images", "tmp"] {
            mk(&root.join(sub))?;
        }
        let meta_path = root.join("store.json");
        let meta = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice::<StoreMeta>(&b).map_err(|e| {
                ImageError::invalid(format!("store metadata {}", meta_path.display()), e)
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let meta = StoreMeta {
                    version: STORE_VERSION,
                    rootless: mode == UnpackMode::Rootless,
                };
                let bytes = serde_json::to_vec(&meta)
                    .map_err(|e| ImageError::invalid("store metadata", e))?;
                write_atomic(&root, &meta_path, &bytes)?;
                // Another process may have won the race: read what is there.
                let b = std::fs::read(&meta_path)
                    .map_err(|e| ImageError::io(format!("reading {}", meta_path.display()), e))?;
                serde_json::from_slice(&b).map_err(|e| {
                    ImageError::invalid(format!("store metadata {}", meta_path.display()), e)
                })?
            }
            Err(e) => {
                return Err(ImageError::io(
                    format!("reading {}", meta_path.display()),
                    e,
                ))
            }
        };
        if meta.version != STORE_VERSION {
            return Err(ImageError::invalid(
                format!("image store {}", root.display()),
                format!("format version {} (this nanoclaw reads {STORE_VERSION}); use another NANOCLAW_DATA_DIR", meta.version),
            ));
        }
        let store_mode = if meta.rootless {
            UnpackMode::Rootless
        } else {
            UnpackMode::Rootful
        };
        if strict && store_mode != mode {
            return Err(ImageError::invalid(
                format!("image store {}", root.display()),
                format!("it was created for {store_mode:?} layers, not {mode:?}"),
            ));
        }
        Ok(Store {
            root,
            mode: store_mode,
        })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How this store's layers are laid out.
    pub fn mode(&self) -> UnpackMode {
        self.mode
    }

    /// The unpacked directory of layer `diff_id` (it may not exist).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    /// The path of blob `digest` (it may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Is layer `diff_id` unpacked in the store?
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Is blob `digest` in the store?
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn record_path(&self, canonical: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", escape(canonical)))
    }

    /// Look an image up locally: by reference (`busybox` =
    /// `docker.io/library/busybox:latest`), by image id (`sha256:…` or a
    /// unique hex prefix of at least 4 digits), or by manifest digest.
    pub fn record(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        if let Ok(r) = Reference::parse(reference) {
            let canonical = r.to_string();
            match std::fs::read(self.record_path(&canonical)) {
                Ok(b) => {
                    return serde_json::from_slice(&b).map_err(|e| {
                        ImageError::invalid(format!("image record of {canonical}"), e)
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ImageError::io(
                        format!("reading the record of {canonical}"),
                        e,
                    ))
                }
            }
        }
        let id = reference.strip_prefix("sha256:").unwrap_or(reference);
        if id.len() >= 4 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<ImageRecord> = self
                .list()?
                .into_iter()
                .filter(|r| {
                    r.config_digest.hex().starts_with(id) || r.manifest_digest.hex().starts_with(id)
                })
                .collect();
            let ids: HashSet<&Digest> = hits.iter().map(|r| &r.config_digest).collect();
            if ids.len() == 1 {
                if let Some(r) = hits.into_iter().next() {
                    return Ok(r);
                }
            } else if ids.len() > 1 {
                return Err(ImageError::invalid(
                    "image id",
                    format!("{reference} matches {} images; give more digits", ids.len()),
                ));
            }
        }
        let shown = Reference::parse(reference).map_or(reference.to_string(), |r| r.to_string());
        Err(ImageError::NotFound(shown))
    }

    /// Resolve a reference to the layer directories and config the engine
    /// mounts. Local only: an image that is not in the store is
    /// [`ImageError::NotFound`] ("run `nanoclaw image pull REF`").
    pub fn resolve(&self, reference: &str) -> Result<ImageRoot, ImageError> {
        let rec = self.record(reference)?;
        let mut layers = Vec::with_capacity(rec.layers.len());
        for l in &rec.layers {
            let d = self.layer_dir(&l.diff_id);
            if !d.is_dir() {
                return Err(ImageError::invalid(
                    format!("image {}", rec.reference),
                    format!(
                        "its layer {} is missing from the store {}; run `nanoclaw image pull` (or import) again",
                        l.diff_id,
                        self.root.display()
                    ),
                ));
            }
            layers.push(d);
        }
        Ok(ImageRoot {
            layers,
            config: rec.config,
            rootless_xattrs: self.mode == UnpackMode::Rootless,
            reference: rec.reference,
            id: rec.config_digest,
        })
    }

    /// Every image record, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        for e in rd {
            let e = e.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let b = std::fs::read(&p)
                .map_err(|e| ImageError::io(format!("reading {}", p.display()), e))?;
            let rec: ImageRecord = serde_json::from_slice(&b)
                .map_err(|e| ImageError::invalid(format!("image record {}", p.display()), e))?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Remove an image reference. Its layers and blobs stay until
    /// [`Store::prune`] (another image may share them).
    pub fn remove(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        self.check_writable()?;
        let _lock = lock(&self.root.join("lock"), true)?;
        let rec = self.record(reference)?;
        let p = self.record_path(&rec.reference);
        std::fs::remove_file(&p)
            .map_err(|e| ImageError::io(format!("removing {}", p.display()), e))?;
        Ok(rec)
    }

    /// Remove layers and blobs no image references, and leftover staging
    /// folders of interrupted operations.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        self.check_writable()?;
        let _lock = lock(&self.root.join("lock"), true)?;
        let mut keep_layers = HashSet::new();
        let mut keep_blobs = HashSet::new();
        for r in self.list()? {
            keep_blobs.insert(r.manifest_digest.hex().to_string());
            keep_blobs.insert(r.config_digest.hex().to_string());
            for l in r.layers {
                keep_layers.insert(l.diff_id.hex().to_string());
                keep_blobs.insert(l.blob.hex().to_string());
            }
        }
        let mut rep = PruneReport::default();
        let ioe = |p: &Path, e: io::Error| ImageError::io(format!("pruning {}", p.display()), e);
        for (sub, keep, is_layer) in [
            ("layers", &keep_layers, true),
            ("blobs/sha256", &keep_blobs, false),
        ] {
            let dir = self.root.join(sub);
            for e in std::fs::read_dir(&dir).map_err(|e| ioe(&dir, e))? {
                let e = e.map_err(|e| ioe(&dir, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let p = e.path();
                rep.bytes_freed += tree_size(&p);
                if is_layer {
                    remove_tree(&p).map_err(|e| ioe(&p, e))?;
                    rep.layers_removed += 1;
                } else {
                    std::fs::remove_file(&p).map_err(|e| ioe(&p, e))?;
                    rep.blobs_removed += 1;
                }
            }
        }
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(|e| ioe(&tmp, e))? {
            let p = e.map_err(|e| ioe(&tmp, e))?.path();
            rep.bytes_freed += tree_size(&p);
            remove_tree(&p).map_err(|e| ioe(&p, e))?;
            rep.staging_removed += 1;
        }
        Ok(rep)
    }

    /// The diff ids (hex) of the unpacked layers in the store.
    pub fn layer_ids(&self) -> Result<HashSet<String>, ImageError> {
        let dir = self.root.join("layers");
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        Ok(rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// Removes those of `layers` that no image uses (unpacked folder and
    /// blob), under the store's lock; returns how many. For a failed build
    /// that must not leave its layers behind: unlike [`Store::prune`] it
    /// leaves alone the layers other builds are making meanwhile.
    pub fn remove_unused_layers(&self, layers: &[LayerInfo]) -> Result<usize, ImageError> {
        self.check_writable()?;
        let _lock = lock(&self.root.join("lock"), true)?;
        let mut used = HashSet::new();
        for r in self.list()? {
            for l in r.layers {
                used.insert(l.diff_id.hex().to_string());
            }
        }
        let ioe = |p: &Path, e: io::Error| ImageError::io(format!("removing {}", p.display()), e);
        let mut n = 0;
        for l in layers {
            if used.contains(l.diff_id.hex()) {
                continue;
            }
            let dir = self.layer_dir(&l.diff_id);
            if dir.exists() {
                remove_tree(&dir).map_err(|e| ioe(&dir, e))?;
                n += 1;
            }
            let blob = self.blob_path(&l.blob);
            match std::fs::remove_file(&blob) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ioe(&blob, e)),
            }
        }
        Ok(n)
    }

    /// Cache statistics (persisted in `stats.log`).
    pub fn stats(&self) -> Result<Stats, ImageError> {
        let mut s = Stats::default();
        let p = self.root.join("stats.log");
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                for line in text.lines() {
                    // A torn last line (crash mid-append) is skipped.
                    let Ok(l) = serde_json::from_str::<StatLine>(line) else {
                        continue;
                    };
                    match l.source {
                        LayerSource::Reused => {
                            s.layers_reused += 1;
                            s.bytes_reused += l.bytes;
                        }
                        LayerSource::Fetched => {
                            s.layers_fetched += 1;
                            s.bytes_fetched += l.bytes;
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(format!("reading {}", p.display()), e)),
        }
        let n = s.layers_reused + s.layers_fetched;
        s.hit_ratio = if n == 0 {
            0.0
        } else {
            s.layers_reused as f64 / n as f64
        };
        s.images = self.list()?.len() as u64;
        s.layers = std::fs::read_dir(self.root.join("layers")).map_or(0, |d| d.count() as u64);
        Ok(s)
    }

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.mode == UnpackMode::Rootful && euid() != 0 {
            return Err(ImageError::WrongMode(self.root.clone()));
        }
        Ok(())
    }

    /// Start a transaction: a staging folder under tmp/ and a shared lock.
    pub(crate) fn begin(&self, op: &str) -> Result<Txn<'_>, ImageError> {
        self.check_writable()?;
        let guard = lock(&self.root.join("lock"), false)?;
        self.clean_stale_staging();
        let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{}-{n}-{}", std::process::id(), now()));
        std::fs::create_dir(&dir)
            .map_err(|e| self.write_err(&dir, "creating a staging folder", e))?;
        Ok(Txn {
            store: self,
            _lock: guard,
            dir,
            op: op.to_string(),
            counter: AtomicU64::new(0),
            staged: Mutex::new(Staged::default()),
        })
    }

    /// Remove staging folders of processes that are gone (killed mid-pull).
    fn clean_stale_staging(&self) {
        let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks for existence.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                let _ = remove_tree(&e.path());
            }
        }
    }

    pub(crate) fn write_err(&self, p: &Path, what: &str, e: io::Error) -> ImageError {
        if is_enospc(&e) {
            ImageError::DiskFull(self.root.clone(), what.to_string())
        } else {
            ImageError::io(format!("{what} ({})", p.display()), e)
        }
    }

    /// Build helper: turn a directory diff — an overlayfs upper directory,
    /// with whiteouts as char 0:0 devices and opaque directories marked by
    /// `trusted.overlay.opaque` / `user.overlay.opaque` = `y` — into a layer:
    /// an uncompressed OCI layer tar blob plus its unpacked directory.
    ///
    /// Ownership in the tar: rootful, host ids in the sandbox range are
    /// shifted back (`ROOTFUL_ID_BASE + n` → `n`), others become 0;
    /// rootless, everything becomes 0:0 (the caller is the image's root).
    /// Char/block devices other than whiteouts and sockets are skipped.
    /// Entries are sorted, timestamps kept: the same tree gives the same
    /// digest. Returns the layer; record it in an image with
    /// [`Store::commit_image`] (until then `prune` may remove it).
    pub fn add_layer_from_dir(&self, dir: &Path) -> Result<LayerInfo, ImageError> {
        let txn = self.begin("build")?;
        let tar_path = txn.temp_path("layer.tar");
        {
            let f = File::create(&tar_path)
                .map_err(|e| self.write_err(&tar_path, "writing a layer tar", e))?;
            let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, f));
            b.mode(tar::HeaderMode::Complete);
            let mut links = BTreeMap::new();
            crate::store::diff_to_tar(&mut b, dir, Path::new(""), self.mode, &mut links)
                .map_err(|e| self.write_err(dir, "turning a directory into a layer", e))?;
            let w = b
                .into_inner()
                .map_err(|e| self.write_err(&tar_path, "writing a layer tar", e))?;
            let f = w
                .into_inner()
                .map_err(|e| self.write_err(&tar_path, "writing a layer tar", e.into_error()))?;
            f.sync_all()
                .map_err(|e| self.write_err(&tar_path, "writing a layer tar", e))?;
        }
        let f = File::open(&tar_path)
            .map_err(|e| ImageError::io(format!("reading {}", tar_path.display()), e))?;
        let info = txn.add_layer(f, "built layer", None, None)?;
        // The tar is the blob (uncompressed: blob digest = diff_id).
        txn.adopt_blob_file(&tar_path, &info.blob)?;
        txn.commit(&[])?;
        Ok(info)
    }

    /// Build helper: record image `reference` made of `parent`'s layers
    /// (if any) followed by `layers`, with run defaults `config` (not
    /// inherited: pass the parent's [`ImageRoot::config`] modified). Writes
    /// an OCI config and manifest blob. Every layer must be in the store.
    pub fn commit_image(
        &self,
        reference: &str,
        parent: Option<&str>,
        layers: &[LayerInfo],
        config: &ImageConfig,
    ) -> Result<ImageRecord, ImageError> {
        let canonical = Reference::parse(reference)?.to_string();
        let mut all = match parent {
            Some(p) => self.record(p)?.layers,
            None => Vec::new(),
        };
        all.extend_from_slice(layers);
        for l in &all {
            if !self.has_layer(&l.diff_id) {
                return Err(ImageError::invalid(
                    format!("image {canonical}"),
                    format!(
                        "layer {} is not in the store (add it with add_layer_from_dir first)",
                        l.diff_id
                    ),
                ));
            }
        }
        let txn = self.begin("build")?;
        let cfg_file = ConfigFile::build(
            all.iter().map(|l| l.diff_id.clone()).collect(),
            config,
            Vec::new(),
        );
        let cfg_bytes =
            serde_json::to_vec(&cfg_file).map_err(|e| ImageError::invalid("image config", e))?;
        let (config_digest, manifest_digest) = txn.put_manifest(&cfg_bytes, &all)?;
        let rec = ImageRecord {
            reference: canonical,
            manifest_digest,
            config_digest,
            layers: all,
            config: config.clone(),
            platform: cfg_file.platform(),
            source: "build".into(),
            stored_at: now(),
        };
        txn.commit(std::slice::from_ref(&rec))?;
        Ok(rec)
    }
}

/// Total size of the files under `p` (not following symlinks).
fn tree_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            n += tree_size(&e.path());
        }
    }
    n
}

/// Write `bytes` to `dest` atomically: a temp file in the store's tmp/, fsync, rename.
pub(crate) fn write_atomic(root: &Path, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = root
        .join("tmp")
        .join(format!("{}-w{n}", std::process::id()));
    let res = (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        if is_enospc(&e) {
            return Err(ImageError::DiskFull(
                root.to_path_buf(),
                format!("writing {}", dest.display()),
            ));
        }
        return Err(ImageError::io(format!("writing {}", dest.display()), e));
    }
    Ok(())
}

#[derive(Default)]
struct Staged {
    /// Staged blob files → digest.
    blobs: Vec<(PathBuf, Digest)>,
    /// Staged layer dirs → diff_id.
    layers: Vec<(PathBuf, Digest)>,
    stats: Vec<StatLine>,
}

/// A store transaction: everything is written under `tmp/<pid>-…/`, and
/// moved into place by [`Txn::commit`]; dropping it uncommitted removes
/// the staging folder, leaving the store as it was.
pub(crate) struct Txn<'s> {
    pub(crate) store: &'s Store,
    _lock: LockGuard,
    dir: PathBuf,
    op: String,
    counter: AtomicU64,
    staged: Mutex<Staged>,
}

impl Txn<'_> {
    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        match self.staged.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A fresh path inside the staging folder.
    pub(crate) fn temp_path(&self, hint: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n}-{hint}"))
    }

    /// Record that a layer was already present (for stats).
    pub(crate) fn note_reused(&self, diff_id: &Digest, bytes: u64) {
        self.staged().stats.push(StatLine {
            op: self.op.clone(),
            layer: diff_id.clone(),
            source: LayerSource::Reused,
            bytes,
        });
    }

    /// Stage a verified blob file already inside the staging folder.
    /// (A blob already stored or staged is not staged twice.)
    pub(crate) fn adopt_blob_file(&self, path: &Path, digest: &Digest) -> Result<(), ImageError> {
        if self.store.has_blob(digest) {
            return Ok(());
        }
        let mut st = self.staged();
        if !st.blobs.iter().any(|(_, d)| d == digest) {
            st.blobs.push((path.to_path_buf(), digest.clone()));
        }
        Ok(())
    }

    /// Is this blob staged in this transaction?
    pub(crate) fn staged_blob(&self, digest: &Digest) -> Option<PathBuf> {
        self.staged()
            .blobs
            .iter()
            .find(|(_, d)| d == digest)
            .map(|(p, _)| p.clone())
    }

    /// Stage a blob from bytes; returns its digest.
    pub(crate) fn put_blob(&self, bytes: &[u8]) -> Result<Digest, ImageError> {
        let d = Digest::of(bytes);
        if self.store.has_blob(&d) {
            return Ok(d);
        }
        let p = self.temp_path("blob");
        std::fs::write(&p, bytes).map_err(|e| self.store.write_err(&p, "writing a blob", e))?;
        self.staged().blobs.push((p, d.clone()));
        Ok(d)
    }

    /// Stage config bytes and an OCI manifest over `layers`; returns
    /// (config digest, manifest digest).
    pub(crate) fn put_manifest(
        &self,
        config: &[u8],
        layers: &[LayerInfo],
    ) -> Result<(Digest, Digest), ImageError> {
        let config_digest = self.put_blob(config)?;
        let m = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            config: Some(Descriptor {
                media_type: OCI_CONFIG.into(),
                digest: config_digest.clone(),
                size: config.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            }),
            layers: layers
                .iter()
                .map(|l| Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.blob.clone(),
                    size: l.blob_size,
                    platform: None,
                    annotations: BTreeMap::new(),
                })
                .collect(),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&m).map_err(|e| ImageError::invalid("manifest", e))?;
        let md = self.put_blob(&bytes)?;
        Ok((config_digest, md))
    }

    /// Unpack a layer stream into staging. When `expect_diff` / `expect_blob`
    /// are given they are checked. Counts as a fetched layer in stats.
    pub(crate) fn add_layer<R: io::Read + Send>(
        &self,
        reader: R,
        name: &str,
        expect_blob: Option<&Digest>,
        expect_diff: Option<&Digest>,
    ) -> Result<LayerInfo, ImageError> {
        let dest = self.temp_path("layer");
        let rep: UnpackReport =
            unpack_layer(reader, &dest, self.store.mode, name).map_err(|e| {
                if e.is_disk_full() {
                    ImageError::DiskFull(self.store.root.clone(), format!("unpacking layer {name}"))
                } else {
                    e
                }
            })?;
        if let Some(b) = expect_blob {
            if *b != rep.blob_digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("layer blob {name}"),
                    expected: b.to_string(),
                    actual: rep.blob_digest.to_string(),
                });
            }
        }
        if let Some(d) = expect_diff {
            if *d != rep.diff_id {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {name} (diff_id in the image config)"),
                    expected: d.to_string(),
                    actual: rep.diff_id.to_string(),
                });
            }
        }
        let media_type = media_type_of(&rep);
        let mut st = self.staged();
        st.layers.push((dest, rep.diff_id.clone()));
        st.stats.push(StatLine {
            op: self.op.clone(),
            layer: rep.diff_id.clone(),
            source: LayerSource::Fetched,
            bytes: rep.blob_size,
        });
        Ok(LayerInfo {
            diff_id: rep.diff_id,
            blob: rep.blob_digest,
            blob_size: rep.blob_size,
            media_type,
        })
    }

    /// Move everything staged into place, then write the image record
    /// (last, so a reader never sees a record whose layers are missing).
    pub(crate) fn commit(self, records: &[ImageRecord]) -> Result<(), ImageError> {
        let store = self.store;
        let st = std::mem::take(&mut *self.staged());
        for (p, d) in &st.blobs {
            let dest = store.blob_path(d);
            if dest.exists() {
                continue;
            }
            std::fs::rename(p, &dest).map_err(|e| store.write_err(&dest, "storing a blob", e))?;
        }
        for (p, d) in &st.layers {
            let dest = store.layer_dir(d);
            if dest.exists() {
                continue; // same content, unpacked by someone else meanwhile
            }
            match std::fs::rename(p, &dest) {
                Ok(()) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {}
                Err(e) => return Err(store.write_err(&dest, "storing a layer", e)),
            }
        }
        for rec in records {
            let bytes = serde_json::to_vec_pretty(rec)
                .map_err(|e| ImageError::invalid("image record", e))?;
            write_atomic(&store.root, &store.record_path(&rec.reference), &bytes)?;
        }
        if !st.stats.is_empty() {
            let mut text = String::new();
            for l in &st.stats {
                if let Ok(s) = serde_json::to_string(l) {
                    text.push_str(&s);
                    text.push('\n');
                }
            }
            let p = store.root.join("stats.log");
            // One write with O_APPEND: concurrent writers do not interleave lines.
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .and_then(|mut f| f.write_all(text.as_bytes()));
            if let Err(e) = r {
                return Err(store.write_err(&p, "updating cache statistics", e));
            }
        }
        Ok(())
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        let _ = remove_tree(&self.dir);
    }
}

fn media_type_of(rep: &UnpackReport) -> String {
    match rep.compression {
        "gzip" => format!("{OCI_LAYER_TAR}+gzip"),
        "zstd" => format!("{OCI_LAYER_TAR}+zstd"),
        _ => OCI_LAYER_TAR.to_string(),
    }
}

/// Append the overlay diff at `dir/rel` to a tar builder.
pub(crate) fn diff_to_tar<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    mode: UnpackMode,
    links: &mut BTreeMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    use nanoclaw_sandbox::native::{ROOTFUL_ID_BASE, ROOTFUL_ID_COUNT};
    use std::os::unix::fs::FileTypeExt;
    let full = dir.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&full)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    let ids = |md: &std::fs::Metadata| -> (u64, u64) {
        let map = |id: u32| -> u64 {
            match mode {
                UnpackMode::Rootless => 0,
                UnpackMode::Rootful => {
                    if (ROOTFUL_ID_BASE..ROOTFUL_ID_BASE + ROOTFUL_ID_COUNT).contains(&id) {
                        u64::from(id - ROOTFUL_ID_BASE)
                    } else {
                        0
                    }
                }
            }
        };
        (map(md.uid()), map(md.gid()))
    };
    for name in names {
        let r = rel.join(&name);
        let p = dir.join(&r);
        let md = std::fs::symlink_metadata(&p)?;
        let ft = md.file_type();
        let mut h = tar::Header::new_gnu();
        let (uid, gid) = ids(&md);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_mode(md.mode() & 0o7777);
        if ft.is_char_device() && md.rdev() == 0 {
            let mut wh = name.clone();
            wh.clear();
            wh.push(".wh.");
            wh.push(&name);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o600);
            b.append_data(&mut h, rel.join(wh), io::empty())?;
        } else if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, &r, io::empty())?;
            let opaque = ["trusted.overlay.opaque", "user.overlay.opaque"]
                .iter()
                .any(|k| get_xattr(&p, k).as_deref() == Some(b"y"));
            if opaque {
                let mut o = tar::Header::new_gnu();
                o.set_entry_type(tar::EntryType::Regular);
                o.set_size(0);
                o.set_mode(0o600);
                o.set_mtime(md.mtime().max(0) as u64);
                b.append_data(&mut o, r.join(".wh..wh..opq"), io::empty())?;
            }
            diff_to_tar(b, dir, &r, mode, links)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&p)?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &r, &target)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &r, first)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), r.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            let f = File::open(&p)?;
            b.append_data(&mut h, &r, f)?;
        } else if ft.is_fifo() {
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_size(0);
            b.append_data(&mut h, &r, io::empty())?;
        }
        // Devices other than whiteouts and sockets: not part of an image.
    }
    Ok(())
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let cn = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: valid C strings and a buffer of the given length.
    let n =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    Some(buf[..n as usize].to_vec())
}
