//! Key metadata store tests: the same checks on SQLite (temp dir) and PostgreSQL (fresh database,
//! see `common`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_server::store::{
    self, KeyRecord, KeyState, KeyStore, KeyVersionRecord, PostgresStore, SqliteStore, StoreError,
    VersionState,
};
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use uuid::Uuid;

const T0: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// Harness

/// One store under test, with what it takes to reopen it and to clean up after it.
struct TestDb {
    store: Arc<dyn KeyStore>,
    url: String,
    /// SQLite: the directory holding the database file.
    dir: Option<TempDir>,
    /// PostgreSQL: the database to drop at the end.
    pg_database: Option<String>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("kms.db").display());
        let store = store::connect(&url).await.expect("open sqlite store");
        TestDb {
            store,
            url,
            dir: Some(dir),
            pg_database: None,
        }
    }

    async fn postgres() -> TestDb {
        let (name, url) = common::create_pg_database().await;
        let store = match store::connect(&url).await {
            Ok(store) => store,
            Err(err) => {
                common::drop_pg_database(&name);
                panic!("open postgres store on {name}: {err:?}");
            }
        };
        TestDb {
            store,
            url,
            dir: None,
            pg_database: Some(name),
        }
    }

    fn sqlite_path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .expect("a sqlite test db")
            .path()
            .join("kms.db")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_database.take() {
            common::drop_pg_database(&name);
        }
    }
}

/// Runs each listed test function against both databases: `sqlite::<name>` and `postgres::<name>`.
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::TestDb::postgres().await).await;
                }
            )*
        }
    };
}

store_tests!(
    ping_answers,
    insert_and_get_by_id_and_alias,
    duplicate_alias_is_conflict,
    insert_key_rejects_inconsistent_first_version,
    list_keys_pages_in_key_id_order,
    update_key_is_compare_and_swap_on_state,
    version_states_and_due_queries,
    versions_add_get_list,
    add_version_duplicate_is_conflict,
    add_version_make_primary_is_atomic,
    concurrent_add_version_one_wins,
    backend_ref_bytes_round_trip,
    migrations_are_idempotent,
    schema_requires_primary_version_to_exist,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn key_with_id(key_id: Uuid, alias: Option<&str>) -> (KeyRecord, KeyVersionRecord) {
    let key = KeyRecord {
        key_id,
        alias: alias.map(str::to_string),
        description: format!("test key {key_id}"),
        state: KeyState::Enabled,
        primary_version: 1,
        created_at_ms: T0,
        backend: "pkcs11".to_string(),
        rotation_period_ms: None,
        next_rotation_ms: None,
        min_decryption_version: 1,
        deletion_at_ms: None,
    };
    let version = version_of(key_id, 1, format!("kms:{key_id}:v1").into_bytes());
    (key, version)
}

fn new_key(alias: Option<&str>) -> (KeyRecord, KeyVersionRecord) {
    key_with_id(Uuid::new_v4(), alias)
}

fn version_of(key_id: Uuid, version: u32, backend_ref: Vec<u8>) -> KeyVersionRecord {
    KeyVersionRecord {
        key_id,
        version,
        backend_ref,
        state: VersionState::Enabled,
        created_at_ms: T0 + i64::from(version),
    }
}

async fn insert_new_key(
    store: &dyn KeyStore,
    alias: Option<&str>,
) -> (KeyRecord, KeyVersionRecord) {
    let (key, v1) = new_key(alias);
    store.insert_key(&key, &v1).await.expect("insert_key");
    (key, v1)
}

async fn primary_of(store: &dyn KeyStore, key_id: Uuid) -> u32 {
    store
        .get_key(key_id)
        .await
        .unwrap()
        .expect("key exists")
        .primary_version
}

// ---------------------------------------------------------------------------------------------
// Tests run against both databases

async fn ping_answers(db: TestDb) {
    db.store.ping().await.expect("ping");
}

async fn insert_and_get_by_id_and_alias(db: TestDb) {
    let store = db.store.as_ref();
    let (key, v1) = insert_new_key(store, Some("payments")).await;
    let (plain, plain_v1) = insert_new_key(store, None).await;

    assert_eq!(store.get_key(key.key_id).await.unwrap(), Some(key.clone()));
    assert_eq!(
        store.get_key_by_alias("payments").await.unwrap(),
        Some(key.clone())
    );
    assert_eq!(
        store.get_key(plain.key_id).await.unwrap(),
        Some(plain.clone())
    );
    assert_eq!(store.get_version(key.key_id, 1).await.unwrap(), Some(v1));
    assert_eq!(
        store.get_version(plain.key_id, 1).await.unwrap(),
        Some(plain_v1)
    );

    assert_eq!(store.get_key(Uuid::new_v4()).await.unwrap(), None);
    assert_eq!(store.get_key_by_alias("nope").await.unwrap(), None);
    assert_eq!(
        store.get_key_by_alias("PAYMENTS").await.unwrap(),
        None,
        "aliases are case-sensitive"
    );
}

async fn duplicate_alias_is_conflict(db: TestDb) {
    let store = db.store.as_ref();
    let (first, _) = insert_new_key(store, Some("orders")).await;
    let (second, second_v1) = new_key(Some("orders"));

    match store.insert_key(&second, &second_v1).await {
        Err(StoreError::Conflict(msg)) => {
            assert!(
                msg.contains("alias"),
                "message should name the alias conflict: {msg:?}"
            );
            assert!(
                !msg.contains("orders"),
                "message should not echo values: {msg:?}"
            );
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // Nothing of the second key was kept, the first is untouched.
    assert_eq!(store.get_key(second.key_id).await.unwrap(), None);
    assert!(store.list_versions(second.key_id).await.unwrap().is_empty());
    assert_eq!(store.get_key_by_alias("orders").await.unwrap(), Some(first));

    // Several keys without an alias are fine (NULLs are not duplicates).
    insert_new_key(store, None).await;
    insert_new_key(store, None).await;

    // The same key id twice is a Conflict too.
    let (again, again_v1) = key_with_id(second.key_id, None);
    store.insert_key(&again, &again_v1).await.unwrap();
    let (dup, dup_v1) = key_with_id(second.key_id, Some("other"));
    assert!(matches!(
        store.insert_key(&dup, &dup_v1).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn insert_key_rejects_inconsistent_first_version(db: TestDb) {
    let store = db.store.as_ref();
    let (mut key, v1) = new_key(Some("inconsistent"));
    key.primary_version = 2;
    assert!(matches!(
        store.insert_key(&key, &v1).await,
        Err(StoreError::Internal(_))
    ));

    let (key, _) = new_key(Some("inconsistent"));
    let (_, foreign_v1) = new_key(None);
    assert!(matches!(
        store.insert_key(&key, &foreign_v1).await,
        Err(StoreError::Internal(_))
    ));

    assert_eq!(store.get_key_by_alias("inconsistent").await.unwrap(), None);
    assert!(store.list_keys(None, 10).await.unwrap().is_empty());
}

async fn list_keys_pages_in_key_id_order(db: TestDb) {
    let store = db.store.as_ref();
    assert!(store.list_keys(None, 10).await.unwrap().is_empty());

    // Ids whose order differs between "first byte signed" and unsigned orders, plus random ones.
    let mut ids = vec![
        Uuid::from_u128(0x8000_0000_0000_4000_8000_0000_0000_0000),
        Uuid::from_u128(0x7fff_ffff_ffff_4fff_bfff_ffff_ffff_ffff),
        Uuid::from_u128(0xffff_ffff_ffff_4fff_bfff_ffff_ffff_ffff),
        Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001),
        Uuid::from_u128(0x0a00_0000_0000_4000_8000_0000_0000_0000),
    ];
    ids.extend((0..4).map(|_| Uuid::new_v4()));
    for (i, id) in ids.iter().enumerate() {
        let alias = format!("k{i}");
        let (key, v1) = key_with_id(*id, Some(&alias));
        store.insert_key(&key, &v1).await.unwrap();
    }
    ids.sort();

    let all: Vec<Uuid> = store
        .list_keys(None, 100)
        .await
        .unwrap()
        .iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(all, ids, "list_keys orders by key id (UUID byte order)");

    let mut paged = Vec::new();
    let mut after = None;
    let mut pages = Vec::new();
    loop {
        let page = store.list_keys(after, 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        pages.push(page.len());
        after = page.last().map(|k| k.key_id);
        paged.extend(page.iter().map(|k| k.key_id));
    }
    assert_eq!(pages, vec![4, 4, 1]);
    assert_eq!(paged, ids);

    // `after` is exclusive, need not be a stored id, and limit 0 gives nothing.
    assert_eq!(
        store
            .list_keys(Some(ids[2]), 2)
            .await
            .unwrap()
            .iter()
            .map(|k| k.key_id)
            .collect::<Vec<_>>(),
        ids[3..5].to_vec()
    );
    let before_all = Uuid::nil();
    assert_eq!(
        store.list_keys(Some(before_all), 100).await.unwrap().len(),
        ids.len()
    );
    assert!(store
        .list_keys(Some(Uuid::max()), 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store.list_keys(None, 0).await.unwrap().is_empty());

    // Full records come back, not just ids.
    let first = store.list_keys(None, 1).await.unwrap();
    assert_eq!(first, vec![store.get_key(ids[0]).await.unwrap().unwrap()]);
}

async fn update_key_is_compare_and_swap_on_state(db: TestDb) {
    let store = db.store.as_ref();
    let (key, _) = insert_new_key(store, Some("stateful")).await;

    let mut current = key.clone();
    for next in [
        KeyRecord {
            state: KeyState::Disabled,
            rotation_period_ms: Some(86_400_000),
            next_rotation_ms: Some(T0 + 86_400_000),
            ..key.clone()
        },
        KeyRecord {
            state: KeyState::PendingDeletion,
            deletion_at_ms: Some(T0 + 7),
            ..key.clone()
        },
        KeyRecord {
            state: KeyState::Destroyed,
            deletion_at_ms: Some(T0 + 8),
            min_decryption_version: 1,
            ..key.clone()
        },
    ] {
        let updated = store
            .update_key(&next, current.state)
            .await
            .unwrap()
            .expect("state matched");
        assert_eq!(updated, next);
        assert_eq!(store.get_key(key.key_id).await.unwrap(), Some(next.clone()));
        current = next;
    }
    // A stale expected state changes nothing.
    let stale = KeyRecord {
        state: KeyState::Enabled,
        ..key.clone()
    };
    assert_eq!(
        store.update_key(&stale, KeyState::Enabled).await.unwrap(),
        None
    );
    assert_eq!(store.get_key(key.key_id).await.unwrap(), Some(current));
    // An unknown key is None too.
    let (ghost, _) = new_key(None);
    assert_eq!(
        store.update_key(&ghost, KeyState::Enabled).await.unwrap(),
        None
    );
    // The schema refuses a pending deletion without a date.
    let (other, _) = insert_new_key(store, Some("other")).await;
    let undated = KeyRecord {
        state: KeyState::PendingDeletion,
        deletion_at_ms: None,
        ..other
    };
    assert!(store.update_key(&undated, KeyState::Enabled).await.is_err());
}

async fn version_states_and_due_queries(db: TestDb) {
    let store = db.store.as_ref();
    let (key, _) = insert_new_key(store, Some("due")).await;
    let v2 = version_of(key.key_id, 2, b"v2".to_vec());
    store.add_version(&v2, false).await.unwrap();
    let disabled = store
        .set_version_state(key.key_id, 2, VersionState::Disabled)
        .await
        .unwrap()
        .expect("version exists");
    assert_eq!(disabled.state, VersionState::Disabled);
    assert_eq!(
        store
            .get_version(key.key_id, 2)
            .await
            .unwrap()
            .unwrap()
            .state,
        VersionState::Disabled
    );
    assert!(store
        .set_version_state(key.key_id, 9, VersionState::Disabled)
        .await
        .unwrap()
        .is_none());

    // Rotation due: only ENABLED keys whose next rotation has passed.
    assert!(store
        .keys_due_for_rotation(T0 + 10, 10)
        .await
        .unwrap()
        .is_empty());
    let rotating = KeyRecord {
        rotation_period_ms: Some(1000),
        next_rotation_ms: Some(T0 + 5),
        ..key.clone()
    };
    store
        .update_key(&rotating, KeyState::Enabled)
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .keys_due_for_rotation(T0 + 4, 10)
        .await
        .unwrap()
        .is_empty());
    let due = store.keys_due_for_rotation(T0 + 5, 10).await.unwrap();
    assert_eq!(due, vec![rotating.clone()]);
    // Making a new version primary moves the next rotation to its creation + period.
    let v3 = KeyVersionRecord {
        created_at_ms: T0 + 100,
        ..version_of(key.key_id, 3, b"v3".to_vec())
    };
    store.add_version(&v3, true).await.unwrap();
    let after = store.get_key(key.key_id).await.unwrap().unwrap();
    assert_eq!(after.primary_version, 3);
    assert_eq!(after.next_rotation_ms, Some(T0 + 1100));

    // Deletion due: PENDING_DELETION keys whose date has passed; no new primary version then.
    let pending = KeyRecord {
        state: KeyState::PendingDeletion,
        deletion_at_ms: Some(T0 + 50),
        ..after.clone()
    };
    store
        .update_key(&pending, KeyState::Enabled)
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .keys_due_for_rotation(T0 + 5000, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .keys_due_for_deletion(T0 + 49, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.keys_due_for_deletion(T0 + 50, 10).await.unwrap(),
        vec![pending]
    );
    let v4 = version_of(key.key_id, 4, b"v4".to_vec());
    assert!(matches!(
        store.add_version(&v4, true).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_versions(key.key_id).await.unwrap().len(), 3);
}

async fn versions_add_get_list(db: TestDb) {
    let store = db.store.as_ref();
    let (key, v1) = insert_new_key(store, None).await;
    let (other, other_v1) = insert_new_key(store, None).await;

    let v2 = KeyVersionRecord {
        state: VersionState::Disabled,
        ..version_of(key.key_id, 2, b"ref-2".to_vec())
    };
    let v3 = KeyVersionRecord {
        state: VersionState::Destroyed,
        ..version_of(key.key_id, 3, b"ref-3".to_vec())
    };
    store.add_version(&v2, false).await.unwrap();
    store.add_version(&v3, false).await.unwrap();

    assert_eq!(
        store.get_version(key.key_id, 2).await.unwrap(),
        Some(v2.clone())
    );
    assert_eq!(
        store.get_version(key.key_id, 3).await.unwrap(),
        Some(v3.clone())
    );
    assert_eq!(store.get_version(key.key_id, 4).await.unwrap(), None);
    assert_eq!(store.get_version(Uuid::new_v4(), 1).await.unwrap(), None);
    assert_eq!(
        store.list_versions(key.key_id).await.unwrap(),
        vec![v1, v2, v3]
    );
    assert_eq!(
        store.list_versions(other.key_id).await.unwrap(),
        vec![other_v1]
    );
    assert!(store
        .list_versions(Uuid::new_v4())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(primary_of(store, key.key_id).await, 1);

    // A version of a key that does not exist is refused and not stored.
    let orphan = version_of(Uuid::new_v4(), 2, b"orphan".to_vec());
    assert!(store.add_version(&orphan, true).await.is_err());
    assert!(store.list_versions(orphan.key_id).await.unwrap().is_empty());
}

async fn add_version_duplicate_is_conflict(db: TestDb) {
    let store = db.store.as_ref();
    let (key, v1) = insert_new_key(store, None).await;
    let v2 = version_of(key.key_id, 2, b"original".to_vec());
    store.add_version(&v2, false).await.unwrap();

    let v2_again = version_of(key.key_id, 2, b"replacement".to_vec());
    assert!(matches!(
        store.add_version(&v2_again, true).await,
        Err(StoreError::Conflict(_))
    ));
    let v1_again = version_of(key.key_id, 1, b"replacement".to_vec());
    assert!(matches!(
        store.add_version(&v1_again, false).await,
        Err(StoreError::Conflict(_))
    ));

    assert_eq!(store.list_versions(key.key_id).await.unwrap(), vec![v1, v2]);
    assert_eq!(
        primary_of(store, key.key_id).await,
        1,
        "a failed add_version changes nothing"
    );
}

async fn add_version_make_primary_is_atomic(db: TestDb) {
    let store = db.store.as_ref();
    let (key, _) = insert_new_key(store, Some("rotating")).await;

    store
        .add_version(&version_of(key.key_id, 2, b"v2".to_vec()), true)
        .await
        .unwrap();
    assert_eq!(primary_of(store, key.key_id).await, 2);
    store
        .add_version(&version_of(key.key_id, 3, b"v3".to_vec()), false)
        .await
        .unwrap();
    assert_eq!(
        primary_of(store, key.key_id).await,
        2,
        "make_primary = false keeps the primary"
    );

    // Not the next version: refused as a whole, neither the row nor the primary change.
    let gap = version_of(key.key_id, 5, b"v5".to_vec());
    assert!(store.add_version(&gap, true).await.is_err());
    assert_eq!(store.get_version(key.key_id, 5).await.unwrap(), None);
    assert_eq!(primary_of(store, key.key_id).await, 2);

    store
        .add_version(&version_of(key.key_id, 4, b"v4".to_vec()), true)
        .await
        .unwrap();
    let after = store.get_key(key.key_id).await.unwrap().unwrap();
    assert_eq!(
        after,
        KeyRecord {
            primary_version: 4,
            ..key
        }
    );
    assert_eq!(
        store.get_key_by_alias("rotating").await.unwrap(),
        Some(after)
    );
}

async fn concurrent_add_version_one_wins(db: TestDb) {
    let store = db.store.clone();
    let (key, _) = insert_new_key(store.as_ref(), None).await;

    let mut tasks = Vec::new();
    for i in 0..4u8 {
        let store = store.clone();
        let version = version_of(key.key_id, 2, vec![i]);
        tasks.push(tokio::spawn(async move {
            store.add_version(&version, true).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(other) => panic!("expected Ok or Conflict, got {other:?}"),
        }
    }
    assert_eq!(
        ok, 1,
        "exactly one concurrent add_version of version 2 wins"
    );
    assert_eq!(store.list_versions(key.key_id).await.unwrap().len(), 2);
    assert_eq!(primary_of(store.as_ref(), key.key_id).await, 2);
}

async fn backend_ref_bytes_round_trip(db: TestDb) {
    let store = db.store.as_ref();
    let all_bytes: Vec<u8> = (0..=255u8).rev().collect();
    let (key, mut v1) = new_key(None);
    // Invalid UTF-8 (lone continuation bytes, truncated sequences) and NULs.
    v1.backend_ref = vec![
        0x00, 0xff, 0xc3, 0x28, 0xa0, 0xa1, 0xf0, 0x28, 0x8c, 0x28, 0x00,
    ];
    store.insert_key(&key, &v1).await.unwrap();

    let refs: Vec<Vec<u8>> = vec![
        all_bytes.clone(),
        Vec::new(),
        vec![0u8; 1],
        all_bytes.iter().cycle().take(64 * 1024).copied().collect(),
    ];
    for (i, backend_ref) in refs.iter().enumerate() {
        let version = version_of(
            key.key_id,
            u32::try_from(i).unwrap() + 2,
            backend_ref.clone(),
        );
        store.add_version(&version, false).await.unwrap();
    }

    assert_eq!(
        store
            .get_version(key.key_id, 1)
            .await
            .unwrap()
            .unwrap()
            .backend_ref,
        v1.backend_ref
    );
    for (i, backend_ref) in refs.iter().enumerate() {
        let stored = store
            .get_version(key.key_id, u32::try_from(i).unwrap() + 2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &stored.backend_ref,
            backend_ref,
            "backend_ref of version {}",
            i + 2
        );
    }
    let listed = store.list_versions(key.key_id).await.unwrap();
    assert_eq!(listed[0].backend_ref, v1.backend_ref);
    assert_eq!(listed[1].backend_ref, all_bytes);
}

async fn migrations_are_idempotent(db: TestDb) {
    let (key, v1) = insert_new_key(db.store.as_ref(), Some("survivor")).await;
    db.store
        .migrate()
        .await
        .expect("second migrate on the same pool");

    // A second, independent connect (which migrates again) sees the same data.
    let again = store::connect(&db.url).await.expect("reconnect");
    again.migrate().await.expect("migrate again");
    assert_eq!(
        again.get_key_by_alias("survivor").await.unwrap(),
        Some(key.clone())
    );
    assert_eq!(again.list_versions(key.key_id).await.unwrap(), vec![v1]);
}

async fn schema_requires_primary_version_to_exist(db: TestDb) {
    // Below the trait: the database itself refuses a key whose primary version has no row.
    // The foreign key is deferred: the UPDATE passes, the COMMIT fails.
    let (key, _) = insert_new_key(db.store.as_ref(), None).await;
    let commit = if db.pg_database.is_some() {
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("UPDATE keys SET primary_version = 7 WHERE key_id = $1")
            .bind(key.key_id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await
    } else {
        // sqlx turns foreign keys on for every SQLite connection.
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("UPDATE keys SET primary_version = 7 WHERE key_id = ?1")
            .bind(key.key_id.hyphenated().to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await
    };
    match commit {
        Err(sqlx::Error::Database(err)) if err.is_foreign_key_violation() => {}
        other => panic!("expected a foreign key violation at COMMIT, got {other:?}"),
    }
    assert_eq!(primary_of(db.store.as_ref(), key.key_id).await, 1);
}

// ---------------------------------------------------------------------------------------------
// SQLite only

/// The permission bits of `path`, in octal as `ls` shows them ("600").
fn mode_of(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    format!("{:o}", meta.permissions().mode() & 0o777)
}

#[tokio::test]
async fn sqlite_files_are_created_private() {
    let db = TestDb::sqlite().await;
    // Write something so the WAL is in use.
    insert_new_key(db.store.as_ref(), Some("private")).await;
    let path = db.sqlite_path();
    assert_eq!(mode_of(&path), "600", "database file mode");
    for suffix in ["-wal", "-shm"] {
        let mut name = path.clone().into_os_string();
        name.push(suffix);
        let companion = PathBuf::from(name);
        assert!(
            companion.exists(),
            "{} should exist in WAL mode",
            companion.display()
        );
        assert_eq!(mode_of(&companion), "600", "{suffix} file mode");
    }
}

/// The pool's connections checkpoint only after 10,000 WAL pages (`WAL_AUTOCHECKPOINT_PAGES`),
/// as the audit appender's do: after 400 key creations (about 2,200 pages) the WAL still holds
/// them all. With SQLite's default (1,000) it would hold at most ~1,000.
#[tokio::test]
async fn sqlite_pool_checkpoints_only_after_10000_wal_pages() {
    let db = TestDb::sqlite().await;
    for _ in 0..400 {
        insert_new_key(db.store.as_ref(), None).await;
    }
    let wal_frames = common::sqlite_wal_frames(&db.url).await;
    assert!(
        (1500..10_000).contains(&wal_frames),
        "the WAL holds {wal_frames} frames: it was checkpointed and restarted early"
    );
}

#[tokio::test]
async fn sqlite_database_is_in_wal_mode() {
    let db = TestDb::sqlite().await;
    // journal_mode = WAL is stored in the database file; a plain connection (which sets no
    // journal mode) reads it back.
    let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    let _ = conn.close().await;
}

#[tokio::test]
async fn sqlite_refuses_in_memory_databases() {
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://?mode=memory",
        "sqlite:",
    ] {
        match SqliteStore::connect(url).await {
            Err(StoreError::Internal(_)) => {}
            other => panic!("{url}: expected Internal, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

async fn assert_unavailable_quickly(url: &str) {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), PostgresStore::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {url} hung for 10 s"));
    let elapsed = started.elapsed();
    match result {
        Err(StoreError::Unavailable(msg)) => {
            assert!(
                elapsed < Duration::from_secs(6),
                "took {elapsed:?} to report: {msg}"
            );
        }
        other => panic!(
            "{url}: expected Unavailable, got {:?}",
            other.map(|_| "a store")
        ),
    }
}

#[tokio::test]
async fn postgres_unreachable_port_is_unavailable_quickly() {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    assert_unavailable_quickly(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
}

#[tokio::test]
async fn postgres_blackholed_host_is_unavailable_quickly() {
    // TEST-NET-1 (RFC 5737): never routed, so the connect either fails at once or hangs until
    // the pool's acquire timeout.
    assert_unavailable_quickly("postgres://postgres@192.0.2.1:5432/postgres").await;
}

// ---------------------------------------------------------------------------------------------
// Both migration folders in step

fn migration_file_names(folder: &str) -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn migration_folders_have_the_same_files() {
    let sqlite = migration_file_names("sqlite");
    let postgres = migration_file_names("postgres");
    assert!(!sqlite.is_empty(), "no sqlite migrations");
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres must hold the same files"
    );
}

#[tokio::test]
async fn migrated_schemas_have_the_same_tables_and_columns() {
    let sqlite_db = TestDb::sqlite().await;
    let pg_db = TestDb::postgres().await;

    let mut sqlite = sqlx::SqliteConnection::connect(&sqlite_db.url)
        .await
        .unwrap();
    let sqlite_columns: BTreeSet<(String, String)> = sqlx::query_as(
        "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut sqlite)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let _ = sqlite.close().await;

    let mut pg = PgConnection::connect(&pg_db.url).await.unwrap();
    let pg_columns: BTreeSet<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let _ = pg.close().await;

    assert!(sqlite_columns.contains(&("keys".to_string(), "key_id".to_string())));
    assert!(sqlite_columns.contains(&("key_versions".to_string(), "backend_ref".to_string())));
    assert_eq!(
        sqlite_columns, pg_columns,
        "(table, column) sets differ between sqlite and postgres"
    );
}
