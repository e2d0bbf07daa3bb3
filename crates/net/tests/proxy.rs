//! The proxy end to end, over loopback only: upstream HTTP, HTTPS (test CA)
//! and raw TCP servers on 127.0.0.x / ::1, reached through the proxy with an
//! allowlist, and every refusal the issue lists.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use nanoclaw_net::{
    AddrClass, DenyReason, Limits, Listen, NetworkMode, NetworkPolicy, Protocol, Proxy,
    StaticResolver,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn policy(hosts: &[String], cidrs: &[&str]) -> NetworkPolicy {
    NetworkPolicy::allowlist(hosts, cidrs).unwrap()
}

async fn wait_for<F: Fn() -> bool>(f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

// ---------------------------------------------------------------- allowed

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form_with_connection_close() {
    let up = http_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", up.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let req = format!(
        "GET http://api.test:{port}/hello?x=1 HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic c2VjcmV0\r\nUser-Agent: t\r\n\r\n",
        port = up.port()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    // The proxy told the client it closes, and it did (read_to_end returned).
    assert!(resp.contains("Connection: close\r\n"), "{resp}");
    assert!(!resp.contains("Keep-Alive"), "{resp}");
    // What the upstream saw: origin-form, Connection: close, no proxy headers.
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.starts_with("GET /hello?x=1 HTTP/1.1\r\n"), "{body}");
    assert!(body.contains(&format!("Host: api.test:{}", up.port())));
    assert!(body.contains("Connection: close"));
    assert!(!body.contains("Proxy-"), "{body}");
    let st = p.handle.stats();
    assert_eq!(st.allowed, 1);
    assert!(
        st.bytes_up > 0 && st.bytes_down as usize == resp.len(),
        "{st:?}"
    );
    assert!(p.handle.denials().is_empty());
    p.assert_no_violation();
}

#[tokio::test]
async fn connect_tunnel_to_tcp_echo() {
    let (echo, received) = echo_server("127.0.0.3:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", echo.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    // The name maps to 127.0.0.2, the echo server is on 127.0.0.3: use the
    // literal address allowed by the CIDR rule, and a name on 127.0.0.2 below.
    let (code, _, mut s) = http_connect(p.addr, &format!("127.0.0.3:{}", echo.port())).await;
    assert_eq!(code, 200);
    echo_roundtrip(&mut s, b"ping through the tunnel").await;
    drop(s);
    wait_for(|| p.handle.stats().active == 0).await;
    let st = p.handle.stats();
    assert_eq!(received.load(Ordering::SeqCst), 23);
    assert_eq!((st.bytes_up, st.bytes_down), (23, 23));
    p.assert_no_violation();
}

#[tokio::test]
async fn connect_by_name_uses_resolved_loopback_address() {
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", echo.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let (code, _, mut s) = http_connect(p.addr, &format!("API.test.:{}", echo.port())).await;
    assert_eq!(code, 200);
    echo_roundtrip(&mut s, b"hi").await;
    assert_eq!(
        p.guard.connected.lock().unwrap().as_slice(),
        &[echo],
        "connected to the checked address"
    );
}

#[tokio::test]
async fn server_speaks_first_protocols_work_through_tunnels() {
    let srv = greeting_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", srv.port())], &["127.0.0.2/32"]),
        Limits::default(),
    )
    .await;
    let (code, _, mut s) = http_connect(p.addr, &format!("api.test:{}", srv.port())).await;
    assert_eq!(code, 200);
    let mut greet = [0u8; 14];
    s.read_exact(&mut greet).await.unwrap();
    assert_eq!(&greet, b"SSH-2.0-test\r\n");
    echo_roundtrip(&mut s, b"after greeting").await;
}

#[tokio::test]
async fn https_through_connect_with_matching_sni() {
    let ca = tls::test_ca(&["api.test"]);
    let (srv, handshakes) = tls::https_server("127.0.0.2:0", &ca).await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", srv.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let (code, _, s) = http_connect(p.addr, &format!("api.test:{}", srv.port())).await;
    assert_eq!(code, 200);
    let mut tls = tls::connect(&ca, s, "api.test").await.unwrap();
    tls.write_all(b"GET /secure HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8(read_to_end(&mut tls).await).unwrap();
    assert!(resp.ends_with("tls ok: GET /secure HTTP/1.1"), "{resp}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    assert!(p.handle.denials().is_empty());
}

#[tokio::test]
async fn socks5_connect_by_domain_ipv4_and_ipv6() {
    let (echo4, _) = echo_server("127.0.0.2:0").await;
    let (echo6, _) = echo_server("[::1]:0").await;
    let p = start_proxy(
        policy(
            &[
                format!("api.test:{}", echo4.port()),
                format!("v6.test:{}", echo6.port()),
            ],
            &["127.0.0.0/8", "::1/128"],
        ),
        Limits::default(),
    )
    .await;
    let (rep, mut s) = socks5(p.addr, Dest::Name("api.test"), echo4.port(), 1).await;
    assert_eq!(rep, 0);
    echo_roundtrip(&mut s, b"socks domain").await;
    let (rep, mut s) = socks5(p.addr, Dest::Ip(ip("127.0.0.2")), echo4.port(), 1).await;
    assert_eq!(rep, 0);
    echo_roundtrip(&mut s, b"socks v4").await;
    let (rep, mut s) = socks5(p.addr, Dest::Ip(ip("::1")), echo6.port(), 1).await;
    assert_eq!(rep, 0);
    echo_roundtrip(&mut s, b"socks v6").await;
    let (rep, mut s) = socks5(p.addr, Dest::Name("v6.test"), echo6.port(), 1).await;
    assert_eq!(rep, 0);
    echo_roundtrip(&mut s, b"socks v6 by name").await;
    assert!(p.handle.denials().is_empty(), "{:?}", p.handle.denials());
    p.assert_no_violation();
}

#[tokio::test]
async fn https_through_socks5_checks_sni_too() {
    let ca = tls::test_ca(&["api.test", "evil.test"]);
    let (srv, handshakes) = tls::https_server("127.0.0.2:0", &ca).await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", srv.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let (rep, s) = socks5(p.addr, Dest::Name("api.test"), srv.port(), 1).await;
    assert_eq!(rep, 0);
    tls::connect(&ca, s, "api.test").await.unwrap();
    let (rep, s) = socks5(p.addr, Dest::Name("api.test"), srv.port(), 1).await;
    assert_eq!(rep, 0);
    assert!(tls::connect(&ca, s, "evil.test").await.is_err());
    wait_for(|| !p.handle.denials().is_empty()).await;
    assert_eq!(
        p.handle.denials()[0].reason,
        DenyReason::SniMismatch {
            sni: "evil.test".into()
        }
    );
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------- refused

#[tokio::test]
async fn host_not_listed_is_refused_everywhere() {
    let up = http_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", up.port())], &["127.0.0.2/32"]),
        Limits::default(),
    )
    .await;
    let target = format!("evil.test:{}", up.port());
    let (code, head, _) = http_connect(p.addr, &target).await;
    assert_eq!(code, 403);
    assert!(
        head.contains("X-Nanoclaw-Deny-Reason: host_not_allowed"),
        "{head}"
    );
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("evil.test"), "{resp}");
    let (rep, _) = socks5(p.addr, Dest::Name("evil.test"), up.port(), 1).await;
    assert_eq!(rep, 2, "SOCKS5: connection not allowed by ruleset");
    let d = p.handle.denials();
    assert_eq!(d.len(), 3);
    for (denial, proto) in d.iter().zip([
        Protocol::HttpConnect,
        Protocol::HttpForward,
        Protocol::Socks5,
    ]) {
        assert_eq!(denial.destination, "evil.test");
        assert_eq!(denial.port, up.port());
        assert_eq!(denial.reason, DenyReason::HostNotAllowed);
        assert_eq!(denial.protocol, proto);
    }
    assert!(p.guard.connected.lock().unwrap().is_empty());
    assert_eq!(
        p.resolver.calls.load(Ordering::SeqCst),
        0,
        "no lookup for refused names"
    );
    let json = serde_json_value(&d[0]);
    assert!(json.contains(r#""kind":"host_not_allowed""#), "{json}");
}

fn serde_json_value<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).unwrap()
}

#[tokio::test]
async fn listed_host_on_another_port_is_refused() {
    let up = http_server("127.0.0.2:0").await;
    let (echo, received) = echo_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", up.port())], &["127.0.0.2/32:1"]),
        Limits::default(),
    )
    .await;
    let (code, _, _) = http_connect(p.addr, &format!("api.test:{}", echo.port())).await;
    assert_eq!(code, 403);
    // Default ports: a bare `api.test` rule allows only 80 and 443.
    let p2 = start_proxy(
        policy(&["api.test".into()], &["127.0.0.2/32"]),
        Limits::default(),
    )
    .await;
    let (code, _, _) = http_connect(p2.addr, &format!("api.test:{}", echo.port())).await;
    assert_eq!(code, 403);
    // Direct IP on a port the CIDR rule does not list.
    let (code, _, _) = http_connect(p.addr, &format!("127.0.0.2:{}", echo.port())).await;
    assert_eq!(code, 403);
    assert_eq!(received.load(Ordering::SeqCst), 0);
    assert_eq!(p.handle.denials()[0].reason, DenyReason::PortNotAllowed);
    assert_eq!(p2.handle.denials()[0].reason, DenyReason::PortNotAllowed);
    assert_eq!(p.handle.denials()[1].reason, DenyReason::PortNotAllowed);
    assert!(p.guard.connected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn names_resolving_to_loopback_or_metadata_are_refused_without_explicit_allow() {
    let (echo, received) = echo_server("127.0.0.1:0").await;
    let port = echo.port();
    let hosts: Vec<String> = [
        "loop.test",
        "meta.test",
        "mapped.test",
        "nat64.test",
        "private.test",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect();
    // Even a catch-all CIDR rule does not unblock special-purpose addresses.
    let p = start_proxy(policy(&hosts, &["0.0.0.0/0", "::/0"]), Limits::default()).await;
    let cases = [
        ("loop.test", "127.0.0.1", AddrClass::Loopback),
        ("meta.test", "169.254.169.254", AddrClass::LinkLocal),
        ("mapped.test", "127.0.0.1", AddrClass::Loopback),
        ("nat64.test", "64:ff9b::a9fe:a9fe", AddrClass::LinkLocal),
        ("private.test", "10.0.0.1", AddrClass::Private),
    ];
    for (name, addr, class) in cases {
        let (code, head, _) = http_connect(p.addr, &format!("{name}:{port}")).await;
        assert_eq!(code, 403, "{name}: {head}");
        assert!(head.contains("special_address"), "{head}");
        let (rep, _) = socks5(p.addr, Dest::Name(name), port, 1).await;
        assert_eq!(rep, 2, "{name}");
        let last = p.handle.denials().pop().unwrap();
        assert_eq!(
            last.reason,
            DenyReason::SpecialAddress {
                address: ip(addr),
                class
            },
            "{name}"
        );
    }
    // Direct IPs: the metadata address and loopback, over all three protocols.
    for target in [
        "169.254.169.254",
        "127.0.0.1",
        "[::ffff:169.254.169.254]",
        "[::1]",
    ] {
        let (code, _, _) = http_connect(p.addr, &format!("{target}:{port}")).await;
        assert_eq!(code, 403, "{target}");
    }
    let (rep, _) = socks5(p.addr, Dest::Ip(ip("169.254.169.254")), 80, 1).await;
    assert_eq!(rep, 2);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    )
    .await
    .unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(received.load(Ordering::SeqCst), 0);
    assert!(p.guard.connected.lock().unwrap().is_empty());
    p.assert_no_violation();
}

#[tokio::test]
async fn explicit_cidr_unblocks_exactly_what_it_names() {
    let (echo, _) = echo_server("127.0.0.1:0").await;
    let port = echo.port();
    // loop.test -> 127.0.0.1 is fine with 127.0.0.1/32 allowed ...
    let p = start_proxy(
        policy(&[format!("loop.test:{port}")], &["127.0.0.1/32"]),
        Limits::default(),
    )
    .await;
    let (code, _, mut s) = http_connect(p.addr, &format!("loop.test:{port}")).await;
    assert_eq!(code, 200);
    echo_roundtrip(&mut s, b"x").await;
    // ... but 127.0.0.2/32 does not cover it.
    let p = start_proxy(
        policy(&[format!("loop.test:{port}")], &["127.0.0.2/32"]),
        Limits::default(),
    )
    .await;
    let (code, _, _) = http_connect(p.addr, &format!("loop.test:{port}")).await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn only_checked_addresses_are_used_when_a_name_has_several() {
    // mixed.test -> [169.254.169.254, 127.0.0.2]: the metadata address is
    // dropped, the allowed one is used.
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("mixed.test:{}", echo.port())], &["127.0.0.2/32"]),
        Limits::default(),
    )
    .await;
    let (code, _, mut s) = http_connect(p.addr, &format!("mixed.test:{}", echo.port())).await;
    assert_eq!(code, 200);
    echo_roundtrip(&mut s, b"ok").await;
    assert_eq!(p.guard.connected.lock().unwrap().as_slice(), &[echo]);
    p.assert_no_violation();
}

#[tokio::test]
async fn no_dns_rebinding_window_one_lookup_per_request() {
    // First answer: 127.0.0.2 (allowed). Any later answer: 127.0.0.1 (not
    // allowed). The proxy must resolve once and connect to what it checked.
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let port = echo.port();
    let first = StaticResolver::new().with("rebind.test", &[ip("127.0.0.2")]);
    let later = StaticResolver::new().with("rebind.test", &[ip("127.0.0.1")]);
    let p = start_proxy_with(
        policy(&[format!("rebind.test:{port}")], &["127.0.0.2/32"]),
        Limits::default(),
        first,
        Some(later),
    )
    .await;
    let (code, _, mut s) = http_connect(p.addr, &format!("rebind.test:{port}")).await;
    assert_eq!(code, 200);
    echo_roundtrip(&mut s, b"pinned").await;
    assert_eq!(p.resolver.calls.load(Ordering::SeqCst), 1);
    assert_eq!(p.guard.connected.lock().unwrap().as_slice(), &[echo]);
    // The next request sees the rebound answer and is refused.
    let (code, _, _) = http_connect(p.addr, &format!("rebind.test:{port}")).await;
    assert_eq!(code, 403);
    assert!(matches!(
        p.handle.denials()[0].reason,
        DenyReason::SpecialAddress {
            class: AddrClass::Loopback,
            ..
        }
    ));
}

#[tokio::test]
async fn sni_mismatch_is_refused_before_any_byte_reaches_upstream() {
    let ca = tls::test_ca(&["api.test", "evil.test"]);
    let (srv, handshakes) = tls::https_server("127.0.0.2:0", &ca).await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", srv.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let (code, _, s) = http_connect(p.addr, &format!("api.test:{}", srv.port())).await;
    assert_eq!(code, 200);
    let err = tls::connect(&ca, s, "evil.test").await;
    assert!(err.is_err(), "handshake with a fronted SNI must fail");
    wait_for(|| !p.handle.denials().is_empty()).await;
    let d = &p.handle.denials()[0];
    assert_eq!(d.destination, "api.test");
    assert_eq!(
        d.reason,
        DenyReason::SniMismatch {
            sni: "evil.test".into()
        }
    );
    assert_eq!(handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(
        p.handle.stats().bytes_up,
        0,
        "the ClientHello was not forwarded"
    );
    // A tunnel to a literal IP refuses any SNI.
    let (code, _, s) = http_connect(p.addr, &format!("127.0.0.2:{}", srv.port())).await;
    assert_eq!(code, 200);
    assert!(tls::connect(&ca, s, "api.test").await.is_err());
}

#[tokio::test]
async fn socks5_udp_associate_and_bind_are_refused() {
    let p = start_proxy(
        policy(&["api.test:53".into()], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let (rep, _) = socks5(p.addr, Dest::Ip(ip("127.0.0.2")), 53, 3).await;
    assert_eq!(rep, 7, "command not supported");
    let (rep, _) = socks5(p.addr, Dest::Name("api.test"), 53, 2).await;
    assert_eq!(rep, 7);
    let d = p.handle.denials();
    assert_eq!(d.len(), 2);
    assert!(
        matches!(&d[0].reason, DenyReason::Unsupported { what } if what.contains("UDP ASSOCIATE"))
    );
    assert!(matches!(&d[1].reason, DenyReason::Unsupported { what } if what.contains("BIND")));
    assert!(p.guard.connected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn socks5_without_no_auth_method_is_rejected() {
    let p = start_proxy(NetworkPolicy::default(), Limits::default()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap(); // only username/password
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0xff]);
    assert!(read_to_end(&mut s).await.is_empty());
}

#[tokio::test]
async fn connection_cap_refuses_and_is_reported_then_recovers() {
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let p = start_proxy(
        policy(&[format!("api.test:{}", echo.port())], &["127.0.0.2/32"]),
        limits,
    )
    .await;
    let target = format!("api.test:{}", echo.port());
    let (c1, _, mut s1) = http_connect(p.addr, &target).await;
    let (c2, _, s2) = http_connect(p.addr, &target).await;
    assert_eq!((c1, c2), (200, 200));
    let (c3, head, _) = http_connect(p.addr, &target).await;
    assert_eq!(c3, 503, "{head}");
    assert!(head.contains("connection_limit"));
    let (rep, _) = socks5(p.addr, Dest::Name("api.test"), echo.port(), 1).await;
    assert_eq!(rep, 2);
    let d = p.handle.denials();
    assert_eq!(d.len(), 2);
    assert!(d
        .iter()
        .all(|d| d.reason == DenyReason::ConnectionLimit { max: 2 }));
    assert_eq!(d[0].destination, "api.test");
    // Existing tunnels still work; closing one frees a slot.
    echo_roundtrip(&mut s1, b"still up").await;
    drop(s2);
    wait_for(|| p.handle.stats().active <= 1).await;
    let (c4, _, mut s4) = http_connect(p.addr, &target).await;
    assert_eq!(c4, 200);
    echo_roundtrip(&mut s4, b"slot freed").await;
    assert!(p.handle.stats().peak_active <= 3);
}

#[tokio::test]
async fn clients_beyond_the_handshake_slack_are_closed() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let p = start_proxy(NetworkPolicy::default(), limits).await;
    // Idle clients that never send a request fill the handshake slots.
    let mut idle = Vec::new();
    for _ in 0..1 + Limits::HANDSHAKE_SLACK {
        idle.push(TcpStream::connect(p.addr).await.unwrap());
    }
    wait_for(|| p.handle.stats().active as usize == 1 + Limits::HANDSHAKE_SLACK).await;
    let mut extra = TcpStream::connect(p.addr).await.unwrap();
    assert!(read_to_end(&mut extra).await.is_empty(), "closed at once");
    wait_for(|| !p.handle.denials().is_empty()).await;
    assert_eq!(
        p.handle.denials()[0].reason,
        DenyReason::ConnectionLimit { max: 1 }
    );
}

#[tokio::test]
async fn byte_cap_cuts_the_connection_and_refuses_new_ones() {
    let (echo, received) = echo_server("127.0.0.2:0").await;
    let cap = 100_000u64;
    let limits = Limits {
        max_bytes: cap,
        ..Limits::default()
    };
    let p = start_proxy(
        policy(&[format!("api.test:{}", echo.port())], &["127.0.0.2/32"]),
        limits,
    )
    .await;
    let target = format!("api.test:{}", echo.port());
    let (code, _, s) = http_connect(p.addr, &target).await;
    assert_eq!(code, 200);
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..20 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let got = read_to_end(&mut rd).await;
    let _ = writer.await;
    wait_for(|| !p.handle.denials().is_empty()).await;
    let st = p.handle.stats();
    assert!(st.bytes_up + st.bytes_down <= cap, "{st:?}");
    assert!(got.len() as u64 <= cap && received.load(Ordering::SeqCst) as u64 <= cap);
    assert_eq!(
        p.handle.denials()[0].reason,
        DenyReason::ByteLimit { max: cap }
    );
    assert_eq!(p.handle.denials()[0].destination, "api.test");
    // New connections are refused once the budget is spent.
    let (code, head, _) = http_connect(p.addr, &target).await;
    assert_eq!(code, 503);
    assert!(head.contains("byte_limit"), "{head}");
}

#[tokio::test]
async fn mode_none_refuses_everything() {
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let mut pol = policy(&[format!("api.test:{}", echo.port())], &["127.0.0.0/8"]);
    pol.mode = NetworkMode::None;
    let p = start_proxy(pol, Limits::default()).await;
    let (code, _, _) = http_connect(p.addr, &format!("api.test:{}", echo.port())).await;
    assert_eq!(code, 403);
    let (rep, _) = socks5(p.addr, Dest::Ip(ip("127.0.0.2")), echo.port(), 1).await;
    assert_eq!(rep, 2);
    assert!(p
        .handle
        .denials()
        .iter()
        .all(|d| d.reason == DenyReason::NetworkDisabled));
}

#[tokio::test]
async fn open_mode_allows_any_name_but_not_special_addresses() {
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let pol = NetworkPolicy {
        mode: NetworkMode::Open,
        hosts: vec![],
        cidrs: vec!["127.0.0.2/32".parse().unwrap()],
    };
    let p = start_proxy(pol, Limits::default()).await;
    let (code, _, _) = http_connect(p.addr, &format!("evil.test:{}", echo.port())).await;
    assert_eq!(
        code, 200,
        "open mode: any name (resolving to an allowed address)"
    );
    let (code, _, _) = http_connect(p.addr, &format!("meta.test:{}", echo.port())).await;
    assert_eq!(code, 403, "but never the metadata address");
    let (code, _, _) = http_connect(p.addr, &format!("loop.test:{}", echo.port())).await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn host_header_fronting_in_plain_http_is_refused() {
    let up = http_server("127.0.0.2:0").await;
    let p = start_proxy(
        policy(&[format!("api.test:{}", up.port())], &["127.0.0.0/8"]),
        Limits::default(),
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        format!(
            "GET http://api.test:{}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
            up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(
        p.handle.denials()[0].reason,
        DenyReason::HostHeaderMismatch {
            host: "evil.test".into()
        }
    );
    // Two Host headers: refused too.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        format!(
            "GET http://api.test:{p}/ HTTP/1.1\r\nHost: api.test:{p}\r\nHost: evil.test\r\n\r\n",
            p = up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(p.guard.connected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn https_absolute_uri_and_junk_are_refused() {
    let p = start_proxy(policy(&["api.test".into()], &[]), Limits::default()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET https://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
    // Garbage first byte: closed, counted as a protocol error.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[0x16, 3, 1, 0, 5]).await.unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    // Malformed HTTP.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET\x01 / HTTP/1.1\r\n\r\n").await.unwrap();
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Oversized head.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let big = format!(
        "GET http://api.test/ HTTP/1.1\r\nX: {}\r\n",
        "a".repeat(70_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let resp = String::from_utf8(read_to_end(&mut s).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // CONNECT without a port.
    let (code, _, _) = http_connect(p.addr, "api.test").await;
    assert_eq!(code, 400);
    // SOCKS4.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    let mut r = [0u8; 8];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[1], 0x5b);
    wait_for(|| p.handle.stats().protocol_errors >= 3).await;
    assert!(p.guard.connected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn handshake_timeout_closes_silent_clients() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let p = start_proxy(NetworkPolicy::default(), limits).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let t = std::time::Instant::now();
    assert!(read_to_end(&mut s).await.is_empty());
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_for(|| p.handle.stats().protocol_errors == 1).await;
}

#[tokio::test]
async fn resolve_and_connect_failures_are_reported() {
    // A port nobody listens on (bind then drop).
    let free = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = start_proxy(
        policy(
            &[
                format!("api.test:{}", free.port()),
                format!("nxdomain.test:{}", free.port()),
            ],
            &["127.0.0.2/32"],
        ),
        Limits::default(),
    )
    .await;
    let (code, _, _) = http_connect(p.addr, &format!("nxdomain.test:{}", free.port())).await;
    assert_eq!(code, 502);
    let (code, _, _) = http_connect(p.addr, &format!("api.test:{}", free.port())).await;
    assert_eq!(code, 502);
    let (rep, _) = socks5(p.addr, Dest::Name("api.test"), free.port(), 1).await;
    assert_eq!(rep, 5);
    let d = p.handle.denials();
    assert!(matches!(d[0].reason, DenyReason::ResolveFailed { .. }));
    assert!(matches!(d[1].reason, DenyReason::ConnectFailed { .. }));
    assert!(!d[1].reason.is_policy());
}

// ---------------------------------------------------------------- API

#[tokio::test]
async fn unix_socket_listener_and_shutdown() {
    let (echo, _) = echo_server("127.0.0.2:0").await;
    let dir = std::env::temp_dir().join(format!("nanoclaw-net-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("proxy.sock");
    let _ = std::fs::remove_file(&path);
    let handle = Proxy::builder(policy(
        &[format!("api.test:{}", echo.port())],
        &["127.0.0.2/32"],
    ))
    .resolver(std::sync::Arc::new(test_names()))
    .connector(std::sync::Arc::new(LoopbackOnly::default()))
    .listen(Listen::Unix(path.clone()))
    .start()
    .await
    .unwrap();
    assert!(path.exists());
    // A second proxy on the same path is a clear error.
    let err = Proxy::start(
        NetworkPolicy::default(),
        Limits::default(),
        Listen::Unix(path.clone()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("remove it"), "{err}");

    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    s.write_all(format!("CONNECT api.test:{} HTTP/1.1\r\n\r\n", echo.port()).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_roundtrip(&mut s, b"over unix socket").await;

    // Shutdown closes the open tunnel and removes the socket file.
    handle.shutdown().await;
    assert!(read_to_end(&mut s).await.is_empty());
    assert!(!path.exists());
    assert!(tokio::net::UnixStream::connect(&path).await.is_err());
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn blocking_proxy_on_its_own_thread() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (echo, _) = rt.block_on(async {
        let e = echo_server("127.0.0.2:0").await;
        (e.0, e.1)
    });
    // Keep the echo server's runtime running in the background.
    let _bg = std::thread::spawn(move || {
        rt.block_on(async { tokio::time::sleep(Duration::from_secs(30)).await })
    });

    let t = std::time::Instant::now();
    let proxy = Proxy::builder(policy(
        &[format!("api.test:{}", echo.port())],
        &["127.0.0.2/32"],
    ))
    .resolver(std::sync::Arc::new(test_names()))
    .listen(Listen::Tcp("127.0.0.1:0".parse().unwrap()))
    .start_blocking()
    .unwrap();
    let startup = t.elapsed();
    assert!(
        startup < Duration::from_millis(50),
        "startup took {startup:?}"
    );
    let addr = proxy.tcp_addr().unwrap();

    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "CONNECT api.test:{} HTTP/1.1\r\n\r\n", echo.port()).unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 Connection established\r\n\r\n");
    s.write_all(b"sync").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"sync");
    let mut s2 = std::net::TcpStream::connect(addr).unwrap();
    s2.write_all(b"CONNECT nope.test:443 HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s2.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"));
    assert_eq!(proxy.denials().len(), 1);
    assert_eq!(proxy.stats().allowed, 1);
    proxy.shutdown();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn start_outside_a_runtime_is_a_clear_error() {
    let err = futures_block_on(Proxy::start(
        NetworkPolicy::default(),
        Limits::default(),
        Listen::Tcp("127.0.0.1:0".parse().unwrap()),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("start_blocking"), "{err}");
}

/// Polls a future to completion without a tokio runtime.
fn futures_block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
