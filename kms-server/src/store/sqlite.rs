//! `KeyStore` on SQLite: one private (0600) WAL database file; migrations in `migrations/sqlite`.
//! The private-file handling is `svc_common::sqlite_file`, shared with notes-store.
//!
//! Durability: `synchronous = FULL`, not the `NORMAL` that WAL usually allows. With `NORMAL` a
//! power loss can roll back transactions that were already reported committed; here that would
//! lose a key version whose ciphertexts are already in the hands of clients (and for the TPM
//! backend the stored `backend_ref` blob is the only way back to the key). Writes are rare
//! (key creation, rotation, state changes), so one extra fsync per commit costs nothing that
//! matters.
//!
//! SQLite work does not block the async runtime: sqlx runs every connection on its own worker
//! thread. Write transactions start with `BEGIN IMMEDIATE`, so they take the write lock up front
//! and wait for it under `busy_timeout` instead of failing with `SQLITE_BUSY` half way through.

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

use crate::audit::SqliteAppender;

use super::{
    check_first_version, check_next_version, version_from_db, KeyRecord, KeyState, KeyStore,
    KeyVersionRecord, StoreError, VersionState,
};

/// How long a statement waits for another connection's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite has one writer at a time anyway; a few connections serve concurrent reads.
const MAX_CONNECTIONS: u32 = 4;

/// The columns of `keys`, in the order `key_from_row` reads them.
macro_rules! key_columns {
    () => {
        "key_id, alias, description, state, primary_version, created_at_ms, backend, \
         rotation_period_ms, next_rotation_ms, min_decryption_version, deletion_at_ms"
    };
}

/// The columns of `key_versions`, in the order `version_from_row` reads them.
macro_rules! version_columns {
    () => {
        "key_id, version, backend_ref, state, created_at_ms"
    };
}

/// Key metadata in one SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Audit batches go through their own connection (see `audit::sqlite_appender`).
    audit_appender: Arc<SqliteAppender>,
    /// Every write of this process takes its turn here before SQLite's write lock. Under load
    /// the audit appender holds that lock most of the time (its COMMIT includes the fsync),
    /// and SQLite's busy handler only polls, sleeping 1, 2, 5 … 100 ms between tries, so a
    /// key write competing that way can lose again and again. This mutex is fair (FIFO): a
    /// key write waits for the batch in progress, then goes.
    write_turn: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    /// Opens `sqlite:<path>` (also `sqlite://<path>`), creating the file with mode 0600 if it
    /// does not exist. Does not run migrations (see [`KeyStore::migrate`]).
    ///
    /// In-memory databases are refused: key metadata must survive a restart.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let path = sqlite_file::database_path(url, "key metadata").map_err(StoreError::Internal)?;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(map_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma(
                "wal_autocheckpoint",
                sqlite_file::WAL_AUTOCHECKPOINT_PAGES.to_string(),
            );

        // Create the file ourselves, already 0600, so that it never exists with the umask's
        // mode. SQLite opens an empty file as an empty database, and gives the `-wal` and
        // `-shm` files it creates later the mode of the database file.
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
            // The pool has opened the file and switched it to WAL: make sure of the mode of
            // all three files whatever happened in between.
            sqlite_file::restrict_permissions(&path)
                .await
                .map_err(StoreError::Internal)?;
        } else {
            sqlite_file::warn_if_not_private(&path, "key metadata").await;
        }
        let read_only = url
            .split_once('?')
            .is_some_and(|(_, params)| params.split('&').any(|p| p == "mode=ro"));
        let write_turn = Arc::new(tokio::sync::Mutex::new(()));
        let audit_appender = SqliteAppender::start(path, read_only, write_turn.clone())
            .map_err(|e| StoreError::Internal(format!("audit appender thread: {e}")))?;
        Ok(SqliteStore {
            pool,
            audit_appender: Arc::new(audit_appender),
            write_turn,
        })
    }

    /// The connection pool, shared with the audit store (`crate::audit`).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Waits for this process's turn to write (see `write_turn`); hold it across the write.
    pub(crate) async fn write_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write_turn.lock().await
    }

    /// Where the audit store appends event batches.
    pub(crate) fn audit_appender(&self) -> &SqliteAppender {
        &self.audit_appender
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|err| super::map_migrate_err(err, map_database_err))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        first_version: &KeyVersionRecord,
    ) -> Result<(), StoreError> {
        check_first_version(key, first_version)?;
        let _turn = self.write_turn().await;
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let result = insert_key_tx(&mut conn, key, first_version).await;
        if result.is_err() {
            // A failed COMMIT leaves sqlx's connection at transaction depth 1: never reuse it.
            conn.close_on_drop();
        }
        result
    }

    async fn get_key(&self, key_id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE key_id = ?1"
        ))
        .bind(key_id_text(key_id))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| key_from_row(&row))
        .transpose()
    }

    async fn get_key_by_alias(&self, alias: &str) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE alias = ?1"
        ))
        .bind(alias)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| key_from_row(&row))
        .transpose()
    }

    async fn list_keys(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = match after {
            Some(after) => {
                sqlx::query(concat!(
                    "SELECT ",
                    key_columns!(),
                    " FROM keys WHERE key_id > ?1 ORDER BY key_id LIMIT ?2"
                ))
                .bind(key_id_text(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    key_columns!(),
                    " FROM keys ORDER BY key_id LIMIT ?1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn get_version(
        &self,
        key_id: Uuid,
        version: u32,
    ) -> Result<Option<KeyVersionRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM key_versions WHERE key_id = ?1 AND version = ?2"
        ))
        .bind(key_id_text(key_id))
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| version_from_row(&row))
        .transpose()
    }

    async fn list_versions(&self, key_id: Uuid) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM key_versions WHERE key_id = ?1 ORDER BY version"
        ))
        .bind(key_id_text(key_id))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(version_from_row).collect()
    }

    async fn add_version(
        &self,
        version: &KeyVersionRecord,
        make_primary: bool,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let result = add_version_tx(&mut conn, version, make_primary).await;
        if result.is_err() {
            // A failed COMMIT leaves sqlx's connection at transaction depth 1: never reuse it.
            conn.close_on_drop();
        }
        result
    }

    async fn update_key(
        &self,
        key: &KeyRecord,
        expected_state: KeyState,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query(concat!(
            "UPDATE keys SET state = ?2, rotation_period_ms = ?3, next_rotation_ms = ?4, \
             min_decryption_version = ?5, deletion_at_ms = ?6 \
             WHERE key_id = ?1 AND state = ?7 RETURNING ",
            key_columns!()
        ))
        .bind(key_id_text(key.key_id))
        .bind(key.state.as_str())
        .bind(key.rotation_period_ms)
        .bind(key.next_rotation_ms)
        .bind(i64::from(key.min_decryption_version))
        .bind(key.deletion_at_ms)
        .bind(expected_state.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| key_from_row(&row))
        .transpose()
    }

    async fn set_version_state(
        &self,
        key_id: Uuid,
        version: u32,
        state: VersionState,
    ) -> Result<Option<KeyVersionRecord>, StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query(concat!(
            "UPDATE key_versions SET state = ?3 WHERE key_id = ?1 AND version = ?2 RETURNING ",
            version_columns!()
        ))
        .bind(key_id_text(key_id))
        .bind(i64::from(version))
        .bind(state.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .map(|row| version_from_row(&row))
        .transpose()
    }

    async fn keys_due_for_rotation(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE next_rotation_ms IS NOT NULL AND next_rotation_ms <= ?1 \
             AND state = 'ENABLED' ORDER BY next_rotation_ms LIMIT ?2"
        ))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn keys_due_for_deletion(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE state = 'PENDING_DELETION' AND deletion_at_ms <= ?1 \
             ORDER BY deletion_at_ms LIMIT ?2"
        ))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    version: &KeyVersionRecord,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO key_versions (",
        version_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5)"
    ))
    .bind(key_id_text(version.key_id))
    .bind(i64::from(version.version))
    .bind(version.backend_ref.as_slice())
    .bind(version.state.as_str())
    .bind(version.created_at_ms)
    .execute(&mut **tx)
    .await
    .map(|_| ())
    .map_err(map_err)
}

/// The canonical text form of a key id in SQLite: lower-case, hyphenated (enforced by a CHECK
/// in the schema). Its text order is the UUID's byte order.
fn key_id_text(key_id: Uuid) -> String {
    key_id.hyphenated().to_string()
}

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let key_id: String = row.try_get("key_id").map_err(map_err)?;
    let state: String = row.try_get("state").map_err(map_err)?;
    let primary_version: i64 = row.try_get("primary_version").map_err(map_err)?;
    let min_decryption_version: i64 = row.try_get("min_decryption_version").map_err(map_err)?;
    Ok(KeyRecord {
        key_id: parse_key_id(&key_id)?,
        alias: row.try_get("alias").map_err(map_err)?,
        description: row.try_get("description").map_err(map_err)?,
        state: KeyState::parse(&state)?,
        primary_version: version_from_db(primary_version)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
        backend: row.try_get("backend").map_err(map_err)?,
        rotation_period_ms: row.try_get("rotation_period_ms").map_err(map_err)?,
        next_rotation_ms: row.try_get("next_rotation_ms").map_err(map_err)?,
        min_decryption_version: version_from_db(min_decryption_version)?,
        deletion_at_ms: row.try_get("deletion_at_ms").map_err(map_err)?,
    })
}

fn version_from_row(row: &SqliteRow) -> Result<KeyVersionRecord, StoreError> {
    let key_id: String = row.try_get("key_id").map_err(map_err)?;
    let version: i64 = row.try_get("version").map_err(map_err)?;
    let state: String = row.try_get("state").map_err(map_err)?;
    Ok(KeyVersionRecord {
        key_id: parse_key_id(&key_id)?,
        version: version_from_db(version)?,
        backend_ref: row.try_get("backend_ref").map_err(map_err)?,
        state: VersionState::parse(&state)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
    })
}

fn parse_key_id(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|_| StoreError::Internal("malformed key id in database".to_string()))
}

/// sqlx error → `StoreError` (see `super::map_sqlx_err`).
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    super::map_sqlx_err(err, map_database_err)
}

/// An error SQLite returned → `StoreError`.
fn map_database_err(db: &dyn sqlx::error::DatabaseError) -> StoreError {
    if db.is_unique_violation() {
        // SQLite names the columns, never the values: "UNIQUE constraint failed: keys.alias".
        let message = db.message();
        let what = if message.contains("audit_events.") {
            "this audit event seq is already stored"
        } else if message.contains("audit_checkpoints.") {
            "a checkpoint of this seq is already stored"
        } else if message.contains("key_versions.") {
            "this key version already exists"
        } else if message.contains("keys.alias") {
            "a key with this alias already exists"
        } else if message.contains("keys.key_id") {
            "a key with this id already exists"
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
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY (file, directory or file system made
        // read-only), SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PROTOCOL: the database
        // is there but cannot serve now.
        Some(5 | 6 | 8 | 10 | 13 | 14 | 15) => {
            StoreError::Unavailable(format!("sqlite: {}", db.message()))
        }
        _ => StoreError::Internal(format!("sqlite: {}", db.message())),
    }
}

async fn insert_key_tx(
    conn: &mut SqliteConnection,
    key: &KeyRecord,
    first_version: &KeyVersionRecord,
) -> Result<(), StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
    sqlx::query(concat!(
        "INSERT INTO keys (",
        key_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))
    .bind(key_id_text(key.key_id))
    .bind(key.alias.as_deref())
    .bind(key.description.as_str())
    .bind(key.state.as_str())
    .bind(i64::from(key.primary_version))
    .bind(key.created_at_ms)
    .bind(key.backend.as_str())
    .bind(key.rotation_period_ms)
    .bind(key.next_rotation_ms)
    .bind(i64::from(key.min_decryption_version))
    .bind(key.deletion_at_ms)
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    insert_version(&mut tx, first_version).await?;
    tx.commit().await.map_err(map_err)
}

async fn add_version_tx(
    conn: &mut SqliteConnection,
    version: &KeyVersionRecord,
    make_primary: bool,
) -> Result<(), StoreError> {
    let key_id = key_id_text(version.key_id);
    // IMMEDIATE: holds the database's write lock from here to COMMIT, so the "next
    // version" check below cannot race another writer.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
    let latest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM key_versions WHERE key_id = ?1")
            .bind(&key_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
    check_next_version(latest, version.version)?;
    insert_version(&mut tx, version).await?;
    if make_primary {
        let updated = sqlx::query(
            "UPDATE keys SET primary_version = ?2, next_rotation_ms = \
             CASE WHEN rotation_period_ms IS NULL THEN NULL ELSE ?3 + rotation_period_ms END \
             WHERE key_id = ?1 AND state IN ('ENABLED', 'DISABLED')",
        )
        .bind(&key_id)
        .bind(i64::from(version.version))
        .bind(version.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::Conflict(
                "the key is pending deletion or destroyed: no new primary version".to_string(),
            ));
        }
    }
    tx.commit().await.map_err(map_err)
}
