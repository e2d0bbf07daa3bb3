//! Black-box tests of the network policy (issue 5): `--network none`
//! (default), `allowlist` through nanoclaw's proxy, and the escape routes
//! that must stay closed. Upstream servers run on this host's loopback
//! (127.0.0.1); no traffic is sent anywhere else. Each scenario runs as the
//! invoking user and rootless as `nanotest`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A tiny HTTP/1.0 server on 127.0.0.1 answering every request with
/// "hello from upstream", and an echo for CONNECT tunnels (anything that is
/// not an HTTP request line is echoed back). Counts connections.
struct Upstream {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn upstream() -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let port = l.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(match s.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                let mut w = s;
                if first.starts_with("GET ") || first.starts_with("HEAD ") {
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let body = "hello from upstream\n";
                    let _ = write!(
                        w,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                } else {
                    // Echo: the first line, then whatever follows.
                    let _ = w.write_all(first.as_bytes());
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 || w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    Upstream { port, hits }
}

fn run_json(mode: Mode, args: &[&str]) -> Value {
    let mut a = vec!["run", "--json", "--timeout", "20s"];
    a.extend_from_slice(args);
    let o = run(mode, &a);
    let out = text(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!(
            "[{}] nanoclaw {a:?}: no JSON ({e}); exit {:?}; stdout {out}; stderr {}",
            mode.name,
            o.status,
            text(&o.stderr)
        )
    })
}

fn stdout(v: &Value) -> &str {
    v["stdout"].as_str().unwrap_or("")
}

fn denial_kinds(v: &Value) -> Vec<String> {
    v["network"]["denials"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| d["reason"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// curl through the proxy variables nanoclaw sets (also for loopback
/// names, which NO_PROXY would otherwise send direct); prints the status.
fn curl(url: &str) -> String {
    format!("curl --noproxy '' -s -o /dev/null -w '%{{http_code}}' --max-time 10 {url}; echo")
}

#[test]
fn default_is_loopback_only_with_no_proxy() {
    for mode in modes("default_is_loopback_only_with_no_proxy") {
        let up = upstream();
        let v = run_json(
            mode,
            &[
                "--",
                "sh",
                "-c",
                &format!(
                    "env | grep -ci proxy; cat /proc/net/route | wc -l; {}",
                    curl(&format!("http://127.0.0.1:{}/", up.port))
                ),
            ],
        );
        let out = stdout(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&"0"),
            "[{}] proxy variables set: {out}",
            mode.name
        );
        // Only the header line: no route at all.
        assert_eq!(
            lines.get(1),
            Some(&"1"),
            "[{}] routes exist: {out}",
            mode.name
        );
        // The sandbox's 127.0.0.1 is its own: the host's server is not there.
        assert_eq!(
            lines.get(2),
            Some(&"000"),
            "[{}] reached the host: {out}",
            mode.name
        );
        assert_eq!(up.hits.load(Ordering::SeqCst), 0, "[{}]", mode.name);
        assert_eq!(v["network"]["mode"], "none");
    }
}

#[test]
fn allowlisted_destination_is_reached_through_the_proxy() {
    for mode in modes("allowlisted_destination_is_reached_through_the_proxy") {
        let up = upstream();
        let p = up.port.to_string();
        let v = run_json(
            mode,
            &[
                "--allow-host",
                &format!("localhost:{p}"),
                "--allow-cidr",
                &format!("127.0.0.1/32:{p}"),
                "--",
                "sh",
                "-c",
                &format!(
                    "curl --noproxy '' -s --max-time 10 http://localhost:{p}/; {}",
                    // A raw TCP tunnel (CONNECT) to the same destination.
                    format_args!(
                        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',3128)); s.sendall(b'CONNECT localhost:{p} HTTP/1.1\\r\\nHost: localhost:{p}\\r\\n\\r\\n'); h=s.recv(200); s.sendall(b'ping\\n'); import time; time.sleep(0.3); print(h.split(b' ')[1].decode(), s.recv(100).decode().strip())\""
                    )
                ),
            ],
        );
        let out = stdout(&v);
        assert!(
            out.contains("hello from upstream"),
            "[{}] HTTP through the proxy failed: {v}",
            mode.name
        );
        assert!(
            out.contains("200 ping"),
            "[{}] CONNECT tunnel failed: {v}",
            mode.name
        );
        assert_eq!(v["network"]["mode"], "allowlist");
        assert!(v["network"]["allowed"].as_u64().unwrap_or(0) >= 2, "{v}");
        assert!(v["network"]["bytes_down"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(up.hits.load(Ordering::SeqCst) >= 2);
    }
}

#[test]
fn refusals_are_enforced_and_reported() {
    for mode in modes("refusals_are_enforced_and_reported") {
        let up = upstream();
        let p = up.port;
        let other = p.wrapping_add(1).max(1024);
        let v = run_json(
            mode,
            &[
                // localhost is listed but resolves to loopback, which is not
                // allowed by any CIDR rule here.
                "--allow-host",
                &format!("localhost:{p}"),
                "--allow-host",
                &format!("api.example.test:{p}"),
                // Everything public, which must still exclude metadata.
                "--allow-cidr",
                "0.0.0.0/0:80",
                "--",
                "sh",
                "-c",
                &[
                    curl("http://not-listed.example.test/"),
                    curl(&format!("http://api.example.test:{other}/")),
                    curl(&format!("http://localhost:{p}/")),
                    curl("http://169.254.169.254/latest/meta-data/"),
                    curl(&format!("http://127.0.0.1:{p}/")),
                ]
                .join(";"),
            ],
        );
        let codes: Vec<&str> = stdout(&v).lines().collect();
        assert_eq!(codes.len(), 5, "[{}] {v}", mode.name);
        for (i, c) in codes.iter().enumerate() {
            assert!(
                *c == "403" || *c == "000",
                "[{}] request {i} was not refused ({c}): {v}",
                mode.name
            );
        }
        let kinds = denial_kinds(&v);
        for want in ["host_not_allowed", "port_not_allowed", "special_address"] {
            assert!(
                kinds.iter().any(|k| k == want),
                "[{}] no {want} denial in {kinds:?}: {v}",
                mode.name
            );
        }
        assert!(v["network"]["denied"].as_u64().unwrap_or(0) >= 5, "{v}");
        // The metadata address is refused although 0.0.0.0/0:80 is allowed.
        assert!(
            v["network"]["denials"].as_array().is_some_and(|a| {
                a.iter().any(|d| {
                    d["destination"] == "169.254.169.254" && d["reason"] == "special_address"
                })
            }),
            "[{}] {v}",
            mode.name
        );
        assert_eq!(
            up.hits.load(Ordering::SeqCst),
            0,
            "[{}] a refused request reached the upstream",
            mode.name
        );
    }
}

#[test]
fn bypassing_the_proxy_fails() {
    for mode in modes("bypassing_the_proxy_fails") {
        let up = upstream();
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        udp.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let uport = udp.local_addr().expect("addr").port();
        let p = up.port;
        let script = format!(
            r#"
import socket, errno
out = []
# direct TCP to the allowed upstream, ignoring the proxy
try:
    socket.create_connection(("127.0.0.1", {p}), timeout=2); out.append("tcp-direct:CONNECTED")
except OSError as e: out.append("tcp-direct:" + errno.errorcode.get(e.errno, str(e.errno)))
# UDP to the host's UDP socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", ("127.0.0.1", {uport})); out.append("udp-sent-locally")
except OSError as e: out.append("udp:" + errno.errorcode.get(e.errno, str(e.errno)))
# raw and packet sockets
for name, fam, typ, proto in [("raw", socket.AF_INET, socket.SOCK_RAW, 1), ("packet", 17, socket.SOCK_RAW, 0)]:
    try:
        socket.socket(fam, typ, proto); out.append(name + ":OPENED")
    except OSError as e: out.append(name + ":" + errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(out))
"#
        );
        let v = run_json(
            mode,
            &[
                "--allow-host",
                &format!("localhost:{p}"),
                "--allow-cidr",
                &format!("127.0.0.1/32:{p}"),
                "--",
                "python3",
                "-c",
                &script,
            ],
        );
        let out = stdout(&v);
        assert!(
            out.contains("tcp-direct:ECONNREFUSED"),
            "[{}] {v}",
            mode.name
        );
        assert!(out.contains("raw:EPERM"), "[{}] {v}", mode.name);
        assert!(out.contains("packet:EPERM"), "[{}] {v}", mode.name);
        let mut b = [0u8; 8];
        assert!(
            udp.recv_from(&mut b).is_err(),
            "[{}] a UDP datagram from the sandbox reached the host",
            mode.name
        );
        assert_eq!(up.hits.load(Ordering::SeqCst), 0, "[{}]", mode.name);
    }
}

#[test]
fn bad_network_flags_are_one_clear_error() {
    for mode in modes("bad_network_flags_are_one_clear_error") {
        for args in [
            vec!["run", "--allow-host", "*", "--", "true"],
            vec!["run", "--allow-cidr", "10.0.0.1/8", "--", "true"],
            vec![
                "run",
                "--network",
                "none",
                "--allow-host",
                "a.example",
                "--",
                "true",
            ],
            vec!["run", "--network", "allowlist", "--", "true"],
            vec!["run", "--network", "bogus", "--", "true"],
        ] {
            let o = run(mode, &args);
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{}] {args:?}: {err}", mode.name);
            assert_eq!(
                err.trim().lines().count(),
                1,
                "[{}] {args:?}: {err}",
                mode.name
            );
        }
    }
}

#[test]
fn kernel_mode_enforces_the_allowlist_in_the_kernel() {
    for mode in modes("kernel_mode_enforces_the_allowlist_in_the_kernel") {
        if mode.user.is_some() || !is_root() {
            // Rootless: one clear error saying it needs root.
            let o = run(
                mode,
                &[
                    "run",
                    "--network",
                    "kernel",
                    "--allow-cidr",
                    "10.0.0.0/8",
                    "--",
                    "true",
                ],
            );
            let err = text(&o.stderr);
            assert_eq!(code(&o), 125, "[{}] {err}", mode.name);
            assert!(err.contains("needs root"), "[{}] {err}", mode.name);
            continue;
        }
        // Two servers on the host (all addresses); only the first is allowed.
        // The sandbox reaches the host through its veth gateway, an address
        // of this machine in nanoclaw's pool 100.96.0.0/12.
        let allowed = TcpListener::bind("0.0.0.0:0").expect("bind");
        let other = TcpListener::bind("0.0.0.0:0").expect("bind");
        let (pa, po) = (
            allowed.local_addr().expect("addr").port(),
            other.local_addr().expect("addr").port(),
        );
        let hits = Arc::new(AtomicUsize::new(0));
        for l in [allowed, other] {
            let h = hits.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut s = s;
                    let _ = s.write_all(b"hello-from-host\n");
                }
            });
        }
        let script = format!(
            r#"
import socket
gw = None
for l in open("/proc/net/route").read().splitlines()[1:]:
    f = l.split()
    if f[1] == "00000000":
        gw = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
out = ["gw=" + str(gw)]
for p in ({pa}, {po}):
    try:
        s = socket.create_connection((gw, p), timeout=2)
        out.append("%d:%s" % (p, s.recv(100).decode().strip()))
    except OSError as e:
        out.append("%d:refused" % p)
print(" ".join(out))
"#
        );
        let v = run_json(
            mode,
            &[
                "--network",
                "kernel",
                "--allow-cidr",
                &format!("100.96.0.0/12:{pa}"),
                "--",
                "python3",
                "-c",
                &script,
            ],
        );
        let out = stdout(&v);
        assert!(
            out.contains("gw=100."),
            "[{}] no veth route: {v}",
            mode.name
        );
        assert!(
            out.contains(&format!("{pa}:hello-from-host")),
            "[{}] the allowed destination was not reached: {v}",
            mode.name
        );
        assert!(
            out.contains(&format!("{po}:refused")),
            "[{}] a destination outside the allowlist was reached: {v}",
            mode.name
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "[{}] {v}", mode.name);
        assert_eq!(v["network"]["mode"], "kernel");
        // Nothing left behind: no veth, no nftables table.
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip");
        assert!(!text(&links.stdout).contains("ncl-"), "veth left behind");
        if let Ok(t) = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
        {
            assert!(
                !text(&t.stdout).contains("nanoclaw_"),
                "nftables table left behind"
            );
        }
    }
}
