//! One audit record ([`AuditEvent`]), its canonical encoding and its hash.
//!
//! An event **never holds key material, plaintext, wrapped keys, PINs or tokens**: only who
//! asked for which key, for what, and how it ended. The encryption context is expected to hold
//! opaque identifiers (note id, patient id…), never clinical text.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::encoding::Encoder;

/// Domain tag that starts the bytes an event hash is computed over.
pub const EVENT_DOMAIN_TAG: &str = "kms-audit-event-v1";

/// `prev_hash` of the first event of a chain (seq 1): 64 zeros.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One key-access audit record. JSON field names are stable: they are the names below.
///
/// Holds no key material and no plaintext (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Per-node sequence number: 1, 2, 3… without gaps.
    pub seq: u64,
    /// When the operation finished, UTC milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The KMS node whose chain this event belongs to.
    pub node_id: String,
    /// The request id (also in the server's tracing spans).
    pub request_id: String,
    /// The caller's identity name (SAN URI or CN); empty for server-internal events.
    pub caller: String,
    /// Hex SHA-256 of the caller's public key; empty for server-internal events.
    pub caller_fingerprint: String,
    /// The caller's role; may be empty.
    pub role: String,
    /// What happened, e.g. `GenerateDataKey`, `KeyCreated`, `ServerStarted`.
    pub operation: String,
    /// The key concerned, if any.
    pub key_id: Option<String>,
    /// The key version concerned, if any.
    pub key_version: Option<u32>,
    /// Encryption context (opaque ids only).
    pub context: BTreeMap<String, String>,
    /// The end user on whose behalf the caller acted; may be empty.
    pub acting_user: String,
    /// Declared purpose of the access; may be empty.
    pub purpose: String,
    /// gRPC status code name: `OK`, `PERMISSION_DENIED`, `UNAVAILABLE`…
    pub outcome: String,
    /// Time spent handling the request, in microseconds.
    pub latency_us: u64,
    /// Short non-secret note; may be empty.
    pub detail: String,
    /// Hex hash of the previous event of this node ([`ZERO_HASH`] for seq 1).
    pub prev_hash: String,
    /// Hex SHA-256 of [`AuditEvent::canonical_bytes`].
    pub hash: String,
}

/// The caller-supplied part of an event: everything except `seq`, `node_id`, `prev_hash` and
/// `hash`, which [`crate::Chain::append`] fills in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFields {
    /// See [`AuditEvent::time_ms`].
    pub time_ms: i64,
    /// See [`AuditEvent::request_id`].
    pub request_id: String,
    /// See [`AuditEvent::caller`].
    pub caller: String,
    /// See [`AuditEvent::caller_fingerprint`].
    pub caller_fingerprint: String,
    /// See [`AuditEvent::role`].
    pub role: String,
    /// See [`AuditEvent::operation`].
    pub operation: String,
    /// See [`AuditEvent::key_id`].
    pub key_id: Option<String>,
    /// See [`AuditEvent::key_version`].
    pub key_version: Option<u32>,
    /// See [`AuditEvent::context`].
    pub context: BTreeMap<String, String>,
    /// See [`AuditEvent::acting_user`].
    pub acting_user: String,
    /// See [`AuditEvent::purpose`].
    pub purpose: String,
    /// See [`AuditEvent::outcome`].
    pub outcome: String,
    /// See [`AuditEvent::latency_us`].
    pub latency_us: u64,
    /// See [`AuditEvent::detail`].
    pub detail: String,
}

impl AuditEvent {
    /// The bytes the event hash is computed over: [`EVENT_DOMAIN_TAG`], then every field except
    /// `hash` in declaration order, encoded as described in the `encoding` module docs:
    ///
    /// `seq` u64, `time_ms` i64, `node_id` str, `request_id` str, `caller` str,
    /// `caller_fingerprint` str, `role` str, `operation` str, `key_id` opt-str,
    /// `key_version` opt-u32, `context` map, `acting_user` str, `purpose` str, `outcome` str,
    /// `latency_us` u64, `detail` str, `prev_hash` str (the hex text, 64 bytes).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        Encoder::new(EVENT_DOMAIN_TAG)
            .u64(self.seq)
            .i64(self.time_ms)
            .str(&self.node_id)
            .str(&self.request_id)
            .str(&self.caller)
            .str(&self.caller_fingerprint)
            .str(&self.role)
            .str(&self.operation)
            .opt_str(self.key_id.as_deref())
            .opt_u32(self.key_version)
            .map(&self.context)
            .str(&self.acting_user)
            .str(&self.purpose)
            .str(&self.outcome)
            .u64(self.latency_us)
            .str(&self.detail)
            .str(&self.prev_hash)
            .finish()
    }

    /// Lowercase hex SHA-256 of [`AuditEvent::canonical_bytes`]: what `hash` must equal.
    pub fn compute_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_bytes()))
    }

    /// Builds an event from its parts and computes its hash.
    pub(crate) fn seal(seq: u64, node_id: &str, prev_hash: &str, f: EventFields) -> Self {
        let mut event = AuditEvent {
            seq,
            time_ms: f.time_ms,
            node_id: node_id.to_owned(),
            request_id: f.request_id,
            caller: f.caller,
            caller_fingerprint: f.caller_fingerprint,
            role: f.role,
            operation: f.operation,
            key_id: f.key_id,
            key_version: f.key_version,
            context: f.context,
            acting_user: f.acting_user,
            purpose: f.purpose,
            outcome: f.outcome,
            latency_us: f.latency_us,
            detail: f.detail,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        event.hash = event.compute_hash();
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed event; its hash below is a known-answer vector. If this test fails, the
    /// canonical encoding changed: that breaks every stored chain and needs a new domain tag.
    pub(crate) fn kat_event() -> AuditEvent {
        let mut context = BTreeMap::new();
        context.insert("patient_id".to_owned(), "p-42".to_owned());
        context.insert("note_id".to_owned(), "n-7".to_owned());
        AuditEvent::seal(
            1,
            "kms-a",
            ZERO_HASH,
            EventFields {
                time_ms: 1_700_000_000_123,
                request_id: "req-1".to_owned(),
                caller: "spiffe://clinic/notes-store".to_owned(),
                caller_fingerprint: "ab".repeat(32),
                role: "service".to_owned(),
                operation: "GenerateDataKey".to_owned(),
                key_id: Some("tenant-1/notes".to_owned()),
                key_version: Some(3),
                context,
                acting_user: "dr-ames".to_owned(),
                purpose: "write-note".to_owned(),
                outcome: "OK".to_owned(),
                latency_us: 1234,
                detail: String::new(),
            },
        )
    }

    const KAT_HASH: &str = "a9d8b165d0386d86d14919703eaccae2d53d550f9b5bd130d0321ac5d0f431af";

    #[test]
    fn known_answer_hash() {
        let e = kat_event();
        assert_eq!(e.hash, e.compute_hash());
        assert_eq!(e.hash, KAT_HASH);
    }

    #[test]
    fn option_none_differs_from_empty() {
        let mut a = kat_event();
        a.key_id = None;
        let mut b = kat_event();
        b.key_id = Some(String::new());
        assert_ne!(a.compute_hash(), b.compute_hash());
    }

    #[test]
    fn moving_bytes_between_fields_changes_hash() {
        let mut a = kat_event();
        a.acting_user = "ab".to_owned();
        a.purpose = "c".to_owned();
        let mut b = kat_event();
        b.acting_user = "a".to_owned();
        b.purpose = "bc".to_owned();
        assert_ne!(a.compute_hash(), b.compute_hash());
    }
}
