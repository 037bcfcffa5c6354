//! notes-store: clinical session notes that cannot be read without the KMS.
//!
//! Request path: `service` validates, asks the KMS for a data key (`kms`), seals or opens the
//! text locally (`crypto`), and reads or writes `store` (SQLite or PostgreSQL); `error` is the
//! one place errors become gRPC statuses; `server` wires mutual TLS (`svc_common::tls`),
//! health, reflection, metrics and shutdown. `main.rs` only parses arguments.

pub mod callers;
pub mod client_keys;
pub mod config;
pub mod crypto;
pub mod error;
pub mod kms;
pub mod kms_batch;
pub mod metrics;
pub mod rewrap;
pub mod server;
pub mod service;
pub mod store;
