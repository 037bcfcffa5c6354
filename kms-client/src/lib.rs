//! Async client for the kms.v1 key management service (mutual TLS, failover, deadlines,
//! retries) and its audit service ([`AuditClient`], for auditors), plus a dev PKI generator
//! ([`pki`]) and the `kmsctl` command.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kms_client::Error> {
//! use std::collections::BTreeMap;
//! use kms_client::{KmsClient, KmsClientConfig};
//!
//! let config = KmsClientConfig::from_files(
//!     vec!["https://kms-1:7443".into(), "https://kms-2:7443".into()],
//!     "pki/ca.pem", "pki/notes.pem", "pki/notes.key",
//! )?;
//! let kms = KmsClient::new(&config)?;
//! let context = BTreeMap::from([("note".to_string(), "42".to_string())]);
//! let data_key = kms.generate_data_key("notes", &context).await?;
//! // ... encrypt locally with data_key.plaintext, store data_key.ciphertext_blob ...
//! let again = kms.decrypt(&data_key.ciphertext_blob, &context, None).await?;
//! assert_eq!(again.plaintext, data_key.plaintext);
//! # Ok(()) }
//! ```
//!
//! # Failover, deadlines and retries
//!
//! - **Endpoints** are tried in the configured order, starting with the one that last
//!   answered ("sticky" failover: once the first endpoint is down, calls stay on the next one
//!   rather than paying a failed connect every time). We use our own loop rather than
//!   `Channel::balance_list` because the balancer spreads load randomly and queues requests
//!   while no endpoint is ready, which hides *which* endpoint failed and why.
//! - **Deadlines**: every attempt carries `grpc-timeout = request_timeout`; connecting (TCP
//!   and TLS) is bounded by `connect_timeout`. A local expiry is reported as
//!   `DEADLINE_EXCEEDED` and is not retried.
//! - **Retries**: only on `UNAVAILABLE` (the server said so, or it could not be reached), and
//!   only when repeating is safe. Every method is idempotent except `CreateKey`:
//!   `DescribeKey`/`ListKeys` read; `EnableKey`/`DisableKey` set a state; `GenerateDataKey*`
//!   make a fresh key each time and store nothing; `Encrypt`/`Decrypt`/`ReEncrypt` store
//!   nothing. `CreateKey` is retried only when no connection could be established (the
//!   request provably never left the process), because a repeat would create a second key.
//!   A failed pass over all endpoints is followed by a sleep of `initial_backoff · 2^n`
//!   (capped at 5 s, half of it random) and another pass, up to `max_retries` times.
//!   Worst case for one call: `(1 + max_retries) · endpoints · (connect_timeout +
//!   request_timeout)` plus the sleeps; wrap the call in `tokio::time::timeout` if you need
//!   a tighter overall bound.
//!
//! # Secrets
//!
//! Plaintexts returned by the server are moved into [`zeroize::Zeroizing`] buffers, and the
//! `Debug` output of [`DataKey`], [`Decrypted`] and [`KmsClientConfig`] hides them. Errors
//! never contain plaintext. Copies inside tonic/prost buffers (request bodies, the TLS
//! identity) are outside our control and are not zeroized.

mod audit;
mod client;
mod config;
mod error;
mod lifecycle;
pub mod pki;
mod transport;
mod types;

pub use audit::{
    AuditClient, AuditEventPage, AuditEventStream, AuditFilter, AuditPublicKey, ServerVerifyReport,
    AUDIT_SIGNATURE_ALGORITHM,
};
pub use client::{KmsClient, MAX_DATA_KEYS_PER_CALL, MAX_DECRYPTS_PER_CALL};
pub use config::{
    KmsClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
};
pub use error::{code_name, Error};
/// Re-exported: audit events and export records are `kms_audit` types.
pub use kms_audit;
pub use lifecycle::{
    ErasureReceipt, KeyVersion, KeyVersionState, ReEncryptItem, ReEncryptOutcome,
    MAX_BATCH_RE_ENCRYPT,
};
/// Re-exported so callers can match on [`Error::code`] without depending on tonic.
pub use tonic::Code;
pub use transport::{Method, MAX_BACKOFF};
pub use types::{
    AuditMetadata, Ciphertext, DataKey, Decrypted, EncryptionContext, KeyMetadata, KeyPage,
    KeyState, ReEncrypted, WhoAmI,
};
/// Re-exported for [`KmsClientConfig::key_pem`] and the plaintext fields.
pub use zeroize::Zeroizing;
