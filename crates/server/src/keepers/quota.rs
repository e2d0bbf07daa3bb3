//! Tenants' quotas on sandboxes: concurrent sandboxes, total memory,
//! total CPUs, longest lifetime (the request rate is the HTTP layer's).
//! A creation reserves its share before its keeper starts, so concurrent
//! creations cannot together overrun a quota.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{BackendError, BackendResult, TenantId};
use crate::tenants::{Limits, Tenants};

/// How long a refused creation is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What one sandbox counts against its tenant's quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Share {
    pub sandboxes: u32,
    pub memory_mb: u64,
    pub cpus: f64,
}

impl Share {
    fn add(self, o: Share) -> Share {
        Share {
            sandboxes: self.sandboxes + o.sandboxes,
            memory_mb: self.memory_mb + o.memory_mb,
            cpus: self.cpus + o.cpus,
        }
    }

    fn sub(self, o: Share) -> Share {
        Share {
            sandboxes: self.sandboxes.saturating_sub(o.sandboxes),
            memory_mb: self.memory_mb.saturating_sub(o.memory_mb),
            cpus: (self.cpus - o.cpus).max(0.0),
        }
    }
}

/// A share reserved for a sandbox being made; released when dropped (also
/// when the request that made it is cancelled midway).
pub(crate) struct Reservation<'a> {
    quota: &'a Quota,
    tenant: TenantId,
    want: Share,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.quota.release(&self.tenant, self.want);
    }
}

/// The quota keeper.
pub(crate) struct Quota {
    tenants: Option<Arc<Tenants>>,
    /// Shares reserved by creations in progress, per tenant.
    pending: Mutex<HashMap<String, Share>>,
}

/// The counted quota a refusal of [`refused`] names.
pub(crate) fn refusal_kind(e: &BackendError) -> Option<crate::metrics::Quota> {
    use crate::metrics::Quota as Q;
    let BackendError::QuotaExceeded { which, .. } = e else {
        return None;
    };
    [
        ("concurrent sandboxes", Q::Sandboxes),
        ("total memory", Q::Memory),
        ("total cpus", Q::Cpus),
        ("max lifetime", Q::Lifetime),
    ]
    .into_iter()
    .find(|(prefix, _)| which.starts_with(prefix))
    .map(|(_, q)| q)
}

fn refused(which: &str, detail: String) -> BackendError {
    BackendError::QuotaExceeded {
        which: format!("{which} ({detail})"),
        retry_after: Some(RETRY_AFTER),
    }
}

/// Refuses a lifetime over the tenant's longest.
fn lifetime_ok(l: &Limits, tenant: &TenantId, d: Duration) -> BackendResult<()> {
    if d.as_secs() > l.max_lifetime_s {
        return Err(refused(
            "max lifetime",
            format!(
                "{} s asked, tenant {tenant} may have at most {} s",
                d.as_secs(),
                l.max_lifetime_s
            ),
        ));
    }
    Ok(())
}

impl Quota {
    pub(crate) fn new(tenants: Option<Arc<Tenants>>) -> Quota {
        Quota {
            tenants,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant's limits (`None`: no tenants table, no limits).
    pub(crate) async fn limits(&self, tenant: &TenantId) -> BackendResult<Option<Limits>> {
        let Some(t) = self.tenants.clone() else {
            return Ok(None);
        };
        let name = tenant.0.clone();
        let got = tokio::task::spawn_blocking(move || t.get(&name))
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?;
        match got {
            Ok(t) => Ok(Some(t.limits)),
            // A tenant removed while its key was cached: nothing allowed.
            Err(_) => Err(BackendError::NotFound(format!("tenant {tenant} not found"))),
        }
    }

    /// The tenant's longest lifetime (`None`: no tenants table, no limit).
    pub(crate) async fn max_lifetime(&self, tenant: &TenantId) -> BackendResult<Option<Duration>> {
        Ok(self
            .limits(tenant)
            .await?
            .map(|l| Duration::from_secs(l.max_lifetime_s)))
    }

    /// Refuses a lifetime over the tenant's longest.
    pub(crate) async fn check_lifetime(&self, tenant: &TenantId, d: Duration) -> BackendResult<()> {
        match self.limits(tenant).await? {
            Some(l) => lifetime_ok(&l, tenant, d),
            None => Ok(()),
        }
    }

    /// Reserves `want` for a new sandbox of `tenant`, given what its live
    /// sandboxes hold (`live`, read while the reservations are locked);
    /// the reservation lasts until the returned guard is dropped (once the
    /// sandbox exists, or failed).
    pub(crate) async fn reserve(
        &self,
        tenant: &TenantId,
        live: impl FnOnce() -> Share,
        want: Share,
        lifetime: Duration,
    ) -> BackendResult<Reservation<'_>> {
        let reservation = |want| Reservation {
            quota: self,
            tenant: tenant.clone(),
            want,
        };
        let Some(l) = self.limits(tenant).await? else {
            return Ok(reservation(Share::default()));
        };
        lifetime_ok(&l, tenant, lifetime)?;
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| BackendError::Internal("lock".into()))?;
        // What is live is read under the lock, after every await: a
        // creation that ended meanwhile is counted live, never lost
        // between "live" and "pending".
        let live = live();
        let p = pending.get(&tenant.0).copied().unwrap_or_default();
        let after = live.add(p).add(want);
        if after.sandboxes > l.max_sandboxes {
            return Err(refused(
                "concurrent sandboxes",
                format!("tenant {tenant} may have {} at once", l.max_sandboxes),
            ));
        }
        if after.memory_mb > l.max_memory_mb {
            return Err(refused(
                "total memory",
                format!(
                    "{} MiB asked with {} MiB in use, tenant {tenant} may use {} MiB",
                    want.memory_mb,
                    live.add(p).memory_mb,
                    l.max_memory_mb
                ),
            ));
        }
        if after.cpus > l.max_cpus + 1e-9 {
            return Err(refused(
                "total cpus",
                format!(
                    "{} asked with {} in use, tenant {tenant} may use {}",
                    want.cpus,
                    live.add(p).cpus,
                    l.max_cpus
                ),
            ));
        }
        pending.insert(tenant.0.clone(), p.add(want));
        Ok(reservation(want))
    }

    /// Ends a reservation.
    fn release(&self, tenant: &TenantId, want: Share) {
        if let Ok(mut pending) = self.pending.lock() {
            if let Some(p) = pending.get_mut(&tenant.0) {
                *p = p.sub(want);
            }
        }
    }
}
