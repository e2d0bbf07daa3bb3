//! Live policy updates: the proxy's current policy, and every open
//! upstream connection with the rule that admitted it.
//!
//! Every decision (a proxied request, a transparent connection, a DNS
//! answer) reads the policy once, at its start ([`Live::policy`]). A
//! connection that was let through registers itself before any byte is
//! relayed ([`Live::admit`]); registering re-checks it against the policy
//! current at that moment, under the same lock as [`Live::replace`], so a
//! connection decided under an old policy cannot slip past an update made
//! while it was being opened. [`Live::replace`] swaps the policy and, in
//! the same critical section, looks at every open connection again: one
//! that no rule of the new policy admits is cut (its relay ends, the
//! sandbox's end gets a reset where the transport has one), with
//! [`DenyReason::RuleRemoved`] naming the rule that had admitted it.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::conn::End;
use crate::policy::NetworkPolicy;
use crate::record::DenyReason;

/// One open upstream connection.
struct OpenConn {
    /// The name it was admitted for (asked for, or vouched by the DNS).
    name: Option<String>,
    addr: IpAddr,
    port: u16,
    /// The rule that admits it (text), updated when a new policy admits it
    /// through another rule.
    rule: String,
    /// Fired to cut it.
    cut: Option<oneshot::Sender<DenyReason>>,
}

struct Inner {
    policy: Arc<NetworkPolicy>,
    next: u64,
    open: HashMap<u64, OpenConn>,
}

/// The current policy and the open connections.
pub(crate) struct Live {
    inner: Mutex<Inner>,
}

/// What a policy update did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyUpdate {
    /// Connections open when the update was made that it closed, as
    /// `destination:port (rule)`.
    pub closed: Vec<String>,
    /// Connections open that stay open (a rule of the new policy admits
    /// them).
    pub kept: usize,
}

impl Live {
    pub(crate) fn new(policy: NetworkPolicy) -> Live {
        Live {
            inner: Mutex::new(Inner {
                policy: Arc::new(policy),
                next: 1,
                open: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The policy now (one decision reads it once).
    pub(crate) fn policy(&self) -> Arc<NetworkPolicy> {
        self.lock().policy.clone()
    }

    /// Registers a connection to `addr:port` for `name` that was just
    /// opened, if the current policy admits it.
    pub(crate) fn admit(
        &self,
        name: Option<&str>,
        addr: IpAddr,
        port: u16,
    ) -> Result<Ticket<'_>, DenyReason> {
        let mut inner = self.lock();
        let rule = inner.policy.admitting_rule(name, addr, port)?;
        let (tx, rx) = oneshot::channel();
        let id = inner.next;
        inner.next += 1;
        inner.open.insert(
            id,
            OpenConn {
                name: name.map(str::to_string),
                addr,
                port,
                rule,
                cut: Some(tx),
            },
        );
        Ok(Ticket {
            live: self,
            id,
            cut: Some(rx),
        })
    }

    /// Replaces the policy and cuts the open connections it no longer
    /// admits.
    pub(crate) fn replace(&self, policy: NetworkPolicy) -> PolicyUpdate {
        let mut inner = self.lock();
        inner.policy = Arc::new(policy);
        let policy = inner.policy.clone();
        let mut update = PolicyUpdate::default();
        for c in inner.open.values_mut() {
            if c.cut.is_none() {
                continue;
            }
            match policy.admitting_rule(c.name.as_deref(), c.addr, c.port) {
                Ok(rule) => {
                    c.rule = rule;
                    update.kept += 1;
                }
                Err(why) => {
                    let dest = c.name.clone().unwrap_or_else(|| c.addr.to_string());
                    update
                        .closed
                        .push(format!("{dest}:{} ({})", c.port, c.rule));
                    if let Some(tx) = c.cut.take() {
                        let _ = tx.send(DenyReason::RuleRemoved {
                            rule: c.rule.clone(),
                            detail: why.to_string(),
                        });
                    }
                }
            }
        }
        update
    }
}

/// An open connection's place in [`Live`]: removed when dropped.
pub(crate) struct Ticket<'a> {
    live: &'a Live,
    id: u64,
    cut: Option<oneshot::Receiver<DenyReason>>,
}

impl Ticket<'_> {
    /// Runs `relay` until it ends or a policy update cuts the connection;
    /// on a cut, `reset` (the sandbox's end of a TCP connection) is set to
    /// send a reset when closed, so that the program fails at once.
    pub(crate) async fn guard<F>(&mut self, relay: F, reset: Option<RawFd>) -> Result<(), End>
    where
        F: Future<Output = Result<(), End>>,
    {
        let Some(cut) = self.cut.as_mut() else {
            return relay.await;
        };
        tokio::pin!(relay);
        tokio::select! {
            r = &mut relay => r,
            Ok(reason) = cut => {
                if let Some(fd) = reset {
                    crate::transparent::reset_fd_on_close(fd);
                }
                Err(End::Deny(reason))
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.live.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_cuts_exactly_what_it_no_longer_admits() {
        let live =
            Live::new(NetworkPolicy::allowlist(["a.x.test", "b.x.test"], ["10.1.0.0/16"]).unwrap());
        let ip: IpAddr = "93.184.216.34".parse().unwrap();
        let private: IpAddr = "10.1.2.3".parse().unwrap();
        let mut a = live.admit(Some("a.x.test"), ip, 443).unwrap();
        let mut b = live.admit(Some("b.x.test"), ip, 443).unwrap();
        let mut c = live.admit(None, private, 9000).unwrap();
        let update = live.replace(NetworkPolicy::allowlist(["*.x.test"], ["10.0.0.0/8"]).unwrap());
        assert_eq!(update.kept, 3, "{update:?}");
        let update = live.replace(NetworkPolicy::allowlist(["b.x.test"], ["10.1.2.3/32"]).unwrap());
        assert_eq!(update.closed, vec!["a.x.test:443 (*.x.test)".to_string()]);
        assert_eq!(update.kept, 2);
        let reason = a.cut.as_mut().unwrap().try_recv().unwrap();
        assert_eq!(reason.kind(), "rule_removed");
        assert!(b.cut.as_mut().unwrap().try_recv().is_err());
        assert!(c.cut.as_mut().unwrap().try_recv().is_err());
        // Registering under the new policy checks the new policy.
        assert_eq!(
            live.admit(Some("a.x.test"), ip, 443).err(),
            Some(DenyReason::HostNotAllowed)
        );
        drop((a, b, c));
        assert!(live.lock().open.is_empty());
    }
}
