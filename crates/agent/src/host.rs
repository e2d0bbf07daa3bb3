//! Where the agent's tools run: its sandbox, reached through anything
//! that can run a command in it ([`session::Execute`]: a keeper's
//! [`Remote`](nanoclaw_sandbox::keeper::Remote), an in-process sandbox, a
//! backend). File tools are commands in the sandbox too (as the sandbox's
//! user, with every restriction of a command), so no path can lead
//! outside it.

use std::time::Duration;

use nanoclaw_sandbox::native::session::{self, EntryInfo, ExecSpec, Execute};
use nanoclaw_sandbox::outcome::NetworkReport;
use nanoclaw_sandbox::spec::Stdin;
use nanoclaw_sandbox::Outcome;

/// What the loop needs from the agent's sandbox.
pub trait Host {
    /// The sandbox's id.
    fn id(&self) -> &str;
    /// The directory relative paths and commands start in.
    fn workdir(&self) -> &str;
    /// The longest a command may run (the policy's exec timeout).
    fn max_timeout(&self) -> Duration;
    /// Runs a command to completion.
    fn exec(&mut self, cmd: Command) -> Result<Outcome, String>;
    /// Reads a file.
    fn read(&mut self, path: &str) -> Result<Vec<u8>, String>;
    /// Creates or replaces a file (parents created).
    fn write(&mut self, path: &str, data: Vec<u8>) -> Result<(), String>;
    /// Lists a directory.
    fn list(&mut self, path: &str) -> Result<Vec<EntryInfo>, String>;
    /// What the sandbox's egress proxy did so far (cumulative: the loop
    /// compares before and after a command to tell what that command did
    /// at the network boundary); `None` without a proxy.
    fn network(&mut self) -> Option<NetworkReport> {
        None
    }
}

/// One command for [`Host::exec`].
#[derive(Debug, Clone, Default)]
pub struct Command {
    /// argv.
    pub argv: Vec<String>,
    /// Working directory (default: [`Host::workdir`]).
    pub cwd: Option<String>,
    /// Added environment.
    pub env: Vec<(String, String)>,
    /// stdin bytes.
    pub stdin: Option<Vec<u8>>,
    /// Timeout (bounded by [`Host::max_timeout`]).
    pub timeout: Option<Duration>,
}

/// A [`Host`] over anything that runs commands in a sandbox; `base` gives
/// what every command gets (env, user, output limit, default timeout).
pub struct ExecHost<E: Execute> {
    inner: E,
    base: ExecSpec,
    workdir: String,
}

impl<E: Execute> ExecHost<E> {
    /// A host over `inner`; commands start in `workdir`.
    pub fn new(inner: E, base: ExecSpec, workdir: impl Into<String>) -> ExecHost<E> {
        ExecHost {
            inner,
            base,
            workdir: workdir.into(),
        }
    }

    /// The sandbox handle.
    pub fn inner(&self) -> &E {
        &self.inner
    }
}

impl<E: Execute> Host for ExecHost<E> {
    fn id(&self) -> &str {
        self.inner.sandbox_id()
    }

    fn workdir(&self) -> &str {
        &self.workdir
    }

    fn max_timeout(&self) -> Duration {
        self.base.timeout
    }

    fn exec(&mut self, cmd: Command) -> Result<Outcome, String> {
        let mut spec = self.base.clone();
        spec.command = cmd.argv;
        for (k, v) in cmd.env {
            match spec.env.iter_mut().find(|(ek, _)| *ek == k) {
                Some(e) => e.1 = v,
                None => spec.env.push((k, v)),
            }
        }
        spec.workdir = Some(cmd.cwd.unwrap_or_else(|| self.workdir.clone()).into());
        spec.stdin = cmd.stdin.map_or(Stdin::Null, Stdin::Bytes);
        if let Some(t) = cmd.timeout {
            spec.timeout = t.min(self.base.timeout);
        }
        self.inner.execute(&spec).map_err(|e| e.to_string())
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, String> {
        session::get_file(&mut self.inner, path).map_err(|e| e.to_string())
    }

    fn write(&mut self, path: &str, data: Vec<u8>) -> Result<(), String> {
        session::put_file(&mut self.inner, path, data, self.base.user).map_err(|e| e.to_string())
    }

    fn list(&mut self, path: &str) -> Result<Vec<EntryInfo>, String> {
        session::list_dir(&mut self.inner, path, 1).map_err(|e| e.to_string())
    }

    fn network(&mut self) -> Option<NetworkReport> {
        self.inner.network_report()
    }
}

/// `path` made absolute against `workdir` and normalised lexically (`.`
/// and `..` resolved, `//` collapsed). The sandbox resolves symlinks
/// itself; this is what path rules are checked against.
pub fn absolute(workdir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{workdir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_against_the_workdir() {
        assert_eq!(absolute("/workspace", "a/b"), "/workspace/a/b");
        assert_eq!(absolute("/workspace", "../etc/passwd"), "/etc/passwd");
        assert_eq!(absolute("/workspace", "/x/./y//z/.."), "/x/y");
        assert_eq!(absolute("/", "../../.."), "/");
    }
}
