//! `nanoclaw audit …`: read, export, verify and prune the hash-chained
//! audit log that `nanoclaw serve` writes (see `nanoclaw_server::audit`
//! for the model and its limits).
//!
//! `verify` exits 0 and prints `ok: N records, head H`, or exits 1 and
//! prints the first bad record and why. Keep the head somewhere else and
//! pass it back with `--expect-head` to detect removal of the newest
//! records, which a hash chain alone cannot see.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use nanoclaw_server::audit::{self, Audit, Entry, Filter};
use nanoclaw_server::db;

/// `nanoclaw audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Data folder (default: $NANOCLAW_DATA, /var/lib/nanoclaw as root, else $XDG_DATA_HOME/nanoclaw).
    #[arg(long, value_name = "DIR", global = true)]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `nanoclaw audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List records (the newest --limit, oldest first).
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many records, the newest (0: all).
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: usize,
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Print one record in full, as JSON.
    Show {
        /// The record's seq.
        seq: i64,
    },
    /// Print records as JSON lines (one per line, with their hashes), oldest first.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many records, the oldest.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Check the hash chain; exit 1 and name the first bad record if it is broken.
    Verify {
        /// Also fail unless the record with this hash (a head printed by an earlier verify) is still in the log.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the records older than an age; the chain stays verifiable.
    Prune {
        /// Age, e.g. 30d, 12h, 2w.
        #[arg(long, value_name = "AGE", required = true)]
        older_than: String,
    },
}

/// Filters shared by `ls` and `export`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Records at or after this time: an age (1h, 30d) or RFC 3339.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Records at or before this time: an age (1h, 30d) or RFC 3339.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Records of this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Records of this sandbox.
    #[arg(long, value_name = "ID")]
    sandbox: Option<String>,
    /// Records of this kind (request, decision, create, exec, kill, pause, resume, file, quota_refusal, egress_denial, auth_failure, approval, prune).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Records after this seq.
    #[arg(long, value_name = "SEQ")]
    after: Option<i64>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        let now = db::now_ms();
        let time = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
            v.as_deref()
                .map(|s| db::parse_time_or_age(s, now).with_context(|| format!("--{flag}")))
                .transpose()
        };
        if let Some(k) = &self.kind {
            audit::validate_kind(k)?;
        }
        Ok(Filter {
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            tenant: self.tenant.clone(),
            sandbox: self.sandbox.clone(),
            kind: self.kind.clone(),
            after_seq: self.after,
            ..Filter::default()
        })
    }
}

/// Writes `text` and a newline to stdout. A closed pipe (`| head`) is not
/// an error: the reader has what it wanted.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// Run one `nanoclaw audit` subcommand.
pub fn run_audit(args: AuditArgs) -> anyhow::Result<u8> {
    let open = || -> anyhow::Result<Audit> {
        let dir = db::data_dir(args.data.as_deref())?;
        Ok(Audit::open(&db::db_path(&dir))?)
    };
    match args.command {
        AuditCommand::Ls {
            filter,
            limit,
            json,
        } => {
            let mut f = filter.filter()?;
            if limit > 0 {
                f.limit = Some(limit);
                f.newest = true;
            }
            let records = open()?.query(&f)?;
            if json {
                emit(&serde_json::to_string_pretty(&records)?)?;
            } else {
                print_table(&records)?;
            }
        }
        AuditCommand::Show { seq } => match open()?.get(seq)? {
            Some(e) => emit(&serde_json::to_string_pretty(&e)?)?,
            None => bail!("no audit record {seq} (see `nanoclaw audit ls`)"),
        },
        AuditCommand::Export { filter, limit } => {
            let f = filter.filter()?;
            export(&open()?, f, limit)?;
        }
        AuditCommand::Verify { expect_head, json } => {
            let a = open()?;
            let r = match &expect_head {
                Some(h) => a.verify_expecting(h)?,
                None => a.verify()?,
            };
            if json {
                emit(&serde_json::to_string_pretty(&r)?)?;
            }
            return report(&r, json);
        }
        AuditCommand::Prune { older_than } => {
            let age = db::parse_duration(&older_than).context("--older-than")?;
            let p = open()?.prune(age)?;
            match (p.range, &p.anchor) {
                (Some((first, last)), Some(a)) => emit(&format!(
                    "pruned {} records (seq {first} to {last}) older than {older_than}; verification now starts after seq {}, hash {}",
                    p.count, a.seq, a.hash
                ))?,
                _ => emit(&format!("no records older than {older_than}"))?,
            }
        }
    }
    Ok(0)
}

/// Prints a verification report; the exit code: 0 ok, 1 broken.
fn report(r: &audit::Report, json: bool) -> anyhow::Result<u8> {
    match &r.first_bad {
        None => {
            if !json {
                let from = match &r.anchor {
                    Some(a) => format!(" (after the retention anchor at seq {})", a.seq),
                    None => String::new(),
                };
                emit(&format!("ok: {} records{from}, head {}", r.count, r.head))?;
            }
            Ok(0)
        }
        Some((seq, why)) => {
            if !json {
                emit(&format!(
                    "FAILED at record {seq}: {why}\n{} records before it verified (last good seq {}, hash {})",
                    r.count, r.last_seq, r.head
                ))?;
            }
            Ok(1)
        }
    }
}

/// Writes records as JSON lines, a page at a time; a closed pipe ends
/// quietly.
fn export(a: &Audit, mut f: Filter, limit: Option<usize>) -> anyhow::Result<()> {
    const PAGE: usize = 1000;
    let mut left = limit.unwrap_or(usize::MAX);
    let mut out = BufWriter::new(std::io::stdout().lock());
    while left > 0 {
        f.limit = Some(left.min(PAGE));
        let page = a.query(&f)?;
        for e in &page {
            let line = serde_json::to_string(e)?;
            if let Err(err) = writeln!(out, "{line}") {
                if err.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(err).context("writing the export");
            }
        }
        match page.last() {
            Some(last) if page.len() == f.limit.unwrap_or(0) => {
                f.after_seq = Some(last.seq);
                left -= page.len();
            }
            _ => break,
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the export")
        }
        _ => Ok(()),
    }
}

/// One line about a record, for people.
fn summary(e: &Entry) -> String {
    let r = &e.record;
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = &r.method {
        parts.push(m.clone());
    }
    if let Some(p) = &r.path {
        parts.push(p.clone());
    }
    if let Some(s) = r.status {
        parts.push(s.to_string());
    }
    if let Some(argv) = &r.argv {
        let mut cmd = argv.join(" ");
        if cmd.chars().count() > 60 {
            cmd = cmd.chars().take(59).collect::<String>() + "…";
        }
        parts.push(format!("[{cmd}]"));
    }
    if let Some(c) = r.exit_code {
        parts.push(format!("exit {c}"));
    }
    if let Some(s) = r.signal {
        parts.push(format!("signal {s}"));
    }
    if let Some(k) = &r.killed_by {
        parts.push(format!("killed by {k}"));
    }
    if let Some(d) = r.duration_ms {
        parts.push(format!("{d}ms"));
    }
    if let Some(d) = &r.detail {
        parts.push(d.clone());
    }
    parts.join(" ")
}

/// A cell as the terminal may show it: recorded fields hold what clients
/// and sandboxed programs chose (argv, paths), so control characters are
/// escaped — a newline must not forge a row, an escape sequence must not
/// reach the terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_table(records: &[Entry]) -> anyhow::Result<()> {
    let dash = |v: &Option<String>| printable(v.as_deref().unwrap_or("-"));
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|e| {
            [
                e.seq.to_string(),
                e.time.clone(),
                printable(&e.record.kind),
                dash(&e.record.tenant),
                dash(&e.record.sandbox),
                printable(&summary(e)),
            ]
        })
        .collect();
    let header = ["SEQ", "TIME", "KIND", "TENANT", "SANDBOX", "SUMMARY"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    for row in std::iter::once(&header).chain(&rows) {
        let [seq, time, kind, tenant, sandbox, summary] = row;
        let r = writeln!(
            out,
            "{seq:>w0$}  {time:<w1$}  {kind:<w2$}  {tenant:<w3$}  {sandbox:<w4$}  {summary}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
        );
        if let Err(e) = r {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
