//! The key-access audit log: every RPC and administrative event becomes a hash-chained event
//! (format in the `kms-audit` crate), durably committed before the caller is answered, with
//! checkpoints signed by a key inside the HSM.
//!
//! `writer` owns the chain (one per node) and does group commit; `store` is the trait the
//! databases implement (`sqlite`, `postgres`); SQLite appends through `sqlite_appender`.

mod postgres;
pub mod service;
mod sqlite;
mod sqlite_appender;
pub mod store;
mod writer;

pub use service::AuditApi;
pub(crate) use sqlite_appender::SqliteAppender;
pub use store::{AuditStore, EventFilter};
pub(crate) use writer::now_ms;
pub use writer::{AuditLog, AuditSettings};
