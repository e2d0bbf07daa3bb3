//! Serving E2B's API on listeners: `unix:PATH` (a socket of mode 0660,
//! group `nanoclaw` when that group exists) and `tcp:HOST:PORT` (only
//! with API keys configured), HTTP/1.1 with a header read timeout, and a
//! graceful shutdown on SIGTERM/SIGINT.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::audit::Audit;
use crate::auth::{Authenticator, TenantId};
use crate::backend::Backend;
use crate::e2b::{self, E2bState, Limits, Peer};
use crate::error::ServeError;
use crate::metrics::Metrics;

/// Mode of a unix listener's socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// The group given a unix listener's socket when it exists.
pub const SOCKET_GROUP: &str = "nanoclaw";

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT` (`[::1]:3000` for IPv6).
    Tcp(String),
}

impl FromStr for ListenAddr {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(ServeError::BadAddress(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(ServeError::BadAddress(s.to_owned()));
            }
            return Ok(ListenAddr::Tcp(addr.to_owned()));
        }
        Err(ServeError::BadAddress(s.to_owned()))
    }
}

/// How to serve.
pub struct ServeOptions {
    /// Request limits.
    pub limits: Limits,
    /// Longest wait for a request's headers (slow clients get dropped).
    pub header_read_timeout: Duration,
    /// After a shutdown signal, how long open requests (streams) may take
    /// to finish before they are cut.
    pub shutdown_grace: Duration,
    /// Tenant of unix-socket requests without an API key (see
    /// [`E2bState::unix_tenant`]).
    pub unix_tenant: Option<TenantId>,
    /// The `envdVersion` to report (see [`crate::e2b::ENVD_VERSION`]).
    pub envd_version: String,
    /// Stop on SIGTERM/SIGINT.
    pub handle_signals: bool,
    /// Another reason to stop (tests, the daemon's own shutdown).
    pub shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The audit log every request is recorded in before it is answered
    /// (see [`crate::e2b::observe`]); `None`: requests are not recorded.
    pub audit: Option<Audit>,
    /// The counters served as `GET /metrics` (share them with the
    /// backend so it can count execs, pool hits, …).
    pub metrics: Arc<Metrics>,
    /// Agent runs and approvals (`/v1/execute`, `/v1/approvals`); `None`:
    /// those routes answer 501.
    pub agents: Option<Arc<crate::agents::Agents>>,
    /// Image builds and registered images (`/v1/images`); `None`: those
    /// routes answer 501.
    pub images: Option<Arc<crate::images::Images>>,
}

impl ServeOptions {
    /// Header read timeout: 10 s.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Shutdown grace: 10 s.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: Limits::default(),
            header_read_timeout: Self::HEADER_READ_TIMEOUT,
            shutdown_grace: Self::SHUTDOWN_GRACE,
            unix_tenant: None,
            envd_version: e2b::ENVD_VERSION.to_owned(),
            handle_signals: true,
            shutdown: None,
            audit: None,
            metrics: Arc::default(),
            agents: None,
            images: None,
        }
    }
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Bound {
    /// A unix socket (removed again at shutdown if it is still ours).
    Unix {
        /// The listener.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
        /// Its inode, to recognize it at removal.
        ino: u64,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Bound {
    /// The TCP address, for a TCP listener (e.g. when bound to port 0).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix { .. } => None,
        }
    }
}

fn listen_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Listen { what, source }
}

/// The id of group `name` from `/etc/group`, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Clears the way for a unix socket at `path`: removes a stale socket,
/// refuses a live one or anything that is not a socket.
async fn clear_socket_path(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(listen_err(format!("unix:{}", path.display()))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_owned()));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(ServeError::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(listen_err(format!(
                "unix:{} (removing a stale socket)",
                path.display()
            ))),
        Err(e) => Err(listen_err(format!("unix:{}", path.display()))(e)),
    }
}

/// Binds a unix socket at `path` with mode 0660 (group `nanoclaw` when it
/// exists) without a moment where others could connect: the socket is
/// made in a private (0700) directory beside `path`, given its mode and
/// group, then renamed into place.
async fn bind_unix(path: &Path) -> Result<Bound, ServeError> {
    let what = format!("unix:{}", path.display());
    clear_socket_path(path).await?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let suffix = e2b::random_token().unwrap_or_else(|| std::process::id().to_string());
    let private = parent.join(format!(
        ".nanoclaw-sock-{}",
        &suffix[..suffix.len().min(16)]
    ));
    std::fs::create_dir(&private).map_err(listen_err(format!("{what} (private directory)")))?;
    let result = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let temp = private.join("sock");
        let listener = UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        if let Some(gid) = group_id(SOCKET_GROUP) {
            std::os::unix::fs::chown(&temp, None, Some(gid))?;
        }
        std::fs::rename(&temp, path)?;
        Ok::<_, io::Error>(listener)
    })();
    // The directory is empty once the socket was renamed (or failed).
    let _ = std::fs::remove_file(private.join("sock"));
    let _ = std::fs::remove_dir(&private);
    let listener = result.map_err(listen_err(what.clone()))?;
    let ino = std::fs::symlink_metadata(path)
        .map_err(listen_err(what))?
        .ino();
    Ok(Bound::Unix {
        listener,
        path: path.to_owned(),
        ino,
    })
}

/// Binds every listener. TCP listeners are refused unless `auth` has
/// keys.
pub async fn bind<A: Authenticator>(
    addrs: &[ListenAddr],
    auth: &A,
) -> Result<Vec<Bound>, ServeError> {
    if addrs.is_empty() {
        return Err(ServeError::NoListeners);
    }
    let mut bound = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match addr {
            ListenAddr::Unix(path) => bound.push(bind_unix(path).await?),
            ListenAddr::Tcp(hostport) => {
                if !auth.has_keys().await? {
                    return Err(ServeError::TcpWithoutAuth(hostport.clone()));
                }
                let listener = TcpListener::bind(hostport.as_str())
                    .await
                    .map_err(listen_err(format!("tcp:{hostport}")))?;
                bound.push(Bound::Tcp(listener));
            }
        }
    }
    Ok(bound)
}

/// Binds `listeners` and serves E2B's API over `backend` until SIGTERM,
/// SIGINT or `opts.shutdown`.
pub async fn serve<B: Backend, A: Authenticator>(
    listeners: Vec<ListenAddr>,
    backend: Arc<B>,
    auth: Arc<A>,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    let bound = bind(&listeners, auth.as_ref()).await?;
    serve_bound(bound, backend, auth, opts).await
}

/// Resolves on SIGTERM or SIGINT.
async fn signals() -> Result<impl Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Serves on already bound listeners (see [`bind`]).
pub async fn serve_bound<B: Backend, A: Authenticator>(
    bound: Vec<Bound>,
    backend: Arc<B>,
    auth: Arc<A>,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    let mut state = E2bState::new(backend, auth);
    state.limits = opts.limits.clone();
    state.unix_tenant = opts.unix_tenant.clone();
    state.envd_version = opts.envd_version.clone();
    state.audit = opts.audit.clone();
    state.metrics = Arc::clone(&opts.metrics);
    state.agents = opts.agents.clone();
    state.images = opts.images.clone();
    let router = e2b::router(Arc::new(state));
    let (stop_tx, stop_rx) = watch::channel(false);
    let conn = ConnOptions {
        header_read_timeout: opts.header_read_timeout,
        grace: opts.shutdown_grace,
    };
    let mut loops = JoinSet::new();
    let mut sockets = Vec::new();
    for listener in bound {
        let (router, stop) = (router.clone(), stop_rx.clone());
        match listener {
            Bound::Tcp(l) => {
                loops.spawn(accept_loop(Acceptor::Tcp(l), router, stop, conn));
            }
            Bound::Unix {
                listener,
                path,
                ino,
            } => {
                sockets.push((path, ino));
                loops.spawn(accept_loop(Acceptor::Unix(listener), router, stop, conn));
            }
        }
    }
    let external = opts.shutdown;
    let sig = if opts.handle_signals {
        Some(signals().await?)
    } else {
        None
    };
    tokio::select! {
        () = async { match sig { Some(s) => s.await, None => std::future::pending().await } } => {}
        () = async { match external { Some(s) => s.await, None => std::future::pending().await } } => {}
    }
    let _ = stop_tx.send(true);
    while loops.join_next().await.is_some() {}
    for (path, ino) in sockets {
        // Remove the socket only if it is still the one we made.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct ConnOptions {
    header_read_timeout: Duration,
    grace: Duration,
}

enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection: a boxed byte stream either way.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Acceptor {
    /// A connection, who it is from, and (TCP) the client's address.
    async fn accept(&self) -> io::Result<(Box<dyn Io>, Peer, Option<std::net::IpAddr>)> {
        match self {
            Acceptor::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), Peer { unix: false }, Some(addr.ip())))
            }
            Acceptor::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), Peer { unix: true }, None))
            }
        }
    }
}

/// Open connections one listener serves at once; past it, new ones wait in
/// the kernel's backlog until one closes.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open connections one TCP client address may hold at once; more are
/// closed at once (one address cannot take every slot).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 128;

/// Open connections per client address (TCP), and the slot a connection
/// holds until it ends.
#[derive(Clone, Default)]
struct PerAddress(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

struct AddressSlot(PerAddress, std::net::IpAddr);

impl PerAddress {
    fn take(&self, ip: Option<std::net::IpAddr>) -> Result<Option<AddressSlot>, ()> {
        let Some(ip) = ip else { return Ok(None) };
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return Err(());
        }
        *n += 1;
        Ok(Some(AddressSlot(self.clone(), ip)))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Accepts connections until told to stop (at most [`MAX_CONNECTIONS`]
/// open, [`MAX_CONNECTIONS_PER_ADDRESS`] per TCP client address), then
/// lets open connections finish for the grace period.
async fn accept_loop(
    acceptor: Acceptor,
    router: Router,
    mut stop: watch::Receiver<bool>,
    opts: ConnOptions,
) {
    let mut conns = JoinSet::new();
    let per_address = PerAddress::default();
    loop {
        tokio::select! {
            accepted = acceptor.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((io, peer, ip)) => {
                    // Over its address's share: closed at once (dropped).
                    if let Ok(slot) = per_address.take(ip) {
                        let (router, stop) = (router.clone(), stop.clone());
                        conns.spawn(async move {
                            serve_connection(io, peer, router, stop, opts).await;
                            drop(slot);
                        });
                    }
                }
                // Out of fds or a connection reset while queued: wait a
                // little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(acceptor);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(opts.grace, drain).await.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// Serves one HTTP/1.1 connection; on stop, finishes the request in
/// flight and closes.
async fn serve_connection(
    io: Box<dyn Io>,
    peer: Peer,
    router: Router,
    mut stop: watch::Receiver<bool>,
    opts: ConnOptions,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer);
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/nanoclaw.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/nanoclaw.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:3000".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:3000".into())
        );
        assert_eq!(
            "tcp:[::1]:0".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:0".into())
        );
        for bad in ["http://x", "tcp:3000", "tcp:host:port", "unix:", "tcp::80"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn refuses_non_socket_and_live_socket() {
        let dir = std::env::temp_dir().join(format!("nanoclaw-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_unix(&file).await,
            Err(ServeError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let sock = dir.join("live.sock");
        let _live = bind_unix(&sock).await.unwrap();
        assert!(matches!(
            bind_unix(&sock).await,
            Err(ServeError::SocketInUse(_))
        ));
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        drop(_live);
        // Now stale: a new bind replaces it.
        let again = bind_unix(&sock).await;
        assert!(again.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
