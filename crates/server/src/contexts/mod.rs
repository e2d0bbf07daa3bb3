//! Stateful code contexts: a long-lived interpreter (python, node, bash)
//! inside a sandbox, whose variables, imports and working directory persist
//! between executions — what E2B's code interpreter (Jupyter kernels behind
//! port 49999) gives the `e2b-code-interpreter` SDK, and what the MCP
//! `run_code` tool uses.
//!
//! Built on the [`Backend`]'s process API only: an interpreter is a
//! background process started through the sandbox's keeper, like any envd
//! process, so it dies with its sandbox and the daemon never forks it. The
//! driver program that turns the interpreter into a context is embedded in
//! the nanoclaw binary and handed over on its command line (`python3 -c`,
//! `node -e`, `bash -c`); nothing is written into the sandbox or the host.
//!
//! The wire between daemon and driver: a request per cell on the
//! interpreter's stdin (a JSON line; bash: a line count header and lines).
//! The user's output is the interpreter's raw stdout and stderr, streamed
//! as it comes. Control records are `\x1e<nonce>` + JSON + `\n` on stdout
//! (`ready`, `number_of_executions`, `result`, `error`, `end`); a cell is
//! over when an `end` record has come on both streams, so everything the
//! cell printed before has been delivered. The nonce is random per
//! interpreter, so output cannot end a cell by accident; code that reads
//! it can forge records of its own context only, and those are parsed and
//! bounded like any other output.
//!
//! Use: [`Contexts::execute`] (creates the language's default context on
//! first use) returns an [`Execution`] whose events arrive as they happen;
//! dropping it (the client left) interrupts the cell with SIGINT, as
//! Jupyter does, and kills the interpreter if it does not stop within
//! [`INTERRUPT_GRACE`] (the next call says so). [`Contexts::create`],
//! [`Contexts::list`], [`Contexts::restart`], [`Contexts::remove`] manage
//! contexts explicitly.

mod scan;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::auth::TenantId;
use crate::backend::{
    Backend, BackendError, ProcessConfig, ProcessEvent, ProcessInput, ProcessOutput,
    ProcessSelector, SandboxScope, Signal, StartProcess,
};
use scan::{Piece, Scanner};

/// Contexts one sandbox may have (dead ones count until removed).
pub const MAX_CONTEXTS: usize = 16;
/// The largest cell, in bytes.
pub const MAX_CODE: usize = 1 << 20;
/// Output (text and results) one execution may produce; beyond it, text is
/// dropped with a note on stderr and results are dropped.
pub const MAX_OUTPUT: usize = 32 << 20;
/// The largest single control record (a result with a big image).
pub const MAX_RECORD: usize = 16 << 20;
/// Environment variables one execution may set.
pub const MAX_ENV_VARS: usize = 256;
/// How long a starting interpreter may take to say it is ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an interrupted cell may take to stop before its interpreter
/// is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// The working directory of a context created without one.
pub const DEFAULT_CWD: &str = crate::keepers::E2B_HOME;
/// Events queued for a slow reader of an execution.
const EVENT_QUEUE: usize = 64;

/// A context's language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Language {
    /// `python3`.
    Python,
    /// `node` (the SDK's `js`, `javascript`).
    JavaScript,
    /// `bash` (also `sh`, `shell`).
    Bash,
}

impl Language {
    /// Every language, by name.
    pub const ALL: [Language; 3] = [Language::Python, Language::JavaScript, Language::Bash];

    /// The language of a name as the SDK sends it (case-insensitive;
    /// `None` or empty: python).
    pub fn parse(name: Option<&str>) -> Result<Language, ContextError> {
        let name = name.unwrap_or("").trim().to_ascii_lowercase();
        match name.as_str() {
            "" | "python" | "python3" | "py" => Ok(Language::Python),
            "js" | "javascript" | "node" | "nodejs" => Ok(Language::JavaScript),
            "bash" | "sh" | "shell" => Ok(Language::Bash),
            other => Err(ContextError::InvalidArgument(format!(
                "unsupported language {other:?}: use python, javascript (js) or bash"
            ))),
        }
    }

    /// The name shown in context lists.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Bash => "bash",
        }
    }

    fn command(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Language::Python => ("python3", "-c", include_str!("drivers/python.py")),
            Language::JavaScript => ("node", "-e", include_str!("drivers/node.js")),
            Language::Bash => ("bash", "-c", include_str!("drivers/bash.sh")),
        }
    }
}

/// What a context is: E2B's `Context` (`{"id","language","cwd"}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextInfo {
    /// Its id (random hex).
    pub id: String,
    /// Its language.
    pub language: Language,
    /// The working directory it started in.
    pub cwd: String,
}

impl ContextInfo {
    /// E2B's JSON shape.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "language": self.language.name(), "cwd": self.cwd})
    }
}

/// One event of an execution, in E2B's NDJSON shapes ([`Event::to_json`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The cell's number in its context (first event of a cell).
    ExecutionCount(u64),
    /// Output on stdout, as it came.
    Stdout(String),
    /// Output on stderr, as it came.
    Stderr(String),
    /// A result: `text`, `html`, `png` (base64), `markdown`, `svg`,
    /// `jpeg`, `latex`, `json`, `javascript`, and `is_main_result` (the
    /// value of the cell's last expression).
    Result(Map<String, Value>),
    /// The cell failed (an exception, an interrupt, a dead context).
    Error {
        /// E.g. `ZeroDivisionError`.
        name: String,
        /// The exception's message.
        value: String,
        /// The formatted traceback.
        traceback: String,
    },
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Event {
    /// The NDJSON line's object, as E2B's server sends it.
    pub fn to_json(&self) -> Value {
        match self {
            Event::ExecutionCount(n) => {
                json!({"type": "number_of_executions", "execution_count": n})
            }
            Event::Stdout(t) => json!({"type": "stdout", "text": t, "timestamp": now_ns()}),
            Event::Stderr(t) => json!({"type": "stderr", "text": t, "timestamp": now_ns()}),
            Event::Result(m) => {
                let mut m = m.clone();
                m.insert("type".into(), json!("result"));
                Value::Object(m)
            }
            Event::Error {
                name,
                value,
                traceback,
            } => json!({"type": "error", "name": name, "value": value, "traceback": traceback}),
        }
    }

    fn error(name: &str, value: impl Into<String>) -> Event {
        Event::Error {
            name: name.into(),
            value: value.into(),
            traceback: String::new(),
        }
    }
}

/// What can go wrong managing contexts (each maps to one HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// No such context in this sandbox (404).
    #[error("{0}")]
    NotFound(String),
    /// A bad request: language, code, env, cwd (400).
    #[error("{0}")]
    InvalidArgument(String),
    /// The code is larger than [`MAX_CODE`] (413).
    #[error("{0}")]
    TooLarge(String),
    /// [`MAX_CONTEXTS`] reached (429).
    #[error("{0}")]
    TooMany(String),
    /// The interpreter could not be started (500).
    #[error("{0}")]
    Start(String),
    /// The sandbox refused (its status).
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Which context runs a cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The language's default context (created on first use).
    Default(Language),
    /// A context by id.
    Context(String),
}

/// One cell to run.
#[derive(Clone, Debug)]
pub struct RunCode {
    /// The code.
    pub code: String,
    /// Where.
    pub target: Target,
    /// Environment variables for this cell only.
    pub env_vars: BTreeMap<String, String>,
    /// Interrupt the cell after this long (`None`: when the reader goes away).
    pub timeout: Option<Duration>,
}

/// A running cell: its context and its events as they happen. The
/// channel closes after the last event. Dropping it interrupts the cell.
#[derive(Debug)]
pub struct Execution {
    /// The context running it.
    pub context: ContextInfo,
    /// Its events.
    pub events: mpsc::Receiver<Event>,
}

/// What the reader of an interpreter hands to the cell running in it.
enum Msg {
    Event(Event),
    End,
}

/// One interpreter process.
struct Interp {
    pid: u32,
    state: Mutex<InterpState>,
}

#[derive(Default)]
struct InterpState {
    /// Why it is dead (`None`: alive).
    dead: Option<String>,
    /// The running cell's channel.
    sink: Option<mpsc::Sender<Msg>>,
    /// `end` records seen for the running cell (stdout, stderr).
    ended: (bool, bool),
    /// Output bytes of the running cell so far.
    output: usize,
    truncated: bool,
    /// Told once the driver is ready (or failed to be).
    ready: Option<oneshot::Sender<Result<(), String>>>,
    /// The end of its stderr not yet shown (for a start failure).
    stderr_tail: String,
}

/// A context: its identity and its current interpreter (a restart
/// replaces it).
struct Slot {
    info: ContextInfo,
    interp: Mutex<Arc<Interp>>,
    /// One cell at a time (others wait their turn, as in Jupyter).
    turn: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct SandboxContexts {
    slots: Vec<Arc<Slot>>,
    defaults: HashMap<Language, String>,
}

type Key = (TenantId, String);

/// Every sandbox's contexts. Share one per daemon (cheap to clone).
#[derive(Clone, Default)]
pub struct Contexts {
    all: Arc<Mutex<HashMap<Key, SandboxContexts>>>,
    /// Serializes creation of default contexts.
    creating: Arc<tokio::sync::Mutex<()>>,
}

fn key(scope: &SandboxScope) -> Key {
    (scope.tenant.clone(), scope.sandbox_id.clone())
}

fn random_hex(bytes: usize) -> Result<String, ContextError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf)
        .map_err(|e| ContextError::Start(format!("no randomness for a context id: {e}")))?;
    Ok(hex::encode(buf))
}

impl Contexts {
    /// No contexts.
    pub fn new() -> Contexts {
        Contexts::default()
    }

    /// Creates a context (its interpreter is ready when this returns).
    pub async fn create<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        language: Language,
        cwd: Option<String>,
    ) -> Result<ContextInfo, ContextError> {
        self.create_slot(backend, scope, language, cwd, false)
            .await
            .map(|s| s.info.clone())
    }

    async fn create_slot<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        language: Language,
        cwd: Option<String>,
        default: bool,
    ) -> Result<Arc<Slot>, ContextError> {
        self.prune(backend).await;
        let cwd = cwd.filter(|c| !c.is_empty());
        if let Some(c) = &cwd {
            if c.contains('\0') || c.contains('\n') || c.len() > 4096 {
                return Err(ContextError::InvalidArgument(
                    "cwd must be a path without NUL or newline, at most 4096 bytes".into(),
                ));
            }
        }
        if self.count(scope) >= MAX_CONTEXTS {
            return Err(ContextError::TooMany(format!(
                "this sandbox has {MAX_CONTEXTS} code contexts, the most it may have: \
                 remove one (DELETE /contexts/<id>) first"
            )));
        }
        let info = ContextInfo {
            id: random_hex(16)?,
            language,
            cwd: cwd.clone().unwrap_or_else(|| DEFAULT_CWD.to_owned()),
        };
        let interp = start(backend, scope, language, cwd.as_deref()).await?;
        let slot = Arc::new(Slot {
            info,
            interp: Mutex::new(interp),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        });
        let added = {
            let mut all = self.lock()?;
            let entry = all.entry(key(scope)).or_default();
            let room = entry.slots.len() < MAX_CONTEXTS;
            if room {
                entry.slots.push(slot.clone());
                if default {
                    entry.defaults.insert(language, slot.info.id.clone());
                }
            }
            room
        };
        if !added {
            kill(backend, scope, &slot.current()).await;
            return Err(ContextError::TooMany(format!(
                "this sandbox has {MAX_CONTEXTS} code contexts, the most it may have"
            )));
        }
        Ok(slot)
    }

    fn lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Key, SandboxContexts>>, ContextError> {
        self.all
            .lock()
            .map_err(|_| ContextError::Start("the context table is poisoned".into()))
    }

    fn count(&self, scope: &SandboxScope) -> usize {
        self.lock()
            .map(|m| m.get(&key(scope)).map_or(0, |s| s.slots.len()))
            .unwrap_or(0)
    }

    /// The sandbox's contexts, oldest first.
    pub fn list(&self, scope: &SandboxScope) -> Vec<ContextInfo> {
        self.lock()
            .map(|m| {
                m.get(&key(scope))
                    .map(|s| s.slots.iter().map(|s| s.info.clone()).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    fn slot(&self, scope: &SandboxScope, id: &str) -> Result<Arc<Slot>, ContextError> {
        self.lock()?
            .get(&key(scope))
            .and_then(|s| s.slots.iter().find(|s| s.info.id == id).cloned())
            .ok_or_else(|| ContextError::NotFound(format!("Context {id} not found")))
    }

    async fn default_slot<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        language: Language,
    ) -> Result<Arc<Slot>, ContextError> {
        let _one = self.creating.lock().await;
        let existing = self.lock()?.get(&key(scope)).and_then(|s| {
            let id = s.defaults.get(&language)?;
            s.slots.iter().find(|s| &s.info.id == id).cloned()
        });
        match existing {
            Some(s) => Ok(s),
            None => self.create_slot(backend, scope, language, None, true).await,
        }
    }

    /// Replaces a context's interpreter with a fresh one (same id, same
    /// cwd): its state is gone. A running cell ends with an error.
    pub async fn restart<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        id: &str,
    ) -> Result<ContextInfo, ContextError> {
        let slot = self.slot(scope, id)?;
        let old = slot.current();
        old.mark_dead("it was restarted");
        kill(backend, scope, &old).await;
        let cwd = (slot.info.cwd != DEFAULT_CWD).then(|| slot.info.cwd.clone());
        let fresh = start(backend, scope, slot.info.language, cwd.as_deref()).await?;
        if let Ok(mut i) = slot.interp.lock() {
            *i = fresh;
        }
        Ok(slot.info.clone())
    }

    /// Removes a context and kills its interpreter.
    pub async fn remove<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        id: &str,
    ) -> Result<(), ContextError> {
        let slot = {
            let mut all = self.lock()?;
            let entry = all
                .get_mut(&key(scope))
                .ok_or_else(|| ContextError::NotFound(format!("Context {id} not found")))?;
            let i = entry
                .slots
                .iter()
                .position(|s| s.info.id == id)
                .ok_or_else(|| ContextError::NotFound(format!("Context {id} not found")))?;
            entry.defaults.retain(|_, d| d != id);
            entry.slots.remove(i)
        };
        let interp = slot.current();
        interp.mark_dead("it was removed");
        kill(backend, scope, &interp).await;
        Ok(())
    }

    /// Forgets the contexts of sandboxes that no longer exist (their
    /// interpreters died with them); runs before each creation, so the
    /// table holds at most the live sandboxes' contexts plus one.
    async fn prune<B: Backend>(&self, backend: &Arc<B>) {
        let keys: Vec<Key> = self
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (tenant, id) in keys {
            if let Err(BackendError::NotFound(_)) = backend.envd_access(&id).await {
                self.forget_sandbox(&tenant, &id);
            }
        }
    }

    /// Forgets every context of a sandbox that no longer exists (their
    /// interpreters died with it).
    pub fn forget_sandbox(&self, tenant: &TenantId, sandbox_id: &str) {
        if let Ok(mut all) = self.all.lock() {
            all.remove(&(tenant.clone(), sandbox_id.to_owned()));
        }
    }

    /// Runs a cell. Errors before it starts (bad input, unknown context,
    /// no interpreter) are returned; everything after is an event.
    pub async fn execute<B: Backend>(
        &self,
        backend: &Arc<B>,
        scope: &SandboxScope,
        req: RunCode,
    ) -> Result<Execution, ContextError> {
        if req.code.len() > MAX_CODE {
            return Err(ContextError::TooLarge(format!(
                "the code is {} bytes; the most a cell may have is {MAX_CODE}",
                req.code.len()
            )));
        }
        check_env(&req.env_vars)?;
        let slot = match &req.target {
            Target::Context(id) => self.slot(scope, id)?,
            Target::Default(lang) => self.default_slot(backend, scope, *lang).await?,
        };
        let request = encode_request(slot.info.language, &req)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let context = slot.info.clone();
        tokio::spawn(run_cell(
            backend.clone(),
            scope.clone(),
            slot,
            request,
            req.timeout,
            tx,
        ));
        Ok(Execution {
            context,
            events: rx,
        })
    }
}

impl Slot {
    fn current(&self) -> Arc<Interp> {
        match self.interp.lock() {
            Ok(i) => i.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ContextError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ContextError::InvalidArgument(format!(
            "{} env_vars; at most {MAX_ENV_VARS}",
            env.len()
        )));
    }
    for (k, v) in env {
        let ok_name = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_name {
            return Err(ContextError::InvalidArgument(format!(
                "env_vars: {k:?} is not a valid variable name (letters, digits, _; not starting with a digit)"
            )));
        }
        if v.contains('\0') {
            return Err(ContextError::InvalidArgument(format!(
                "env_vars: the value of {k} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

/// The request line(s) a driver reads for one cell.
fn encode_request(language: Language, req: &RunCode) -> Result<Bytes, ContextError> {
    match language {
        Language::Python | Language::JavaScript => {
            let mut line = serde_json::to_vec(&json!({"code": req.code, "env": req.env_vars}))
                .map_err(|e| ContextError::InvalidArgument(e.to_string()))?;
            line.push(b'\n');
            Ok(Bytes::from(line))
        }
        Language::Bash => {
            if req.code.contains('\0') {
                return Err(ContextError::InvalidArgument(
                    "bash code cannot contain NUL bytes".into(),
                ));
            }
            if let Some((k, _)) = req.env_vars.iter().find(|(_, v)| v.contains('\n')) {
                return Err(ContextError::InvalidArgument(format!(
                    "env_vars: the value of {k} contains a newline, which a bash context cannot take"
                )));
            }
            let lines: Vec<&str> = req.code.split('\n').collect();
            let mut out = format!("{} {}\n", req.env_vars.len(), lines.len());
            for (k, v) in &req.env_vars {
                out.push_str(&format!("{k}={v}\n"));
            }
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Starts an interpreter and waits for its driver to be ready.
async fn start<B: Backend>(
    backend: &Arc<B>,
    scope: &SandboxScope,
    language: Language,
    cwd: Option<&str>,
) -> Result<Arc<Interp>, ContextError> {
    let (cmd, flag, driver) = language.command();
    let nonce = random_hex(16)?;
    let mut envs = BTreeMap::new();
    envs.insert("NANOCLAW_CONTEXT_NONCE".to_owned(), nonce.clone());
    envs.insert("PYTHONUNBUFFERED".to_owned(), "1".to_owned());
    if let Some(c) = cwd {
        envs.insert("NANOCLAW_CONTEXT_CWD".to_owned(), c.to_owned());
    }
    let req = StartProcess {
        config: ProcessConfig {
            cmd: cmd.to_owned(),
            args: vec![flag.to_owned(), driver.to_owned()],
            envs,
            cwd: None,
        },
        tag: None,
        stdin: true,
        pty: None,
        timeout: None,
    };
    let handle = backend.start_process(scope, req).await?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let interp = Arc::new(Interp {
        pid: handle.pid,
        state: Mutex::new(InterpState {
            ready: Some(ready_tx),
            ..InterpState::default()
        }),
    });
    let mark = format!("\x1e{nonce}").into_bytes();
    tokio::spawn(read_loop(interp.clone(), handle.events, mark));
    let failed = |why: String| {
        ContextError::Start(format!(
            "could not start a {} context: {why}",
            language.name()
        ))
    };
    match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(interp),
        Ok(Ok(Err(why))) if why.starts_with("cannot use") => {
            kill(backend, scope, &interp).await;
            Err(ContextError::InvalidArgument(why))
        }
        Ok(Ok(Err(why))) => {
            kill(backend, scope, &interp).await;
            Err(failed(why))
        }
        Ok(Err(_)) => Err(failed("its reader ended".into())),
        Err(_) => {
            kill(backend, scope, &interp).await;
            Err(failed(format!(
                "it did not become ready within {} s",
                START_TIMEOUT.as_secs()
            )))
        }
    }
}

async fn kill<B: Backend>(backend: &Arc<B>, scope: &SandboxScope, interp: &Interp) {
    let _ = backend
        .send_signal(scope, &ProcessSelector::Pid(interp.pid), Signal::Kill)
        .await;
}

impl Interp {
    fn mark_dead(&self, why: &str) {
        let sink = match self.state.lock() {
            Ok(mut s) => {
                if s.dead.is_none() {
                    s.dead = Some(why.to_owned());
                }
                if let Some(r) = s.ready.take() {
                    let tail = s.stderr_tail.trim().to_owned();
                    let _ = r.send(Err(if tail.is_empty() {
                        why.to_owned()
                    } else {
                        format!("{why}: {tail}")
                    }));
                }
                s.sink.take()
            }
            Err(_) => None,
        };
        if let Some(sink) = sink {
            let msg = format!("The context died: {why}. Its state is lost; restart it.");
            tokio::spawn(async move {
                let _ = sink
                    .send(Msg::Event(Event::error("ContextDied", msg)))
                    .await;
                let _ = sink.send(Msg::End).await;
            });
        }
    }

    /// The running cell's sink, if output is still within its budget
    /// (`bytes` more counted).
    fn sink_for(&self, bytes: usize, text: bool) -> (Option<mpsc::Sender<Msg>>, bool) {
        let Ok(mut s) = self.state.lock() else {
            return (None, false);
        };
        let Some(sink) = s.sink.clone() else {
            return (None, false);
        };
        if s.output + bytes <= MAX_OUTPUT {
            s.output += bytes;
            return (Some(sink), false);
        }
        let first = text && !s.truncated;
        s.truncated = true;
        (first.then_some(sink), first)
    }

    async fn deliver_text(&self, text: String, stdout: bool) {
        let (sink, truncated) = self.sink_for(text.len(), true);
        let Some(sink) = sink else { return };
        let ev = if truncated {
            Event::Stderr(format!(
                "\n[nanoclaw: this execution's output passed {MAX_OUTPUT} bytes; the rest is dropped]\n"
            ))
        } else if stdout {
            Event::Stdout(text)
        } else {
            Event::Stderr(text)
        };
        let _ = sink.send(Msg::Event(ev)).await;
    }

    /// A control record from the driver.
    async fn record(&self, payload: &[u8], stdout: bool) {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let kind = obj.remove("type");
        match kind.as_ref().and_then(Value::as_str) {
            Some("ready") => {
                let err = obj.get("error").and_then(Value::as_str).map(str::to_owned);
                if let Ok(mut s) = self.state.lock() {
                    if let Some(r) = s.ready.take() {
                        let _ = r.send(err.map_or(Ok(()), Err));
                    }
                }
            }
            Some("end") => {
                let sink = match self.state.lock() {
                    Ok(mut s) => {
                        if stdout {
                            s.ended.0 = true;
                        } else {
                            s.ended.1 = true;
                        }
                        if s.ended == (true, true) {
                            s.sink.take()
                        } else {
                            None
                        }
                    }
                    Err(_) => None,
                };
                if let Some(sink) = sink {
                    let _ = sink.send(Msg::End).await;
                }
            }
            Some("number_of_executions") => {
                if let Some(n) = obj.get("execution_count").and_then(Value::as_u64) {
                    if let (Some(sink), _) = self.sink_for(0, false) {
                        let _ = sink.send(Msg::Event(Event::ExecutionCount(n))).await;
                    }
                }
            }
            Some("error") => {
                let field = |k: &str| {
                    obj.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let ev = Event::Error {
                    name: field("name"),
                    value: field("value"),
                    traceback: field("traceback"),
                };
                if let (Some(sink), _) = self.sink_for(payload.len(), false) {
                    let _ = sink.send(Msg::Event(ev)).await;
                }
            }
            Some("result") => {
                obj.retain(|k, _| RESULT_KEYS.contains(&k.as_str()));
                if let (Some(sink), _) = self.sink_for(payload.len(), false) {
                    let _ = sink.send(Msg::Event(Event::Result(obj))).await;
                }
            }
            _ => {}
        }
    }
}

/// The fields of a result the SDK reads.
const RESULT_KEYS: [&str; 14] = [
    "text",
    "html",
    "markdown",
    "svg",
    "png",
    "jpeg",
    "pdf",
    "latex",
    "json",
    "javascript",
    "data",
    "chart",
    "extra",
    "is_main_result",
];

/// Reads one interpreter's output until it ends.
async fn read_loop(interp: Arc<Interp>, mut events: mpsc::Receiver<ProcessEvent>, mark: Vec<u8>) {
    let mut out = Scanner::new(mark.clone(), MAX_RECORD);
    let mut err = Scanner::new(mark, MAX_RECORD);
    let why = loop {
        let (pieces, stdout) = match events.recv().await {
            Some(ProcessEvent::Data(ProcessOutput::Stdout(b))) => (out.push(&b), true),
            Some(ProcessEvent::Data(ProcessOutput::Stderr(b))) => (err.push(&b), false),
            Some(ProcessEvent::Data(ProcessOutput::Pty(_))) => continue,
            Some(ProcessEvent::End(end)) => {
                break format!("its interpreter ended ({})", end.status)
            }
            None => break "its sandbox ended".to_owned(),
        };
        for piece in pieces {
            match piece {
                Piece::Text(t) => {
                    if !stdout {
                        if let Ok(mut s) = interp.state.lock() {
                            if s.ready.is_some() {
                                s.stderr_tail.push_str(&t);
                                let cut = s.stderr_tail.len().saturating_sub(2048);
                                let cut = (cut..s.stderr_tail.len())
                                    .find(|&i| s.stderr_tail.is_char_boundary(i))
                                    .unwrap_or(0);
                                s.stderr_tail.drain(..cut);
                            }
                        }
                    }
                    interp.deliver_text(t, stdout).await;
                }
                Piece::Record(r) => interp.record(&r, stdout).await,
                Piece::Oversized => {
                    interp
                        .deliver_text(
                            format!(
                                "[nanoclaw: a result larger than {MAX_RECORD} bytes was dropped]\n"
                            ),
                            false,
                        )
                        .await
                }
            }
        }
    };
    interp.mark_dead(&why);
}

/// Runs one cell in a slot's interpreter and forwards its events to `tx`.
async fn run_cell<B: Backend>(
    backend: Arc<B>,
    scope: SandboxScope,
    slot: Arc<Slot>,
    request: Bytes,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Event>,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    // Wait for our turn, unless the reader leaves first.
    let _turn = tokio::select! {
        t = slot.turn.clone().lock_owned() => t,
        () = tx.closed() => return,
    };
    let interp = slot.current();
    let (itx, mut irx) = mpsc::channel(EVENT_QUEUE);
    {
        let Ok(mut s) = interp.state.lock() else {
            return;
        };
        if let Some(why) = &s.dead {
            let msg = format!(
                "The context died: {why}. Its state is lost; restart it \
                 (POST /contexts/{}/restart) or use another.",
                slot.info.id
            );
            drop(s);
            let _ = tx.try_send(Event::error("ContextDied", msg));
            return;
        }
        s.sink = Some(itx);
        s.ended = (false, false);
        s.output = 0;
        s.truncated = false;
    }
    let sel = ProcessSelector::Pid(interp.pid);
    if let Err(e) = backend
        .send_input(&scope, &sel, ProcessInput::Stdin(request))
        .await
    {
        interp.mark_dead(&format!("its stdin failed ({e})"));
        let _ = tx.send(Event::error("ContextDied", e.to_string())).await;
        return;
    }
    let timed_out = loop {
        tokio::select! {
            m = irx.recv() => match m {
                Some(Msg::Event(ev)) => {
                    if tx.send(ev).await.is_err() {
                        break false;
                    }
                }
                Some(Msg::End) | None => return,
            },
            () = tx.closed() => break false,
            () = sleep_until(deadline) => break true,
        }
    };
    // The reader left or the time is up: interrupt, as Jupyter does.
    let _ = backend.send_signal(&scope, &sel, Signal::Interrupt).await;
    let stopped = tokio::time::timeout(INTERRUPT_GRACE, async {
        while let Some(m) = irx.recv().await {
            match m {
                Msg::End => return true,
                Msg::Event(ev) => {
                    if timed_out {
                        let _ = tx.send(ev).await;
                    }
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !stopped {
        interp.mark_dead(&format!(
            "a cell did not stop within {} s of an interrupt, so its interpreter was killed",
            INTERRUPT_GRACE.as_secs()
        ));
        kill(&backend, &scope, &interp).await;
    }
    if timed_out {
        let _ = tx
            .send(Event::error(
                "TimeoutError",
                format!(
                    "the execution was interrupted after its timeout of {} ms{}",
                    timeout.map_or(0, |t| t.as_millis()),
                    if stopped {
                        ""
                    } else {
                        "; it did not stop, so the context was killed"
                    }
                ),
            ))
            .await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages() {
        assert_eq!(Language::parse(None).unwrap(), Language::Python);
        assert_eq!(Language::parse(Some("JS")).unwrap(), Language::JavaScript);
        assert_eq!(Language::parse(Some("bash")).unwrap(), Language::Bash);
        assert!(Language::parse(Some("cobol")).is_err());
    }

    #[test]
    fn bash_requests_count_lines() {
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "1".to_owned());
        let req = RunCode {
            code: "echo a\necho b".into(),
            target: Target::Default(Language::Bash),
            env_vars: env,
            timeout: None,
        };
        let b = encode_request(Language::Bash, &req).unwrap();
        assert_eq!(&b[..], b"1 2\nA=1\necho a\necho b\n");
    }

    #[test]
    fn env_names_are_checked() {
        let mut env = BTreeMap::new();
        env.insert("1BAD".to_owned(), String::new());
        assert!(check_env(&env).is_err());
        let mut env = BTreeMap::new();
        env.insert("GOOD_1".to_owned(), "x y".to_owned());
        assert!(check_env(&env).is_ok());
    }
}
