//! End-to-end tests against the real kms-server binary: SoftHSM through PKCS#11, SQLite or
//! PostgreSQL through sqlx, rustls mutual TLS with real certificates. One test binary, one
//! module per area; every test starts its own server, token and database.

mod bad_inputs;
mod hsm_outage;
mod lifecycle;
mod roundtrip;
mod secrets;
mod transport;
