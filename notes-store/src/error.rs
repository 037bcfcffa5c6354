//! notes-store's error type and the one place where errors become gRPC statuses.
//!
//! | error                                   | status              |
//! |-----------------------------------------|---------------------|
//! | bad input                               | INVALID_ARGUMENT    |
//! | unknown note or revision                | NOT_FOUND           |
//! | stale expected revision                 | FAILED_PRECONDITION |
//! | client under legal hold (erasure), client erased or being erased (writes) | FAILED_PRECONDITION |
//! | concurrent amendment won the race       | ABORTED             |
//! | KMS key disabled / missing              | FAILED_PRECONDITION |
//! | KMS or database unreachable, timed out  | UNAVAILABLE         |
//! | ciphertext/wrapped key not matching its record (KMS refuses the blob or its context, local GCM failure, wrong key id) | DATA_LOSS |
//! | anything else                           | INTERNAL (detail logged, generic message) |
//!
//! Messages never contain note text, data keys or driver details that echo values.

use kms_client::Code;
use tonic::Status;

use crate::crypto::CryptoError;
use crate::store::StoreError;

/// The message of every integrity failure: deliberately the same whatever the cause.
pub const INTEGRITY_MESSAGE: &str = "note ciphertext does not match its record";

#[derive(Debug, Clone, thiserror::Error)]
pub enum NotesError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller may not act for the site.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the note is at revision {current}, not the expected revision {expected}")]
    StaleRevision { expected: u32, current: u32 },
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// A stored revision does not decrypt to what its record says. `detail` is logged only.
    #[error("{INTEGRITY_MESSAGE}")]
    Integrity { detail: String },
    #[error("internal error")]
    Internal(String),
}

/// Which KMS call failed, for mapping its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsCall {
    GenerateDataKey,
    Decrypt,
    /// Creating (or describing) a client's key.
    ClientKey,
    EraseKey,
}

impl NotesError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        NotesError::InvalidArgument(msg.into())
    }

    pub fn integrity(detail: impl Into<String>) -> Self {
        NotesError::Integrity {
            detail: detail.into(),
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> tonic::Code {
        match self {
            NotesError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            NotesError::NotFound(_) => tonic::Code::NotFound,
            NotesError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            NotesError::StaleRevision { .. } | NotesError::FailedPrecondition(_) => {
                tonic::Code::FailedPrecondition
            }
            NotesError::Aborted(_) => tonic::Code::Aborted,
            NotesError::Unavailable(_) => tonic::Code::Unavailable,
            NotesError::Integrity { .. } => tonic::Code::DataLoss,
            NotesError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// A failed KMS call. The KMS's own message is kept for operators (it names no secret);
    /// for `Decrypt`, every refusal of the blob or its context is an integrity failure.
    pub fn from_kms(call: KmsCall, err: kms_client::Error) -> Self {
        let Some(code) = err.code() else {
            return NotesError::Internal(format!("kms client: {err}"));
        };
        match (code, call) {
            (Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted, _) => {
                NotesError::Unavailable(format!("the KMS is unavailable: {}", kms_message(&err)))
            }
            (Code::InvalidArgument | Code::NotFound, KmsCall::Decrypt) => {
                NotesError::integrity(format!("KMS Decrypt refused the wrapped key: {err}"))
            }
            (Code::FailedPrecondition | Code::NotFound, _) => NotesError::FailedPrecondition(
                format!("the KMS key cannot be used: {}", kms_message(&err)),
            ),
            _ => NotesError::Internal(format!("KMS {call:?}: {err}")),
        }
    }
}

/// The status message of a KMS error, without the endpoint.
fn kms_message(err: &kms_client::Error) -> String {
    err.status()
        .map(|s| s.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

impl From<NotesError> for Status {
    fn from(err: NotesError) -> Self {
        match &err {
            NotesError::Internal(detail) => tracing::error!(detail = %detail, "internal error"),
            NotesError::Integrity { detail } => {
                tracing::error!(detail = %detail, "stored note failed its integrity check")
            }
            _ => {}
        }
        Status::new(err.code(), err.to_string())
    }
}

impl From<StoreError> for NotesError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(m) => {
                NotesError::Unavailable(format!("the note database is unavailable: {m}"))
            }
            StoreError::NoSuchNote => NotesError::NotFound("note not found".to_string()),
            StoreError::Stale { current } => NotesError::FailedPrecondition(format!(
                "the note was amended meanwhile: it is now at revision {current}"
            )),
            StoreError::Conflict(m) => NotesError::Aborted(m),
            err @ (StoreError::LegalHold(_) | StoreError::ClientNotActive(_)) => {
                NotesError::FailedPrecondition(err.to_string())
            }
            StoreError::Internal(m) => NotesError::Internal(format!("store: {m}")),
        }
    }
}

impl From<CryptoError> for NotesError {
    fn from(err: CryptoError) -> Self {
        match err {
            CryptoError::Authentication | CryptoError::NonceLength(_) => {
                NotesError::integrity(format!("local AES-GCM: {err}"))
            }
            CryptoError::DataKeyLength(_) | CryptoError::Encryption => {
                NotesError::Internal(format!("crypto: {err}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: Code) -> kms_client::Error {
        kms_client::Error::Rpc {
            method: "Decrypt",
            endpoint: "https://kms:1".into(),
            status: Status::new(code, "x"),
        }
    }

    #[test]
    fn kms_errors_map_by_call() {
        let d = |c| NotesError::from_kms(KmsCall::Decrypt, rpc(c)).code();
        let g = |c| NotesError::from_kms(KmsCall::GenerateDataKey, rpc(c)).code();
        assert_eq!(d(Code::Unavailable), tonic::Code::Unavailable);
        assert_eq!(d(Code::DeadlineExceeded), tonic::Code::Unavailable);
        assert_eq!(d(Code::InvalidArgument), tonic::Code::DataLoss);
        assert_eq!(d(Code::NotFound), tonic::Code::DataLoss);
        assert_eq!(d(Code::FailedPrecondition), tonic::Code::FailedPrecondition);
        assert_eq!(d(Code::PermissionDenied), tonic::Code::Internal);
        assert_eq!(g(Code::Unavailable), tonic::Code::Unavailable);
        assert_eq!(g(Code::NotFound), tonic::Code::FailedPrecondition);
        assert_eq!(g(Code::InvalidArgument), tonic::Code::Internal);
    }

    #[test]
    fn internal_and_integrity_details_stay_private() {
        let s = Status::from(NotesError::Internal("secret detail".into()));
        assert_eq!(s.message(), "internal error");
        let s = Status::from(NotesError::integrity("which byte"));
        assert_eq!(s.code(), tonic::Code::DataLoss);
        assert_eq!(s.message(), INTEGRITY_MESSAGE);
    }
}
