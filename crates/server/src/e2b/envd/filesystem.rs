//! `filesystem.Filesystem`: stat, list, make, move, remove, and watching
//! directories — as a stream (`WatchDir`) or polled (`CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`, which the SDK's `watch_dir` uses).
//!
//! Polled watchers are kept here, over [`Backend::watch_dir`]: a task
//! per watcher moves events into a bounded buffer until the watcher is
//! removed, its sandbox is killed, or the backend ends the watch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::proto::{
    self, ListDirRequest, MoveRequest, PathRequest, WatchRequest, WatcherIdRequest,
};
use super::{check_path, read_stream_call, read_unary, within, StreamCall};
use crate::auth::{Authenticator, TenantId};
use crate::backend::{Backend, FsEvent, SandboxScope, WatchSpec};
use crate::connect::{self, unary_response, Code, ConnectError, StreamSender};
use crate::e2b::{random_token, AppState, E2bState};

/// `POST /filesystem.Filesystem/{method}`.
pub async fn rpc<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    Path(method): Path<String>,
    request: Request,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    match method.as_str() {
        "WatchDir" => watch_dir(&state, &parts, body).await,
        "Stat" | "MakeDir" | "Remove" => path_call(&state, &method, &parts, body).await,
        "ListDir" => list_dir(&state, &parts, body).await,
        "Move" => move_entry(&state, &parts, body).await,
        "CreateWatcher" => create_watcher(&state, &parts, body).await,
        "GetWatcherEvents" => get_watcher_events(&state, &parts, body).await,
        "RemoveWatcher" => remove_watcher(&state, &parts, body).await,
        other => ConnectError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} does not exist"),
        )
        .into_unary_response(),
    }
}

fn valid_path(what: &str, path: &str) -> Result<(), ConnectError> {
    check_path(what, path).map_err(ConnectError::invalid)
}

/// `Stat`, `MakeDir`, `Remove`: one path in.
async fn path_call<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    method: &str,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<PathRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let path = call.message.path.as_str();
    let result = async {
        valid_path("path", path)?;
        let backend = &state.backend;
        match method {
            "Stat" => within(call.timeout, backend.stat(&call.scope, path))
                .await
                .map(|e| json!({ "entry": proto::entry_json(&e) })),
            "MakeDir" => within(call.timeout, backend.make_dir(&call.scope, path))
                .await
                .map(|e| json!({ "entry": proto::entry_json(&e) })),
            _ => within(call.timeout, backend.remove(&call.scope, path))
                .await
                .map(|()| json!({})),
        }
    }
    .await;
    unary_response(result)
}

async fn list_dir<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<ListDirRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        valid_path("path", &call.message.path)?;
        let depth = call.message.depth.unwrap_or(0).max(1);
        let entries = within(
            call.timeout,
            state
                .backend
                .list_dir(&call.scope, &call.message.path, depth),
        )
        .await?;
        let items: Vec<Value> = entries.iter().map(proto::entry_json).collect();
        Ok(json!({ "entries": items }))
    }
    .await;
    unary_response(result)
}

async fn move_entry<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<MoveRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let MoveRequest {
        source,
        destination,
    } = &call.message;
    let result = async {
        valid_path("source", source)?;
        valid_path("destination", destination)?;
        let entry = within(
            call.timeout,
            state.backend.rename(&call.scope, source, destination),
        )
        .await?;
        Ok(json!({ "entry": proto::entry_json(&entry) }))
    }
    .await;
    unary_response(result)
}

fn watch_spec(req: &WatchRequest) -> Result<WatchSpec, ConnectError> {
    valid_path("path", &req.path)?;
    Ok(WatchSpec {
        path: req.path.clone(),
        recursive: req.recursive,
        include_entry: req.include_entry,
        allow_network_mounts: req.allow_network_mounts,
    })
}

async fn watch_dir<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call: StreamCall<WatchRequest> = match read_stream_call(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let spec = match watch_spec(&call.message) {
        Ok(s) => s,
        Err(e) => return connect::stream_error(e),
    };
    let events = match state.backend.watch_dir(&call.scope, spec).await {
        Ok(rx) => rx,
        Err(e) => return connect::stream_error(e.into()),
    };
    let (tx, response) = connect::stream_response();
    let deadline = call.timeout.map(|t| Instant::now() + t);
    tokio::spawn(pump_watch(tx, events, deadline, call.keepalive));
    response
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The stream of one `WatchDir` call: start, events, keepalives; ends at
/// the deadline, when the sandbox goes away, or when the client leaves
/// (dropping the receiver stops the backend's watch).
async fn pump_watch(
    tx: StreamSender,
    mut events: mpsc::Receiver<FsEvent>,
    deadline: Option<Instant>,
    keepalive: Option<Duration>,
) {
    if tx.send(&json!({ "start": {} })).await.is_err() {
        return;
    }
    let mut next_ping = keepalive.map(|k| Instant::now() + k);
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(ev) => {
                    if tx.send(&json!({ "filesystem": proto::fs_event_json(&ev) })).await.is_err() {
                        return;
                    }
                    next_ping = keepalive.map(|k| Instant::now() + k);
                }
                None => {
                    tx.finish(Some(ConnectError::new(Code::Unavailable, "the watch ended: the sandbox went away"))).await;
                    return;
                }
            },
            () = sleep_until(deadline) => {
                tx.finish(Some(ConnectError::new(Code::DeadlineExceeded, "the watch's timeout was reached"))).await;
                return;
            }
            () = sleep_until(next_ping) => {
                if tx.send(&json!({ "keepalive": {} })).await.is_err() {
                    return;
                }
                next_ping = keepalive.map(|k| Instant::now() + k);
            }
            () = tx.closed() => return,
        }
    }
}

/// Events a polled watcher has gathered.
#[derive(Default)]
struct Buffer {
    events: VecDeque<FsEvent>,
    /// Events dropped because the buffer was full.
    dropped: u64,
    /// The backend ended the watch.
    ended: bool,
}

struct Watcher {
    tenant: TenantId,
    sandbox_id: String,
    buffer: Arc<Mutex<Buffer>>,
    task: JoinHandle<()>,
}

/// The polled watchers of all sandboxes, by watcher id.
#[derive(Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Watcher>>,
}

/// Locks a mutex, recovering from a panic of another holder (the data is
/// a buffer or a map; nothing is half-updated across an await).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchers {
    fn add(&self, scope: &SandboxScope, id: String, rx: mpsc::Receiver<FsEvent>, cap: usize) {
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        let task = tokio::spawn(fill(rx, Arc::clone(&buffer), cap));
        lock(&self.by_id).insert(
            id,
            Watcher {
                tenant: scope.tenant.clone(),
                sandbox_id: scope.sandbox_id.clone(),
                buffer,
                task,
            },
        );
    }

    fn count(&self, scope: &SandboxScope) -> usize {
        lock(&self.by_id)
            .values()
            .filter(|w| w.tenant == scope.tenant && w.sandbox_id == scope.sandbox_id)
            .count()
    }

    /// Takes the gathered events of a watcher of this scope's sandbox.
    fn drain(&self, scope: &SandboxScope, id: &str) -> Result<Vec<FsEvent>, ConnectError> {
        let map = lock(&self.by_id);
        let watcher = map
            .get(id)
            .filter(|w| w.tenant == scope.tenant && w.sandbox_id == scope.sandbox_id)
            .ok_or_else(|| ConnectError::new(Code::NotFound, format!("watcher {id} not found")))?;
        let mut buf = lock(&watcher.buffer);
        if buf.events.is_empty() && buf.ended {
            return Err(ConnectError::new(
                Code::NotFound,
                format!("watcher {id} has ended"),
            ));
        }
        if buf.dropped > 0 {
            let dropped = std::mem::take(&mut buf.dropped);
            buf.events.clear();
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("watcher {id} lost {dropped} events: poll more often"),
            ));
        }
        Ok(buf.events.drain(..).collect())
    }

    fn remove(&self, scope: &SandboxScope, id: &str) -> Result<(), ConnectError> {
        let mut map = lock(&self.by_id);
        match map.get(id) {
            Some(w) if w.tenant == scope.tenant && w.sandbox_id == scope.sandbox_id => {
                if let Some(w) = map.remove(id) {
                    w.task.abort();
                }
                Ok(())
            }
            _ => Err(ConnectError::new(
                Code::NotFound,
                format!("watcher {id} not found"),
            )),
        }
    }

    /// Drops every watcher of a sandbox (it was killed).
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        lock(&self.by_id).retain(|_, w| {
            let keep = w.sandbox_id != sandbox_id;
            if !keep {
                w.task.abort();
            }
            keep
        });
    }
}

/// Moves events from the backend into a watcher's buffer.
async fn fill(mut rx: mpsc::Receiver<FsEvent>, buffer: Arc<Mutex<Buffer>>, cap: usize) {
    while let Some(ev) = rx.recv().await {
        let mut buf = lock(&buffer);
        if buf.events.len() >= cap {
            buf.dropped += 1;
        } else {
            buf.events.push_back(ev);
        }
    }
    lock(&buffer).ended = true;
}

async fn create_watcher<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<WatchRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        let spec = watch_spec(&call.message)?;
        if state.watchers.count(&call.scope) >= state.limits.watchers_per_sandbox {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!(
                    "this sandbox has {} watchers already: remove some first",
                    state.limits.watchers_per_sandbox
                ),
            ));
        }
        let rx = within(call.timeout, state.backend.watch_dir(&call.scope, spec)).await?;
        let id = random_token()
            .ok_or_else(|| ConnectError::new(Code::Internal, "no randomness for a watcher id"))?;
        state
            .watchers
            .add(&call.scope, id.clone(), rx, state.limits.watcher_events);
        Ok(json!({ "watcherId": id }))
    }
    .await;
    unary_response(result)
}

async fn get_watcher_events<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<WatcherIdRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = state
        .watchers
        .drain(&call.scope, &call.message.watcher_id)
        .map(|events| {
            let items: Vec<Value> = events.iter().map(proto::fs_event_json).collect();
            json!({ "events": items })
        });
    unary_response(result)
}

async fn remove_watcher<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<WatcherIdRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = state
        .watchers
        .remove(&call.scope, &call.message.watcher_id)
        .map(|()| json!({}));
    unary_response(result)
}
