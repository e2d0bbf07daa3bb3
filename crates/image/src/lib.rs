//! nanoclaw's OCI image store: content-addressed blobs, layers unpacked once
//! and shared between images, `docker save` / OCI-layout import and pull from
//! OCI / Docker registries (v2 API).
//!
//! # Using an image (the engine side)
//!
//! ```no_run
//! # fn main() -> Result<(), nanoclaw_image::ImageError> {
//! let store = nanoclaw_image::Store::open_default()?;
//! let root = store.resolve("python:3.11-slim")?; // local only, never pulls
//! // root.layers: lowest first. overlayfs wants the highest first:
//! let lowerdir: Vec<String> =
//!     root.layers.iter().rev().map(|p| p.display().to_string()).collect();
//! let _opts = format!(
//!     "lowerdir={}{}",
//!     lowerdir.join(":"),
//!     if root.rootless_xattrs { ",userxattr" } else { "" }
//! );
//! # Ok(()) }
//! ```
//!
//! # On-disk format (what the engine mounts)
//!
//! The store lives in `$NANOCLAW_DATA_DIR/images` if that variable is set,
//! else `/var/lib/nanoclaw/images` as root, else
//! `$XDG_DATA_HOME/nanoclaw/images` (default `~/.local/share/nanoclaw/images`):
//!
//! ```text
//! store.json               {"version":1,"rootless":bool}: the mode the store's layers were made for
//! lock                     flock(2): shared by writers that add, exclusive for rm/prune
//! stats.log                one JSON line per layer use (reused or fetched), appended
//! tmp/<pid>-<n>/           staging: every write happens here, then rename(2)s into place
//! blobs/sha256/<hex>       verified blobs: compressed layers, configs, manifests
//! layers/<hex>/            a layer unpacked; <hex> = its diff_id (sha256 of the uncompressed tar)
//! images/<escaped ref>.json one record per image reference (see [`ImageRecord`])
//! ```
//!
//! Layers are unpacked for overlayfs, per store mode:
//!
//! | OCI layer entry        | rootful store (euid 0)                           | rootless store                                   |
//! |------------------------|--------------------------------------------------|--------------------------------------------------|
//! | `dir/.wh.NAME`         | `dir/NAME`: char device 0:0, mode 0, owner `ROOTFUL_ID_BASE` | `dir/NAME`: char device 0:0 (Linux ≥ 5.8 lets any user make it), owner the caller |
//! | `dir/.wh..wh..opq`     | xattr `user.overlay.opaque=y` on `dir` (mount with `userxattr`) | xattr `user.overlay.opaque=y` on `dir` (mount with `userxattr`) |
//! | other `.wh..wh.*`      | ignored (AUFS bookkeeping)                       | ignored                                          |
//! | uid/gid N              | `ROOTFUL_ID_BASE + N` (N ≥ 65536 → base + 65534)  | the caller (cannot chown)                        |
//! | setuid/setgid bits     | kept (the sandbox mounts nosuid)                 | kept                                             |
//! | char/block devices     | skipped (counted in the unpack report)           | skipped                                          |
//! | fifos                  | created                                          | created                                          |
//! | xattrs in the tar      | dropped (a layer must not smuggle `overlay.*`)   | dropped                                          |
//!
//! The layer root directory itself is `root:root 0755` (rootless: the caller,
//! 0755). [`ImageRoot::rootless_xattrs`] tells which xattr namespace the
//! layers use: mount with `userxattr` exactly when it is true.
//!
//! # Building images (for `image build`)
//!
//! [`Store::add_layer_from_dir`] turns an overlay upper directory (whiteouts
//! as char 0:0, opaque dirs by xattr, as the kernel writes them) into a layer
//! tar blob plus an unpacked layer; [`Store::commit_image`] records an image
//! from a parent's layers plus new ones and a config.
#![warn(missing_docs)]

pub mod bound;
pub mod build;
mod digest;
mod error;
pub mod go;
mod import;
mod lock;
mod oci;
mod progress;
mod reference;
mod registry;
mod store;
mod unpack;

pub use digest::Digest;
pub use error::ImageError;
pub use oci::{ImageConfig, Platform};
pub use reference::Reference;
pub use registry::PullOptions;
pub use store::{
    ImageRecord, ImageRoot, LayerInfo, LayerSource, PruneReport, Stats, Store, STORE_VERSION,
};
pub use unpack::{unpack_layer, UnpackMode, UnpackReport};

/// The store's `Result`.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
