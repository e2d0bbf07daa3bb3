//! The store's typed error.

use std::path::PathBuf;

/// Everything that can go wrong in the image store. Each message says what
/// is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is not in the local store.
    #[error("image {0} not found locally: run `nanoclaw image pull {0}` (or `nanoclaw image import FILE`)")]
    NotFound(String),
    /// A reference that does not parse.
    #[error("invalid image reference {0:?}: {1}")]
    InvalidReference(String, String),
    /// A digest that does not parse.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// Content whose digest is not the one announced.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the data is corrupt (in transit or at the source) and nothing was stored")]
    DigestMismatch {
        /// What was checked (a blob, a manifest, a layer's diff_id).
        what: String,
        /// The digest announced by the manifest or reference.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// A layer tar that would write outside its directory or is malformed.
    #[error("refusing layer {layer}: entry {entry:?}: {reason}")]
    UnsafeLayer {
        /// The layer's blob digest or file name.
        layer: String,
        /// The offending tar entry.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A malformed manifest, index, config or archive.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry answered with an error or could not be reached.
    #[error("registry {registry}: {message}")]
    Registry {
        /// The registry host.
        registry: String,
        /// What happened and what to do.
        message: String,
    },
    /// No manifest in an index matches the wanted platform.
    #[error("image {reference} has no manifest for platform {wanted} (available: {available}); pass --platform")]
    NoPlatform {
        /// The reference pulled.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// What the index offers.
        available: String,
    },
    /// The store was created in the other mode (rootful vs rootless).
    #[error("image store {0} was created by root for rootful sandboxes; as an ordinary user use your own store (unset NANOCLAW_DATA_DIR or point it at a folder of yours)")]
    WrongMode(PathBuf),
    /// The disk holding the store is full.
    #[error("no space left on the device holding the image store ({0}) while {1}; free space or run `nanoclaw image prune`; nothing half-written was kept")]
    DiskFull(PathBuf, String),
    /// Another I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// An I/O error with context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// An invalid-document error.
    pub(crate) fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> ImageError {
        ImageError::Invalid {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// True for ENOSPC / EDQUOT anywhere in the error.
    pub(crate) fn is_disk_full(&self) -> bool {
        match self {
            ImageError::Io { source, .. } => is_enospc(source),
            ImageError::DiskFull(..) => true,
            _ => false,
        }
    }
}

pub(crate) fn is_enospc(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
            .is_some_and(is_enospc)
}
