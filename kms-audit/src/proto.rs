//! Conversions between the audit types and the `kms.v1` wire messages (feature "proto").
//! They are field-for-field, so an event that crossed the wire re-hashes to the same value.

use kms_proto::kms::v1 as pb;

use crate::{AuditEvent, Checkpoint, ExportRecord};

impl From<AuditEvent> for pb::AuditEvent {
    fn from(e: AuditEvent) -> Self {
        pb::AuditEvent {
            seq: e.seq,
            time_ms: e.time_ms,
            node_id: e.node_id,
            request_id: e.request_id,
            caller: e.caller,
            caller_fingerprint: e.caller_fingerprint,
            role: e.role,
            operation: e.operation,
            key_id: e.key_id,
            key_version: e.key_version,
            context: e.context.into_iter().collect(),
            acting_user: e.acting_user,
            purpose: e.purpose,
            outcome: e.outcome,
            latency_us: e.latency_us,
            detail: e.detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

impl From<pb::AuditEvent> for AuditEvent {
    fn from(e: pb::AuditEvent) -> Self {
        AuditEvent {
            seq: e.seq,
            time_ms: e.time_ms,
            node_id: e.node_id,
            request_id: e.request_id,
            caller: e.caller,
            caller_fingerprint: e.caller_fingerprint,
            role: e.role,
            operation: e.operation,
            key_id: e.key_id,
            key_version: e.key_version,
            context: e.context.into_iter().collect(),
            acting_user: e.acting_user,
            purpose: e.purpose,
            outcome: e.outcome,
            latency_us: e.latency_us,
            detail: e.detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

impl From<Checkpoint> for pb::AuditCheckpoint {
    fn from(c: Checkpoint) -> Self {
        pb::AuditCheckpoint {
            node_id: c.node_id,
            seq: c.seq,
            head_hash: c.head_hash,
            time_ms: c.time_ms,
            signature: c.signature,
            public_key_fingerprint: c.public_key_fingerprint,
        }
    }
}

impl From<pb::AuditCheckpoint> for Checkpoint {
    fn from(c: pb::AuditCheckpoint) -> Self {
        Checkpoint {
            node_id: c.node_id,
            seq: c.seq,
            head_hash: c.head_hash,
            time_ms: c.time_ms,
            signature: c.signature,
            public_key_fingerprint: c.public_key_fingerprint,
        }
    }
}

impl From<ExportRecord> for pb::AuditRecord {
    fn from(r: ExportRecord) -> Self {
        let record = match r {
            ExportRecord::Event(e) => pb::audit_record::Record::Event(e.into()),
            ExportRecord::Checkpoint(c) => pb::audit_record::Record::Checkpoint(c.into()),
        };
        pb::AuditRecord {
            record: Some(record),
        }
    }
}

impl TryFrom<pb::AuditRecord> for ExportRecord {
    type Error = &'static str;
    fn try_from(r: pb::AuditRecord) -> Result<Self, Self::Error> {
        match r.record {
            Some(pb::audit_record::Record::Event(e)) => Ok(ExportRecord::Event(e.into())),
            Some(pb::audit_record::Record::Checkpoint(c)) => Ok(ExportRecord::Checkpoint(c.into())),
            None => Err("empty audit record"),
        }
    }
}
