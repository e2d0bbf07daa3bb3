//! The envd data plane over real HTTP: Connect streaming of process
//! output, unary RPCs and their errors, /files, access tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::*;

const STREAM: (&str, &str) = ("content-type", "application/connect+json");
const UNARY: (&str, &str) = ("content-type", "application/json");

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_streams_start_data_end_and_end_of_stream() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let mut h = envd(&id, &token);
    h.push(STREAM);
    h.push(("connect-timeout-ms", "10000"));
    let req = r#"{"process":{"cmd":"/bin/sh","args":["-c","echo hi; echo err >&2; echo $FOO; exit 3"]},"stdin":false}"#;
    let r = send(&s, "POST", "/process.Process/Start", &h, envelope(0, req)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/connect+json");
    let msgs = envelopes(&r.body);
    assert!(
        msgs[0].1["event"]["start"]["pid"].as_u64().unwrap() > 0,
        "{msgs:?}"
    );
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for (flags, m) in &msgs[1..msgs.len() - 2] {
        assert_eq!(*flags, 0);
        let data = &m["event"]["data"];
        if !data["stdout"].is_null() {
            out.extend(unb64(&data["stdout"]));
        } else {
            err.extend(unb64(&data["stderr"]));
        }
    }
    assert_eq!(out, b"hi\nbar\n", "sandbox envVars reach the process");
    assert_eq!(err, b"err\n");
    let end = &msgs[msgs.len() - 2].1["event"]["end"];
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["status"], "exit status 3");
    assert_eq!(msgs.last().unwrap(), &(2u8, serde_json::json!({})));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_stdin_and_signals() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let mut h = envd(&id, &token);
    h.push(STREAM);
    h.push(("connect-timeout-ms", "300"));
    let r = send(
        &s,
        "POST",
        "/process.Process/Start",
        &h,
        envelope(0, r#"{"process":{"cmd":"sleep","args":["30"]}}"#),
    )
    .await;
    let msgs = envelopes(&r.body);
    let last = &msgs.last().unwrap();
    assert_eq!(last.0, 2);
    assert_eq!(last.1["error"]["code"], "deadline_exceeded", "{msgs:?}");

    // stdin: start `cat` in the background (stream read on another task).
    let mut h = envd(&id, &token);
    h.push(STREAM);
    let addr = s.addr.unwrap();
    let (id2, token2) = (id.clone(), token.clone());
    let cat = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut hh = envd(&id2, &token2);
        hh.push(STREAM);
        send_on(
            stream,
            "POST",
            "/process.Process/Start",
            &hh,
            envelope(
                0,
                r#"{"process":{"cmd":"cat"},"stdin":true,"tag":"the-cat"}"#,
            ),
        )
        .await
    });
    // Find it by listing.
    let mut pid = 0;
    for _ in 0..500 {
        let mut u = envd(&id, &token);
        u.push(UNARY);
        let l = send(&s, "POST", "/process.Process/List", &u, "{}").await;
        assert_eq!(l.status, 200);
        if let Some(p) = l.json()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["tag"] == "the-cat")
        {
            pid = p["pid"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if pid == 0 {
        let r = cat.await.unwrap();
        panic!(
            "cat not listed; its stream: {} {:?}",
            r.status,
            envelopes(&r.body)
        );
    }
    let mut u = envd(&id, &token);
    u.push(UNARY);
    let body = format!(
        r#"{{"process":{{"pid":{pid}}},"input":{{"stdin":"{}"}}}}"#,
        b64("hello\n")
    );
    assert_eq!(
        send(&s, "POST", "/process.Process/SendInput", &u, body)
            .await
            .status,
        200
    );
    let body = r#"{"process":{"tag":"the-cat"}}"#;
    assert_eq!(
        send(&s, "POST", "/process.Process/CloseStdin", &u, body)
            .await
            .status,
        200
    );
    let r = cat.await.unwrap();
    let msgs = envelopes(&r.body);
    let out: Vec<u8> = msgs
        .iter()
        .filter_map(|(_, m)| {
            m["event"]["data"]["stdout"]
                .as_str()
                .map(|_| unb64(&m["event"]["data"]["stdout"]))
        })
        .flatten()
        .collect();
    assert_eq!(out, b"hello\n");
    assert_eq!(msgs[msgs.len() - 2].1["event"]["end"]["exitCode"], 0);

    // Unknown pid: not_found, 404, Connect JSON.
    let r = send(
        &s,
        "POST",
        "/process.Process/SendSignal",
        &u,
        r#"{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_found");
    // Connect to an unknown pid: the error comes in the stream.
    let r = send(
        &s,
        "POST",
        "/process.Process/Connect",
        &h,
        envelope(0, r#"{"process":{"pid":999999}}"#),
    )
    .await;
    assert_eq!(envelopes(&r.body)[0].1["error"]["code"], "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_connect_json() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let mut u = envd(&id, &token);
    u.push(UNARY);
    let r = send(&s, "POST", "/filesystem.Filesystem/Stat", &u, "{bad json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid_argument");
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/Stat",
        &u,
        r#"{"path":""}"#,
    )
    .await;
    assert_eq!(r.json()["code"], "invalid_argument");
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/Stat",
        &u,
        "{\"path\":\"/a\\u0000b\"}",
    )
    .await;
    assert_eq!(r.json()["code"], "invalid_argument");
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/Stat",
        &u,
        r#"{"path":"/nope"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_found");
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/MakeDir",
        &u,
        r#"{"path":"/home/user"}"#,
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["code"], "already_exists");
    // Wrong content type: 415.
    let mut plain = envd(&id, &token);
    plain.push(("content-type", "text/plain"));
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/Stat",
        &plain,
        r#"{"path":"/"}"#,
    )
    .await;
    assert_eq!(r.status, 415);
    // A message over the limit.
    let mut h = envd(&id, &token);
    h.push(STREAM);
    let mut huge = vec![0u8, 0x7f, 0, 0, 0];
    huge.extend_from_slice(b"{}");
    let r = send(&s, "POST", "/process.Process/Start", &h, huge).await;
    let msgs = envelopes(&r.body);
    assert_eq!(msgs[0].1["error"]["code"], "resource_exhausted");
    // A torn envelope.
    let r = send(
        &s,
        "POST",
        "/process.Process/Start",
        &h,
        vec![0u8, 0, 0, 0, 9, b'{'],
    )
    .await;
    assert_eq!(envelopes(&r.body)[0].1["error"]["code"], "invalid_argument");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tenants_on_the_data_plane() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let (_, token_b) = create(&s, KEY_B).await;
    for bad in [Some("garbage"), Some(token_b.as_str()), None] {
        let mut h = vec![("e2b-sandbox-id", id.as_str()), UNARY];
        if let Some(t) = bad {
            h.push(("x-access-token", t));
        }
        let r = send(
            &s,
            "POST",
            "/filesystem.Filesystem/ListDir",
            &h,
            r#"{"path":"/"}"#,
        )
        .await;
        assert_eq!(r.status, 502, "token {bad:?}");
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains("was not found"));
        let r = send(&s, "GET", "/files?path=%2Fetc%2Fpasswd", &h, "").await;
        assert_eq!(r.status, 502);
    }
    let health = send(&s, "GET", "/health", &envd(&id, &token), "").await;
    assert_eq!(health.status, 204);
    // Other ports of the sandbox are not served; the code interpreter's
    // (49999) serves its own routes only.
    let port = |p: &'static str| {
        [
            ("e2b-sandbox-id", id.clone()),
            ("e2b-sandbox-port", p.to_owned()),
            ("x-access-token", token.clone()),
        ]
    };
    let headers = |h: &[(&'static str, String); 3]| -> Vec<(&'static str, String)> { h.to_vec() };
    for (p, method, path, want) in [
        ("8080", "POST", "/execute", 502),
        ("49999", "GET", "/files?path=%2Fetc%2Fhostname", 502),
        ("49999", "POST", "/execute", 400),
        ("49983", "POST", "/execute", 502),
    ] {
        let h = headers(&port(p));
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send(&s, method, path, &h, "{}").await;
        assert_eq!(r.status, want, "port {p} {method} {path}");
    }
    // After a kill the data plane answers 502 "was not found".
    send(
        &s,
        "DELETE",
        &format!("/sandboxes/{id}"),
        &[("x-api-key", KEY_A)],
        "",
    )
    .await;
    let health = send(&s, "GET", "/health", &envd(&id, &token), "").await;
    assert_eq!(health.status, 502);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_upload_download() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let boundary = "0f910f422b53ac29980f31267c22144a";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/m1.txt\"\r\nContent-Type: text/plain\r\n\r\none\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/d/m2.bin\"\r\n\r\n\x00\x01\u{ff}\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let mut h = envd(&id, &token);
    h.push(("content-type", &ct));
    h.push(("x-metadata-owner", "tests"));
    let r = send(&s, "POST", "/files", &h, body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v[0]["path"], "/tmp/m1.txt");
    assert_eq!(v[0]["type"], "file");
    assert_eq!(v[1]["name"], "m2.bin");
    assert_eq!(v[1]["metadata"]["owner"], "tests");

    let r = send(
        &s,
        "GET",
        "/files?path=%2Ftmp%2Fd%2Fm2.bin",
        &envd(&id, &token),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], "\x00\x01\u{ff}".as_bytes());

    // octet-stream, gzip-encoded, relative path (the user's home).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"compressed!").unwrap();
    let data = gz.finish().unwrap();
    let mut h = envd(&id, &token);
    h.push(("content-type", "application/octet-stream"));
    h.push(("content-encoding", "gzip"));
    let r = send(&s, "POST", "/files?path=o.txt", &h, data).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()[0]["path"], "/home/user/o.txt");
    let r = send(&s, "GET", "/files?path=o.txt", &envd(&id, &token), "").await;
    assert_eq!(&r.body[..], b"compressed!");

    // Errors: missing file 404, directory 400, no path 400, NUL 400.
    let r = send(&s, "GET", "/files?path=%2Fnope", &envd(&id, &token), "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 404);
    let r = send(&s, "GET", "/files?path=%2Ftmp", &envd(&id, &token), "").await;
    assert_eq!(r.status, 400);
    let r = send(&s, "GET", "/files", &envd(&id, &token), "").await;
    assert_eq!(r.status, 400);
    let r = send(&s, "GET", "/files?path=%2Fa%00b", &envd(&id, &token), "").await;
    assert_eq!(r.status, 400);

    // Filesystem RPCs see the same files.
    let mut u = envd(&id, &token);
    u.push(UNARY);
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/Stat",
        &u,
        r#"{"path":"/tmp/m1.txt"}"#,
    )
    .await;
    let e = &r.json()["entry"];
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["size"], "3");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_watcher() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let mut u = envd(&id, &token);
    u.push(UNARY);
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/CreateWatcher",
        &u,
        r#"{"path":"/home/user"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let wid = r.json()["watcherId"].as_str().unwrap().to_owned();
    let mut h = envd(&id, &token);
    h.push(("content-type", "application/octet-stream"));
    send(&s, "POST", "/files?path=w.txt", &h, "x").await;
    let mut names = Vec::new();
    for _ in 0..100 {
        let r = send(
            &s,
            "POST",
            "/filesystem.Filesystem/GetWatcherEvents",
            &u,
            format!(r#"{{"watcherId":"{wid}"}}"#),
        )
        .await;
        assert_eq!(r.status, 200);
        names.extend(
            r.json()["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_owned()),
        );
        if !names.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(names, vec!["w.txt".to_string()]);
    // Another tenant's sandbox cannot see the watcher, even with its id.
    let (id_b, token_b) = create(&s, KEY_B).await;
    let mut ub = envd(&id_b, &token_b);
    ub.push(UNARY);
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/GetWatcherEvents",
        &ub,
        format!(r#"{{"watcherId":"{wid}"}}"#),
    )
    .await;
    assert_eq!(r.json()["code"], "not_found");
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/RemoveWatcher",
        &u,
        format!(r#"{{"watcherId":"{wid}"}}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        &s,
        "POST",
        "/filesystem.Filesystem/GetWatcherEvents",
        &u,
        format!(r#"{{"watcherId":"{wid}"}}"#),
    )
    .await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_and_stream_input() {
    let s = start().await;
    let (id, token) = create(&s, KEY_A).await;
    let mut h = envd(&id, &token);
    h.push(STREAM);
    h.push(("keepalive-ping-interval", "1"));
    let r = send(
        &s,
        "POST",
        "/process.Process/Start",
        &h,
        envelope(0, r#"{"process":{"cmd":"sleep","args":["1.6"]}}"#),
    )
    .await;
    let msgs = envelopes(&r.body);
    assert!(
        msgs.iter()
            .any(|(_, m)| m["event"]["keepalive"].is_object()),
        "{msgs:?}"
    );
    assert_eq!(msgs[msgs.len() - 2].1["event"]["end"]["exitCode"], 0);

    // StreamInput: a client stream of start + data, answered with {}.
    let addr = s.addr.unwrap();
    let (id2, token2) = (id.clone(), token.clone());
    let cat = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut hh = envd(&id2, &token2);
        hh.push(STREAM);
        send_on(
            stream,
            "POST",
            "/process.Process/Start",
            &hh,
            envelope(
                0,
                r#"{"process":{"cmd":"head","args":["-c","6"]},"stdin":true,"tag":"head"}"#,
            ),
        )
        .await
    });
    let mut body = envelope(0, r#"{"start":{"process":{"tag":"head"}}}"#).to_vec();
    body.extend_from_slice(&envelope(0, r#"{"keepalive":{}}"#));
    body.extend_from_slice(&envelope(
        0,
        &format!(r#"{{"data":{{"input":{{"stdin":"{}"}}}}}}"#, b64("piped\n")),
    ));
    let mut answer = None;
    for _ in 0..500 {
        let r = send(&s, "POST", "/process.Process/StreamInput", &h, body.clone()).await;
        let msgs = envelopes(&r.body);
        if msgs.len() == 2 {
            answer = Some(msgs);
            break;
        }
        assert_eq!(msgs[0].1["error"]["code"], "not_found", "{msgs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        answer.unwrap(),
        vec![(0, serde_json::json!({})), (2, serde_json::json!({}))]
    );
    let r = cat.await.unwrap();
    let out: Vec<u8> = envelopes(&r.body)
        .iter()
        .filter_map(|(_, m)| {
            m["event"]["data"]["stdout"]
                .as_str()
                .map(|_| unb64(&m["event"]["data"]["stdout"]))
        })
        .flatten()
        .collect();
    assert_eq!(out, b"piped\n");
    // Data before start is refused.
    let bad = envelope(
        0,
        &format!(r#"{{"data":{{"input":{{"stdin":"{}"}}}}}}"#, b64("x")),
    );
    let r = send(&s, "POST", "/process.Process/StreamInput", &h, bad).await;
    assert_eq!(envelopes(&r.body)[0].1["error"]["code"], "invalid_argument");
    s.stop().await;
}
