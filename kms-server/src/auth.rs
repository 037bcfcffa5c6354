//! Caller identity from the verified client certificate: implemented in `svc-common` (shared
//! with notes-store), re-exported here. Roles and policies build on it.

pub use svc_common::identity::{identity_from_der, peer_identity, peer_name, Identity};
