//! Tenants and API keys on a real SQLite file.

mod store_util;

use nanoclaw_server::tenants::{
    is_well_formed_key, key_hash, Change, QuotaChanges, Quotas, TenantError, Tenants,
    DEFAULT_MAX_LIFETIME_S, DEFAULT_MAX_SANDBOXES, DEFAULT_RATE_PER_S,
};
use store_util::{contains, db_bytes, raw, TempDir};

fn key_rows(db: &std::path::Path) -> i64 {
    raw(db)
        .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))
        .expect("count")
}

#[test]
fn the_key_is_returned_once_and_only_its_hash_is_stored() {
    let dir = TempDir::new("tenant-key");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let (t, key) = tenants.add("acme", Quotas::default()).expect("add");
    assert_eq!(t.name, "acme");
    assert!(is_well_formed_key(key.as_str()), "{key:?}");
    assert_eq!(t.keys.len(), 1);
    assert_eq!(t.keys[0].id, key.id());
    drop(tenants);

    let bytes = db_bytes(&dir.db());
    // Control: the hash is there, so this is the file the key went to.
    assert!(contains(&bytes, &key_hash(key.as_str())), "hash stored");
    assert!(!contains(&bytes, key.as_str().as_bytes()), "key stored");
    // Only the listed id's 8 hex digits are kept, none of the other 32.
    assert!(!contains(&bytes, &key.as_str().as_bytes()[12..]));
    assert!(!contains(&bytes, &key.as_str().as_bytes()[4..]));
}

#[test]
fn authenticate_right_wrong_and_malformed_keys() {
    let dir = TempDir::new("tenant-auth");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let (_, key) = tenants.add("acme", Quotas::default()).expect("add");
    let (_, other) = tenants.add("globex", Quotas::default()).expect("add");
    let who = |k: &str| tenants.authenticate(k).expect("auth").map(|t| t.name);
    assert_eq!(who(key.as_str()).as_deref(), Some("acme"));
    assert_eq!(who(other.as_str()).as_deref(), Some("globex"));
    let mut wrong = key.as_str().to_string();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(43.., last);
    assert_eq!(who(&wrong), None);
    for bad in [
        "",
        "e2b_",
        &key.as_str().to_uppercase()[..],
        &key.as_str()[..43],
        &format!("{}0", key.as_str()),
        &format!("sk_{}", &key.as_str()[4..]),
        &format!(" {}", key.as_str()),
    ] {
        assert_eq!(who(bad), None, "{bad:?}");
    }

    // Malformed keys never reach the database: with its tables gone, a
    // well-formed key fails with a database error, a malformed one does not.
    raw(&dir.db())
        .execute_batch("DROP TABLE api_keys")
        .expect("drop");
    assert!(tenants.authenticate(&wrong).is_err(), "well-formed: db hit");
    assert!(matches!(tenants.authenticate("e2b_nope"), Ok(None)));
    assert!(matches!(
        tenants.authenticate(&key.as_str()[..43]),
        Ok(None)
    ));
}

#[test]
fn duplicate_and_invalid_names_are_refused() {
    let dir = TempDir::new("tenant-dup");
    let tenants = Tenants::open(&dir.db()).expect("open");
    tenants.add("acme", Quotas::default()).expect("add");
    let e = tenants
        .add("acme", Quotas::default())
        .expect_err("duplicate");
    assert!(
        matches!(e, TenantError::Duplicate(ref n) if n == "acme"),
        "{e}"
    );
    assert_eq!(e.to_string(), "tenant \"acme\" already exists");
    for bad in ["Acme", "-x", "a b", "", "a/b"] {
        assert!(
            matches!(
                tenants.add(bad, Quotas::default()),
                Err(TenantError::InvalidName(_))
            ),
            "{bad}"
        );
    }
    assert_eq!(tenants.list().expect("list").len(), 1);
    assert_eq!(key_rows(&dir.db()), 1, "a refused add leaves no key");
}

/// A removed tenant's name is never given to a new tenant: the audit log
/// and the daemon's sandbox records name tenants, and a new "acme" must not
/// inherit the old one's sandboxes or history.
#[test]
fn a_removed_tenants_name_is_not_reused() {
    let dir = TempDir::new("tenant-retired");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let (_, key) = tenants.add("acme", Quotas::default()).expect("add");
    tenants.remove("acme").expect("remove");
    assert!(matches!(tenants.authenticate(key.as_str()), Ok(None)));
    let e = tenants
        .add("acme", Quotas::default())
        .expect_err("a retired name");
    assert!(
        matches!(e, TenantError::Retired(ref n) if n == "acme"),
        "{e}"
    );
    assert!(e.to_string().contains("pick another name"), "{e}");
    assert!(matches!(tenants.get("acme"), Err(TenantError::NotFound(_))));
    tenants
        .add("acme2", Quotas::default())
        .expect("another name");
    // Retired in the file, for every process that opens it.
    let again = Tenants::open(&dir.db()).expect("open again");
    assert!(matches!(
        again.add("acme", Quotas::default()),
        Err(TenantError::Retired(_))
    ));
}

#[test]
fn quotas_defaults_set_and_reset() {
    let dir = TempDir::new("tenant-quota");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let q = Quotas {
        max_sandboxes: Some(3),
        max_memory_mb: Some(4096),
        max_cpus: Some(2.5),
        ..Quotas::default()
    };
    let (t, _) = tenants.add("acme", q).expect("add");
    assert_eq!(t.quotas, q);
    assert_eq!(t.limits.max_sandboxes, 3);
    assert_eq!(t.limits.max_cpus, 2.5);
    assert_eq!(t.limits.max_lifetime_s, DEFAULT_MAX_LIFETIME_S);
    assert_eq!(t.limits.rate_per_s, DEFAULT_RATE_PER_S);

    let t = tenants
        .set(
            "acme",
            &QuotaChanges {
                max_sandboxes: Change::Default,
                max_lifetime_s: Change::Set(60),
                rate_per_s: Change::Set(0.5),
                ..QuotaChanges::default()
            },
        )
        .expect("set");
    assert_eq!(t.quotas.max_sandboxes, None);
    assert_eq!(t.limits.max_sandboxes, DEFAULT_MAX_SANDBOXES);
    assert_eq!(t.quotas.max_memory_mb, Some(4096), "kept");
    assert_eq!(t.quotas.max_lifetime_s, Some(60));
    assert_eq!(t.quotas.rate_per_s, Some(0.5));
    assert_eq!(tenants.get("acme").expect("get"), t, "stored as returned");

    // Out-of-range values are refused and change nothing.
    for bad in [
        QuotaChanges {
            max_sandboxes: Change::Set(0),
            ..QuotaChanges::default()
        },
        QuotaChanges {
            max_cpus: Change::Set(f64::NAN),
            ..QuotaChanges::default()
        },
        QuotaChanges {
            max_memory_mb: Change::Set(0),
            ..QuotaChanges::default()
        },
    ] {
        let e = tenants.set("acme", &bad).expect_err("refused");
        assert!(matches!(e, TenantError::InvalidQuota { .. }), "{e}");
    }
    assert_eq!(tenants.get("acme").expect("get"), t);
    assert!(matches!(
        tenants.add(
            "bad",
            Quotas {
                max_cpus: Some(-1.0),
                ..Quotas::default()
            }
        ),
        Err(TenantError::InvalidQuota {
            field: "max-cpus",
            ..
        })
    ));
    assert!(matches!(
        tenants.set("nobody", &QuotaChanges::default()),
        Err(TenantError::NotFound(_))
    ));
}

#[test]
fn keys_are_added_and_revoked() {
    let dir = TempDir::new("tenant-keys");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let (_, k1) = tenants.add("acme", Quotas::default()).expect("add");
    let k2 = tenants.add_key("acme").expect("add key");
    let k3 = tenants.add_key("acme").expect("add key");
    assert_eq!(tenants.get("acme").expect("get").keys.len(), 3);
    for k in [&k1, &k2, &k3] {
        assert!(tenants.authenticate(k.as_str()).expect("auth").is_some());
    }
    assert_eq!(
        tenants.revoke_key("acme", k1.id()).expect("revoke"),
        k1.id()
    );
    assert!(tenants.authenticate(k1.as_str()).expect("auth").is_none());
    assert!(tenants.authenticate(k2.as_str()).expect("auth").is_some());
    // The whole key works as a prefix too.
    tenants
        .revoke_key("acme", k2.as_str())
        .expect("revoke by key");
    assert!(tenants.authenticate(k2.as_str()).expect("auth").is_none());
    assert!(matches!(
        tenants.revoke_key("acme", k1.id()),
        Err(TenantError::KeyNotFound { .. })
    ));
    for bad in ["e2b_", "e2b_12", "12345678", "e2b_%", "e2b_zzzz"] {
        assert!(
            matches!(
                tenants.revoke_key("acme", bad),
                Err(TenantError::InvalidPrefix(_))
            ),
            "{bad}"
        );
    }
    // Another tenant's key cannot be revoked through this one.
    let (_, g) = tenants.add("globex", Quotas::default()).expect("add");
    assert!(matches!(
        tenants.revoke_key("acme", g.id()),
        Err(TenantError::KeyNotFound { .. })
    ));
    assert!(tenants.authenticate(k3.as_str()).expect("auth").is_some());
    assert!(tenants.authenticate(g.as_str()).expect("auth").is_some());
}

#[test]
fn remove_deletes_the_tenant_and_its_keys() {
    let dir = TempDir::new("tenant-rm");
    let tenants = Tenants::open(&dir.db()).expect("open");
    let (_, k1) = tenants.add("acme", Quotas::default()).expect("add");
    let k2 = tenants.add_key("acme").expect("add key");
    let (_, g) = tenants.add("globex", Quotas::default()).expect("add");
    assert_eq!(key_rows(&dir.db()), 3);
    tenants.remove("acme").expect("rm");
    assert_eq!(key_rows(&dir.db()), 1, "only globex's key is left");
    assert!(tenants.authenticate(k1.as_str()).expect("auth").is_none());
    assert!(tenants.authenticate(k2.as_str()).expect("auth").is_none());
    assert!(tenants.authenticate(g.as_str()).expect("auth").is_some());
    assert!(matches!(tenants.get("acme"), Err(TenantError::NotFound(_))));
    assert!(matches!(
        tenants.remove("acme"),
        Err(TenantError::NotFound(_))
    ));
    // The name is retired (a_removed_tenants_name_is_not_reused).
    let names: Vec<_> = tenants
        .list()
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["globex"]);
}
