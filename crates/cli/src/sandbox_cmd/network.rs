//! `nanoclaw sandbox network ID`: shows or replaces the egress policy of a
//! running long-lived sandbox, without restarting it (E2B's
//! `PUT /sandboxes/{id}/network`: the new rules replace the old ones
//! whole). Its keeper hands the policy to the sandbox's proxy, which
//! applies it at once to new connections and DNS answers and closes the
//! open connections that no new rule admits. Credential rules
//! (`--rule`) can be replaced too, for the domains the sandbox was created
//! with rules for (a rotated token, a removed credential).

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use nanoclaw_net::{HeaderRule, HeaderRules, NetworkMode, NetworkPolicy};
use nanoclaw_policy::secret::interpolate;
use nanoclaw_sandbox::keeper::NetworkState;

use super::remote;

/// The modes a running sandbox can be switched to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Refuse every connection and DNS query (the proxy stays, for a later
    /// update).
    None,
    /// Only --allow-host/--allow-cidr destinations.
    Allowlist,
    /// Any public destination.
    Open,
}

/// Options of `nanoclaw sandbox network`.
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// The sandbox: its id (or a unique prefix) or name.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// The new mode (default: allowlist when --allow-* is given). With no
    /// option at all the current policy is shown.
    #[arg(long, value_enum, value_name = "MODE")]
    network: Option<Mode>,
    /// Allow HOST[:PORT] (repeatable; replaces every rule of the current
    /// policy; `*.example.com` matches subdomains; default ports 80, 443).
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    allow_host: Vec<String>,
    /// Allow CIDR[:PORT] (repeatable; needed for private or loopback
    /// addresses).
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORT]")]
    allow_cidr: Vec<String>,
    /// Set a header on every request to DOMAIN (`DOMAIN:NAME=VALUE`,
    /// repeatable; `${VAR}` in VALUE is taken from nanoclaw's environment,
    /// so quote it for the shell). The given rules replace the sandbox's
    /// credential rules; without --rule or --no-rules they are kept. Only
    /// domains the sandbox was created with rules for can have rules.
    #[arg(long = "rule", value_name = "DOMAIN:NAME=VALUE")]
    rule: Vec<String>,
    /// Remove every credential rule (requests go out as the sandbox sends
    /// them).
    #[arg(long = "no-rules", conflicts_with = "rule")]
    no_rules: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The policy the options ask for; `None` to only show the current one.
fn requested(a: &NetworkArgs) -> Result<Option<NetworkPolicy>> {
    let allows = !a.allow_host.is_empty() || !a.allow_cidr.is_empty();
    let mode = match (a.network, allows) {
        (None, false) => return Ok(None),
        (Some(Mode::None), true) => {
            bail!("--allow-host/--allow-cidr need --network allowlist (or leave --network out)")
        }
        (Some(Mode::Open), true) => bail!(
            "--network open allows every public destination; --allow-host/--allow-cidr only make sense with --network allowlist"
        ),
        (Some(Mode::None), false) => NetworkMode::None,
        (Some(Mode::Open), false) => NetworkMode::Open,
        (None | Some(Mode::Allowlist), _) => NetworkMode::Allowlist,
    };
    let mut policy = NetworkPolicy::allowlist(&a.allow_host, &a.allow_cidr)?;
    policy.mode = mode;
    Ok(Some(policy))
}

/// The credential rules the options ask for: `None` to keep the
/// sandbox's.
fn requested_rules(a: &NetworkArgs) -> Result<Option<HeaderRules>> {
    if a.no_rules {
        return Ok(Some(HeaderRules::default()));
    }
    if a.rule.is_empty() {
        return Ok(None);
    }
    let env = |k: &str| std::env::var(k).ok();
    let mut rules: Vec<HeaderRule> = Vec::new();
    for r in &a.rule {
        let Some((domain, header)) = r.split_once(':') else {
            bail!("--rule {r:?}: write DOMAIN:NAME=VALUE, e.g. --rule 'api.github.com:Authorization=Bearer ${{GITHUB_TOKEN}}'");
        };
        let Some((name, value)) = header.split_once('=') else {
            bail!("--rule for {domain}: write DOMAIN:NAME=VALUE (no `=` after the header name)");
        };
        let value = interpolate(value, &env)
            .map_err(|e| anyhow::anyhow!("--rule for {domain}, header {name}: {e}"))?;
        let pair = (name.trim().to_string(), value);
        match rules.iter_mut().find(|x| x.domain == domain) {
            Some(x) => x.headers.push(pair),
            None => rules.push(HeaderRule {
                domain: domain.to_string(),
                headers: vec![pair],
            }),
        }
    }
    Ok(Some(HeaderRules::new(rules)?))
}

/// The policy as lines of text.
fn describe(st: &NetworkState) -> String {
    let mut out = format!("mode: {}\n", st.mode);
    match &st.policy {
        None => out.push_str("no egress proxy: this sandbox's policy cannot be changed live\n"),
        Some(p) => {
            for h in &p.hosts {
                out.push_str(&format!("allow-host: {h}\n"));
            }
            for c in &p.cidrs {
                out.push_str(&format!("allow-cidr: {c}\n"));
            }
            for r in &st.rules {
                out.push_str(&format!("rule: {r}\n"));
            }
        }
    }
    out
}

/// `nanoclaw sandbox network`.
pub fn network(a: NetworkArgs) -> Result<u8> {
    let policy = requested(&a)?;
    let rules = requested_rules(&a)?;
    let (r, _) = remote(&a.target)?;
    let st = r.network(policy, rules)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(0);
    }
    print!("{}", describe(&st));
    if let Some(u) = &st.update {
        for c in &u.closed {
            eprintln!("closed: {c}");
        }
        eprintln!(
            "updated: {} open connection(s) closed, {} kept",
            u.closed.len(),
            u.kept
        );
    }
    Ok(0)
}
