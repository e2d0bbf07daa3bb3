//! The daemon `nanoclaw mcp` relays to: one that is running (`--url`, the
//! daemon serving `--data`, or the default socket's), else an embedded
//! `nanoclaw serve` started for the relay's life on a private socket,
//! stopped (its sandboxes removed, its files deleted) when the relay ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::client::{send, Endpoint};

/// How long an embedded daemon may take to answer `/healthz`.
const START: Duration = Duration::from_secs(30);
/// How long it may take to stop after SIGTERM before it is killed.
const STOP: Duration = Duration::from_secs(15);

/// Whether a daemon answers `GET /healthz` there.
pub fn answers(ep: &Endpoint) -> bool {
    let Ok(mut c) = ep.connect() else {
        return false;
    };
    send(&mut c, "GET", "/healthz", &[], b"").is_ok_and(|a| a.status == 200)
}

/// Where the daemon serving `data` listens, when one does (it wrote its
/// addresses to `DATA/serve.listen`): its first address that answers.
pub fn serving(data: &Path) -> Option<Endpoint> {
    let listed = std::fs::read_to_string(data.join("serve.listen")).ok()?;
    listed
        .lines()
        .filter_map(|l| match l.split_once(':') {
            Some(("unix", p)) => Some(Endpoint::Unix(PathBuf::from(p))),
            Some(("tcp", a)) => Some(Endpoint::Tcp {
                addr: a.to_owned(),
                path: "/mcp".into(),
            }),
            _ => None,
        })
        .find(answers)
}

/// An embedded `nanoclaw serve`.
pub struct Embedded {
    child: Option<Child>,
    /// Its private directory (0700): socket, log, and the data folder
    /// unless one was given.
    tmp: PathBuf,
    data: PathBuf,
    /// Where it listens.
    pub endpoint: Endpoint,
}

fn private_dir() -> Result<PathBuf> {
    let mut rnd = [0u8; 6];
    getrandom(&mut rnd)?;
    let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("nanoclaw-mcp-{name}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

use std::os::unix::fs::DirBuilderExt;

impl Embedded {
    /// Starts `nanoclaw serve` (with `config` for agent templates) on a
    /// private socket and waits until it answers.
    pub fn start(data: Option<&Path>, config: Option<&Path>) -> Result<Embedded> {
        let exe = std::env::current_exe().context("finding nanoclaw's own binary")?;
        let tmp = private_dir()?;
        let data = match data {
            Some(d) => d.to_path_buf(),
            None => tmp.join("data"),
        };
        let socket = tmp.join("nanoclaw.sock");
        let log = std::fs::File::create(tmp.join("serve.log")).context("the daemon's log")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--data")
            .arg(&data)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        use std::os::unix::process::CommandExt;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a ^C at the terminal reaches this
            // relay, which then stops the daemon in order.
            .process_group(0)
            .spawn()
            .context("starting nanoclaw serve")?;
        let mut e = Embedded {
            child: Some(child),
            tmp,
            data,
            endpoint: Endpoint::Unix(socket),
        };
        let deadline = Instant::now() + START;
        while !answers(&e.endpoint) {
            let exited = e.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let why = e.log_tail();
                e.stop();
                bail!("the embedded nanoclaw serve did not start: {why}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(e)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.tmp.join("serve.log")).unwrap_or_default();
        let t = text.trim();
        let start = t.len().saturating_sub(1000);
        let start = (start..t.len())
            .find(|i| t.is_char_boundary(*i))
            .unwrap_or(0);
        if t.is_empty() {
            "(no output)".into()
        } else {
            t[start..].to_owned()
        }
    }

    /// Removes every sandbox of the daemon (they are all this relay's),
    /// stops it, and deletes its private directory and its keepers'
    /// (empty) state directory.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            let _ = remove_all_sandboxes(&self.endpoint);
            // SAFETY: kill with our child's pid and a signal.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + STOP;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Ok(root) = nanoclaw_server::keepers::default_root(&self.data) {
            let _ = std::fs::remove_dir(&root);
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills every sandbox the daemon lists for the local tenant (E2B's
/// `GET /sandboxes` and `DELETE /sandboxes/{id}`).
fn remove_all_sandboxes(ep: &Endpoint) -> Result<()> {
    let mut c = ep.connect()?;
    let a = send(
        &mut c,
        "GET",
        "/v2/sandboxes?state=running,paused",
        &[],
        b"",
    )?;
    if a.status != 200 {
        return Err(anyhow!("listing sandboxes: HTTP {}", a.status));
    }
    let all: Value = serde_json::from_slice(&a.body)?;
    for s in all.as_array().into_iter().flatten() {
        if let Some(id) = s["sandboxID"].as_str() {
            let mut c = ep.connect()?;
            let _ = send(&mut c, "DELETE", &format!("/sandboxes/{id}"), &[], b"");
        }
    }
    Ok(())
}
