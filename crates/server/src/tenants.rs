//! Tenants, their quotas and their API keys.
//!
//! A tenant is a name (`[a-z0-9][a-z0-9_-]{0,62}`), a creation time and
//! quotas. Each quota is optional: unset means the default named by a
//! constant below (E2B's hobby tier: 20 concurrent sandboxes of its default
//! 2 vCPU and 512 MiB, one hour at most).
//!
//! API keys have E2B's format, `e2b_` and 40 lowercase hex digits (160 bits
//! from the OS's random generator), so E2B's SDKs take them as they are. A
//! key is shown once, when it is made; the database keeps its SHA-256 and
//! its first 12 characters (`e2b_` and 8 hex digits, 32 of the 160 bits) to
//! name it in listings and `revoke`. A tenant may hold several keys.
//!
//! [`Tenants`] is a cheap handle (`Clone`, `Send`, `Sync`) over one SQLite
//! connection behind a mutex; its calls block on disk I/O, so from async
//! code call them in `tokio::task::spawn_blocking` with a clone.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::{self, DbError};

/// Default for [`Quotas::max_sandboxes`]: concurrent sandboxes.
pub const DEFAULT_MAX_SANDBOXES: u32 = 20;
/// Default for [`Quotas::max_memory_mb`]: MiB over all running sandboxes.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 10 * 1024;
/// Default for [`Quotas::max_cpus`]: CPUs over all running sandboxes.
pub const DEFAULT_MAX_CPUS: f64 = 40.0;
/// Default for [`Quotas::max_lifetime_s`]: the longest a sandbox may live.
pub const DEFAULT_MAX_LIFETIME_S: u64 = 3600;
/// Default for [`Quotas::rate_per_s`]: API requests per second.
pub const DEFAULT_RATE_PER_S: f64 = 50.0;

/// The prefix of every API key.
pub const KEY_PREFIX: &str = "e2b_";
/// Hex digits after the prefix (160 bits).
pub const KEY_HEX_DIGITS: usize = 40;
/// Characters of a key kept to name it: the prefix and 8 hex digits.
pub const KEY_ID_LEN: usize = KEY_PREFIX.len() + 8;

/// An error managing tenants.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The name does not match `[a-z0-9][a-z0-9_-]{0,62}`.
    #[error("invalid tenant name {0:?}: use 1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit")]
    InvalidName(String),
    /// A tenant of that name exists.
    #[error("tenant {0:?} already exists")]
    Duplicate(String),
    /// No tenant of that name.
    #[error("no tenant {0:?} (see `nanoclaw tenant ls`)")]
    NotFound(String),
    /// The name belonged to a tenant that was removed: names are never
    /// given to another tenant (its audit history keeps the name).
    #[error("tenant name {0:?} belonged to a removed tenant and is not reused (the audit log still names it): pick another name")]
    Retired(String),
    /// A quota value is out of range or unparseable.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidQuota {
        /// The quota (as the CLI flag names it).
        field: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// No key of the tenant starts with the given prefix.
    #[error("tenant {tenant:?} has no API key {prefix:?}")]
    KeyNotFound {
        /// The tenant.
        tenant: String,
        /// The prefix given.
        prefix: String,
    },
    /// Several keys of the tenant start with the given prefix.
    #[error("{count} API keys of tenant {tenant:?} start with {prefix:?}; give more of the key")]
    AmbiguousKey {
        /// The tenant.
        tenant: String,
        /// The prefix given.
        prefix: String,
        /// How many keys match.
        count: usize,
    },
    /// A key prefix that cannot name a key.
    #[error("invalid API key prefix {0:?}: give the key's first characters as `tenant ls` shows them (e.g. e2b_1a2b3c4d), at least e2b_ and 4 hex digits")]
    InvalidPrefix(String),
    /// The OS's random generator failed.
    #[error("cannot generate an API key: the OS random generator failed: {0}")]
    Random(getrandom::Error),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for TenantError {
    fn from(e: rusqlite::Error) -> Self {
        TenantError::Db(DbError::Sql(e))
    }
}

/// A tenant's quotas as set; `None` means the default constant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quotas {
    /// Concurrent sandboxes ([`DEFAULT_MAX_SANDBOXES`]).
    pub max_sandboxes: Option<u32>,
    /// MiB of memory over all running sandboxes ([`DEFAULT_MAX_MEMORY_MB`]).
    pub max_memory_mb: Option<u64>,
    /// CPUs over all running sandboxes ([`DEFAULT_MAX_CPUS`]).
    pub max_cpus: Option<f64>,
    /// The longest lifetime of one sandbox, in seconds ([`DEFAULT_MAX_LIFETIME_S`]).
    pub max_lifetime_s: Option<u64>,
    /// API requests per second ([`DEFAULT_RATE_PER_S`]).
    pub rate_per_s: Option<f64>,
}

/// The quotas in force: the set ones, defaults for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Concurrent sandboxes.
    pub max_sandboxes: u32,
    /// MiB of memory over all running sandboxes.
    pub max_memory_mb: u64,
    /// CPUs over all running sandboxes.
    pub max_cpus: f64,
    /// The longest lifetime of one sandbox, in seconds.
    pub max_lifetime_s: u64,
    /// API requests per second.
    pub rate_per_s: f64,
}

impl Quotas {
    /// The quotas in force.
    pub fn limits(&self) -> Limits {
        Limits {
            max_sandboxes: self.max_sandboxes.unwrap_or(DEFAULT_MAX_SANDBOXES),
            max_memory_mb: self.max_memory_mb.unwrap_or(DEFAULT_MAX_MEMORY_MB),
            max_cpus: self.max_cpus.unwrap_or(DEFAULT_MAX_CPUS),
            max_lifetime_s: self.max_lifetime_s.unwrap_or(DEFAULT_MAX_LIFETIME_S),
            rate_per_s: self.rate_per_s.unwrap_or(DEFAULT_RATE_PER_S),
        }
    }

    /// Checks every set value is in range (all must be positive; counts
    /// and sizes fit SQLite's integers; floats are finite).
    pub fn validate(&self) -> Result<(), TenantError> {
        let bad = |field, value: String, reason: &str| {
            Err(TenantError::InvalidQuota {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        if self.max_sandboxes == Some(0) {
            return bad("max-sandboxes", "0".into(), POSITIVE);
        }
        if let Some(m) = self.max_memory_mb {
            if m == 0 || m > MAX_MEMORY_MB {
                return bad("max-memory", format!("{m} MiB"), MEMORY_RANGE);
            }
        }
        if let Some(c) = self.max_cpus {
            if !(c.is_finite() && c > 0.0 && c <= MAX_CPUS) {
                return bad("max-cpus", c.to_string(), CPUS_RANGE);
            }
        }
        if let Some(l) = self.max_lifetime_s {
            if l == 0 || l > MAX_LIFETIME_S {
                return bad("max-lifetime", format!("{l}s"), LIFETIME_RANGE);
            }
        }
        if let Some(r) = self.rate_per_s {
            if !(r.is_finite() && r > 0.0 && r <= MAX_RATE) {
                return bad("rate", r.to_string(), RATE_RANGE);
            }
        }
        Ok(())
    }
}

const POSITIVE: &str = "must be a whole number of at least 1";
const MAX_MEMORY_MB: u64 = 1 << 30;
const MEMORY_RANGE: &str =
    "expected a size of at least 1 MiB with a unit (e.g. 512m, 4g; a bare number is bytes)";
const MAX_CPUS: f64 = 1_000_000.0;
const CPUS_RANGE: &str = "expected a number of CPUs above 0 (e.g. 0.5, 2, 16)";
const MAX_LIFETIME_S: u64 = 10 * 365 * 86_400;
const LIFETIME_RANGE: &str = "expected a duration of at least 1s (e.g. 300s, 1h, 1d)";
const MAX_RATE: f64 = 1_000_000_000.0;
const RATE_RANGE: &str = "expected requests per second above 0 (e.g. 0.5, 50)";

fn invalid(field: &'static str, value: &str, reason: &str) -> TenantError {
    TenantError::InvalidQuota {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses `--max-sandboxes`: a whole number, at least 1.
pub fn parse_max_sandboxes(s: &str) -> Result<u32, TenantError> {
    match s.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid("max-sandboxes", s, POSITIVE)),
    }
}

/// Parses `--max-memory` (`512m`, `4g`, like `run --memory`: a bare
/// number is bytes) into MiB, rounded up; at least 1 MiB.
pub fn parse_max_memory_mb(s: &str) -> Result<u64, TenantError> {
    let bytes = nanoclaw_sandbox::units::parse_size(s)
        .map_err(|_| invalid("max-memory", s, MEMORY_RANGE))?;
    let mb = bytes.div_ceil(1 << 20);
    if bytes < (1 << 20) || mb > MAX_MEMORY_MB {
        return Err(invalid("max-memory", s, MEMORY_RANGE));
    }
    Ok(mb)
}

/// Parses `--max-cpus` (`2.5`): above 0.
pub fn parse_max_cpus(s: &str) -> Result<f64, TenantError> {
    match s.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 && c <= MAX_CPUS => Ok(c),
        _ => Err(invalid("max-cpus", s, CPUS_RANGE)),
    }
}

/// Parses `--max-lifetime` (`300s`, `1h`, `1d`; a bare number is
/// seconds) into whole seconds, at least 1.
pub fn parse_max_lifetime_s(s: &str) -> Result<u64, TenantError> {
    let d = db::parse_duration(s).map_err(|_| invalid("max-lifetime", s, LIFETIME_RANGE))?;
    match d.as_secs() {
        n if (1..=MAX_LIFETIME_S).contains(&n) => Ok(n),
        _ => Err(invalid("max-lifetime", s, LIFETIME_RANGE)),
    }
}

/// Parses `--rate` (requests per second, `50`, `0.5`): above 0.
pub fn parse_rate(s: &str) -> Result<f64, TenantError> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= MAX_RATE => Ok(r),
        _ => Err(invalid("rate", s, RATE_RANGE)),
    }
}

/// One change to one quota in [`Tenants::set`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Change<T> {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Set it.
    Set(T),
    /// Unset it: the default applies.
    Default,
}

impl<T: Copy> Change<T> {
    fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Change::Keep => current,
            Change::Set(v) => Some(v),
            Change::Default => None,
        }
    }
}

/// Changes to a tenant's quotas; [`Change::Keep`] for the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuotaChanges {
    /// See [`Quotas::max_sandboxes`].
    pub max_sandboxes: Change<u32>,
    /// See [`Quotas::max_memory_mb`].
    pub max_memory_mb: Change<u64>,
    /// See [`Quotas::max_cpus`].
    pub max_cpus: Change<f64>,
    /// See [`Quotas::max_lifetime_s`].
    pub max_lifetime_s: Change<u64>,
    /// See [`Quotas::rate_per_s`].
    pub rate_per_s: Change<f64>,
}

impl QuotaChanges {
    /// `quotas` with these changes made.
    pub fn apply(&self, q: Quotas) -> Quotas {
        Quotas {
            max_sandboxes: self.max_sandboxes.apply(q.max_sandboxes),
            max_memory_mb: self.max_memory_mb.apply(q.max_memory_mb),
            max_cpus: self.max_cpus.apply(q.max_cpus),
            max_lifetime_s: self.max_lifetime_s.apply(q.max_lifetime_s),
            rate_per_s: self.rate_per_s.apply(q.rate_per_s),
        }
    }
}

/// An API key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The key's first characters (`e2b_` and 8 hex digits).
    pub id: String,
    /// When it was made, Unix milliseconds.
    pub created_ms: i64,
    /// The same, RFC 3339.
    pub created: String,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// When it was made, Unix milliseconds.
    pub created_ms: i64,
    /// The same, RFC 3339.
    pub created: String,
    /// Quotas as set.
    pub quotas: Quotas,
    /// Quotas in force.
    pub limits: Limits,
    /// Its API keys, oldest first.
    pub keys: Vec<KeyInfo>,
}

/// A freshly made API key: show it once, it is not stored.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Its first characters, as listings show them.
    pub fn id(&self) -> &str {
        &self.0[..KEY_ID_LEN]
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.id())
    }
}

/// Checks a tenant name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), TenantError> {
    let b = name.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(TenantError::InvalidName(name.to_string()))
    }
}

/// Whether `key` has the shape of an API key (`e2b_` + 40 lowercase hex).
pub fn is_well_formed_key(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + KEY_HEX_DIGITS
        && key.starts_with(KEY_PREFIX)
        && key.as_bytes()[KEY_PREFIX.len()..]
            .iter()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The stored form of a key. SHA-256 without salt or stretching is the
/// right hash here: keys are 160 random bits, not passwords, so there is no
/// dictionary to slow down and a fast hash lets every request be checked
/// with one indexed lookup.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn new_key() -> Result<ApiKey, TenantError> {
    let mut bytes = [0u8; KEY_HEX_DIGITS / 2];
    getrandom::getrandom(&mut bytes).map_err(TenantError::Random)?;
    Ok(ApiKey(format!("{KEY_PREFIX}{}", hex::encode(bytes))))
}

/// The tenants in one database: a cheap, cloneable handle (see the
/// [module docs](self)).
#[derive(Clone)]
pub struct Tenants {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").finish_non_exhaustive()
    }
}

const TENANT_COLUMNS: &str =
    "id, name, created_ms, max_sandboxes, max_memory_mb, max_cpus, max_lifetime_s, rate_per_s";

fn int_to_u64(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn u64_to_int(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Tenant)> {
    let created_ms: i64 = r.get(2)?;
    let quotas = Quotas {
        max_sandboxes: r
            .get::<_, Option<i64>>(3)?
            .and_then(|v| u32::try_from(v).ok()),
        max_memory_mb: int_to_u64(r.get(4)?),
        max_cpus: r.get(5)?,
        max_lifetime_s: int_to_u64(r.get(6)?),
        rate_per_s: r.get(7)?,
    };
    Ok((
        r.get(0)?,
        Tenant {
            name: r.get(1)?,
            created_ms,
            created: db::format_rfc3339_ms(created_ms),
            limits: quotas.limits(),
            quotas,
            keys: Vec::new(),
        },
    ))
}

fn load_keys(conn: &Connection, id: i64) -> Result<Vec<KeyInfo>, TenantError> {
    let mut st = conn.prepare_cached(
        "SELECT prefix, created_ms FROM api_keys WHERE tenant_id = ?1 ORDER BY created_ms, prefix",
    )?;
    let keys = st
        .query_map([id], |r| {
            let created_ms: i64 = r.get(1)?;
            Ok(KeyInfo {
                id: r.get(0)?,
                created_ms,
                created: db::format_rfc3339_ms(created_ms),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(keys)
}

fn find(conn: &Connection, name: &str) -> Result<Option<(i64, Tenant)>, TenantError> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?1");
    let found = conn
        .prepare_cached(&sql)?
        .query_row([name], tenant_row)
        .optional()?;
    match found {
        Some((id, mut t)) => {
            t.keys = load_keys(conn, id)?;
            Ok(Some((id, t)))
        }
        None => Ok(None),
    }
}

fn insert_key(conn: &Connection, tenant_id: i64) -> Result<ApiKey, TenantError> {
    let key = new_key()?;
    conn.execute(
        "INSERT INTO api_keys (hash, prefix, tenant_id, created_ms) VALUES (?1, ?2, ?3, ?4)",
        (
            key_hash(key.as_str()).as_slice(),
            key.id(),
            tenant_id,
            db::now_ms(),
        ),
    )?;
    Ok(key)
}

impl Tenants {
    /// Opens (creating if needed) the database file at `path`; see
    /// [`db::open`].
    pub fn open(path: &Path) -> Result<Tenants, TenantError> {
        Ok(Tenants::from_connection(db::open(path)?))
    }

    /// Wraps a connection made by [`db::open`].
    pub fn from_connection(conn: Connection) -> Tenants {
        Tenants {
            conn: Arc::new(Mutex::new(conn)),
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection in a
        // state worse than a failed statement: SQLite rolls back.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a tenant and its first API key. The key is returned once and
    /// only its hash is stored.
    pub fn add(&self, name: &str, quotas: Quotas) -> Result<(Tenant, ApiKey), TenantError> {
        validate_name(name)?;
        quotas.validate()?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if find(&tx, name)?.is_some() {
            return Err(TenantError::Duplicate(name.to_string()));
        }
        let retired: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM retired_tenants WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if retired {
            return Err(TenantError::Retired(name.to_string()));
        }
        tx.execute(
            "INSERT INTO tenants (name, created_ms, max_sandboxes, max_memory_mb, max_cpus, max_lifetime_s, rate_per_s)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            (
                name,
                db::now_ms(),
                quotas.max_sandboxes,
                u64_to_int(quotas.max_memory_mb),
                quotas.max_cpus,
                u64_to_int(quotas.max_lifetime_s),
                quotas.rate_per_s,
            ),
        )?;
        let key = insert_key(&tx, tx.last_insert_rowid())?;
        let (_, tenant) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        tx.commit()?;
        Ok((tenant, key))
    }

    /// Every tenant, by name.
    pub fn list(&self) -> Result<Vec<Tenant>, TenantError> {
        let conn = self.conn();
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name");
        let mut st = conn.prepare(&sql)?;
        let rows = st
            .query_map([], tenant_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, mut t)| {
                t.keys = load_keys(&conn, id)?;
                Ok(t)
            })
            .collect()
    }

    /// One tenant, or [`TenantError::NotFound`].
    pub fn get(&self, name: &str) -> Result<Tenant, TenantError> {
        find(&self.conn(), name)?
            .map(|(_, t)| t)
            .ok_or_else(|| TenantError::NotFound(name.to_string()))
    }

    /// Changes a tenant's quotas; returns the tenant as changed.
    pub fn set(&self, name: &str, changes: &QuotaChanges) -> Result<Tenant, TenantError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (id, t) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        let q = changes.apply(t.quotas);
        q.validate()?;
        tx.execute(
            "UPDATE tenants SET max_sandboxes = ?2, max_memory_mb = ?3, max_cpus = ?4,
                 max_lifetime_s = ?5, rate_per_s = ?6 WHERE id = ?1",
            (
                id,
                q.max_sandboxes,
                u64_to_int(q.max_memory_mb),
                q.max_cpus,
                u64_to_int(q.max_lifetime_s),
                q.rate_per_s,
            ),
        )?;
        let (_, t) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        tx.commit()?;
        Ok(t)
    }

    /// Removes a tenant and all its API keys; its name is retired (never
    /// given to a new tenant). A running daemon ends the tenant's
    /// sandboxes within a second.
    pub fn remove(&self, name: &str) -> Result<(), TenantError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (id, _) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        tx.execute("DELETE FROM api_keys WHERE tenant_id = ?1", [id])?;
        tx.execute("DELETE FROM tenants WHERE id = ?1", [id])?;
        // Never given to another tenant: the audit log, and the daemon's
        // records of sandboxes that may outlive this call, name tenants.
        tx.execute(
            "INSERT OR IGNORE INTO retired_tenants (name, removed_ms) VALUES (?1, ?2)",
            (name, db::now_ms()),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Gives a tenant one more API key, returned once.
    pub fn add_key(&self, name: &str) -> Result<ApiKey, TenantError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (id, _) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        let key = insert_key(&tx, id)?;
        tx.commit()?;
        Ok(key)
    }

    /// Revokes the tenant's key named by `prefix`: the whole key, or its
    /// first characters as listed (at least `e2b_` and 4 hex digits; they
    /// must match exactly one key). Returns the revoked key's id.
    pub fn revoke_key(&self, name: &str, prefix: &str) -> Result<String, TenantError> {
        let p = prefix.trim();
        let hex_part = p.strip_prefix(KEY_PREFIX).unwrap_or("");
        let valid_prefix = (4..=KEY_ID_LEN - KEY_PREFIX.len()).contains(&hex_part.len())
            && hex_part
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !is_well_formed_key(p) && !valid_prefix {
            return Err(TenantError::InvalidPrefix(prefix.to_string()));
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (id, _) = find(&tx, name)?.ok_or_else(|| TenantError::NotFound(name.into()))?;
        let matches: Vec<(Vec<u8>, String)> = if is_well_formed_key(p) {
            tx.prepare("SELECT hash, prefix FROM api_keys WHERE tenant_id = ?1 AND hash = ?2")?
                .query_map((id, key_hash(p).as_slice()), |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        } else {
            tx.prepare("SELECT hash, prefix FROM api_keys WHERE tenant_id = ?1 AND substr(prefix, 1, length(?2)) = ?2")?
                .query_map((id, p), |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let (hash, key_id) = match matches.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(TenantError::KeyNotFound {
                    tenant: name.to_string(),
                    prefix: prefix.to_string(),
                })
            }
            many => {
                return Err(TenantError::AmbiguousKey {
                    tenant: name.to_string(),
                    prefix: prefix.to_string(),
                    count: many.len(),
                })
            }
        };
        tx.execute("DELETE FROM api_keys WHERE hash = ?1", [hash])?;
        tx.commit()?;
        Ok(key_id)
    }

    /// The tenant holding `key`, or `None`. A key that is not `e2b_` and
    /// 40 lowercase hex digits is refused without touching the database.
    /// The lookup is by the key's SHA-256 through the primary-key index
    /// (timing cannot leak the key: an attacker would have to guess a
    /// SHA-256 preimage prefix).
    pub fn authenticate(&self, key: &str) -> Result<Option<Tenant>, TenantError> {
        if !is_well_formed_key(key) {
            return Ok(None);
        }
        let conn = self.conn();
        let name: Option<String> = conn
            .prepare_cached(
                "SELECT t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.hash = ?1",
            )?
            .query_row([key_hash(key).as_slice()], |r| r.get(0))
            .optional()?;
        match name {
            Some(n) => Ok(find(&conn, &n)?.map(|(_, t)| t)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "acme", "0", "team-1_x", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "Acme", "a b", "a.b", "é", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_shape() {
        let k = new_key().expect("random");
        assert!(is_well_formed_key(k.as_str()), "{}", k.as_str());
        assert_eq!(k.as_str().len(), 44);
        assert_eq!(k.id(), &k.as_str()[..12]);
        assert!(!format!("{k:?}").contains(&k.as_str()[12..]));
        assert!(!is_well_formed_key(&k.as_str().to_uppercase()));
        assert!(!is_well_formed_key(&k.as_str()[..43]));
        assert!(!is_well_formed_key(&format!("e2c_{}", &k.as_str()[4..])));
        assert_ne!(new_key().expect("random"), k);
    }

    #[test]
    fn quota_parsing() {
        assert_eq!(parse_max_memory_mb("4g").ok(), Some(4096));
        assert_eq!(parse_max_memory_mb("512m").ok(), Some(512));
        assert!(parse_max_memory_mb("4096").is_err(), "bare number is bytes");
        assert!(parse_max_memory_mb("lots").is_err());
        assert_eq!(parse_max_cpus("2.5").ok(), Some(2.5));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_max_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_max_lifetime_s("1h").ok(), Some(3600));
        assert_eq!(parse_max_lifetime_s("90").ok(), Some(90));
        assert!(parse_max_lifetime_s("0s").is_err());
        assert!(parse_max_lifetime_s("soon").is_err());
        assert_eq!(parse_max_sandboxes("5").ok(), Some(5));
        assert!(parse_max_sandboxes("0").is_err());
        assert!(parse_max_sandboxes("-3").is_err());
        assert_eq!(parse_rate("0.5").ok(), Some(0.5));
        assert!(parse_rate("0").is_err());
        let msg = parse_max_memory_mb("lots").err().map(|e| e.to_string());
        assert!(
            msg.as_deref().is_some_and(|m| m.contains("max-memory")),
            "{msg:?}"
        );
    }
}
