//! The control plane over real HTTP: auth, tenant isolation, error bodies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_checked() {
    let s = start().await;
    let none = send(&s, "GET", "/v2/sandboxes", &[], "").await;
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["code"], 401);
    assert!(none.json()["message"].is_string());
    let wrong = send(&s, "GET", "/v2/sandboxes", &[("x-api-key", "e2b_nope")], "").await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.headers["content-type"], "application/json");
    let bearer = send(
        &s,
        "GET",
        "/v2/sandboxes",
        &[("authorization", &format!("Bearer {KEY_A}"))],
        "",
    )
    .await;
    assert_eq!(bearer.status, 200);
    // Unsupported features still need a key, then answer 501.
    let tmpl = send(&s, "GET", "/templates", &[], "").await;
    assert_eq!(tmpl.status, 401);
    let tmpl = send(&s, "GET", "/templates", &[("x-api-key", KEY_A)], "").await;
    assert_eq!(tmpl.status, 501);
    assert_eq!(tmpl.json()["code"], 501);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_schemas() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    assert_eq!(token.len(), 64);
    let info = send(
        &s,
        "GET",
        &format!("/sandboxes/{id}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(info.status, 200);
    let v = info.json();
    for key in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(!v[key].is_null(), "missing {key}: {v}");
    }
    assert_eq!(v["state"], "running");
    assert_eq!(v["metadata"]["k"], "v");

    // Metadata filter, double-encoded as the SDK sends it.
    let hit = send(
        &s,
        "GET",
        "/v2/sandboxes?metadata=k%3Dv&state=running",
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(hit.json().as_array().unwrap().len(), 1);
    let miss = send(
        &s,
        "GET",
        "/v2/sandboxes?metadata=k%3Dw",
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(miss.json().as_array().unwrap().len(), 0);

    let t = send(
        &s,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        &[("x-api-key", KEY_A)],
        r#"{"timeout":5}"#,
    )
    .await;
    assert_eq!(t.status, 204);
    let p = send(
        &s,
        "POST",
        &format!("/sandboxes/{id}/pause"),
        &[("x-api-key", KEY_A)],
        "{}",
    )
    .await;
    assert_eq!(p.status, 204);
    let again = send(
        &s,
        "POST",
        &format!("/sandboxes/{id}/pause"),
        &[("x-api-key", KEY_A)],
        "{}",
    )
    .await;
    assert_eq!(again.status, 409);
    let c = send(
        &s,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        &[("x-api-key", KEY_A)],
        "{}",
    )
    .await;
    assert_eq!(c.status, 201, "resumed");
    assert_eq!(c.json()["envdAccessToken"], token.as_str());
    let c = send(
        &s,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        &[("x-api-key", KEY_A)],
        r#"{"timeout":60}"#,
    )
    .await;
    assert_eq!(c.status, 200, "already running");
    let m = send(
        &s,
        "GET",
        &format!("/sandboxes/{id}/metrics"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(m.status, 200);
    assert!(m.json()[0]["timestampUnix"].is_i64());

    let k = send(
        &s,
        "DELETE",
        &format!("/sandboxes/{id}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(k.status, 204);
    let gone = send(
        &s,
        "GET",
        &format!("/sandboxes/{id}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["code"], 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_sandbox_is_absent() {
    let s = start().await;
    let (id, _) = create(&s, KEY_A).await;
    for (method, path, body) in [
        ("GET", format!("/sandboxes/{id}"), ""),
        ("DELETE", format!("/sandboxes/{id}"), ""),
        ("POST", format!("/v2/sandboxes/{id}/connect"), "{}"),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            r#"{"timeout":1}"#,
        ),
        ("POST", format!("/sandboxes/{id}/pause"), "{}"),
        ("GET", format!("/sandboxes/{id}/metrics"), ""),
    ] {
        let r = send(&s, method, &path, &[("x-api-key", KEY_B)], body).await;
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.json()["code"], 404);
    }
    let list = send(&s, "GET", "/v2/sandboxes", &[("x-api-key", KEY_B)], "").await;
    assert_eq!(list.json().as_array().unwrap().len(), 0);
    // Still alive for its owner.
    let mine = send(
        &s,
        "GET",
        &format!("/sandboxes/{id}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(mine.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_json_errors() {
    let s = start().await;
    let key = [("x-api-key", KEY_A), ("content-type", "application/json")];
    let bad = send(&s, "POST", "/v2/sandboxes", &key, "{not json").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], 400);
    let typed = send(&s, "POST", "/v2/sandboxes", &key, r#"{"templateID": 5}"#).await;
    assert_eq!(typed.status, 400);
    let missing = send(&s, "POST", "/v2/sandboxes", &key, "{}").await;
    assert_eq!(missing.status, 400);
    let negative = send(
        &s,
        "POST",
        "/v2/sandboxes",
        &key,
        r#"{"templateID":"base","timeout":-1}"#,
    )
    .await;
    assert_eq!(negative.status, 400);
    let unsupported = send(
        &s,
        "POST",
        "/v2/sandboxes",
        &key,
        r#"{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}"#,
    )
    .await;
    assert_eq!(unsupported.status, 400);
    // Unknown fields are ignored (E2B's decoder does too).
    let extra = send(
        &s,
        "POST",
        "/v2/sandboxes",
        &key,
        r#"{"templateID":"base","fromTheFuture":{"a":1}}"#,
    )
    .await;
    assert_eq!(extra.status, 201);
    // A backend refusal maps to its status.
    let tmpl = send(
        &s,
        "POST",
        "/v2/sandboxes",
        &key,
        r#"{"templateID":"nope"}"#,
    )
    .await;
    assert_eq!(tmpl.status, 400);
    // Over 1 MiB: 413 with a JSON body.
    let big = format!(
        r#"{{"templateID":"base","metadata":{{"k":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    // The server answers before reading the body and closes: the client,
    // still sending, may see the reset first. At least one of five tries
    // must get the answer, and every answer must be 413 JSON.
    let mut answered = 0;
    for _ in 0..5 {
        if let Some(r) = try_send(&s, "POST", "/v2/sandboxes", &key, big.clone().into()).await {
            assert_eq!(r.status, 413);
            assert_eq!(r.json()["code"], 413);
            answered += 1;
        }
    }
    assert!(
        answered > 0,
        "no 413 answer to an oversized body in 5 tries"
    );
    // Unknown sandbox and unknown route.
    let r = send(&s, "GET", "/sandboxes/doesnotexist", &key, "").await;
    assert_eq!(r.status, 404);
    let r = send(&s, "GET", "/no/such/route", &key, "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_with_next_token() {
    let s = start().await;
    for _ in 0..3 {
        create(&s, KEY_A).await;
    }
    let first = send(
        &s,
        "GET",
        "/v2/sandboxes?limit=2",
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(first.json().as_array().unwrap().len(), 2);
    let token = first.headers["x-next-token"].to_str().unwrap().to_owned();
    let second = send(
        &s,
        "GET",
        &format!("/v2/sandboxes?limit=2&nextToken={token}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    assert_eq!(second.json().as_array().unwrap().len(), 1);
    assert!(second.headers.get("x-next-token").is_none());
    s.stop().await;
}
