//! Note store tests: the same suite on SQLite (temp dir) and PostgreSQL (a fresh database per
//! test), plus the checks that both migration folders stay in step.
//!
//! PostgreSQL comes from `KMS_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! a role that may create databases. Each test creates `notes_test_<random>` and drops it when
//! done. An unreachable server fails the PostgreSQL tests; they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notes_store::crypto::Sealed;
use notes_store::store::{
    self, ClientState, ErasureRecord, ListQuery, NoteRecord, NoteStore, RevisionMeta,
    RevisionRecord, RewrapUpdate, StoreError,
};
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use uuid::Uuid;

const T0: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// Harness

struct TestDb {
    store: Arc<dyn NoteStore>,
    url: String,
    dir: Option<TempDir>,
    pg_database: Option<String>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("notes.db").display());
        let store = store::connect(&url).await.unwrap();
        TestDb {
            store,
            url,
            dir: Some(dir),
            pg_database: None,
        }
    }

    async fn postgres() -> TestDb {
        let name = format!("notes_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&pg_admin_url())
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL needed (KMS_TEST_PG_URL): {e}"));
        let mut attempt = 0;
        loop {
            let sql = format!("CREATE DATABASE {name}");
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
            {
                Ok(_) => break,
                // Concurrent CREATE DATABASE can trip over the template; retry a little.
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("CREATE DATABASE {name}: {err}"),
            }
        }
        let _ = admin.close().await;
        let base = pg_admin_url();
        let base = base.split('?').next().unwrap().rsplit_once('/').unwrap().0;
        let url = format!("{base}/{name}");
        let db = TestDb {
            store: store::connect(&url).await.unwrap(),
            url,
            dir: None,
            pg_database: Some(name),
        };
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        // Best effort, on a thread of its own: callable inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&pg_admin_url()).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

fn pg_admin_url() -> String {
    std::env::var("KMS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Runs each listed test against both databases: `sqlite::<name>` and `postgres::<name>`.
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
    insert_and_read_back,
    insert_note_is_all_or_nothing,
    insert_note_refuses_inconsistent_records,
    concurrent_inserts_fail_alone,
    amendments_add_revisions_without_gaps,
    note_with_revision_in_one_query,
    stale_amendment_changes_nothing,
    amendment_of_unknown_note,
    concurrent_amendments_one_wins,
    list_notes_pages_and_filters,
    migrations_are_idempotent,
    client_keys_hold_and_erasure,
    rewrap_pages_and_conditional_updates,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn note(site: &str, client: &str, date: &str) -> NoteRecord {
    NoteRecord {
        note_id: Uuid::new_v4(),
        site_id: site.into(),
        client_id: client.into(),
        author_id: "clin-1".into(),
        session_date: date.into(),
        current_revision: 1,
        created_at_ms: T0,
        updated_at_ms: T0,
    }
}

fn sealed(tag: u8, len: usize) -> Sealed {
    Sealed {
        nonce: vec![tag; 12],
        ciphertext: (0..len).map(|i| (i as u8) ^ tag).collect(),
    }
}

fn revision(note_id: Uuid, revision: u32) -> RevisionRecord {
    RevisionRecord {
        meta: RevisionMeta {
            note_id,
            revision,
            author_id: format!("clin-{revision}"),
            created_at_ms: T0 + i64::from(revision),
            kms_key_id: "9f0c1e0e-0000-4000-8000-000000000001".into(),
            kms_key_version: 1,
            has_reason: revision > 1,
        },
        crypto_version: 1,
        // Every byte value, so BLOB/BYTEA round trips are checked.
        wrapped_key: (0..=255u8).collect(),
        body: sealed(revision as u8, 40),
        reason: (revision > 1).then(|| sealed(0x80 | revision as u8, 20)),
    }
}

/// One stored revision, as GetNote reads it (with its note, in one query).
async fn revision_of(
    store: &dyn NoteStore,
    note_id: Uuid,
    revision: u32,
) -> Result<Option<RevisionRecord>, StoreError> {
    Ok(store
        .get_note_with_revision(note_id, Some(revision))
        .await?
        .and_then(|(_, found)| found))
}

async fn insert(store: &dyn NoteStore, n: &NoteRecord) {
    store.insert_note(n, &revision(n.note_id, 1)).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn ping_answers(db: TestDb) {
    db.store.ping().await.unwrap();
}

async fn insert_and_read_back(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    let r1 = revision(n.note_id, 1);
    s.insert_note(&n, &r1).await.unwrap();
    assert_eq!(s.get_note(n.note_id).await.unwrap(), Some(n.clone()));
    assert_eq!(
        revision_of(s, n.note_id, 1).await.unwrap(),
        Some(r1.clone())
    );
    assert_eq!(revision_of(s, n.note_id, 2).await.unwrap(), None);
    assert_eq!(s.get_note(Uuid::new_v4()).await.unwrap(), None);
    assert_eq!(s.list_revisions(n.note_id).await.unwrap(), vec![r1.meta]);
    // The same note id twice is a conflict, and changes nothing.
    let mut again = n.clone();
    again.site_id = "site-b".into();
    match s.insert_note(&again, &revision(n.note_id, 1)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get_note(n.note_id).await.unwrap(), Some(n));
}

/// Many creations at once (group-committed on both databases): each failing one gets its own
/// error and leaves nothing behind, every other one is stored. Two rounds, because a group
/// handles them differently: without a duplicate id the erased client's notes are refused
/// inside the group's transaction; a duplicate id breaks the group's INSERT on PostgreSQL,
/// which then writes each note of the group on its own.
async fn concurrent_inserts_fail_alone(db: TestDb) {
    let s = db.store.clone();
    s.record_client_key("a", "gone", "key-1", T0).await.unwrap();
    s.begin_erasure("a", "gone", "DSR-9", T0 + 1).await.unwrap();
    let existing = note("a", "c1", "2024-01-01");
    insert(s.as_ref(), &existing).await;

    let mut stored = 0;
    for with_duplicates in [false, true] {
        let mut tasks = Vec::new();
        for i in 0..60 {
            let s = s.clone();
            let n = match i % 6 {
                // An erased client: refused inside the transaction.
                0 => note("a", "gone", "2024-01-02"),
                // An id that exists: a conflict.
                1 if with_duplicates => NoteRecord {
                    site_id: format!("dup-{i}"),
                    ..existing.clone()
                },
                _ => note("a", "c1", "2024-01-03"),
            };
            tasks.push(tokio::spawn(async move {
                let result = s.insert_note(&n, &revision(n.note_id, 1)).await;
                (i, n, result)
            }));
        }
        for task in tasks {
            let (i, n, result) = task.await.unwrap();
            match (i % 6, result) {
                (0, Err(StoreError::ClientNotActive("ERASING"))) => {}
                (1, Err(StoreError::Conflict(_))) if with_duplicates => {}
                (_, Ok(())) if i % 6 > 1 || (i % 6 == 1 && !with_duplicates) => {
                    assert_eq!(s.get_note(n.note_id).await.unwrap(), Some(n.clone()));
                    stored += 1;
                }
                (_, other) => panic!("insert {i} (duplicates: {with_duplicates}): {other:?}"),
            }
        }
    }
    assert_eq!(stored, 50 + 40);
    assert_eq!(s.count_client_notes("a", "c1").await.unwrap(), (91, 91));
    assert_eq!(s.count_client_notes("a", "gone").await.unwrap(), (0, 0));
    assert_eq!(s.get_note(existing.note_id).await.unwrap(), Some(existing));
}

/// A failure of the revision insert (here: a CHECK the record breaks, standing in for any
/// database error after the data key was generated) leaves no note behind.
async fn insert_note_is_all_or_nothing(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    let mut r1 = revision(n.note_id, 1);
    r1.meta.author_id = "x".repeat(65);
    assert!(s.insert_note(&n, &r1).await.is_err());
    assert_eq!(s.get_note(n.note_id).await.unwrap(), None);
    assert!(s.list_revisions(n.note_id).await.unwrap().is_empty());
    let page = s
        .list_notes(&ListQuery {
            site_id: "site-a".into(),
            client_id: "client-1".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.is_empty());
}

async fn insert_note_refuses_inconsistent_records(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    for bad in [
        revision(Uuid::new_v4(), 1),
        revision(n.note_id, 2),
        RevisionRecord {
            reason: Some(sealed(1, 3)),
            ..revision(n.note_id, 1)
        },
    ] {
        assert!(matches!(
            s.insert_note(&n, &bad).await,
            Err(StoreError::Internal(_))
        ));
    }
    assert_eq!(s.get_note(n.note_id).await.unwrap(), None);
}

async fn amendments_add_revisions_without_gaps(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    insert(s, &n).await;
    for rev in 2..=5 {
        s.add_revision(&revision(n.note_id, rev), rev - 1)
            .await
            .unwrap();
    }
    let got = s.get_note(n.note_id).await.unwrap().unwrap();
    assert_eq!(got.current_revision, 5);
    assert_eq!(got.updated_at_ms, T0 + 5);
    assert_eq!(got.created_at_ms, T0);
    let metas = s.list_revisions(n.note_id).await.unwrap();
    assert_eq!(
        metas.iter().map(|m| m.revision).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        metas.iter().map(|m| m.has_reason).collect::<Vec<_>>(),
        [false, true, true, true, true]
    );
    // Every revision stays readable, byte for byte.
    for rev in 1..=5 {
        assert_eq!(
            revision_of(s, n.note_id, rev).await.unwrap(),
            Some(revision(n.note_id, rev))
        );
    }
    // An amendment without its reason, or out of sequence, is a programming error.
    let mut no_reason = revision(n.note_id, 6);
    no_reason.reason = None;
    assert!(matches!(
        s.add_revision(&no_reason, 5).await,
        Err(StoreError::Internal(_))
    ));
    assert!(matches!(
        s.add_revision(&revision(n.note_id, 7), 5).await,
        Err(StoreError::Internal(_))
    ));
}

/// GetNote's query: the note and one revision (the current one by default) together, each
/// field from its own table (the note's author and creation time are not the revision's).
async fn note_with_revision_in_one_query(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    insert(s, &n).await;
    for rev in 2..=3 {
        s.add_revision(&revision(n.note_id, rev), rev - 1)
            .await
            .unwrap();
    }
    let stored = s.get_note(n.note_id).await.unwrap().unwrap();
    assert_eq!(stored.current_revision, 3);
    let (note_now, current) = s
        .get_note_with_revision(n.note_id, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note_now, stored);
    assert_eq!(current, Some(revision(n.note_id, 3)));
    for rev in 1..=3 {
        let (got_note, got) = s
            .get_note_with_revision(n.note_id, Some(rev))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got_note, stored);
        assert_eq!(got, Some(revision(n.note_id, rev)), "revision {rev}");
    }
    let (got_note, none) = s
        .get_note_with_revision(n.note_id, Some(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got_note, none), (stored, None));
    assert_eq!(
        s.get_note_with_revision(Uuid::new_v4(), None)
            .await
            .unwrap(),
        None
    );
}

async fn stale_amendment_changes_nothing(db: TestDb) {
    let s = db.store.as_ref();
    let n = note("site-a", "client-1", "2024-03-01");
    insert(s, &n).await;
    s.add_revision(&revision(n.note_id, 2), 1).await.unwrap();
    let before = s.get_note(n.note_id).await.unwrap();
    // Somebody amends revision 1 again: stale.
    let mut late = revision(n.note_id, 2);
    late.body = sealed(0x55, 10);
    match s.add_revision(&late, 1).await {
        Err(StoreError::Stale { current: 2 }) => {}
        other => panic!("expected Stale at 2, got {other:?}"),
    }
    assert_eq!(s.get_note(n.note_id).await.unwrap(), before);
    assert_eq!(
        revision_of(s, n.note_id, 2).await.unwrap(),
        Some(revision(n.note_id, 2))
    );
}

async fn amendment_of_unknown_note(db: TestDb) {
    match db.store.add_revision(&revision(Uuid::new_v4(), 2), 1).await {
        Err(StoreError::NoSuchNote) => {}
        other => panic!("expected NoSuchNote, got {other:?}"),
    }
}

async fn concurrent_amendments_one_wins(db: TestDb) {
    let n = note("site-a", "client-1", "2024-03-01");
    insert(db.store.as_ref(), &n).await;
    for round in 1..=3u32 {
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let store = db.store.clone();
                let mut r = revision(n.note_id, round + 1);
                r.body = sealed(i, 16);
                tokio::spawn(async move { store.add_revision(&r, round).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => won += 1,
                Err(StoreError::Stale { .. } | StoreError::Conflict(_)) => {}
                Err(other) => panic!("unexpected error: {other:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one amendment must win");
    }
    let metas = db.store.list_revisions(n.note_id).await.unwrap();
    assert_eq!(
        metas.iter().map(|m| m.revision).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let current = db.store.get_note(n.note_id).await.unwrap().unwrap();
    assert_eq!(current.current_revision, 4);
}

async fn list_notes_pages_and_filters(db: TestDb) {
    let s = db.store.as_ref();
    let mut mine = Vec::new();
    for date in [
        "2024-01-03",
        "2024-01-01",
        "2024-02-10",
        "2024-01-03",
        "2023-12-31",
    ] {
        let n = note("site-a", "client-1", date);
        insert(s, &n).await;
        mine.push(n);
    }
    // Other clients and sites never show up.
    for (site, client) in [("site-a", "client-2"), ("site-b", "client-1")] {
        insert(s, &note(site, client, "2024-01-02")).await;
    }
    mine.sort_by(|a, b| (&a.session_date, a.note_id).cmp(&(&b.session_date, b.note_id)));
    let query = |after: Option<(String, Uuid)>, from: Option<&str>, to: Option<&str>| ListQuery {
        site_id: "site-a".into(),
        client_id: "client-1".into(),
        date_from: from.map(str::to_string),
        date_to: to.map(str::to_string),
        after,
        limit: 2,
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list_notes(&query(after.clone(), None, None))
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        let last = page.last().unwrap();
        after = Some((last.session_date.clone(), last.note_id));
        seen.extend(page);
    }
    assert_eq!(seen, mine);
    let january = s
        .list_notes(&ListQuery {
            limit: 100,
            ..query(None, Some("2024-01-01"), Some("2024-01-31"))
        })
        .await
        .unwrap();
    assert_eq!(
        january
            .iter()
            .map(|n| n.session_date.as_str())
            .collect::<Vec<_>>(),
        ["2024-01-01", "2024-01-03", "2024-01-03"]
    );
}

async fn migrations_are_idempotent(db: TestDb) {
    db.store.migrate().await.unwrap();
    db.store.migrate().await.unwrap();
    insert(db.store.as_ref(), &note("s", "c", "2024-01-01")).await;
}

// ---------------------------------------------------------------------------------------------
// SQLite only

fn mode_of(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!("{:o}", meta.permissions().mode() & 0o777)
}

#[tokio::test]
async fn sqlite_files_are_private_and_in_wal_mode() {
    let db = TestDb::sqlite().await;
    insert(db.store.as_ref(), &note("s", "c", "2024-01-01")).await;
    let path = db.dir.as_ref().unwrap().path().join("notes.db");
    for file in svc_common_companions(&path) {
        assert!(file.exists(), "{} should exist in WAL mode", file.display());
        assert_eq!(mode_of(&file), "600", "{}", file.display());
    }
    let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    let _ = conn.close().await;
}

/// Checkpoints wait for 10,000 WAL pages (`WAL_AUTOCHECKPOINT_PAGES`) on the inserter's
/// connection (creations) and on the pool's (amendments): after about 1,900 pages written by
/// either, the WAL still holds them all. With SQLite's default (1,000) a commit past 1,000
/// pages checkpoints and the next one restarts the WAL, so it would hold at most ~1,000.
#[tokio::test]
async fn sqlite_checkpoints_only_after_10000_wal_pages() {
    // 24 KiB bodies: six overflow pages each, plus the B-tree pages every commit rewrites.
    let big = |mut r: RevisionRecord| {
        r.body = sealed(7, 24 * 1024);
        r
    };
    let creations = TestDb::sqlite().await;
    for _ in 0..150 {
        let n = note("site-a", "client-1", "2024-03-01");
        let s = creations.store.as_ref();
        s.insert_note(&n, &big(revision(n.note_id, 1)))
            .await
            .unwrap();
    }
    let amendments = TestDb::sqlite().await;
    let n = note("site-a", "client-2", "2024-03-01");
    let s = amendments.store.as_ref();
    s.insert_note(&n, &revision(n.note_id, 1)).await.unwrap();
    for rev in 2..=151 {
        s.add_revision(&big(revision(n.note_id, rev)), rev - 1)
            .await
            .unwrap();
    }
    for (writer, db) in [("inserter", creations), ("pool", amendments)] {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        // (busy, frames in the WAL, frames checkpointed): this checkpoint is the first.
        let (_, wal_frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(
            (1500..10_000).contains(&wal_frames),
            "{writer}: the WAL holds {wal_frames} frames: it was checkpointed and restarted early"
        );
        let _ = conn.close().await;
    }
}

fn svc_common_companions(path: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", path.display())))
        .collect()
}

#[tokio::test]
async fn sqlite_refuses_in_memory_databases() {
    for url in ["sqlite::memory:", "sqlite://?mode=memory", "sqlite:"] {
        assert!(
            matches!(store::connect(url).await, Err(StoreError::Internal(_))),
            "{url}"
        );
    }
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    assert!(matches!(
        store::connect(&url).await,
        Err(StoreError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Both migration folders in step

fn migration_file_names(folder: &str) -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn migration_folders_have_the_same_files() {
    let sqlite = migration_file_names("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, migration_file_names("postgres"));
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
    assert!(sqlite_columns.contains(&("note_revisions".into(), "wrapped_key".into())));
    assert_eq!(sqlite_columns, pg_columns);
}

/// PostgreSQL does not try to compress ciphertext (migration 0004): the sealed columns are
/// stored EXTERNAL, not EXTENDED.
#[tokio::test]
async fn postgres_ciphertext_columns_skip_compression() {
    let db = TestDb::postgres().await;
    let mut pg = PgConnection::connect(&db.url).await.unwrap();
    let storage: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, attstorage::text FROM pg_attribute \
         WHERE attrelid = 'note_revisions'::regclass \
           AND attname IN ('body_ciphertext', 'reason_ciphertext') ORDER BY attname",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    let _ = pg.close().await;
    assert_eq!(
        storage,
        [
            ("body_ciphertext".to_string(), "e".to_string()),
            ("reason_ciphertext".to_string(), "e".to_string())
        ]
    );
}

/// Ends every server connection of the test's database and waits until they are gone, as a
/// restart of PostgreSQL would (the store keeps connections across calls: its pool, and a
/// connection of its own per note writer).
async fn terminate_store_connections(db: &TestDb) {
    let mut admin = PgConnection::connect(&pg_admin_url()).await.unwrap();
    let name = db.pg_database.clone().unwrap();
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "the store held no connection");
    for _ in 0..100 {
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = admin.close().await;
}

/// Connections broken behind the store's back (a PostgreSQL restart, a dropped network path):
/// one that sat idle for a second is checked before use and replaced, so the next write and
/// read succeed; a note writer's connection broken while in recent use fails one write with
/// UNAVAILABLE and is replaced for the next. The note writers keep a connection of their own
/// and skip the check while busy (`postgres_inserter`): this is what still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replaces_connections_broken_behind_its_back() {
    let db = TestDb::postgres().await;
    let s = db.store.as_ref();
    // Sequential calls: both note writers take turns (the queue's lock is fair), so each
    // holds a connection, and the pool holds the readers'.
    let first = note("a", "c1", "2024-01-01");
    insert(s, &first).await;
    for _ in 0..3 {
        insert(s, &note("a", "c1", "2024-01-01")).await;
        assert!(s.get_note(first.note_id).await.unwrap().is_some());
    }

    terminate_store_connections(&db).await;
    tokio::time::sleep(notes_store::store::PG_WRITER_PING_IF_IDLE_FOR + Duration::from_millis(200))
        .await;
    for _ in 0..4 {
        insert(s, &note("a", "c1", "2024-01-02")).await;
        assert_eq!(
            s.get_note(first.note_id).await.unwrap(),
            Some(first.clone())
        );
    }

    // Broken while recently used: the pool checks every connection it lends, so reads go on
    // at once; a note writer's own connection fails one group with UNAVAILABLE and is replaced.
    // There are two writers.
    terminate_store_connections(&db).await;
    for _ in 0..4 {
        assert_eq!(
            s.get_note(first.note_id).await.unwrap(),
            Some(first.clone())
        );
    }
    let mut failed_writes = 0;
    loop {
        let n = note("a", "c1", "2024-01-03");
        match s.insert_note(&n, &revision(n.note_id, 1)).await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) => failed_writes += 1,
            Err(other) => panic!("insert on a broken connection: {other:?}"),
        }
        assert!(failed_writes <= 2, "a broken connection was used again");
    }
    let fourth = note("a", "c1", "2024-01-04");
    insert(s, &fourth).await;
    assert_eq!(s.get_note(fourth.note_id).await.unwrap(), Some(fourth));
}

// ---------------------------------------------------------------------------------------------
// Client keys (crypto-shredding) and re-wrap campaigns

async fn client_keys_hold_and_erasure(db: TestDb) {
    let s = db.store.as_ref();
    assert!(s.client_key("a", "c1").await.unwrap().is_none());
    // The first recorded key wins.
    let row = s.record_client_key("a", "c1", "key-1", T0).await.unwrap();
    assert_eq!(row.kms_key_id.as_deref(), Some("key-1"));
    assert_eq!(row.state, ClientState::Active);
    let row = s.record_client_key("a", "c1", "key-2", T0).await.unwrap();
    assert_eq!(row.kms_key_id.as_deref(), Some("key-1"));
    let a1 = note("a", "c1", "2024-01-01");
    let a2 = note("a", "c1", "2024-01-02");
    let b1 = note("a", "c2", "2024-01-01");
    for n in [&a1, &a2, &b1] {
        insert(s, n).await;
    }
    s.add_revision(&revision(a1.note_id, 2), 1).await.unwrap();
    assert_eq!(s.count_client_notes("a", "c1").await.unwrap(), (2, 3));

    // A legal hold blocks the erasure; lifting it allows it.
    let row = s
        .set_legal_hold("a", "c1", Some("case 7"), T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        row.legal_hold.as_ref().map(|h| h.reason.as_str()),
        Some("case 7")
    );
    assert!(matches!(
        s.begin_erasure("a", "c1", "DSR-1", T0 + 2).await,
        Err(StoreError::LegalHold(r)) if r == "case 7"
    ));
    assert_eq!(
        s.client_key("a", "c1").await.unwrap().unwrap().state,
        ClientState::Active
    );
    let row = s.set_legal_hold("a", "c1", None, T0 + 3).await.unwrap();
    assert!(row.legal_hold.is_none());
    let row = s.begin_erasure("a", "c1", "DSR-1", T0 + 4).await.unwrap();
    assert_eq!(row.state, ClientState::Erasing);
    assert_eq!(row.erasure_reason.as_deref(), Some("DSR-1"));

    // From now on no write for c1, in the store's own transaction; c2 is untouched.
    let late = note("a", "c1", "2024-02-01");
    assert!(matches!(
        s.insert_note(&late, &revision(late.note_id, 1)).await,
        Err(StoreError::ClientNotActive("ERASING"))
    ));
    assert!(matches!(
        s.add_revision(&revision(a2.note_id, 2), 1).await,
        Err(StoreError::ClientNotActive("ERASING"))
    ));
    assert!(matches!(
        s.set_legal_hold("a", "c1", Some("late"), T0).await,
        Err(StoreError::ClientNotActive(_))
    ));
    // Repeating the start is harmless.
    assert_eq!(
        s.begin_erasure("a", "c1", "again", T0 + 5)
            .await
            .unwrap()
            .state,
        ClientState::Erasing
    );

    let erasure = ErasureRecord {
        erased_at_ms: T0 + 6,
        reason: "DSR-1".into(),
        receipt: b"{\"receipt\":1}".to_vec(),
        receipt_signature: vec![7; 64],
        receipt_fingerprint: "ab".repeat(32),
        ..ErasureRecord::default()
    };
    let row = s.finish_erasure("a", "c1", &erasure).await.unwrap();
    assert_eq!(row.state, ClientState::Erased);
    let e = row.erasure.clone().unwrap();
    assert_eq!((e.notes_erased, e.revisions_erased), (2, 3));
    assert_eq!(e.receipt, erasure.receipt);
    assert_eq!(e.receipt_signature, erasure.receipt_signature);
    assert_eq!(e.erased_at_ms, T0 + 6);
    assert_eq!(s.count_client_notes("a", "c1").await.unwrap(), (0, 0));
    assert!(s.get_note(a1.note_id).await.unwrap().is_none());
    assert!(revision_of(s, a1.note_id, 2).await.unwrap().is_none());
    // Other clients keep their notes.
    assert!(s.get_note(b1.note_id).await.unwrap().is_some());
    assert_eq!(s.count_client_notes("a", "c2").await.unwrap(), (1, 1));
    // Repeating either step returns the same erasure.
    assert_eq!(s.begin_erasure("a", "c1", "x", T0 + 9).await.unwrap(), row);
    assert_eq!(
        s.finish_erasure("a", "c1", &ErasureRecord::default())
            .await
            .unwrap(),
        row
    );
    assert!(matches!(
        s.insert_note(&late, &revision(late.note_id, 1)).await,
        Err(StoreError::ClientNotActive("ERASED"))
    ));
    // Erasing a client that never had a note works too (no key to destroy).
    let row = s.begin_erasure("a", "c9", "DSR-2", T0).await.unwrap();
    assert_eq!(row.kms_key_id, None);
    let row = s
        .finish_erasure("a", "c9", &ErasureRecord::default())
        .await
        .unwrap();
    assert_eq!(row.state, ClientState::Erased);
}

async fn rewrap_pages_and_conditional_updates(db: TestDb) {
    let s = db.store.as_ref();
    let mut notes: Vec<NoteRecord> = (0..5).map(|_| note("a", "c1", "2024-01-01")).collect();
    notes.sort_by_key(|n| n.note_id);
    for n in &notes {
        insert(s, n).await;
    }
    s.add_revision(&revision(notes[0].note_id, 2), 1)
        .await
        .unwrap();
    let key = "9f0c1e0e-0000-4000-8000-000000000001";
    // Keyset pages of 2 visit all 6 revisions under (key, version 1) once, in (note_id,
    // revision) order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.rewrap_page(key, 1, after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|r| (r.note_id, r.revision));
        seen.extend(page);
    }
    assert_eq!(seen.len(), 6);
    assert_eq!((seen[0].note_id, seen[0].revision), (notes[0].note_id, 1));
    assert_eq!((seen[1].note_id, seen[1].revision), (notes[0].note_id, 2));
    assert!(seen.iter().all(|r| r.site_id == "a" && r.client_id == "c1"));
    assert!(seen
        .iter()
        .all(|r| r.kms_key_id == key && r.kms_key_version == 1));
    let walked: Vec<_> = seen.iter().map(|r| (r.note_id, r.revision)).collect();
    let mut sorted = walked.clone();
    sorted.sort();
    assert_eq!(walked, sorted);
    assert_eq!(s.rewrap_page(key, 1, None, 100).await.unwrap().len(), 6);
    // Pages of 4: 4, then the 2 after the 4th.
    let first = s.rewrap_page(key, 1, None, 4).await.unwrap();
    let last = first.last().map(|r| (r.note_id, r.revision));
    let rest = s.rewrap_page(key, 1, last, 4).await.unwrap();
    assert_eq!((first.len(), rest.len()), (4, 2));
    // Another version or another key: nothing.
    assert!(s.rewrap_page(key, 2, None, 100).await.unwrap().is_empty());
    assert!(s.rewrap_page("other", 1, last, 4).await.unwrap().is_empty());
    assert!(s
        .rewrap_page("other", 1, None, 100)
        .await
        .unwrap()
        .is_empty());

    let update = |r: &notes_store::store::RewrapRow, old: Vec<u8>| RewrapUpdate {
        note_id: r.note_id,
        revision: r.revision,
        old_wrapped_key: old,
        new_wrapped_key: vec![0xab; 80],
        kms_key_id: key.into(),
        kms_key_version: 2,
    };
    // Only rows that still hold the old blob change; a repeat changes nothing.
    let batch: Vec<RewrapUpdate> = seen[..3]
        .iter()
        .map(|r| update(r, r.wrapped_key.clone()))
        .chain(std::iter::once(update(&seen[3], vec![1, 2, 3])))
        .collect();
    assert_eq!(s.apply_rewraps(&batch).await.unwrap(), 3);
    assert_eq!(s.apply_rewraps(&batch).await.unwrap(), 0);
    let r = revision_of(s, seen[0].note_id, seen[0].revision)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.wrapped_key, vec![0xab; 80]);
    assert_eq!(r.meta.kms_key_version, 2);
    let usage = s.key_usage().await.unwrap();
    let counts: Vec<(u32, u64)> = usage
        .iter()
        .map(|u| (u.kms_key_version, u.revisions))
        .collect();
    assert_eq!(counts, vec![(1, 3), (2, 3)]);
    // Re-wrapped rows left (key, 1) for (key, 2).
    assert_eq!(s.rewrap_page(key, 1, None, 100).await.unwrap().len(), 3);
    assert_eq!(s.rewrap_page(key, 2, None, 100).await.unwrap().len(), 3);

    // A campaign-sized batch (more rows than one SQLite statement carries) applies whole,
    // and only to the rows whose old blob it names.
    let many: Vec<NoteRecord> = (0..600).map(|_| note("a", "c2", "2024-01-02")).collect();
    for n in &many {
        insert(s, n).await;
    }
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = s.rewrap_page(key, 1, after, 1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| (r.note_id, r.revision));
        rows.extend(page.into_iter().filter(|r| r.client_id == "c2"));
    }
    assert_eq!(rows.len(), 600);
    let big: Vec<RewrapUpdate> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Every tenth names a blob the row does not hold: a race lost.
            let old = if i % 10 == 0 {
                vec![9; 80]
            } else {
                r.wrapped_key.clone()
            };
            RewrapUpdate {
                new_wrapped_key: vec![(i % 251) as u8; 81],
                ..update(r, old)
            }
        })
        .collect();
    assert_eq!(s.apply_rewraps(&big).await.unwrap(), 540);
    assert_eq!(s.apply_rewraps(&big).await.unwrap(), 0);
    for (i, r) in rows.iter().enumerate() {
        let stored = revision_of(s, r.note_id, r.revision)
            .await
            .unwrap()
            .unwrap();
        if i % 10 == 0 {
            assert_eq!(stored.wrapped_key, r.wrapped_key);
            assert_eq!(stored.meta.kms_key_version, 1);
        } else {
            assert_eq!(stored.wrapped_key, vec![(i % 251) as u8; 81]);
            assert_eq!(stored.meta.kms_key_version, 2);
        }
    }
}
