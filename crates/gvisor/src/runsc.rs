//! Running `runsc`, gVisor's OCI runtime: one command line per operation,
//! with the global flags every call of one backend shares (its state
//! directory, its network mode, rootless mode).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nanoclaw_sandbox::Error;
use serde::Deserialize;

use crate::NAME;

/// How this backend runs `runsc`.
#[derive(Debug, Clone)]
pub struct Runsc {
    /// The binary.
    pub exe: PathBuf,
    /// runsc's own state directory (`--root`).
    pub state: PathBuf,
    /// `--rootless --ignore-cgroups`: runsc run by an unprivileged user,
    /// without cgroups.
    pub rootless: bool,
    /// `--network=host` instead of `--network=none`: gVisor's sockets are
    /// host sockets in the network namespace the bundle names, one
    /// nanoclaw made and wired to its proxy (see `crate::egress`).
    pub host_network: bool,
}

/// A container as `runsc state` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct State {
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The sandbox process's host pid (0 or -1 once stopped).
    #[serde(default)]
    pub pid: i32,
}

/// One container of `runsc list --format=json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// Its status.
    pub status: String,
}

/// `runsc events --stats`: what the sentry reports.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Stats {
    /// CPU time, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Memory in use, bytes.
    pub memory: Option<u64>,
    /// Tasks in the sandbox.
    pub pids: Option<u64>,
}

/// The backend's error for `message`.
pub fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.into(),
        message: message.into(),
    }
}

impl Runsc {
    /// `runsc` with this backend's global flags.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg(format!("--root={}", self.state.display()))
            .arg(if self.host_network {
                "--network=host"
            } else {
                "--network=none"
            })
            .arg("--oci-seccomp");
        if self.rootless {
            c.arg("--rootless").arg("--ignore-cgroups");
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs `runsc <args>`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, Error> {
        let out = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| Error::Sys {
                call: format!("running {}", self.exe.display()),
                source,
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(backend_error(format!(
            "runsc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    /// The container `id`'s state (`None`: runsc does not know it).
    pub fn state(&self, id: &str) -> Option<State> {
        serde_json::from_str(&self.run(&["state", id]).ok()?).ok()
    }

    /// Every container in the state directory.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        let out = self.run(&["list", "--format=json"])?;
        let listed: Option<Vec<Listed>> =
            serde_json::from_str(&out).map_err(|e| backend_error(format!("runsc list: {e}")))?;
        Ok(listed.unwrap_or_default())
    }

    /// The sentry's accounting for container `id`.
    pub fn stats(&self, id: &str) -> Result<Stats, Error> {
        let out = self.run(&["events", "--stats", id])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .map_err(|e| backend_error(format!("runsc events: {e}")))?;
        let d = &v["data"];
        Ok(Stats {
            cpu_ns: d["cpu"]["usage"]["total"].as_u64(),
            memory: d["memory"]["usage"]["usage"].as_u64(),
            pids: d["pids"]["current"].as_u64(),
        })
    }

    /// Removes container `id` and everything runsc holds for it (its
    /// processes, cgroup, state files), running or not.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        if self.state(id).is_some_and(|s| s.status == "paused") {
            // A paused sandbox cannot be signalled; let it run to die.
            let _ = self.run(&["resume", id]);
        }
        match self.run(&["delete", "--force", id]) {
            Ok(_) => Ok(()),
            Err(_) if self.state(id).is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `runsc --version`'s first line.
    pub fn version(exe: &Path) -> Result<String, Error> {
        let out = Command::new(exe)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Sys {
                call: format!("running {} --version", exe.display()),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or_default().trim().to_string())
    }
}
