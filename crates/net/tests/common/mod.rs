//! Test fixtures: upstream servers on 127.0.0.x / ::1, proxy clients, a
//! resolver mapping test names, and a connector that refuses (and reports)
//! any attempt to connect outside loopback, so a bug can never send a packet
//! anywhere else.
#![allow(dead_code, clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nanoclaw_net::{
    BoxFuture, Connect, Limits, NetworkPolicy, Proxy, ProxyHandle, Resolve, StaticResolver,
    TcpConnector,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Connector that only ever connects to loopback; anything else is recorded
/// as a violation and refused without sending a packet.
#[derive(Default)]
pub struct LoopbackOnly {
    pub connected: Mutex<Vec<SocketAddr>>,
    pub violations: Mutex<Vec<SocketAddr>>,
}

impl Connect for LoopbackOnly {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            if !addr.ip().is_loopback() {
                self.violations.lock().unwrap().push(addr);
                return Err(io::Error::other("test guard: non-loopback connect refused"));
            }
            self.connected.lock().unwrap().push(addr);
            TcpConnector.connect(addr).await
        })
    }
}

/// Resolver that counts lookups and can answer differently on later calls.
pub struct TestResolver {
    pub inner: StaticResolver,
    pub second: Option<StaticResolver>,
    pub calls: AtomicUsize,
}

impl Resolve for TestResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        match (&self.second, n) {
            (Some(second), n) if n > 0 => second.resolve(name),
            _ => self.inner.resolve(name),
        }
    }
}

pub fn test_names() -> StaticResolver {
    StaticResolver::new()
        .with("api.test", &[ip("127.0.0.2")])
        .with("a.wild.test", &[ip("127.0.0.2")])
        .with("loop.test", &[ip("127.0.0.1")])
        .with("meta.test", &[ip("169.254.169.254")])
        .with("mapped.test", &[ip("::ffff:127.0.0.1")])
        .with("nat64.test", &[ip("64:ff9b::a9fe:a9fe")])
        .with("private.test", &[ip("10.0.0.1"), ip("192.168.1.1")])
        .with("mixed.test", &[ip("169.254.169.254"), ip("127.0.0.2")])
        .with("v6.test", &[ip("::1")])
        .with("evil.test", &[ip("127.0.0.2")])
}

pub struct TestProxy {
    pub handle: ProxyHandle,
    pub addr: SocketAddr,
    pub guard: Arc<LoopbackOnly>,
    pub resolver: Arc<TestResolver>,
}

impl TestProxy {
    pub fn assert_no_violation(&self) {
        assert!(
            self.guard.violations.lock().unwrap().is_empty(),
            "proxy tried to connect outside loopback: {:?}",
            self.guard.violations.lock().unwrap()
        );
    }
}

pub async fn start_proxy(policy: NetworkPolicy, limits: Limits) -> TestProxy {
    start_proxy_with(policy, limits, test_names(), None).await
}

pub async fn start_proxy_with(
    policy: NetworkPolicy,
    limits: Limits,
    names: StaticResolver,
    second: Option<StaticResolver>,
) -> TestProxy {
    let guard = Arc::new(LoopbackOnly::default());
    let resolver = Arc::new(TestResolver {
        inner: names,
        second,
        calls: AtomicUsize::new(0),
    });
    let handle = Proxy::builder(policy)
        .limits(limits)
        .resolver(resolver.clone())
        .connector(guard.clone())
        .listen(nanoclaw_net::Listen::Tcp("127.0.0.1:0".parse().unwrap()))
        .start()
        .await
        .unwrap();
    let addr = handle.tcp_addr().unwrap();
    TestProxy {
        handle,
        addr,
        guard,
        resolver,
    }
}

/// Reads until "\r\n\r\n"; returns the head and whatever followed.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// HTTP server: answers every request (keep-alive) with the request head it
/// received as the body.
pub async fn http_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                loop {
                    let Ok((head, _)) = read_head(&mut s).await else {
                        return;
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=30\r\n\r\n{}",
                        head.len(),
                        head
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// TCP echo server; counts bytes received.
pub async fn echo_server(bind: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let r = r.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = vec![0u8; 65536];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            r.fetch_add(n, Ordering::SeqCst);
                            if wr.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

/// Server that speaks first (like SSH), then echoes.
pub async fn greeting_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(b"SSH-2.0-test\r\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `CONNECT target`, returns the status code, the response head and
/// the stream.
pub async fn http_connect(proxy: SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _body) = read_head(&mut s).await.unwrap();
    let code = head[9..12].parse().unwrap();
    (code, head, s)
}

pub async fn read_to_end<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

/// SOCKS5 destination.
pub enum Dest<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// SOCKS5 handshake with command `cmd`; returns the reply code and stream.
pub async fn socks5(proxy: SocketAddr, dest: Dest<'_>, port: u16, cmd: u8) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, cmd, 0];
    match dest {
        Dest::Name(n) => {
            req.push(3);
            req.push(n.len() as u8);
            req.extend_from_slice(n.as_bytes());
        }
        Dest::Ip(IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Dest::Ip(IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 4];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[0], 5);
    let alen = match rep[3] {
        1 => 4,
        4 => 16,
        t => panic!("atyp {t}"),
    };
    let mut rest = vec![0u8; alen + 2];
    s.read_exact(&mut rest).await.unwrap();
    (rep[1], s)
}

/// Write `msg`, read it back.
pub async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

pub mod tls {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub struct TestCa {
        pub ca_der: CertificateDer<'static>,
        pub ca_pem: String,
        pub server: Arc<rustls::ServerConfig>,
        pub client: Arc<rustls::ClientConfig>,
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A CA generated on the spot and a leaf for `names` signed by it.
    pub fn test_ca(names: &[&str]) -> TestCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nanoclaw test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TestCa {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    /// HTTPS server: answers one HTTP request per connection with a fixed
    /// body. Counts TCP bytes it received before the handshake (via the
    /// number of completed handshakes).
    pub async fn https_server(bind: &str, ca: &TestCa) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server.clone());
        let handshakes = Arc::new(AtomicUsize::new(0));
        let h = handshakes.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let acceptor = acceptor.clone();
                let h = h.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0u8; 4096];
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let body = format!("tls ok: {}", req.lines().next().unwrap_or(""));
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, handshakes)
    }

    /// TLS client handshake over `s` with server name `sni`.
    pub async fn connect(
        ca: &TestCa,
        s: TcpStream,
        sni: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(ca.client.clone());
        connector
            .connect(ServerName::try_from(sni.to_string()).unwrap(), s)
            .await
    }
}
