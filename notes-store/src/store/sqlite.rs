//! `NoteStore` on SQLite: one private (0600) WAL database file (`svc_common::sqlite_file`);
//! migrations in `migrations/sqlite`.
//!
//! Durability: `synchronous = FULL`. A clinical note acknowledged to the caller must survive a
//! power loss. New notes are group-committed by `sqlite_inserter` (one fsync for every
//! creation queued meanwhile); every other statement goes through the sqlx pool, which runs
//! each SQLite connection on its own worker thread, so nothing blocks the async runtime.
//! Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front and wait
//! for it under `busy_timeout`, so the current-revision check and the insert that follows it
//! cannot interleave with another writer.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use svc_common::sqlite_file;
use uuid::Uuid;

use super::sqlite_inserter::SqliteInserter;
use super::{
    check_current, check_first_revision, check_next_revision, reason_from_columns,
    revision_from_db, ListQuery, NoteRecord, NoteStore, RevisionMeta, RevisionRecord, StoreError,
};
use crate::crypto::Sealed;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 4;

/// The columns of `notes`, in the order `note_from_row` reads them.
macro_rules! note_columns {
    () => {
        "note_id, site_id, client_id, author_id, session_date, current_revision, created_at_ms, \
         updated_at_ms"
    };
}

/// The metadata columns of `note_revisions`.
macro_rules! meta_columns {
    () => {
        "note_id, revision, author_id, created_at_ms, kms_key_id, kms_key_version, \
         reason_nonce IS NOT NULL AS has_reason"
    };
}

/// Notes in one SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// New notes are group-committed by their own thread (see `sqlite_inserter`).
    inserter: Arc<SqliteInserter>,
}

impl SqliteStore {
    /// Opens `sqlite:<path>`, creating the file with mode 0600 if it does not exist. Refuses
    /// in-memory databases. Does not run migrations (see [`NoteStore::migrate`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let path = sqlite_file::database_path(url, "notes").map_err(StoreError::Internal)?;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(map_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // A multi-row UPDATE (re-wrap campaigns) keeps a statement journal of every page
            // it changes, so a failure halfway undoes only that statement. In memory it is a
            // copy; in a temporary file it was a write and a close per statement. It holds
            // what the database file holds (ciphertext and ids), never plaintext.
            .pragma("temp_store", "MEMORY")
            .pragma(
                "wal_autocheckpoint",
                sqlite_file::WAL_AUTOCHECKPOINT_PAGES.to_string(),
            );
        let created = sqlite_file::create_private_file(&path)
            .await
            .map_err(StoreError::Internal)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        if created {
            sqlite_file::restrict_permissions(&path)
                .await
                .map_err(StoreError::Internal)?;
        } else {
            sqlite_file::warn_if_not_private(&path, "notes").await;
        }
        let inserter = SqliteInserter::start(path)
            .map_err(|e| StoreError::Internal(format!("note inserter thread: {e}")))?;
        Ok(SqliteStore {
            pool,
            inserter: Arc::new(inserter),
        })
    }
}

#[async_trait]
impl NoteStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|err| map_err(sqlx::Error::Migrate(Box::new(err))))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn insert_note(
        &self,
        note: &NoteRecord,
        first: &RevisionRecord,
    ) -> Result<(), StoreError> {
        check_first_revision(note, first)?;
        self.inserter.insert(note.clone(), first.clone()).await
    }

    async fn get_note(&self, note_id: Uuid) -> Result<Option<NoteRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            note_columns!(),
            " FROM notes WHERE note_id = ?1"
        ))
        .bind(id_text(note_id))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| note_from_row(&row))
        .transpose()
    }

    async fn get_note_with_revision(
        &self,
        note_id: Uuid,
        revision: Option<u32>,
    ) -> Result<Option<(NoteRecord, Option<RevisionRecord>)>, StoreError> {
        sqlx::query(concat!(
            "WITH n AS (SELECT ",
            note_columns!(),
            " FROM notes WHERE note_id = ?1), \
             r AS (SELECT revision, author_id AS revision_author_id, \
                 created_at_ms AS revision_created_at_ms, kms_key_id, kms_key_version, \
                 reason_nonce IS NOT NULL AS has_reason, crypto_version, wrapped_key, \
                 body_nonce, body_ciphertext, reason_nonce, reason_ciphertext \
                 FROM note_revisions WHERE note_id = ?1) \
             SELECT n.*, r.* FROM n \
             LEFT JOIN r ON r.revision = COALESCE(?2, n.current_revision)"
        ))
        .bind(id_text(note_id))
        .bind(revision.map(i64::from))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| note_and_revision_from_row(&row))
        .transpose()
    }

    async fn list_revisions(&self, note_id: Uuid) -> Result<Vec<RevisionMeta>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            meta_columns!(),
            " FROM note_revisions WHERE note_id = ?1 ORDER BY revision"
        ))
        .bind(id_text(note_id))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(meta_from_row).collect()
    }

    async fn list_notes(&self, q: &ListQuery) -> Result<Vec<NoteRecord>, StoreError> {
        let (after_date, after_id) = match &q.after {
            Some((date, id)) => (Some(date.as_str()), Some(id_text(*id))),
            None => (None, None),
        };
        let rows = sqlx::query(concat!(
            "SELECT ",
            note_columns!(),
            " FROM notes WHERE site_id = ?1 AND client_id = ?2 \
             AND (?3 IS NULL OR session_date >= ?3) AND (?4 IS NULL OR session_date <= ?4) \
             AND (?5 IS NULL OR (session_date, note_id) > (?5, ?6)) \
             ORDER BY session_date, note_id LIMIT ?7"
        ))
        .bind(&q.site_id)
        .bind(&q.client_id)
        .bind(q.date_from.as_deref())
        .bind(q.date_to.as_deref())
        .bind(after_date)
        .bind(after_id)
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(note_from_row).collect()
    }

    async fn add_revision(
        &self,
        revision: &RevisionRecord,
        expected: u32,
    ) -> Result<(), StoreError> {
        check_next_revision(revision, expected)?;
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let result = add_revision_tx(&mut conn, revision, expected).await;
        if result.is_err() {
            // A failed COMMIT leaves sqlx's connection at transaction depth 1: never reuse it.
            conn.close_on_drop();
        }
        result
    }
}

/// A note row, columns in `note_columns!` order; also used by `sqlite_inserter`.
pub(super) const INSERT_NOTE_SQL: &str = concat!(
    "INSERT INTO notes (",
    note_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
);

/// A revision row; also used by `sqlite_inserter`.
pub(super) const INSERT_REVISION_SQL: &str =
    "INSERT INTO note_revisions (note_id, revision, author_id, created_at_ms, kms_key_id, \
     kms_key_version, crypto_version, wrapped_key, body_nonce, body_ciphertext, \
     reason_nonce, reason_ciphertext) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

async fn insert_revision(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    r: &RevisionRecord,
) -> Result<(), StoreError> {
    sqlx::query(INSERT_REVISION_SQL)
        .bind(id_text(r.meta.note_id))
        .bind(i64::from(r.meta.revision))
        .bind(&r.meta.author_id)
        .bind(r.meta.created_at_ms)
        .bind(&r.meta.kms_key_id)
        .bind(i64::from(r.meta.kms_key_version))
        .bind(i64::from(r.crypto_version))
        .bind(r.wrapped_key.as_slice())
        .bind(r.body.nonce.as_slice())
        .bind(r.body.ciphertext.as_slice())
        .bind(r.reason.as_ref().map(|s| s.nonce.as_slice()))
        .bind(r.reason.as_ref().map(|s| s.ciphertext.as_slice()))
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(map_err)
}

/// Canonical note id text in SQLite: lower-case, hyphenated (a CHECK enforces it).
pub(super) fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

pub(super) fn parse_id(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|_| StoreError::Internal("malformed note id in database".to_string()))
}

fn note_from_row(row: &SqliteRow) -> Result<NoteRecord, StoreError> {
    let note_id: String = row.try_get("note_id").map_err(map_err)?;
    Ok(NoteRecord {
        note_id: parse_id(&note_id)?,
        site_id: row.try_get("site_id").map_err(map_err)?,
        client_id: row.try_get("client_id").map_err(map_err)?,
        author_id: row.try_get("author_id").map_err(map_err)?,
        session_date: row.try_get("session_date").map_err(map_err)?,
        current_revision: revision_from_db(row.try_get("current_revision").map_err(map_err)?)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(map_err)?,
    })
}

fn meta_from_row(row: &SqliteRow) -> Result<RevisionMeta, StoreError> {
    let note_id: String = row.try_get("note_id").map_err(map_err)?;
    Ok(RevisionMeta {
        note_id: parse_id(&note_id)?,
        revision: revision_from_db(row.try_get("revision").map_err(map_err)?)?,
        author_id: row.try_get("author_id").map_err(map_err)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        kms_key_id: row.try_get("kms_key_id").map_err(map_err)?,
        kms_key_version: revision_from_db(row.try_get("kms_key_version").map_err(map_err)?)?,
        has_reason: row.try_get("has_reason").map_err(map_err)?,
    })
}

/// A row of `get_note_with_revision`: the note's columns, then its revision's (the revision's
/// author and creation time renamed), all NULL if the note has no such revision.
fn note_and_revision_from_row(
    row: &SqliteRow,
) -> Result<(NoteRecord, Option<RevisionRecord>), StoreError> {
    let note = note_from_row(row)?;
    let Some(revision) = row.try_get::<Option<i64>, _>("revision").map_err(map_err)? else {
        return Ok((note, None));
    };
    let meta = RevisionMeta {
        note_id: note.note_id,
        revision: revision_from_db(revision)?,
        author_id: row.try_get("revision_author_id").map_err(map_err)?,
        created_at_ms: row.try_get("revision_created_at_ms").map_err(map_err)?,
        kms_key_id: row.try_get("kms_key_id").map_err(map_err)?,
        kms_key_version: revision_from_db(row.try_get("kms_key_version").map_err(map_err)?)?,
        has_reason: row.try_get("has_reason").map_err(map_err)?,
    };
    let record = RevisionRecord {
        meta,
        crypto_version: revision_from_db(row.try_get("crypto_version").map_err(map_err)?)?,
        wrapped_key: row.try_get("wrapped_key").map_err(map_err)?,
        body: Sealed {
            nonce: row.try_get("body_nonce").map_err(map_err)?,
            ciphertext: row.try_get("body_ciphertext").map_err(map_err)?,
        },
        reason: reason_from_columns(
            row.try_get("reason_nonce").map_err(map_err)?,
            row.try_get("reason_ciphertext").map_err(map_err)?,
        )?,
    };
    Ok((note, Some(record)))
}

/// sqlx error → `StoreError` (see `super::map_sqlx_err`).
pub(super) fn map_err(err: sqlx::Error) -> StoreError {
    super::map_sqlx_err(err, map_database_err)
}

/// An error SQLite returned → `StoreError`. SQLite names columns, never values.
fn map_database_err(db: &dyn sqlx::error::DatabaseError) -> StoreError {
    if db.is_unique_violation() {
        let what = if db.message().contains("note_revisions.") {
            "the note was amended concurrently"
        } else if db.message().contains("notes.note_id") {
            "a note with this id already exists"
        } else {
            "a uniqueness constraint was violated"
        };
        return StoreError::Conflict(what.to_string());
    }
    // Primary result code: the low byte of the extended code.
    let primary = db
        .code()
        .and_then(|code| code.parse::<i32>().ok())
        .map(|code| code & 0xff);
    match primary {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN,
        // SQLITE_PROTOCOL: the database is there but cannot serve now.
        Some(5 | 6 | 10 | 13 | 14 | 15) => {
            StoreError::Unavailable(format!("sqlite: {}", db.message()))
        }
        _ => StoreError::Internal(format!("sqlite: {}", db.message())),
    }
}

async fn add_revision_tx(
    conn: &mut SqliteConnection,
    revision: &RevisionRecord,
    expected: u32,
) -> Result<(), StoreError> {
    let note_id = id_text(revision.meta.note_id);
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
    let current: Option<i64> =
        sqlx::query_scalar("SELECT current_revision FROM notes WHERE note_id = ?1")
            .bind(&note_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
    check_current(current, expected)?;
    let (site, client): (String, String) =
        sqlx::query_as("SELECT site_id, client_id FROM notes WHERE note_id = ?1")
            .bind(&note_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
    super::sqlite_keys::check_client_writable(&mut tx, &site, &client).await?;
    insert_revision(&mut tx, revision).await?;
    let moved = sqlx::query(
        "UPDATE notes SET current_revision = ?2, updated_at_ms = ?3 \
         WHERE note_id = ?1 AND current_revision = ?4",
    )
    .bind(&note_id)
    .bind(i64::from(revision.meta.revision))
    .bind(revision.meta.created_at_ms)
    .bind(i64::from(expected))
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::Conflict(
            "the note was amended concurrently".to_string(),
        ));
    }
    tx.commit().await.map_err(map_err)
}
