//! The crate's error type: one `thiserror` enum for building, parsing and key handling.
//!
//! Verification failures are *not* errors: [`crate::verify`] is total and reports them in a
//! [`crate::VerifyReport`].

/// Everything that can go wrong outside verification.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A hash field (prev/last/head hash) is not 64 lowercase hex digits.
    #[error("{field} must be 64 lowercase hex digits (SHA-256), got {len} characters")]
    MalformedHash {
        /// Which field was rejected.
        field: &'static str,
        /// Length of the rejected value (the value itself is not echoed).
        len: usize,
    },
    /// `Chain::resume` was given an inconsistent state (seq 0 with a non-zero hash, or the reverse).
    #[error("inconsistent chain state: {0}")]
    InconsistentChain(&'static str),
    /// The per-node sequence number cannot grow any further.
    #[error("audit sequence number exhausted at u64::MAX")]
    SeqExhausted,
    /// A checkpoint signature is not 64 raw bytes (r||s).
    #[error("checkpoint signature must be 64 bytes (raw r||s), got {0}")]
    SignatureLength(usize),
    /// A checkpoint signature does not verify (or names another key).
    #[error("checkpoint signature: {0}")]
    CheckpointSignature(&'static str),
    /// A public key could not be parsed.
    #[error("public key: {0}")]
    PublicKey(String),
    /// A JSON Lines record could not be parsed; `line` is 1-based.
    #[error("line {line}: {source}")]
    Json {
        /// 1-based line number in the input.
        line: usize,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// Serializing a record to JSON failed.
    #[error("serialize record: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Reading or writing failed; `line` is the 1-based input line when reading.
    #[error("i/o{}: {source}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Io {
        /// 1-based line number when reading, `None` when writing.
        line: Option<usize>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl From<std::io::Error> for AuditError {
    fn from(source: std::io::Error) -> Self {
        AuditError::Io { line: None, source }
    }
}
