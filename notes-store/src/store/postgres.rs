//! `NoteStore` on PostgreSQL: a small pool that fails fast; migrations in `migrations/postgres`.
//!
//! The pool's acquire timeout bounds every wait for a connection, including the first connect:
//! an unreachable server gives `StoreError::Unavailable` after about `ACQUIRE_TIMEOUT`.
//! Concurrent amendments of one note are not serialized by a lock: both may read the same
//! current revision, but the primary key `(note_id, revision)` lets only one insert of the
//! next revision commit (the other waits for it, then fails with a unique violation →
//! `Conflict`), and the note's `current_revision` only moves from the expected value.
//! New notes are group-committed by `postgres_inserter`, which falls back to `insert_one`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use uuid::Uuid;

use super::postgres_inserter::PgInserter;
use super::{
    check_current, check_first_revision, check_next_revision, reason_from_columns,
    revision_from_db, ClientState, ListQuery, NoteRecord, NoteStore, RevisionMeta, RevisionRecord,
    StoreError,
};
use crate::crypto::Sealed;

/// Longest wait for a pooled connection (and so for a connection attempt).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 8;

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

/// Notes in a PostgreSQL database (the tables of the connection's current schema).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
    /// New notes are group-committed by writer tasks (see `postgres_inserter`).
    inserter: Arc<PgInserter>,
}

impl PostgresStore {
    /// Connects to `postgres://…` / `postgresql://…` and checks that one connection can be
    /// opened. Does not run migrations (see [`NoteStore::migrate`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(map_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        let inserter = Arc::new(PgInserter::start(pool.clone()));
        Ok(PostgresStore { pool, inserter })
    }
}

#[async_trait]
impl NoteStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
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
            " FROM notes WHERE note_id = $1"
        ))
        .bind(note_id)
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
            " FROM notes WHERE note_id = $1), \
             r AS (SELECT revision, author_id AS revision_author_id, \
                 created_at_ms AS revision_created_at_ms, kms_key_id, kms_key_version, \
                 reason_nonce IS NOT NULL AS has_reason, crypto_version, wrapped_key, \
                 body_nonce, body_ciphertext, reason_nonce, reason_ciphertext \
                 FROM note_revisions WHERE note_id = $1) \
             SELECT n.*, r.* FROM n \
             LEFT JOIN r ON r.revision = COALESCE($2::bigint, n.current_revision)"
        ))
        .bind(note_id)
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
            " FROM note_revisions WHERE note_id = $1 ORDER BY revision"
        ))
        .bind(note_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(meta_from_row).collect()
    }

    async fn list_notes(&self, q: &ListQuery) -> Result<Vec<NoteRecord>, StoreError> {
        let (after_date, after_id) = match &q.after {
            Some((date, id)) => (Some(date.as_str()), Some(*id)),
            None => (None, None),
        };
        let rows = sqlx::query(concat!(
            "SELECT ",
            note_columns!(),
            " FROM notes WHERE site_id = $1 AND client_id = $2 \
             AND ($3::text IS NULL OR session_date >= $3) \
             AND ($4::text IS NULL OR session_date <= $4) \
             AND ($5::text IS NULL OR (session_date, note_id) > ($5, $6::uuid)) \
             ORDER BY session_date, note_id LIMIT $7"
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
        let note_id = revision.meta.note_id;
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT current_revision FROM notes WHERE note_id = $1")
                .bind(note_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        check_current(current, expected)?;
        let (site, client): (String, String) =
            sqlx::query_as("SELECT site_id, client_id FROM notes WHERE note_id = $1")
                .bind(note_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err)?;
        super::postgres_keys::check_client_writable(&mut tx, &site, &client).await?;
        insert_revision(&mut tx, revision).await?;
        let moved = sqlx::query(
            "UPDATE notes SET current_revision = $2, updated_at_ms = $3 \
             WHERE note_id = $1 AND current_revision = $4",
        )
        .bind(note_id)
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
}

/// Inserts one note and its first revision as one autocommit statement (a note that arrives
/// alone, and each note of a group that broke a constraint: `postgres_inserter`).
pub(super) async fn insert_one(
    conn: &mut PgConnection,
    note: &NoteRecord,
    first: &RevisionRecord,
) -> Result<(), StoreError> {
    // One statement, so one round trip and one transaction (autocommit) instead of five
    // round trips: BEGIN, the client check, two INSERTs, COMMIT. Same semantics: the
    // client row is read FOR SHARE (an erasure, which updates it, waits for this
    // transaction or this one sees its new state); nothing is inserted unless the client
    // is active; any error (a duplicate id, a CHECK) aborts both inserts; the revision's
    // foreign key is checked at the end of the statement, when the note exists.
    let r = first;
    let query = sqlx::query(concat!(
        "WITH client AS ( \
             SELECT state FROM client_keys WHERE site_id = $2 AND client_id = $3 FOR SHARE \
         ), note AS ( \
             INSERT INTO notes (",
        note_columns!(),
        ") SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE NOT EXISTS (SELECT 1 FROM client WHERE state <> 'ACTIVE') \
             RETURNING note_id \
         ), revision AS ( \
             INSERT INTO note_revisions (note_id, revision, author_id, created_at_ms, \
                 kms_key_id, kms_key_version, crypto_version, wrapped_key, body_nonce, \
                 body_ciphertext, reason_nonce, reason_ciphertext) \
             SELECT note_id, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19 FROM note \
             RETURNING note_id \
         ) \
         SELECT (SELECT state FROM client), (SELECT count(*) FROM revision)"
    ))
    .bind(note.note_id)
    .bind(&note.site_id)
    .bind(&note.client_id)
    .bind(&note.author_id)
    .bind(&note.session_date)
    .bind(i64::from(note.current_revision))
    .bind(note.created_at_ms)
    .bind(note.updated_at_ms);
    let row = bind_revision_after_id(query, r)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    let client_state: Option<String> = row.try_get(0).map_err(map_err)?;
    let inserted: i64 = row.try_get(1).map_err(map_err)?;
    ClientState::check_writable(client_state.as_deref())?;
    if inserted == 1 {
        Ok(())
    } else {
        Err(StoreError::Internal(format!(
            "note insert wrote {inserted} revisions"
        )))
    }
}

async fn insert_revision(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    r: &RevisionRecord,
) -> Result<(), StoreError> {
    let query = sqlx::query(
        "INSERT INTO note_revisions (note_id, revision, author_id, created_at_ms, kms_key_id, \
         kms_key_version, crypto_version, wrapped_key, body_nonce, body_ciphertext, \
         reason_nonce, reason_ciphertext) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(r.meta.note_id);
    bind_revision_after_id(query, r)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(map_err)
}

/// Binds a revision's columns after `note_id`, in `note_revisions` order: `revision` through
/// `reason_ciphertext` (shared by `insert_revision` and `insert_note`'s single statement).
fn bind_revision_after_id<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    r: &'q RevisionRecord,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
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
}

fn note_from_row(row: &PgRow) -> Result<NoteRecord, StoreError> {
    Ok(NoteRecord {
        note_id: row.try_get("note_id").map_err(map_err)?,
        site_id: row.try_get("site_id").map_err(map_err)?,
        client_id: row.try_get("client_id").map_err(map_err)?,
        author_id: row.try_get("author_id").map_err(map_err)?,
        session_date: row.try_get("session_date").map_err(map_err)?,
        current_revision: revision_from_db(row.try_get("current_revision").map_err(map_err)?)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(map_err)?,
    })
}

fn meta_from_row(row: &PgRow) -> Result<RevisionMeta, StoreError> {
    Ok(RevisionMeta {
        note_id: row.try_get("note_id").map_err(map_err)?,
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
    row: &PgRow,
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

/// An error PostgreSQL returned → `StoreError`, by SQLSTATE. Only the primary message is
/// used: PostgreSQL's DETAIL would echo the offending values.
fn map_database_err(db: &dyn sqlx::error::DatabaseError) -> StoreError {
    if db.is_unique_violation() {
        let what = match db.constraint() {
            Some("note_revisions_pkey") => "the note was amended concurrently",
            Some("notes_pkey") => "a note with this id already exists",
            _ => "a uniqueness constraint was violated",
        };
        return StoreError::Conflict(what.to_string());
    }
    let code = db.code();
    let code = code.as_deref().unwrap_or("");
    let transient = code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || matches!(
            code,
            "57P01" // admin_shutdown
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now
            | "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "25006" // read_only_sql_transaction (a standby after failover)
        );
    if transient {
        StoreError::Unavailable(format!("postgres: {}", db.message()))
    } else {
        StoreError::Internal(format!("postgres ({code}): {}", db.message()))
    }
}
