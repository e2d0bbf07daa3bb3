//! Injectable name resolution and upstream connection, so that tests (and
//! embedders) can map names without real DNS and assert where the proxy
//! connects.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use tokio::net::TcpStream;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves a host name to addresses. The proxy calls it exactly once per
/// request and connects only to addresses from that answer that passed the
/// policy checks (no second lookup, so no DNS-rebinding window).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `name` (a normalised DNS name).
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo` via [`tokio::net::lookup_host`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for sa in tokio::net::lookup_host((name, 0)).await? {
                if !out.contains(&sa.ip()) {
                    out.push(sa.ip());
                }
            }
            Ok(out)
        })
    }
}

/// A fixed name → addresses table (for tests and for pinning names).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    table: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    /// An empty table: every lookup fails with `NotFound`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `name` → `addrs`. `name` is compared
    /// case-insensitively.
    pub fn with(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.table.insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            addrs.to_vec(),
        );
        self
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            self.table.get(name).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such host"))
            })
        })
    }
}

/// Opens the upstream TCP connection to an already-checked address.
pub trait Connect: Send + Sync + 'static {
    /// Connects to `addr`.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// Plain `TcpStream::connect` (with `TCP_NODELAY`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connect for TcpConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }
}

/// Fixed entries first (`--add-host NAME:IP`, like Docker's), then the
/// system resolver. The entries only say where a name points: the policy
/// still decides whether the name and the address may be reached.
#[derive(Debug, Clone, Default)]
pub struct HostsResolver {
    table: StaticResolver,
}

impl HostsResolver {
    /// Entries `name` → `addrs` in front of the system resolver.
    pub fn new(entries: &[(String, Vec<IpAddr>)]) -> Self {
        let mut table = StaticResolver::new();
        for (name, addrs) in entries {
            table = table.with(name, addrs);
        }
        HostsResolver { table }
    }
}

impl Resolve for HostsResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            match self.table.table.get(name) {
                Some(a) => Ok(a.clone()),
                None => SystemResolver.resolve(name).await,
            }
        })
    }
}
