//! A signed 2,500-event export (checkpoints at 1000, 2000 and 2500) and helpers to tamper with it.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use kms_audit::{
    verify, AuditEvent, Chain, Checkpoint, EventFields, ExportRecord, VerifyReport,
    VerifyingKeyInput,
};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};

pub const NODE: &str = "kms-node-a";
pub const EVENTS: u64 = 2500;
pub const CHECKPOINT_EVERY: u64 = 1000;

pub struct Fixture {
    pub records: Vec<ExportRecord>,
    pub signer: SigningKey,
    pub key: VerifyingKeyInput,
}

/// Software stand-in for the HSM: `CKM_ECDSA` signs the 32-byte digest and returns raw r||s.
pub fn hsm_sign(signer: &SigningKey, checkpoint: &mut Checkpoint) {
    let sig: Signature = signer.sign_prehash(&checkpoint.digest()).unwrap();
    checkpoint.set_signature(&sig.to_bytes()).unwrap();
}

pub fn key_of(signer: &SigningKey) -> VerifyingKeyInput {
    VerifyingKeyInput::from_key(*signer.verifying_key()).unwrap()
}

pub fn signer(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).unwrap()
}

pub fn fields(i: u64) -> EventFields {
    let mut context = BTreeMap::new();
    context.insert("note_id".to_owned(), format!("note-{i}"));
    context.insert("patient_id".to_owned(), format!("pat-{}", i % 37));
    let (operation, outcome) = match i % 5 {
        0 => ("GenerateDataKey", "OK"),
        1 => ("Decrypt", "OK"),
        2 => ("Decrypt", "PERMISSION_DENIED"),
        3 => ("KeyCreated", "OK"),
        _ => ("Encrypt", "UNAVAILABLE"),
    };
    EventFields {
        time_ms: 1_700_000_000_000 + i64::try_from(i).unwrap() * 17,
        request_id: format!("req-{i}"),
        caller: format!("spiffe://clinic/svc-{}", i % 3),
        caller_fingerprint: format!("{:064x}", i % 3),
        role: if i % 2 == 0 { "writer" } else { "" }.to_owned(),
        operation: operation.to_owned(),
        key_id: (i % 7 != 0).then(|| format!("tenant-{}/notes", i % 4)),
        key_version: (i % 7 != 0).then_some(u32::try_from(i % 9).unwrap()),
        context,
        acting_user: format!("therapist-{}", i % 11),
        purpose: "treatment".to_owned(),
        outcome: outcome.to_owned(),
        latency_us: 100 + i,
        detail: if i % 13 == 0 { "retry" } else { "" }.to_owned(),
    }
}

/// Builds `n` events with checkpoints every `every` and at the end, signed by `signer`.
pub fn build(signer: &SigningKey, n: u64, every: u64) -> Vec<ExportRecord> {
    let fingerprint = key_of(signer).fingerprint().to_owned();
    let mut chain = Chain::genesis(NODE);
    let mut records = Vec::new();
    for i in 1..=n {
        let event = chain.append(fields(i)).unwrap();
        records.push(ExportRecord::Event(event));
        if i % every == 0 || i == n {
            let time = 1_700_000_000_000 + i64::try_from(i).unwrap() * 17 + 5;
            let mut cp = chain.checkpoint(time, fingerprint.clone()).unwrap();
            hsm_sign(signer, &mut cp);
            records.push(ExportRecord::Checkpoint(cp));
        }
    }
    records
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let signer = signer(0x42);
    let records = build(&signer, EVENTS, CHECKPOINT_EVERY);
    let key = key_of(&signer);
    Fixture {
        records,
        signer,
        key,
    }
});

pub fn fixture() -> &'static Fixture {
    &FIXTURE
}

/// A fresh copy of the untampered export.
pub fn records() -> Vec<ExportRecord> {
    fixture().records.clone()
}

pub fn check(records: &[ExportRecord]) -> VerifyReport {
    verify(records, &fixture().key)
}

/// Index of the event with `seq` in `records`.
pub fn event_pos(records: &[ExportRecord], seq: u64) -> usize {
    records
        .iter()
        .position(|r| r.as_event().is_some_and(|e| e.seq == seq))
        .unwrap()
}

/// Index of the checkpoint covering `seq`.
pub fn checkpoint_pos(records: &[ExportRecord], seq: u64) -> usize {
    records
        .iter()
        .position(|r| r.as_checkpoint().is_some_and(|c| c.seq == seq))
        .unwrap()
}

pub fn event_mut(records: &mut [ExportRecord], seq: u64) -> &mut AuditEvent {
    let pos = event_pos(records, seq);
    match &mut records[pos] {
        ExportRecord::Event(e) => e,
        ExportRecord::Checkpoint(_) => unreachable!(),
    }
}

pub fn checkpoint_mut(records: &mut [ExportRecord], seq: u64) -> &mut Checkpoint {
    let pos = checkpoint_pos(records, seq);
    match &mut records[pos] {
        ExportRecord::Checkpoint(c) => c,
        ExportRecord::Event(_) => unreachable!(),
    }
}

/// Asserts that verification fails naming `seq`; returns the reason.
#[track_caller]
pub fn assert_fails_at(records: &[ExportRecord], seq: u64) -> String {
    let report = check(records);
    assert!(!report.ok, "expected failure at seq {seq}, got: {report}");
    assert_eq!(report.first_bad_seq, Some(seq), "{report}");
    let reason = report.reason.clone().unwrap();
    assert_eq!(report.to_string(), format!("FAILED at seq {seq}: {reason}"));
    reason
}
