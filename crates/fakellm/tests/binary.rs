//! The `nanoclaw-fakellm` binary as other languages' suites use it (and,
//! being an integration test, it makes `cargo test --workspace` build the
//! binary that `crates/cli/tests/python_sdk.rs` hands to pytest).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn serves_a_script_file_and_refuses_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("nanoclaw-fakellm-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.json");
    std::fs::write(
        &script,
        r#"[{"unstreamed": {"text": "hello from the script"}}]"#,
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanoclaw-fakellm"))
        .args(["--kind", "anthropic", "--api-key", "sk-test", "--script"])
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    let body = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: sk-test\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello from the script"), "{answer}");

    std::fs::write(&script, r#"[{"reply": {"txt": "typo"}}]"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nanoclaw-fakellm"))
        .args(["--kind", "anthropic", "--script"])
        .arg(&script)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a valid script"));
    let _ = std::fs::remove_dir_all(&dir);
}
