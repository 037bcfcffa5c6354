//! The client's error type: gRPC failures keep their `tonic::Status`; nothing secret is ever
//! put in an error (no plaintext, no key material, no request bodies).

use std::path::PathBuf;

use tonic::{Code, Status};

/// Everything `KmsClient` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (no endpoint, not `https://`, unparsable PEM, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// A file named in the configuration could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The server (or the transport) answered with a gRPC status. This is the last status
    /// seen after failover and retries. Match on [`Error::code`] or on `status.code()`.
    #[error("{method} failed at {endpoint}: {}: {}", code_name(status.code()), status.message())]
    Rpc {
        /// The RPC, e.g. `"Decrypt"`.
        method: &'static str,
        /// The endpoint that produced `status`.
        endpoint: String,
        /// The status as received (a client-side deadline is reported as `DEADLINE_EXCEEDED`).
        status: Status,
    },

    /// The server answered OK but the response breaks the contract (e.g. a missing field).
    #[error("{method}: invalid response from server: {reason}")]
    InvalidResponse {
        /// The RPC.
        method: &'static str,
        /// What was wrong; never contains response bytes.
        reason: String,
    },
}

impl Error {
    /// The gRPC code of an [`Error::Rpc`]; `None` for local errors.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The status of an [`Error::Rpc`]; `None` for local errors.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// The canonical upper-case name of a gRPC code (`UNAVAILABLE`, `NOT_FOUND`, ...), as grpcurl
/// and the gRPC specification print it. (`tonic::Code`'s `Display` prints a sentence instead.)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_error_keeps_code_and_message() {
        let err = Error::Rpc {
            method: "DescribeKey",
            endpoint: "https://kms-1:7443".into(),
            status: Status::not_found("key not found"),
        };
        assert_eq!(err.code(), Some(Code::NotFound));
        assert_eq!(
            err.to_string(),
            "DescribeKey failed at https://kms-1:7443: NOT_FOUND: key not found"
        );
        assert_eq!(Error::Config("x".into()).code(), None);
    }

    #[test]
    fn code_names_match_numeric_codes() {
        assert_eq!(code_name(Code::from_i32(14)), "UNAVAILABLE");
        assert_eq!(code_name(Code::from_i32(9)), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
