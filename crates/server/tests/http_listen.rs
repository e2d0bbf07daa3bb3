//! Listeners: unix socket mode and routing, TCP refused without keys,
//! slow clients cut off, graceful shutdown removing the socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nanoclaw_server::listen::{self, ListenAddr, ServeOptions};
use nanoclaw_server::{ServeError, StaticKeys, TenantId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nanoclaw-http-listen-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_0660_and_serves_and_is_removed() {
    let dir = temp_dir("unix");
    let path = dir.join("api.sock");
    let opts = ServeOptions {
        unix_tenant: Some(TenantId::from("local")),
        ..ServeOptions::default()
    };
    let s = start_with(vec![ListenAddr::Unix(path.clone())], opts).await;
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // No stray private directory is left beside it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let r = send_on(stream, "GET", "/v2/sandboxes", &[], bytes::Bytes::new()).await;
    assert_eq!(r.status, 200, "the unix tenant needs no key");
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let r = send_on(
        stream,
        "GET",
        "/v2/sandboxes",
        &[("x-api-key", "wrong")],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 401, "a wrong key is refused even on the socket");

    s.stop().await;
    assert!(!path.exists(), "the socket is removed at shutdown");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn tcp_needs_keys_and_sockets_are_not_clobbered() {
    let r = listen::bind(&[ListenAddr::Tcp("127.0.0.1:0".into())], &StaticKeys::new()).await;
    assert!(matches!(r, Err(ServeError::TcpWithoutAuth(_))));
    let dir = temp_dir("clobber");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let r = listen::bind(&[ListenAddr::Unix(file.clone())], &StaticKeys::new()).await;
    assert!(matches!(r, Err(ServeError::NotASocket(_))));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let opts = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let s = start_with(vec![ListenAddr::Tcp("127.0.0.1:0".into())], opts).await;
    let mut c = tokio::net::TcpStream::connect(s.addr.unwrap())
        .await
        .unwrap();
    c.write_all(b"GET /v2/sandboxes HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server must close a connection whose headers never end"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_json() {
    let mut opts = ServeOptions::default();
    opts.limits.body_idle = Duration::from_millis(300);
    let s = start_with(vec![ListenAddr::Tcp("127.0.0.1:0".into())], opts).await;
    let mut c = tokio::net::TcpStream::connect(s.addr.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY_A}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"templ"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":408"), "{text}");
    s.stop().await;
}

/// Red team: a body trickled a byte at a time, each within the idle
/// timeout, held its request open for as long as the client liked. It must
/// keep an average rate after a grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_are_cut_off() {
    let mut opts = ServeOptions::default();
    opts.limits.body_idle = Duration::from_secs(5);
    opts.limits.body_grace = Duration::from_millis(500);
    opts.limits.body_min_rate = 1000;
    let s = start_with(vec![ListenAddr::Tcp("127.0.0.1:0".into())], opts).await;
    let mut c = tokio::net::TcpStream::connect(s.addr.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY_A}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut answer = String::new();
    // One byte every 200 ms: well within the idle timeout, far below 1000 B/s.
    while started.elapsed() < Duration::from_secs(10) {
        if c.write_all(b" ").await.is_err() {
            break;
        }
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("too slow"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}

/// Red team: connections had no cap. One TCP client address may hold
/// `MAX_CONNECTIONS_PER_ADDRESS` at once; past it, new ones are closed,
/// and a slot frees when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let s = start_with(
        vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        ServeOptions::default(),
    )
    .await;
    let addr = s.addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..listen::MAX_CONNECTIONS_PER_ADDRESS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The server has accepted them all once a request on a new one is
    // answered or refused; give the accept loop a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("the extra connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "over the cap: {}", String::from_utf8_lossy(&buf[..n]));
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send_on(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        "GET",
        "/healthz",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "a freed slot is usable");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_serve() {
    let auth = Arc::new(keys());
    let backend = Arc::new(TestBackend::default());
    let bound = listen::bind(&[ListenAddr::Tcp("127.0.0.1:0".into())], auth.as_ref())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        handle_signals: false,
        shutdown: Some(Box::pin(async move {
            let _ = rx.await;
        })),
        ..ServeOptions::default()
    };
    let task = tokio::spawn(listen::serve_bound(bound, backend, auth, opts));
    tx.send(()).unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))));
}
