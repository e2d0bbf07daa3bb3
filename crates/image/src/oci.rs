//! OCI / Docker document types (manifests, indexes, image configs) and the
//! part of an image config that a sandbox uses ([`ImageConfig`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, ImageError};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// What a sandbox takes from an image's config: the defaults for a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` entries, in order.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absolute), if set.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image says.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint argv (empty if none).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command argv, appended to the entrypoint (empty if none).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Labels (`LABEL` in a Dockerfile).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An OS/architecture pair, e.g. `linux/amd64` or `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// GOARCH spelling: `amd64`, `arm64`, `arm`, `386`, `riscv64`, ...
    pub architecture: String,
    /// `v7`, `v8`, ... when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's platform.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, ImageError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, var] if !os.is_empty() && !arch.is_empty() && !var.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(var.to_string()),
                })
            }
            _ => Err(ImageError::invalid(
                "platform",
                format!("{s:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64"),
            )),
        }
    }

    /// True if a manifest for `other` can run where `self` is wanted.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest (OCI or Docker v2 schema 2) or an index / manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    pub(crate) fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ImageError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::invalid("manifest", format!("not a v2 manifest: {e}")))?;
        let mt = m.media_type.as_deref().or(content_type).unwrap_or("");
        if m.schema_version == 1 || mt.starts_with(DOCKER_SCHEMA1) {
            return Err(ImageError::invalid(
                "manifest",
                "Docker schema 1 manifests are obsolete and not supported; re-push the image with a current Docker or tool",
            ));
        }
        Ok(m)
    }

    /// Is this an index / manifest list (rather than an image manifest)?
    pub(crate) fn is_index(&self, content_type: Option<&str>) -> bool {
        let mt = self.media_type.as_deref().or(content_type).unwrap_or("");
        mt == OCI_INDEX
            || mt == DOCKER_LIST
            || (self.config.is_none() && !self.manifests.is_empty())
    }
}

/// The image config document (what `docker inspect` shows under Config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

impl ConfigFile {
    pub(crate) fn parse(bytes: &[u8]) -> Result<ConfigFile, ImageError> {
        serde_json::from_slice(bytes).map_err(|e| ImageError::invalid("image config", e))
    }

    pub(crate) fn image_config(&self) -> ImageConfig {
        let c = &self.config;
        ImageConfig {
            env: c.env.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
            user: c.user.clone().filter(|u| !u.is_empty()),
            entrypoint: c.entrypoint.clone().unwrap_or_default(),
            cmd: c.cmd.clone().unwrap_or_default(),
            labels: c.labels.clone().unwrap_or_default(),
        }
    }

    pub(crate) fn platform(&self) -> Platform {
        Platform {
            os: if self.os.is_empty() {
                "linux".into()
            } else {
                self.os.clone()
            },
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }

    /// A config for `image build`: the platform of this host, diff_ids and run config.
    pub(crate) fn build(
        diff_ids: Vec<Digest>,
        cfg: &ImageConfig,
        history: Vec<serde_json::Value>,
    ) -> ConfigFile {
        let p = Platform::host();
        let opt_vec = |v: &Vec<String>| if v.is_empty() { None } else { Some(v.clone()) };
        ConfigFile {
            architecture: p.architecture,
            os: p.os,
            variant: None,
            created: None,
            config: RunConfig {
                user: cfg.user.clone(),
                env: opt_vec(&cfg.env),
                entrypoint: opt_vec(&cfg.entrypoint),
                cmd: opt_vec(&cfg.cmd),
                working_dir: cfg.working_dir.clone(),
                labels: if cfg.labels.is_empty() {
                    None
                } else {
                    Some(cfg.labels.clone())
                },
            },
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids,
            },
            history,
        }
    }
}

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DockerSaveEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}
