//! End-to-end tests against the real kms-server binary: SoftHSM through PKCS#11, SQLite or
//! PostgreSQL through sqlx, rustls mutual TLS with real certificates. One test binary, one
//! module per area; every test starts its own server, token and database.

// Test code: a failed unwrap is a failed test (clippy.toml allows it only inside #[test] fns,
// not in the helpers they share).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_inputs;
mod hsm_outage;
mod lifecycle;
mod roundtrip;
mod secrets;
mod transport;
