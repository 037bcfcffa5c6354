//! What the workspace's gRPC servers (kms-server, notes-store) share, so that the
//! security-relevant plumbing exists once: the mutual-TLS listener and PEM loading (`tls`),
//! the caller's identity from its verified certificate (`identity`), the SIGINT/SIGTERM
//! future (`shutdown`), SQLite database files created private (`sqlite_file`), and the
//! identity/key-name patterns of authorization rules (`pattern`).

pub mod identity;
pub mod pattern;
pub mod shutdown;
pub mod sqlite_file;
pub mod tls;
