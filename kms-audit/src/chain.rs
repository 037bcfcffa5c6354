//! [`Chain`]: the server-side builder that numbers events and links each to the previous one.

use crate::checkpoint::Checkpoint;
use crate::encoding::is_hex_sha256;
use crate::error::AuditError;
use crate::event::{AuditEvent, EventFields, ZERO_HASH};

/// The head of one node's chain: its node id, last sequence number and last hash.
///
/// Not synchronised: the server holds it behind its own lock. Appending only advances this
/// in-memory head; if persisting the returned event fails, the caller must not keep the
/// advanced head (append on a clone and commit the clone only after the event is stored, or
/// [`Chain::resume`] from the store again). Otherwise the next stored event leaves a gap that
/// verification will report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    node_id: String,
    last_seq: u64,
    last_hash: String,
}

impl Chain {
    /// A brand-new chain: the first appended event gets seq 1 and `prev_hash` = [`ZERO_HASH`].
    pub fn genesis(node_id: impl Into<String>) -> Self {
        Chain {
            node_id: node_id.into(),
            last_seq: 0,
            last_hash: ZERO_HASH.to_owned(),
        }
    }

    /// Continues a chain from the last stored event (`last_seq` 0 with [`ZERO_HASH`] means an
    /// empty chain, like [`Chain::genesis`]).
    ///
    /// # Errors
    /// [`AuditError::MalformedHash`] if `last_hash` is not 64 lowercase hex digits;
    /// [`AuditError::InconsistentChain`] if exactly one of "seq is 0" and "hash is zero" holds.
    pub fn resume(
        node_id: impl Into<String>,
        last_seq: u64,
        last_hash: impl Into<String>,
    ) -> Result<Self, AuditError> {
        let last_hash = last_hash.into();
        if !is_hex_sha256(&last_hash) {
            return Err(AuditError::MalformedHash {
                field: "last_hash",
                len: last_hash.len(),
            });
        }
        match (last_seq == 0, last_hash == ZERO_HASH) {
            (true, false) => Err(AuditError::InconsistentChain(
                "seq 0 (empty chain) needs the zero hash",
            )),
            (false, true) => Err(AuditError::InconsistentChain(
                "a non-empty chain cannot end in the zero hash",
            )),
            _ => Ok(Chain {
                node_id: node_id.into(),
                last_seq,
                last_hash,
            }),
        }
    }

    /// Continues a chain from its last stored event. The event's own hash is not re-checked
    /// here; use [`AuditEvent::compute_hash`] first if the store is not trusted.
    ///
    /// # Errors
    /// As [`Chain::resume`].
    pub fn resume_from(last: &AuditEvent) -> Result<Self, AuditError> {
        Chain::resume(last.node_id.clone(), last.seq, last.hash.clone())
    }

    /// This chain's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Sequence number of the last appended event (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Hash of the last appended event ([`ZERO_HASH`] when empty).
    pub fn head_hash(&self) -> &str {
        &self.last_hash
    }

    /// Seals the next event: assigns `seq` = last + 1, `node_id`, `prev_hash` = last hash, and
    /// computes `hash`; then makes it the new head.
    ///
    /// # Errors
    /// [`AuditError::SeqExhausted`] if the sequence number would overflow.
    pub fn append(&mut self, fields: EventFields) -> Result<AuditEvent, AuditError> {
        let seq = self
            .last_seq
            .checked_add(1)
            .ok_or(AuditError::SeqExhausted)?;
        let event = AuditEvent::seal(seq, &self.node_id, &self.last_hash, fields);
        self.last_seq = seq;
        self.last_hash.clone_from(&event.hash);
        Ok(event)
    }

    /// An unsigned checkpoint covering the current head, or `None` for an empty chain (there
    /// is nothing to cover). Sign [`Checkpoint::digest`] and store the result with
    /// [`Checkpoint::set_signature`].
    pub fn checkpoint(
        &self,
        time_ms: i64,
        public_key_fingerprint: impl Into<String>,
    ) -> Option<Checkpoint> {
        (self.last_seq > 0).then(|| Checkpoint {
            node_id: self.node_id.clone(),
            seq: self.last_seq,
            head_hash: self.last_hash.clone(),
            time_ms,
            signature: String::new(),
            public_key_fingerprint: public_key_fingerprint.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(op: &str) -> EventFields {
        EventFields {
            operation: op.to_owned(),
            outcome: "OK".to_owned(),
            ..EventFields::default()
        }
    }

    #[test]
    fn append_links_and_numbers() {
        let mut chain = Chain::genesis("n1");
        let a = chain.append(fields("ServerStarted")).unwrap();
        let b = chain.append(fields("KeyCreated")).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.prev_hash, ZERO_HASH);
        assert_eq!(b.prev_hash, a.hash);
        assert_eq!(chain.head_hash(), b.hash);
        assert_eq!(b.hash, b.compute_hash());

        let mut resumed = Chain::resume_from(&b).unwrap();
        let c = resumed.append(fields("Decrypt")).unwrap();
        assert_eq!(c.seq, 3);
        assert_eq!(c.prev_hash, b.hash);
    }

    #[test]
    fn resume_rejects_bad_state() {
        assert!(matches!(
            Chain::resume("n", 5, "xyz"),
            Err(AuditError::MalformedHash { .. })
        ));
        assert!(matches!(
            Chain::resume("n", 0, "11".repeat(32)),
            Err(AuditError::InconsistentChain(_))
        ));
        assert!(matches!(
            Chain::resume("n", 3, ZERO_HASH),
            Err(AuditError::InconsistentChain(_))
        ));
        let mut full = Chain::resume("n", u64::MAX, "11".repeat(32)).unwrap();
        assert!(matches!(
            full.append(fields("x")),
            Err(AuditError::SeqExhausted)
        ));
        assert!(Chain::genesis("n").checkpoint(0, "").is_none());
    }
}
