//! Black-box: the real `curl` through the proxy (HTTP proxy, SOCKS5 with
//! remote DNS, HTTPS via CONNECT with the test CA). Skipped when curl is
//! not installed. Loopback only: names resolve through the test resolver.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nanoclaw_net::{DenyReason, Limits, NetworkPolicy};

fn curl(args: Vec<String>) -> Option<(i32, String, String)> {
    let out = std::process::Command::new("curl")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .args(["-sS", "--max-time", "10"])
        .args(&args)
        .output()
        .ok()?;
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn run(args: Vec<String>) -> Option<(i32, String, String)> {
    tokio::task::spawn_blocking(move || curl(args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_http_and_socks5_proxy() {
    if run(vec!["--version".into()]).await.is_none() {
        eprintln!("curl not installed: skipped");
        return;
    }
    let ca = tls::test_ca(&["api.test"]);
    let (tls_srv, handshakes) = tls::https_server("127.0.0.2:0", &ca).await;
    let http_srv = http_server("127.0.0.2:0").await;
    let p = start_proxy(
        NetworkPolicy::allowlist(
            [
                format!("api.test:{}", http_srv.port()),
                format!("api.test:{}", tls_srv.port()),
            ],
            ["127.0.0.2/32"],
        )
        .unwrap(),
        Limits::default(),
    )
    .await;
    let proxy = p.addr;
    let ca_file = std::env::temp_dir().join(format!("nanoclaw-net-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();

    // Plain HTTP via the HTTP proxy (absolute-form request).
    let (rc, out, err) = run(vec![
        "-x".into(),
        format!("http://{proxy}"),
        format!("http://api.test:{}/via-http-proxy", http_srv.port()),
    ])
    .await
    .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert!(out.starts_with("GET /via-http-proxy HTTP/1.1\r\n"), "{out}");

    // Two URLs on one curl invocation: connection reuse must not break.
    let (rc, out, err) = run(vec![
        "-x".into(),
        format!("http://{proxy}"),
        format!("http://api.test:{}/one", http_srv.port()),
        format!("http://api.test:{}/two", http_srv.port()),
    ])
    .await
    .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("GET /one") && out.contains("GET /two"),
        "{out}"
    );

    // SOCKS5 with remote name resolution.
    let (rc, out, err) = run(vec![
        "--proxy".into(),
        format!("socks5h://{proxy}"),
        format!("http://api.test:{}/via-socks", http_srv.port()),
    ])
    .await
    .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert!(out.starts_with("GET /via-socks HTTP/1.1\r\n"), "{out}");

    // HTTPS via CONNECT, verified against the test CA.
    let (rc, out, err) = run(vec![
        "-x".into(),
        format!("http://{proxy}"),
        "--cacert".into(),
        ca_file.display().to_string(),
        format!("https://api.test:{}/secure", tls_srv.port()),
    ])
    .await
    .unwrap();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "tls ok: GET /secure HTTP/1.1");
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Refused: a host not listed (curl reports the proxy's 403).
    let (rc, _, err) = run(vec![
        "-x".into(),
        format!("http://{proxy}"),
        format!("https://evil.test:{}/", tls_srv.port()),
    ])
    .await
    .unwrap();
    assert_ne!(rc, 0);
    assert!(err.contains("403"), "{err}");
    let (rc, out, _) = run(vec![
        "-x".into(),
        format!("http://{proxy}"),
        format!("http://meta.test:{}/", http_srv.port()),
    ])
    .await
    .unwrap();
    assert_eq!(rc, 0);
    assert!(out.contains("refused"), "{out}");
    let d = p.handle.denials();
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0].reason, DenyReason::HostNotAllowed);
    assert_eq!(d[1].reason, DenyReason::HostNotAllowed);
    let _ = std::fs::remove_file(&ca_file);
    p.assert_no_violation();
}
