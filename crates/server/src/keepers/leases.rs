//! Leases on tenants' image templates. A create or a one-shot run takes
//! one before it reads its template and holds it until its sandbox is
//! recorded (create) or has ended (run): removing the image
//! (`DELETE /v1/images/NAME`) is refused while one is held, so it can
//! never take the layers from under a sandbox that is starting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

type Key = (String, String);
type Counts = Arc<Mutex<HashMap<Key, usize>>>;

fn lock(m: &Mutex<HashMap<Key, usize>>) -> MutexGuard<'_, HashMap<Key, usize>> {
    // Plain counters: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The leases held, by (tenant, template name).
#[derive(Default)]
pub(super) struct Leases(Counts);

/// One use of a template; given back when dropped.
pub(super) struct Lease {
    counts: Counts,
    key: Key,
}

impl Leases {
    /// Marks `tenant`'s template `name` as in use until the lease drops
    /// (whether or not such a template exists: the caller reads it next).
    pub(super) fn take(&self, tenant: &str, name: &str) -> Lease {
        let key = (tenant.to_string(), name.to_string());
        *lock(&self.0).entry(key.clone()).or_default() += 1;
        Lease {
            counts: Arc::clone(&self.0),
            key,
        }
    }

    /// How many leases on `tenant`'s template `name` are held.
    pub(super) fn held(&self, tenant: &str, name: &str) -> usize {
        lock(&self.0)
            .get(&(tenant.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut m = lock(&self.counts);
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_until_it_drops() {
        let l = Leases::default();
        let a = l.take("t", "img");
        let b = l.take("t", "img");
        assert_eq!(l.held("t", "img"), 2);
        assert_eq!(l.held("u", "img"), 0, "per tenant");
        drop(a);
        assert_eq!(l.held("t", "img"), 1);
        drop(b);
        assert_eq!(l.held("t", "img"), 0);
        assert!(lock(&l.0).is_empty(), "no entry left behind");
    }
}
