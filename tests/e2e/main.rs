//! End-to-end tests against the real kms-server and notes-store binaries: SoftHSM through
//! PKCS#11, SQLite or PostgreSQL through sqlx, rustls mutual TLS with real certificates. One
//! test binary, one module per area (`notes_*` for notes-store); every test starts its own
//! servers, token and databases.

// Test code: a failed unwrap is a failed test (clippy.toml allows it only inside #[test] fns,
// not in the helpers they share).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod audit_kmsctl;
mod audit_outage;
mod authz;
mod bad_inputs;
mod bench_scripts;
mod data_keys_batch;
mod decrypt_batch;
mod hsm_outage;
mod key_rotation;
mod lifecycle;
mod notes_bad_inputs;
mod notes_concurrency;
mod notes_erasure;
mod notes_outage;
mod notes_rewrap;
mod notes_roundtrip;
mod notes_secrets;
mod notes_sites;
mod notes_tamper;
mod roundtrip;
mod secrets;
mod tpm_backend;
mod transport;
