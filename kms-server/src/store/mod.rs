//! Key metadata storage: ids, aliases, states, versions and backend object references.
//!
//! The store never holds key material: `backend_ref` is the backend's *name* for a key
//! version (a PKCS#11 object label, or a TPM-wrapped blob that only that TPM can load).
//! One trait, one implementation per database, each owning its migrations folder
//! (`migrations/sqlite`, `migrations/postgres`, kept in step by a test).

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::audit::AuditStore;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

// The error mapping of each database, for the audit store (same pool, same errors).
pub(crate) use postgres::map_err as map_postgres_err;
pub(crate) use sqlite::map_err as map_sqlite_err;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation for a transient reason.
    #[error("{0}")]
    Unavailable(String),
    /// A uniqueness constraint was violated (for example a duplicate alias).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

/// Lifecycle state of a key (mirrors `kms.v1.KeyState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// Every version destroyed in the backend; the row stays as a tombstone.
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "ENABLED",
            KeyState::Disabled => "DISABLED",
            KeyState::PendingDeletion => "PENDING_DELETION",
            KeyState::Destroyed => "DESTROYED",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "ENABLED" => Ok(KeyState::Enabled),
            "DISABLED" => Ok(KeyState::Disabled),
            "PENDING_DELETION" => Ok(KeyState::PendingDeletion),
            "DESTROYED" => Ok(KeyState::Destroyed),
            other => Err(StoreError::Internal(format!(
                "unknown key state {other:?} in database"
            ))),
        }
    }
}

/// State of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Enabled,
    Disabled,
    /// The backend object was destroyed; blobs under this version can never be opened again.
    Destroyed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Enabled => "ENABLED",
            VersionState::Disabled => "DISABLED",
            VersionState::Destroyed => "DESTROYED",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "ENABLED" => Ok(VersionState::Enabled),
            "DISABLED" => Ok(VersionState::Disabled),
            "DESTROYED" => Ok(VersionState::Destroyed),
            other => Err(StoreError::Internal(format!(
                "unknown version state {other:?} in database"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: Uuid,
    pub alias: Option<String>,
    pub description: String,
    pub state: KeyState,
    pub primary_version: u32,
    pub created_at_ms: i64,
    /// Backend kind that holds the key's versions: "pkcs11" or "tpm".
    pub backend: String,
    /// Automatic rotation period; `None` = no automatic rotation.
    pub rotation_period_ms: Option<i64>,
    /// When the next automatic rotation is due.
    pub next_rotation_ms: Option<i64>,
    /// Blobs under versions below this one are refused.
    pub min_decryption_version: u32,
    /// PENDING_DELETION: when the versions get destroyed; DESTROYED: when they were.
    pub deletion_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRecord {
    pub key_id: Uuid,
    /// 1, 2, 3... per key.
    pub version: u32,
    /// The backend's reference to the version's key object. Never key material in plaintext.
    pub backend_ref: Vec<u8>,
    pub state: VersionState,
    pub created_at_ms: i64,
}

/// Storage of key metadata. Every multi-row change is one transaction.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Applies this database's migrations. Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap liveness check used by the health service.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Inserts a new key together with its first version, atomically.
    /// A duplicate alias gives `StoreError::Conflict`.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        first_version: &KeyVersionRecord,
    ) -> Result<(), StoreError>;
    async fn get_key(&self, key_id: Uuid) -> Result<Option<KeyRecord>, StoreError>;
    async fn get_key_by_alias(&self, alias: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Keys ordered by key id, strictly after `after` when given, at most `limit`.
    async fn list_keys(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    async fn get_version(
        &self,
        key_id: Uuid,
        version: u32,
    ) -> Result<Option<KeyVersionRecord>, StoreError>;
    /// All versions of a key, ascending.
    async fn list_versions(&self, key_id: Uuid) -> Result<Vec<KeyVersionRecord>, StoreError>;
    /// Adds a version (its number must be the next one) and, if `make_primary`, makes it the
    /// key's primary version, in one transaction. Making it primary also moves the key's next
    /// automatic rotation to the version's creation time plus the rotation period.
    async fn add_version(
        &self,
        version: &KeyVersionRecord,
        make_primary: bool,
    ) -> Result<(), StoreError>;
    /// Writes the key's lifecycle fields (state, rotation period and next rotation, minimum
    /// decryption version, deletion time) if its state is still `expected_state` (compare and
    /// swap between KMS nodes). `None`: no such key, or its state has changed meanwhile.
    async fn update_key(
        &self,
        key: &KeyRecord,
        expected_state: KeyState,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Sets one version's state; `None` if there is no such version.
    async fn set_version_state(
        &self,
        key_id: Uuid,
        version: u32,
        state: VersionState,
    ) -> Result<Option<KeyVersionRecord>, StoreError>;
    /// ENABLED keys whose automatic rotation is due at `now_ms`, oldest due first.
    async fn keys_due_for_rotation(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// PENDING_DELETION keys whose waiting period has ended at `now_ms`.
    async fn keys_due_for_deletion(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
}

/// Opens the store named by `url`: `sqlite:<path>` (created with mode 0600 if missing) or
/// `postgres://…` / `postgresql://…`. Runs migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn KeyStore>, StoreError> {
    connect_both(url).await.map(|(keys, _)| keys)
}

/// As [`connect`], and the same store (one pool, one database) as the audit store too.
pub async fn connect_both(
    url: &str,
) -> Result<(Arc<dyn KeyStore>, Arc<dyn AuditStore>), StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = Arc::new(PostgresStore::connect(url).await?);
        store.migrate().await?;
        Ok((store.clone(), store))
    } else if url.starts_with("sqlite:") {
        let store = Arc::new(SqliteStore::connect(url).await?);
        store.migrate().await?;
        Ok((store.clone(), store))
    } else {
        Err(StoreError::Internal(
            "database url must start with sqlite: or postgres://".to_string(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the implementations (private to this module).

/// sqlx error → `StoreError`, the part common to both databases; `database` maps the errors
/// the database itself returned. Messages of `Unavailable` and `Conflict` reach clients: they
/// are fixed texts or short driver messages that name no values.
fn map_sqlx_err(
    err: sqlx::Error,
    database: fn(&dyn sqlx::error::DatabaseError) -> StoreError,
) -> StoreError {
    match err {
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a database connection".to_string())
        }
        sqlx::Error::PoolClosed => {
            StoreError::Unavailable("the database pool is closed".to_string())
        }
        sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable("the database worker crashed".to_string())
        }
        sqlx::Error::Io(err) => {
            StoreError::Unavailable(format!("cannot reach the database: {err}"))
        }
        sqlx::Error::Tls(err) => StoreError::Unavailable(format!("database tls error: {err}")),
        sqlx::Error::Database(db) => database(db.as_ref()),
        sqlx::Error::Migrate(err) => map_migrate_err(*err, database),
        other => StoreError::Internal(other.to_string()),
    }
}

/// Migration error → `StoreError`: a database that cannot be reached stays `Unavailable`,
/// everything else is `Internal`.
fn map_migrate_err(
    err: sqlx::migrate::MigrateError,
    database: fn(&dyn sqlx::error::DatabaseError) -> StoreError,
) -> StoreError {
    use sqlx::migrate::MigrateError;
    match err {
        MigrateError::Execute(err) | MigrateError::ExecuteMigration(err, _) => {
            match map_sqlx_err(err, database) {
                StoreError::Internal(msg) => {
                    StoreError::Internal(format!("migration failed: {msg}"))
                }
                other => other,
            }
        }
        other => StoreError::Internal(format!("migrations: {other}")),
    }
}

/// A key's first version must belong to it and be its primary version.
fn check_first_version(
    key: &KeyRecord,
    first_version: &KeyVersionRecord,
) -> Result<(), StoreError> {
    if first_version.key_id != key.key_id {
        return Err(StoreError::Internal(
            "insert_key: the first version belongs to another key".to_string(),
        ));
    }
    if first_version.version != key.primary_version {
        return Err(StoreError::Internal(format!(
            "insert_key: primary version {} is not the first version {}",
            key.primary_version, first_version.version
        )));
    }
    Ok(())
}

/// `latest` is the key's highest stored version, read inside the writing transaction (`None`:
/// no such key, since every key is inserted with its first version). `version` must be the
/// one after it; an existing version is a `Conflict`.
fn check_next_version(latest: Option<i64>, version: u32) -> Result<(), StoreError> {
    let Some(latest) = latest else {
        return Err(StoreError::Internal("add_version: no such key".to_string()));
    };
    let version = i64::from(version);
    if version <= latest {
        Err(StoreError::Conflict(
            "this key version already exists".to_string(),
        ))
    } else if version != latest + 1 {
        Err(StoreError::Internal(format!(
            "add_version: version {version} is not the next version {}",
            latest + 1
        )))
    } else {
        Ok(())
    }
}

/// A version number read from the database (stored as a 64-bit integer).
fn version_from_db(version: i64) -> Result<u32, StoreError> {
    u32::try_from(version).map_err(|_| {
        StoreError::Internal(format!("key version {version} in database is out of range"))
    })
}
