//! The database file: modes, pragmas, schema versions, the data folder.
//! One test, because it changes the process's umask and environment.

mod store_util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nanoclaw_server::db::{self, DbError, MIGRATIONS};
use store_util::{raw, TempDir};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn the_database_file_is_private_durable_and_versioned() {
    let tmp = TempDir::new("db");
    let data = tmp.path().join("a/b/data");
    let path = db::db_path(&data);

    // SAFETY: umask only changes the mode of files created after it.
    let old = unsafe { libc::umask(0) };
    let conn = db::open(&path).expect("open");
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1)")
        .expect("write");
    assert_eq!(mode(&data), 0o700, "data folder");
    assert_eq!(mode(&path), 0o600, "database file");
    for suffix in ["-wal", "-shm"] {
        let p = data.join(format!("nanoclaw.db{suffix}"));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }

    let pragma = |name: &str| -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .expect(name)
    };
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(journal, "wal");
    assert_eq!(pragma("synchronous"), 2, "FULL");
    assert_eq!(pragma("busy_timeout"), 10_000);
    assert_eq!(pragma("foreign_keys"), 1);
    assert_eq!(
        db::schema_version(&conn).expect("version"),
        MIGRATIONS.len() as i64
    );
    drop(conn);

    // A file widened by someone is narrowed again; reopening applies no
    // migration twice.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(db::open(&path).expect("reopen"));
    assert_eq!(mode(&path), 0o600);
    let rows: i64 = raw(&path)
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, MIGRATIONS.len() as i64);

    // A file from a newer nanoclaw is refused, not "migrated".
    raw(&path)
        .execute("INSERT INTO schema_version VALUES (99, 0)", [])
        .expect("insert");
    match db::open(&path) {
        Err(e @ DbError::TooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("upgrade nanoclaw"), "{e}")
        }
        other => panic!("expected TooNew, got {other:?}"),
    }

    // The data folder: --data, then NANOCLAW_DATA, then the defaults.
    let explicit = Path::new("/x/y");
    assert_eq!(db::data_dir(Some(explicit)).expect("dir"), explicit);
    std::env::set_var("NANOCLAW_DATA", "/from/env");
    assert_eq!(db::data_dir(None).expect("dir"), Path::new("/from/env"));
    assert_eq!(db::data_dir(Some(explicit)).expect("dir"), explicit);
    std::env::remove_var("NANOCLAW_DATA");
    std::env::remove_var("NANOCLAW_DATA_DIR");
    std::env::set_var("XDG_DATA_HOME", "/xdg");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let want = if root {
        db::ROOT_DATA_DIR.to_string()
    } else {
        "/xdg/nanoclaw".to_string()
    };
    assert_eq!(db::data_dir(None).expect("dir"), Path::new(&want));
}
