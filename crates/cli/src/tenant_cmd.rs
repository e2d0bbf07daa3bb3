//! `nanoclaw tenant …`: the tenants of `nanoclaw serve`, their quotas and
//! API keys, in the data folder's `nanoclaw.db` (see `nanoclaw_server::db`).
//!
//! A new API key is printed once, alone on stdout (so `KEY=$(nanoclaw
//! tenant add acme)` works), with a note on stderr; only its SHA-256 is
//! stored. Errors are one line and exit 125 (main's convention).

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use nanoclaw_sandbox::units::{format_duration, format_size};
use nanoclaw_server::db;
use nanoclaw_server::tenants::{self, Change, QuotaChanges, Quotas, Tenant, Tenants};

use crate::audit_cmd::emit;

/// `nanoclaw tenant`.
#[derive(Debug, Args)]
pub struct TenantArgs {
    /// Data folder (default: $NANOCLAW_DATA, /var/lib/nanoclaw as root, else $XDG_DATA_HOME/nanoclaw).
    #[arg(long, value_name = "DIR", global = true)]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: TenantCommand,
}

/// `nanoclaw tenant` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Add a tenant and print its first API key (shown only this once).
    Add {
        /// Name: 1 to 63 of a-z, 0-9, '_', '-', starting with a letter or digit.
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List tenants, their quotas (* = default) and key ids.
    #[command(alias = "list")]
    Ls {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Change a tenant's quotas; `default` puts one back to the default.
    Set {
        /// The tenant.
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Remove a tenant and all its API keys.
    #[command(alias = "remove")]
    Rm {
        /// The tenant.
        name: String,
    },
    /// Add or revoke API keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

/// `nanoclaw tenant key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Give a tenant another API key (printed only this once).
    Add {
        /// The tenant.
        name: String,
    },
    /// Revoke one of a tenant's API keys.
    #[command(alias = "rm")]
    Revoke {
        /// The tenant.
        name: String,
        /// The key's id as `tenant ls` shows it (e.g. e2b_1a2b3c4d; at least e2b_ and 4 hex digits), or the whole key.
        key: String,
    },
}

/// Quota flags shared by `add` and `set`.
#[derive(Debug, Args)]
pub struct QuotaArgs {
    /// Concurrent sandboxes (default 20).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_sandboxes: Option<String>,
    /// Memory over all the tenant's sandboxes, e.g. 4g, 512m (default 10g).
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true)]
    max_memory: Option<String>,
    /// CPUs over all the tenant's sandboxes, e.g. 2.5 (default 40).
    #[arg(long, value_name = "CPUS", allow_negative_numbers = true)]
    max_cpus: Option<String>,
    /// Longest lifetime of one sandbox, e.g. 300s, 1h, 1d (default 1h).
    #[arg(long, value_name = "DURATION", allow_negative_numbers = true)]
    max_lifetime: Option<String>,
    /// API requests per second, e.g. 50, 0.5 (default 50).
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true)]
    rate: Option<String>,
}

fn change<T>(
    v: &Option<String>,
    parse: impl Fn(&str) -> Result<T, tenants::TenantError>,
) -> anyhow::Result<Change<T>> {
    Ok(match v.as_deref() {
        None => Change::Keep,
        Some("default") => Change::Default,
        Some(s) => Change::Set(parse(s)?),
    })
}

impl QuotaArgs {
    fn changes(&self) -> anyhow::Result<QuotaChanges> {
        Ok(QuotaChanges {
            max_sandboxes: change(&self.max_sandboxes, tenants::parse_max_sandboxes)?,
            max_memory_mb: change(&self.max_memory, tenants::parse_max_memory_mb)?,
            max_cpus: change(&self.max_cpus, tenants::parse_max_cpus)?,
            max_lifetime_s: change(&self.max_lifetime, tenants::parse_max_lifetime_s)?,
            rate_per_s: change(&self.rate, tenants::parse_rate)?,
        })
    }
}

fn open(data: Option<&std::path::Path>) -> anyhow::Result<Tenants> {
    let dir = db::data_dir(data)?;
    Ok(Tenants::open(&db::db_path(&dir))?)
}

/// Fails when stdout is closed (`>&-`): Rust's stdout would swallow the
/// new key silently. Checked before anything is changed.
fn require_stdout() -> anyhow::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor's flags; any fd number is
    // a valid argument.
    if unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) } == -1 {
        bail!("stdout is closed, so the new API key could not be shown; nothing was changed");
    }
    Ok(())
}

/// Prints a new key alone on stdout, and a note on stderr. If stdout
/// cannot take it the key is lost: say how to replace it.
fn print_new_key(key: &tenants::ApiKey, tenant: &str, what: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{}", key.as_str()).and_then(|()| out.flush()) {
        bail!(
            "the new API key could not be written to stdout ({e}) and is not stored anywhere; \
             revoke it with `nanoclaw tenant key revoke {tenant} {}` and add another",
            key.id()
        );
    }
    eprintln!(
        "{what}; its API key (id {}) is above and will not be shown again: only its hash is stored",
        key.id()
    );
    Ok(())
}

/// Run one `nanoclaw tenant` subcommand.
pub fn run_tenant(args: TenantArgs) -> anyhow::Result<u8> {
    let data = args.data.as_deref();
    match args.command {
        TenantCommand::Add { name, quotas } => {
            // Check everything before the database is touched.
            tenants::validate_name(&name)?;
            let q = quotas.changes()?.apply(Quotas::default());
            q.validate()?;
            require_stdout()?;
            let (t, key) = open(data)?.add(&name, q)?;
            let what = format!("added tenant {} ({})", t.name, limits(&t));
            print_new_key(&key, &t.name, &what)?;
        }
        TenantCommand::Ls { json } => {
            let list = open(data)?.list()?;
            if json {
                emit(&serde_json::to_string_pretty(&list)?)?;
            } else {
                print_table(&list)?;
            }
        }
        TenantCommand::Set { name, quotas } => {
            let changes = quotas.changes()?;
            if changes == QuotaChanges::default() {
                bail!("nothing to change: give at least one of --max-sandboxes, --max-memory, --max-cpus, --max-lifetime, --rate (a value, or `default`)");
            }
            let t = open(data)?.set(&name, &changes)?;
            emit(&format!("updated tenant {}: {}", t.name, limits(&t)))?;
        }
        TenantCommand::Rm { name } => {
            let tenants = open(data)?;
            let keys = tenants.get(&name)?.keys.len();
            tenants.remove(&name)?;
            emit(&format!("removed tenant {name} and its {keys} API key(s)"))?;
        }
        TenantCommand::Key(KeyCommand::Add { name }) => {
            require_stdout()?;
            let key = open(data)?.add_key(&name)?;
            print_new_key(&key, &name, &format!("added an API key to tenant {name}"))?;
        }
        TenantCommand::Key(KeyCommand::Revoke { name, key }) => {
            let tenants = open(data)?;
            let id = tenants.revoke_key(&name, &key)?;
            emit(&format!("revoked API key {id} of tenant {name}"))?;
            if tenants.get(&name)?.keys.is_empty() {
                eprintln!("note: tenant {name} has no API key left; `nanoclaw tenant key add {name}` makes one");
            }
        }
    }
    Ok(0)
}

/// The quotas in force as (column, value) pairs; defaults marked `*`.
fn quota_cells(t: &Tenant) -> [String; 5] {
    let (q, l) = (&t.quotas, &t.limits);
    let mark = |set: bool| if set { "" } else { "*" };
    [
        format!("{}{}", l.max_sandboxes, mark(q.max_sandboxes.is_some())),
        format!(
            "{}{}",
            format_size(l.max_memory_mb << 20),
            mark(q.max_memory_mb.is_some())
        ),
        format!("{}{}", l.max_cpus, mark(q.max_cpus.is_some())),
        format!(
            "{}{}",
            format_duration(std::time::Duration::from_secs(l.max_lifetime_s)),
            mark(q.max_lifetime_s.is_some())
        ),
        format!("{}/s{}", l.rate_per_s, mark(q.rate_per_s.is_some())),
    ]
}

fn limits(t: &Tenant) -> String {
    let [s, m, c, l, r] = quota_cells(t);
    format!("sandboxes {s}, memory {m}, cpus {c}, lifetime {l}, rate {r}; * = default")
}

fn print_table(list: &[Tenant]) -> anyhow::Result<()> {
    let header = [
        "NAME",
        "SANDBOXES",
        "MEMORY",
        "CPUS",
        "LIFETIME",
        "RATE",
        "CREATED",
        "KEYS",
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            let mut row = vec![t.name.clone()];
            row.extend(quota_cells(t));
            row.push(t.created.chars().take(19).collect::<String>() + "Z");
            let keys: Vec<&str> = t.keys.iter().map(|k| k.id.as_str()).collect();
            row.push(if keys.is_empty() {
                "-".into()
            } else {
                keys.join(",")
            });
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (cell, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(&cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    let mut text = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        text.push('\n');
        text.push_str(&line(row));
    }
    emit(&text)
}
