//! Per-tenant request rate limits: one token bucket per tenant, refilled
//! at the tenant's `rate_per_s` (see [`crate::tenants::Quotas`]) and
//! holding at most `max(1, 2 × rate)` tokens (the burst). Every
//! authenticated request takes one token; a request finding less than one
//! is refused with the time until a token will be there.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::TenantId;

/// One tenant's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A refused request: when to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    /// The tenant's rate, requests per second.
    pub rate: f64,
    /// Until a token is there, rounded up to whole seconds (at least 1),
    /// as `Retry-After` wants it.
    pub retry_after: Duration,
}

/// Token buckets by tenant (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<TenantId, Bucket>>,
}

/// The burst allowed at `rate`: `max(1, 2 × rate)` requests.
pub fn burst(rate: f64) -> f64 {
    (2.0 * rate).max(1.0)
}

impl RateLimiter {
    /// No buckets yet (a tenant's bucket starts full).
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TenantId, Bucket>> {
        // The map holds plain numbers: a panic elsewhere cannot leave it
        // inconsistent.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token from `tenant`'s bucket at `now`, refilled at `rate`
    /// requests per second since its last use. `None` (or a rate that is
    /// not a positive number) means unlimited.
    pub fn check(&self, tenant: &TenantId, rate: Option<f64>, now: Instant) -> Result<(), Limited> {
        let Some(rate) = rate.filter(|r| r.is_finite() && *r > 0.0) else {
            return Ok(());
        };
        let cap = burst(rate);
        let mut map = self.lock();
        let bucket = map.entry(tenant.clone()).or_insert(Bucket {
            tokens: cap,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        // A lowered rate also lowers what the bucket may hold.
        bucket.tokens = (bucket.tokens + elapsed * rate).min(cap);
        bucket.last = now.max(bucket.last);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - bucket.tokens) / rate).ceil().max(1.0);
        Err(Limited {
            rate,
            retry_after: Duration::from_secs_f64(wait.min(86_400.0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new();
        let t = TenantId::from("a");
        let t0 = Instant::now();
        // rate 2/s: a burst of 4.
        for _ in 0..4 {
            assert_eq!(l.check(&t, Some(2.0), t0), Ok(()));
        }
        let refused = l.check(&t, Some(2.0), t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.rate, 2.0);
        // Half a second later one token is back.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.check(&t, Some(2.0), t1), Ok(()));
        assert!(l.check(&t, Some(2.0), t1).is_err());
        // Other tenants have their own bucket; no rate is no limit.
        assert_eq!(l.check(&TenantId::from("b"), Some(2.0), t1), Ok(()));
        for _ in 0..100 {
            assert_eq!(l.check(&TenantId::from("c"), None, t1), Ok(()));
        }
    }

    #[test]
    fn slow_rates_wait_whole_seconds_rounded_up() {
        let l = RateLimiter::new();
        let t = TenantId::from("a");
        let t0 = Instant::now();
        // rate 0.25/s: a burst of max(1, 0.5) = 1; the next token in 4 s.
        assert_eq!(l.check(&t, Some(0.25), t0), Ok(()));
        let refused = l.check(&t, Some(0.25), t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(4));
        let later = t0 + Duration::from_millis(2500);
        let refused = l.check(&t, Some(0.25), later).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(2));
        assert_eq!(l.check(&t, Some(0.25), t0 + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn lowered_rate_caps_the_bucket() {
        let l = RateLimiter::new();
        let t = TenantId::from("a");
        let t0 = Instant::now();
        assert_eq!(l.check(&t, Some(100.0), t0), Ok(()));
        // Now 1/s: the bucket holds at most 2.
        assert_eq!(l.check(&t, Some(1.0), t0), Ok(()));
        assert_eq!(l.check(&t, Some(1.0), t0), Ok(()));
        assert!(l.check(&t, Some(1.0), t0).is_err());
    }
}
