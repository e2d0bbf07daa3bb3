#![allow(dead_code)]
//! Helpers shared by the integration tests: a described host filesystem
//! and loading with a fixed environment.

use std::io;
use std::path::{Path, PathBuf};

use nanoclaw_policy::binds::{normalize_lexically, HostFs};
use nanoclaw_policy::decode::DecodeEnv;
use nanoclaw_policy::{parse, Loaded};

/// A host described by its existing paths and symlinks.
pub struct FakeFs {
    pub paths: Vec<PathBuf>,
    pub links: Vec<(PathBuf, PathBuf)>,
    pub homes: Vec<PathBuf>,
}

impl FakeFs {
    /// The host used by the seed tests.
    pub fn standard() -> Self {
        let paths = [
            "/",
            "/etc",
            "/proc",
            "/sys",
            "/dev",
            "/boot",
            "/run",
            "/run/docker.sock",
            "/var",
            "/var/run",
            "/home",
            "/home/user",
            "/home/user/data",
            "/home/user/.ssh",
            "/tmp",
            "/tmp/cache",
            "/projects",
            "/shared",
            "/shared/lib",
            "/data",
            "/srv",
            "/srv/ws",
            "/srv/app",
            "/srv/app/.env",
            "/root",
            "/root/.aws",
        ];
        FakeFs {
            paths: paths.iter().map(PathBuf::from).collect(),
            links: vec![
                (PathBuf::from("/var/run"), PathBuf::from("/run")),
                (PathBuf::from("/srv/innocent"), PathBuf::from("/etc")),
            ],
            homes: vec![PathBuf::from("/home/user"), PathBuf::from("/root")],
        }
    }
}

impl HostFs for FakeFs {
    fn canonicalize(&self, p: &Path) -> io::Result<PathBuf> {
        let mut p = normalize_lexically(p);
        for _ in 0..8 {
            let mut changed = false;
            for (from, to) in &self.links {
                if let Ok(rest) = p.strip_prefix(from) {
                    p = if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    };
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        if self.paths.contains(&p) {
            Ok(p)
        } else {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such file"))
        }
    }

    fn exists(&self, p: &Path) -> bool {
        self.canonicalize(p).is_ok()
    }

    fn home_dirs(&self) -> Vec<PathBuf> {
        self.homes.clone()
    }
}

pub fn env(k: &str) -> Option<String> {
    match k {
        "ANTHROPIC_API_KEY" => Some("sk-ant-secret-value".to_string()),
        "HOME" => Some("/home/user".to_string()),
        "MEM" => Some("1g".to_string()),
        _ => None,
    }
}

/// Parses with [`FakeFs::standard`] and [`env`].
pub fn load(text: &str) -> Loaded {
    let fs = FakeFs::standard();
    parse(
        text,
        DecodeEnv {
            env: &env,
            fs: &fs,
            home: Some(PathBuf::from("/home/user")),
        },
    )
}

/// Parses and asserts there are no errors.
pub fn load_ok(text: &str) -> Loaded {
    let l = load(text);
    let errs: Vec<String> = l.errors().map(|d| d.to_string()).collect();
    assert!(
        errs.is_empty(),
        "unexpected errors: {errs:#?}\n--- in:\n{text}"
    );
    l
}
