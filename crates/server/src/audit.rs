//! The audit log: append-only and hash-chained, in the `audit` table of
//! the shared database ([`crate::db`]).
//!
//! # The model
//!
//! Every record has a `seq` (1, 2, 3, … with no gaps), a time (Unix
//! milliseconds and RFC 3339; never earlier than the previous record's),
//! a kind ([`kind`]), who and what it concerns, summary fields, bounded
//! copies of its input and output ([`Captured`]), the previous record's hash
//! (`prev_hash`; [`GENESIS`] for seq 1) and its own `hash`: SHA-256 over the
//! canonical encoding of seq, prev_hash and every field ([`chain_hash`]).
//!
//! - Appends take SQLite's write lock (`BEGIN IMMEDIATE`) before reading
//!   the last record, so appends from any number of threads and processes
//!   form one chain. With `synchronous=FULL` a record is on disk when
//!   [`Audit::append`] returns.
//! - Triggers refuse `UPDATE` of a record and `DELETE` of any record after
//!   the retention anchor. [`Audit::prune`] moves the anchor (the seq and
//!   hash of the last record it removes, in `audit_anchor`) and then deletes
//!   up to it; verification starts from the anchor. Each prune is itself
//!   recorded (kind [`kind::PRUNE`]).
//! - [`Audit::verify`] walks the chain from the anchor (or seq 1) and names
//!   the first record whose seq, prev_hash or hash is wrong.
//!
//! # What it detects, and what it does not
//!
//! The triggers stop mistakes and SQL access that cannot change the schema;
//! anyone who can write the file can drop them. The chain then detects, at
//! the next verification: a changed field (hash mismatch, naming the
//! record), a deleted record in the middle (a gap in seq, naming it), a
//! reordering (prev_hash mismatch), and a record rewritten with a
//! recomputed hash (the next record's prev_hash no longer matches).
//!
//! It cannot detect, by itself:
//! - removal of the newest records (tail truncation): the shorter chain is
//!   still valid. `audit verify` prints the head hash and the count; keep
//!   them elsewhere and pass the head back with `--expect-head` (see
//!   [`Audit::verify_expecting`]), which fails when that record is gone.
//! - removal of the oldest records with the anchor moved accordingly:
//!   that is exactly what a prune does. Keep exports for the full history.
//! - a rewrite of the whole chain from some point on, hashes recomputed:
//!   the hash is not keyed. Only an externally kept head catches that.
//!
//! # From async code: group commit
//!
//! [`Audit`] is a cheap handle (`Clone + Send + Sync`: one connection behind
//! an `Arc<Mutex<_>>`). Its blocking calls wait on disk I/O (an append
//! waits for an fsync). From tokio, append with [`Audit::append_async`] /
//! [`Audit::append_all`]: the records go to the log's writer thread, which
//! takes every append waiting at that moment, writes them in one
//! transaction — each record its own seq and hash, in the order they were
//! handed over — and commits them with one fsync, then wakes their
//! waiters. A record is on disk when its future resolves, as with
//! [`Audit::append`]; appends that arrive together share an fsync, and no
//! append takes a thread of tokio's blocking pool.
//!
//! Within an HTTP request, records that must be durable before its answer
//! (a create, a kill, a file operation) can be handed to the request's own
//! record instead ([`Audit::append_with_answer`] inside [`collect`]): they
//! are then written in the same commit as the request's record, before the
//! answer leaves — one fsync per request instead of two.

use std::cell::RefCell;
use std::future::Future;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::db::{self, DbError};

/// The prev_hash of record 1.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How much of an input or output a record keeps by default.
pub const DEFAULT_CAPTURE_BYTES: usize = 4096;

/// The domain separator that starts every hashed encoding.
const HASH_DOMAIN: &[u8] = b"nanoclaw-audit-v1\n";

/// Record kinds written by nanoclaw. Others are allowed
/// (`[a-z][a-z0-9_]{0,31}`).
pub mod kind {
    /// An API request (method, path, status).
    pub const REQUEST: &str = "request";
    /// A policy decision (allowed or refused, and why, in `detail`).
    pub const DECISION: &str = "decision";
    /// A sandbox was created.
    pub const CREATE: &str = "create";
    /// A command ran in a sandbox (argv, exit, usage, input and output).
    pub const EXEC: &str = "exec";
    /// A sandbox was killed.
    pub const KILL: &str = "kill";
    /// A sandbox was paused.
    pub const PAUSE: &str = "pause";
    /// A running sandbox's egress policy was replaced (the new rules, and
    /// the open connections the update closed, in `detail`).
    pub const NETWORK_UPDATE: &str = "network_update";
    /// A sandbox was resumed.
    pub const RESUME: &str = "resume";
    /// A file was read or written in a sandbox (`path`, `method`).
    pub const FILE: &str = "file";
    /// A request refused because of a tenant's quota.
    pub const QUOTA_REFUSAL: &str = "quota_refusal";
    /// A connection refused by the egress policy.
    pub const EGRESS_DENIAL: &str = "egress_denial";
    /// A request with a missing, malformed or unknown API key.
    pub const AUTH_FAILURE: &str = "auth_failure";
    /// An agent's tool call needed and got (or did not get) approval.
    pub const APPROVAL: &str = "approval";
    /// Old records were pruned (written by [`super::Audit::prune`]).
    pub const PRUNE: &str = "prune";
}

/// An error using the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A kind that is not `[a-z][a-z0-9_]{0,31}`.
    #[error("invalid audit record kind {0:?}: use 1 to 32 lowercase letters, digits or '_', starting with a letter")]
    InvalidKind(String),
    /// A head hash that is not 64 hex digits.
    #[error("invalid head hash {0:?}: expected 64 hex digits, as `audit verify` prints it")]
    InvalidHash(String),
    /// A stored record cannot be read back (see `audit verify`).
    #[error("audit record {seq} cannot be read: {reason} (run `nanoclaw audit verify`)")]
    Corrupt {
        /// The record.
        seq: i64,
        /// Why.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The log's writer thread could not take the records (it could not
    /// be started, or it is gone).
    #[error("the audit log's writer: {0}")]
    Writer(String),
}

impl From<rusqlite::Error> for AuditError {
    fn from(e: rusqlite::Error) -> Self {
        AuditError::Db(DbError::Sql(e))
    }
}

/// A bounded copy of an input or output: its first bytes, and the length
/// and SHA-256 of the whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The first bytes (at most the log's capture limit).
    pub head: Vec<u8>,
    /// The length of the whole.
    pub len: u64,
    /// SHA-256 of the whole, lowercase hex.
    pub sha256: String,
}

impl Captured {
    /// Captures `data` keeping [`DEFAULT_CAPTURE_BYTES`].
    pub fn of(data: &[u8]) -> Captured {
        Captured::with_limit(data, DEFAULT_CAPTURE_BYTES)
    }

    /// Captures `data` keeping `limit` bytes.
    pub fn with_limit(data: &[u8], limit: usize) -> Captured {
        let mut c = Capture::new(limit);
        c.update(data);
        c.finish()
    }

    /// Whether `head` is only part of the whole.
    pub fn truncated(&self) -> bool {
        (self.head.len() as u64) < self.len
    }
}

impl Serialize for Captured {
    /// `{"len", "sha256", "truncated", "head"}`, with `head_base64` in
    /// place of `head` when the bytes are not UTF-8.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("len", &self.len)?;
        m.serialize_entry("sha256", &self.sha256)?;
        m.serialize_entry("truncated", &self.truncated())?;
        match std::str::from_utf8(&self.head) {
            Ok(text) => m.serialize_entry("head", text)?,
            Err(_) => m.serialize_entry(
                "head_base64",
                &base64::engine::general_purpose::STANDARD.encode(&self.head),
            )?,
        }
        m.end()
    }
}

/// Builds a [`Captured`] from a stream (e.g. an exec's output as it
/// arrives): keeps the first `limit` bytes, hashes and counts everything.
#[derive(Debug, Clone)]
pub struct Capture {
    hasher: Sha256,
    head: Vec<u8>,
    len: u64,
    limit: usize,
}

impl Capture {
    /// A capture keeping `limit` bytes.
    pub fn new(limit: usize) -> Capture {
        Capture {
            hasher: Sha256::new(),
            head: Vec::new(),
            len: 0,
            limit,
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
        let room = self.limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..room.min(data.len())]);
    }

    /// The capture.
    pub fn finish(self) -> Captured {
        Captured {
            head: self.head,
            len: self.len,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// What a caller records; [`Audit::append`] adds seq, time and hashes.
/// Fields that do not apply stay `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Record {
    /// What happened ([`kind`]).
    pub kind: String,
    /// The tenant it concerns.
    pub tenant: Option<String>,
    /// The agent it concerns.
    pub agent: Option<String>,
    /// The sandbox it concerns.
    pub sandbox: Option<String>,
    /// Request method (or file operation).
    pub method: Option<String>,
    /// Request path (or file path).
    pub path: Option<String>,
    /// Response status.
    pub status: Option<u16>,
    /// The command of an exec.
    pub argv: Option<Vec<String>>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Who killed it (timeout, memory, user, …).
    pub killed_by: Option<String>,
    /// Wall-clock duration.
    pub duration_ms: Option<u64>,
    /// CPU time used.
    pub cpu_ms: Option<u64>,
    /// Peak memory.
    pub peak_memory_bytes: Option<u64>,
    /// Anything else, for people: a decision's reason, a refused host, …
    pub detail: Option<String>,
    /// Bounded copy of the input (request body, stdin, code).
    pub input: Option<Captured>,
    /// Bounded copy of the output (response body, stdout and stderr).
    pub output: Option<Captured>,
}

impl Record {
    /// An empty record of `kind`.
    pub fn new(kind: &str) -> Record {
        Record {
            kind: kind.to_string(),
            ..Record::default()
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Its position in the chain, from 1.
    pub seq: i64,
    /// When it was appended, Unix milliseconds.
    pub time_ms: i64,
    /// The same, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// What was recorded.
    #[serde(flatten)]
    pub record: Record,
    /// The previous record's hash ([`GENESIS`] for seq 1).
    pub prev_hash: String,
    /// This record's hash ([`chain_hash`]).
    pub hash: String,
}

/// What [`Audit::append`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The record's seq.
    pub seq: i64,
    /// Its hash: the new head.
    pub hash: String,
    /// Its time, Unix milliseconds.
    pub time_ms: i64,
}

/// Which records [`Audit::query`] returns; all fields optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// At or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// At or before this time (Unix ms).
    pub until_ms: Option<i64>,
    /// Of this tenant.
    pub tenant: Option<String>,
    /// Of this sandbox.
    pub sandbox: Option<String>,
    /// Of this kind.
    pub kind: Option<String>,
    /// With a seq above this (for paging).
    pub after_seq: Option<i64>,
    /// At most this many.
    pub limit: Option<usize>,
    /// With `limit`: the newest matching records rather than the oldest.
    /// Results are in seq order either way.
    pub newest: bool,
}

/// Where verification starts after a prune.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anchor {
    /// The seq of the last pruned record.
    pub seq: i64,
    /// Its hash: the prev_hash of the first remaining record.
    pub hash: String,
    /// Its time, Unix ms.
    pub time_ms: i64,
    /// Records pruned in all.
    pub pruned_total: u64,
    /// When the last prune ran, Unix ms.
    pub pruned_at_ms: i64,
}

/// The result of [`Audit::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records checked (up to the first bad one).
    pub count: u64,
    /// The last good record's seq (the anchor's, or 0, when there is none).
    pub last_seq: i64,
    /// Its hash: the head to keep for `--expect-head`.
    pub head: String,
    /// The retention anchor verification started from.
    pub anchor: Option<Anchor>,
    /// The first bad record and why.
    pub first_bad: Option<(i64, String)>,
}

impl Report {
    /// Whether the chain verified.
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// What [`Audit::prune`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Records removed (0 when none were old enough).
    pub count: u64,
    /// The first and last seq removed.
    pub range: Option<(i64, i64)>,
    /// The anchor now in force.
    pub anchor: Option<Anchor>,
}

/// Checks a record kind: `[a-z][a-z0-9_]{0,31}`.
pub fn validate_kind(k: &str) -> Result<(), AuditError> {
    let b = k.as_bytes();
    let ok = (1..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(AuditError::InvalidKind(k.to_string()))
    }
}

/// The canonical encoding, fed to SHA-256: every value is a tag-free,
/// fixed-order sequence where integers are 8 bytes big-endian
/// (two's complement), byte strings and strings are their length (as an
/// integer) then their bytes, an optional value is one byte 0 (absent) or
/// 1 then the value, a list is its length then its items, and a capture is
/// its head (bytes), length (integer) and sha256 (string).
struct Encoder(Sha256);

impl Encoder {
    fn int(&mut self, v: i64) {
        self.0.update(v.to_be_bytes());
    }
    fn uint(&mut self, v: u64) {
        self.0.update(v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.update(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.0.update([0u8]),
            Some(v) => {
                self.0.update([1u8]);
                f(self, v);
            }
        }
    }
    fn opt_str(&mut self, v: &Option<String>) {
        self.opt(v.as_deref(), Encoder::str);
    }
    fn captured(&mut self, c: &Option<Captured>) {
        self.opt(c.as_ref(), |e, c| {
            e.bytes(&c.head);
            e.uint(c.len);
            e.str(&c.sha256);
        });
    }
}

/// A record's hash: SHA-256, lowercase hex, over `nanoclaw-audit-v1\n`
/// then, in this order, seq, prev_hash, time_ms, time, kind, tenant,
/// agent, sandbox, method, path, status, argv, exit_code, signal,
/// killed_by, duration_ms, cpu_ms, peak_memory_bytes, detail, input,
/// output, in the encoding described on `Encoder` (integers 8 bytes
/// big-endian; strings length-prefixed; optional values behind a 0/1 byte).
pub fn chain_hash(seq: i64, prev_hash: &str, time_ms: i64, time: &str, r: &Record) -> String {
    let mut e = Encoder(Sha256::new());
    e.0.update(HASH_DOMAIN);
    e.int(seq);
    e.str(prev_hash);
    e.int(time_ms);
    e.str(time);
    e.str(&r.kind);
    e.opt_str(&r.tenant);
    e.opt_str(&r.agent);
    e.opt_str(&r.sandbox);
    e.opt_str(&r.method);
    e.opt_str(&r.path);
    e.opt(r.status, |e, v| e.int(i64::from(v)));
    e.opt(r.argv.as_ref(), |e, argv| {
        e.uint(argv.len() as u64);
        for a in argv {
            e.str(a);
        }
    });
    e.opt(r.exit_code, |e, v| e.int(i64::from(v)));
    e.opt(r.signal, |e, v| e.int(i64::from(v)));
    e.opt_str(&r.killed_by);
    e.opt(r.duration_ms, Encoder::uint);
    e.opt(r.cpu_ms, Encoder::uint);
    e.opt(r.peak_memory_bytes, Encoder::uint);
    e.opt_str(&r.detail);
    e.captured(&r.input);
    e.captured(&r.output);
    hex::encode(e.0.finalize())
}

const COLUMNS: &str = "seq, time_ms, time, kind, tenant, agent, sandbox, method, path, status, \
     argv, exit_code, signal, killed_by, duration_ms, cpu_ms, peak_memory_bytes, detail, \
     input_head, input_len, input_sha256, output_head, output_len, output_sha256, prev_hash, hash";

fn conversion(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(msg),
    )
}

fn captured_at(r: &Row<'_>, col: usize) -> rusqlite::Result<Option<Captured>> {
    let head: Option<Vec<u8>> = r.get(col)?;
    let len: Option<u64> = r.get(col + 1)?;
    let sha: Option<String> = r.get(col + 2)?;
    match (head, len, sha) {
        (None, None, None) => Ok(None),
        (Some(head), Some(len), Some(sha256)) => Ok(Some(Captured { head, len, sha256 })),
        _ => Err(conversion(
            col,
            "a capture has some of head, len and sha256 but not all".into(),
        )),
    }
}

fn entry_row(r: &Row<'_>) -> rusqlite::Result<Entry> {
    let argv = match r.get::<_, Option<String>>(10)? {
        None => None,
        Some(j) => Some(
            serde_json::from_str::<Vec<String>>(&j)
                .map_err(|e| conversion(10, format!("argv is not a JSON list of strings: {e}")))?,
        ),
    };
    Ok(Entry {
        seq: r.get(0)?,
        time_ms: r.get(1)?,
        time: r.get(2)?,
        record: Record {
            kind: r.get(3)?,
            tenant: r.get(4)?,
            agent: r.get(5)?,
            sandbox: r.get(6)?,
            method: r.get(7)?,
            path: r.get(8)?,
            status: r.get(9)?,
            argv,
            exit_code: r.get(11)?,
            signal: r.get(12)?,
            killed_by: r.get(13)?,
            duration_ms: r.get(14)?,
            cpu_ms: r.get(15)?,
            peak_memory_bytes: r.get(16)?,
            detail: r.get(17)?,
            input: captured_at(r, 18)?,
            output: captured_at(r, 21)?,
        },
        prev_hash: r.get(24)?,
        hash: r.get(25)?,
    })
}

fn read_anchor(conn: &Connection) -> Result<Option<Anchor>, AuditError> {
    Ok(conn
        .query_row(
            "SELECT seq, hash, time_ms, pruned_total, pruned_at_ms FROM audit_anchor WHERE id = 1",
            [],
            |r| {
                Ok(Anchor {
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                    time_ms: r.get(2)?,
                    pruned_total: r.get(3)?,
                    pruned_at_ms: r.get(4)?,
                })
            },
        )
        .optional()?)
}

/// The last record's (seq, hash, time_ms), else the anchor's, else genesis.
fn tip(conn: &Connection) -> Result<(i64, String, i64), AuditError> {
    let last = conn
        .query_row(
            "SELECT seq, hash, time_ms FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some(t) = last {
        return Ok(t);
    }
    Ok(match read_anchor(conn)? {
        Some(a) => (a.seq, a.hash, a.time_ms),
        None => (0, GENESIS.to_string(), 0),
    })
}

fn clamp_u64(v: Option<u64>) -> Option<u64> {
    v.map(|v| v.min(i64::MAX as u64))
}

/// Appends within `tx` (which holds the write lock).
fn append_in(tx: &Transaction<'_>, r: &Record) -> Result<Appended, AuditError> {
    let (last_seq, prev_hash, last_time) = tip(tx)?;
    let seq = last_seq + 1;
    let time_ms = db::now_ms().max(last_time);
    let time = db::format_rfc3339_ms(time_ms);
    let hash = chain_hash(seq, &prev_hash, time_ms, &time, r);
    let argv = match &r.argv {
        Some(a) => Some(serde_json::to_string(a).map_err(|e| AuditError::Corrupt {
            seq,
            reason: format!("argv cannot be encoded: {e}"),
        })?),
        None => None,
    };
    let cap = |c: &Option<Captured>| match c {
        Some(c) => (Some(c.head.clone()), Some(c.len), Some(c.sha256.clone())),
        None => (None, None, None),
    };
    let (ih, il, is) = cap(&r.input);
    let (oh, ol, os) = cap(&r.output);
    tx.prepare_cached(&format!(
        "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
         ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)"
    ))?
    .execute(params![
        seq,
        time_ms,
        time,
        r.kind,
        r.tenant,
        r.agent,
        r.sandbox,
        r.method,
        r.path,
        r.status,
        argv,
        r.exit_code,
        r.signal,
        r.killed_by,
        r.duration_ms,
        r.cpu_ms,
        r.peak_memory_bytes,
        r.detail,
        ih,
        il,
        is,
        oh,
        ol,
        os,
        prev_hash,
        hash,
    ])?;
    Ok(Appended { seq, hash, time_ms })
}

/// The audit log of one database: a cheap, cloneable handle (see the
/// [module docs](self)).
#[derive(Clone)]
pub struct Audit {
    conn: Arc<Mutex<Connection>>,
    capture_limit: usize,
    /// The group-commit writer, started by the first async append and
    /// shared by every clone; it ends when the last clone is dropped.
    writer: Arc<OnceLock<Result<Mutex<mpsc::Sender<Batch>>, String>>>,
}

/// Records handed to the writer together (written in this order), and
/// whom to tell once they are durable (`None`: nobody waits).
struct Batch {
    records: Vec<Record>,
    done: Option<tokio::sync::oneshot::Sender<Result<Vec<Appended>, String>>>,
}

/// Most batches the writer commits at once.
const MAX_GROUP: usize = 512;

/// The writer thread: takes every batch waiting, writes them in one
/// transaction, commits (one fsync), then answers each. Should the group
/// fail, each batch is retried alone, so one batch's failure is its own.
fn writer_loop(conn: Arc<Mutex<Connection>>, rx: mpsc::Receiver<Batch>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
        match commit_group(&mut c, &group) {
            Ok(all) => {
                for (b, appended) in group.into_iter().zip(all) {
                    if let Some(done) = b.done {
                        let _ = done.send(Ok(appended));
                    }
                }
            }
            Err(e) if group.len() == 1 => {
                if let Some(done) = group.pop().and_then(|b| b.done) {
                    let _ = done.send(Err(e.to_string()));
                }
            }
            Err(_) => {
                for b in group {
                    let r = commit_group(&mut c, std::slice::from_ref(&b))
                        .map(|mut v| v.pop().unwrap_or_default())
                        .map_err(|e| e.to_string());
                    if let Some(done) = b.done {
                        let _ = done.send(r);
                    }
                }
            }
        }
    }
}

/// Appends the batches' records in one transaction.
fn commit_group(conn: &mut Connection, group: &[Batch]) -> Result<Vec<Vec<Appended>>, AuditError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut all = Vec::with_capacity(group.len());
    for b in group {
        let mut appended = Vec::with_capacity(b.records.len());
        for r in &b.records {
            appended.push(append_in(&tx, r)?);
        }
        all.push(appended);
    }
    tx.commit()?;
    Ok(all)
}

/// Records to be written with the answer of the request being served
/// (see [`collect`]). Records still here when it is dropped (the request
/// was cancelled) are handed to their logs all the same, without waiting.
#[derive(Default)]
pub struct Deferred(Vec<(Audit, Record)>);

impl Deferred {
    /// Takes the records out.
    pub fn take(&mut self) -> Vec<(Audit, Record)> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        for (audit, record) in self.0.drain(..) {
            if let Err(e) = audit.submit(vec![record], None) {
                eprintln!("nanoclaw serve: the audit log could not be written: {e}");
            }
        }
    }
}

tokio::task_local! {
    static DEFERRED: RefCell<Deferred>;
}

/// Runs `f` (a request's handler), collecting the records appended inside
/// it with [`Audit::append_with_answer`]: the caller must make them durable
/// before it answers (see `e2b::observe`).
pub async fn collect<F: Future>(f: F) -> (F::Output, Deferred) {
    DEFERRED
        .scope(RefCell::new(Deferred::default()), async move {
            let out = f.await;
            let deferred = DEFERRED.with(|d| Deferred(d.borrow_mut().take()));
            (out, deferred)
        })
        .await
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("capture_limit", &self.capture_limit)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens (creating if needed) the database file at `path`; see
    /// [`db::open`].
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        Ok(Audit::from_connection(db::open(path)?))
    }

    /// Wraps a connection made by [`db::open`].
    pub fn from_connection(conn: Connection) -> Audit {
        Audit {
            conn: Arc::new(Mutex::new(conn)),
            capture_limit: DEFAULT_CAPTURE_BYTES,
            writer: Arc::new(OnceLock::new()),
        }
    }

    /// Whether `other` is a handle of the same log (the same connection).
    pub fn same_log(&self, other: &Audit) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }

    /// Keeps at most `bytes` of each input and output (default
    /// [`DEFAULT_CAPTURE_BYTES`]); longer heads are cut at append (the
    /// length and hash of the whole are kept).
    pub fn with_capture_limit(mut self, bytes: usize) -> Audit {
        self.capture_limit = bytes;
        self
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves at worst an open
        // transaction, which rusqlite rolls back when it is dropped.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a record and bounds what it keeps.
    fn prepare(&self, mut record: Record) -> Result<Record, AuditError> {
        validate_kind(&record.kind)?;
        for c in [&mut record.input, &mut record.output]
            .into_iter()
            .flatten()
        {
            c.head.truncate(self.capture_limit);
        }
        record.duration_ms = clamp_u64(record.duration_ms);
        record.cpu_ms = clamp_u64(record.cpu_ms);
        record.peak_memory_bytes = clamp_u64(record.peak_memory_bytes);
        Ok(record)
    }

    /// Appends a record; it is on disk when this returns.
    pub fn append(&self, record: Record) -> Result<Appended, AuditError> {
        let record = self.prepare(record)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let appended = append_in(&tx, &record)?;
        tx.commit()?;
        Ok(appended)
    }

    /// Hands prepared records to the writer thread (started on first
    /// use); `Err` when it cannot take them.
    fn submit(
        &self,
        records: Vec<Record>,
        done: Option<tokio::sync::oneshot::Sender<Result<Vec<Appended>, String>>>,
    ) -> Result<(), AuditError> {
        let writer = self.writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let conn = self.conn.clone();
            std::thread::Builder::new()
                .name("nanoclaw-audit".into())
                .spawn(move || writer_loop(conn, rx))
                .map(|_| Mutex::new(tx))
                .map_err(|e| format!("cannot start its thread: {e}"))
        });
        let sender = match writer {
            Ok(s) => s.lock().unwrap_or_else(|e| e.into_inner()),
            Err(e) => return Err(AuditError::Writer(e.clone())),
        };
        sender
            .send(Batch { records, done })
            .map_err(|_| AuditError::Writer("it has stopped".into()))
    }

    /// Appends `records` in this order, in one commit with whatever other
    /// appends are waiting (group commit; see the [module docs](self)):
    /// they are on disk when this resolves. Needs no blocking thread.
    pub async fn append_all(&self, records: Vec<Record>) -> Result<Vec<Appended>, AuditError> {
        let records = records
            .into_iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>, _>>()?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(records, Some(tx))?;
        rx.await
            .map_err(|_| AuditError::Writer("it stopped before the records were written".into()))?
            .map_err(AuditError::Writer)
    }

    /// Appends one record ([`Audit::append_all`]): on disk when this
    /// resolves.
    pub async fn append_async(&self, record: Record) -> Result<Appended, AuditError> {
        let mut v = self.append_all(vec![record]).await?;
        v.pop()
            .ok_or_else(|| AuditError::Writer("no record was written".into()))
    }

    /// Appends `record` so that it is on disk before the answer of the
    /// request being served: inside [`collect`] (every HTTP request of
    /// the daemon) it joins the request's own record and is written in
    /// the same commit, before the answer leaves; elsewhere it is appended
    /// now ([`Audit::append_async`]) and is on disk when this returns.
    pub async fn append_with_answer(&self, record: Record) -> Result<(), AuditError> {
        let record = self.prepare(record)?;
        let mut record = Some(record);
        let _ = DEFERRED.try_with(|d| {
            if let Some(r) = record.take() {
                d.borrow_mut().0.push((self.clone(), r));
            }
        });
        match record {
            None => Ok(()),
            Some(r) => self.append_async(r).await.map(|_| ()),
        }
    }

    /// One record, if it exists.
    pub fn get(&self, seq: i64) -> Result<Option<Entry>, AuditError> {
        let conn = self.conn();
        let sql = format!("SELECT {COLUMNS} FROM audit WHERE seq = ?1");
        let found = conn
            .prepare_cached(&sql)?
            .query_row([seq], |r| Ok(entry_row(r)))
            .optional()?;
        found.transpose().map_err(|e| AuditError::Corrupt {
            seq,
            reason: e.to_string(),
        })
    }

    /// The records `filter` selects, in seq order.
    pub fn query(&self, filter: &Filter) -> Result<Vec<Entry>, AuditError> {
        let mut clauses = Vec::new();
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            clauses.push(format!("{clause} ?{}", args.len()));
        };
        if let Some(v) = filter.since_ms {
            add("time_ms >=", v.into());
        }
        if let Some(v) = filter.until_ms {
            add("time_ms <=", v.into());
        }
        if let Some(v) = &filter.tenant {
            add("tenant =", v.clone().into());
        }
        if let Some(v) = &filter.sandbox {
            add("sandbox =", v.clone().into());
        }
        if let Some(v) = &filter.kind {
            add("kind =", v.clone().into());
        }
        if let Some(v) = filter.after_seq {
            add("seq >", v.into());
        }
        let mut sql = format!("SELECT {COLUMNS} FROM audit");
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        let newest = filter.newest && filter.limit.is_some();
        sql.push_str(if newest {
            " ORDER BY seq DESC"
        } else {
            " ORDER BY seq"
        });
        if let Some(n) = filter.limit {
            sql.push_str(&format!(" LIMIT {}", i64::try_from(n).unwrap_or(i64::MAX)));
        }
        let conn = self.conn();
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get::<_, i64>(0)?, entry_row(r)))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, entry) = row?;
            out.push(entry.map_err(|e| AuditError::Corrupt {
                seq,
                reason: e.to_string(),
            })?);
        }
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    /// Walks the chain from the anchor (or seq 1) to the last record, in
    /// one read snapshot. It holds this handle's connection for the whole
    /// walk, so a daemon should verify through its own [`Audit::open`]
    /// rather than the handle its requests append through (other
    /// connections keep appending meanwhile: WAL readers do not block).
    pub fn verify(&self) -> Result<Report, AuditError> {
        self.verify_inner(None)
    }

    /// [`Audit::verify`], and also fails unless the record whose hash is
    /// `head` (a head printed by an earlier verify) is still in the chain
    /// or is the anchor: this detects removal of the newest records.
    pub fn verify_expecting(&self, head: &str) -> Result<Report, AuditError> {
        let h = head.trim().to_ascii_lowercase();
        if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(AuditError::InvalidHash(head.to_string()));
        }
        self.verify_inner(Some(&h))
    }

    fn verify_inner(&self, expect_head: Option<&str>) -> Result<Report, AuditError> {
        let mut conn = self.conn();
        // One read transaction: a snapshot, whatever other writers do.
        let tx = conn.transaction()?;
        let anchor = read_anchor(&tx)?;
        let (mut last_seq, mut head) = match &anchor {
            Some(a) => (a.seq, a.hash.clone()),
            None => (0, GENESIS.to_string()),
        };
        let mut found_head = expect_head == Some(head.as_str());
        let mut count = 0;
        let mut first_bad = None;
        {
            let mut st = tx.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
            let mut rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, entry_row(r))))?;
            while let Some(row) = rows.next().transpose()? {
                let (seq, entry) = row;
                match check_link(seq, entry, last_seq, &head) {
                    Ok(hash) => head = hash,
                    Err(reason) => {
                        // A gap names the first missing seq.
                        first_bad = Some((seq.min(last_seq + 1), reason));
                        break;
                    }
                }
                count += 1;
                last_seq = seq;
                found_head |= expect_head == Some(head.as_str());
            }
        }
        if let (None, Some(h), false) = (&first_bad, expect_head, found_head) {
            first_bad = Some((
                last_seq + 1,
                format!(
                    "the expected head {h} is not in the log, which ends at seq {last_seq}: \
                     newer records were removed (tail truncation), or that head was pruned \
                     or belongs to another log"
                ),
            ));
        }
        Ok(Report {
            count,
            last_seq,
            head,
            anchor,
            first_bad,
        })
    }

    /// Removes the records older than `older_than` (see
    /// [`Audit::prune_before`]).
    pub fn prune(&self, older_than: Duration) -> Result<Pruned, AuditError> {
        let ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        self.prune_before(db::now_ms().saturating_sub(ms))
    }

    /// Removes the oldest records, up to the last one before the first
    /// record at or after `cutoff_ms` (so records are removed from the
    /// start only): the anchor moves to the last removed record, and a
    /// [`kind::PRUNE`] record says what was removed. All in one transaction.
    pub fn prune_before(&self, cutoff_ms: i64) -> Result<Pruned, AuditError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let bounds: (Option<i64>, Option<i64>) = tx.query_row(
            "SELECT MIN(seq), COALESCE(
                 (SELECT MIN(seq) FROM audit WHERE time_ms >= ?1) - 1,
                 (SELECT MAX(seq) FROM audit))
             FROM audit",
            [cutoff_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (first, last) = match bounds {
            (Some(first), Some(last)) if last >= first => (first, last),
            _ => {
                let anchor = read_anchor(&tx)?;
                return Ok(Pruned {
                    count: 0,
                    range: None,
                    anchor,
                });
            }
        };
        let (hash, time_ms): (String, i64) = tx.query_row(
            "SELECT hash, time_ms FROM audit WHERE seq = ?1",
            [last],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let count = u64::try_from(last - first + 1).unwrap_or(0);
        let now = db::now_ms();
        let updated = tx.execute(
            "UPDATE audit_anchor SET seq = ?1, hash = ?2, time_ms = ?3,
                 pruned_total = pruned_total + ?4, pruned_at_ms = ?5 WHERE id = 1",
            params![last, hash, time_ms, count, now],
        )?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO audit_anchor (id, seq, hash, time_ms, pruned_total, pruned_at_ms)
                 VALUES (1, ?1, ?2, ?3, ?4, ?5)",
                params![last, hash, time_ms, count, now],
            )?;
        }
        tx.execute("DELETE FROM audit WHERE seq <= ?1", [last])?;
        let mut note = Record::new(kind::PRUNE);
        note.detail = Some(format!(
            "pruned {count} records (seq {first} to {last}) older than {}; verification starts after seq {last}, hash {hash}",
            db::format_rfc3339_ms(cutoff_ms)
        ));
        append_in(&tx, &note)?;
        let anchor = read_anchor(&tx)?;
        tx.commit()?;
        Ok(Pruned {
            count,
            range: Some((first, last)),
            anchor,
        })
    }
}

/// Checks one record against the chain so far: `Ok` is its hash, `Err`
/// says why it is bad.
fn check_link(
    seq: i64,
    entry: rusqlite::Result<Entry>,
    last_seq: i64,
    prev: &str,
) -> Result<String, String> {
    if seq <= last_seq {
        return Err(format!(
            "record {seq} lies before the start of the chain (seq {}: after the retention anchor, or 1)",
            last_seq + 1
        ));
    }
    if seq != last_seq + 1 {
        let missing = if seq == last_seq + 2 {
            format!("record {} is missing", last_seq + 1)
        } else {
            format!("records {} to {} are missing", last_seq + 1, seq - 1)
        };
        return Err(format!(
            "{missing}: seq jumps from {last_seq} to {seq} (records were deleted)"
        ));
    }
    let e = entry.map_err(|e| format!("record {seq} cannot be read: {e}"))?;
    if e.prev_hash != prev {
        return Err(format!(
            "record {seq}'s prev_hash {} is not the hash of record {last_seq} ({prev}): \
             the record before it was rewritten, or records were reordered or replaced",
            e.prev_hash
        ));
    }
    let want = chain_hash(seq, &e.prev_hash, e.time_ms, &e.time, &e.record);
    if e.hash != want {
        return Err(format!(
            "record {seq}'s hash does not match its contents (stored {}, computed {want}): \
             the record was changed after it was written",
            e.hash
        ));
    }
    Ok(e.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_bounds_and_hashes_the_whole() {
        let data = vec![b'x'; 10_000];
        let c = Captured::of(&data);
        assert_eq!(c.head.len(), DEFAULT_CAPTURE_BYTES);
        assert_eq!(c.len, 10_000);
        assert_eq!(c.sha256, hex::encode(Sha256::digest(&data)));
        assert!(c.truncated());
        let mut s = Capture::new(5);
        s.update(b"hel");
        s.update(b"lo world");
        let c2 = s.finish();
        assert_eq!(c2.head, b"hello");
        assert_eq!(c2, Captured::with_limit(b"hello world", 5));
        let j = serde_json::to_value(Captured::of(&[0xff, 0xfe])).expect("json");
        assert_eq!(j["head_base64"], "//4=");
    }

    #[test]
    fn hash_covers_every_field_unambiguously() {
        let base = Record::new("exec");
        let h = |r: &Record| chain_hash(1, GENESIS, 5, "t", r);
        let h0 = h(&base);
        let variants = [
            Record {
                tenant: Some(String::new()),
                ..base.clone()
            },
            Record {
                agent: Some("a".into()),
                ..base.clone()
            },
            Record {
                argv: Some(vec!["a".into(), "b".into()]),
                ..base.clone()
            },
            Record {
                argv: Some(vec!["ab".into()]),
                ..base.clone()
            },
            Record {
                exit_code: Some(0),
                ..base.clone()
            },
            Record {
                signal: Some(0),
                ..base.clone()
            },
            Record {
                output: Some(Captured::of(b"")),
                ..base.clone()
            },
            Record {
                input: Some(Captured::of(b"")),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::from([h0.clone()]);
        for v in &variants {
            assert!(seen.insert(h(v)), "{v:?} collides");
        }
        assert_ne!(chain_hash(2, GENESIS, 5, "t", &base), h0);
        assert_ne!(chain_hash(1, &"1".repeat(64), 5, "t", &base), h0);
        assert_ne!(chain_hash(1, GENESIS, 6, "t", &base), h0);
    }

    #[test]
    fn kinds() {
        assert!(validate_kind("quota_refusal").is_ok());
        for bad in ["", "Exec", "1x", "a-b", &"a".repeat(33)] {
            assert!(validate_kind(bad).is_err(), "{bad}");
        }
    }
}
