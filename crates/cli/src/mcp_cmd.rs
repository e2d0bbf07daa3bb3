//! `nanoclaw mcp`: the Model Context Protocol over stdio, so that any MCP
//! host (Claude Code, Codex, Cursor, …) can use nanoclaw's sandboxes as
//! tools. It is a transport, not a second server: each JSON-RPC line read
//! from stdin is POSTed to the daemon's `/mcp` (see
//! `nanoclaw_server::mcp`, which has the one implementation of the
//! protocol and the tools) and each answer is written to stdout as one
//! line; logs go to stderr.
//!
//! The daemon is the one `--url` names, else the one serving `--data`,
//! else the one on the default socket, else an embedded `nanoclaw serve`
//! started for this process's life on a private socket (with `--config`,
//! whose agents are its templates). The relay adds what the HTTP
//! transport needs and stdio has not: `Mcp-Session-Id` (kept from the
//! `initialize` answer), `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`.
//! A `notifications/cancelled` abandons the request it names (its HTTP
//! connection is closed, which stops the call in the daemon).
//!
//! When stdin closes, or at SIGTERM, SIGINT or SIGHUP, the session is
//! ended (`DELETE /mcp`: its default sandbox is removed) and an embedded
//! daemon is stopped with every sandbox it made; nothing is left behind.

mod client;
mod daemon;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use base64::Engine;
use clap::Args;
use serde_json::{json, Value};

use client::{send, Conn, Endpoint};
use daemon::Embedded;

/// Options of `nanoclaw mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// The daemon to use: unix:PATH or http://HOST:PORT[/mcp]. Default: the
    /// daemon serving --data, else the default socket's, else an embedded
    /// one started for this server's life.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The API key for the daemon (default: $NANOCLAW_API_KEY). Unix-socket
    /// callers without a key are the daemon's `local` tenant.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// A data folder: the daemon serving it, else an embedded daemon on it.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The template of the session's own sandbox (the one used when a tool
    /// is called without sandbox_id). Default: base.
    #[arg(long, value_name = "NAME")]
    template: Option<String>,
    /// The config file (agents and their policy) for an embedded daemon
    /// (`nanoclaw serve --config`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// What every relayed request shares.
struct Relay {
    endpoint: Endpoint,
    path: String,
    api_key: Option<String>,
    /// `Mcp-Session-Id` and the negotiated version, once initialized.
    session: Mutex<Option<(String, String)>>,
    /// Connections of requests in flight, by JSON-RPC id.
    inflight: Mutex<HashMap<String, Conn>>,
    out: Mutex<std::io::Stdout>,
}

/// `nanoclaw mcp`: relays stdin to the daemon until stdin closes.
pub fn run(a: McpArgs) -> Result<u8> {
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("NANOCLAW_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let mut embedded = None;
    let endpoint = match (&a.url, &a.data) {
        (Some(u), _) => Endpoint::parse(u)?,
        (None, Some(d)) => match daemon::serving(d) {
            Some(e) => e,
            None => {
                let e = Embedded::start(Some(d), a.config.as_deref())?;
                let ep = e.endpoint.clone();
                embedded = Some(e);
                ep
            }
        },
        (None, None) => {
            let default = Endpoint::Unix(nanoclaw_server::daemon::default_socket());
            if a.config.is_none() && daemon::answers(&default) {
                default
            } else {
                let e = Embedded::start(None, a.config.as_deref())?;
                let ep = e.endpoint.clone();
                embedded = Some(e);
                ep
            }
        }
    };
    let template = a.template.clone();
    let mut path = endpoint.mcp_path().to_owned();
    if let Some(t) = &template {
        path.push_str(if path.contains('?') { "&" } else { "?" });
        path.push_str("template=");
        path.push_str(&percent_encode(t));
    }
    let relay = Arc::new(Relay {
        endpoint,
        path,
        api_key,
        session: Mutex::new(None),
        inflight: Mutex::new(HashMap::new()),
        out: Mutex::new(std::io::stdout()),
    });
    let embedded = Arc::new(Mutex::new(embedded));
    on_signals(relay.clone(), embedded.clone())?;
    let r = pump(&relay);
    shutdown(&relay, &embedded);
    r.map(|()| 0)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Reads stdin line by line; each message is relayed on its own thread
/// (a long tool call does not hold up a ping or a cancellation), except
/// `initialize`, whose session the next messages need.
fn pump(relay: &Arc<Relay>) -> Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut line = Vec::new();
    let mut workers = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg = std::mem::take(&mut line);
        if is_initialize(&msg) {
            // What follows needs its session: answered before reading on.
            relay.one(&msg);
            continue;
        }
        let relay = relay.clone();
        workers.retain(|w: &std::thread::JoinHandle<()>| !w.is_finished());
        workers.push(std::thread::spawn(move || relay.one(&msg)));
    }
    // Stdin closed: answers still owed are no longer wanted.
    for (_, c) in relay
        .inflight
        .lock()
        .map(|mut m| std::mem::take(&mut *m))
        .unwrap_or_default()
    {
        c.shutdown();
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

fn is_initialize(line: &[u8]) -> bool {
    serde_json::from_slice::<Value>(line).is_ok_and(|v| v["method"] == "initialize")
}

/// A header value as the specification wants it: plain when it is
/// printable ASCII without surrounding spaces, else `=?base64?…?=`.
fn header_value(v: &str) -> String {
    let plain = v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && v.trim() == v
        && !(v.starts_with("=?base64?") && v.ends_with("?="));
    if plain {
        v.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    }
}

impl Relay {
    fn write(&self, v: &Value) {
        if let Ok(mut out) = self.out.lock() {
            let mut b = v.to_string().into_bytes();
            b.push(b'\n');
            let _ = out.write_all(&b);
            let _ = out.flush();
        }
    }

    /// Relays one message and writes its answer(s).
    fn one(&self, line: &[u8]) {
        let parsed: Option<Value> = serde_json::from_slice(line).ok();
        let id = parsed
            .as_ref()
            .and_then(|v| v.get("id"))
            .filter(|i| i.is_string() || i.is_number())
            .cloned();
        let method = parsed
            .as_ref()
            .and_then(|v| v.get("method"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if method.as_deref() == Some("notifications/cancelled") {
            let target = parsed
                .as_ref()
                .and_then(|v| v["params"].get("requestId"))
                .map(Value::to_string);
            if let Some(c) = target.and_then(|t| self.inflight.lock().ok()?.remove(&t)) {
                c.shutdown();
            }
        }
        let headers = self.headers(parsed.as_ref(), method.as_deref());
        let key = id.as_ref().map(Value::to_string);
        let answer = self.endpoint.connect().and_then(|mut conn| {
            if let Some(k) = &key {
                if let (Ok(clone), Ok(mut m)) = (conn.try_clone(), self.inflight.lock()) {
                    m.insert(k.clone(), clone);
                }
            }
            let r = send(&mut conn, "POST", &self.path, &headers, line);
            if let (Some(k), Ok(mut m)) = (&key, self.inflight.lock()) {
                m.remove(k);
            }
            r
        });
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                if let Some(id) = id {
                    self.write(&json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32603, "message": format!("nanoclaw daemon: {e:#}")}}));
                }
                return;
            }
        };
        if method.as_deref() == Some("initialize") && answer.status == 200 {
            self.remember_session(&answer);
        }
        let notification = id.is_none()
            && parsed
                .as_ref()
                .is_some_and(|v| v.get("id").is_none() && v["method"].is_string());
        self.deliver(&answer, id, notification);
    }

    /// Headers the HTTP transport requires of this message.
    fn headers(&self, msg: Option<&Value>, method: Option<&str>) -> Vec<(String, String)> {
        let mut h = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            (
                "Accept".to_owned(),
                "application/json, text/event-stream".to_owned(),
            ),
        ];
        if let Some(k) = &self.api_key {
            h.push(("X-API-Key".into(), k.clone()));
        }
        let modern = msg
            .and_then(|m| m["params"]["_meta"].get(nanoclaw_server::mcp::META_VERSION))
            .and_then(Value::as_str);
        if let Some(v) = modern {
            h.push(("MCP-Protocol-Version".into(), header_value(v)));
        } else if let Ok(Some((sid, version))) = self.session.lock().map(|s| s.clone()) {
            if method != Some("initialize") {
                h.push(("Mcp-Session-Id".into(), sid));
                h.push(("MCP-Protocol-Version".into(), version));
            }
        }
        if let Some(m) = method {
            h.push(("Mcp-Method".into(), header_value(m)));
            let name = msg
                .and_then(|v| v["params"].get("name"))
                .and_then(Value::as_str);
            if let (true, Some(n)) = (m == "tools/call", name) {
                h.push(("Mcp-Name".into(), header_value(n)));
            }
        }
        h
    }

    fn remember_session(&self, a: &client::Answer) {
        let version = serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|v| v["result"]["protocolVersion"].as_str().map(str::to_owned));
        if let (Some(sid), Some(v)) = (a.header("mcp-session-id"), version) {
            let old = self
                .session
                .lock()
                .ok()
                .and_then(|mut s| s.replace((sid.to_owned(), v)));
            // A second initialize: the first session is not used any more.
            if let Some((old, _)) = old {
                self.end_session(&old);
            }
        }
    }

    /// Writes the daemon's answer as JSON-RPC lines. HTTP errors without a
    /// JSON-RPC body (401, 429, …) become a JSON-RPC error for `id`.
    fn deliver(&self, a: &client::Answer, id: Option<Value>, notification: bool) {
        let sse = a
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let mut messages: Vec<Value> = Vec::new();
        if sse {
            let text = String::from_utf8_lossy(&a.body);
            for event in text.split("\n\n") {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if let Ok(v) = serde_json::from_str(&data.join("\n")) {
                    messages.push(v);
                }
            }
        } else if !a.body.is_empty() {
            match serde_json::from_slice::<Value>(&a.body) {
                Ok(v) if v.get("jsonrpc").is_some() => messages.push(v),
                Ok(v) => {
                    let why = v["message"].as_str().unwrap_or("error").to_owned();
                    if let Some(id) = &id {
                        messages.push(json!({"jsonrpc": "2.0", "id": id, "error":
                            {"code": -32603, "message": format!("nanoclaw daemon: HTTP {}: {why}", a.status)}}));
                    }
                }
                Err(_) => {}
            }
        }
        for mut m in messages {
            // An error the daemon could not tie to a request (no session,
            // …) is the answer to this one; a notification gets none.
            if m.get("id").is_none_or(Value::is_null) {
                match &id {
                    Some(i) => m["id"] = i.clone(),
                    None if notification => continue,
                    None => m["id"] = Value::Null,
                }
            }
            self.write(&m);
        }
    }

    /// `DELETE /mcp` for a session.
    fn end_session(&self, sid: &str) {
        let mut h = vec![("Mcp-Session-Id".to_owned(), sid.to_owned())];
        if let Some(k) = &self.api_key {
            h.push(("X-API-Key".into(), k.clone()));
        }
        if let Ok(mut c) = self.endpoint.connect() {
            let _ = send(&mut c, "DELETE", self.endpoint.mcp_path(), &h, b"");
        }
    }
}

/// Ends the session and stops an embedded daemon (once).
fn shutdown(relay: &Relay, embedded: &Mutex<Option<Embedded>>) {
    let session = relay.session.lock().ok().and_then(|mut s| s.take());
    if let Some((sid, _)) = session {
        relay.end_session(&sid);
    }
    if let Some(mut e) = embedded.lock().ok().and_then(|mut e| e.take()) {
        e.stop();
    }
}

/// At SIGTERM, SIGINT or SIGHUP: cleans up as at the end of stdin, then
/// exits with 128 + the signal.
fn on_signals(relay: Arc<Relay>, embedded: Arc<Mutex<Option<Embedded>>>) -> Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before
    // use; blocking the signals in this thread (before any other exists)
    // makes every later thread inherit the mask, so only sigwait below
    // receives them. Children get an empty mask (std resets it when it
    // spawns).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block signals for the MCP server");
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait on a valid set and a valid out pointer.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            shutdown(&relay, &embedded);
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_encoded_when_not_plain() {
        assert_eq!(header_value("sandbox_exec"), "sandbox_exec");
        assert_eq!(
            header_value("Hello, 世界"),
            "=?base64?SGVsbG8sIOS4lueVjA==?="
        );
        assert_eq!(header_value(" padded "), "=?base64?IHBhZGRlZCA=?=");
        assert_eq!(percent_encode("agent:a b"), "agent:a%20b");
    }
}
