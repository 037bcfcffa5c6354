//! kms-audit: the tamper-evident key-access audit log shared by `kms-server` (which builds and
//! chains events and checkpoints) and `kmsctl` (which verifies exports offline).
//!
//! - [`AuditEvent`]: one record of who used which key, for what, and how it ended. It never
//!   holds key material or plaintext.
//! - [`Chain`]: numbers events per node (seq 1, 2, 3…) and links each to the previous one by
//!   hash (`hash` = SHA-256 over a canonical, length-prefixed encoding; see
//!   [`AuditEvent::canonical_bytes`]).
//! - [`Checkpoint`]: the chain head at some seq, signed with ECDSA P-256 (by the HSM in
//!   production) over [`Checkpoint::digest`].
//! - [`write_jsonl`] / [`read_jsonl`]: the verifiable export; [`write_csv`]: a readable one.
//! - [`verify`]: the offline check, a pure function; its rules are in the `verify` module docs.
//!
//! This crate depends on no gRPC, database or PKCS#11 crate.

mod chain;
mod checkpoint;
mod csv;
mod encoding;
mod error;
mod event;
mod export;
#[cfg(feature = "proto")]
pub mod proto;
mod receipt;
mod verify;

pub use chain::Chain;
pub use checkpoint::{Checkpoint, VerifyingKeyInput, CHECKPOINT_DOMAIN_TAG};
pub use csv::{write_csv, CSV_COLUMNS};
pub use encoding::is_hex_sha256;
pub use error::AuditError;
pub use event::{AuditEvent, EventFields, EVENT_DOMAIN_TAG, ZERO_HASH};
pub use export::{interleave, read_jsonl, write_jsonl, ExportRecord};
pub use receipt::{verify_receipt, ErasureReceipt, ERASURE_RECEIPT_TYPE};
pub use verify::{verify, VerifyReport};
