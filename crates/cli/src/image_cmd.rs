//! `nanoclaw image …`: pull, import, ls, inspect, rm, prune, stats.
//!
//! # Wiring (for main.rs)
//!
//! ```ignore
//! mod image_cmd;
//!
//! enum Command {
//!     // ... existing variants ...
//!     /// Manage images: pull, import, ls, inspect, rm, prune, stats.
//!     #[command(subcommand)]
//!     Image(image_cmd::ImageCommand),
//! }
//!
//! // in main():
//! Command::Image(c) => image_cmd::run_image(c),
//! ```
//!
//! and in crates/cli/Cargo.toml (already added):
//! `nanoclaw-image = { path = "../image" }`.
//!
//! `run_image` returns `anyhow::Result<u8>` like `run_cmd::run`: `Ok(0)` on
//! success; an `Err` is one clear line (main prints it as `nanoclaw: …`
//! and exits 125). Output for humans goes to stdout, progress to stderr.
//! The store is `$NANOCLAW_DATA_DIR/images`, else `/var/lib/nanoclaw/images`
//! as root, else `$XDG_DATA_HOME/nanoclaw/images`.

use std::path::PathBuf;

use clap::Subcommand;
use nanoclaw_image::{Platform, PullOptions, Store};

/// `nanoclaw image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from an OCI / Docker registry (v2 API).
    Pull {
        /// Image reference: NAME[:TAG][@DIGEST] (e.g. python:3.11-slim, localhost:5000/app:1).
        reference: String,
        /// Talk plain HTTP to the registry (never done without this flag, not even for localhost).
        #[arg(long)]
        insecure: bool,
        /// Platform to pick from a multi-platform image (default: this host's), e.g. linux/arm64.
        #[arg(long)]
        platform: Option<String>,
        /// Do not draw a progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Import a `docker save` tarball or an OCI image layout (directory or tar).
    Import {
        /// The tarball or directory.
        file: PathBuf,
        /// Name for the image (required when the archive carries no name).
        #[arg(long, short)]
        tag: Option<String>,
    },
    /// List local images.
    #[command(alias = "list")]
    Ls {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record, config and layer directories as JSON.
    Inspect {
        /// Image reference or id.
        reference: String,
    },
    /// Remove an image reference (its layers stay until `image prune`).
    #[command(alias = "remove")]
    Rm {
        /// Image references or ids.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove layers and blobs no image uses, and leftovers of interrupted pulls.
    Prune,
    /// Build an image from a Dockerfile; every RUN runs in a nanoclaw sandbox.
    Build(Box<crate::build_cmd::BuildArgs>),
    /// Pull ahead of time the images the config names: `execution.preload_images`
    /// (a list, or `true` for every image in `execution.languages`) and
    /// every agent's `sandbox.image`. Images already in the store are skipped.
    Preload {
        /// Config file (default: the usual discovery).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Talk plain HTTP to the registries.
        #[arg(long)]
        insecure: bool,
    },
    /// Layer cache statistics (hit ratio across pulls, imports and builds).
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// Run one `nanoclaw image` subcommand.
pub fn run_image(cmd: ImageCommand) -> anyhow::Result<u8> {
    let store = Store::open_default()?;
    match cmd {
        ImageCommand::Build(a) => return crate::build_cmd::run_build(*a),
        ImageCommand::Preload { config, insecure } => {
            let refs = preload_list(config.as_deref())?;
            if refs.is_empty() {
                println!("nothing to preload: the config names no images (execution.preload_images, execution.languages, agents' sandbox.image)");
            }
            for r in refs {
                if store.resolve(&r).is_ok() {
                    println!("{r}: present");
                    continue;
                }
                let rec = store.pull(
                    &r,
                    &PullOptions {
                        insecure,
                        ..PullOptions::default()
                    },
                )?;
                println!("{r}: pulled ({})", rec.reference);
            }
        }
        ImageCommand::Pull {
            reference,
            insecure,
            platform,
            quiet,
        } => {
            let platform = platform.as_deref().map(Platform::parse).transpose()?;
            let before = store.stats()?;
            let rec = store.pull(
                &reference,
                &PullOptions {
                    insecure,
                    platform,
                    progress: !quiet,
                    ..Default::default()
                },
            )?;
            let after = store.stats()?;
            println!(
                "pulled {} ({}): {} layers, {} downloaded, {} already here",
                rec.reference,
                rec.manifest_digest,
                rec.layers.len(),
                after.layers_fetched - before.layers_fetched,
                after.layers_reused - before.layers_reused
            );
        }
        ImageCommand::Import { file, tag } => {
            for rec in store.import(&file, tag.as_deref())? {
                println!(
                    "imported {} (id {}, {} layers)",
                    rec.reference,
                    &rec.config_digest.hex()[..12],
                    rec.layers.len()
                );
            }
        }
        ImageCommand::Ls { json } => {
            let list = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<50} {:<14} {:>7} {:>10}",
                    "REFERENCE", "IMAGE ID", "LAYERS", "SIZE"
                );
                for r in list {
                    let size: u64 = r.layers.iter().map(|l| l.blob_size).sum();
                    println!(
                        "{:<50} {:<14} {:>7} {:>10}",
                        r.reference,
                        &r.config_digest.hex()[..12],
                        r.layers.len(),
                        human(size)
                    );
                }
            }
        }
        ImageCommand::Inspect { reference } => {
            let rec = store.record(&reference)?;
            let root = store.resolve(&reference)?;
            let mut v = serde_json::to_value(&rec)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("id".into(), serde_json::json!(rec.config_digest));
                o.insert("layer_dirs".into(), serde_json::json!(root.layers));
                o.insert(
                    "rootless_xattrs".into(),
                    serde_json::json!(root.rootless_xattrs),
                );
                o.insert("store".into(), serde_json::json!(store.root()));
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ImageCommand::Rm { references } => {
            for r in references {
                let rec = store.remove(&r)?;
                println!("removed {}", rec.reference);
            }
        }
        ImageCommand::Prune => {
            let rep = store.prune()?;
            println!(
                "removed {} layers, {} blobs, {} leftovers; freed {}",
                rep.layers_removed,
                rep.blobs_removed,
                rep.staging_removed,
                human(rep.bytes_freed)
            );
        }
        ImageCommand::Stats { json } => {
            let s = store.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("images:          {}", s.images);
                println!("layers stored:   {}", s.layers);
                println!(
                    "layers reused:   {} ({} not downloaded)",
                    s.layers_reused,
                    human(s.bytes_reused)
                );
                println!(
                    "layers fetched:  {} ({})",
                    s.layers_fetched,
                    human(s.bytes_fetched)
                );
                println!("cache hit ratio: {:.1}%", s.hit_ratio * 100.0);
            }
        }
    }
    Ok(0)
}

/// The image references a config asks to have locally.
fn preload_list(config: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    use nanoclaw_policy::model::PreloadImages;
    let Some((path, _, loaded)) = crate::config_cmd::find_and_load(config)? else {
        anyhow::bail!(
            "image preload needs a config file: give --config FILE or set NANOCLAW_CONFIG"
        );
    };
    if loaded.has_errors() {
        anyhow::bail!(
            "{} has errors; run `nanoclaw config validate --config {}`",
            path.display(),
            path.display()
        );
    }
    let c = &loaded.config;
    // An image reference, not a host interpreter path or the host root.
    let is_image = |v: &str| !v.starts_with('/') && v != "host";
    let mut refs: Vec<String> = match &c.execution.preload_images {
        Some(PreloadImages::List(l)) => l.clone(),
        Some(PreloadImages::All(true)) => c
            .execution
            .languages
            .values()
            .filter(|v| is_image(v))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    let sections =
        std::iter::once(&c.agents.defaults.sandbox).chain(c.agents.list.iter().map(|a| &a.sandbox));
    for sb in sections {
        if let Some(i) = sb.image.as_deref().filter(|i| is_image(i)) {
            refs.push(i.to_string());
        }
    }
    refs.sort();
    refs.dedup();
    Ok(refs)
}
