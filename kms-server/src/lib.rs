//! kms-server: a gRPC key management service whose master keys live in a PKCS#11 HSM or a TPM.
//!
//! Request path: `service` validates, resolves the key through `store`, calls the
//! `backend` off the async runtime, and answers; `error` is the one place errors become
//! gRPC statuses; `envelope` owns the wrapped-key format and `context` the AAD encoding;
//! `tls` the mutual-TLS listener; `server` wires it all together.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod config;
pub mod context;
pub mod envelope;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
