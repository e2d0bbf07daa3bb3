//! Places among the child processes the daemon runs at once (agent runs,
//! image builds): at most so many per tenant and in total, each place
//! given back when its [`Slot`] is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct Counts {
    total: usize,
    per_tenant: HashMap<String, usize>,
}

fn lock(m: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    // Plain counters: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which bound refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The tenant has this many already.
    Tenant(usize),
    /// The daemon has this many already.
    Total(usize),
}

/// The places of one kind of work.
#[derive(Default, Clone)]
pub struct Slots {
    counts: Arc<Mutex<Counts>>,
}

/// One place, given back when dropped.
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    tenant: String,
}

impl Slots {
    /// Takes a place for `tenant` if it has fewer than `per_tenant` and the
    /// daemon fewer than `total`.
    pub fn take(&self, tenant: &str, per_tenant: usize, total: usize) -> Result<Slot, Full> {
        let mut c = lock(&self.counts);
        if c.per_tenant.get(tenant).copied().unwrap_or(0) >= per_tenant {
            return Err(Full::Tenant(per_tenant));
        }
        if c.total >= total {
            return Err(Full::Total(total));
        }
        c.total += 1;
        *c.per_tenant.entry(tenant.to_owned()).or_insert(0) += 1;
        Ok(Slot {
            counts: Arc::clone(&self.counts),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_tenant.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_per_tenant_and_in_total_come_back_when_dropped() {
        let s = Slots::default();
        let a1 = s.take("a", 1, 2).expect("a's first");
        assert_eq!(s.take("a", 1, 2).err(), Some(Full::Tenant(1)));
        let b1 = s.take("b", 1, 2).expect("b's first");
        assert_eq!(s.take("c", 1, 2).err(), Some(Full::Total(2)));
        drop(a1);
        assert!(s.take("c", 1, 2).is_ok());
        drop(b1);
    }
}
