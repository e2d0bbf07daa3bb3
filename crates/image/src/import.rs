//! `nanoclaw image import`: `docker save` tarballs (the classic form with
//! `<id>/layer.tar`, and Docker ≥ 25's OCI-layout-in-docker-save form) and
//! OCI image layouts (a directory or a tar of one: `oci-layout`,
//! `index.json`, `blobs/sha256/…`). Every blob whose name is a digest is
//! verified, every layer's diff_id is checked against the image config.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::oci::{ConfigFile, DockerSaveEntry, Manifest, DOCKER_LIST, OCI_INDEX};
use crate::store::{ImageRecord, LayerInfo, Txn};
use crate::unpack::{unpack_layer, UnpackMode};
use crate::{Digest, ImageError, Platform, Reference, Store};

impl Store {
    /// Import every image in `path` (a `docker save` tarball, an OCI
    /// layout directory, or a tar of one; gzip/zstd-compressed tarballs
    /// too). `tag` names the image (required when the archive carries no
    /// name; with several images in the archive it is an error). Returns
    /// the records stored. Nothing is stored unless everything verifies.
    pub fn import(&self, path: &Path, tag: Option<&str>) -> Result<Vec<ImageRecord>, ImageError> {
        let txn = self.begin("import")?;
        let md = std::fs::metadata(path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        let (src, owned) = if md.is_dir() {
            (path.to_path_buf(), false)
        } else {
            let dest = txn.temp_path("src");
            let f = File::open(path)
                .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
            // Safe extraction (no traversal, no symlink following); owner untouched.
            unpack_layer(f, &dest, UnpackMode::Rootless, &path.display().to_string()).map_err(
                |e| match e {
                    ImageError::Invalid { reason, .. } => ImageError::invalid(
                        format!("archive {}", path.display()),
                        format!(
                            "{reason} (expected a `docker save` tarball or an OCI image layout)"
                        ),
                    ),
                    other => other,
                },
            )?;
            (dest, true)
        };
        let src = src
            .canonicalize()
            .map_err(|e| ImageError::io(format!("resolving {}", src.display()), e))?;
        let mut imp = Importer {
            txn: &txn,
            src,
            owned,
            done: HashMap::new(),
            source: format!("import {}", path.display()),
        };
        let mut records = if imp.src.join("manifest.json").is_file() {
            imp.docker_save()?
        } else if imp.src.join("index.json").is_file() {
            imp.oci_layout()?
        } else {
            return Err(ImageError::invalid(
                format!("archive {}", path.display()),
                "neither a `docker save` tarball (no manifest.json) nor an OCI image layout (no index.json)",
            ));
        };
        if let Some(t) = tag {
            let distinct: std::collections::HashSet<_> =
                records.iter().map(|r| r.config_digest.clone()).collect();
            if distinct.len() > 1 {
                return Err(ImageError::invalid(
                    format!("archive {}", path.display()),
                    format!("it holds {} images; --tag names only one (import without --tag to keep their names)", distinct.len()),
                ));
            }
            let name = Reference::parse(t)?.to_string();
            if let Some(mut r) = records.pop() {
                r.reference = name;
                records = vec![r];
            }
        } else if let Some(r) = records.iter().find(|r| r.reference.is_empty()) {
            return Err(ImageError::invalid(
                format!("archive {}", path.display()),
                format!(
                    "image {} has no name in the archive; pass --tag NAME",
                    r.config_digest
                ),
            ));
        }
        if records.is_empty() {
            return Err(ImageError::invalid(
                format!("archive {}", path.display()),
                "it holds no image",
            ));
        }
        txn.commit(&records)?;
        Ok(records)
    }
}

struct Importer<'t, 's> {
    txn: &'t Txn<'s>,
    src: PathBuf,
    owned: bool,
    /// diff_id → layer, for layers already handled in this import.
    done: HashMap<Digest, LayerInfo>,
    source: String,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `blobs/sha256/<hex>` or `<hex>.json` → the digest in the name.
fn digest_in_name(rel: &str) -> Option<Digest> {
    let last = rel.rsplit('/').next()?;
    let hex = last.strip_suffix(".json").unwrap_or(last);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

impl Importer<'_, '_> {
    /// A file inside the source, refusing anything that leaves it.
    fn file(&self, rel: &str) -> Result<PathBuf, ImageError> {
        if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            return Err(ImageError::invalid(
                "archive",
                format!("path {rel:?} leaves the archive"),
            ));
        }
        let p = self.src.join(rel);
        let real = p
            .canonicalize()
            .map_err(|e| ImageError::invalid("archive", format!("{rel}: {e}")))?;
        if !real.starts_with(&self.src) || !real.is_file() {
            return Err(ImageError::invalid(
                "archive",
                format!("{rel:?} is not a file inside the archive"),
            ));
        }
        Ok(real)
    }

    fn read(&self, rel: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.file(rel)?;
        std::fs::read(&p).map_err(|e| ImageError::io(format!("reading {rel} in the archive"), e))
    }

    fn blob(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let bytes = self.read(&format!("blobs/sha256/{}", d.hex()))?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {d} in the archive"),
                expected: d.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    /// Unpack (or reuse) one layer.
    fn layer(
        &mut self,
        rel: &str,
        expect_blob: Option<&Digest>,
        diff: &Digest,
    ) -> Result<LayerInfo, ImageError> {
        if let Some(l) = self.done.get(diff) {
            return Ok(l.clone());
        }
        let p = self.file(rel)?;
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let info = if self.txn.store.has_layer(diff) {
            self.txn.note_reused(diff, size);
            LayerInfo {
                diff_id: diff.clone(),
                blob: expect_blob.cloned().unwrap_or_else(|| diff.clone()),
                blob_size: size,
                media_type: crate::oci::OCI_LAYER_TAR.into(),
            }
        } else {
            let f = File::open(&p)
                .map_err(|e| ImageError::io(format!("reading {rel} in the archive"), e))?;
            let info = self.txn.add_layer(f, rel, expect_blob, Some(diff))?;
            // Keep the verified blob: move it when the source is our own
            // extraction, copy it from a user's directory.
            if !self.txn.store.has_blob(&info.blob) && self.txn.staged_blob(&info.blob).is_none() {
                let dest = if self.owned {
                    p.clone()
                } else {
                    let dest = self.txn.temp_path("blob");
                    std::fs::copy(&p, &dest)
                        .map_err(|e| self.txn.store.write_err(&dest, "storing a blob", e))?;
                    dest
                };
                self.txn.adopt_blob_file(&dest, &info.blob)?;
            }
            info
        };
        self.done.insert(diff.clone(), info.clone());
        Ok(info)
    }

    fn config(&self, bytes: &[u8], nlayers: usize) -> Result<ConfigFile, ImageError> {
        let cfg = ConfigFile::parse(bytes)?;
        if cfg.rootfs.diff_ids.len() != nlayers {
            return Err(ImageError::invalid(
                "image config",
                format!(
                    "it lists {} diff_ids for {} layers",
                    cfg.rootfs.diff_ids.len(),
                    nlayers
                ),
            ));
        }
        Ok(cfg)
    }

    fn record(
        &self,
        name: String,
        manifest_digest: Digest,
        config_digest: Digest,
        cfg: &ConfigFile,
        layers: Vec<LayerInfo>,
    ) -> ImageRecord {
        ImageRecord {
            reference: name,
            manifest_digest,
            config_digest,
            layers,
            config: cfg.image_config(),
            platform: cfg.platform(),
            source: self.source.clone(),
            stored_at: now(),
        }
    }

    fn docker_save(&mut self) -> Result<Vec<ImageRecord>, ImageError> {
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&self.read("manifest.json")?)
            .map_err(|e| ImageError::invalid("docker save manifest.json", e))?;
        let mut out = Vec::new();
        for e in entries {
            let cfg_bytes = self.read(&e.config)?;
            let config_digest = Digest::of(&cfg_bytes);
            if let Some(named) = digest_in_name(&e.config) {
                if named != config_digest {
                    return Err(ImageError::DigestMismatch {
                        what: format!("image config {}", e.config),
                        expected: named.to_string(),
                        actual: config_digest.to_string(),
                    });
                }
            }
            let cfg = self.config(&cfg_bytes, e.layers.len())?;
            let mut layers = Vec::new();
            for (rel, diff) in e.layers.iter().zip(cfg.rootfs.diff_ids.iter()) {
                // Docker ≥ 25 names layers blobs/sha256/<digest>; the classic
                // <id>/layer.tar is an uncompressed tar checked by diff_id.
                let expect_blob = if rel.starts_with("blobs/") {
                    digest_in_name(rel)
                } else {
                    None
                };
                layers.push(self.layer(rel, expect_blob.as_ref(), diff)?);
            }
            let (_, manifest_digest) = self.txn.put_manifest(&cfg_bytes, &layers)?;
            let names: Vec<String> = e.repo_tags.clone().unwrap_or_default();
            if names.is_empty() {
                out.push(self.record(String::new(), manifest_digest, config_digest, &cfg, layers));
            } else {
                for n in names {
                    let r = Reference::parse(&n)?.to_string();
                    out.push(self.record(
                        r,
                        manifest_digest.clone(),
                        config_digest.clone(),
                        &cfg,
                        layers.clone(),
                    ));
                }
            }
        }
        Ok(out)
    }

    fn oci_layout(&mut self) -> Result<Vec<ImageRecord>, ImageError> {
        let layout = self.read("oci-layout").unwrap_or_default();
        if !layout.is_empty() {
            let v: serde_json::Value = serde_json::from_slice(&layout)
                .map_err(|e| ImageError::invalid("oci-layout", e))?;
            if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                return Err(ImageError::invalid(
                    "oci-layout",
                    "imageLayoutVersion is not 1.0.0",
                ));
            }
        }
        let index = Manifest::parse(&self.read("index.json")?, None)?;
        let want = Platform::host();
        let mut out = Vec::new();
        for desc in &index.manifests {
            let name = desc
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| {
                    // A bare tag ("latest") is no name; a full reference is.
                    desc.annotations
                        .get("org.opencontainers.image.ref.name")
                        .filter(|n| n.contains('/'))
                })
                .map(|n| Reference::parse(n).map(|r| r.to_string()))
                .transpose()?
                .unwrap_or_default();
            let mut mdesc = desc.clone();
            let mut bytes = self.blob(&mdesc.digest)?;
            let mut m = Manifest::parse(&bytes, Some(&mdesc.media_type))?;
            if m.is_index(Some(&mdesc.media_type))
                || mdesc.media_type == OCI_INDEX
                || mdesc.media_type == DOCKER_LIST
            {
                let Some(pick) = m
                    .manifests
                    .iter()
                    .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
                    .or_else(|| m.manifests.iter().find(|d| d.platform.is_none()))
                    .cloned()
                else {
                    return Err(ImageError::NoPlatform {
                        reference: if name.is_empty() {
                            desc.digest.to_string()
                        } else {
                            name.clone()
                        },
                        wanted: want.to_string(),
                        available: m
                            .manifests
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                };
                mdesc = pick;
                bytes = self.blob(&mdesc.digest)?;
                m = Manifest::parse(&bytes, Some(&mdesc.media_type))?;
            }
            let Some(cdesc) = m.config.clone() else {
                return Err(ImageError::invalid("manifest", "no config descriptor"));
            };
            let cfg_bytes = self.blob(&cdesc.digest)?;
            let cfg = self.config(&cfg_bytes, m.layers.len())?;
            let mut layers = Vec::new();
            for (l, diff) in m.layers.iter().zip(cfg.rootfs.diff_ids.iter()) {
                let rel = format!("blobs/sha256/{}", l.digest.hex());
                let mut info = self.layer(&rel, Some(&l.digest), diff)?;
                info.media_type = l.media_type.clone();
                layers.push(info);
            }
            self.txn.put_blob(&cfg_bytes)?;
            let manifest_digest = self.txn.put_blob(&bytes)?;
            out.push(self.record(name, manifest_digest, cdesc.digest.clone(), &cfg, layers));
        }
        Ok(out)
    }
}
