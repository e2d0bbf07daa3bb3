//! nanoclaw's own routes over real HTTP: /healthz, /openapi.json (checked
//! against what the server actually serves), /metrics (parsed as
//! Prometheus text), /v1/run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use nanoclaw_server::listen::{ListenAddr, ServeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_needs_no_key() {
    let s = start().await;
    let r = send(&s, "GET", "/healthz", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    let r = send(&s, "POST", "/healthz", &[], "").await;
    assert_eq!(r.status, 405);
    s.stop().await;
}

/// Whether a reply says nothing is served there: 405, the fallback's
/// "no such route", or an unknown Connect procedure. (HEAD answers carry
/// no body: a 404 is taken as the fallback's.)
fn unserved(verb: &str, r: &Reply) -> bool {
    if r.status == 405 {
        return true;
    }
    if verb == "HEAD" {
        return r.status == 404;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return false;
    };
    let message = v["message"].as_str().unwrap_or("");
    (r.status == 404 && message.ends_with("no such route"))
        || (v["code"] == "unimplemented" && message.contains("does not exist"))
}

/// A concrete path for a documented one.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| match seg {
            "{id}" => "sbxnope",
            "{feature}" => "snapshots",
            "{rest}" => "a/b",
            s if s.starts_with('{') => "x",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

const VERBS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// Every `$ref` in `v`.
fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("$ref", Some(r)) => out.push(r.to_owned()),
                    _ => refs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_exactly_what_is_served() {
    let s = start().await;
    let r = send(&s, "GET", "/openapi.json", &[], "").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();

    // The detector itself: unknown paths and procedures are unserved.
    for probe in [
        "/nope",
        "/process.Process/Bogus",
        "/filesystem.Filesystem/Bogus",
    ] {
        let r = send(&s, "POST", probe, &[], "").await;
        assert!(unserved("POST", &r), "{probe}: {} {:?}", r.status, r.body);
        assert!(!paths.contains_key(probe));
    }
    for must in [
        "/healthz",
        "/openapi.json",
        "/metrics",
        "/v1/run",
        "/v1/audit",
        "/v1/execute",
        "/v1/approvals",
        "/v1/approvals/{approval_id}",
        "/v1/images",
        "/health",
        "/v2/sandboxes",
        "/sandboxes/{id}",
        "/files",
        "/process.Process/Start",
        "/process.Process/StreamInput",
        "/filesystem.Filesystem/WatchDir",
        "/templates/{rest}",
    ] {
        assert!(paths.contains_key(must), "{must} is not documented");
    }

    // Every documented operation is served; every other verb is not.
    let mut op_ids = BTreeSet::new();
    for (path, item) in paths {
        let documented: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.to_ascii_uppercase())
            .collect();
        for op in item.as_object().unwrap().values() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            assert!(op_ids.insert(op["operationId"].as_str().unwrap().to_owned()));
        }
        for verb in VERBS {
            let expected =
                documented.contains(verb) || (verb == "HEAD" && documented.contains("GET"));
            let r = send(&s, verb, &concrete(path), &[], "").await;
            assert_eq!(
                !unserved(verb, &r),
                expected,
                "{verb} {path} answered {} {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }

    // Every reference resolves.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
    s.stop().await;
}

/// Parses Prometheus' text format 0.0.4 strictly enough for a test:
/// every sample belongs to a family declared by `# TYPE` before it, and
/// every value is a number. Returns the samples by series.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty());
            assert!(helps.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels.strip_prefix('{').unwrap().strip_suffix('}').unwrap();
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE for {name}");
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let s = start().await;
    let none = send(&s, "GET", "/metrics", &[], "").await;
    assert_eq!(none.status, 401, "TCP needs a key");
    let (_id, _token) = create(&s, KEY_A).await;
    let (id2, _) = create(&s, KEY_B).await;
    let pause = send(
        &s,
        "POST",
        &format!("/sandboxes/{id2}/pause"),
        &[("x-api-key", KEY_B)],
        "",
    )
    .await;
    assert_eq!(pause.status, 204);
    let r = send(&s, "GET", "/metrics", &[("x-api-key", KEY_A)], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let m = parse_prometheus(std::str::from_utf8(&r.body).unwrap());
    assert_eq!(m["nanoclaw_sandboxes{state=\"running\"}"], 1.0);
    assert_eq!(m["nanoclaw_sandboxes{state=\"paused\"}"], 1.0);
    assert_eq!(m["nanoclaw_http_requests_total{code=\"201\"}"], 2.0);
    assert_eq!(m["nanoclaw_http_requests_total{code=\"204\"}"], 1.0);
    assert_eq!(m["nanoclaw_http_requests_total{code=\"401\"}"], 1.0);
    for family in [
        "nanoclaw_execs_total",
        "nanoclaw_pool_hits_total",
        "nanoclaw_pool_misses_total",
        "nanoclaw_egress_denials_total",
        "nanoclaw_quota_refusals_total{quota=\"rate\"}",
        "nanoclaw_exec_duration_seconds_count",
        "nanoclaw_exec_duration_seconds_sum",
    ] {
        assert!(m.contains_key(family), "{family} missing");
    }
    // Buckets are cumulative and end with +Inf = count.
    let mut last = 0.0;
    let buckets: Vec<(&String, &f64)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("nanoclaw_exec_duration_seconds_bucket"))
        .collect();
    assert!(buckets.len() > 5);
    for (_, v) in &buckets {
        assert!(**v >= last);
        last = **v;
    }
    assert_eq!(
        m["nanoclaw_exec_duration_seconds_bucket{le=\"+Inf\"}"],
        m["nanoclaw_exec_duration_seconds_count"]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_no_key_on_the_unix_socket() {
    let dir = std::env::temp_dir().join(format!("nanoclaw-http-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let s = start_with(
        vec![ListenAddr::Unix(path.clone())],
        ServeOptions::default(),
    )
    .await;
    let unix = || async { tokio::net::UnixStream::connect(&path).await.unwrap() };
    let r = send_on(unix().await, "GET", "/metrics", &[], "".into()).await;
    assert_eq!(r.status, 200);
    assert!(std::str::from_utf8(&r.body)
        .unwrap()
        .contains("# TYPE nanoclaw_sandboxes gauge"));
    // Other routes still need a key there (this server has no unix tenant).
    let r = send_on(unix().await, "GET", "/v2/sandboxes", &[], "".into()).await;
    assert_eq!(r.status, 401);
    // A wrong key is refused even on the socket.
    let r = send_on(
        unix().await,
        "GET",
        "/metrics",
        &[("x-api-key", "e2b_wrong")],
        "".into(),
    )
    .await;
    assert_eq!(r.status, 401);
    s.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_checks_its_body_and_answers_the_backends_json() {
    let s = start().await;
    let key = [("x-api-key", KEY_A), ("content-type", "application/json")];
    let no_key = send(&s, "POST", "/v1/run", &[], r#"{"command":["true"]}"#).await;
    assert_eq!(no_key.status, 401);
    for (body, needle) in [
        ("", "body is required"),
        ("{not json", "invalid RunRequest"),
        (
            r#"{"command":["echo"],"colour":"red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"command":"echo hi"}"#, "invalid RunRequest"),
        (r#"{}"#, "either command"),
        (r#"{"lang":"cobol","code":"x"}"#, "unknown lang"),
        (r#"{"command":["true"],"timeout_ms":0}"#, "timeout_ms"),
    ] {
        let r = send(&s, "POST", "/v1/run", &key, body).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.headers["content-type"], "application/json");
        let v = r.json();
        assert_eq!(v["code"], 400);
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }

    let ok = send(&s, "POST", "/v1/run", &key, r#"{"command":["echo","hi"]}"#).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let v = ok.json();
    assert_eq!(v["tenant"], "alice");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["stdout"], "hi\n");
    let code = send(
        &s,
        "POST",
        "/v1/run",
        &key,
        r#"{"lang":"sh","code":"echo $X; exit 3","env":{"X":"y"}}"#,
    )
    .await;
    assert_eq!(code.json()["exit_code"], 3);
    assert_eq!(code.json()["stdout"], "y\n");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_routes_need_a_key_and_an_agent_store() {
    let s = start().await;
    let key = [("x-api-key", KEY_A), ("content-type", "application/json")];
    for (verb, path, body) in [
        ("POST", "/v1/execute", r#"{"prompt":"fib"}"#),
        ("GET", "/v1/approvals", ""),
        ("POST", "/v1/approvals/apr_1", r#"{"decision":"deny"}"#),
    ] {
        let r = send(&s, verb, path, &[], body).await;
        assert_eq!(r.status, 401, "{verb} {path}");
        // This server was built without agents: it says so, in JSON.
        let r = send(&s, verb, path, &key, body).await;
        assert_eq!(r.status, 501, "{verb} {path}");
        assert_eq!(r.json()["code"], 501);
    }
    s.stop().await;
}
