//! Note storage: note metadata and encrypted revisions. One trait, one implementation per
//! database (`sqlite.rs`, `postgres.rs`), each owning its migrations folder
//! (`migrations/sqlite`, `migrations/postgres`, kept in step by `tests/store.rs`).
//!
//! What is stored per revision: ids, metadata, the nonce and ciphertext of the body (and of
//! the amendment reason), the KMS-wrapped data key and the KMS key id/version it came from.
//! Nothing else secret: no plaintext, no plaintext data key.
//!
//! Revisions have the primary key `(note_id, revision)`. Adding one is a transaction that
//! checks the note's current revision against the caller's expectation, inserts the new
//! revision and moves the note's `current_revision` forward only if it still has the expected
//! value; two concurrent amendments of the same revision cannot both commit (the primary key
//! refuses the second insert, the conditional update the second move).

pub mod keys;
mod postgres;
mod postgres_inserter;
mod postgres_keys;
mod sqlite;
mod sqlite_inserter;
mod sqlite_keys;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

pub use keys::{
    ClientKeyRecord, ClientKeyStore, ClientState, ErasureRecord, KeyUsage, LegalHold, RewrapRow,
    RewrapStore, RewrapUpdate,
};
pub use postgres::PostgresStore;
/// How long a PostgreSQL note writer's own connection may sit idle before it is checked.
pub use postgres_inserter::PING_IF_IDLE_FOR as PG_WRITER_PING_IF_IDLE_FOR;
pub use sqlite::SqliteStore;

use crate::crypto::Sealed;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation for a transient reason.
    #[error("{0}")]
    Unavailable(String),
    /// `add_revision`: no such note.
    #[error("no such note")]
    NoSuchNote,
    /// `add_revision`: the note's current revision is not the expected one (it was amended).
    #[error("the note is at revision {current}")]
    Stale { current: u32 },
    /// A uniqueness constraint was violated, e.g. by a concurrent amendment.
    #[error("{0}")]
    Conflict(String),
    /// `begin_erasure`: a legal hold (its reason) blocks the erasure.
    #[error("the client is under a legal hold: {0}")]
    LegalHold(String),
    /// A write or hold for a client whose erasure has begun (the state).
    #[error("the client is {0}: its notes were erased")]
    ClientNotActive(&'static str),
    #[error("{0}")]
    Internal(String),
}

/// A note: what may be shown without decrypting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteRecord {
    pub note_id: Uuid,
    pub site_id: String,
    pub client_id: String,
    /// The author of revision 1.
    pub author_id: String,
    /// YYYY-MM-DD.
    pub session_date: String,
    pub current_revision: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The metadata of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionMeta {
    pub note_id: Uuid,
    pub revision: u32,
    pub author_id: String,
    pub created_at_ms: i64,
    /// The KMS key (UUID text) and version that wrapped the data key.
    pub kms_key_id: String,
    pub kms_key_version: u32,
    pub has_reason: bool,
}

/// One stored revision: metadata plus what is needed to decrypt it with the KMS's help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionRecord {
    pub meta: RevisionMeta,
    /// `crypto::CRYPTO_VERSION` at the time of writing.
    pub crypto_version: u32,
    /// The data key as wrapped by the KMS (a KMS ciphertext blob).
    pub wrapped_key: Vec<u8>,
    pub body: Sealed,
    /// Amendments only.
    pub reason: Option<Sealed>,
}

/// A page of a client's notes, in (session_date, note_id) order.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub site_id: String,
    pub client_id: String,
    /// Inclusive bounds, YYYY-MM-DD.
    pub date_from: Option<String>,
    pub date_to: Option<String>,
    /// Strictly after this (session_date, note_id).
    pub after: Option<(String, Uuid)>,
    pub limit: u32,
}

/// Storage of notes. Every multi-row change is one transaction. Client keys and re-wrap
/// campaigns are in `keys.rs`.
#[async_trait]
pub trait NoteStore: ClientKeyStore + RewrapStore + Send + Sync {
    /// Applies this database's migrations. Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap liveness check for the health service.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Inserts a note with its first revision, atomically: either both rows exist afterwards
    /// or neither does. `ClientNotActive` once the client's erasure has begun (as for
    /// `add_revision`).
    async fn insert_note(
        &self,
        note: &NoteRecord,
        first: &RevisionRecord,
    ) -> Result<(), StoreError>;
    async fn get_note(&self, note_id: Uuid) -> Result<Option<NoteRecord>, StoreError>;
    /// A note and, in the same query, one of its revisions: `revision`, or the current one if
    /// `None`. `None` if there is no such note; the revision is `None` if the note has no such
    /// revision. A read (`GetNote`) needs both, and one round trip instead of two saves the
    /// database and notes-store a statement each (README, session 18).
    async fn get_note_with_revision(
        &self,
        note_id: Uuid,
        revision: Option<u32>,
    ) -> Result<Option<(NoteRecord, Option<RevisionRecord>)>, StoreError>;
    /// Metadata of every revision of a note, ascending.
    async fn list_revisions(&self, note_id: Uuid) -> Result<Vec<RevisionMeta>, StoreError>;
    async fn list_notes(&self, query: &ListQuery) -> Result<Vec<NoteRecord>, StoreError>;
    /// Adds revision `expected + 1` if the note is at revision `expected`, atomically; sets the
    /// note's `updated_at_ms` to the revision's creation time. `NoSuchNote`, `Stale` (the note
    /// moved on) or `Conflict` (a concurrent amendment won) leave the database unchanged.
    async fn add_revision(
        &self,
        revision: &RevisionRecord,
        expected: u32,
    ) -> Result<(), StoreError>;
}

/// Opens the store named by `url`: `sqlite:<path>` (created with mode 0600 if missing) or
/// `postgres://…` / `postgresql://…`. Runs migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn NoteStore>, StoreError> {
    let store: Arc<dyn NoteStore> =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Arc::new(PostgresStore::connect(url).await?)
        } else if url.starts_with("sqlite:") {
            Arc::new(SqliteStore::connect(url).await?)
        } else {
            return Err(StoreError::Internal(
                "database url must start with sqlite: or postgres://".to_string(),
            ));
        };
    store.migrate().await?;
    Ok(store)
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
        sqlx::Error::Migrate(err) => match *err {
            sqlx::migrate::MigrateError::Execute(err)
            | sqlx::migrate::MigrateError::ExecuteMigration(err, _) => {
                match map_sqlx_err(err, database) {
                    StoreError::Internal(msg) => {
                        StoreError::Internal(format!("migration failed: {msg}"))
                    }
                    other => other,
                }
            }
            other => StoreError::Internal(format!("migrations: {other}")),
        },
        other => StoreError::Internal(other.to_string()),
    }
}

/// A note is inserted with revision 1, and that revision must belong to it.
fn check_first_revision(note: &NoteRecord, first: &RevisionRecord) -> Result<(), StoreError> {
    if first.meta.note_id != note.note_id || first.meta.revision != 1 || note.current_revision != 1
    {
        return Err(StoreError::Internal(
            "insert_note: a note starts at revision 1 with its own first revision".to_string(),
        ));
    }
    if first.reason.is_some() || first.meta.has_reason {
        return Err(StoreError::Internal(
            "insert_note: revision 1 has no amendment reason".to_string(),
        ));
    }
    Ok(())
}

/// The revision added by `add_revision` must be the one after `expected`, with a reason.
fn check_next_revision(revision: &RevisionRecord, expected: u32) -> Result<(), StoreError> {
    if expected == 0 || expected.checked_add(1) != Some(revision.meta.revision) {
        return Err(StoreError::Internal(format!(
            "add_revision: revision {} does not follow {expected}",
            revision.meta.revision
        )));
    }
    if revision.reason.is_none() {
        return Err(StoreError::Internal(
            "add_revision: an amendment needs its encrypted reason".to_string(),
        ));
    }
    Ok(())
}

/// `current` read inside the writing transaction (`None`: no such note).
fn check_current(current: Option<i64>, expected: u32) -> Result<(), StoreError> {
    match current {
        None => Err(StoreError::NoSuchNote),
        Some(current) if current == i64::from(expected) => Ok(()),
        Some(current) => Err(StoreError::Stale {
            current: revision_from_db(current)?,
        }),
    }
}

/// A revision number read from the database (stored as a 64-bit integer).
fn revision_from_db(revision: i64) -> Result<u32, StoreError> {
    u32::try_from(revision).map_err(|_| {
        StoreError::Internal(format!(
            "revision number {revision} in database is out of range"
        ))
    })
}

/// The reason columns are both set or both null (a CHECK in the schema, too).
fn reason_from_columns(
    nonce: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
) -> Result<Option<Sealed>, StoreError> {
    match (nonce, ciphertext) {
        (Some(nonce), Some(ciphertext)) => Ok(Some(Sealed { nonce, ciphertext })),
        (None, None) => Ok(None),
        _ => Err(StoreError::Internal(
            "revision has half an amendment reason".to_string(),
        )),
    }
}
