//! Egress refusals of daemon sandboxes, into `/metrics` and the audit log.
//!
//! A sandbox's egress proxy runs in its keeper. When a command ends, the
//! keeper says how many connections were refused since its last report
//! (an `EGRESS_DENIED` frame before `EXITED`, only when there were some).
//! The exec's pump then counts them in `/metrics` and asks the keeper for
//! the details (`Inspect`'s `network`) to write one `egress_denial` record
//! per refusal not yet recorded — before the exec's own record, so a
//! client that reads the audit after its command ended finds them.
//!
//! The proxy keeps the first refusals only (its cap); past it, the count
//! still grows and the records say how many went without details.
//!
//! A sandbox of another backend (`docker`, `gvisor`) has its proxy in the
//! daemon itself (`nanoclaw_sandbox::netns_egress`): when one of its
//! commands ends, the pump reads the proxy's record directly
//! ([`EgressHook::command_ended`]) and the same counts and records follow.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use nanoclaw_sandbox::backend::LiveSandbox;
use nanoclaw_sandbox::keeper::{Remote, Reply, Request};
use nanoclaw_sandbox::outcome::NetDenial;

use crate::audit::{self, Audit, Record};
use crate::metrics::Metrics;

/// Most `egress_denial` records written for one command's end (the rest
/// are summed in the last one).
const MAX_RECORDS: usize = 64;

/// Where a sandbox's refusals are read from.
#[derive(Clone)]
pub(crate) enum Source {
    /// A keeper: it counts them with each command's end, and gives the
    /// details when asked (`Inspect`).
    Keeper(Remote),
    /// A sandbox of another backend whose proxy runs in this process: its
    /// record is read directly; `counted` is how many of its refusals
    /// were counted already (shared by every command of the sandbox).
    Engine {
        sandbox: Arc<dyn LiveSandbox>,
        counted: Arc<AtomicU64>,
    },
}

/// Where a sandbox's egress refusals go.
#[derive(Clone)]
pub(crate) struct EgressHook {
    pub source: Source,
    pub tenant: String,
    pub sandbox: String,
    pub audit: Option<Audit>,
    pub metrics: Option<Arc<Metrics>>,
    /// How many of the keeper's kept refusals are recorded already
    /// (shared by every command of the sandbox).
    pub seen: Arc<AtomicUsize>,
}

impl EgressHook {
    /// `n` more refusals were reported: counted, and recorded with their
    /// details.
    pub(crate) async fn refused(&self, n: u64) {
        let kept = match &self.source {
            Source::Keeper(remote) if self.audit.is_some() => {
                match super::ipc::ask(remote, &Request::Inspect, super::ipc::ANSWER).await {
                    Ok(Reply::Live(l)) => l.network.map(|r| r.denials).unwrap_or_default(),
                    _ => Vec::new(),
                }
            }
            Source::Keeper(_) => Vec::new(),
            Source::Engine { sandbox, .. } => sandbox
                .network_report()
                .map(|r| r.denials)
                .unwrap_or_default(),
        };
        self.note(&kept, n).await;
    }

    /// A command of an engine sandbox ended: the refusals its proxy made
    /// since the last time are counted and recorded (nothing for a
    /// keeper's, which reports them itself).
    pub(crate) async fn command_ended(&self) {
        let Source::Engine { sandbox, counted } = &self.source else {
            return;
        };
        let Some(report) = sandbox.network_report() else {
            return;
        };
        let before = counted.fetch_max(report.denied, Ordering::SeqCst);
        let n = report.denied.saturating_sub(before);
        if n > 0 {
            self.note(&report.denials, n).await;
        }
    }

    /// `n` new refusals, `kept` the proxy's kept list: counted, and
    /// recorded with their details.
    async fn note(&self, kept: &[NetDenial], n: u64) {
        if let Some(m) = &self.metrics {
            m.egress_denied(n);
        }
        let Some(audit) = &self.audit else { return };
        let records = self.records(kept, n);
        if audit.append_all(records).await.is_err() {
            eprintln!("nanoclaw serve: could not write an egress denial's audit record");
        }
    }

    /// The records for `n` new refusals, `kept` being every refusal the
    /// keeper kept so far.
    fn records(&self, kept: &[NetDenial], n: u64) -> Vec<Record> {
        // The last `n` kept are the new ones while the proxy's list is
        // under its cap; `seen` covers the case past it (a daemon that
        // restarted starts from 0 and relies on the first).
        let from = self
            .seen
            .load(Ordering::Relaxed)
            .max(
                kept.len()
                    .saturating_sub(usize::try_from(n).unwrap_or(usize::MAX)),
            )
            .min(kept.len());
        let new = &kept[from..];
        self.seen.store(kept.len(), Ordering::Relaxed);
        let shown = new.len().min(MAX_RECORDS);
        let mut out: Vec<Record> = new[..shown]
            .iter()
            .map(|d| {
                self.record(format!(
                    "{} {}:{} refused ({}): {}",
                    d.protocol, d.destination, d.port, d.reason, d.detail
                ))
            })
            .collect();
        let untold = n.saturating_sub(shown as u64);
        if untold > 0 {
            out.push(self.record(format!(
                "{untold} more connection(s) refused (past the proxy's record cap; counted, not detailed)"
            )));
        }
        out
    }

    fn record(&self, detail: String) -> Record {
        let mut r = Record::new(audit::kind::EGRESS_DENIAL);
        r.tenant = Some(self.tenant.clone());
        r.sandbox = Some(self.sandbox.clone());
        r.detail = Some(detail);
        r
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hook() -> EgressHook {
        EgressHook {
            source: Source::Keeper(Remote {
                id: "sb".into(),
                dir: "/nonexistent".into(),
            }),
            tenant: "t".into(),
            sandbox: "sb".into(),
            audit: None,
            metrics: None,
            seen: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn denial(dest: &str) -> NetDenial {
        NetDenial {
            destination: dest.into(),
            port: 443,
            reason: "not_allowed".into(),
            detail: "not in the allowlist".into(),
            protocol: "connect".into(),
        }
    }

    #[test]
    fn each_refusal_is_recorded_once_and_past_the_cap_counted() {
        let h = hook();
        let kept = vec![denial("a.example"), denial("b.example")];
        let r = h.records(&kept[..1], 1);
        assert_eq!(r.len(), 1);
        assert!(r[0].detail.as_deref().unwrap().contains("a.example:443"));
        // The next report: only b is new; and 3 more were not kept.
        let r = h.records(&kept, 4);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].detail.as_deref().unwrap().contains("b.example"));
        assert!(r[1].detail.as_deref().unwrap().starts_with("3 more"));
        assert_eq!(r[1].kind, audit::kind::EGRESS_DENIAL);
    }
}
