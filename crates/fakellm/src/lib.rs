//! A fake model server for tests.
//!
//! [`FakeLlm`] is a real HTTP/1.1 server on `127.0.0.1` that speaks the
//! Anthropic Messages API (named SSE events, `ping` included) or OpenAI
//! Chat Completions (`data:` chunks ending in `[DONE]`), serves a script of
//! [`Turn`]s in order, and records and checks every request it gets: the
//! key in the auth header and nowhere else, no configured secret anywhere,
//! every tool call answered, the system prompt, the request's shape. The
//! checks collect violations ([`FakeLlm::violations`]) instead of panicking,
//! so a test asserts on them after the fact.
//!
//! ```no_run
//! use nanoclaw_fakellm::{Expect, FakeLlm, Kind, Turn};
//! let fake = FakeLlm::start(Kind::Anthropic, vec![Turn::text("hello")], Expect::key("sk-test")).unwrap();
//! // point the client at fake.base_url(), run it, then:
//! assert!(fake.violations().is_empty());
//! ```
#![warn(missing_docs)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

mod check;
mod http;
pub mod script;
mod wire;

/// Which wire format the fake speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Anthropic Messages: `POST /v1/messages`, key in `x-api-key`.
    Anthropic,
    /// OpenAI Chat Completions: `POST /v1/chat/completions`, key as
    /// `Authorization: Bearer`.
    #[serde(rename = "openai")]
    OpenAi,
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "anthropic" => Ok(Kind::Anthropic),
            "openai" => Ok(Kind::OpenAi),
            other => Err(format!("unknown kind {other:?} (anthropic or openai)")),
        }
    }
}

/// Tokens a reply reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Answer tokens.
    pub output_tokens: u64,
}

/// A tool call in a reply (the fake makes up its id: `toolu_…`, `call_…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments.
    pub input: Value,
}

impl ToolCall {
    /// A call of `name` with `input`.
    pub fn new(name: impl Into<String>, input: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            input,
        }
    }
}

/// Computes a turn from the request's JSON body.
pub type Responder = Box<dyn Fn(&Value) -> Turn + Send + Sync>;

/// What the fake does with one request.
pub enum Turn {
    /// A streamed answer: the text in several deltas, then each tool call
    /// with its input in several fragments; stop reason `tool_use` /
    /// `tool_calls` when there are calls, else `end_turn` / `stop`.
    Reply {
        /// The text, if any.
        text: Option<String>,
        /// The tool calls.
        tool_calls: Vec<ToolCall>,
        /// The usage reported.
        usage: Usage,
    },
    /// The same answer as one JSON body (`application/json`), as a server
    /// that ignores `stream` sends it.
    Unstreamed {
        /// The text, if any.
        text: Option<String>,
        /// The tool calls.
        tool_calls: Vec<ToolCall>,
        /// The usage reported.
        usage: Usage,
    },
    /// An error status with the provider's error JSON (e.g. 429 with
    /// `retry_after`, 529 `overloaded_error`, 500).
    Status {
        /// HTTP status.
        code: u16,
        /// `Retry-After` in seconds.
        retry_after: Option<u64>,
        /// `error.message`.
        message: String,
    },
    /// A 200 stream that starts and then carries an error (Anthropic's
    /// `event: error`; an OpenAI `data: {"error": …}` chunk).
    StreamError {
        /// The status the error stands for (its type is derived from it).
        code: u16,
        /// `error.message`.
        message: String,
    },
    /// Reads the request, sends nothing for this long, then closes.
    Stall(Duration),
    /// The turn computed from the request body.
    Respond(Responder),
}

impl Turn {
    /// A streamed text answer.
    pub fn text(text: impl Into<String>) -> Turn {
        Turn::Reply {
            text: Some(text.into()),
            tool_calls: Vec::new(),
            usage: Usage::default(),
        }
    }

    /// A streamed answer of tool calls only.
    pub fn tools(tool_calls: Vec<ToolCall>) -> Turn {
        Turn::Reply {
            text: None,
            tool_calls,
            usage: Usage::default(),
        }
    }

    /// An error status without `Retry-After`.
    pub fn status(code: u16, message: impl Into<String>) -> Turn {
        Turn::Status {
            code,
            retry_after: None,
            message: message.into(),
        }
    }

    /// A turn computed from the request body.
    pub fn respond(f: impl Fn(&Value) -> Turn + Send + Sync + 'static) -> Turn {
        Turn::Respond(Box::new(f))
    }

    /// A text reply echoing the content of the last tool result in the
    /// request (`tool result: <content>`; `no tool result` when none).
    pub fn echo_tool_result() -> Turn {
        Turn::respond(|body| {
            let text = match last_tool_result(body) {
                Some(c) => format!("tool result: {c}"),
                None => "no tool result".to_string(),
            };
            Turn::text(text)
        })
    }
}

impl fmt::Debug for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Turn::Reply {
                text,
                tool_calls,
                usage,
            } => f
                .debug_struct("Reply")
                .field("text", text)
                .field("tool_calls", tool_calls)
                .field("usage", usage)
                .finish(),
            Turn::Unstreamed {
                text,
                tool_calls,
                usage,
            } => f
                .debug_struct("Unstreamed")
                .field("text", text)
                .field("tool_calls", tool_calls)
                .field("usage", usage)
                .finish(),
            Turn::Status {
                code,
                retry_after,
                message,
            } => f
                .debug_struct("Status")
                .field("code", code)
                .field("retry_after", retry_after)
                .field("message", message)
                .finish(),
            Turn::StreamError { code, message } => f
                .debug_struct("StreamError")
                .field("code", code)
                .field("message", message)
                .finish(),
            Turn::Stall(d) => f.debug_tuple("Stall").field(d).finish(),
            Turn::Respond(_) => f.write_str("Respond(..)"),
        }
    }
}

/// The content of the last tool result in a request body of either format
/// (Anthropic `tool_result` blocks, OpenAI `tool` messages).
pub fn last_tool_result(body: &Value) -> Option<String> {
    let messages = body["messages"].as_array()?;
    for m in messages.iter().rev() {
        if m["role"] == "tool" {
            return m["content"].as_str().map(str::to_string);
        }
        for b in m["content"].as_array().into_iter().flatten().rev() {
            if b["type"] == "tool_result" {
                return match &b["content"] {
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                };
            }
        }
    }
    None
}

/// What every request must satisfy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    /// The key the auth header must carry (`x-api-key: K` or
    /// `Authorization: Bearer K`); `None`: no auth header at all. The key
    /// also counts as a secret everywhere but its own header.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Strings that must appear nowhere in a request (body, path, headers;
    /// the key is allowed in its auth header only).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Strings the system prompt must contain.
    #[serde(default)]
    pub system_must_contain: Vec<String>,
}

impl Expect {
    /// Expect `key` in the auth header (and nowhere else).
    pub fn key(key: impl Into<String>) -> Expect {
        Expect {
            api_key: Some(key.into()),
            ..Expect::default()
        }
    }
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// `POST`, ….
    pub method: String,
    /// The request target (`/v1/messages`).
    pub path: String,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`null` when it was not JSON).
    pub body: Value,
    /// The violations found in this request.
    pub violations: Vec<String>,
}

impl Recorded {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How to start a fake beyond its kind.
#[derive(Debug, Clone)]
pub struct Options {
    /// The wire format.
    pub kind: Kind,
    /// The port on 127.0.0.1 (0: any free one).
    pub port: u16,
    /// Where to write `{requests, violations, served, remaining}` as JSON
    /// after each request (replaced atomically).
    pub record: Option<PathBuf>,
}

impl Options {
    /// A fake of `kind` on a free port, recording nowhere.
    pub fn new(kind: Kind) -> Options {
        Options {
            kind,
            port: 0,
            record: None,
        }
    }
}

/// The state shared with the connection threads.
struct Shared {
    kind: Kind,
    expect: Expect,
    record: Option<PathBuf>,
    stop: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    script: VecDeque<Turn>,
    requests: Vec<Recorded>,
    violations: Vec<String>,
    served: usize,
    ids: wire::Ids,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake model server; dropping it stops it.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlm")
            .field("kind", &self.shared.kind)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeLlm {
    /// Starts a fake of `kind` on a free port of 127.0.0.1 serving `script`.
    pub fn start(kind: Kind, script: Vec<Turn>, expect: Expect) -> io::Result<FakeLlm> {
        FakeLlm::start_with(Options::new(kind), script, expect)
    }

    /// Starts a fake as `opts` say.
    pub fn start_with(opts: Options, script: Vec<Turn>, expect: Expect) -> io::Result<FakeLlm> {
        let listener = TcpListener::bind(("127.0.0.1", opts.port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            kind: opts.kind,
            expect,
            record: opts.record,
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                script: script.into(),
                ..State::default()
            }),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("fakellm-accept".into())
            .spawn(move || accept_loop(&listener, &s))?;
        Ok(FakeLlm {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The wire format it speaks.
    pub fn kind(&self) -> Kind {
        self.shared.kind
    }

    /// The `base_url` a client of this kind is configured with:
    /// `http://127.0.0.1:PORT` (Anthropic) or `http://127.0.0.1:PORT/v1`
    /// (OpenAI).
    pub fn base_url(&self) -> String {
        match self.shared.kind {
            Kind::Anthropic => format!("http://{}", self.addr),
            Kind::OpenAi => format!("http://{}/v1", self.addr),
        }
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Every violation so far (`request N: …`).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// How many turns of the script were served.
    pub fn served(&self) -> usize {
        self.shared.lock().served
    }

    /// How many turns are left.
    pub fn remaining(&self) -> usize {
        self.shared.lock().script.len()
    }

    /// Appends a turn to the script.
    pub fn push(&self, turn: Turn) {
        self.shared.lock().script.push_back(turn);
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; it sees `stop` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// How often blocked connection threads look at `stop`.
const POLL: Duration = Duration::from_millis(50);

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("fakellm-conn".into())
            .spawn(move || serve_connection(&s, stream));
        if spawned.is_err() {
            // Out of threads: the client sees the connection close.
            continue;
        }
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let req = match http::read_request(&mut reader, &shared.stop) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let body = json!({"error": {"message": e.to_string()}}).to_string();
                let _ = http::write_full(&mut writer, 400, &[], body.as_bytes(), true);
                return;
            }
            Err(_) => return,
        };
        match handle(shared, req, &mut writer) {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// Records and checks `req`, then answers it; false: close the connection.
fn handle(shared: &Shared, req: http::RawRequest, w: &mut TcpStream) -> io::Result<bool> {
    let body: Option<Value> = serde_json::from_slice(&req.body).ok();
    let view = check::View {
        kind: shared.kind,
        method: &req.method,
        path: &req.path,
        headers: &req.headers,
        raw_body: &req.body,
        body: body.as_ref(),
    };
    let mut problems = check::check(&view, &shared.expect);
    let routed = req.method == "POST" && req.path == check::expected_path(shared.kind);
    let turn = {
        let mut st = shared.lock();
        let n = st.requests.len() + 1;
        let turn = if routed { st.script.pop_front() } else { None };
        if routed && turn.is_none() {
            problems.push("unexpected request (the script is exhausted)".into());
        }
        if turn.is_some() {
            st.served += 1;
        }
        for p in &problems {
            let line = format!("request {n} ({} {}): {p}", req.method, req.path);
            st.violations.push(line);
        }
        st.requests.push(Recorded {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req.headers.clone(),
            body: body.clone().unwrap_or(Value::Null),
            violations: problems,
        });
        write_record(shared, &st);
        turn
    };
    let close = req.close;
    let body = body.unwrap_or(Value::Null);
    let Some(turn) = turn else {
        let (code, message) = if routed {
            (500, "unexpected request: the fake's script is exhausted")
        } else {
            (404, "no such endpoint on the fake model server")
        };
        let answer = wire::status(shared.kind, code, None, message, &mut shared.lock().ids);
        return write_answer(w, answer, close);
    };
    serve_turn(shared, turn, &body, w, close)
}

/// Answers with `turn` (a [`Turn::Respond`] is asked for its turn first).
fn serve_turn(
    shared: &Shared,
    mut turn: Turn,
    body: &Value,
    w: &mut TcpStream,
    close: bool,
) -> io::Result<bool> {
    for _ in 0..16 {
        match turn {
            Turn::Respond(f) => turn = f(body),
            _ => break,
        }
    }
    let kind = shared.kind;
    let model = body["model"].as_str().unwrap_or("fake-model").to_string();
    let streamed = body["stream"] == Value::Bool(true);
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    if let Turn::Stall(d) = turn {
        let until = Instant::now() + d;
        while Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
        return Ok(false);
    }
    let answer = {
        let mut st = shared.lock();
        let ids = &mut st.ids;
        match &turn {
            Turn::Reply {
                text,
                tool_calls,
                usage,
            }
            | Turn::Unstreamed {
                text,
                tool_calls,
                usage,
            } => {
                let r = wire::Reply {
                    text: text.as_deref(),
                    tool_calls,
                    usage: *usage,
                };
                if streamed && matches!(turn, Turn::Reply { .. }) {
                    wire::stream(kind, &model, &r, include_usage, ids)
                } else {
                    wire::unstreamed(kind, &model, &r, ids)
                }
            }
            Turn::Status {
                code,
                retry_after,
                message,
            } => wire::status(kind, *code, *retry_after, message, ids),
            Turn::StreamError { code, message } => {
                wire::stream_error(kind, &model, *code, message, ids)
            }
            Turn::Stall(_) | Turn::Respond(_) => wire::status(
                kind,
                500,
                None,
                "the fake's responder recursed too deep",
                ids,
            ),
        }
    };
    write_answer(w, answer, close)
}

fn write_answer(w: &mut TcpStream, answer: wire::Answer, close: bool) -> io::Result<bool> {
    match answer {
        wire::Answer::Full {
            code,
            headers,
            body,
        } => {
            http::write_full(w, code, &headers, body.to_string().as_bytes(), close)?;
        }
        wire::Answer::Stream { headers, events } => http::write_stream(w, &headers, &events)?,
    }
    Ok(!close)
}

/// Writes the record file, if any (a failure is reported on stderr; the
/// suite reading the file sees it stale or missing).
fn write_record(shared: &Shared, st: &State) {
    let Some(path) = &shared.record else { return };
    let doc = json!({
        "requests": st.requests,
        "violations": st.violations,
        "served": st.served,
        "remaining": st.script.len(),
    });
    let tmp = path.with_extension("tmp");
    let ok = serde_json::to_vec_pretty(&doc)
        .map_err(io::Error::from)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = ok {
        eprintln!("nanoclaw-fakellm: cannot write {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    const OK_BODY: &str =
        r#"{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn serves_the_script_then_reports_unexpected_requests() {
        let fake =
            FakeLlm::start(Kind::OpenAi, vec![Turn::text("hello")], Expect::key("k1")).unwrap();
        let h = [
            ("authorization", "Bearer k1"),
            ("content-type", "application/json"),
        ];
        let out = post(fake.addr(), "/v1/chat/completions", &h, OK_BODY);
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("data: [DONE]"), "{out}");
        assert!(fake.violations().is_empty(), "{:?}", fake.violations());
        let out = post(fake.addr(), "/v1/chat/completions", &h, OK_BODY);
        assert!(out.starts_with("HTTP/1.1 500"), "{out}");
        let v = fake.violations();
        assert!(v.len() == 1 && v[0].contains("unexpected request"), "{v:?}");
        assert_eq!(fake.served(), 1);
        assert_eq!(fake.requests().len(), 2);
        assert_eq!(
            fake.requests()[0].header("Authorization"),
            Some("Bearer k1")
        );
    }

    #[test]
    fn wrong_path_is_404_and_does_not_consume_the_script() {
        let fake =
            FakeLlm::start(Kind::Anthropic, vec![Turn::text("x")], Expect::default()).unwrap();
        let out = post(fake.addr(), "/v1/complete", &[], OK_BODY);
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert_eq!(fake.remaining(), 1);
        assert!(fake
            .violations()
            .iter()
            .any(|v| v.contains("path is /v1/complete")));
    }

    #[test]
    fn respond_sees_the_request_and_status_has_retry_after() {
        let fake = FakeLlm::start(
            Kind::Anthropic,
            vec![
                Turn::Status {
                    code: 429,
                    retry_after: Some(3),
                    message: "slow down".into(),
                },
                Turn::respond(|b| Turn::status(400, format!("model was {}", b["model"]))),
            ],
            Expect::default(),
        )
        .unwrap();
        let out = post(fake.addr(), "/v1/messages", &[], OK_BODY);
        assert!(out.starts_with("HTTP/1.1 429"), "{out}");
        assert!(out.contains("retry-after: 3"), "{out}");
        assert!(out.contains(r#""type":"rate_limit_error""#), "{out}");
        let out = post(fake.addr(), "/v1/messages", &[], OK_BODY);
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains(r#"model was \"m\""#), "{out}");
    }

    #[test]
    fn record_file_is_written() {
        let dir = std::env::temp_dir().join(format!("fakellm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("record.json");
        let opts = Options {
            record: Some(path.clone()),
            ..Options::new(Kind::OpenAi)
        };
        let fake = FakeLlm::start_with(opts, vec![Turn::text("x")], Expect::default()).unwrap();
        post(fake.addr(), "/v1/chat/completions", &[], OK_BODY);
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(doc["served"], 1);
        assert_eq!(doc["requests"][0]["body"]["model"], "m");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn last_tool_result_reads_both_formats() {
        let a = json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}]}]});
        assert_eq!(last_tool_result(&a).as_deref(), Some("42"));
        let o = json!({"messages": [{"role": "tool", "tool_call_id": "c", "content": "43"}, {"role": "user", "content": "x"}]});
        assert_eq!(last_tool_result(&o).as_deref(), Some("43"));
        assert_eq!(last_tool_result(&json!({"messages": []})), None);
    }
}
