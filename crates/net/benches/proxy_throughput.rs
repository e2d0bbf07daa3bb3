//! Side-by-side benchmark: a direct loopback TCP connection vs the same
//! through the proxy (HTTP CONNECT to a name the proxy resolves and checks),
//! for bulk throughput and for the latency of a new connection (connect +
//! 1-byte round trip). Also the proxy's start-up time.
//!
//! Run: `cargo bench -p nanoclaw-net --bench proxy_throughput`
//! (env `NANOCLAW_BENCH_BYTES`, default 1 GiB per throughput run).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_net::{Limits, Listen, NetworkPolicy, Proxy, StaticResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn servers(rt: &tokio::runtime::Runtime) -> (SocketAddr, SocketAddr) {
    rt.block_on(async {
        // Sink: counts bytes until EOF, answers with the count.
        let sink = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let sink_addr = sink.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                });
            }
        });
        // Echo.
        let echo = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let echo_addr = echo.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (sink_addr, echo_addr)
    })
}

/// Opens a connection to `target`, through `proxy` if given.
fn open(target: SocketAddr, proxy: Option<SocketAddr>) -> TcpStream {
    match proxy {
        None => {
            let s = TcpStream::connect(target).unwrap_or_else(|e| panic!("{e}"));
            let _ = s.set_nodelay(true);
            s
        }
        Some(p) => {
            let mut s = TcpStream::connect(p).unwrap_or_else(|e| panic!("{e}"));
            let _ = s.set_nodelay(true);
            write!(s, "CONNECT api.test:{} HTTP/1.1\r\n\r\n", target.port())
                .unwrap_or_else(|e| panic!("{e}"));
            let mut head = [0u8; 39];
            s.read_exact(&mut head).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            s
        }
    }
}

fn throughput(sink: SocketAddr, proxy: Option<SocketAddr>, bytes: u64) -> f64 {
    let buf = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut s = open(sink, proxy);
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).unwrap_or_else(|e| panic!("{e}"));
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut count = [0u8; 8];
    s.read_exact(&mut count).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(u64::from_be_bytes(count), bytes);
    let secs = t.elapsed().as_secs_f64();
    bytes as f64 * 8.0 / secs / 1e9
}

fn latencies(echo: SocketAddr, proxy: Option<SocketAddr>, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = open(echo, proxy);
        s.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap_or_else(|e| panic!("{e}"));
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let bytes: u64 = std::env::var("NANOCLAW_BENCH_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (sink, echo) = servers(&rt);

    let policy = NetworkPolicy::allowlist(
        [
            format!("api.test:{}", sink.port()),
            format!("api.test:{}", echo.port()),
        ],
        ["127.0.0.2/32"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let resolver =
        Arc::new(StaticResolver::new().with("api.test", &[IpAddr::from([127, 0, 0, 2])]));
    let limits = Limits {
        max_bytes: u64::MAX,
        ..Limits::default()
    };

    // Start-up cost of the blocking proxy (thread + current-thread runtime + bind).
    let mut starts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let p = Proxy::builder(policy.clone())
            .limits(limits)
            .resolver(resolver.clone())
            .listen(Listen::Tcp(
                "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            ))
            .start_blocking()
            .unwrap_or_else(|e| panic!("{e}"));
        starts.push(t.elapsed());
        p.shutdown();
    }
    starts.sort();
    // And of the async API inside an existing runtime, on a Unix socket.
    let mut astarts = Vec::new();
    let dir = std::env::temp_dir().join(format!("nanoclaw-net-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    rt.block_on(async {
        for i in 0..200 {
            let path = dir.join(format!("p{i}.sock"));
            let t = Instant::now();
            let h = Proxy::builder(policy.clone())
                .limits(limits)
                .resolver(resolver.clone())
                .listen(Listen::Unix(path))
                .start()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            astarts.push(t.elapsed());
            h.shutdown().await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    astarts.sort();

    let proxy = Proxy::builder(policy)
        .limits(limits)
        .resolver(resolver)
        .listen(Listen::Tcp(
            "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
        ))
        .start_blocking()
        .unwrap_or_else(|e| panic!("{e}"));
    let paddr = proxy.tcp_addr();

    // Warm up.
    let _ = throughput(sink, None, 64 << 20);
    let _ = throughput(sink, paddr, 64 << 20);
    let _ = latencies(echo, None, 200);
    let _ = latencies(echo, paddr, 200);

    let runs = 5;
    let mut direct_tp = Vec::new();
    let mut proxy_tp = Vec::new();
    for _ in 0..runs {
        direct_tp.push(throughput(sink, None, bytes));
        proxy_tp.push(throughput(sink, paddr, bytes));
    }
    let n = 2000;
    let mut ld = Vec::new();
    let mut lp = Vec::new();
    for _ in 0..4 {
        ld.extend(latencies(echo, None, n / 4));
        lp.extend(latencies(echo, paddr, n / 4));
    }
    ld.sort();
    lp.sort();
    let st = proxy.stats();
    proxy.shutdown();

    let (dt, pt) = (median(direct_tp), median(proxy_tp));
    println!(
        "nanoclaw-net proxy benchmark (loopback, {runs} runs x {} MiB, {n} new connections)",
        bytes >> 20
    );
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "", "direct", "via proxy", "ratio"
    );
    println!(
        "{:<34} {:>9.2} Gb/s {:>7.2} Gb/s {:>9.2}x",
        "throughput (median)",
        dt,
        pt,
        pt / dt
    );
    for (label, p) in [
        ("new conn + 1B RTT p50", 0.5),
        ("new conn + 1B RTT p90", 0.9),
        ("new conn + 1B RTT p99", 0.99),
    ] {
        let (a, b) = (pct(&ld, p), pct(&lp, p));
        println!(
            "{:<34} {:>9.1} µs {:>9.1} µs {:>9.2}x   (+{:.1} µs)",
            label,
            us(a),
            us(b),
            us(b) / us(a),
            us(b) - us(a)
        );
    }
    println!(
        "{:<34} p50 {:.1} µs, p99 {:.1} µs",
        "proxy start (blocking thread, TCP)",
        us(pct(&starts, 0.5)),
        us(pct(&starts, 0.99))
    );
    println!(
        "{:<34} p50 {:.1} µs, p99 {:.1} µs",
        "proxy start (async, Unix socket)",
        us(pct(&astarts, 0.5)),
        us(pct(&astarts, 0.99))
    );
    println!("proxy stats: {st:?}");
}
