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
    self, ListQuery, NoteRecord, NoteStore, RevisionMeta, RevisionRecord, StoreError,
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
    amendments_add_revisions_without_gaps,
    stale_amendment_changes_nothing,
    amendment_of_unknown_note,
    concurrent_amendments_one_wins,
    list_notes_pages_and_filters,
    migrations_are_idempotent,
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
        s.get_revision(n.note_id, 1).await.unwrap(),
        Some(r1.clone())
    );
    assert_eq!(s.get_revision(n.note_id, 2).await.unwrap(), None);
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
            s.get_revision(n.note_id, rev).await.unwrap(),
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
        s.get_revision(n.note_id, 2).await.unwrap(),
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
