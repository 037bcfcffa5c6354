//! Per-client key records (crypto-shredding) and re-wrap campaigns: the types and the two
//! storage traits every database implements next to `NoteStore` (`sqlite_keys.rs`,
//! `postgres_keys.rs`).
//!
//! A client's row in `client_keys` names its KMS key and its state:
//!
//! ```text
//!   (no row) ──first note──▶ ACTIVE ──EraseClient──▶ ERASING ──KMS EraseKey + delete rows──▶ ERASED
//! ```
//!
//! New notes and amendments are refused (inside the writing transaction) once the client is
//! ERASING or ERASED. A legal hold blocks the ACTIVE → ERASING step. `finish_erasure` deletes
//! the client's notes and revisions and stores the KMS receipt in one transaction; every step
//! can be repeated (the KMS `EraseKey` is idempotent), so an interrupted erasure is finished by
//! asking again.
//!
//! Re-wrapping replaces a revision's `wrapped_key` and `kms_key_version` only if the row still
//! holds the blob that was re-wrapped (a conditional update), one transaction per batch: a
//! campaign killed at any point and run again re-wraps what is left, never a row twice.

use async_trait::async_trait;
use uuid::Uuid;

use super::StoreError;

/// Where a client is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Active,
    /// Erasure started: writes refused; the KMS key may or may not be destroyed yet.
    Erasing,
    Erased,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Active => "ACTIVE",
            ClientState::Erasing => "ERASING",
            ClientState::Erased => "ERASED",
        }
    }

    pub fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "ACTIVE" => Ok(ClientState::Active),
            "ERASING" => Ok(ClientState::Erasing),
            "ERASED" => Ok(ClientState::Erased),
            other => Err(StoreError::Internal(format!(
                "unknown client state {other:?} in database"
            ))),
        }
    }

    /// Whether a note may be written for a client whose `client_keys.state` is `state` (no
    /// row yet: its first note). Every store's write path asks this inside its transaction.
    pub fn check_writable(state: Option<&str>) -> Result<(), StoreError> {
        match state.map(ClientState::parse).transpose()? {
            None | Some(ClientState::Active) => Ok(()),
            Some(other) => Err(StoreError::ClientNotActive(other.as_str())),
        }
    }
}

/// A legal hold on a client: erasure is refused while it is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    pub reason: String,
    pub placed_at_ms: i64,
}

/// What an erasure destroyed: the KMS's signed receipt and notes-store's own counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErasureRecord {
    pub erased_at_ms: i64,
    pub reason: String,
    /// Filled in by `finish_erasure` (ignored on input).
    pub notes_erased: u64,
    pub revisions_erased: u64,
    /// Canonical JSON from the KMS, its signature (raw r||s) and the signing key fingerprint.
    pub receipt: Vec<u8>,
    pub receipt_signature: Vec<u8>,
    pub receipt_fingerprint: String,
}

/// One `client_keys` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKeyRecord {
    pub site_id: String,
    pub client_id: String,
    /// The client's KMS key id; `None` until the first note.
    pub kms_key_id: Option<String>,
    pub state: ClientState,
    pub created_at_ms: i64,
    pub legal_hold: Option<LegalHold>,
    /// Set when the erasure started (state ERASING or ERASED).
    pub erasure_reason: Option<String>,
    /// Set once the state is ERASED.
    pub erasure: Option<ErasureRecord>,
}

/// Keys and states of clients.
#[async_trait]
pub trait ClientKeyStore: Send + Sync {
    async fn client_key(
        &self,
        site: &str,
        client: &str,
    ) -> Result<Option<ClientKeyRecord>, StoreError>;
    /// Records the client's KMS key unless it already has one (the first writer wins) and
    /// returns the row as stored. Creates the row (ACTIVE) if missing.
    async fn record_client_key(
        &self,
        site: &str,
        client: &str,
        kms_key_id: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError>;
    /// Places (`Some(reason)`) or lifts (`None`) a legal hold; creates the row if missing.
    /// `ClientNotActive` once erasure started.
    async fn set_legal_hold(
        &self,
        site: &str,
        client: &str,
        hold: Option<&str>,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError>;
    /// ACTIVE (or no row) → ERASING; `LegalHold` if a hold is set; ERASING and ERASED rows
    /// are returned unchanged (a retried erasure).
    async fn begin_erasure(
        &self,
        site: &str,
        client: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<ClientKeyRecord, StoreError>;
    /// One transaction: deletes the client's revisions and notes, marks the row ERASED with
    /// `erasure` (counts filled in). An ERASED row is returned unchanged.
    async fn finish_erasure(
        &self,
        site: &str,
        client: &str,
        erasure: &ErasureRecord,
    ) -> Result<ClientKeyRecord, StoreError>;
    /// How many notes and revisions the client has.
    async fn count_client_notes(&self, site: &str, client: &str) -> Result<(u64, u64), StoreError>;
}

/// A revision as a re-wrap campaign sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapRow {
    pub note_id: Uuid,
    pub revision: u32,
    pub site_id: String,
    pub client_id: String,
    pub kms_key_id: String,
    pub kms_key_version: u32,
    pub wrapped_key: Vec<u8>,
}

/// A re-wrapped data key to store, only if the row still holds `old_wrapped_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapUpdate {
    pub note_id: Uuid,
    pub revision: u32,
    pub old_wrapped_key: Vec<u8>,
    pub new_wrapped_key: Vec<u8>,
    pub kms_key_id: String,
    pub kms_key_version: u32,
}

/// How many revisions depend on one version of one KMS key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub kms_key_id: String,
    pub kms_key_version: u32,
    pub revisions: u64,
}

/// What re-wrap campaigns need from the database.
#[async_trait]
pub trait RewrapStore: Send + Sync {
    /// Up to `limit` revisions whose data keys are wrapped under version `kms_key_version` of
    /// `kms_key_id`, after `after` in (note_id, revision) order (the order of the
    /// `note_revisions_by_key_version` index).
    async fn rewrap_page(
        &self,
        kms_key_id: &str,
        kms_key_version: u32,
        after: Option<(Uuid, u32)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError>;
    /// Applies the updates in one transaction; each only if its row still holds the old blob.
    /// Returns how many rows were updated.
    async fn apply_rewraps(&self, updates: &[RewrapUpdate]) -> Result<u64, StoreError>;
    /// Revisions per (KMS key, version), ordered by key then version.
    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError>;
}

/// A count read from the database.
pub(super) fn count_from_db(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Internal(format!("negative count {n}")))
}

/// Builds a row's legal hold from its columns.
pub(super) fn hold_from_columns(
    flag: i64,
    reason: Option<String>,
    at: Option<i64>,
) -> Option<LegalHold> {
    (flag != 0).then(|| LegalHold {
        reason: reason.unwrap_or_default(),
        placed_at_ms: at.unwrap_or(0),
    })
}
