//! The proxy's public face: [`Proxy::start`] / [`ProxyBuilder`] →
//! [`ProxyHandle`] (async) or [`BlockingProxy`] (its own thread with a
//! current-thread runtime, for the synchronous engine).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::conn::{serve, Shared};
use crate::intercept::InterceptError;
use crate::live::PolicyUpdate;
use crate::policy::NetworkPolicy;
use crate::record::{ConnRecord, Denial, DnsRecord, Limits, Stats};
use crate::resolve::{Connect, Resolve, SystemResolver, TcpConnector};
use crate::rules::HeaderRules;

/// Where the proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix stream socket at this path (created; must not exist). The
    /// engine bind-mounts it into the sandbox and bridges it to the
    /// sandbox's loopback. Removed again on shutdown.
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port; see
    /// [`ProxyHandle::tcp_addr`]).
    Tcp(SocketAddr),
    /// An already listening TCP socket, handed over as a raw descriptor
    /// whose ownership passes to the proxy. The engine uses it for a socket
    /// created inside the sandbox's network namespace, so the proxy accepts
    /// connections from the sandbox's loopback without any bridge process.
    Fd(std::os::fd::RawFd),
    /// An already listening TCP socket (descriptor handed over) that
    /// receives the sandbox's redirected connections
    /// ([`crate::kernel::RedirectRules`]): each connection's original
    /// destination is read from the socket and checked (see the
    /// `transparent` module).
    Transparent(std::os::fd::RawFd),
    /// A bound UDP socket (descriptor handed over): the sandbox's DNS.
    DnsUdp(std::os::fd::RawFd),
    /// A listening TCP socket (descriptor handed over): the sandbox's DNS
    /// over TCP.
    DnsTcp(std::os::fd::RawFd),
}

/// Where the proxy actually listens (ports resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A bound TCP address.
    Tcp(SocketAddr),
}

/// Errors starting or running the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No listener was given.
    #[error("the proxy needs at least one listener (Listen::Unix or Listen::Tcp)")]
    NoListener,
    /// The Unix socket path is taken.
    #[error("cannot listen on {path}: the path exists (a stale socket from an earlier run?); remove it or choose another path")]
    SocketPathExists {
        /// The path.
        path: PathBuf,
    },
    /// Binding a listener failed.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or path.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating the runtime for the blocking proxy failed.
    #[error("cannot create the proxy's tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Spawning the blocking proxy's thread failed.
    #[error("cannot spawn the proxy thread: {0}")]
    Thread(#[source] io::Error),
    /// The blocking proxy's thread ended before reporting.
    #[error("the proxy thread exited during startup")]
    ThreadDied,
    /// `Proxy::start` was called outside a tokio runtime.
    #[error("Proxy::start must run inside a tokio runtime; use ProxyBuilder::start_blocking from synchronous code")]
    NoRuntime,
}

/// Entry point.
#[derive(Debug)]
pub struct Proxy;

impl Proxy {
    /// Starts a proxy with the system resolver on one listener. Must be
    /// called inside a tokio runtime.
    pub async fn start(
        policy: NetworkPolicy,
        limits: Limits,
        listen: Listen,
    ) -> Result<ProxyHandle, ProxyError> {
        Proxy::builder(policy)
            .limits(limits)
            .listen(listen)
            .start()
            .await
    }

    /// A builder (limits, resolver, connector, several listeners).
    pub fn builder(policy: NetworkPolicy) -> ProxyBuilder {
        ProxyBuilder {
            policy,
            limits: Limits::default(),
            resolver: Arc::new(SystemResolver),
            connector: Arc::new(TcpConnector),
            listens: Vec::new(),
            intercept: None,
        }
    }
}

/// Configures a proxy before starting it.
pub struct ProxyBuilder {
    policy: NetworkPolicy,
    limits: Limits,
    resolver: Arc<dyn Resolve>,
    connector: Arc<dyn Connect>,
    listens: Vec<Listen>,
    intercept: Option<crate::intercept::Intercept>,
}

impl std::fmt::Debug for ProxyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBuilder")
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .field("listens", &self.listens)
            .finish_non_exhaustive()
    }
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Transparent(TcpListener),
    DnsUdp(tokio::net::UdpSocket),
    DnsTcp(TcpListener),
}

/// Wraps an inherited listening TCP descriptor.
fn tcp_from_fd(fd: std::os::fd::RawFd) -> Result<TcpListener, ProxyError> {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller hands over ownership of an open, listening TCP
    // socket (documented on the `Listen` variants); it is wrapped exactly
    // once, here.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let what = format!("inherited socket fd {fd}");
    std.set_nonblocking(true)
        .map_err(|source| ProxyError::Bind {
            what: what.clone(),
            source,
        })?;
    TcpListener::from_std(std).map_err(|source| ProxyError::Bind { what, source })
}

impl ProxyBuilder {
    /// Caps and timeouts (default: [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The resolver (default: [`SystemResolver`]).
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The upstream connector (default: [`TcpConnector`]).
    pub fn connector(mut self, connector: Arc<dyn Connect>) -> Self {
        self.connector = connector;
        self
    }

    /// Credential rules, applied by intercepting connections to the hosts
    /// they name (see [`crate::Intercept`]).
    pub fn intercept(mut self, intercept: crate::intercept::Intercept) -> Self {
        self.intercept = Some(intercept);
        self
    }

    /// Adds a listener (several may be given; they share policy, caps and
    /// records).
    pub fn listen(mut self, listen: Listen) -> Self {
        self.listens.push(listen);
        self
    }

    fn bind(listens: &[Listen]) -> Result<Vec<Bound>, ProxyError> {
        let mut bound = Vec::with_capacity(listens.len());
        for l in listens {
            match l {
                Listen::Tcp(addr) => {
                    let std = std::net::TcpListener::bind(addr)
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|source| ProxyError::Bind {
                            what: addr.to_string(),
                            source,
                        })?;
                    let l = TcpListener::from_std(std).map_err(|source| ProxyError::Bind {
                        what: addr.to_string(),
                        source,
                    })?;
                    bound.push(Bound::Tcp(l));
                }
                Listen::Fd(fd) => bound.push(Bound::Tcp(tcp_from_fd(*fd)?)),
                Listen::Transparent(fd) => bound.push(Bound::Transparent(tcp_from_fd(*fd)?)),
                Listen::DnsTcp(fd) => bound.push(Bound::DnsTcp(tcp_from_fd(*fd)?)),
                Listen::DnsUdp(fd) => {
                    use std::os::fd::FromRawFd;
                    // SAFETY: the caller hands over ownership of a bound UDP
                    // socket (documented on `Listen::DnsUdp`); wrapped once.
                    let std = unsafe { std::net::UdpSocket::from_raw_fd(*fd) };
                    let what = format!("inherited UDP socket fd {fd}");
                    std.set_nonblocking(true)
                        .map_err(|source| ProxyError::Bind {
                            what: what.clone(),
                            source,
                        })?;
                    let s = tokio::net::UdpSocket::from_std(std)
                        .map_err(|source| ProxyError::Bind { what, source })?;
                    bound.push(Bound::DnsUdp(s));
                }
                Listen::Unix(path) => {
                    if path.symlink_metadata().is_ok() {
                        return Err(ProxyError::SocketPathExists { path: path.clone() });
                    }
                    let l = UnixListener::bind(path).map_err(|source| ProxyError::Bind {
                        what: path.display().to_string(),
                        source,
                    })?;
                    bound.push(Bound::Unix(l, path.clone()));
                }
            }
        }
        Ok(bound)
    }

    /// Binds the listeners and starts serving on the current tokio runtime.
    pub async fn start(self) -> Result<ProxyHandle, ProxyError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ProxyError::NoRuntime);
        }
        if self.listens.is_empty() {
            return Err(ProxyError::NoListener);
        }
        let bound = Self::bind(&self.listens)?;
        let mut shared = Shared::new(self.policy, self.limits, self.resolver, self.connector);
        shared.intercept = self.intercept;
        let shared = Arc::new(shared);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut addrs = Vec::with_capacity(bound.len());
        let mut tasks = Vec::with_capacity(bound.len());
        for b in bound {
            match &b {
                Bound::Tcp(l) | Bound::Transparent(l) | Bound::DnsTcp(l) => {
                    if let Ok(a) = l.local_addr() {
                        addrs.push(ListenAddr::Tcp(a));
                    }
                }
                Bound::DnsUdp(_) => {}
                Bound::Unix(_, p) => addrs.push(ListenAddr::Unix(p.clone())),
            }
            tasks.push(tokio::spawn(accept_loop(
                b,
                shared.clone(),
                stop_rx.clone(),
            )));
        }
        Ok(ProxyHandle {
            shared,
            addrs,
            stop: stop_tx,
            tasks,
        })
    }

    /// Starts the proxy on a dedicated thread running a current-thread
    /// runtime, for synchronous callers. Returns once the listeners are bound.
    pub fn start_blocking(self) -> Result<BlockingProxy, ProxyError> {
        type Ready = Result<(Arc<Shared>, Vec<ListenAddr>, oneshot::Sender<()>), ProxyError>;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Ready>(1);
        let thread = std::thread::Builder::new()
            .name("nanoclaw-net-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(ProxyError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match self.start().await {
                        Ok(handle) => {
                            let (stop_tx, stop_rx) = oneshot::channel();
                            let ready = (handle.shared.clone(), handle.addrs.clone(), stop_tx);
                            if tx.send(Ok(ready)).is_ok() {
                                let _ = stop_rx.await;
                            }
                            handle.shutdown().await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(ProxyError::Thread)?;
        match rx.recv() {
            Ok(Ok((shared, addrs, stop))) => Ok(BlockingProxy {
                shared,
                addrs,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ProxyError::ThreadDied)
            }
        }
    }
}

async fn accept_loop(listener: Bound, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let listener = match listener {
        Bound::DnsUdp(sock) => {
            tokio::select! {
                _ = stop.changed() => {}
                () = crate::dns::serve_udp(shared, sock) => {}
            }
            return;
        }
        Bound::DnsTcp(l) => {
            tokio::select! {
                _ = stop.changed() => {}
                () = crate::dns::serve_tcp(shared, l) => {}
            }
            return;
        }
        other => other,
    };
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                let _ = s.set_nodelay(true);
                conns.spawn(serve(shared.clone(), s));
            }
            Ok(Accepted::Transparent(s)) => {
                let _ = s.set_nodelay(true);
                conns.spawn(crate::transparent::serve(shared.clone(), s));
            }
            Ok(Accepted::Unix(s)) => {
                conns.spawn(serve(shared.clone(), s));
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    conns.shutdown().await;
    if let Bound::Unix(l, path) = listener {
        drop(l);
        let _ = std::fs::remove_file(path);
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Transparent(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Bound) -> io::Result<Accepted> {
    match l {
        Bound::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Bound::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Bound::Transparent(l) => l.accept().await.map(|(s, _)| Accepted::Transparent(s)),
        // Served by their own loops (see accept_loop).
        Bound::DnsUdp(_) | Bound::DnsTcp(_) => std::future::pending().await,
    }
}

/// A running proxy (async API). Dropping it stops the proxy too (without
/// waiting); prefer [`ProxyHandle::shutdown`].
#[derive(Debug)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    addrs: Vec<ListenAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("policy", &self.live.policy())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A live update: checks `rules` (if given) against the sandbox's CA
    /// first, so that a refused update changes nothing; then replaces the
    /// rules, then the policy. Empty rules on a proxy without a CA are no
    /// change.
    fn set_egress(
        &self,
        policy: NetworkPolicy,
        rules: Option<HeaderRules>,
    ) -> Result<PolicyUpdate, InterceptError> {
        match (rules, &self.intercept) {
            (None, _) => {}
            (Some(r), None) if r.is_empty() => {}
            (Some(r), None) => {
                return Err(InterceptError::NoCa {
                    domains: r.domains().join(", "),
                })
            }
            (Some(r), Some(ic)) => ic.replace_rules(r)?,
        }
        Ok(self.live.replace(policy))
    }
}

/// The methods [`ProxyHandle`] and [`BlockingProxy`] share: both hold the
/// proxy's `shared` state and its listen addresses (`addrs`).
macro_rules! proxy_control {
    () => {
        /// The policy now.
        pub fn policy(&self) -> NetworkPolicy {
            NetworkPolicy::clone(&self.shared.live.policy())
        }

        /// Replaces the policy: new connections and DNS answers follow it at
        /// once, and open connections that no rule of it admits are closed.
        pub fn set_policy(&self, policy: NetworkPolicy) -> PolicyUpdate {
            self.shared.live.replace(policy)
        }

        /// Replaces the policy and, when `rules` is given, the credential
        /// rules (see [`Shared::set_egress`]).
        pub fn set_egress(
            &self,
            policy: NetworkPolicy,
            rules: Option<HeaderRules>,
        ) -> Result<PolicyUpdate, InterceptError> {
            self.shared.set_egress(policy, rules)
        }

        /// The credential rules now (`None`: the proxy intercepts nothing).
        pub fn rules(&self) -> Option<HeaderRules> {
            self.shared
                .intercept
                .as_ref()
                .map(|i| HeaderRules::clone(&i.rules()))
        }

        /// Every refusal so far, oldest first.
        pub fn denials(&self) -> Vec<Denial> {
            self.shared.rec.denials()
        }

        /// Counters.
        pub fn stats(&self) -> Stats {
            self.shared.rec.stats()
        }

        /// Every transparent connection decided so far (allowed and refused),
        /// with live byte counts, oldest first.
        pub fn connections(&self) -> Vec<ConnRecord> {
            self.shared.rec.connections()
        }

        /// Every DNS query the sandbox's resolver answered, oldest first.
        pub fn dns_queries(&self) -> Vec<DnsRecord> {
            self.shared.rec.dns_queries()
        }

        /// Where the proxy listens.
        pub fn local_addrs(&self) -> &[ListenAddr] {
            &self.addrs
        }

        /// The first TCP listener's address, if any.
        pub fn tcp_addr(&self) -> Option<SocketAddr> {
            self.addrs.iter().find_map(|a| match a {
                ListenAddr::Tcp(a) => Some(*a),
                ListenAddr::Unix(_) => None,
            })
        }
    };
}

impl ProxyHandle {
    proxy_control!();

    /// Stops accepting, closes every open connection, removes the Unix
    /// socket files, and waits for all of it.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A proxy running on its own thread (synchronous API).
#[derive(Debug)]
pub struct BlockingProxy {
    shared: Arc<Shared>,
    addrs: Vec<ListenAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlockingProxy {
    proxy_control!();

    /// Stops the proxy (closing every connection, removing Unix socket
    /// files) and joins its thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BlockingProxy {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
