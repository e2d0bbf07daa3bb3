//! `nanoclaw serve`: a daemon that speaks E2B's API (the control plane of
//! `spec/openapi.yml` and the envd data plane of `spec/envd/**`, Connect
//! protocol with the JSON codec) over long-lived sandboxes held by keepers,
//! with tenants and quotas, warm pools and a hash-chained audit log.
//!
//! The HTTP layer only parses requests into actions for a [`backend`];
//! the daemon never clones a sandbox itself: every sandbox is created and
//! held by a keeper (a single-threaded `nanoclaw __keeper` process).

pub mod agents;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod connect;
pub mod contexts;
pub mod daemon;
pub mod db;
pub mod e2b;
pub mod error;
pub mod images;
pub mod keepers;
pub mod listen;
pub mod mcp;
pub mod metrics;
pub mod ratelimit;
pub mod slots;
pub mod tenants;

pub use auth::{Authenticator, StaticKeys, TenantId, TenantLimits};
pub use backend::{Backend, BackendError};
pub use error::{ApiError, ServeError};
pub use listen::{serve, ListenAddr, ServeOptions};
pub use metrics::Metrics;
