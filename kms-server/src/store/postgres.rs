//! `KeyStore` on PostgreSQL: a small pool that fails fast; migrations in `migrations/postgres`.
//!
//! The pool's acquire timeout bounds every wait for a connection, including the first connect:
//! an unreachable or stopped server gives `StoreError::Unavailable` after about
//! `ACQUIRE_TIMEOUT` instead of hanging the request. `add_version` locks the key's row
//! (`SELECT … FOR UPDATE`) so concurrent rotations of one key are serialized.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use uuid::Uuid;

use super::{
    check_first_version, check_next_version, version_from_db, KeyRecord, KeyState, KeyStore,
    KeyVersionRecord, StoreError, VersionState,
};

/// Longest wait for a pooled connection (and so for a connection attempt).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 8;

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

/// Key metadata in a PostgreSQL database (the tables of the connection's current schema).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `postgres://…` / `postgresql://…` and checks that one connection can be
    /// opened. Does not run migrations (see [`KeyStore::migrate`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(map_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Ok(PostgresStore { pool })
    }

    /// The connection pool, shared with the audit store (`crate::audit`).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
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
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(concat!(
            "INSERT INTO keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(key.key_id)
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

    async fn get_key(&self, key_id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM keys WHERE key_id = $1"
        ))
        .bind(key_id)
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
            " FROM keys WHERE alias = $1"
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
                    " FROM keys WHERE key_id > $1 ORDER BY key_id LIMIT $2"
                ))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    key_columns!(),
                    " FROM keys ORDER BY key_id LIMIT $1"
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
            " FROM key_versions WHERE key_id = $1 AND version = $2"
        ))
        .bind(key_id)
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
            " FROM key_versions WHERE key_id = $1 ORDER BY version"
        ))
        .bind(key_id)
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
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // Lock the key's row until COMMIT: a concurrent add_version on the same key waits
        // here, then sees this one's version in the check below.
        let locked = sqlx::query("SELECT 1 FROM keys WHERE key_id = $1 FOR UPDATE")
            .bind(version.key_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let latest: Option<i64> = match locked {
            None => None,
            Some(_) => {
                sqlx::query_scalar("SELECT MAX(version) FROM key_versions WHERE key_id = $1")
                    .bind(version.key_id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map_err)?
            }
        };
        check_next_version(latest, version.version)?;
        insert_version(&mut tx, version).await?;
        if make_primary {
            let updated = sqlx::query(
                "UPDATE keys SET primary_version = $2, next_rotation_ms = \
                 CASE WHEN rotation_period_ms IS NULL THEN NULL ELSE $3 + rotation_period_ms END \
                 WHERE key_id = $1 AND state IN ('ENABLED', 'DISABLED')",
            )
            .bind(version.key_id)
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

    async fn update_key(
        &self,
        key: &KeyRecord,
        expected_state: KeyState,
    ) -> Result<Option<KeyRecord>, StoreError> {
        sqlx::query(concat!(
            "UPDATE keys SET state = $2, rotation_period_ms = $3, next_rotation_ms = $4, \
             min_decryption_version = $5, deletion_at_ms = $6 \
             WHERE key_id = $1 AND state = $7 RETURNING ",
            key_columns!()
        ))
        .bind(key.key_id)
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
        sqlx::query(concat!(
            "UPDATE key_versions SET state = $3 WHERE key_id = $1 AND version = $2 RETURNING ",
            version_columns!()
        ))
        .bind(key_id)
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
            " FROM keys WHERE next_rotation_ms IS NOT NULL AND next_rotation_ms <= $1 \
             AND state = 'ENABLED' ORDER BY next_rotation_ms LIMIT $2"
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
            " FROM keys WHERE state = 'PENDING_DELETION' AND deletion_at_ms <= $1 \
             ORDER BY deletion_at_ms LIMIT $2"
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
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    version: &KeyVersionRecord,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO key_versions (",
        version_columns!(),
        ") VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind(version.key_id)
    .bind(i64::from(version.version))
    .bind(version.backend_ref.as_slice())
    .bind(version.state.as_str())
    .bind(version.created_at_ms)
    .execute(&mut **tx)
    .await
    .map(|_| ())
    .map_err(map_err)
}

fn key_from_row(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let state: String = row.try_get("state").map_err(map_err)?;
    let primary_version: i64 = row.try_get("primary_version").map_err(map_err)?;
    let min_decryption_version: i64 = row.try_get("min_decryption_version").map_err(map_err)?;
    Ok(KeyRecord {
        key_id: row.try_get("key_id").map_err(map_err)?,
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

fn version_from_row(row: &PgRow) -> Result<KeyVersionRecord, StoreError> {
    let version: i64 = row.try_get("version").map_err(map_err)?;
    let state: String = row.try_get("state").map_err(map_err)?;
    Ok(KeyVersionRecord {
        key_id: row.try_get("key_id").map_err(map_err)?,
        version: version_from_db(version)?,
        backend_ref: row.try_get("backend_ref").map_err(map_err)?,
        state: VersionState::parse(&state)?,
        created_at_ms: row.try_get("created_at_ms").map_err(map_err)?,
    })
}

/// sqlx error → `StoreError` (see `super::map_sqlx_err`).
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    super::map_sqlx_err(err, map_database_err)
}

/// An error PostgreSQL returned → `StoreError`, by SQLSTATE. Only the primary message is
/// used: PostgreSQL's DETAIL would echo the offending values.
fn map_database_err(db: &dyn sqlx::error::DatabaseError) -> StoreError {
    if db.is_unique_violation() {
        let what = match db.constraint() {
            Some("keys_alias_unique") => "a key with this alias already exists",
            Some("keys_pkey") => "a key with this id already exists",
            Some("key_versions_pkey") => "this key version already exists",
            Some("audit_events_pkey") => "this audit event seq is already stored",
            Some("audit_checkpoints_pkey") => "a checkpoint of this seq is already stored",
            _ => "a uniqueness constraint was violated",
        };
        return StoreError::Conflict(what.to_string());
    }
    let code = db.code();
    let code = code.as_deref().unwrap_or("");
    let transient = code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (e.g. too many connections)
        || matches!(
            code,
            "57P01" // admin_shutdown
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up, recovering)
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
