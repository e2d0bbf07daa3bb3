//! Per-tenant rate limits over real HTTP: 429 with Retry-After and E2B's
//! JSON error on the control plane and /files, Connect's
//! resource_exhausted on Connect routes; the data plane is charged to
//! the sandbox's owner; other tenants are unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use nanoclaw_server::listen::{ListenAddr, ServeOptions};
use nanoclaw_server::StaticKeys;

/// Carol: 0.2 requests per second, so a burst of one and the next token
/// only after 5 s (no refill can happen during the test's requests).
const KEY_C: &str = "e2b_cccc";

async fn start_limited() -> Server {
    let auth = StaticKeys::new()
        .with_key(KEY_A, "alice")
        .with_key(KEY_B, "bob")
        .with_key(KEY_C, "carol")
        .with_rate("carol", 0.2)
        .with_rate("bob", 1000.0);
    start_auth(
        vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        ServeOptions::default(),
        auth,
    )
    .await
}

fn retry_after(r: &Reply) -> u64 {
    r.headers["retry-after"].to_str().unwrap().parse().unwrap()
}

const CAROL_LIMIT: &str = "rate limit: 0.2 requests per second for tenant carol";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_rate_limit_is_per_tenant() {
    let s = start_limited().await;
    let (id, token) = create(&s, KEY_C).await; // carol's one token
    let list = send(&s, "GET", "/v2/sandboxes", &[("x-api-key", KEY_C)], "").await;
    assert_eq!(list.status, 429);
    assert_eq!(list.headers["content-type"], "application/json");
    assert_eq!(
        list.json(),
        serde_json::json!({"code": 429, "message": CAROL_LIMIT})
    );
    let wait = retry_after(&list);
    assert!((4..=5).contains(&wait), "Retry-After {wait}");

    // Routes that answer 501 or run commands are charged alike.
    let tmpl = send(&s, "GET", "/templates", &[("x-api-key", KEY_C)], "").await;
    assert_eq!(tmpl.status, 429);
    let run = send(
        &s,
        "POST",
        "/v1/run",
        &[("x-api-key", KEY_C)],
        r#"{"command":["true"]}"#,
    )
    .await;
    assert_eq!(run.status, 429);

    // Other tenants are not affected: alice (unlimited) and bob (1000/s).
    for key in [KEY_A, KEY_B] {
        for _ in 0..5 {
            let r = send(&s, "GET", "/v2/sandboxes", &[("x-api-key", key)], "").await;
            assert_eq!(r.status, 200);
        }
    }
    // Requests without a valid key are refused as before, not charged.
    let anon = send(&s, "GET", "/v2/sandboxes", &[], "").await;
    assert_eq!(anon.status, 401);

    // The data plane of carol's sandbox is charged to carol.
    let mut headers = envd(&id, &token);
    headers.push(("content-type", "application/json"));
    let unary = send(&s, "POST", "/process.Process/List", &headers, "{}").await;
    assert_eq!(unary.status, 429);
    let v = unary.json();
    assert_eq!(v["code"], "resource_exhausted");
    assert_eq!(v["message"], CAROL_LIMIT);
    assert!((1..=5).contains(&retry_after(&unary)));

    let mut stream = envd(&id, &token);
    stream.push(("content-type", "application/connect+json"));
    let start = send(
        &s,
        "POST",
        "/process.Process/Start",
        &stream,
        envelope(0, r#"{"process":{"cmd":"true"}}"#),
    )
    .await;
    assert_eq!(start.status, 429);
    assert_eq!(start.json()["code"], "resource_exhausted");

    let file = send(&s, "GET", "/files?path=x", &envd(&id, &token), "").await;
    assert_eq!(file.status, 429);
    assert_eq!(
        file.json(),
        serde_json::json!({"code": 429, "message": CAROL_LIMIT})
    );
    assert!(file.headers.contains_key("retry-after"));

    // A wrong token is not carol's request: refused as unknown, not charged
    // (and so not 429).
    let wrong = send(&s, "GET", "/files?path=x", &envd(&id, "nope"), "").await;
    assert_eq!(wrong.status, 502);

    // Counted: carol's refusals, and bob may still read them.
    let m = send(&s, "GET", "/metrics", &[("x-api-key", KEY_B)], "").await;
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    let refusals: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nanoclaw_quota_refusals_total{quota=\"rate\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(refusals, 6.0);
    assert!(text.contains("nanoclaw_http_requests_total{code=\"429\"} 6\n"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_refills() {
    // 2 requests per second: a burst of 4, then one every 500 ms.
    let auth = StaticKeys::new()
        .with_key(KEY_A, "alice")
        .with_rate("alice", 2.0);
    let s = start_auth(
        vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        ServeOptions::default(),
        auth,
    )
    .await;
    let key = [("x-api-key", KEY_A)];
    let mut ok = 0;
    while send(&s, "GET", "/v2/sandboxes", &key, "").await.status == 200 {
        ok += 1;
        assert!(ok <= 5, "the burst is 4 (one more may refill meanwhile)");
    }
    assert!(ok >= 4, "only {ok} before the first 429");
    let refused = send(&s, "GET", "/v2/sandboxes", &key, "").await;
    assert_eq!(refused.status, 429);
    assert_eq!(retry_after(&refused), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(send(&s, "GET", "/v2/sandboxes", &key, "").await.status, 200);
    s.stop().await;
}
