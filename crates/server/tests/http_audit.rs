//! Audit records of requests over real HTTP: one per request (liveness
//! probes aside), written before the answer is sent (streams included),
//! auth failures without key material, rate refusals as quota_refusal,
//! a chain that verifies, and GET /v1/audit showing a tenant its own
//! records only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::*;
use http_body_util::{BodyExt, Full};
use nanoclaw_server::audit::{Audit, Entry, Filter};
use nanoclaw_server::listen::{ListenAddr, ServeOptions};
use nanoclaw_server::StaticKeys;

const KEY_C: &str = "e2b_cccc";

/// A temporary data folder, removed on drop.
struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Folder {
        let p =
            std::env::temp_dir().join(format!("nanoclaw-http-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Folder(p)
    }

    fn db(&self) -> PathBuf {
        self.0.join("nanoclaw.db")
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_audited(folder: &Folder) -> Server {
    let auth = StaticKeys::new()
        .with_key(KEY_A, "alice")
        .with_key(KEY_B, "bob")
        .with_key(KEY_C, "carol")
        .with_rate("carol", 0.2);
    let opts = ServeOptions {
        audit: Some(Audit::open(&folder.db()).unwrap()),
        ..ServeOptions::default()
    };
    start_auth(vec![ListenAddr::Tcp("127.0.0.1:0".into())], opts, auth).await
}

/// Every record, read through a connection of its own (as another
/// process would).
fn records(folder: &Folder) -> Vec<Entry> {
    Audit::open(&folder.db())
        .unwrap()
        .query(&Filter::default())
        .unwrap()
}

/// Sends a request and checks its record was already there when the
/// answer arrived; returns the answer and the record.
async fn recorded(
    s: &Server,
    folder: &Folder,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (Reply, Entry) {
    let before = records(folder).len();
    let r = send(s, method, path, headers, body.to_owned()).await;
    let all = records(folder);
    assert_eq!(all.len(), before + 1, "{method} {path}: one new record");
    let e = all.last().unwrap().clone();
    assert_eq!(e.record.method.as_deref(), Some(method));
    assert_eq!(e.record.status, Some(r.status));
    (r, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_recorded_before_it_is_answered() {
    let folder = Folder::new("every");
    let s = start_audited(&folder).await;

    // Liveness probes are not recorded.
    send(&s, "GET", "/healthz", &[], "").await;
    send(&s, "GET", "/health", &[], "").await;
    assert_eq!(records(&folder).len(), 0);

    let json = ("content-type", "application/json");
    let (r, e) = recorded(
        &s,
        &folder,
        "POST",
        "/v2/sandboxes",
        &[("x-api-key", KEY_A), json],
        r#"{"templateID":"base"}"#,
    )
    .await;
    let id = r.json()["sandboxID"].as_str().unwrap().to_owned();
    let token = r.json()["envdAccessToken"].as_str().unwrap().to_owned();
    assert_eq!(e.record.kind, "request");
    assert_eq!(e.record.tenant.as_deref(), Some("alice"));
    assert_eq!(e.record.sandbox.as_deref(), Some(id.as_str()));
    assert_eq!(e.record.path.as_deref(), Some("/v2/sandboxes"));

    let (_, e) = recorded(
        &s,
        &folder,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        &[("x-api-key", KEY_A), json],
        r#"{"timeout":60}"#,
    )
    .await;
    assert_eq!(
        (e.record.sandbox.as_deref(), e.record.status),
        (Some(id.as_str()), Some(204))
    );

    // The data plane: the owner is the tenant; a signature is not kept.
    let path = "/files?path=a.txt&username=user&signature=v1_secretsig";
    let (r, e) = recorded(&s, &folder, "GET", path, &envd(&id, &token), "").await;
    assert_eq!(r.status, 502, "a wrong signature is refused");
    assert_eq!(e.record.kind, "auth_failure");
    assert_eq!(e.record.tenant.as_deref(), Some("alice"));
    assert_eq!(
        e.record.path.as_deref(),
        Some("/files?path=a.txt&username=user&signature=redacted")
    );
    let mut up = envd(&id, &token);
    up.push(("content-type", "application/octet-stream"));
    let (r, e) = recorded(&s, &folder, "POST", "/files?path=a.txt", &up, "hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (e.record.kind.as_str(), e.record.tenant.as_deref()),
        ("request", Some("alice"))
    );
    assert_eq!(e.record.sandbox.as_deref(), Some(id.as_str()));

    // Unknown routes and bad bodies are recorded too.
    let (_, e) = recorded(&s, &folder, "GET", "/nope", &[], "").await;
    assert_eq!(
        (e.record.status, e.record.tenant.clone()),
        (Some(404), None)
    );
    let (_, e) = recorded(
        &s,
        &folder,
        "POST",
        "/v1/run",
        &[("x-api-key", KEY_A), json],
        r#"{"lang":"sh","code":"echo secret-ish input"}"#,
    )
    .await;
    let input = e.record.input.as_ref().unwrap();
    assert_eq!(
        input.head,
        br#"{"lang":"sh","code":"echo secret-ish input"}"#
    );

    assert!(Audit::open(&folder.db()).unwrap().verify().unwrap().is_ok());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_recorded_when_its_head_is_ready() {
    let folder = Folder::new("stream");
    let s = start_audited(&folder).await;
    let (id, token) = create(&s, KEY_A).await;
    let before = records(&folder).len();

    let stream = tokio::net::TcpStream::connect(s.addr.unwrap())
        .await
        .unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri("/process.Process/Start")
        .header("host", "127.0.0.1")
        .header("content-type", "application/connect+json");
    for (k, v) in envd(&id, &token) {
        req = req.header(k, v);
    }
    let body = envelope(
        0,
        r#"{"process":{"cmd":"/bin/sh","args":["-c","echo started; sleep 2"]}}"#,
    );
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The head is here, the process runs on: its record is written.
    let all = records(&folder);
    assert_eq!(all.len(), before + 1);
    let e = &all[before].record;
    assert_eq!(e.path.as_deref(), Some("/process.Process/Start"));
    assert_eq!(
        (e.status, e.sandbox.as_deref()),
        (Some(200), Some(id.as_str()))
    );
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_and_refusals_are_recorded_without_keys() {
    let folder = Folder::new("auth");
    let s = start_audited(&folder).await;
    let wrong_key = "e2b_0123456789abcdef0123456789abcdef01234567";
    let (r, e) = recorded(
        &s,
        &folder,
        "GET",
        "/v2/sandboxes",
        &[("x-api-key", wrong_key)],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(e.record.kind, "auth_failure");
    assert_eq!(e.record.detail.as_deref(), Some("unknown API key"));
    assert_eq!(e.record.tenant, None);
    let (_, e) = recorded(
        &s,
        &folder,
        "GET",
        &format!("/v2/sandboxes?api_key={wrong_key}"),
        &[("authorization", &format!("Bearer {wrong_key}"))],
        "",
    )
    .await;
    assert_eq!(e.record.kind, "auth_failure");
    let (_, e) = recorded(&s, &folder, "DELETE", "/sandboxes/x", &[], "").await;
    assert_eq!(e.record.detail.as_deref(), Some("no API key"));
    assert_eq!(e.record.sandbox.as_deref(), Some("x"));

    // A wrong access token: recorded for the owner, token not kept.
    let (id, token) = create(&s, KEY_C).await;
    let (r, e) = recorded(
        &s,
        &folder,
        "GET",
        "/files?path=a",
        &envd(&id, "not-the-token"),
        "",
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(
        (e.record.kind.as_str(), e.record.detail.as_deref()),
        ("auth_failure", Some("wrong access token"))
    );
    assert_eq!(e.record.tenant.as_deref(), Some("carol"));

    // Carol is over her rate now (0.2/s, her one token spent on create).
    let (r, e) = recorded(&s, &folder, "GET", "/files?path=a", &envd(&id, &token), "").await;
    assert_eq!(r.status, 429);
    assert_eq!(e.record.kind, "quota_refusal");
    assert_eq!(e.record.tenant.as_deref(), Some("carol"));
    assert!(e
        .record
        .detail
        .as_deref()
        .unwrap()
        .contains("0.2 requests per second"));

    let text = serde_json::to_string(&records(&folder)).unwrap();
    for secret in [wrong_key, &token, "not-the-token"] {
        assert!(!text.contains(secret), "{secret} is in the audit log");
    }
    assert!(Audit::open(&folder.db()).unwrap().verify().unwrap().is_ok());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_read_their_own_records() {
    let folder = Folder::new("read");
    let s = start_audited(&folder).await;
    let (id_a, _) = create(&s, KEY_A).await;
    let (id_b, _) = create(&s, KEY_B).await;
    for _ in 0..3 {
        send(
            &s,
            "GET",
            &format!("/sandboxes/{id_a}"),
            &[("x-api-key", KEY_A)],
            "",
        )
        .await;
    }
    send(
        &s,
        "GET",
        &format!("/sandboxes/{id_b}"),
        &[("x-api-key", KEY_B)],
        "",
    )
    .await;
    send(
        &s,
        "GET",
        "/v2/sandboxes",
        &[("x-api-key", "e2b_wrong")],
        "",
    )
    .await;

    let read = |key: &'static str, query: &'static str| {
        let s = &s;
        async move {
            let r = send(
                s,
                "GET",
                &format!("/v1/audit{query}"),
                &[("x-api-key", key)],
                "",
            )
            .await;
            (r.status, r)
        }
    };
    let (status, r) = read(KEY_A, "").await;
    assert_eq!(status, 200);
    let mine = r.json();
    let mine = mine.as_array().unwrap();
    // create + 3 gets; this very request is recorded after it answered.
    assert_eq!(mine.len(), 4);
    assert!(mine.iter().all(|e| e["tenant"] == "alice"));
    assert!(mine.iter().all(|e| e["sandbox"] == id_a.as_str()));
    let seqs: Vec<i64> = mine.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");

    let (_, r) = read(KEY_B, "").await;
    let theirs = r.json();
    assert_eq!(theirs.as_array().unwrap().len(), 2);
    assert!(!theirs.to_string().contains(&id_a));

    // Paging and filters.
    let (_, r) = read(KEY_A, "?limit=2").await;
    let page = r.json();
    assert_eq!(page.as_array().unwrap().len(), 2);
    let last = page[1]["seq"].as_i64().unwrap();
    let after = format!("?after={last}&kind=request&since=1h");
    let r = send(
        &s,
        "GET",
        &format!("/v1/audit{after}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    let rest = r.json();
    // The two left, plus alice's two /v1/audit reads recorded since.
    assert_eq!(rest.as_array().unwrap().len(), 4);
    assert!(rest[0]["seq"].as_i64().unwrap() > last);
    let (_, r) = read(KEY_A, "?kind=auth_failure").await;
    assert_eq!(r.json().as_array().unwrap().len(), 0, "not alice's");
    let (_, r) = read(KEY_A, "?sandbox=nope").await;
    assert_eq!(r.json().as_array().unwrap().len(), 0);

    for bad in [
        "?limit=1001",
        "?limit=0",
        "?since=whenever",
        "?tenant=bob",
        "?kind=BAD",
    ] {
        let (status, r) = read(KEY_A, bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(r.json()["code"], 400);
    }
    let (status, _) = read("e2b_wrong", "").await;
    assert_eq!(status, 401);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_audit_log_reading_it_is_501() {
    let s = start().await;
    let r = send(&s, "GET", "/v1/audit", &[("x-api-key", KEY_A)], "").await;
    assert_eq!(r.status, 501);
    assert_eq!(r.json()["code"], 501);
    s.stop().await;
}
