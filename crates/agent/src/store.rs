//! Persistent agents in the data folder's SQLite file (`nanoclaw.db`, the
//! one `serve` and the CLI share): each agent's definition, memory,
//! conversation history, runs, daily usage, "allow always" approvals and
//! pending approval requests. The schema is [`SCHEMA`], applied as one of
//! the server's numbered migrations.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::approval::{Answer, ApprovalRequest, Approver};
use crate::provider::Message;

/// The agent tables (a migration of the data folder's database).
pub const SCHEMA: &str = r#"
CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    created_ms    INTEGER NOT NULL,
    base          TEXT,              -- the configured agent it derives from (NULL: agents.defaults)
    config        TEXT,              -- the config file it was created under
    system        TEXT,
    tools         TEXT,              -- JSON list: at most these tools (NULL: the policy's)
    hosts         TEXT,              -- JSON list: at most these hosts (NULL: the policy's)
    daily_tokens  INTEGER,
    creator       TEXT,              -- the agent that created it (NULL: a person)
    team          TEXT
);
CREATE TABLE agent_memory (
    agent      TEXT PRIMARY KEY,
    text       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE agent_runs (
    id            TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    started_ms    INTEGER NOT NULL,
    ended_ms      INTEGER,
    prompt        TEXT NOT NULL,
    answer        TEXT,
    stop          TEXT,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost          REAL NOT NULL DEFAULT 0
);
CREATE INDEX agent_runs_agent ON agent_runs(agent, started_ms);
CREATE TABLE agent_messages (
    agent    TEXT NOT NULL,
    run      TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    time_ms  INTEGER NOT NULL,
    message  TEXT NOT NULL,          -- JSON provider::Message
    PRIMARY KEY (run, seq)
);
CREATE INDEX agent_messages_agent ON agent_messages(agent, time_ms);
CREATE TABLE agent_usage (
    agent         TEXT NOT NULL,
    day           TEXT NOT NULL,     -- UTC, YYYY-MM-DD
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost          REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, day)
);
CREATE TABLE agent_approved (
    agent      TEXT NOT NULL,
    binding    TEXT NOT NULL,
    summary    TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, binding)
);
CREATE TABLE approvals (
    id          TEXT PRIMARY KEY,
    tenant      TEXT,                -- the daemon's tenant that ran the agent (NULL: a local user)
    agent       TEXT NOT NULL,
    tool        TEXT NOT NULL,
    summary     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    binding     TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    state       TEXT NOT NULL,       -- pending | allow-once | allow-always | deny | expired
    decided_ms  INTEGER
);
"#;

/// An error of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("agent store: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored value cannot be read back.
    #[error("agent store: {0}")]
    Corrupt(String),
    /// No such agent.
    #[error("no agent {0:?}; `nanoclaw agent ls` lists them")]
    NoAgent(String),
    /// The id is taken.
    #[error("an agent {0:?} exists already; pick another id or `nanoclaw agent rm` it")]
    Exists(String),
    /// A bad id.
    #[error(
        "agent id {0:?} must be 1-64 letters, digits, _, . or - and start with a letter or digit"
    )]
    BadId(String),
}

/// A persistent agent's definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its id.
    pub id: String,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// The configured agent whose policy it starts from (`None`: the
    /// config's defaults).
    pub base: Option<String>,
    /// The config file it was created under.
    pub config: Option<String>,
    /// Its system prompt.
    pub system: Option<String>,
    /// At most these tools.
    pub tools: Option<Vec<String>>,
    /// At most these hosts.
    pub hosts: Option<Vec<String>>,
    /// Its daily token budget.
    pub daily_tokens: Option<u64>,
    /// The agent that made it.
    pub creator: Option<String>,
    /// Its team.
    pub team: Option<String>,
}

/// One finished (or running) run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunRow {
    /// Run id.
    pub id: String,
    /// Agent.
    pub agent: String,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms.
    pub ended_ms: Option<i64>,
    /// The prompt.
    pub prompt: String,
    /// The final answer.
    pub answer: Option<String>,
    /// Why it stopped.
    pub stop: Option<String>,
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// Money.
    pub cost: f64,
}

/// Usage of one agent on one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DayUsage {
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// Money.
    pub cost: f64,
}

/// A pending or decided approval request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalRow {
    /// The request.
    #[serde(flatten)]
    pub request: ApprovalRequest,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Expires, Unix ms.
    pub expires_ms: i64,
    /// `pending` or the answer.
    pub state: String,
}

/// Now, Unix ms.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The UTC day of a Unix-ms time, `YYYY-MM-DD`.
pub fn day_of(ms: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

fn plain_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Checks an agent id: a plain id, or a tenant's agent `id@tenant` (see
/// [`tenant_id`]).
pub fn check_id(id: &str) -> Result<(), StoreError> {
    let ok = match id.split_once('@') {
        Some((name, tenant)) => plain_id(name) && plain_id(tenant),
        None => plain_id(id),
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadId(id.to_string()))
    }
}

/// The stored id of agent `name` as run for `tenant` (the daemon's): each
/// tenant's agents are its own — memory, history, usage, "allow always"
/// answers, workspace and sandbox — even when tenants name the same
/// configured agent. `name` itself must be a plain id.
pub fn tenant_id(name: &str, tenant: Option<&str>) -> Result<String, StoreError> {
    if !plain_id(name) {
        return Err(StoreError::BadId(name.to_string()));
    }
    match tenant {
        Some(t) if plain_id(t) => Ok(format!("{name}@{t}")),
        Some(t) => Err(StoreError::BadId(format!("{name}@{t}"))),
        None => Ok(name.to_string()),
    }
}

fn json_list(s: Option<String>) -> Result<Option<Vec<String>>, StoreError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}

fn to_json<T: Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

/// The store: one connection, shared.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// A store over an open connection whose schema includes [`SCHEMA`].
    pub fn new(conn: Connection) -> Store {
        Store {
            conn: Arc::new(Mutex::new(conn)),
        }
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Store, StoreError> {
        let c = Connection::open_in_memory()?;
        c.execute_batch(SCHEMA)?;
        Ok(Store::new(c))
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Adds an agent.
    pub fn create(&self, a: &AgentRecord) -> Result<(), StoreError> {
        check_id(&a.id)?;
        let db = self.db();
        let n = db.execute(
            "INSERT OR IGNORE INTO agents (id, created_ms, base, config, system, tools, hosts, daily_tokens, creator, team)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                a.id,
                a.created_ms,
                a.base,
                a.config,
                a.system,
                to_json(&a.tools),
                to_json(&a.hosts),
                a.daily_tokens.map(|n| n.min(i64::MAX as u64) as i64),
                a.creator,
                a.team
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(a.id.clone()));
        }
        Ok(())
    }

    /// One agent.
    pub fn get(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT id, created_ms, base, config, system, tools, hosts, daily_tokens, creator, team FROM agents WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        AgentRecord {
                            id: r.get(0)?,
                            created_ms: r.get(1)?,
                            base: r.get(2)?,
                            config: r.get(3)?,
                            system: r.get(4)?,
                            daily_tokens: r.get::<_, Option<i64>>(7)?.map(|n| n.max(0) as u64),
                            creator: r.get(8)?,
                            team: r.get(9)?,
                            ..AgentRecord::default()
                        },
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((mut a, tools, hosts)) = row else {
            return Ok(None);
        };
        a.tools = json_list(tools)?;
        a.hosts = json_list(hosts)?;
        Ok(Some(a))
    }

    /// Every agent, by id.
    pub fn list(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let ids: Vec<String> = {
            let db = self.db();
            let mut st = db.prepare("SELECT id FROM agents ORDER BY id")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(a) = self.get(&id)? {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Removes an agent and everything it owns here (its audit records stay).
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let n = tx.execute("DELETE FROM agents WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NoAgent(id.to_string()));
        }
        for t in [
            "agent_memory",
            "agent_runs",
            "agent_messages",
            "agent_usage",
            "agent_approved",
        ] {
            tx.execute(&format!("DELETE FROM {t} WHERE agent = ?1"), [id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The agent's memory ("" when none).
    pub fn memory(&self, agent: &str) -> Result<String, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT text FROM agent_memory WHERE agent = ?1",
                [agent],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or_default())
    }

    /// Replaces the agent's memory.
    pub fn set_memory(&self, agent: &str, text: &str) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO agent_memory (agent, text, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(agent) DO UPDATE SET text = excluded.text, updated_ms = excluded.updated_ms",
            params![agent, text, now_ms()],
        )?;
        Ok(())
    }

    /// Records a run's start.
    pub fn start_run(&self, id: &str, agent: &str, prompt: &str) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO agent_runs (id, agent, started_ms, prompt) VALUES (?1, ?2, ?3, ?4)",
            params![id, agent, now_ms(), prompt],
        )?;
        Ok(())
    }

    /// Records a run's end.
    pub fn end_run(&self, r: &RunRow) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE agent_runs SET ended_ms = ?2, answer = ?3, stop = ?4, input_tokens = ?5, output_tokens = ?6, cost = ?7 WHERE id = ?1",
            params![
                r.id,
                now_ms(),
                r.answer,
                r.stop,
                r.input_tokens as i64,
                r.output_tokens as i64,
                r.cost
            ],
        )?;
        Ok(())
    }

    /// The agent's last `n` runs, newest first.
    pub fn runs(&self, agent: &str, n: usize) -> Result<Vec<RunRow>, StoreError> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT id, agent, started_ms, ended_ms, prompt, answer, stop, input_tokens, output_tokens, cost
             FROM agent_runs WHERE agent = ?1 ORDER BY started_ms DESC, rowid DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![agent, n as i64], |r| {
            Ok(RunRow {
                id: r.get(0)?,
                agent: r.get(1)?,
                started_ms: r.get(2)?,
                ended_ms: r.get(3)?,
                prompt: r.get(4)?,
                answer: r.get(5)?,
                stop: r.get(6)?,
                input_tokens: r.get::<_, i64>(7)?.max(0) as u64,
                output_tokens: r.get::<_, i64>(8)?.max(0) as u64,
                cost: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends messages of a run.
    pub fn append_messages(
        &self,
        agent: &str,
        run: &str,
        first_seq: usize,
        msgs: &[Message],
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = now_ms();
        for (i, m) in msgs.iter().enumerate() {
            let j = serde_json::to_string(m).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT OR REPLACE INTO agent_messages (agent, run, seq, time_ms, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![agent, run, (first_seq + i) as i64, now, j],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every message of one run, in order.
    pub fn messages(&self, run: &str) -> Result<Vec<Message>, StoreError> {
        let db = self.db();
        let mut st =
            db.prepare("SELECT message FROM agent_messages WHERE run = ?1 ORDER BY seq")?;
        let rows = st.query_map([run], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for j in rows {
            out.push(serde_json::from_str(&j?).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Adds usage to today's row.
    pub fn add_usage(
        &self,
        agent: &str,
        input: u64,
        output: u64,
        cost: f64,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO agent_usage (agent, day, input_tokens, output_tokens, cost) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(agent, day) DO UPDATE SET input_tokens = input_tokens + excluded.input_tokens,
               output_tokens = output_tokens + excluded.output_tokens, cost = cost + excluded.cost",
            params![agent, day_of(now_ms()), input as i64, output as i64, cost],
        )?;
        Ok(())
    }

    /// Today's usage.
    pub fn usage_today(&self, agent: &str) -> Result<DayUsage, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT input_tokens, output_tokens, cost FROM agent_usage WHERE agent = ?1 AND day = ?2",
                params![agent, day_of(now_ms())],
                |r| {
                    Ok(DayUsage {
                        input_tokens: r.get::<_, i64>(0)?.max(0) as u64,
                        output_tokens: r.get::<_, i64>(1)?.max(0) as u64,
                        cost: r.get(2)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    /// Was this exact call approved "always" for the agent?
    pub fn is_approved(&self, agent: &str, binding: &str) -> Result<bool, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT 1 FROM agent_approved WHERE agent = ?1 AND binding = ?2",
                params![agent, binding],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Remembers an "allow always".
    pub fn approve_always(
        &self,
        agent: &str,
        binding: &str,
        summary: &str,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT OR IGNORE INTO agent_approved (agent, binding, summary, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![agent, binding, summary, now_ms()],
        )?;
        Ok(())
    }

    /// Files a pending request (`tenant`: whose it is; only that tenant
    /// sees and answers it through the daemon).
    pub fn file_approval(
        &self,
        req: &ApprovalRequest,
        tenant: Option<&str>,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        self.db().execute(
            "INSERT INTO approvals (id, tenant, agent, tool, summary, reason, binding, created_ms, expires_ms, state)
             VALUES (?1, ?9, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
            params![
                req.id,
                req.agent,
                req.tool,
                req.summary,
                req.reason,
                req.binding,
                now,
                now + wait.as_millis() as i64,
                tenant
            ],
        )?;
        Ok(())
    }

    /// Requests of `tenant` (`None`: the local user's, filed without a
    /// tenant), newest first (`pending_only`: those still waiting and not
    /// expired).
    pub fn approvals(
        &self,
        tenant: Option<&str>,
        pending_only: bool,
    ) -> Result<Vec<ApprovalRow>, StoreError> {
        let db = self.db();
        let sql = "SELECT id, agent, tool, summary, reason, binding, created_ms, expires_ms, state FROM approvals
             WHERE tenant IS ?2 AND (?3 = 0 OR (state = 'pending' AND expires_ms > ?1))
             ORDER BY created_ms DESC LIMIT 1000";
        let mut st = db.prepare(sql)?;
        let rows = st.query_map(params![now_ms(), tenant, pending_only as i64], |r| {
            Ok(ApprovalRow {
                request: ApprovalRequest {
                    id: r.get(0)?,
                    agent: r.get(1)?,
                    tool: r.get(2)?,
                    summary: r.get(3)?,
                    reason: r.get(4)?,
                    binding: r.get(5)?,
                },
                created_ms: r.get(6)?,
                expires_ms: r.get(7)?,
                state: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A person answers a pending request of `tenant`. `Ok(false)`: no
    /// such pending, unexpired request of that tenant.
    pub fn answer_approval(
        &self,
        tenant: Option<&str>,
        id: &str,
        answer: Answer,
    ) -> Result<bool, StoreError> {
        if !matches!(
            answer,
            Answer::AllowOnce | Answer::AllowAlways | Answer::Deny
        ) {
            return Ok(false);
        }
        let n = self.db().execute(
            "UPDATE approvals SET state = ?2, decided_ms = ?3
             WHERE id = ?1 AND tenant IS ?4 AND state = 'pending' AND expires_ms > ?3",
            params![id, answer.as_str(), now_ms(), tenant],
        )?;
        Ok(n == 1)
    }

    fn approval_state(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db()
            .query_row("SELECT state FROM approvals WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn expire_approval(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.db().execute(
            "UPDATE approvals SET state = 'expired', decided_ms = ?2 WHERE id = ?1 AND state = 'pending'",
            params![id, now_ms()],
        )?;
        Ok(n == 1)
    }
}

/// Approvals through the store: the request is filed, a person answers it
/// through `nanoclaw agent approve` or the daemon's `/v1/approvals`; no
/// answer before the expiry: [`Answer::Expired`].
pub struct QueueApprover {
    store: Store,
    /// Whose requests these are.
    pub tenant: Option<String>,
    /// How often the answer is looked for.
    pub poll: Duration,
}

impl QueueApprover {
    /// Over `store`.
    pub fn new(store: Store) -> QueueApprover {
        QueueApprover {
            store,
            tenant: None,
            poll: Duration::from_millis(100),
        }
    }
}

impl Approver for QueueApprover {
    fn ask(&self, req: &ApprovalRequest, wait: Duration) -> Answer {
        if self
            .store
            .file_approval(req, self.tenant.as_deref(), wait)
            .is_err()
        {
            return Answer::Unavailable;
        }
        let until = Instant::now() + wait;
        loop {
            match self.store.approval_state(&req.id) {
                Ok(Some(s)) if s != "pending" => {
                    return Answer::parse(&s).unwrap_or(Answer::Expired);
                }
                Ok(_) => {}
                Err(_) => return Answer::Unavailable,
            }
            if Instant::now() >= until {
                // Expire it, unless a person answered at the last moment.
                return match self.store.expire_approval(&req.id) {
                    Ok(true) | Err(_) => Answer::Expired,
                    Ok(false) => match self.store.approval_state(&req.id) {
                        Ok(Some(s)) => Answer::parse(&s).unwrap_or(Answer::Expired),
                        _ => Answer::Expired,
                    },
                };
            }
            std::thread::sleep(
                self.poll
                    .min(until.saturating_duration_since(Instant::now())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_796_601_600_000 - 1), "2026-12-06");
    }

    #[test]
    fn agents_memory_usage_and_approvals_round_trip() {
        let s = Store::in_memory().expect("store");
        let a = AgentRecord {
            id: "coder".into(),
            tools: Some(vec!["exec".into()]),
            ..AgentRecord::default()
        };
        s.create(&a).expect("create");
        assert!(matches!(s.create(&a), Err(StoreError::Exists(_))));
        assert!(matches!(
            s.create(&AgentRecord {
                id: "../x".into(),
                ..a.clone()
            }),
            Err(StoreError::BadId(_))
        ));
        assert_eq!(s.get("coder").expect("get"), Some(a));
        s.set_memory("coder", "likes tabs").expect("mem");
        assert_eq!(s.memory("coder").expect("mem"), "likes tabs");
        s.add_usage("coder", 10, 5, 0.5).expect("usage");
        s.add_usage("coder", 1, 1, 0.25).expect("usage");
        let u = s.usage_today("coder").expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens, u.cost), (11, 6, 0.75));
        let req = ApprovalRequest {
            id: "apr_1".into(),
            agent: "coder".into(),
            tool: "exec".into(),
            summary: "rm".into(),
            reason: "r".into(),
            binding: "b".into(),
        };
        let q = QueueApprover {
            store: s.clone(),
            tenant: Some("t1".into()),
            poll: Duration::from_millis(5),
        };
        assert_eq!(q.ask(&req, Duration::from_millis(30)), Answer::Expired);
        assert!(!s
            .answer_approval(Some("t1"), "apr_1", Answer::AllowOnce)
            .expect("late answer"));
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..200 {
                // Another tenant (or the local user) cannot answer it.
                assert!(!s2
                    .answer_approval(Some("t2"), "apr_2", Answer::AllowAlways)
                    .unwrap_or(true));
                assert!(!s2
                    .answer_approval(None, "apr_2", Answer::AllowAlways)
                    .unwrap_or(true));
                if s2
                    .answer_approval(Some("t1"), "apr_2", Answer::Deny)
                    .unwrap_or(false)
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let req2 = ApprovalRequest {
            id: "apr_2".into(),
            ..req
        };
        assert_eq!(q.ask(&req2, Duration::from_secs(5)), Answer::Deny);
        t.join().expect("join");
        s.remove("coder").expect("rm");
        assert_eq!(s.memory("coder").expect("mem"), "");
    }
}
