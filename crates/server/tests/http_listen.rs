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
