//! Kernel-enforced egress against the real kernel (root only; skipped with a
//! message otherwise).
//!
//! The "internet" is a network namespace the test creates (`ip netns add`),
//! joined to the host by its own veth (198.18.7.1 on the host, 198.18.7.2
//! and 198.18.7.3 inside, plus 169.254.169.254 on its loopback), running TCP
//! servers on 8080 and 8081 and UDP echoes on 8080, 5353 and 53. The
//! "sandbox" is `unshare --net sleep`. A policy-routing rule sends every
//! packet arriving from the sandbox's link to table 4242, which routes only
//! to the test namespace and blackholes the rest: even with a broken
//! filter, nothing the sandbox sends can leave for a real network.
//!
//! Every refusal is paired with a run where a rule allows the same path and
//! it works, so a refusal cannot pass by accident (a path that never
//! worked).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nanoclaw_net::kernel::{CidrPortRule, KernelEgress, KernelEgressConfig, KernelError, Proto};
use nanoclaw_net::Cidr;

static SERIAL: Mutex<()> = Mutex::new(());

const UPLINK_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const INET: &str = "198.18.7.2";
const OTHER: &str = "198.18.7.3";
const METADATA: &str = "169.254.169.254";
const TABLE: &str = "4242";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: kernel egress tests need root (veth, nftables, netns)");
            return;
        }
    };
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn cidr(s: &str) -> Cidr {
    let (a, p) = s.split_once('/').unwrap();
    Cidr::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
}

fn tcp(s: &str, port: Option<u16>) -> CidrPortRule {
    CidrPortRule::tcp(cidr(s), port)
}

fn udp(s: &str, port: Option<u16>) -> CidrPortRule {
    CidrPortRule::udp(cidr(s), port)
}

const SERVER: &str = r#"
import socket, threading, time
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port)); s.listen(64)
    while True:
        c, a = s.accept()
        try:
            c.sendall(('tcp%d %s\n' % (port, c.getsockname()[0])).encode()); c.close()
        except Exception:
            pass
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', port))
    while True:
        d, a = s.recvfrom(100); s.sendto(('udp%d' % port).encode(), a)
for p in (8080, 8081):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
for p in (8080, 5353, 53):
    threading.Thread(target=udp, args=(p,), daemon=True).start()
time.sleep(0.2)
print('ready', flush=True)
while True:
    time.sleep(60)
"#;

/// In the sandbox: TCP on 9000, and a UDP sink on 9001 that reports the
/// source of every datagram (one-way traffic needs no reply to arrive).
const SANDBOX_SERVER: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 9000)); s.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 9001))
def sink():
    while True:
        d, a = u.recvfrom(100); print('udp from ' + a[0], flush=True)
threading.Thread(target=sink, daemon=True).start()
print('ready', flush=True)
while True:
    c, a = s.accept(); c.sendall(b'sandbox\n'); c.close()
"#;

const PROBE: &str = r#"
import json, socket, sys, threading
probes = json.loads(sys.argv[1]); res = [None] * len(probes)
def run(i, p):
    kind, host, port = p
    try:
        if kind == 'tcp':
            s = socket.create_connection((host, port), timeout=1.5); s.settimeout(1.5)
            d = s.recv(100); s.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
            s.sendto(b'ping', (host, port)); d, _ = s.recvfrom(100)
        res[i] = 'ok:' + d.decode().strip()
    except Exception as e:
        res[i] = 'err:' + type(e).__name__ + ':' + str(e)
ts = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(res))
"#;

/// The test "internet": a namespace with servers, its veth, and the
/// confinement routing for sandbox links.
struct World {
    _lock: std::fs::File,
    ns: String,
    uplink: String,
    server: Child,
    confined: Vec<String>,
}

impl World {
    fn new() -> World {
        let pid = std::process::id();
        let ns = format!("ncltest-{pid}");
        let uplink = format!("nclti{}", pid % 1_000_000);
        // One world at a time on this host, across test processes too.
        let lock = std::fs::File::create("/run/nanoclaw-kernel-egress-test.lock").unwrap();
        fs_flock(&lock);
        // Leftovers of an earlier, killed run: its namespace (and the
        // processes in it), its uplink, its confinement routing, and any
        // kernel egress state its sandboxes left.
        let _ = sh(&["ip", "rule", "del", "pref", TABLE]);
        let _ = sh(&["ip", "route", "flush", "table", TABLE]);
        let names = String::from_utf8_lossy(&sh(&["ip", "netns", "list"]).stdout).into_owned();
        for old in names
            .split_whitespace()
            .filter(|n| n.starts_with("ncltest-"))
        {
            let pids =
                String::from_utf8_lossy(&sh(&["ip", "netns", "pids", old]).stdout).into_owned();
            for p in pids.split_whitespace() {
                let _ = sh(&["kill", "-9", p]);
            }
            let _ = sh(&["ip", "netns", "del", old]);
        }
        let links = String::from_utf8_lossy(&sh(&["ip", "-o", "link", "show"]).stdout).into_owned();
        for l in links.lines() {
            if let Some(name) = l.split(": ").nth(1).and_then(|n| n.split('@').next()) {
                if name.starts_with("nclti") {
                    let _ = sh(&["ip", "link", "del", name]);
                }
            }
        }
        KernelEgress::cleanup_stale().unwrap();
        must(&["ip", "netns", "add", &ns]);
        must(&[
            "ip", "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        must(&["ip", "addr", "add", "198.18.7.1/24", "dev", &uplink]);
        must(&["ip", "link", "set", &uplink, "up"]);
        // Start from "not forwarding" so that the library has to turn it on
        // (and restore it).
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{uplink}/forwarding"), "0").unwrap();
        let inns = |args: &[&str]| {
            let mut v = vec!["ip", "-n", &ns];
            v.extend_from_slice(args);
            must(&v);
        };
        inns(&["addr", "add", "198.18.7.2/24", "dev", "eth0"]);
        inns(&["addr", "add", "198.18.7.3/24", "dev", "eth0"]);
        inns(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        inns(&["link", "set", "lo", "up"]);
        inns(&["link", "set", "eth0", "up"]);
        // So that the test internet could open connections to sandboxes
        // through the host, were it not for the rules.
        inns(&["route", "add", "100.96.0.0/12", "via", "198.18.7.1"]);
        must(&[
            "ip",
            "route",
            "add",
            "198.18.7.0/24",
            "dev",
            &uplink,
            "table",
            TABLE,
        ]);
        must(&[
            "ip",
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            INET,
            "dev",
            &uplink,
            "table",
            TABLE,
        ]);
        must(&["ip", "route", "add", "blackhole", "default", "table", TABLE]);
        let mut server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        World {
            _lock: lock,
            ns,
            uplink,
            server,
            confined: Vec::new(),
        }
    }

    /// Routes everything arriving on `ifname` through the confinement table.
    fn confine(&mut self, ifname: &str) {
        must(&[
            "ip", "rule", "add", "iif", ifname, "lookup", TABLE, "pref", TABLE,
        ]);
        self.confined.push(ifname.to_string());
    }

    fn uplink_forwarding(&self) -> String {
        std::fs::read_to_string(format!(
            "/proc/sys/net/ipv4/conf/{}/forwarding",
            self.uplink
        ))
        .unwrap()
        .trim()
        .to_string()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for ifname in &self.confined {
            let _ = sh(&["ip", "rule", "del", "iif", ifname, "lookup", TABLE]);
        }
        let _ = sh(&["ip", "route", "flush", "table", TABLE]);
        let _ = sh(&["ip", "link", "del", &self.uplink]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// Blocks until this process holds an exclusive lock on `f`.
fn fs_flock(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open file; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
}

/// Kills a child process when dropped (also on a failed assertion).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process in its own, fresh network namespace.
struct Sandbox {
    child: Child,
}

impl Sandbox {
    fn new() -> Sandbox {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let path = format!("/proc/{}/ns/net", child.id());
        let start = Instant::now();
        while std::fs::read_link(&path).ok().as_ref() == Some(&own)
            || !std::path::Path::new(&path).exists()
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "unshare did not happen"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Sandbox { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Runs the probes inside the sandbox's namespace, concurrently.
    fn probe(&self, probes: &[(&str, &str, u16)]) -> Vec<String> {
        let json = serde_json::to_string(probes).unwrap();
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .args(["python3", "-c", PROBE, &json])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn in_ns(&self, args: &[&str]) -> std::process::Output {
        let mut v = vec![
            "nsenter".to_string(),
            format!("--net=/proc/{}/ns/net", self.pid()),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        sh(&v)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listener on the host, on every address (0.0.0.0).
fn host_listener() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"host\n");
        }
    });
    port
}

fn link_exists(name: &str) -> bool {
    sh(&["ip", "link", "show", "dev", name]).status.success()
}

fn table_exists(name: &str) -> bool {
    sh(&["nft", "list", "table", "inet", name]).status.success()
}

fn assert_gone(world: &World, id: &str) {
    assert!(
        !link_exists(&format!("ncl-{id}")),
        "link ncl-{id} left behind"
    );
    assert!(
        !table_exists(&format!("nanoclaw_{id}")),
        "table nanoclaw_{id} left behind"
    );
    assert_eq!(
        world.uplink_forwarding(),
        "0",
        "uplink forwarding not restored"
    );
    assert!(
        !std::path::Path::new(&format!("/run/nanoclaw/net/fwd/{}", world.uplink)).exists(),
        "forwarding holder state left behind"
    );
}

fn cfg(
    sb: &Sandbox,
    id: &str,
    allow: Vec<CidrPortRule>,
    dns: Option<IpAddr>,
) -> KernelEgressConfig {
    KernelEgressConfig {
        sandbox_pid: sb.pid(),
        id: id.to_string(),
        allow,
        allow_dns_to: dns,
    }
}

fn test_id(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

#[test]
fn kernel_egress_enforces_the_allowlist() {
    require_root!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = test_id("t");
    let mut world = World::new();
    world.confine(&format!("ncl-{id}"));
    let sb = Sandbox::new();
    let hp = host_listener();
    let up = UPLINK_HOST.to_string();
    let pool = "100.96.0.0/12";

    // Every probe, labelled.
    let probes = |host_ip: &str| -> Vec<(&'static str, String, u16)> {
        vec![
            ("tcp", INET.into(), 8080),
            ("tcp", INET.into(), 8081),
            ("tcp", OTHER.into(), 8080),
            ("udp", INET.into(), 8080),
            ("udp", INET.into(), 5353),
            ("udp", INET.into(), 53),
            ("tcp", METADATA.into(), 8080),
            ("tcp", up.clone(), hp),
            ("tcp", host_ip.to_string(), hp),
        ]
    };
    let run = |eg: &KernelEgress| -> Vec<String> {
        let p = probes(&eg.host_ip().to_string());
        let p: Vec<(&str, &str, u16)> = p
            .iter()
            .map(|(k, h, port)| (*k, h.as_str(), *port))
            .collect();
        sb.probe(&p)
    };
    let ok = |r: &str| r.starts_with("ok:");

    // 1. Control: a rule for every path, and every path works (the server
    //    and the host listener answer, through masquerade and forwarding).
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![
            tcp(&format!("{INET}/32"), Some(8080)),
            tcp(&format!("{INET}/32"), Some(8081)),
            tcp(&format!("{OTHER}/32"), Some(8080)),
            udp(&format!("{INET}/32"), Some(8080)),
            udp(&format!("{INET}/32"), Some(5353)),
            tcp(&format!("{METADATA}/32"), Some(8080)),
            tcp(&format!("{up}/32"), Some(hp)),
            tcp(pool, Some(hp)),
        ],
        Some(INET.parse().unwrap()),
    ))
    .unwrap();
    assert_eq!(u32::from(eg.host_ip()) + 1, u32::from(eg.sandbox_ip()));
    assert!(link_exists(eg.host_ifname()));
    assert!(table_exists(eg.table_name()));
    assert_eq!(
        world.uplink_forwarding(),
        "1",
        "uplink forwarding not enabled"
    );
    assert_eq!(eg.uplinks(), vec![world.uplink.clone()]);
    let eth0 = String::from_utf8_lossy(
        &sb.in_ns(&["ip", "-o", "addr", "show", "dev", "eth0"])
            .stdout,
    )
    .into_owned();
    assert!(eth0.contains(&format!("{}/30", eg.sandbox_ip())), "{eth0}");
    assert!(
        !eth0.contains("inet6"),
        "the sandbox's eth0 has an IPv6 address: {eth0}"
    );
    let r = run(&eg);
    eprintln!("control: {r:?}");
    assert!(
        r.iter().all(|x| ok(x)),
        "a path does not work even with its rule: {r:?}\n{}",
        eg.ruleset_text()
    );
    assert_eq!(r[0], format!("ok:tcp8080 {INET}"));
    assert_eq!(r[2], format!("ok:tcp8080 {OTHER}"));
    assert_eq!(r[5], "ok:udp53");
    assert_eq!(r[6], format!("ok:tcp8080 {METADATA}"));
    assert_eq!(r[7], "ok:host");
    assert_eq!(r[8], "ok:host");
    eg.teardown().unwrap();
    assert_gone(&world, &id);
    // The sandbox lost its link with it.
    assert!(!sb.in_ns(&["ip", "link", "show", "eth0"]).status.success());

    // 2. The policy: TCP to INET:8080 only. Everything else is refused:
    //    another port, another host, UDP (to the same port too), DNS, the
    //    metadata address, the host on every address. TCP gets a reset at
    //    once; these UDP sockets are not connected, so the ICMP error does
    //    not reach them and they wait (see refused_connections_fail_fast).
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![tcp(&format!("{INET}/32"), Some(8080))],
        None,
    ))
    .unwrap();
    let r = run(&eg);
    eprintln!("policy: {r:?}");
    assert_eq!(r[0], format!("ok:tcp8080 {INET}"), "{r:?}");
    for (i, what) in [
        (1, "same host, other port"),
        (2, "other host"),
        (3, "UDP to the allowed port"),
        (4, "UDP elsewhere"),
        (5, "DNS"),
        (6, "metadata 169.254.169.254"),
        (7, "host's uplink address"),
        (8, "host's link address"),
    ] {
        assert!(!ok(&r[i]), "{what} reachable: {}", r[i]);
        let expected = if probes("")[i].0 == "tcp" {
            "ConnectionRefusedError"
        } else {
            "TimeoutError"
        };
        assert!(
            r[i].contains(expected),
            "{what}: expected {expected}, got {}",
            r[i]
        );
    }

    // Inbound: the host may connect to a service in the sandbox; the test
    // internet, routed through the (forwarding) host, may not.
    let mut listener = KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", sb.pid()))
            .args(["python3", "-c", SANDBOX_SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = {
        let out = listener.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    };
    assert_eq!(lines.recv_timeout(Duration::from_secs(5)).unwrap(), "ready");
    let target = std::net::SocketAddr::from((eg.sandbox_ip(), 9000));
    let from_host = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2));
    assert!(
        from_host.is_ok(),
        "the host cannot reach the sandbox: {from_host:?}"
    );
    let from_inet = Command::new("ip")
        .args(["netns", "exec", &world.ns, "python3", "-c", PROBE])
        .arg(format!("[[\"tcp\", \"{}\", 9000]]", eg.sandbox_ip()))
        .output()
        .unwrap();
    let from_inet = String::from_utf8_lossy(&from_inet.stdout).into_owned();
    // Silently: what comes from outside gets no answer.
    assert!(
        from_inet.contains("TimeoutError"),
        "the outside reached into the sandbox: {from_inet}"
    );
    // One-way UDP: from the host it arrives, from outside it must not.
    let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    u.send_to(b"x", (eg.sandbox_ip(), 9001)).unwrap();
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(2)).unwrap(),
        format!("udp from {}", eg.host_ip())
    );
    must(&[
        "ip",
        "netns",
        "exec",
        &world.ns,
        "python3",
        "-c",
        &format!(
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             [s.sendto(b'x', ('{}', 9001)) for _ in range(3)]",
            eg.sandbox_ip()
        ),
    ]);
    let got = lines.recv_timeout(Duration::from_secs(1));
    assert!(
        got.is_err(),
        "one-way UDP from outside reached the sandbox: {got:?}"
    );
    drop(listener);
    eg.teardown().unwrap();
    assert_gone(&world, &id);

    // 3. A catch-all rule opens public addresses only: special-purpose
    //    ranges (the test hosts, metadata) and the host stay closed. (For a
    //    /0 rule the library enables forwarding on the default route's
    //    interfaces only; the test turns it on for its own uplink so that
    //    only the rules can refuse.)
    let fwd = format!("/proc/sys/net/ipv4/conf/{}/forwarding", world.uplink);
    std::fs::write(&fwd, "1").unwrap();
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![CidrPortRule {
            cidr: cidr("0.0.0.0/0"),
            port: None,
            proto: Proto::Any,
        }],
        None,
    ))
    .unwrap();
    let r = run(&eg);
    eprintln!("catch-all: {r:?}");
    assert!(
        r.iter().all(|x| !ok(x)),
        "a catch-all rule opened a special range or the host: {r:?}"
    );
    eg.teardown().unwrap();
    std::fs::write(&fwd, "0").unwrap();

    // 4. DNS only: UDP and TCP 53 to the resolver, nothing else.
    let eg = KernelEgress::setup(&cfg(&sb, &id, vec![], Some(INET.parse().unwrap()))).unwrap();
    let r = run(&eg);
    eprintln!("dns only: {r:?}");
    assert_eq!(r[5], "ok:udp53");
    assert!(r.iter().enumerate().all(|(i, x)| i == 5 || !ok(x)), "{r:?}");
    // Setup applies no change to the sandbox's other interfaces, and its
    // loopback stays its own.
    drop(eg); // drop tears down too
    assert_gone(&world, &id);
}

/// Like [`PROBE`], but reports how long each probe took and the errno it
/// failed with; UDP sockets are connected, so that an ICMP error reaches
/// them. The timeout (5 s) is far above what a refusal may take.
const TIMED_PROBE: &str = r#"
import errno, json, socket, sys, threading, time
probes = json.loads(sys.argv[1]); res = [None] * len(probes)
def run(i, p):
    kind, host, port = p
    t = time.monotonic()
    try:
        if kind == 'tcp':
            s = socket.create_connection((host, port), timeout=5); s.settimeout(5)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
            s.connect((host, port)); s.send(b'ping')
        d = s.recv(100); s.close()
        r = 'ok:' + d.decode().strip()
    except OSError as e:
        r = 'err:' + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
    res[i] = [r, int((time.monotonic() - t) * 1000)]
ts = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(res))
"#;

/// A UDP echo on the host, on `addr` (its replies come from the address
/// a connected client expects only if it is bound to that address).
fn host_udp_echo(addr: Ipv4Addr) -> u16 {
    let u = std::net::UdpSocket::bind((addr, 0)).unwrap();
    let port = u.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(b"hostudp", from);
        }
    });
    port
}

/// A connection the rules refuse fails at once (a TCP reset, or an ICMP
/// error for UDP), in the forward chain (a special-purpose destination:
/// the metadata address, another port of an allowed host) and in the input
/// chain (the host's own addresses); before, the packets were dropped and
/// the program waited for its timeout.
#[test]
fn refused_connections_fail_fast() {
    require_root!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = test_id("r");
    let mut world = World::new();
    world.confine(&format!("ncl-{id}"));
    let sb = Sandbox::new();
    let hp = host_listener();
    // Replies from a socket on 0.0.0.0 leave from the address of the route
    // back (the link address), so the uplink address gets its own echo.
    let (hu_up, hu) = (
        host_udp_echo(UPLINK_HOST),
        host_udp_echo(Ipv4Addr::UNSPECIFIED),
    );
    let up = UPLINK_HOST.to_string();
    let probes = |host_ip: &str| -> Vec<(&'static str, String, u16)> {
        vec![
            ("tcp", INET.into(), 8080),
            ("tcp", METADATA.into(), 8080),
            ("tcp", INET.into(), 8081),
            ("tcp", up.clone(), hp),
            ("tcp", host_ip.to_string(), hp),
            ("udp", INET.into(), 5353),
            ("udp", up.clone(), hu_up),
            ("udp", host_ip.to_string(), hu),
        ]
    };
    let run = |eg: &KernelEgress| -> Vec<(String, u64)> {
        let p = probes(&eg.host_ip().to_string());
        let json = serde_json::to_string(&p).unwrap();
        let out = sb.in_ns(&["python3", "-c", TIMED_PROBE, &json]);
        assert!(
            out.status.success(),
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // Control: with a rule for each path, every path works (so a refusal
    // below comes from the rules, not from a path that never worked).
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![
            tcp(&format!("{INET}/32"), Some(8080)),
            tcp(&format!("{METADATA}/32"), Some(8080)),
            tcp(&format!("{INET}/32"), Some(8081)),
            tcp(&format!("{up}/32"), Some(hp)),
            tcp("100.96.0.0/12", Some(hp)),
            udp(&format!("{INET}/32"), Some(5353)),
            udp(&format!("{up}/32"), Some(hu_up)),
            udp("100.96.0.0/12", Some(hu)),
        ],
        None,
    ))
    .unwrap();
    let r = run(&eg);
    eprintln!("control: {r:?}");
    assert!(
        r.iter().all(|(x, _)| x.starts_with("ok:")),
        "a path does not work even with its rule: {r:?}\n{}",
        eg.ruleset_text()
    );
    eg.teardown().unwrap();
    assert_gone(&world, &id);

    // Only TCP to INET:8080: every other path is refused, at once.
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![tcp(&format!("{INET}/32"), Some(8080))],
        None,
    ))
    .unwrap();
    let t = Instant::now();
    let r = run(&eg);
    eprintln!("refused (whole probe run {:?}): {r:?}", t.elapsed());
    assert_eq!(r[0].0, format!("ok:tcp8080 {INET}"), "{r:?}");
    for (i, what) in [
        (1, "TCP to metadata 169.254.169.254"),
        (2, "TCP to the allowed host, other port"),
        (3, "TCP to the host's uplink address"),
        (4, "TCP to the host's link address"),
        (5, "UDP to a special-purpose address"),
        (6, "UDP to the host's uplink address"),
        (7, "UDP to the host's link address"),
    ] {
        let (res, ms) = &r[i];
        assert!(
            ["err:ECONNREFUSED", "err:EHOSTUNREACH", "err:EACCES"].contains(&res.as_str()),
            "{what}: expected an immediate refusal, got {res} after {ms} ms\n{}",
            eg.ruleset_text()
        );
        assert!(*ms < 2000, "{what}: the refusal took {ms} ms");
    }
    // The refusal happens on the host: the metadata block is rejected in
    // the forward chain (nothing is forwarded, whatever the routes say).
    let listed =
        String::from_utf8_lossy(&sh(&["nft", "list", "table", "inet", eg.table_name()]).stdout)
            .into_owned();
    assert!(
        listed.lines().any(|l| l.contains("169.254.0.0/16")
            && l.contains("tcp")
            && l.contains("reject with tcp reset")),
        "no TCP reset for the metadata block in the kernel's table:\n{listed}"
    );
    eg.teardown().unwrap();
    assert_gone(&world, &id);
}

#[test]
fn kernel_egress_is_send() {
    fn send<T: Send>() {}
    send::<KernelEgress>();
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    require_root!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = test_id("f");
    let mut world = World::new();
    world.confine(&format!("ncl-{id}"));
    let sb = Sandbox::new();
    // The sandbox already has an eth0: the veth cannot be created, after
    // the slot was taken and the table was made.
    let o = sb.in_ns(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![tcp(&format!("{INET}/32"), Some(8080))],
        None,
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("creating veth") && msg.contains("exists"),
        "{msg}"
    );
    assert_gone(&world, &id);
    // The slot is free again: a good setup right after works and gets it.
    let o = sb.in_ns(&["ip", "link", "del", "eth0"]);
    assert!(o.status.success());
    let eg = KernelEgress::setup(&cfg(
        &sb,
        &id,
        vec![tcp(&format!("{INET}/32"), Some(8080))],
        None,
    ))
    .unwrap();
    let r = sb.probe(&[("tcp", INET, 8080)]);
    assert_eq!(r[0], format!("ok:tcp8080 {INET}"));
    eg.teardown().unwrap();
    assert_gone(&world, &id);
}

#[test]
fn bad_inputs_are_clear_errors() {
    require_root!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = KernelEgressConfig {
        sandbox_pid: std::process::id() as i32,
        id: "x".into(),
        allow: vec![],
        allow_dns_to: None,
    };
    let e = KernelEgress::setup(&me).unwrap_err();
    assert!(matches!(e, KernelError::HostNetns { .. }), "{e}");
    let gone = KernelEgressConfig {
        sandbox_pid: i32::MAX,
        ..me.clone()
    };
    let e = KernelEgress::setup(&gone).unwrap_err();
    assert!(e.to_string().contains("still running"), "{e}");
    let sb = Sandbox::new();
    let long = KernelEgressConfig {
        sandbox_pid: sb.pid(),
        id: "much-too-long-id".into(),
        ..me.clone()
    };
    let e = KernelEgress::setup(&long).unwrap_err();
    assert!(e.to_string().contains("15"), "{e}");
    let v6 = KernelEgressConfig {
        sandbox_pid: sb.pid(),
        allow: vec![tcp("2001:db8::/32", None)],
        ..me
    };
    let e = KernelEgress::setup(&v6).unwrap_err();
    assert!(e.to_string().contains("IPv4-only"), "{e}");
    assert!(!link_exists("ncl-x"));
}

/// Re-runs this test binary as `nobody`, where setup must refuse clearly.
#[test]
fn not_root_gets_a_clear_error() {
    if std::env::var_os("NCL_KERNEL_NONROOT_CHILD").is_some() {
        assert!(!is_root());
        let e = KernelEgress::setup(&KernelEgressConfig {
            sandbox_pid: 1,
            id: "x".into(),
            allow: vec![],
            allow_dns_to: None,
        })
        .unwrap_err();
        assert!(matches!(e, KernelError::NotRoot));
        assert!(e.to_string().contains("run nanoclaw as root"), "{e}");
        return;
    }
    require_root!();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["--exact", "not_root_gets_a_clear_error", "--nocapture"])
        .env("NCL_KERNEL_NONROOT_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied") {
        eprintln!("SKIPPED: nobody cannot execute {}", exe.display());
        return;
    }
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let us = |d: Duration| d.as_micros();
    format!(
        "min {}µs  median {}µs  p90 {}µs  max {}µs",
        us(v[0]),
        us(v[v.len() / 2]),
        us(v[v.len() * 9 / 10]),
        us(v[v.len() - 1])
    )
}

/// Setup and teardown time (printed; run with `--nocapture`), with two
/// sandboxes alive at once so that slots, holders and tables coexist.
#[test]
fn setup_and_teardown_are_fast() {
    require_root!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a_id, b_id) = (test_id("a"), test_id("b"));
    let mut world = World::new();
    world.confine(&format!("ncl-{a_id}"));
    world.confine(&format!("ncl-{b_id}"));
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let allow = || {
        vec![
            tcp(&format!("{INET}/32"), Some(8080)),
            tcp("203.0.113.0/24", Some(443)),
            udp(&format!("{INET}/32"), Some(5353)),
        ]
    };
    let mut setups = Vec::new();
    let mut teardowns = Vec::new();
    let mut background = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        let ea = KernelEgress::setup(&cfg(&a, &a_id, allow(), None)).unwrap();
        setups.push(t.elapsed());
        let eb = KernelEgress::setup(&cfg(&b, &b_id, allow(), None)).unwrap();
        assert_ne!(ea.sandbox_ip(), eb.sandbox_ip());
        assert_eq!(world.uplink_forwarding(), "1");
        let t = Instant::now();
        ea.teardown().unwrap();
        teardowns.push(t.elapsed());
        // b still holds the uplink's forwarding.
        assert_eq!(world.uplink_forwarding(), "1");
        if i % 2 == 0 {
            eb.teardown().unwrap();
        } else {
            let t = Instant::now();
            let h = eb.teardown_in_background();
            background.push(t.elapsed());
            h.join().unwrap().unwrap();
        }
    }
    assert_gone(&world, &a_id);
    assert_gone(&world, &b_id);
    eprintln!("kernel egress setup:    {}", stats(setups.clone()));
    eprintln!("kernel egress teardown: {}", stats(teardowns.clone()));
    eprintln!(
        "kernel egress teardown_in_background returns: {}",
        stats(background)
    );
    setups.sort();
    assert!(
        setups[setups.len() / 2] < Duration::from_millis(50),
        "setup is slow: {setups:?}"
    );
}
