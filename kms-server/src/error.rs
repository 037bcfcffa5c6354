//! The server's error type and the one place where errors become gRPC statuses.
//!
//! Messages returned to callers never contain key material, plaintext, PINs or backend
//! internals: `Internal` carries a detail that is logged server-side and replaced by a
//! generic message on the wire.

use tonic::{Code, Status};

use crate::backend::BackendError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Authentication of a ciphertext failed: wrong key, wrong context or a modified blob.
    /// Deliberately says nothing about which.
    #[error("decryption failed: the ciphertext blob or its encryption context is not valid")]
    DecryptionFailed,
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl KmsError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        KmsError::InvalidArgument(msg.into())
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            KmsError::InvalidArgument(_) | KmsError::DecryptionFailed => Code::InvalidArgument,
            KmsError::NotFound(_) => Code::NotFound,
            KmsError::AlreadyExists(_) => Code::AlreadyExists,
            KmsError::FailedPrecondition(_) => Code::FailedPrecondition,
            KmsError::PermissionDenied(_) => Code::PermissionDenied,
            KmsError::Unavailable(_) => Code::Unavailable,
            KmsError::Internal(_) => Code::Internal,
        }
    }
}

impl From<KmsError> for Status {
    fn from(err: KmsError) -> Self {
        if let KmsError::Internal(detail) = &err {
            tracing::error!(detail = %detail, "internal error");
        }
        Status::new(err.code(), err.to_string())
    }
}

impl From<BackendError> for KmsError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::DecryptionFailed => KmsError::DecryptionFailed,
            BackendError::Unavailable(m) => {
                KmsError::Unavailable(format!("key backend unavailable: {m}"))
            }
            BackendError::KeyNotFound(m) => KmsError::FailedPrecondition(format!(
                "key material not present in the backend: {m}"
            )),
            BackendError::InvalidInput(m) => KmsError::InvalidArgument(m),
            BackendError::Internal(m) => KmsError::Internal(format!("backend: {m}")),
        }
    }
}

impl From<StoreError> for KmsError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(m) => {
                KmsError::Unavailable(format!("metadata store unavailable: {m}"))
            }
            StoreError::Conflict(m) => KmsError::AlreadyExists(m),
            StoreError::Internal(m) => KmsError::Internal(format!("store: {m}")),
        }
    }
}

/// The canonical upper-case name of a gRPC code, as audit events record it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
