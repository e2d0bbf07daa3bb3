//! Bind mounts: parsing `HOST:CONTAINER[:ro|rw]`, and the checks that keep
//! them from opening the host: dangerous host sources (canonicalised, so
//! symlinks and `..` do not bypass the check) and container targets that
//! would shadow the sandbox's own `/proc`, `/dev`, `/sys`, `/etc` or `/`.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::model::{Access, BindMount};

/// The host's filesystem, as the checks see it (a trait so that tests can
/// describe a host).
pub trait HostFs {
    /// `realpath`: symlinks and `..` resolved; an error if it does not exist.
    fn canonicalize(&self, p: &Path) -> io::Result<PathBuf>;
    /// True if the path exists (following symlinks).
    fn exists(&self, p: &Path) -> bool;
    /// Home folders whose secrets must not be mounted (`$HOME`, `/root`,
    /// `/home/*`).
    fn home_dirs(&self) -> Vec<PathBuf>;
}

/// The real filesystem.
#[derive(Debug, Clone, Default)]
pub struct RealFs {
    /// `$HOME`, if known.
    pub home: Option<PathBuf>,
}

impl HostFs for RealFs {
    fn canonicalize(&self, p: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(p)
    }

    fn exists(&self, p: &Path) -> bool {
        p.exists()
    }

    fn home_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.home.iter().cloned().collect();
        v.push(PathBuf::from("/root"));
        if let Ok(rd) = std::fs::read_dir("/home") {
            v.extend(rd.flatten().map(|e| e.path()));
        }
        v
    }
}

/// Host paths that must never be mounted, and why.
pub const DANGEROUS_SYSTEM_PATHS: &[(&str, &str)] = &[
    ("/", "the host's whole filesystem"),
    (
        "/etc",
        "the host's configuration, including password hashes",
    ),
    ("/proc", "the host's processes and kernel interfaces"),
    ("/sys", "the host's kernel settings and devices"),
    ("/dev", "the host's devices"),
    ("/boot", "the host's kernel and boot loader"),
    (
        "/var/run/docker.sock",
        "the Docker socket, which is root on the host",
    ),
    (
        "/run/docker.sock",
        "the Docker socket, which is root on the host",
    ),
    (
        "/run/containerd/containerd.sock",
        "the containerd socket, which is root on the host",
    ),
    (
        "/var/run/containerd/containerd.sock",
        "the containerd socket, which is root on the host",
    ),
    (
        "/run/podman/podman.sock",
        "the Podman socket, which is root on the host",
    ),
    (
        "/run/crio/crio.sock",
        "the CRI-O socket, which is root on the host",
    ),
];

/// Secret folders inside a home folder.
pub const HOME_SECRETS: &[(&str, &str)] = &[
    (".ssh", "SSH keys"),
    (".aws", "AWS credentials"),
    (".gnupg", "GnuPG keys"),
    (".kube", "Kubernetes credentials"),
    (".docker", "Docker registry credentials"),
];

/// Container paths a bind mount must not shadow.
pub const PROTECTED_TARGETS: &[&str] = &["/proc", "/dev", "/sys", "/etc"];

/// Parses `HOST:CONTAINER[:ro|rw]`. `~/` at the start of HOST is `home`.
pub fn parse_bind(s: &str, home: Option<&Path>) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let usage = || {
        format!("bind mount {s:?} must look like HOST:CONTAINER[:ro|rw] with absolute paths, e.g. /home/user/data:/data:ro")
    };
    let (host, container, access) = match parts.as_slice() {
        [h, c] => (*h, *c, Access::Ro),
        [h, c, "ro"] => (*h, *c, Access::Ro),
        [h, c, "rw"] => (*h, *c, Access::Rw),
        [_, _, m] => {
            return Err(format!(
                "bind mount {s:?} has mode {m:?}: the mode must be ro or rw"
            ))
        }
        _ => return Err(usage()),
    };
    let host = if let Some(rest) = host.strip_prefix("~/") {
        match home {
            Some(h) => h.join(rest),
            None => {
                return Err(format!(
                    "bind mount {s:?} uses ~ but HOME is not set; write the full path"
                ))
            }
        }
    } else if host == "~" {
        match home {
            Some(h) => h.to_path_buf(),
            None => {
                return Err(format!(
                    "bind mount {s:?} uses ~ but HOME is not set; write the full path"
                ))
            }
        }
    } else {
        PathBuf::from(host)
    };
    if !host.is_absolute() || !container.starts_with('/') {
        return Err(usage());
    }
    Ok(BindMount {
        host,
        container: normalize_lexically(Path::new(container)),
        access,
    })
}

/// Resolves `.` and `..` without touching the filesystem (for paths inside
/// the sandbox). `..` never climbs above `/`.
pub fn normalize_lexically(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Why a container target is refused, if it is.
pub fn target_problem(target: &Path) -> Option<String> {
    let t = normalize_lexically(target);
    if t == Path::new("/") {
        return Some(format!(
            "bind mount target {} would replace the sandbox's whole root; choose a target such as /data or /mnt/NAME",
            target.display()
        ));
    }
    for p in PROTECTED_TARGETS {
        if t.starts_with(p) {
            return Some(format!(
                "bind mount target {} would shadow the sandbox's {p}, which must stay nanoclaw's own; choose a target such as /data or /mnt/NAME",
                target.display()
            ));
        }
    }
    None
}

/// How a host source relates to a dangerous path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Danger {
    /// The source is the dangerous path.
    Is(PathBuf, &'static str),
    /// The source is inside it.
    Inside(PathBuf, &'static str),
    /// The source contains it (a parent folder).
    Contains(PathBuf, &'static str),
    /// The source is an environment file.
    EnvFile,
}

impl Danger {
    /// A human explanation.
    pub fn explain(&self) -> String {
        match self {
            Danger::Is(p, what) => format!("{} is {what}", p.display()),
            Danger::Inside(p, what) => format!("it is inside {} ({what})", p.display()),
            Danger::Contains(p, what) => format!("it contains {} ({what})", p.display()),
            Danger::EnvFile => "it is a .env file, which holds secrets".to_string(),
        }
    }
}

fn is_env_name(name: &str) -> bool {
    name == ".env" || name.starts_with(".env.")
}

/// Checks a canonical host source against the dangerous paths.
pub fn source_danger(canon: &Path, fs: &dyn HostFs) -> Option<Danger> {
    let mut list: Vec<(PathBuf, &'static str)> = Vec::new();
    for (p, what) in DANGEROUS_SYSTEM_PATHS {
        let p = PathBuf::from(p);
        if let Ok(c) = fs.canonicalize(&p) {
            if c != p {
                list.push((c, what));
            }
        }
        list.push((p, what));
    }
    for home in fs.home_dirs() {
        for (name, what) in HOME_SECRETS {
            let p = home.join(name);
            if let Ok(c) = fs.canonicalize(&p) {
                if c != p {
                    list.push((c, what));
                }
            }
            list.push((p, what));
        }
    }
    for (d, what) in &list {
        if canon == d {
            return Some(Danger::Is(d.clone(), what));
        }
    }
    for (d, what) in &list {
        if d != Path::new("/") && canon.starts_with(d) {
            return Some(Danger::Inside(d.clone(), what));
        }
    }
    for (d, what) in &list {
        if d.starts_with(canon) {
            return Some(Danger::Contains(d.clone(), what));
        }
    }
    // Secret folders and .env files anywhere: by name, and one level down.
    for c in canon.components() {
        if let Component::Normal(n) = c {
            let n = n.to_string_lossy();
            if let Some((name, what)) = HOME_SECRETS.iter().find(|(s, _)| *s == n) {
                let upto: PathBuf = canon
                    .ancestors()
                    .find(|a| a.file_name().is_some_and(|f| f == *name))
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| canon.to_path_buf());
                return Some(Danger::Inside(upto, what));
            }
        }
    }
    if canon
        .file_name()
        .is_some_and(|n| is_env_name(&n.to_string_lossy()))
    {
        return Some(Danger::EnvFile);
    }
    for (name, what) in HOME_SECRETS {
        let p = canon.join(name);
        if fs.exists(&p) {
            return Some(Danger::Contains(p, what));
        }
    }
    let env = canon.join(".env");
    if fs.exists(&env) {
        return Some(Danger::Contains(env, "a .env file, which holds secrets"));
    }
    None
}

/// Checks one bind mount (e.g. from `--mount`) the way the config file's
/// are checked: the target must not shadow `/proc`, `/dev`, `/sys`, `/etc`
/// or `/`; the source must exist and, unless `allow_unsafe`, must not be a
/// dangerous host path. `Ok` carries warnings.
pub fn check_mount(
    b: &BindMount,
    fs: &dyn HostFs,
    allow_unsafe: bool,
) -> Result<Vec<String>, String> {
    if let Some(p) = target_problem(&b.container) {
        return Err(p);
    }
    let canon = fs.canonicalize(&b.host).map_err(|_| {
        format!(
            "bind mount source {} does not exist on this host; create it or fix the path",
            b.host.display()
        )
    })?;
    match source_danger(&canon, fs) {
        None => Ok(Vec::new()),
        Some(d) if allow_unsafe => Ok(vec![format!(
            "dangerous bind mount source {} allowed: {}",
            b.host.display(),
            d.explain()
        )]),
        Some(d) => Err(format!(
            "bind mount source {} is a dangerous host path: {}; sandboxed code could read or change it. Mount a narrower folder",
            b.host.display(),
            d.explain()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let b = parse_bind("/a/b:/data:rw", None).unwrap();
        assert_eq!(b.host, PathBuf::from("/a/b"));
        assert_eq!(b.container, PathBuf::from("/data"));
        assert_eq!(b.access, Access::Rw);
        assert_eq!(parse_bind("/a:/b", None).unwrap().access, Access::Ro);
        assert_eq!(
            parse_bind("~/x:/x", Some(Path::new("/home/u")))
                .unwrap()
                .host,
            PathBuf::from("/home/u/x")
        );
        assert!(parse_bind("rel:/x", None).is_err());
        assert!(parse_bind("/a:/b:rx", None).is_err());
        assert!(parse_bind("/a", None).is_err());
        assert_eq!(
            parse_bind("/a:/x/../../proc", None).unwrap().container,
            PathBuf::from("/proc")
        );
    }

    #[test]
    fn targets() {
        assert!(target_problem(Path::new("/proc")).is_some());
        assert!(target_problem(Path::new("/etc/passwd")).is_some());
        assert!(target_problem(Path::new("/")).is_some());
        assert!(target_problem(Path::new("/data/../sys")).is_some());
        assert!(target_problem(Path::new("/data")).is_none());
        assert!(target_problem(Path::new("/etcetera")).is_none());
    }
}
