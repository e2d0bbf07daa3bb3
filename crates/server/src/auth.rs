//! Who is calling: API keys (E2B's `X-API-Key`, or `Authorization: Bearer`)
//! resolve to a [`TenantId`] through an [`Authenticator`].
//!
//! The persistence layer implements the real authenticator over its key
//! table; [`StaticKeys`] is an in-memory one for tests and for a daemon
//! configured with a fixed set of keys.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use sha2::{Digest, Sha256};

/// A tenant: the owner of sandboxes. Every backend call carries one, and a
/// backend answers another tenant's sandbox as if it did not exist.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub String);

impl TenantId {
    /// The tenant's name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TenantId {
    fn from(s: &str) -> Self {
        TenantId(s.to_owned())
    }
}

/// Why a key could not be checked (not: the key is wrong — that is
/// `Ok(None)` from [`Authenticator::authenticate`]).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key store could not be read (database error, …).
    #[error("the API key store is unavailable: {0}")]
    Unavailable(String),
}

/// The limits the HTTP layer enforces for a tenant. `Default` is
/// unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TenantLimits {
    /// API requests per second (a token bucket with a burst of
    /// `max(1, 2 × rate)`, see [`crate::ratelimit`]); `None`: no limit.
    pub rate_per_s: Option<f64>,
}

/// Resolves API keys to tenants.
///
/// Implementations must compare keys without leaking timing about how much
/// of a key matched (hash the presented key, or compare in constant time).
pub trait Authenticator: Send + Sync + 'static {
    /// The tenant owning `api_key`, or `None` when the key is unknown or
    /// revoked.
    fn authenticate(
        &self,
        api_key: &str,
    ) -> impl Future<Output = Result<Option<TenantId>, AuthError>> + Send;

    /// Whether at least one key is configured. A TCP listener is refused
    /// unless this is true: a network-reachable daemon must not run open.
    fn has_keys(&self) -> impl Future<Output = Result<bool, AuthError>> + Send;

    /// The limits of `tenant` (asked on every authenticated request, so
    /// an implementation over a database should cache them for a few
    /// seconds). By default: unlimited.
    fn limits(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = Result<TenantLimits, AuthError>> + Send {
        let _ = tenant;
        async { Ok(TenantLimits::default()) }
    }
}

/// An in-memory authenticator: a fixed map of keys to tenants. Keys are
/// held as SHA-256 digests and looked up by digest, so a lookup does not
/// compare the secret itself byte by byte.
#[derive(Clone, Default)]
pub struct StaticKeys {
    by_digest: HashMap<[u8; 32], TenantId>,
    limits: HashMap<TenantId, TenantLimits>,
}

impl fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeys")
            .field("keys", &self.by_digest.len())
            .finish()
    }
}

impl StaticKeys {
    /// No keys at all (every request is refused with 401; no TCP listener).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` for `tenant` (builder style).
    pub fn with_key(mut self, key: &str, tenant: impl Into<TenantId>) -> Self {
        self.insert(key, tenant.into());
        self
    }

    /// Adds `key` for `tenant`.
    pub fn insert(&mut self, key: &str, tenant: TenantId) {
        self.by_digest.insert(digest(key), tenant);
    }

    /// Limits `tenant` to `per_second` requests (builder style; tenants
    /// without a rate are unlimited).
    pub fn with_rate(mut self, tenant: impl Into<TenantId>, per_second: f64) -> Self {
        self.limits.insert(
            tenant.into(),
            TenantLimits {
                rate_per_s: Some(per_second),
            },
        );
        self
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Authenticator for StaticKeys {
    async fn authenticate(&self, api_key: &str) -> Result<Option<TenantId>, AuthError> {
        Ok(self.by_digest.get(&digest(api_key)).cloned())
    }

    async fn has_keys(&self) -> Result<bool, AuthError> {
        Ok(!self.by_digest.is_empty())
    }

    async fn limits(&self, tenant: &TenantId) -> Result<TenantLimits, AuthError> {
        Ok(self.limits.get(tenant).copied().unwrap_or_default())
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimizer from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_keys_resolve_and_refuse() {
        let keys = StaticKeys::new()
            .with_key("e2b_aa", "alice")
            .with_key("e2b_bb", "bob");
        assert_eq!(
            keys.authenticate("e2b_aa").await.unwrap(),
            Some(TenantId::from("alice"))
        );
        assert_eq!(keys.authenticate("e2b_cc").await.unwrap(), None);
        assert!(keys.has_keys().await.unwrap());
        assert!(!StaticKeys::new().has_keys().await.unwrap());
        let limited = keys.with_rate("alice", 2.5);
        let alice = limited.limits(&TenantId::from("alice")).await.unwrap();
        assert_eq!(alice.rate_per_s, Some(2.5));
        let bob = limited.limits(&TenantId::from("bob")).await.unwrap();
        assert_eq!(bob, TenantLimits::default());
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
