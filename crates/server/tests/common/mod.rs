//! Test harness for the HTTP layer: a simple but honest in-memory
//! [`Backend`] whose processes are real host `sh`/program subprocesses
//! (run WITHOUT any sandbox — this is only a double for the protocol
//! layer, never a sandbox) and whose files live in a per-sandbox
//! temporary directory; a server on a real TCP or unix socket; a small
//! HTTP/1.1 client.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::type_complexity
)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use nanoclaw_server::backend::*;
use nanoclaw_server::listen::{self, Bound, ListenAddr, ServeOptions};
use nanoclaw_server::{StaticKeys, TenantId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, oneshot};

/// API key of tenant "alice".
pub const KEY_A: &str = "e2b_aaaa";
/// API key of tenant "bob".
pub const KEY_B: &str = "e2b_bbbb";

type Listeners = Arc<Mutex<Vec<mpsc::Sender<ProcessEvent>>>>;

struct Proc {
    tag: Option<String>,
    config: ProcessConfig,
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    listeners: Listeners,
}

struct Sbx {
    tenant: TenantId,
    info: SandboxInfo,
    root: PathBuf,
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
}

/// The test double.
#[derive(Default)]
pub struct TestBackend {
    sandboxes: Mutex<HashMap<String, Sbx>>,
}

/// Sandboxes a test did not kill leave nothing behind either: their
/// processes and folders go with the backend.
impl Drop for TestBackend {
    fn drop(&mut self) {
        let map = std::mem::take(&mut *self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, s) in map {
            for pid in s.procs.lock().unwrap_or_else(|e| e.into_inner()).keys() {
                kill_group(*pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&s.root);
        }
    }
}

fn not_found(id: &str) -> BackendError {
    BackendError::NotFound(format!("sandbox {id} not found"))
}

impl TestBackend {
    fn with<T>(
        &self,
        tenant: &TenantId,
        id: &str,
        f: impl FnOnce(&mut Sbx) -> BackendResult<T>,
    ) -> BackendResult<T> {
        let mut map = self.sandboxes.lock().unwrap();
        match map.get_mut(id) {
            Some(s) if &s.tenant == tenant => f(s),
            _ => Err(not_found(id)),
        }
    }

    fn scope_parts(
        &self,
        scope: &SandboxScope,
    ) -> BackendResult<(
        PathBuf,
        Arc<Mutex<HashMap<u32, Proc>>>,
        BTreeMap<String, String>,
    )> {
        self.with(&scope.tenant, &scope.sandbox_id, |s| {
            Ok((
                s.root.clone(),
                Arc::clone(&s.procs),
                s.info.metadata.clone(),
            ))
        })
    }

    /// Resolves a sandbox path under the sandbox's directory (a double:
    /// no symlink containment).
    fn host_path(&self, scope: &SandboxScope, path: &str) -> BackendResult<(PathBuf, PathBuf)> {
        let (root, _, _) = self.scope_parts(scope)?;
        let rel = if let Some(abs) = path.strip_prefix('/') {
            PathBuf::from(abs)
        } else {
            PathBuf::from("home/user").join(path)
        };
        if rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(BackendError::InvalidArgument(
                "the test double refuses ..".into(),
            ));
        }
        Ok((root.join(&rel), root))
    }

    fn entry(&self, host: &std::path::Path, root: &std::path::Path) -> BackendResult<EntryInfo> {
        let meta = std::fs::symlink_metadata(host).map_err(io_err)?;
        let ft = meta.file_type();
        let file_type = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else {
            FileType::File
        };
        let inside = host.strip_prefix(root).unwrap_or(host);
        Ok(EntryInfo {
            name: host
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            file_type,
            path: format!("/{}", inside.display()),
            size: meta.len() as i64,
            mode: meta.permissions().mode() & 0o7777,
            permissions: String::new(),
            owner: meta.uid().to_string(),
            group: meta.gid().to_string(),
            modified_time: meta.modified().ok(),
            symlink_target: None,
            metadata: BTreeMap::new(),
        })
    }
}

fn io_err(e: std::io::Error) -> BackendError {
    match e.kind() {
        std::io::ErrorKind::NotFound => BackendError::NotFound(e.to_string()),
        std::io::ErrorKind::AlreadyExists => BackendError::AlreadyExists(e.to_string()),
        _ => BackendError::Internal(e.to_string()),
    }
}

fn select(procs: &HashMap<u32, Proc>, sel: &ProcessSelector) -> BackendResult<u32> {
    match sel {
        ProcessSelector::Pid(p) if procs.contains_key(p) => Ok(*p),
        ProcessSelector::Tag(t) => procs
            .iter()
            .find(|(_, p)| p.tag.as_ref() == Some(t))
            .map(|(pid, _)| *pid)
            .ok_or_else(|| BackendError::NotFound(format!("process with tag {t} not found"))),
        ProcessSelector::Pid(p) => Err(BackendError::NotFound(format!(
            "process with pid {p} not found"
        ))),
    }
}

async fn broadcast(listeners: &Listeners, ev: ProcessEvent) {
    let senders: Vec<_> = listeners.lock().unwrap().clone();
    for s in senders {
        let _ = s.send(ev.clone()).await;
    }
}

fn kill_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // the negative pid addresses the process group the child leads.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

impl Backend for TestBackend {
    async fn create(&self, req: CreateSandbox) -> BackendResult<SandboxInfo> {
        if req.template != "base" {
            return Err(BackendError::InvalidArgument(format!(
                "unknown template {}",
                req.template
            )));
        }
        // Process-wide: every test's backend makes distinct ids and dirs.
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let id = format!("sbx{}{n}", std::process::id());
        let root = std::env::temp_dir().join(format!("nanoclaw-http-test-{id}"));
        std::fs::create_dir_all(root.join("home/user")).map_err(io_err)?;
        let now = SystemTime::now();
        let info = SandboxInfo {
            sandbox_id: id.clone(),
            template_id: req.template.clone(),
            alias: Some("base".into()),
            started_at: now,
            end_at: now + req.timeout,
            state: SandboxState::Running,
            metadata: req.metadata.clone(),
            cpu_count: 1,
            memory_mb: 512,
            disk_size_mb: 0,
            allow_internet_access: req.allow_internet_access,
            allow_out: req.allow_out.clone(),
            deny_out: req.deny_out.clone(),
            auto_pause: req.auto_pause,
            envd_access_token: req.envd_access_token.clone(),
        };
        let mut env_meta = req.env_vars.clone();
        env_meta.insert("HOME".into(), root.join("home/user").display().to_string());
        let sbx = Sbx {
            tenant: req.tenant,
            info: SandboxInfo {
                metadata: req.metadata,
                ..info.clone()
            },
            root,
            procs: Arc::default(),
        };
        self.sandboxes.lock().unwrap().insert(id.clone(), sbx);
        // Keep the sandbox env for processes in a side table.
        ENVS.lock().unwrap().insert(id, env_meta);
        Ok(info)
    }

    async fn get(&self, tenant: &TenantId, id: &str) -> BackendResult<SandboxInfo> {
        self.with(tenant, id, |s| Ok(s.info.clone()))
    }

    async fn list(&self, tenant: &TenantId) -> BackendResult<Vec<SandboxInfo>> {
        let map = self.sandboxes.lock().unwrap();
        Ok(map
            .values()
            .filter(|s| &s.tenant == tenant)
            .map(|s| s.info.clone())
            .collect())
    }

    async fn kill(&self, tenant: &TenantId, id: &str) -> BackendResult<()> {
        let sbx = {
            let mut map = self.sandboxes.lock().unwrap();
            match map.get(id) {
                Some(s) if &s.tenant == tenant => map.remove(id),
                _ => return Err(not_found(id)),
            }
        };
        if let Some(s) = sbx {
            for pid in s.procs.lock().unwrap().keys() {
                kill_group(*pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&s.root);
        }
        Ok(())
    }

    async fn pause(&self, tenant: &TenantId, id: &str) -> BackendResult<()> {
        self.with(tenant, id, |s| match s.info.state {
            SandboxState::Paused => Err(BackendError::Conflict("already paused".into())),
            SandboxState::Running => {
                s.info.state = SandboxState::Paused;
                Ok(())
            }
        })
    }

    async fn resume(
        &self,
        tenant: &TenantId,
        id: &str,
        timeout: Duration,
    ) -> BackendResult<SandboxInfo> {
        self.with(tenant, id, |s| match s.info.state {
            SandboxState::Running => Err(BackendError::Conflict("running".into())),
            SandboxState::Paused => {
                s.info.state = SandboxState::Running;
                s.info.end_at = SystemTime::now() + timeout;
                Ok(s.info.clone())
            }
        })
    }

    async fn set_timeout(
        &self,
        tenant: &TenantId,
        id: &str,
        timeout: Duration,
    ) -> BackendResult<()> {
        self.with(tenant, id, |s| {
            s.info.end_at = SystemTime::now() + timeout;
            Ok(())
        })
    }

    async fn update_network(
        &self,
        tenant: &TenantId,
        id: &str,
        update: nanoclaw_server::backend::NetworkUpdate,
    ) -> BackendResult<()> {
        self.with(tenant, id, |s| {
            s.info.allow_internet_access = update.allow_internet_access;
            s.info.allow_out = update.allow_out.clone();
            s.info.deny_out = update.deny_out.clone();
            Ok(())
        })
    }

    async fn metrics(&self, tenant: &TenantId, id: &str) -> BackendResult<Vec<SandboxMetric>> {
        self.with(tenant, id, |_| {
            Ok(vec![SandboxMetric {
                timestamp: SystemTime::now(),
                cpu_count: 1,
                cpu_used_pct: 0.5,
                mem_used: 1 << 20,
                mem_total: 512 << 20,
                mem_cache: 0,
                disk_used: 0,
                disk_total: 0,
            }])
        })
    }

    /// A host subprocess (no sandbox: a double), answering its exit code
    /// and output.
    async fn run_once(
        &self,
        tenant: &TenantId,
        req: RunRequest,
    ) -> BackendResult<serde_json::Value> {
        let argv = if req.command.is_empty() {
            vec![
                "sh".to_owned(),
                "-c".to_owned(),
                req.code.unwrap_or_default(),
            ]
        } else {
            req.command
        };
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .envs(&req.env)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| BackendError::InvalidArgument(format!("cannot run {}: {e}", argv[0])))?;
        Ok(serde_json::json!({
            "tenant": tenant.as_str(),
            "exit_code": out.status.code(),
            "stdout": String::from_utf8_lossy(&out.stdout),
        }))
    }

    async fn refresh_metrics(&self, metrics: &nanoclaw_server::Metrics) {
        let map = self.sandboxes.lock().unwrap();
        let paused = map
            .values()
            .filter(|s| s.info.state == SandboxState::Paused)
            .count() as u64;
        metrics.set_sandboxes(map.len() as u64 - paused, paused);
    }

    async fn envd_access(&self, id: &str) -> BackendResult<EnvdAccess> {
        let map = self.sandboxes.lock().unwrap();
        let s = map.get(id).ok_or_else(|| not_found(id))?;
        Ok(EnvdAccess {
            tenant: s.tenant.clone(),
            access_token: s.info.envd_access_token.clone(),
            state: s.info.state,
        })
    }

    async fn start_process(
        &self,
        scope: &SandboxScope,
        req: StartProcess,
    ) -> BackendResult<ProcessHandle> {
        if req.pty.is_some() {
            return Err(BackendError::Unimplemented(
                "no PTY in the test double".into(),
            ));
        }
        let (root, procs, _) = self.scope_parts(scope)?;
        let mut envs = ENVS
            .lock()
            .unwrap()
            .get(&scope.sandbox_id)
            .cloned()
            .unwrap_or_default();
        envs.extend(req.config.envs.clone());
        let cwd = match &req.config.cwd {
            Some(c) => root.join(c.trim_start_matches('/')),
            None => root.join("home/user"),
        };
        let mut cmd = tokio::process::Command::new(&req.config.cmd);
        cmd.args(&req.config.args)
            .envs(&envs)
            .current_dir(&cwd)
            .process_group(0)
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            BackendError::InvalidArgument(format!("cannot start {}: {e}", req.config.cmd))
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = mpsc::channel(64);
        let listeners: Listeners = Arc::new(Mutex::new(vec![tx]));
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take()));
        procs.lock().unwrap().insert(
            pid,
            Proc {
                tag: req.tag.clone(),
                config: req.config.clone(),
                stdin,
                listeners: Arc::clone(&listeners),
            },
        );
        let (out_tx, mut out_rx) = mpsc::channel::<ProcessOutput>(64);
        for (reader, is_out) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                true,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                false,
            ),
        ] {
            let Some(mut reader) = reader else { continue };
            let out_tx = out_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let b = Bytes::copy_from_slice(&buf[..n]);
                    let out = if is_out {
                        ProcessOutput::Stdout(b)
                    } else {
                        ProcessOutput::Stderr(b)
                    };
                    if out_tx.send(out).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(out_tx);
        if let Some(t) = req.timeout {
            // The command's deadline kills its process group.
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                kill_group(pid, libc::SIGKILL);
            });
        }
        tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                broadcast(&listeners, ProcessEvent::Data(out)).await;
            }
            let status = child.wait().await;
            procs.lock().unwrap().remove(&pid);
            use std::os::unix::process::ExitStatusExt;
            let end = match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => ProcessEnd::exited(c),
                    (None, Some(sig)) => ProcessEnd::signaled(sig),
                    _ => ProcessEnd::exited(-1),
                },
                Err(e) => ProcessEnd {
                    exit_code: -1,
                    exited: false,
                    status: "error".into(),
                    error: Some(e.to_string()),
                },
            };
            broadcast(&listeners, ProcessEvent::End(end)).await;
        });
        Ok(ProcessHandle { pid, events: rx })
    }

    async fn connect_process(
        &self,
        scope: &SandboxScope,
        sel: &ProcessSelector,
    ) -> BackendResult<ProcessHandle> {
        let (_, procs, _) = self.scope_parts(scope)?;
        let map = procs.lock().unwrap();
        let pid = select(&map, sel)?;
        let (tx, rx) = mpsc::channel(64);
        if let Some(p) = map.get(&pid) {
            p.listeners.lock().unwrap().push(tx);
        }
        Ok(ProcessHandle { pid, events: rx })
    }

    async fn list_processes(&self, scope: &SandboxScope) -> BackendResult<Vec<ProcessInfo>> {
        let (_, procs, _) = self.scope_parts(scope)?;
        let map = procs.lock().unwrap();
        Ok(map
            .iter()
            .map(|(pid, p)| ProcessInfo {
                pid: *pid,
                tag: p.tag.clone(),
                config: p.config.clone(),
            })
            .collect())
    }

    async fn send_input(
        &self,
        scope: &SandboxScope,
        sel: &ProcessSelector,
        input: ProcessInput,
    ) -> BackendResult<()> {
        let (_, procs, _) = self.scope_parts(scope)?;
        let stdin = {
            let map = procs.lock().unwrap();
            let pid = select(&map, sel)?;
            Arc::clone(&map[&pid].stdin)
        };
        let ProcessInput::Stdin(bytes) = input else {
            return Err(BackendError::Unimplemented("no PTY".into()));
        };
        let mut guard = stdin.lock().await;
        let pipe = guard
            .as_mut()
            .ok_or_else(|| BackendError::InvalidArgument("stdin is closed".into()))?;
        pipe.write_all(&bytes).await.map_err(io_err)
    }

    async fn close_stdin(&self, scope: &SandboxScope, sel: &ProcessSelector) -> BackendResult<()> {
        let (_, procs, _) = self.scope_parts(scope)?;
        let stdin = {
            let map = procs.lock().unwrap();
            let pid = select(&map, sel)?;
            Arc::clone(&map[&pid].stdin)
        };
        stdin.lock().await.take();
        Ok(())
    }

    async fn send_signal(
        &self,
        scope: &SandboxScope,
        sel: &ProcessSelector,
        signal: Signal,
    ) -> BackendResult<()> {
        let (_, procs, _) = self.scope_parts(scope)?;
        let pid = select(&procs.lock().unwrap(), sel)?;
        kill_group(
            pid,
            match signal {
                Signal::Kill => libc::SIGKILL,
                Signal::Term => libc::SIGTERM,
                Signal::Interrupt => libc::SIGINT,
            },
        );
        Ok(())
    }

    async fn stat(&self, scope: &SandboxScope, path: &str) -> BackendResult<EntryInfo> {
        let (host, root) = self.host_path(scope, path)?;
        self.entry(&host, &root)
    }

    async fn list_dir(
        &self,
        scope: &SandboxScope,
        path: &str,
        _depth: u32,
    ) -> BackendResult<Vec<EntryInfo>> {
        let (host, root) = self.host_path(scope, path)?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(&host).map_err(io_err)? {
            let e = e.map_err(io_err)?;
            out.push(self.entry(&e.path(), &root)?);
        }
        Ok(out)
    }

    async fn make_dir(&self, scope: &SandboxScope, path: &str) -> BackendResult<EntryInfo> {
        let (host, root) = self.host_path(scope, path)?;
        if host.exists() {
            return Err(BackendError::AlreadyExists(format!("{path} exists")));
        }
        std::fs::create_dir_all(&host).map_err(io_err)?;
        self.entry(&host, &root)
    }

    async fn rename(&self, scope: &SandboxScope, from: &str, to: &str) -> BackendResult<EntryInfo> {
        let (a, root) = self.host_path(scope, from)?;
        let (b, _) = self.host_path(scope, to)?;
        std::fs::rename(&a, &b).map_err(io_err)?;
        self.entry(&b, &root)
    }

    async fn remove(&self, scope: &SandboxScope, path: &str) -> BackendResult<()> {
        let (host, _) = self.host_path(scope, path)?;
        let meta = std::fs::symlink_metadata(&host).map_err(io_err)?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&host).map_err(io_err)
        } else {
            std::fs::remove_file(&host).map_err(io_err)
        }
    }

    async fn read_file(&self, scope: &SandboxScope, path: &str) -> BackendResult<FileDownload> {
        let (host, _) = self.host_path(scope, path)?;
        let meta = std::fs::metadata(&host).map_err(io_err)?;
        if meta.is_dir() {
            return Err(BackendError::InvalidArgument(format!(
                "path '{path}' is a directory"
            )));
        }
        let data = std::fs::read(&host).map_err(io_err)?;
        let chunks: Vec<std::io::Result<Bytes>> = data
            .chunks(4096)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Ok(FileDownload {
            size: Some(meta.len()),
            body: Box::pin(futures_util::stream::iter(chunks)),
        })
    }

    async fn write_file(
        &self,
        scope: &SandboxScope,
        path: &str,
        metadata: &BTreeMap<String, String>,
        mut body: ByteStream,
    ) -> BackendResult<EntryInfo> {
        let (host, root) = self.host_path(scope, path)?;
        if let Some(parent) = host.parent() {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        let mut data = Vec::new();
        while let Some(chunk) = body.next().await {
            data.extend_from_slice(
                &chunk.map_err(|e| BackendError::InvalidArgument(e.to_string()))?,
            );
        }
        std::fs::write(&host, &data).map_err(io_err)?;
        let mut entry = self.entry(&host, &root)?;
        entry.metadata = metadata.clone();
        Ok(entry)
    }

    async fn watch_dir(
        &self,
        scope: &SandboxScope,
        spec: WatchSpec,
    ) -> BackendResult<mpsc::Receiver<FsEvent>> {
        // A polling watcher: reports names that appear in the directory.
        let (host, _) = self.host_path(scope, &spec.path)?;
        if !host.is_dir() {
            return Err(BackendError::NotFound(format!(
                "{} is not a directory",
                spec.path
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
            if let Ok(rd) = std::fs::read_dir(&host) {
                seen.extend(
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if tx.is_closed() {
                    return;
                }
                let Ok(rd) = std::fs::read_dir(&host) else {
                    return;
                };
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if seen.insert(name.clone())
                        && tx
                            .send(FsEvent {
                                name,
                                event_type: FsEventType::Create,
                                entry: None,
                            })
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

static ENVS: Mutex<BTreeMap<String, BTreeMap<String, String>>> = Mutex::new(BTreeMap::new());

/// A running server.
pub struct Server {
    /// `http://127.0.0.1:PORT` for TCP servers.
    pub addr: Option<std::net::SocketAddr>,
    /// The unix socket path for unix servers.
    pub socket: Option<PathBuf>,
    /// The backend (to inspect).
    pub backend: Arc<TestBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// The keys: KEY_A → alice, KEY_B → bob.
pub fn keys() -> StaticKeys {
    StaticKeys::new()
        .with_key(KEY_A, "alice")
        .with_key(KEY_B, "bob")
}

/// Starts a server on the given listeners with `opts`.
pub async fn start_with(addrs: Vec<ListenAddr>, opts: ServeOptions) -> Server {
    start_auth(addrs, opts, keys()).await
}

/// Starts a server on the given listeners with `opts` and `auth`.
pub async fn start_auth(
    addrs: Vec<ListenAddr>,
    mut opts: ServeOptions,
    auth: StaticKeys,
) -> Server {
    let auth = Arc::new(auth);
    let backend = Arc::new(TestBackend::default());
    let bound = listen::bind(&addrs, auth.as_ref()).await.expect("bind");
    let addr = bound.iter().find_map(Bound::tcp_addr);
    let socket = addrs.iter().find_map(|a| match a {
        ListenAddr::Unix(p) => Some(p.clone()),
        ListenAddr::Tcp(_) => None,
    });
    let (tx, rx) = oneshot::channel::<()>();
    opts.handle_signals = false;
    opts.shutdown = Some(Box::pin(async move {
        let _ = rx.await;
    }));
    let b = Arc::clone(&backend);
    let task = tokio::spawn(async move {
        listen::serve_bound(bound, b, auth, opts)
            .await
            .expect("serve");
    });
    Server {
        addr,
        socket,
        backend,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A server on 127.0.0.1 with default options.
pub async fn start() -> Server {
    start_with(
        vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        ServeOptions::default(),
    )
    .await
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request on a fresh TCP connection and reads the whole answer.
pub async fn send(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(server.addr.expect("tcp server"))
        .await
        .unwrap();
    send_on(stream, method, path, headers, body.into()).await
}

/// [`send`], but a connection error is `None` (a server that answers an
/// oversized body before reading it closes the connection, and the
/// client, still sending, may see the reset before the answer).
pub async fn try_send(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Option<Reply> {
    let stream = tokio::net::TcpStream::connect(server.addr.expect("tcp server"))
        .await
        .ok()?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).ok()?)
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// Sends one request on `stream`.
pub async fn send_on<S>(
    stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Creates a sandbox for `key`; returns (id, access token).
pub async fn create(server: &Server, key: &str) -> (String, String) {
    let r = send(
        server,
        "POST",
        "/v2/sandboxes",
        &[("x-api-key", key), ("content-type", "application/json")],
        r#"{"templateID":"base","timeout":120,"metadata":{"k":"v"},"envVars":{"FOO":"bar"}}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let v = r.json();
    (
        v["sandboxID"].as_str().unwrap().to_owned(),
        v["envdAccessToken"].as_str().unwrap().to_owned(),
    )
}

/// One Connect envelope.
pub fn envelope(flags: u8, json: &str) -> Bytes {
    let mut out = vec![flags];
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    Bytes::from(out)
}

/// Splits a streamed body into (flags, JSON) envelopes; panics on a torn
/// body.
pub fn envelopes(mut body: &[u8]) -> Vec<(u8, serde_json::Value)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "torn envelope header");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert!(body.len() >= 5 + len, "torn envelope");
        out.push((body[0], serde_json::from_slice(&body[5..5 + len]).unwrap()));
        body = &body[5 + len..];
    }
    out
}

/// Data-plane headers for a sandbox.
pub fn envd<'a>(id: &'a str, token: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("e2b-sandbox-id", id),
        ("e2b-sandbox-port", "49983"),
        ("x-access-token", token),
    ]
}
