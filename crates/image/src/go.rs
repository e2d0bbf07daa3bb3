//! `nanoclaw run --lang go`: compile a snippet with the root's `go`, then
//! run it.
//!
//! # Build caches: nothing writable is shared between sandboxes
//!
//! Go's build cache is a content-addressed store that `go build` trusts: an
//! entry that names the right action id is linked into the program without
//! any check of its bytes. A cache that one sandbox can write and another
//! reads is therefore a way to run code in the other sandbox (and a way to
//! leave files on the host past every size limit). So:
//!
//! * Each run has its own writable cache, [`GO_RUN_CACHE`], on the
//!   sandbox's size-limited `/tmp` tmpfs (`--tmpfs-size`). It is gone with
//!   the sandbox; nothing in it is ever fed back anywhere.
//! * The compiled standard library is shared read-only: [`std_cache`]
//!   publishes it once per toolchain under [`std_cache_base`] and a run
//!   mounts it read-only at [`GO_SHARED_CACHE_TARGET`]; the run's script
//!   links its entries into the per-run cache (`cp -Rs`). It is filled only
//!   by nanoclaw itself: a separate warm-up sandbox over the same root runs
//!   `go build std` (nanoclaw's fixed command, no user input, no mounts,
//!   no network) into its own tmpfs, then streams the cache out as a tar
//!   on stdout, which the engine bounds ([`WARM_UP_MAX_BYTES`]). nanoclaw
//!   unpacks only well-formed cache entries (`xx/<64 hex>-a|-d`, regular
//!   files) into a staging directory it owns, and renames it into place.
//!   Nothing a user's snippet writes can reach it.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nanoclaw_sandbox::spec::{Network, Root, User};
use nanoclaw_sandbox::{KillReason, RunOptions, SandboxSpec};

use crate::Digest;

/// Where a run finds the shared, read-only standard-library cache.
pub const GO_SHARED_CACHE_TARGET: &str = "/nanoclaw/gocache";

/// The run's own writable build cache (on the sandbox's `/tmp` tmpfs).
pub const GO_RUN_CACHE: &str = "/tmp/nanoclaw-go/cache";

/// The largest snippet [`go_command`] passes (it travels as one argument;
/// Linux caps one argument at 128 KiB).
pub const GO_MAX_CODE: usize = 120 * 1024;

/// The most the warm-up may hand over (its tar stream): past it the engine
/// kills the warm-up and nothing is published.
pub const WARM_UP_MAX_BYTES: u64 = 512 << 20;

/// After a failed warm-up, runs go without the shared cache (compiling
/// what they need themselves) for this long before trying again.
pub const WARM_UP_RETRY: Duration = Duration::from_secs(3600);

/// Bumped when the warm-up or the environment below changes, so that old
/// shared caches are not used.
const CACHE_FORMAT: &str = "nanoclaw-go-std-v1";

/// What can go wrong with `--lang go`.
#[derive(Debug, thiserror::Error)]
pub enum GoError {
    /// The snippet is too large to pass as an argument.
    #[error("the Go snippet is {0} bytes; at most {GO_MAX_CODE} can be passed (put the program in a --workspace and run `go run` there)")]
    TooLarge(usize),
    /// A host file operation on the shared cache failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The shared cache directory exists but is not nanoclaw's.
    #[error("{} is not owned by this user or is writable by others; remove it and nanoclaw will build it again", .0.display())]
    Untrusted(PathBuf),
    /// The warm-up sandbox could not run.
    #[error("the warm-up sandbox could not run: {0}")]
    Sandbox(#[from] nanoclaw_sandbox::Error),
    /// The warm-up ran but did not succeed.
    #[error("the warm-up (`go build std` in a sandbox) failed: {0}")]
    WarmUp(String),
    /// A recent warm-up failed; not retried yet.
    #[error("the warm-up failed {} min ago (see {}); retried after {} min", .age.as_secs() / 60, .marker.display(), WARM_UP_RETRY.as_secs() / 60)]
    RecentFailure {
        /// How long ago.
        age: Duration,
        /// The file with the failure.
        marker: PathBuf,
    },
    /// The warm-up was interrupted (SIGINT, SIGTERM, SIGHUP).
    #[error("interrupted")]
    Interrupted,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> GoError + 'a {
    move |source| GoError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `nanoclaw run --lang go` runs instead of an interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRun {
    /// The command (`/bin/sh -c SCRIPT sh CODE ARGS...`).
    pub command: Vec<String>,
    /// Environment to add (GOCACHE, GOPATH, GOPROXY, GOTOOLCHAIN, ...).
    pub env: Vec<(String, String)>,
}

/// The environment of every Go build nanoclaw runs, with the cache at
/// `cache`. The warm-up and the runs must agree on everything here that
/// goes into Go's cache keys (CGO_ENABLED, GOFLAGS, ...).
fn go_env(cache: &str) -> Vec<(String, String)> {
    [
        ("GOCACHE", cache),
        ("GOPATH", "/tmp/nanoclaw-go/gopath"),
        ("GOPROXY", "off"),
        ("GOTOOLCHAIN", "local"),
        ("GO111MODULE", "off"),
        ("CGO_ENABLED", "0"),
        ("HOME", "/tmp"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Build the `--lang go` command for `code` with program arguments `args`.
/// The snippet goes to `/tmp/nanoclaw-go/main.go` (the sandbox's tmpfs);
/// the run's cache [`GO_RUN_CACHE`] starts as symlinks to the shared
/// standard-library cache when one is mounted at [`GO_SHARED_CACHE_TARGET`];
/// `go build` compiles offline (`GOPROXY=off`, `GOTOOLCHAIN=local`,
/// standard library only); then the binary is exec'd with `args`. Needs
/// `/tmp` executable (not `--tmp-noexec`) and room in it for the cache and
/// the binary.
pub fn go_command(code: &str, args: &[String]) -> Result<GoRun, GoError> {
    if code.len() > GO_MAX_CODE {
        return Err(GoError::TooLarge(code.len()));
    }
    let script = format!(
        "set -e; d=/tmp/nanoclaw-go; c={GO_RUN_CACHE}; mkdir -p \"$c\"; \
         if [ -d {GO_SHARED_CACHE_TARGET} ]; then cp -Rs {GO_SHARED_CACHE_TARGET}/. \"$c/\" 2>/dev/null || true; fi; \
         printf '%s' \"$1\" > \"$d/main.go\"; shift; \
         cd \"$d\"; go build -o \"$d/main\" main.go; exec \"$d/main\" \"$@\""
    );
    let mut command = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        script,
        "sh".to_string(),
        code.to_string(),
    ];
    command.extend(args.iter().cloned());
    Ok(GoRun {
        command,
        env: go_env(GO_RUN_CACHE),
    })
}

/// The per-user host folder for the shared standard-library caches:
/// `$NANOCLAW_DATA_DIR/cache/go-std`, else `/var/cache/nanoclaw/go-std` as
/// root, else `$XDG_CACHE_HOME/nanoclaw/go-std` (`~/.cache/nanoclaw/go-std`).
pub fn std_cache_base() -> PathBuf {
    if let Some(d) = std::env::var_os("NANOCLAW_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("cache/go-std");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/nanoclaw/go-std");
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(x).join("nanoclaw/go-std");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/nanoclaw/go-std")
}

/// Identity of the `go` a root would run (first in `path`): its resolved
/// path, size, mtime and inode, so an upgraded toolchain gets a new cache.
fn go_identity(prefix: &Path, path: &str) -> String {
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = prefix.join(dir.trim_start_matches('/')).join("go");
        let Ok(real) = std::fs::canonicalize(&candidate) else {
            continue;
        };
        if let Ok(md) = std::fs::metadata(&real) {
            if md.is_file() {
                return format!(
                    "go {} {} {} {}",
                    real.display(),
                    md.len(),
                    md.mtime_nsec() + md.mtime() * 1_000_000_000,
                    md.ino()
                );
            }
        }
    }
    "go not found".to_string()
}

/// The cache key of a root's toolchain: the root (layers are
/// content-addressed directories), the `PATH` its `go` is found in and,
/// for the host or a directory, that binary's identity.
fn cache_key(root: &Root, path: &str) -> String {
    let mut d = format!("{CACHE_FORMAT}\nPATH {path}\n");
    match root {
        Root::Host => d.push_str(&format!("host\n{}\n", go_identity(Path::new("/"), path))),
        Root::Dir(p) => d.push_str(&format!("dir {}\n{}\n", p.display(), go_identity(p, path))),
        Root::Layers(ls) => {
            for l in ls {
                d.push_str(&format!("layer {}\n", l.display()));
            }
        }
        Root::Image(r) => d.push_str(&format!("image {r}\n")),
    }
    Digest::of(d.as_bytes()).hex()[..24].to_string()
}

/// A published cache is used only if this user owns it and nobody else can
/// write it.
fn trusted(dir: &Path) -> Result<bool, GoError> {
    match std::fs::symlink_metadata(dir) {
        Ok(md) => {
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            if md.is_dir() && md.uid() == me && md.mode() & 0o022 == 0 {
                Ok(true)
            } else {
                Err(GoError::Untrusted(dir.to_path_buf()))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("reading", dir)(e)),
    }
}

/// The shared, read-only standard-library cache for `root` (whose `go`
/// is found in `path`, default the engine's) under `base` (normally
/// [`std_cache_base`]), published by a warm-up sandbox running as `user`
/// if there is none yet. Mount the result read-only at
/// [`GO_SHARED_CACHE_TARGET`].
pub fn std_cache(
    base: &Path,
    root: &Root,
    path: Option<&str>,
    user: User,
) -> Result<PathBuf, GoError> {
    let path = path.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let base = base.to_path_buf();
    let dir = base.join(cache_key(root, path));
    if trusted(&dir)? {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base).map_err(io_err("creating", &base))?;
    let _lock = crate::lock::lock(&base.join(".lock"), true).map_err(|e| GoError::Io {
        what: "locking",
        path: base.join(".lock"),
        source: io::Error::other(e.to_string()),
    })?;
    if trusted(&dir)? {
        return Ok(dir);
    }
    remove_leftovers(&base);
    let marker = dir.with_extension("failed");
    if let Ok(age) = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    {
        if age < WARM_UP_RETRY {
            return Err(GoError::RecentFailure { age, marker });
        }
    }
    let tar = match warm_up(root, path, user) {
        Ok(t) => t,
        Err(e) => {
            if !matches!(e, GoError::Interrupted) {
                let _ = std::fs::write(&marker, format!("{e}\n"));
            }
            return Err(e);
        }
    };
    let staging = base.join(format!(".staging-{}", std::process::id()));
    let published = publish(&tar, &staging).and_then(|n| {
        if n == 0 {
            return Err(GoError::WarmUp("it produced no cache entries".into()));
        }
        std::fs::rename(&staging, &dir).map_err(io_err("publishing", &dir))
    });
    if let Err(e) = published {
        let _ = std::fs::remove_dir_all(&staging);
        let _ = std::fs::write(&marker, format!("{e}\n"));
        return Err(e);
    }
    let _ = std::fs::remove_file(&marker);
    Ok(dir)
}

/// Staging directories of publishers that died (the caller holds the lock,
/// so no live publisher has one).
fn remove_leftovers(base: &Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".staging-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs `go build std` in a sandbox over `root` with its cache on its own
/// tmpfs, and returns that cache as a tar (the sandbox's stdout).
fn warm_up(root: &Root, path: &str, user: User) -> Result<Vec<u8>, GoError> {
    let cache = "/tmp/nanoclaw-go/warm-up";
    let script =
        format!("set -e; mkdir -p {cache}; go build std >&2; cd {cache}; exec tar -cf - .");
    let mut spec = SandboxSpec::new(["/bin/sh".to_string(), "-c".to_string(), script]);
    spec.root = root.clone();
    spec.env = go_env(cache);
    spec.env.push(("PATH".into(), path.into()));
    spec.user = user;
    spec.workdir = Some("/tmp".into());
    spec.network = Network::None;
    spec.hostname = "nanoclaw-go-warm-up".into();
    let l = &mut spec.limits;
    l.memory = Some(2 << 30);
    l.tmpfs_size = 1 << 30;
    l.timeout = Duration::from_secs(600);
    l.cpus = std::thread::available_parallelism()
        .ok()
        .map(|n| n.get() as f64);
    l.output_limit = WARM_UP_MAX_BYTES;
    let sb = nanoclaw_sandbox::start(
        &spec,
        RunOptions {
            stream: false,
            handle_signals: true,
            exit_after_wait: false,
        },
    )?;
    let o = nanoclaw_sandbox::wait(sb)?;
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(&b[b.len().saturating_sub(400)..]).into_owned();
        s.trim().replace('\n', " | ")
    };
    match (o.killed_by, o.exit_code) {
        (Some(KillReason::Killed), _) => Err(GoError::Interrupted),
        (Some(KillReason::OutputLimit), _) => Err(GoError::WarmUp(format!(
            "its cache is larger than {} MiB",
            WARM_UP_MAX_BYTES >> 20
        ))),
        (Some(k), _) => Err(GoError::WarmUp(format!("killed ({k:?})"))),
        (None, Some(0)) => Ok(o.stdout),
        (None, c) => Err(GoError::WarmUp(format!("exit {c:?}: {}", tail(&o.stderr)))),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A Go cache entry name in subdirectory `sub`: `<64 hex>-a` or `-d`,
/// starting with `sub`.
fn is_entry(sub: &str, name: &str) -> bool {
    match name.split_once('-') {
        Some((id, kind)) => is_hex(id, 64) && id.starts_with(sub) && (kind == "a" || kind == "d"),
        None => false,
    }
}

/// Unpacks the warm-up's tar into `staging` (created, owned by this
/// process): only `xx/` directories and `xx/<id>-a|-d` regular files, with
/// modes 0755/0644; everything else is skipped. Returns the entries written.
fn publish(tar: &[u8], staging: &Path) -> Result<usize, GoError> {
    std::fs::create_dir(staging).map_err(io_err("creating", staging))?;
    let bad = |e: io::Error| GoError::WarmUp(format!("its tar stream is malformed: {e}"));
    let mut n = 0;
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                _ => {
                    parts.clear();
                    parts.push(String::new());
                    break;
                }
            }
        }
        let kind = entry.header().entry_type();
        match parts.as_slice() {
            [sub, name] if kind.is_file() && is_hex(sub, 2) && is_entry(sub, name) => {
                let d = staging.join(sub);
                if !d.is_dir() {
                    std::fs::create_dir(&d).map_err(io_err("creating", &d))?;
                }
                let f = d.join(name);
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&f)
                    .map_err(io_err("creating", &f))?;
                let mut body = Vec::new();
                entry.read_to_end(&mut body).map_err(bad)?;
                io::Write::write_all(&mut out, &body).map_err(io_err("writing", &f))?;
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644))
                    .map_err(io_err("chmod", &f))?;
                n += 1;
            }
            _ => {}
        }
    }
    for e in std::fs::read_dir(staging)
        .map_err(io_err("reading", staging))?
        .flatten()
    {
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &e.path()))?;
    }
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", staging))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_command_shape() {
        let g = go_command("package main\nfunc main(){}", &["a".into()]).unwrap();
        assert_eq!(g.command[4], "package main\nfunc main(){}");
        assert_eq!(g.command[5], "a");
        assert!(g.command[2].contains(GO_SHARED_CACHE_TARGET));
        assert!(g
            .env
            .iter()
            .any(|(k, v)| k == "GOCACHE" && v == GO_RUN_CACHE));
        assert!(GO_RUN_CACHE.starts_with("/tmp/"), "on the sandbox's tmpfs");
        assert!(go_command(&"x".repeat(GO_MAX_CODE + 1), &[]).is_err());
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(body.len() as u64);
            h.set_mode(0o777);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // Raw name bytes, so "../" paths can be written too.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *body).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Only well-formed cache entries are published, as plain files.
    #[test]
    fn publish_takes_only_cache_entries() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("s");
        let id = format!("ab{}", "0".repeat(62));
        let ok_a = format!("./ab/{id}-a");
        let ok_d = format!("ab/{id}-d");
        let wrong_sub = format!("cd/{id}-a");
        let link = format!("ab/{}-a", "1".repeat(64).replacen("11", "ab", 1));
        let tar = tar_of(&[
            ("./", tar::EntryType::Directory, b""),
            ("ab/", tar::EntryType::Directory, b""),
            (&ok_a, tar::EntryType::Regular, b"v1 entry\n"),
            (&ok_d, tar::EntryType::Regular, b"output"),
            (&wrong_sub, tar::EntryType::Regular, b"x"),
            (&link, tar::EntryType::Symlink, b""),
            ("../escape", tar::EntryType::Regular, b"x"),
            ("ab/../../escape2", tar::EntryType::Regular, b"x"),
            ("README", tar::EntryType::Regular, b"x"),
            ("ab/notanentry", tar::EntryType::Regular, b"x"),
        ]);
        assert_eq!(publish(&tar, &staging).unwrap(), 2);
        let mut found: Vec<String> = walk(&staging);
        found.sort();
        assert_eq!(found, [format!("ab/{id}-a"), format!("ab/{id}-d")]);
        assert!(!t.path().join("escape").exists() && !t.path().join("escape2").exists());
        let md = std::fs::symlink_metadata(staging.join(format!("ab/{id}-a"))).unwrap();
        assert!(md.is_file() && md.mode() & 0o777 == 0o644);
        assert_eq!(
            std::fs::read(staging.join(format!("ab/{id}-d"))).unwrap(),
            b"output"
        );
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                for f in walk(&p) {
                    out.push(format!("{}/{f}", e.file_name().to_string_lossy()));
                }
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }

    #[test]
    fn keys_differ_by_root_and_path() {
        let host = cache_key(&Root::Host, "/usr/bin:/bin");
        assert_eq!(host, cache_key(&Root::Host, "/usr/bin:/bin"));
        assert_ne!(host, cache_key(&Root::Host, "/usr/local/go/bin:/usr/bin"));
        let l1 = cache_key(&Root::Layers(vec!["/s/a".into()]), "/usr/bin");
        let l2 = cache_key(
            &Root::Layers(vec!["/s/a".into(), "/s/b".into()]),
            "/usr/bin",
        );
        assert_ne!(l1, l2);
        assert_ne!(l1, cache_key(&Root::Host, "/usr/bin"));
    }
}
