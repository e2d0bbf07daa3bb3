//! The data folder and the one SQLite file `serve` and the CLI share.
//!
//! # Where
//!
//! The data folder is, in order: `--data DIR` (the caller passes it to
//! [`data_dir`]), `$NANOCLAW_DATA`, `$NANOCLAW_DATA_DIR` (the variable the
//! image store reads, so one variable moves everything), `/var/lib/nanoclaw`
//! as root, `$XDG_DATA_HOME/nanoclaw`, `~/.local/share/nanoclaw`. The
//! database is `nanoclaw.db` in it.
//!
//! # How
//!
//! - The folder is created `0700` when absent (an existing folder keeps its
//!   mode: it is shared with the image store and workspaces); the database
//!   file is created `0600` and narrowed to `0600` if it is wider. SQLite
//!   gives its `-wal` and `-shm` files the database file's mode.
//! - `journal_mode=WAL`: readers never block the writer, so `serve` and the
//!   CLI use the file at the same time.
//! - `synchronous=FULL`: in WAL mode the log is fsynced at every commit, so
//!   a record is on disk before the call that wrote it returns.
//! - `busy_timeout` of [`BUSY_TIMEOUT`]: a writer waits for another
//!   process's write transaction instead of failing at once.
//! - `foreign_keys=ON` (API keys are deleted with their tenant).
//! - Schema changes are numbered migrations ([`MIGRATIONS`]); the table
//!   `schema_version` holds one row per applied migration. They are applied
//!   in one `BEGIN IMMEDIATE` transaction, so two processes opening a new
//!   file at once do not both apply them.
//!
//! Also here: the time and duration encodings stored in the file (unix
//! milliseconds, RFC 3339 UTC with milliseconds) and their parsers, which
//! the tenant and audit layers share.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// The database file's name in the data folder.
pub const DB_FILE: &str = "nanoclaw.db";

/// How long a connection waits for another writer before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The data folder as root.
pub const ROOT_DATA_DIR: &str = "/var/lib/nanoclaw";

/// The schema, one migration per version (version = index + 1). Never edit
/// a released migration: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants, API keys, the audit log and its retention anchor.
    r#"
CREATE TABLE tenants (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    created_ms     INTEGER NOT NULL,
    max_sandboxes  INTEGER,  -- NULL: the default (tenants::DEFAULT_MAX_SANDBOXES)
    max_memory_mb  INTEGER,
    max_cpus       REAL,
    max_lifetime_s INTEGER,
    rate_per_s     REAL
);
CREATE TABLE api_keys (
    hash       BLOB PRIMARY KEY,  -- sha256 of the whole key; the key itself is never stored
    prefix     TEXT NOT NULL,     -- 'e2b_' and the first 8 hex digits, to name the key
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE audit (
    seq               INTEGER PRIMARY KEY,
    time_ms           INTEGER NOT NULL,
    time              TEXT NOT NULL,
    kind              TEXT NOT NULL,
    tenant            TEXT,
    agent             TEXT,
    sandbox           TEXT,
    method            TEXT,
    path              TEXT,
    status            INTEGER,
    argv              TEXT,  -- JSON array of strings
    exit_code         INTEGER,
    signal            INTEGER,
    killed_by         TEXT,
    duration_ms       INTEGER,
    cpu_ms            INTEGER,
    peak_memory_bytes INTEGER,
    detail            TEXT,
    input_head        BLOB,
    input_len         INTEGER,
    input_sha256      TEXT,
    output_head       BLOB,
    output_len        INTEGER,
    output_sha256     TEXT,
    prev_hash         TEXT NOT NULL,
    hash              TEXT NOT NULL
);
CREATE INDEX audit_time ON audit(time_ms);
CREATE INDEX audit_tenant ON audit(tenant, seq);
CREATE INDEX audit_sandbox ON audit(sandbox, seq);

-- Where verification starts once old records are pruned: the last pruned
-- record's seq and hash.
CREATE TABLE audit_anchor (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    seq          INTEGER NOT NULL,
    hash         TEXT NOT NULL,
    time_ms      INTEGER NOT NULL,
    pruned_total INTEGER NOT NULL,
    pruned_at_ms INTEGER NOT NULL
);

-- Append-only. Records can never be updated; they can be deleted only at or
-- before the anchor, and the anchor only moves forward onto an existing
-- record whose hash it copies: deleting anything is a prune, which leaves
-- the chain verifiable.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: records cannot be changed');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN OLD.seq > COALESCE((SELECT seq FROM audit_anchor WHERE id = 1), 0)
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: only records before the retention anchor can be deleted (use audit prune)');
END;
CREATE TRIGGER audit_anchor_insert BEFORE INSERT ON audit_anchor
WHEN NEW.hash IS NOT (SELECT hash FROM audit WHERE seq = NEW.seq)
BEGIN
    SELECT RAISE(ABORT, 'the audit anchor must name an existing record and its hash');
END;
CREATE TRIGGER audit_anchor_update BEFORE UPDATE ON audit_anchor
WHEN NEW.seq < OLD.seq OR NEW.hash IS NOT (SELECT hash FROM audit WHERE seq = NEW.seq)
BEGIN
    SELECT RAISE(ABORT, 'the audit anchor only moves forward, onto an existing record and its hash');
END;
CREATE TRIGGER audit_anchor_no_delete BEFORE DELETE ON audit_anchor
BEGIN
    SELECT RAISE(ABORT, 'the audit anchor cannot be deleted');
END;
"#,
    // 2: names of removed tenants, never given to a new tenant.
    r#"
CREATE TABLE retired_tenants (
    name       TEXT PRIMARY KEY,
    removed_ms INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // 3: persistent agents (memory, runs, history, usage, approvals).
    nanoclaw_agent::store::SCHEMA,
];

/// An error opening or using the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No `--data`, no environment variable and no home folder.
    #[error("no data folder: neither HOME nor XDG_DATA_HOME is set; pass --data DIR or set NANOCLAW_DATA")]
    NoDataDir,
    /// The data folder could not be created.
    #[error("cannot create the data folder {path}: {source}")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The database file could not be created or its mode set.
    #[error("cannot create the database {path}: {source}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// SQLite refused to open or set up the file.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file was written by a newer nanoclaw.
    #[error("the database {path} has schema version {found}, newer than this nanoclaw knows ({known}); upgrade nanoclaw")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A statement failed.
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// A time or duration string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a duration.
    #[error("invalid duration {0:?}: expected a number with a unit ms, s, m, h, d or w (e.g. 90s, 1h, 30d)")]
    Duration(String),
    /// Not an RFC 3339 time.
    #[error("invalid time {0:?}: expected RFC 3339 (e.g. 2025-01-31T12:00:00Z) or an age (e.g. 1h, 30d)")]
    Time(String),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The data folder: `explicit` (`--data DIR`) if given, else the default
/// described in the [module docs](self).
pub fn data_dir(explicit: Option<&Path>) -> Result<PathBuf, DbError> {
    if let Some(d) = explicit {
        return Ok(d.to_path_buf());
    }
    for var in ["NANOCLAW_DATA", "NANOCLAW_DATA_DIR"] {
        if let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
    }
    if euid() == 0 {
        return Ok(PathBuf::from(ROOT_DATA_DIR));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(x).join("nanoclaw"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/nanoclaw")),
        None => Err(DbError::NoDataDir),
    }
}

/// The database file in a data folder.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

/// Creates the folder (`0700`) and the file (`0600`) if needed.
fn prepare_file(path: &Path) -> Result<(), DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| DbError::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(DbError::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }
    let err = |source| DbError::CreateFile {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let mode = file.metadata().map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    Ok(())
}

/// Opens (creating if needed) the database file at `path`, sets it up as
/// the [module docs](self) say and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection, DbError> {
    prepare_file(path)?;
    connect(path)
}

/// Another connection to a database this process has already opened with
/// [`open`]: unlike `open`, it never opens or closes the file outside
/// SQLite — closing any descriptor of the file would drop all of this
/// process's POSIX locks on it (SQLite's documented hazard), and another
/// process's connection could then checkpoint and delete the WAL under
/// this one's feet.
pub fn open_again(path: &Path) -> Result<Connection, DbError> {
    connect(path)
}

fn connect(path: &Path) -> Result<Connection, DbError> {
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, not wal (is the file on a file system without shared memory?)"
        ))));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// The schema version of an open database (0 for a new file).
pub fn schema_version(conn: &Connection) -> Result<i64, DbError> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), DbError> {
    let known = MIGRATIONS.len() as i64;
    // Most opens find the schema current: check without taking the write lock.
    if schema_version(conn)? == known {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER PRIMARY KEY,
             applied_ms INTEGER NOT NULL
         )",
    )?;
    let found = schema_version(&tx)?;
    if found > known {
        return Err(DbError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES (?1, ?2)",
            (i as i64 + 1, now_ms()),
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01 (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds:
/// `2025-01-31T12:00:00.000Z`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses an RFC 3339 time (`2025-01-31T12:00:00Z`,
/// `2025-01-31T12:00:00.5+02:00`; `t`/`z` and a space for `T` accepted)
/// into Unix milliseconds. Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339(s: &str) -> Result<i64, ParseError> {
    parse_rfc3339_inner(s.trim()).ok_or_else(|| ParseError::Time(s.to_string()))
}

fn parse_rfc3339_inner(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let y = digits(s.get(0..4)?)?;
    let mo = u32::try_from(digits(s.get(5..7)?)?).ok()?;
    let d = u32::try_from(digits(s.get(8..10)?)?).ok()?;
    let h = digits(s.get(11..13)?)?;
    let mi = digits(s.get(14..16)?)?;
    let sec = digits(s.get(17..19)?)?;
    let mut rest = s.get(19..)?;
    let mut milli = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let f = frac.get(..n.min(3))?;
        milli = digits(f)? * 10_i64.pow(3 - f.len() as u32);
        rest = frac.get(n..)?;
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest.get(1..)?.split_once(':')?;
            if oh.len() != 2 || om.len() != 2 {
                return None;
            }
            sign * (digits(oh)? * 60 + digits(om)?)
        }
    };
    let days_in_month = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if d == 0 || d > days_in_month || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let secs =
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    Some(secs * 1000 + milli)
}

/// Parses a duration: a number and a unit `ms`, `s`, `m`, `h`, `d` or
/// `w` (`500ms`, `90s`, `1.5h`, `30d`), or several of them (`1h30m`); a bare
/// number means seconds. At most 100 years.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    if t.is_empty() {
        return Err(err());
    }
    if let Ok(v) = t.parse::<f64>() {
        return checked_secs(v).ok_or_else(err);
    }
    let mut total = 0.0;
    let mut rest = t.as_str();
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let v: f64 = rest[..n].parse().map_err(|_| err())?;
        let after = &rest[n..];
        let u = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = match &after[..u] {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 7.0 * 86_400.0,
            _ => return Err(err()),
        };
        total += v * unit;
        rest = &after[u..];
    }
    checked_secs(total).ok_or_else(err)
}

fn checked_secs(v: f64) -> Option<Duration> {
    (v.is_finite() && (0.0..=100.0 * 365.25 * 86_400.0).contains(&v))
        .then(|| Duration::from_secs_f64(v))
}

/// Parses a point in time for `--since`/`--until`: RFC 3339, or an age
/// (`1h` = one hour before `now_ms`).
pub fn parse_time_or_age(s: &str, now_ms: i64) -> Result<i64, ParseError> {
    if let Ok(d) = parse_duration(s) {
        return Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    parse_rfc3339(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_738_324_800_123),
            "2025-01-31T12:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        for ms in [0, 1, 951_782_400_000, 1_738_324_800_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&format_rfc3339_ms(ms)), Ok(ms));
        }
        assert_eq!(
            parse_rfc3339("2025-01-31T14:00:00.5+02:00"),
            Ok(1_738_324_800_500)
        );
        assert_eq!(parse_rfc3339("2025-01-31t12:00:00z"), Ok(1_738_324_800_000));
        for bad in [
            "2025-01-31",
            "2025-02-30T00:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00.Z",
            "yesterday",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "h", "1x", "-1s", "1e400", "1000000000000d", "1h-"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_time_or_age("1h", 10_000_000),
            Ok(10_000_000 - 3_600_000)
        );
        assert_eq!(parse_time_or_age("1970-01-01T00:00:01Z", 5), Ok(1000));
    }
}
