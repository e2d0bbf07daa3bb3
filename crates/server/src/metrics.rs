//! The daemon's counters, served as `GET /metrics` in Prometheus' text
//! format (version 0.0.4).
//!
//! [`Metrics`] is a set of atomics shared (as an `Arc`) by the HTTP layer
//! (requests, rate-limit refusals, audit failures) and the backend
//! (execs, warm pools, quota refusals, egress denials, sandbox counts).
//! Bumping a counter is one relaxed atomic add: cheap enough for every
//! request and every exec.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the exec duration histogram's buckets; the
/// `+Inf` bucket follows them.
pub const EXEC_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The quotas whose refusals are counted (`quota` label of
/// `nanoclaw_quota_refusals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    /// API requests per second (the HTTP layer's token bucket).
    Rate,
    /// Concurrent sandboxes.
    Sandboxes,
    /// Memory over all running sandboxes.
    Memory,
    /// CPUs over all running sandboxes.
    Cpus,
    /// The longest lifetime of one sandbox.
    Lifetime,
    /// Agent runs at once (`POST /v1/execute`), per tenant or in total.
    AgentRuns,
}

impl Quota {
    /// Every quota, in label order.
    pub const ALL: [Quota; 6] = [
        Quota::Rate,
        Quota::Sandboxes,
        Quota::Memory,
        Quota::Cpus,
        Quota::Lifetime,
        Quota::AgentRuns,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Rate => "rate",
            Quota::Sandboxes => "sandboxes",
            Quota::Memory => "memory",
            Quota::Cpus => "cpus",
            Quota::Lifetime => "lifetime",
            Quota::AgentRuns => "agent_runs",
        }
    }

    fn index(self) -> usize {
        match self {
            Quota::Rate => 0,
            Quota::Sandboxes => 1,
            Quota::Memory => 2,
            Quota::Cpus => 3,
            Quota::Lifetime => 4,
            Quota::AgentRuns => 5,
        }
    }
}

/// HTTP statuses are counted for 100..=599.
const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

/// A cumulative histogram over [`EXEC_BUCKETS`].
#[derive(Debug)]
struct Histogram {
    /// Observations at or below each bound (not cumulative here; summed
    /// at render).
    buckets: [AtomicU64; EXEC_BUCKETS.len()],
    /// Observations above the last bound.
    overflow: AtomicU64,
    /// The sum of all observations, microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match EXEC_BUCKETS.iter().position(|&le| secs <= le) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The daemon's counters and gauges (see the [module docs](self)).
#[derive(Debug)]
pub struct Metrics {
    sandboxes_running: AtomicU64,
    sandboxes_paused: AtomicU64,
    execs: AtomicU64,
    exec_duration: Histogram,
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    /// Ready pooled sandboxes by template.
    pool_ready: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    quota_refusals: [AtomicU64; Quota::ALL.len()],
    egress_denials: AtomicU64,
    audit_failures: AtomicU64,
    http_requests: Box<[AtomicU64]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sandboxes_running: AtomicU64::new(0),
            sandboxes_paused: AtomicU64::new(0),
            execs: AtomicU64::new(0),
            exec_duration: Histogram::default(),
            pool_hits: AtomicU64::new(0),
            pool_misses: AtomicU64::new(0),
            pool_ready: Default::default(),
            quota_refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            egress_denials: AtomicU64::new(0),
            audit_failures: AtomicU64::new(0),
            http_requests: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the sandbox gauges (`nanoclaw_sandboxes{state=…}`).
    pub fn set_sandboxes(&self, running: u64, paused: u64) {
        self.sandboxes_running.store(running, Ordering::Relaxed);
        self.sandboxes_paused.store(paused, Ordering::Relaxed);
    }

    /// Sets the warm pool gauge (`nanoclaw_pool_ready{template=…}`): the
    /// ready sandboxes of every pooled template.
    pub fn set_pool_ready(&self, sizes: std::collections::HashMap<String, usize>) {
        if let Ok(mut m) = self.pool_ready.lock() {
            *m = sizes.into_iter().map(|(k, v)| (k, v as u64)).collect();
        }
    }

    /// Counts an exec (a process started in a sandbox, or a one-shot
    /// run); call [`Metrics::exec_finished`] with its duration when it
    /// ends.
    pub fn exec_started(&self) {
        self.execs.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long an exec ran.
    pub fn exec_finished(&self, duration: Duration) {
        self.exec_duration.observe(duration);
    }

    /// A sandbox was taken from a warm pool.
    pub fn pool_hit(&self) {
        self.pool_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A sandbox had to be made because its warm pool was empty.
    pub fn pool_miss(&self) {
        self.pool_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// A quota refused something.
    pub fn quota_refused(&self, quota: Quota) {
        self.quota_refusals[quota.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The egress policy refused `n` connections.
    pub fn egress_denied(&self, n: u64) {
        self.egress_denials.fetch_add(n, Ordering::Relaxed);
    }

    /// An audit record could not be written (the request was answered
    /// 503).
    pub fn audit_failed(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an answered HTTP request by status.
    pub fn http_request(&self, status: u16) {
        if let Some(c) = status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| self.http_requests.get(usize::from(i)))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests answered with `status` so far.
    pub fn http_requests(&self, status: u16) -> u64 {
        status
            .checked_sub(FIRST_STATUS)
            .and_then(|i| self.http_requests.get(usize::from(i)))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Refusals by `quota` so far.
    pub fn quota_refusals(&self, quota: Quota) -> u64 {
        self.quota_refusals[quota.index()].load(Ordering::Relaxed)
    }

    /// Everything, in Prometheus' text format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(
            &mut out,
            "nanoclaw_sandboxes",
            "gauge",
            "Sandboxes held, by state.",
        );
        for (state, v) in [
            ("running", &self.sandboxes_running),
            ("paused", &self.sandboxes_paused),
        ] {
            let _ = writeln!(out, "nanoclaw_sandboxes{{state=\"{state}\"}} {}", load(v));
        }
        counter(
            &mut out,
            "nanoclaw_execs_total",
            "Processes started in sandboxes (execs and one-shot runs).",
            load(&self.execs),
        );
        self.render_histogram(&mut out);
        counter(
            &mut out,
            "nanoclaw_pool_hits_total",
            "Sandboxes taken from a warm pool.",
            load(&self.pool_hits),
        );
        counter(
            &mut out,
            "nanoclaw_pool_misses_total",
            "Sandboxes made because the warm pool was empty.",
            load(&self.pool_misses),
        );
        header(
            &mut out,
            "nanoclaw_pool_ready",
            "gauge",
            "Sandboxes ready in a warm pool, by template.",
        );
        if let Ok(m) = self.pool_ready.lock() {
            for (t, n) in m.iter() {
                let t = t.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "nanoclaw_pool_ready{{template=\"{t}\"}} {n}");
            }
        }
        header(
            &mut out,
            "nanoclaw_quota_refusals_total",
            "counter",
            "Requests refused by a tenant quota, by quota.",
        );
        for q in Quota::ALL {
            let _ = writeln!(
                out,
                "nanoclaw_quota_refusals_total{{quota=\"{}\"}} {}",
                q.as_str(),
                load(&self.quota_refusals[q.index()])
            );
        }
        counter(
            &mut out,
            "nanoclaw_egress_denials_total",
            "Outbound connections refused by a sandbox's egress policy.",
            load(&self.egress_denials),
        );
        counter(
            &mut out,
            "nanoclaw_audit_failures_total",
            "Requests answered 503 because their audit record could not be written.",
            load(&self.audit_failures),
        );
        header(
            &mut out,
            "nanoclaw_http_requests_total",
            "counter",
            "HTTP requests answered, by status code.",
        );
        for (i, c) in self.http_requests.iter().enumerate() {
            let n = load(c);
            if n > 0 {
                let code = usize::from(FIRST_STATUS) + i;
                let _ = writeln!(out, "nanoclaw_http_requests_total{{code=\"{code}\"}} {n}");
            }
        }
        out
    }

    fn render_histogram(&self, out: &mut String) {
        let h = &self.exec_duration;
        let name = "nanoclaw_exec_duration_seconds";
        header(out, name, "histogram", "How long execs ran, seconds.");
        let mut cumulative = 0u64;
        for (le, b) in EXEC_BUCKETS.iter().zip(&h.buckets) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += h.overflow.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        // The count is the +Inf bucket (read once, so they agree).
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.set_sandboxes(3, 1);
        m.exec_started();
        m.exec_started();
        m.exec_finished(Duration::from_millis(7));
        m.exec_finished(Duration::from_secs(1000));
        m.pool_hit();
        m.pool_miss();
        m.pool_miss();
        m.set_pool_ready([("vm".to_string(), 2), ("a\"b".to_string(), 0)].into());
        m.quota_refused(Quota::Rate);
        m.egress_denied(1);
        m.http_request(200);
        m.http_request(200);
        m.http_request(429);
        m.http_request(42); // ignored
        let t = m.render();
        assert_eq!(
            value(&t, "nanoclaw_sandboxes{state=\"running\"}"),
            Some(3.0)
        );
        assert_eq!(value(&t, "nanoclaw_sandboxes{state=\"paused\"}"), Some(1.0));
        assert_eq!(value(&t, "nanoclaw_execs_total"), Some(2.0));
        let b = "nanoclaw_exec_duration_seconds_bucket";
        assert_eq!(value(&t, &format!("{b}{{le=\"0.005\"}}")), Some(0.0));
        assert_eq!(value(&t, &format!("{b}{{le=\"0.01\"}}")), Some(1.0));
        assert_eq!(value(&t, &format!("{b}{{le=\"300\"}}")), Some(1.0));
        assert_eq!(value(&t, &format!("{b}{{le=\"+Inf\"}}")), Some(2.0));
        assert_eq!(value(&t, "nanoclaw_exec_duration_seconds_count"), Some(2.0));
        assert_eq!(
            value(&t, "nanoclaw_exec_duration_seconds_sum"),
            Some(1000.007)
        );
        assert_eq!(value(&t, "nanoclaw_pool_hits_total"), Some(1.0));
        assert_eq!(value(&t, "nanoclaw_pool_misses_total"), Some(2.0));
        assert_eq!(value(&t, "nanoclaw_pool_ready{template=\"vm\"}"), Some(2.0));
        assert_eq!(
            value(&t, "nanoclaw_pool_ready{template=\"a\\\"b\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "nanoclaw_quota_refusals_total{quota=\"rate\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "nanoclaw_quota_refusals_total{quota=\"memory\"}"),
            Some(0.0)
        );
        assert_eq!(value(&t, "nanoclaw_egress_denials_total"), Some(1.0));
        assert_eq!(
            value(&t, "nanoclaw_http_requests_total{code=\"200\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&t, "nanoclaw_http_requests_total{code=\"429\"}"),
            Some(1.0)
        );
        assert!(!t.contains("code=\"42\""));
        assert!(t.ends_with('\n'));
    }
}
