//! The audit log on a real SQLite file: concurrent appends keep one chain,
//! tampering (as an attacker with write access to the file would) is
//! detected, triggers refuse changes, prune keeps the chain verifiable.

mod store_util;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nanoclaw_server::audit::{
    chain_hash, kind, Audit, Captured, Filter, Record, DEFAULT_CAPTURE_BYTES, GENESIS,
};
use store_util::{raw, TempDir};

const CHILD_ENV: &str = "NANOCLAW_STORE_TEST_CHILD_DB";
const CHILD_TAG_ENV: &str = "NANOCLAW_STORE_TEST_CHILD_TAG";
const PER_WRITER: usize = 40;

fn exec_record(i: usize, tag: &str) -> Record {
    Record {
        tenant: Some("acme".into()),
        sandbox: Some(format!("sb-{}", i % 3)),
        argv: Some(vec!["python3".into(), "-c".into(), format!("print({i})")]),
        exit_code: Some((i % 2) as i32),
        duration_ms: Some(12),
        detail: Some(format!("{tag}:{i}")),
        input: Some(Captured::of(format!("print({i})").as_bytes())),
        output: Some(Captured::of(format!("{i}\n").as_bytes())),
        ..Record::new(kind::EXEC)
    }
}

fn fill(audit: &Audit, n: usize) {
    for i in 0..n {
        audit.append(exec_record(i, "fill")).expect("append");
    }
}

fn assert_ok(audit: &Audit, count: u64) -> String {
    let r = audit.verify().expect("verify runs");
    assert_eq!(r.first_bad, None, "chain should verify: {r:?}");
    assert_eq!(r.count, count, "{r:?}");
    r.head
}

/// Not a test on its own: the body of the child processes of
/// `appends_from_threads_and_processes_form_one_chain`.
#[test]
fn child_appender() {
    let (Some(db), Some(tag)) = (
        std::env::var_os(CHILD_ENV),
        std::env::var(CHILD_TAG_ENV).ok(),
    ) else {
        return;
    };
    let audit = Audit::open(Path::new(&db)).expect("child opens");
    for i in 0..PER_WRITER {
        audit.append(exec_record(i, &tag)).expect("child appends");
    }
}

#[test]
fn appends_from_threads_and_processes_form_one_chain() {
    let dir = TempDir::new("audit-concurrent");
    let db = dir.db();
    // Create the schema once so every writer starts on the same file.
    drop(Audit::open(&db).expect("open"));
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..2)
        .map(|p| {
            Command::new(&exe)
                .args(["--exact", "child_appender", "--test-threads=1", "--quiet"])
                .env(CHILD_ENV, &db)
                .env(CHILD_TAG_ENV, format!("proc{p}"))
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                // Each thread its own connection: SQLite's locking, not our
                // mutex, must keep the chain straight.
                let audit = Audit::open(&db).expect("thread opens");
                for i in 0..PER_WRITER {
                    audit
                        .append(exec_record(i, &format!("thread{t}")))
                        .expect("thread appends");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    for mut c in children {
        assert!(c.wait().expect("child").success(), "a child failed");
    }
    let audit = Audit::open(&db).expect("open");
    let total = 6 * PER_WRITER;
    assert_ok(&audit, total as u64);
    let all = audit.query(&Filter::default()).expect("query");
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=total as i64).collect::<Vec<_>>());
    let details: HashSet<_> = all.iter().filter_map(|e| e.record.detail.clone()).collect();
    assert_eq!(details.len(), total, "every append is there exactly once");
    for w in ["proc0", "proc1", "thread0", "thread3"] {
        assert!(details.contains(&format!("{w}:{}", PER_WRITER - 1)), "{w}");
    }
    // Times never go backwards along the chain.
    assert!(all.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
}

#[test]
fn an_edited_field_is_detected_and_named() {
    let dir = TempDir::new("audit-edit");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    assert_ok(&audit, 10);
    let c = raw(&dir.db());
    c.execute_batch("DROP TRIGGER audit_no_update")
        .expect("attacker drops the trigger");
    c.execute("UPDATE audit SET exit_code = 0 WHERE seq = 6", [])
        .expect("attacker edits");
    let r = audit.verify().expect("verify runs");
    let (seq, why) = r.first_bad.clone().expect("edit detected");
    assert_eq!(seq, 6, "{why}");
    assert!(why.contains("hash does not match"), "{why}");
    assert_eq!(r.count, 5, "records before the edit are fine");
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let dir = TempDir::new("audit-rehash");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    assert_ok(&audit, 10);
    let mut e = audit.get(4).expect("get").expect("record 4");
    e.record.detail = Some("nothing to see here".into());
    let forged = chain_hash(e.seq, &e.prev_hash, e.time_ms, &e.time, &e.record);
    let c = raw(&dir.db());
    c.execute_batch("DROP TRIGGER audit_no_update")
        .expect("drop");
    c.execute(
        "UPDATE audit SET detail = ?1, hash = ?2 WHERE seq = 4",
        (e.record.detail.as_deref(), &forged),
    )
    .expect("attacker edits and rehashes");
    let r = audit.verify().expect("verify runs");
    let (seq, why) = r.first_bad.expect("rewrite detected");
    assert_eq!(seq, 5, "{why}");
    assert!(why.contains("prev_hash"), "{why}");
}

#[test]
fn a_deleted_record_is_detected_and_named() {
    let dir = TempDir::new("audit-delete");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    assert_ok(&audit, 10);
    let c = raw(&dir.db());
    c.execute_batch("DROP TRIGGER audit_no_delete")
        .expect("drop");
    c.execute("DELETE FROM audit WHERE seq = 7", [])
        .expect("attacker deletes");
    let (seq, why) = audit.verify().expect("verify").first_bad.expect("detected");
    assert_eq!(seq, 7, "{why}");
    assert!(why.contains("record 7 is missing"), "{why}");

    // Deleting the oldest records without an anchor is a gap at the start.
    c.execute("DELETE FROM audit WHERE seq <= 2", [])
        .expect("attacker deletes the oldest");
    let (seq, why) = audit.verify().expect("verify").first_bad.expect("detected");
    assert_eq!(seq, 1, "{why}");
}

#[test]
fn reordered_records_are_detected() {
    let dir = TempDir::new("audit-reorder");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    assert_ok(&audit, 10);
    let c = raw(&dir.db());
    c.execute_batch(
        "DROP TRIGGER audit_no_update;
         UPDATE audit SET seq = -4 WHERE seq = 4;
         UPDATE audit SET seq = 4 WHERE seq = 6;
         UPDATE audit SET seq = 6 WHERE seq = -4;",
    )
    .expect("attacker swaps records 4 and 6");
    let (seq, why) = audit.verify().expect("verify").first_bad.expect("detected");
    assert_eq!(seq, 4, "{why}");
}

#[test]
fn tail_truncation_needs_the_kept_head() {
    let dir = TempDir::new("audit-tail");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    let head = assert_ok(&audit, 10);
    // The kept head stays valid while the log grows.
    fill(&audit, 3);
    assert!(audit.verify_expecting(&head).expect("verify").is_ok());
    assert!(audit
        .verify_expecting(&head.to_uppercase())
        .expect("case-insensitive")
        .is_ok());
    assert!(audit.verify_expecting("abc").is_err(), "not a hash");

    let c = raw(&dir.db());
    c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq >= 9")
        .expect("attacker truncates");
    // The limit of a chain alone: the shorter chain is valid...
    assert_ok(&audit, 8);
    // ...and the kept head catches it.
    let r = audit.verify_expecting(&head).expect("verify");
    let (seq, why) = r.first_bad.expect("truncation detected");
    assert_eq!(seq, 9, "{why}");
    assert!(why.contains("tail truncation"), "{why}");
}

#[test]
fn triggers_refuse_updates_and_deletes() {
    let dir = TempDir::new("audit-triggers");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 5);
    let head = assert_ok(&audit, 5);
    let c = raw(&dir.db());
    for sql in [
        "UPDATE audit SET exit_code = 0 WHERE seq = 2",
        "UPDATE audit SET seq = 100 WHERE seq = 5",
        "DELETE FROM audit WHERE seq = 3",
        "DELETE FROM audit",
        "INSERT INTO audit_anchor (id, seq, hash, time_ms, pruned_total, pruned_at_ms) \
         VALUES (1, 3, 'forged', 0, 3, 0)",
    ] {
        let err = c.execute(sql, []).expect_err(sql).to_string();
        assert!(
            err.contains("append-only") || err.contains("anchor"),
            "{sql}: {err}"
        );
    }
    let r = audit.verify_expecting(&head).expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.count, 5);
}

#[test]
fn prune_keeps_the_chain_verifiable() {
    let dir = TempDir::new("audit-prune");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 10);
    std::thread::sleep(Duration::from_millis(30));
    let cutoff = nanoclaw_server::db::now_ms();
    std::thread::sleep(Duration::from_millis(5));
    fill(&audit, 5);
    let head = assert_ok(&audit, 15);

    let p = audit.prune_before(cutoff).expect("prune");
    assert_eq!(p.count, 10);
    assert_eq!(p.range, Some((1, 10)));
    let anchor = p.anchor.expect("anchor");
    assert_eq!(anchor.seq, 10);
    // 5 newer records and the note of the prune.
    let r = audit.verify_expecting(&head).expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.count, 6);
    assert_eq!(r.anchor.map(|a| a.seq), Some(10));
    let note = audit.get(16).expect("get").expect("prune note");
    assert_eq!(note.record.kind, kind::PRUNE);
    assert!(audit.get(10).expect("get").is_none());

    // Nothing old enough: nothing pruned, nothing recorded.
    assert_eq!(audit.prune_before(cutoff).expect("prune").count, 0);
    assert_ok(&audit, 6);

    assert_eq!(
        audit.prune(Duration::from_secs(3600)).expect("prune").count,
        0
    );

    // Prune everything: the chain continues from the anchor.
    let p = audit
        .prune_before(nanoclaw_server::db::now_ms() + 60_000)
        .expect("prune all");
    assert_eq!(p.range, Some((11, 16)));
    fill(&audit, 2);
    let r = audit.verify().expect("verify");
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.count, 3);
    assert_eq!(r.last_seq, 19);
    assert_eq!(r.anchor.map(|a| (a.seq, a.pruned_total)), Some((16, 16)));

    // Records after the anchor are still protected, and tampering after a
    // prune is still detected.
    let c = raw(&dir.db());
    assert!(c.execute("DELETE FROM audit WHERE seq = 18", []).is_err());
    assert!(c
        .execute("UPDATE audit_anchor SET seq = 5 WHERE id = 1", [])
        .is_err());
    c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 17")
        .expect("attacker deletes");
    let (seq, why) = audit.verify().expect("verify").first_bad.expect("detected");
    assert_eq!(seq, 17, "{why}");
}

#[test]
fn queries_filter_and_page() {
    let dir = TempDir::new("audit-query");
    let audit = Audit::open(&dir.db()).expect("open");
    fill(&audit, 9);
    let t_mid = nanoclaw_server::db::now_ms() + 1;
    std::thread::sleep(Duration::from_millis(5));
    audit
        .append(Record {
            tenant: Some("other".into()),
            method: Some("POST".into()),
            path: Some("/sandboxes".into()),
            status: Some(201),
            ..Record::new(kind::REQUEST)
        })
        .expect("append");
    let q = |f: Filter| -> Vec<i64> {
        audit
            .query(&f)
            .expect("query")
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(q(Filter::default()).len(), 10);
    assert_eq!(
        q(Filter {
            tenant: Some("other".into()),
            ..Filter::default()
        }),
        [10]
    );
    assert_eq!(
        q(Filter {
            kind: Some(kind::EXEC.into()),
            sandbox: Some("sb-0".into()),
            ..Filter::default()
        }),
        [1, 4, 7]
    );
    assert_eq!(
        q(Filter {
            since_ms: Some(t_mid),
            ..Filter::default()
        }),
        [10]
    );
    assert_eq!(
        q(Filter {
            until_ms: Some(t_mid),
            ..Filter::default()
        })
        .len(),
        9
    );
    assert_eq!(
        q(Filter {
            after_seq: Some(3),
            limit: Some(2),
            ..Filter::default()
        }),
        [4, 5]
    );
    assert_eq!(
        q(Filter {
            limit: Some(3),
            newest: true,
            ..Filter::default()
        }),
        [8, 9, 10]
    );
    let e = audit.get(10).expect("get").expect("exists");
    assert_eq!(e.record.status, Some(201));
    assert_eq!(e.record.method.as_deref(), Some("POST"));
    assert!(audit.get(11).expect("get").is_none());
    let j = serde_json::to_value(&e).expect("json");
    assert_eq!(j["seq"], 10);
    assert_eq!(j["kind"], "request");
    assert_eq!(j["hash"], e.hash.as_str());
}

#[test]
fn inputs_and_outputs_are_bounded_with_hash_and_length_of_the_whole() {
    let dir = TempDir::new("audit-capture");
    let audit = Audit::open(&dir.db()).expect("open");
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // A caller that did not bound its copy is bounded at append.
    let unbounded = Captured::with_limit(&big, usize::MAX);
    assert_eq!(unbounded.head.len(), big.len());
    let a = audit
        .append(Record {
            output: Some(unbounded.clone()),
            ..Record::new(kind::EXEC)
        })
        .expect("append");
    let e = audit.get(a.seq).expect("get").expect("exists");
    let out = e.record.output.expect("output");
    assert_eq!(out.head, big[..DEFAULT_CAPTURE_BYTES]);
    assert_eq!(out.len, 10_000);
    assert_eq!(out.sha256, unbounded.sha256);
    assert!(out.truncated());

    let small = audit.clone().with_capture_limit(16);
    let a = small
        .append(Record {
            input: Some(Captured::of(&big)),
            ..Record::new(kind::EXEC)
        })
        .expect("append");
    let e = audit.get(a.seq).expect("get").expect("exists");
    assert_eq!(e.record.input.map(|c| c.head.len()), Some(16));
    assert_ok(&audit, 2);
}

#[test]
fn bad_kinds_are_refused_and_nothing_is_written() {
    let dir = TempDir::new("audit-kind");
    let audit = Audit::open(&dir.db()).expect("open");
    assert!(audit.append(Record::new("Exec!")).is_err());
    let r = audit.verify().expect("verify");
    assert_eq!((r.count, r.head.as_str()), (0, GENESIS));
}

#[test]
fn the_handle_is_send_sync_and_usable_from_other_threads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync_clone::<Audit>();
    let dir = TempDir::new("audit-send");
    let audit = Audit::open(&dir.db()).expect("open");
    let handles: Vec<_> = (0..3)
        .map(|t| {
            let a = audit.clone();
            std::thread::spawn(move || a.append(exec_record(t, "shared")).map(|x| x.seq))
        })
        .collect();
    let mut seqs: Vec<i64> = handles
        .into_iter()
        .map(|h| h.join().expect("join").expect("append"))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3]);
    assert_ok(&audit, 3);
}

/// Polls `audit` (another connection) until it holds `n` records.
fn wait_for_count(audit: &Audit, n: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if audit.verify().expect("verify").count == n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_share_commits_and_keep_one_chain() {
    let dir = TempDir::new("audit-group");
    let audit = Audit::open(&dir.db()).expect("open");
    let reader = Audit::open(&dir.db()).expect("second connection");
    // Many appends at once, from tasks, while a thread appends through
    // the same handle the blocking way and another connection appends too.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let a = audit.clone();
            tokio::spawn(async move { a.append_async(exec_record(i, "task")).await })
        })
        .collect();
    let a = audit.clone();
    let db = dir.db();
    let thread = std::thread::spawn(move || {
        let other = Audit::open(&db).expect("third connection");
        for i in 0..20 {
            a.append(exec_record(i, "sync")).expect("sync append");
            other.append(exec_record(i, "other")).expect("other append");
        }
    });
    let mut seqs = Vec::new();
    for t in tasks {
        let appended = t.await.expect("task").expect("async append");
        // On disk (committed) when it returns: another connection sees it.
        let seen = reader.get(appended.seq).expect("get").expect("committed");
        assert_eq!(seen.hash, appended.hash);
        seqs.push(appended.seq);
    }
    thread.join().expect("thread");
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every append got its own seq");
    assert_ok(&reader, 240);
    let all = reader.query(&Filter::default()).expect("query");
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=240).collect::<Vec<_>>()
    );

    // A batch is written in order, each record its own link.
    let batch = (0..5).map(|i| exec_record(i, "batch")).collect();
    let appended = audit.append_all(batch).await.expect("batch");
    let seqs: Vec<i64> = appended.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (241..=245).collect::<Vec<_>>());
    assert_ok(&reader, 245);
    // A bad kind is refused before anything is written.
    let bad = vec![exec_record(0, "ok"), Record::new("Bad!")];
    assert!(audit.append_all(bad).await.is_err());
    assert_ok(&reader, 245);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_an_answer_wait_for_it_and_survive_its_cancellation() {
    use nanoclaw_server::audit::collect;
    let dir = TempDir::new("audit-answer");
    let audit = Audit::open(&dir.db()).expect("open");
    let reader = Audit::open(&dir.db()).expect("second connection");

    // Outside a request: appended (and durable) at once.
    audit
        .append_with_answer(exec_record(0, "alone"))
        .await
        .expect("append");
    assert_ok(&reader, 1);

    // Inside one: held for the answer, which writes them with its own.
    let a = audit.clone();
    let ((), mut deferred) = collect(async move {
        a.append_with_answer(exec_record(1, "create"))
            .await
            .expect("deferred");
    })
    .await;
    assert_ok(&reader, 1);
    let mut batch: Vec<Record> = deferred.take().into_iter().map(|(_, r)| r).collect();
    assert_eq!(batch.len(), 1);
    batch.push(Record::new(kind::REQUEST));
    let appended = audit.append_all(batch).await.expect("answer");
    assert_eq!(appended.iter().map(|a| a.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(
        reader
            .get(2)
            .expect("get")
            .expect("there")
            .record
            .detail
            .as_deref(),
        Some("create:1")
    );

    // A request dropped before it answered (its client left): its
    // records are written all the same.
    let a = audit.clone();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        collect(async move {
            a.append_with_answer(exec_record(2, "kill"))
                .await
                .expect("deferred");
            std::future::pending::<()>().await;
        }),
    )
    .await;
    assert!(cancelled.is_err());
    assert!(wait_for_count(&reader, 4), "the cancelled request's record");
    assert_eq!(
        reader
            .get(4)
            .expect("get")
            .expect("there")
            .record
            .detail
            .as_deref(),
        Some("kill:2")
    );
    assert_ok(&reader, 4);
}
