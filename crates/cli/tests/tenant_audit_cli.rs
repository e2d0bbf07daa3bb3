//! `nanoclaw tenant …` and `nanoclaw audit …` run as the real binary on a
//! data folder in a temp dir: outputs, exit codes (125 for bad input, 1
//! for a broken audit chain), and that a new API key only ever reaches
//! stdout.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use nanoclaw_server::audit::{kind, Audit, Captured, Record};
use nanoclaw_server::tenants::Tenants;

fn nanoclaw(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanoclaw"))
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("NANOCLAW_DATA")
        .env_remove("NANOCLAW_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run nanoclaw")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 0, and stdout.
fn ok(data: &Path, args: &[&str]) -> String {
    let o = nanoclaw(data, args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Exit 125 with one `nanoclaw: …` line on stderr, nothing on stdout.
fn refused(data: &Path, args: &[&str]) -> String {
    let o = nanoclaw(data, args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    assert!(err.starts_with("nanoclaw: "), "{err}");
    assert_eq!(stdout(&o), "", "{args:?}");
    err
}

fn db_bytes(data: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["nanoclaw.db", "nanoclaw.db-wal", "nanoclaw.db-shm"] {
        all.extend(std::fs::read(data.join(f)).unwrap_or_default());
    }
    all
}

#[test]
fn tenant_add_prints_the_key_once_and_stores_only_its_hash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    let o = nanoclaw(
        data,
        &[
            "tenant",
            "add",
            "acme",
            "--max-sandboxes",
            "5",
            "--max-memory",
            "4g",
            "--max-cpus",
            "2.5",
            "--max-lifetime",
            "1h",
            "--rate",
            "50",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let key = out.trim_end_matches('\n');
    assert_eq!(out, format!("{key}\n"), "stdout is the key alone");
    assert!(
        key.len() == 44
            && key.starts_with("e2b_")
            && key[4..]
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{key}"
    );
    let err = stderr(&o);
    assert!(err.contains("will not be shown again"), "{err}");
    assert!(!err.contains(key), "the key is on stdout only");

    let ls = ok(data, &["tenant", "ls"]);
    assert!(ls.contains("acme") && ls.contains(&key[..12]), "{ls}");
    assert!(!ls.contains(key), "{ls}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(data, &["tenant", "ls", "--json"])).expect("json");
    let t = &json[0];
    assert_eq!(t["name"], "acme");
    assert_eq!(t["quotas"]["max_sandboxes"], 5);
    assert_eq!(t["quotas"]["max_memory_mb"], 4096);
    assert_eq!(t["quotas"]["max_cpus"], 2.5);
    assert_eq!(t["quotas"]["max_lifetime_s"], 3600);
    assert_eq!(t["quotas"]["rate_per_s"], 50.0);
    assert_eq!(t["keys"][0]["id"], &key[..12]);
    assert!(!json.to_string().contains(key));

    let bytes = db_bytes(data);
    assert!(bytes.len() > 4096, "the database is there");
    let hay = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!hay(key.as_bytes()), "the key is in the database files");
    assert!(!hay(&key.as_bytes()[12..]), "the secret part is stored");

    // The printed key is the one that authenticates.
    let tenants = Tenants::open(&data.join("nanoclaw.db")).expect("open");
    let who = tenants.authenticate(key).expect("auth").map(|t| t.name);
    assert_eq!(who.as_deref(), Some("acme"));
}

#[test]
fn bad_tenant_input_is_one_line_exit_125_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    ok(data, &["tenant", "add", "acme"]);
    let e = refused(data, &["tenant", "add", "acme"]);
    assert!(e.contains("tenant \"acme\" already exists"), "{e}");
    for (args, needle) in [
        (&["tenant", "add", "Bad Name"][..], "invalid tenant name"),
        (
            &["tenant", "add", "x", "--max-memory", "lots"],
            "max-memory",
        ),
        (
            &["tenant", "add", "x", "--max-memory", "4096"],
            "max-memory",
        ),
        (&["tenant", "add", "x", "--max-cpus", "0"], "max-cpus"),
        (&["tenant", "add", "x", "--max-cpus", "-1.5"], "max-cpus"),
        (
            &["tenant", "add", "x", "--max-sandboxes", "-1"],
            "max-sandboxes",
        ),
        (
            &["tenant", "add", "x", "--max-sandboxes", "2.5"],
            "max-sandboxes",
        ),
        (
            &["tenant", "add", "x", "--max-lifetime", "soon"],
            "max-lifetime",
        ),
        (&["tenant", "add", "x", "--rate", "fast"], "rate"),
        (&["tenant", "set", "acme"], "nothing to change"),
        (&["tenant", "set", "acme", "--rate", "0"], "rate"),
        (
            &["tenant", "set", "nobody", "--rate", "5"],
            "no tenant \"nobody\"",
        ),
        (&["tenant", "rm", "nobody"], "no tenant \"nobody\""),
        (&["tenant", "key", "add", "nobody"], "no tenant \"nobody\""),
        (
            &["tenant", "key", "revoke", "acme", "e2b_ffff0000"],
            "has no API key",
        ),
        (
            &["tenant", "key", "revoke", "acme", "nonsense"],
            "invalid API key prefix",
        ),
        (&["tenant", "frobnicate"], "tenant"),
    ] {
        let e = refused(data, args);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(data, &["tenant", "ls", "--json"])).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["keys"].as_array().map(Vec::len), Some(1));
    assert_eq!(json[0]["quotas"]["rate_per_s"], serde_json::Value::Null);
}

#[test]
fn tenant_set_keys_and_rm() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    let k1 = ok(data, &["tenant", "add", "acme", "--max-cpus", "2"]);
    let k1 = k1.trim();
    let out = ok(
        data,
        &[
            "tenant",
            "set",
            "acme",
            "--max-cpus",
            "default",
            "--rate",
            "0.5",
        ],
    );
    assert!(
        out.contains("cpus 40*") && out.contains("rate 0.5/s"),
        "{out}"
    );

    let k2 = ok(data, &["tenant", "key", "add", "acme"]);
    let k2 = k2.trim();
    assert_ne!(k1, k2);
    let tenants = Tenants::open(&data.join("nanoclaw.db")).expect("open");
    let auth = |k: &str| tenants.authenticate(k).expect("auth").is_some();
    assert!(auth(k1) && auth(k2));

    let out = ok(data, &["tenant", "key", "revoke", "acme", &k1[..12]]);
    assert!(out.contains(&k1[..12]), "{out}");
    assert!(!auth(k1) && auth(k2));

    let out = ok(data, &["tenant", "rm", "acme"]);
    assert!(out.contains("removed tenant acme"), "{out}");
    assert!(!auth(k2), "rm removes the keys");
    assert_eq!(ok(data, &["tenant", "ls", "--json"]).trim(), "[]");
}

#[test]
fn the_data_folder_comes_from_nanoclaw_data_when_not_given() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("from-env");
    let o = Command::new(env!("CARGO_BIN_EXE_nanoclaw"))
        .args(["tenant", "add", "acme"])
        .env("NANOCLAW_DATA", &data)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(data.join("nanoclaw.db").is_file());
    assert!(ok(&data, &["tenant", "ls"]).contains("acme"));
}

/// Writes `n` records of two tenants and kinds through the library.
fn seed_audit(data: &Path, n: usize) -> Audit {
    let audit = Audit::open(&data.join("nanoclaw.db")).expect("open");
    for i in 0..n {
        let r = if i % 2 == 0 {
            Record {
                tenant: Some("acme".into()),
                sandbox: Some("sb1".into()),
                argv: Some(vec!["echo".into(), format!("hi {i}")]),
                exit_code: Some(0),
                duration_ms: Some(3),
                output: Some(Captured::of(format!("hi {i}\n").as_bytes())),
                ..Record::new(kind::EXEC)
            }
        } else {
            Record {
                tenant: Some("globex".into()),
                method: Some("POST".into()),
                path: Some("/sandboxes".into()),
                status: Some(201),
                ..Record::new(kind::REQUEST)
            }
        };
        audit.append(r).expect("append");
    }
    audit
}

#[test]
fn audit_ls_show_and_export() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    seed_audit(data, 6);
    let ls = ok(data, &["audit", "ls"]);
    assert_eq!(ls.lines().count(), 7, "{ls}");
    assert!(ls.contains("[echo hi 0] exit 0 3ms"), "{ls}");
    assert!(ls.contains("POST /sandboxes 201"), "{ls}");

    let only = ok(data, &["audit", "ls", "--tenant", "globex", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&only).expect("json");
    let seqs: Vec<_> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["seq"].as_i64())
        .collect();
    assert_eq!(seqs, [Some(2), Some(4), Some(6)]);
    let last2 = ok(data, &["audit", "ls", "--kind", "exec", "--limit", "2"]);
    assert_eq!(last2.lines().count(), 3, "{last2}");
    assert!(last2.contains("hi 2") && last2.contains("hi 4"), "{last2}");
    assert_eq!(
        ok(data, &["audit", "ls", "--since", "1h", "--sandbox", "sb1"])
            .lines()
            .count(),
        4
    );
    assert_eq!(
        ok(data, &["audit", "ls", "--until", "2000-01-01T00:00:00Z"])
            .lines()
            .count(),
        1,
        "header only"
    );

    let show: serde_json::Value =
        serde_json::from_str(&ok(data, &["audit", "show", "3"])).expect("json");
    assert_eq!(show["seq"], 3);
    assert_eq!(show["kind"], "exec");
    assert_eq!(show["output"]["head"], "hi 2\n");
    assert_eq!(show["hash"].as_str().map(str::len), Some(64));

    let export = ok(data, &["audit", "export"]);
    let lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert_eq!(lines.len(), 6);
    for w in lines.windows(2) {
        assert_eq!(w[1]["prev_hash"], w[0]["hash"], "exported chain links");
    }
    let verify = ok(data, &["audit", "verify"]);
    let head = lines[5]["hash"].as_str().expect("hash");
    assert_eq!(verify.trim(), format!("ok: 6 records, head {head}"));
    assert_eq!(
        ok(
            data,
            &["audit", "export", "--kind", "request", "--after", "2"]
        )
        .lines()
        .count(),
        2
    );

    for (args, needle) in [
        (&["audit", "show", "99"][..], "no audit record 99"),
        (&["audit", "ls", "--since", "yesterday"], "--since"),
        (&["audit", "ls", "--kind", "Exec!"], "kind"),
        (&["audit", "prune", "--older-than", "soon"], "--older-than"),
        (&["audit", "prune"], "--older-than"),
        (&["audit", "verify", "--expect-head", "abc"], "head hash"),
    ] {
        let e = refused(data, args);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn audit_verify_fails_with_exit_1_naming_the_tampered_record() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    seed_audit(data, 8);
    let out = ok(data, &["audit", "verify"]);
    assert!(out.starts_with("ok: 8 records, head "), "{out}");
    let head = out.trim().rsplit(' ').next().expect("head").to_string();
    assert!(ok(data, &["audit", "verify", "--expect-head", &head]).starts_with("ok: 8"));

    let c = rusqlite::Connection::open(data.join("nanoclaw.db")).expect("raw");
    let refused_sql = c.execute("UPDATE audit SET status = 200 WHERE seq = 4", []);
    assert!(refused_sql.is_err(), "the trigger refuses");
    c.execute_batch("DROP TRIGGER audit_no_update; UPDATE audit SET status = 200 WHERE seq = 4")
        .expect("tamper");
    let o = nanoclaw(data, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("FAILED at record 4: "), "{out}");
    assert!(out.contains("3 records before it verified"), "{out}");
    let o = nanoclaw(data, &["audit", "verify", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["first_bad"][0], 4);
}

#[test]
fn audit_expect_head_catches_tail_truncation_and_prune_keeps_verify_passing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path();
    let audit = seed_audit(data, 5);
    let out = ok(data, &["audit", "verify"]);
    let head = out.trim().rsplit(' ').next().expect("head").to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for _ in 0..3 {
        audit.append(Record::new(kind::KILL)).expect("append");
    }
    drop(audit);

    // Records older than 1s (the first 5) go; the newer ones and the chain stay.
    let out = ok(data, &["audit", "prune", "--older-than", "1s"]);
    assert!(out.starts_with("pruned 5 records (seq 1 to 5)"), "{out}");
    let out = ok(data, &["audit", "verify", "--expect-head", &head]);
    assert!(
        out.starts_with("ok: 4 records (after the retention anchor at seq 5), head "),
        "{out}"
    );
    let out = ok(data, &["audit", "prune", "--older-than", "30d"]);
    assert_eq!(out.trim(), "no records older than 30d");
    let out = ok(data, &["audit", "verify"]);
    let head = out.trim().rsplit(' ').next().expect("head").to_string();

    let c = rusqlite::Connection::open(data.join("nanoclaw.db")).expect("raw");
    c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 9")
        .expect("truncate the tail");
    assert!(ok(data, &["audit", "verify"]).starts_with("ok: 3 records"));
    let o = nanoclaw(data, &["audit", "verify", "--expect-head", &head]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("FAILED at record 9: ") && out.contains("tail truncation"),
        "{out}"
    );
}
