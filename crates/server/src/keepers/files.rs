//! E2B's filesystem calls, served by commands run inside the sandbox (as
//! the scope's user, with every restriction of a command): paths resolve
//! in the sandbox's own root, so no symlink can lead outside it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use nanoclaw_sandbox::keeper::Remote;
use nanoclaw_sandbox::native::session::{self, EntryKind, ExecSpec};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{blocking, engine_error, user_of, E2B_HOME};
use crate::backend::{
    BackendError, BackendResult, ByteStream, EntryInfo, FileDownload, FileType, FsEvent,
    FsEventType, SandboxScope, WatchSpec,
};

/// What runs a sandbox's file commands: its keeper, or (another
/// backend's sandbox) the engine's handle on it.
#[derive(Clone)]
pub(super) enum Runner {
    /// A native sandbox's keeper.
    Keeper(Remote),
    /// A sandbox of another backend.
    Engine(super::engines::EngineExec),
}

impl session::Execute for Runner {
    fn execute(
        &mut self,
        spec: &ExecSpec,
    ) -> Result<nanoclaw_sandbox::Outcome, nanoclaw_sandbox::Error> {
        match self {
            Runner::Keeper(r) => r.execute(spec),
            Runner::Engine(e) => e.execute(spec),
        }
    }

    fn sandbox_id(&self) -> &str {
        match self {
            Runner::Keeper(r) => r.sandbox_id(),
            Runner::Engine(e) => e.sandbox_id(),
        }
    }
}

/// How often a watched directory is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// File calls running at once, in all. Each holds a thread of tokio's
/// blocking pool while its in-sandbox command runs (up to 20 s against a
/// FIFO an attacker swapped in): without a bound, a flood of them starved
/// every other blocking task of the daemon.
const OPS_TOTAL: usize = 64;
/// File calls running at once per tenant (one tenant cannot take them all).
const OPS_PER_TENANT: usize = 16;
/// MiB of file content the daemon holds in memory at once for reads and
/// writes (each transfer is buffered whole, up to `session::MAX_COPY`).
const BUFFER_MIB: usize = 512;

/// What bounds file calls (see the constants above).
struct Gate {
    ops: Arc<Semaphore>,
    per_tenant: Mutex<HashMap<String, Arc<Semaphore>>>,
    mib: Arc<Semaphore>,
}

static GATE: LazyLock<Gate> = LazyLock::new(|| Gate {
    ops: Arc::new(Semaphore::new(OPS_TOTAL)),
    per_tenant: Mutex::new(HashMap::new()),
    mib: Arc::new(Semaphore::new(BUFFER_MIB)),
});

/// Slots a file call holds while it runs.
struct OpPermit(
    #[allow(dead_code)] OwnedSemaphorePermit,
    #[allow(dead_code)] OwnedSemaphorePermit,
);

fn closed(_: tokio::sync::AcquireError) -> BackendError {
    BackendError::Internal("the daemon is shutting down".into())
}

/// Waits for a slot of the tenant's and one of everybody's.
async fn op_permit(scope: &SandboxScope) -> BackendResult<OpPermit> {
    let mine = {
        let mut m = GATE.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            m.entry(scope.tenant.0.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(OPS_PER_TENANT))),
        )
    };
    let tenant = mine.acquire_owned().await.map_err(closed)?;
    let all = Arc::clone(&GATE.ops)
        .acquire_owned()
        .await
        .map_err(closed)?;
    Ok(OpPermit(tenant, all))
}

/// Waits until `bytes` more of file content may be held in memory.
async fn buffer_permit(bytes: u64) -> BackendResult<OwnedSemaphorePermit> {
    let mib = bytes.div_ceil(1 << 20).clamp(1, BUFFER_MIB as u64) as u32;
    Arc::clone(&GATE.mib)
        .acquire_many_owned(mib)
        .await
        .map_err(closed)
}

/// [`blocking`] within the tenant's and everybody's share of file calls.
async fn gated<T: Send + 'static>(
    scope: &SandboxScope,
    f: impl FnOnce() -> BackendResult<T> + Send + 'static,
) -> BackendResult<T> {
    let _slots = op_permit(scope).await?;
    blocking(f).await
}

/// An absolute path: a relative one is under the user's home (as envd).
fn absolute(scope: &SandboxScope, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    let home = if scope.user.as_deref() == Some("root") {
        "/root"
    } else {
        E2B_HOME
    };
    let rel = path.trim_start_matches("./");
    if rel.is_empty() || rel == "." {
        home.to_string()
    } else {
        format!("{home}/{rel}")
    }
}

fn permissions(kind: EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
        EntryKind::Other => '?',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn entry(e: session::EntryInfo) -> EntryInfo {
    EntryInfo {
        permissions: permissions(e.kind, e.mode),
        file_type: match e.kind {
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
            _ => FileType::File,
        },
        name: e.name,
        path: e.path,
        size: e.size as i64,
        mode: e.mode,
        owner: e.owner,
        group: e.group,
        modified_time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(e.modified.max(0) as u64)),
        symlink_target: e.symlink_target,
        metadata: Default::default(),
    }
}

pub(super) async fn stat(r: &Runner, scope: &SandboxScope, path: &str) -> BackendResult<EntryInfo> {
    let (mut r, p) = (r.clone(), absolute(scope, path));
    gated(scope, move || {
        session::stat(&mut r, &p).map(entry).map_err(engine_error)
    })
    .await
}

pub(super) async fn list_dir(
    r: &Runner,
    scope: &SandboxScope,
    path: &str,
    depth: u32,
) -> BackendResult<Vec<EntryInfo>> {
    let (mut r, p) = (r.clone(), absolute(scope, path));
    gated(scope, move || {
        session::list_dir(&mut r, &p, depth.max(1))
            .map(|v| v.into_iter().map(entry).collect())
            .map_err(engine_error)
    })
    .await
}

pub(super) async fn make_dir(
    r: &Runner,
    scope: &SandboxScope,
    path: &str,
) -> BackendResult<EntryInfo> {
    let (mut r, p, user) = (r.clone(), absolute(scope, path), user_of(scope)?);
    gated(scope, move || {
        if !session::make_dir(&mut r, &p, user).map_err(engine_error)? {
            return Err(BackendError::AlreadyExists(format!("{p} exists already")));
        }
        session::stat(&mut r, &p).map(entry).map_err(engine_error)
    })
    .await
}

pub(super) async fn rename(
    r: &Runner,
    scope: &SandboxScope,
    from: &str,
    to: &str,
) -> BackendResult<EntryInfo> {
    let (mut r, user) = (r.clone(), user_of(scope)?);
    let (from, to) = (absolute(scope, from), absolute(scope, to));
    gated(scope, move || {
        session::rename(&mut r, &from, &to, user)
            .map(entry)
            .map_err(engine_error)
    })
    .await
}

pub(super) async fn remove(r: &Runner, scope: &SandboxScope, path: &str) -> BackendResult<()> {
    let (mut r, p, user) = (r.clone(), absolute(scope, path), user_of(scope)?);
    gated(scope, move || {
        session::remove_path(&mut r, &p, user).map_err(engine_error)
    })
    .await
}

pub(super) async fn read_file(
    r: &Runner,
    scope: &SandboxScope,
    path: &str,
) -> BackendResult<FileDownload> {
    let (mut r, p) = (r.clone(), absolute(scope, path));
    let slots = op_permit(scope).await?;
    let (mut r2, p2) = (r.clone(), p.clone());
    let st = blocking(move || session::stat(&mut r2, &p2).map_err(engine_error)).await?;
    if st.kind == EntryKind::Dir {
        return Err(BackendError::InvalidArgument(format!("{p} is a directory")));
    }
    // Held until the content is sent (the body stream owns it).
    let held = buffer_permit(st.size).await?;
    let data = blocking(move || session::get_file(&mut r, &p).map_err(engine_error)).await?;
    drop(slots);
    let size = data.len() as u64;
    let body: ByteStream = Box::pin(futures_util::stream::once(async move {
        let _held = held;
        Ok::<_, std::io::Error>(Bytes::from(data))
    }));
    Ok(FileDownload {
        size: Some(size),
        body,
    })
}

pub(super) async fn write_file(
    r: &Runner,
    scope: &SandboxScope,
    path: &str,
    mut body: ByteStream,
) -> BackendResult<EntryInfo> {
    let (mut r, p, user) = (r.clone(), absolute(scope, path), user_of(scope)?);
    let mut data = Vec::new();
    // The upload is held in memory whole: MiB by MiB, within the budget.
    let mut held = vec![buffer_permit(1).await?];
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| BackendError::InvalidArgument(format!("upload: {e}")))?;
        if (data.len() + chunk.len()) as u64 > session::MAX_COPY {
            return Err(BackendError::InvalidArgument(format!(
                "{p}: one file may be at most {} MiB",
                session::MAX_COPY >> 20
            )));
        }
        data.extend_from_slice(&chunk);
        let want = (data.len() as u64).div_ceil(1 << 20) as usize;
        while held.len() < want {
            held.push(buffer_permit(1).await?);
        }
    }
    gated(scope, move || {
        session::put_file(&mut r, &p, data, user).map_err(engine_error)?;
        session::stat(&mut r, &p).map(entry).map_err(engine_error)
    })
    .await
}

/// What a watch remembers of each entry: (kind, size, mtime, mode).
type Snapshot = HashMap<String, (FileType, i64, Option<SystemTime>, u32)>;

async fn snapshot(r: &Runner, path: &str, depth: u32) -> BackendResult<Snapshot> {
    let (mut r, p) = (r.clone(), path.to_string());
    let list = blocking(move || session::list_dir(&mut r, &p, depth).map_err(engine_error)).await?;
    Ok(list
        .into_iter()
        .map(entry)
        .map(|e| {
            (
                e.path.clone(),
                (e.file_type, e.size, e.modified_time, e.mode),
            )
        })
        .collect())
}

/// Watches by looking at the directory every [`WATCH_EVERY`] and
/// reporting what changed (creations, writes as size or mtime changes,
/// removals, permission changes). Stops when the receiver is dropped or
/// the directory can no longer be read.
pub(super) async fn watch_dir(
    r: &Runner,
    scope: &SandboxScope,
    spec: WatchSpec,
) -> BackendResult<mpsc::Receiver<FsEvent>> {
    let root = absolute(scope, &spec.path);
    let depth = if spec.recursive { 64 } else { 1 };
    let mut before = snapshot(r, &root, depth).await?;
    let (tx, rx) = mpsc::channel(256);
    let r = r.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            let Ok(now) = snapshot(&r, &root, depth).await else {
                return;
            };
            for ev in diff(&root, &before, &now) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            before = now;
        }
    });
    Ok(rx)
}

fn diff(root: &str, before: &Snapshot, now: &Snapshot) -> Vec<FsEvent> {
    let rel = |p: &str| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .trim_start_matches('/')
            .to_string()
    };
    let mut out = Vec::new();
    let mut paths: Vec<&String> = now.keys().chain(before.keys()).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        let ev = match (before.get(p), now.get(p)) {
            (None, Some(_)) => FsEventType::Create,
            (Some(_), None) => FsEventType::Remove,
            (Some(a), Some(b)) if a.1 != b.1 || a.2 != b.2 => FsEventType::Write,
            (Some(a), Some(b)) if a.3 != b.3 => FsEventType::Chmod,
            _ => continue,
        };
        out.push(FsEvent {
            name: rel(p),
            event_type: ev,
            entry: None,
        });
        if ev == FsEventType::Create && now.get(p).is_some_and(|e| e.1 > 0) {
            out.push(FsEvent {
                name: rel(p),
                event_type: FsEventType::Write,
                entry: None,
            });
        }
    }
    out
}
