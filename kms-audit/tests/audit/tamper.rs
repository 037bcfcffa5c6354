//! Every kind of tampering the chain must expose, each asserting the exact first bad seq.

use kms_audit::{ExportRecord, VerifyingKeyInput};

use crate::fixture::{
    assert_fails_at, build, check, checkpoint_mut, checkpoint_pos, event_mut, event_pos, fixture,
    hsm_sign, key_of, records, signer, EVENTS, NODE,
};

#[test]
fn untampered_export_verifies() {
    let report = check(&records());
    assert!(report.ok, "{report}");
    assert_eq!(report.events_checked, EVENTS);
    assert_eq!(report.checkpoints_checked, 3);
    assert_eq!(report.covered_through_seq, Some(EVENTS));
    assert_eq!(report.uncovered_tail, 0);
    assert_eq!(report.first_bad_seq, None);
    assert_eq!(report.node_id.as_deref(), Some(NODE));
    assert!(report.from_genesis);
    assert_eq!(
        report.to_string(),
        "OK: 2500 events, 3 checkpoints verified (through seq 2500)"
    );
}

#[test]
fn edited_fields_are_detected() {
    type Edit = fn(&mut kms_audit::AuditEvent);
    let edits: [(u64, Edit); 9] = [
        (1500, |e| e.outcome = "PERMISSION_DENIED".to_owned()),
        (42, |e| e.caller = "spiffe://clinic/intruder".to_owned()),
        (1999, |e| {
            e.context
                .insert("patient_id".to_owned(), "pat-999".to_owned());
        }),
        (2400, |e| e.key_id = Some("tenant-9/notes".to_owned())),
        (2402, |e| e.key_id = None),
        (1, |e| e.time_ms += 1),
        (777, |e| e.acting_user.clear()),
        (1000, |e| e.latency_us = 1),
        (2500, |e| e.detail = "nothing to see".to_owned()),
    ];
    for (seq, edit) in edits {
        let mut rs = records();
        let event = event_mut(&mut rs, seq);
        let before = event.clone();
        edit(event);
        assert_ne!(*event, before, "edit at {seq} changed nothing");
        let reason = assert_fails_at(&rs, seq);
        assert!(reason.contains("event altered"), "{reason}");
    }
}

#[test]
fn edit_with_recomputed_hash_breaks_the_next_link() {
    let mut rs = records();
    let e = event_mut(&mut rs, 1500);
    e.outcome = "PERMISSION_DENIED".to_owned();
    e.hash = e.compute_hash();
    let reason = assert_fails_at(&rs, 1501);
    assert!(reason.contains("prev_hash"), "{reason}");
}

#[test]
fn edit_of_the_last_covered_event_with_recomputed_hash_breaks_the_checkpoint() {
    let mut rs = records();
    let e = event_mut(&mut rs, 2000);
    e.purpose = "research".to_owned();
    e.hash = e.compute_hash();
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("head_hash"), "{reason}");
}

#[test]
fn rewritten_chain_is_caught_by_the_next_checkpoint() {
    // The forger edits seq 1500 and re-links every later event: only signatures can tell.
    let mut rs = records();
    let mut prev = String::new();
    for seq in 1500..=EVENTS {
        let e = event_mut(&mut rs, seq);
        if seq == 1500 {
            e.outcome = "PERMISSION_DENIED".to_owned();
        } else {
            e.prev_hash.clone_from(&prev);
        }
        e.hash = e.compute_hash();
        prev.clone_from(&e.hash);
    }
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("head_hash"), "{reason}");
}

#[test]
fn deleted_event_is_a_gap() {
    let mut rs = records();
    rs.remove(event_pos(&rs, 1234));
    let reason = assert_fails_at(&rs, 1234);
    assert!(reason.contains("missing"), "{reason}");

    let mut rs = records();
    for seq in [10, 11, 12] {
        rs.remove(event_pos(&rs, seq));
    }
    let reason = assert_fails_at(&rs, 10);
    assert!(reason.contains("10..=12 are missing"), "{reason}");
}

#[test]
fn deleted_last_event_leaves_its_checkpoint_dangling() {
    let mut rs = records();
    rs.remove(event_pos(&rs, EVENTS));
    let reason = assert_fails_at(&rs, EVENTS);
    assert!(reason.contains("not in the export"), "{reason}");
}

#[test]
fn reordered_events_are_out_of_order() {
    for (a, b) in [(700, 701), (700, 900), (1, 2)] {
        let mut rs = records();
        let (pa, pb) = (event_pos(&rs, a), event_pos(&rs, b));
        rs.swap(pa, pb);
        let reason = assert_fails_at(&rs, a);
        assert!(reason.contains("out of order"), "{reason}");
    }
}

#[test]
fn inserted_forged_event_is_detected() {
    // Forged event takes seq 1500, links to 1499 and carries a correct hash of its own.
    let mut rs = records();
    let mut forged = rs[event_pos(&rs, 1500)].as_event().unwrap().clone();
    forged.operation = "Decrypt".to_owned();
    forged.caller = "spiffe://clinic/intruder".to_owned();
    forged.hash = forged.compute_hash();
    assert_eq!(
        forged.prev_hash,
        rs[event_pos(&rs, 1499)].as_event().unwrap().hash
    );
    rs.insert(event_pos(&rs, 1500), ExportRecord::Event(forged.clone()));
    let reason = assert_fails_at(&rs, 1500);
    assert!(reason.contains("appears again"), "{reason}");

    // Same forgery, later events renumbered (hashes recomputed, links left): the original
    // seq 1500, now 1501, no longer links to its predecessor.
    let mut rs = records();
    for seq in (1500..=EVENTS).rev() {
        let e = event_mut(&mut rs, seq);
        e.seq += 1;
        e.hash = e.compute_hash();
    }
    let pos = rs
        .iter()
        .position(|r| r.as_event().is_some_and(|e| e.seq == 1501))
        .unwrap();
    rs.insert(pos, ExportRecord::Event(forged));
    let reason = assert_fails_at(&rs, 1501);
    assert!(reason.contains("prev_hash"), "{reason}");
}

#[test]
fn forged_event_after_the_last_checkpoint_is_not_covered() {
    let mut rs = records();
    let last = rs[event_pos(&rs, EVENTS)].as_event().unwrap().clone();
    let mut forged = last.clone();
    forged.seq = EVENTS + 1;
    forged.prev_hash = last.hash;
    forged.hash = forged.compute_hash();
    rs.push(ExportRecord::Event(forged));
    let report = check(&rs);
    assert!(report.ok, "{report}");
    assert_eq!(report.covered_through_seq, Some(EVENTS));
    assert_eq!(report.uncovered_tail, 1);
    assert_eq!(
        report.to_string(),
        "OK: 2500 events, 3 checkpoints verified (through seq 2500); \
         1 later events are intact but not yet covered by a checkpoint"
    );
}

#[test]
fn truncated_tail_under_a_checkpoint_fails_at_that_checkpoint() {
    // Drop events 1901..=2500 but keep the checkpoints: 2000 names a missing event.
    let rs: Vec<ExportRecord> = records()
        .into_iter()
        .filter(|r| r.as_event().is_none_or(|e| e.seq <= 1900))
        .collect();
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("not in the export"), "{reason}");

    // Drop 2001..=2500, keep the final checkpoint.
    let rs: Vec<ExportRecord> = records()
        .into_iter()
        .filter(|r| r.as_event().is_none_or(|e| e.seq <= 2000))
        .collect();
    assert_fails_at(&rs, EVENTS);
}

#[test]
fn truncation_with_its_checkpoints_shows_as_less_coverage() {
    // Dropping events *and* the checkpoints after them cannot be detected from the file
    // alone; the report shows how far signatures reach.
    let rs: Vec<ExportRecord> = records()
        .into_iter()
        .filter(|r| match r {
            ExportRecord::Event(e) => e.seq <= 2200,
            ExportRecord::Checkpoint(c) => c.seq <= 2000,
        })
        .collect();
    let report = check(&rs);
    assert!(report.ok, "{report}");
    assert_eq!(report.covered_through_seq, Some(2000));
    assert_eq!(report.uncovered_tail, 200);
}

#[test]
fn replaced_checkpoint_signature_fails() {
    let other = signer(0x17);
    let other_key = key_of(&other);

    // A valid signature by another key over exactly the same checkpoint bytes.
    let mut rs = records();
    let cp = checkpoint_mut(&mut rs, 2000);
    let mut same = cp.clone();
    hsm_sign(&other, &mut same);
    assert_ne!(same.signature, cp.signature);
    cp.signature = same.signature;
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("does not verify"), "{reason}");

    // A valid signature by another key over the checkpoint naming that key.
    let mut rs = records();
    let cp = checkpoint_mut(&mut rs, 2000);
    let mut forged = cp.clone();
    forged.public_key_fingerprint = other_key.fingerprint().to_owned();
    hsm_sign(&other, &mut forged);
    assert!(forged.verify_signature(&other_key).is_ok());
    cp.signature = forged.signature.clone();
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("does not verify"), "{reason}");

    // The whole checkpoint re-signed by another key (fingerprint updated too).
    let mut rs = records();
    *checkpoint_mut(&mut rs, 2000) = forged;
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("fingerprint"), "{reason}");

    // Garbage signatures.
    for garbage in [
        "zz".repeat(64),
        "00".repeat(64),
        "ab".repeat(64),
        "ab".repeat(63),
        String::new(),
    ] {
        let mut rs = records();
        checkpoint_mut(&mut rs, 1000).signature = garbage;
        assert_fails_at(&rs, 1000);
    }
}

#[test]
fn altered_checkpoint_fields_fail() {
    let mut rs = records();
    checkpoint_mut(&mut rs, 2000).head_hash = "11".repeat(32);
    assert_fails_at(&rs, 2000);

    let mut rs = records();
    checkpoint_mut(&mut rs, 2000).time_ms += 1;
    assert_fails_at(&rs, 2000);

    // Claiming the checkpoint covers more than it does.
    let mut rs = records();
    checkpoint_mut(&mut rs, 1000).seq = 1001;
    assert_fails_at(&rs, 1001);
}

#[test]
fn node_id_mismatch_fails() {
    // An event of another node with a correct hash of its own.
    let mut rs = records();
    let e = event_mut(&mut rs, 10);
    e.node_id = "kms-node-b".to_owned();
    e.hash = e.compute_hash();
    let reason = assert_fails_at(&rs, 10);
    assert!(reason.contains("node_id"), "{reason}");

    // A checkpoint of another node, correctly signed by the same key.
    let mut rs = records();
    let cp = checkpoint_mut(&mut rs, 1000);
    cp.node_id = "kms-node-b".to_owned();
    hsm_sign(&fixture().signer, cp);
    let reason = assert_fails_at(&rs, 1000);
    assert!(reason.contains("node_id"), "{reason}");
}

#[test]
fn checkpoint_before_its_event_fails() {
    let mut rs = records();
    let cp = rs.remove(checkpoint_pos(&rs, 2000));
    rs.insert(event_pos(&rs, 1990), cp);
    let reason = assert_fails_at(&rs, 2000);
    assert!(reason.contains("comes before"), "{reason}");
}

#[test]
fn wrong_verifying_key_fails_at_the_first_checkpoint() {
    let rs = records();
    let report = kms_audit::verify(&rs, &key_of(&signer(0x99)));
    assert_eq!(report.first_bad_seq, Some(1000));
    assert_eq!(report.events_checked, 1000);
}

#[test]
fn unanchored_exports_fail() {
    let report = check(&[]);
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, None);
    assert_eq!(report.to_string(), "FAILED: the export holds no events");

    let rs: Vec<ExportRecord> = records()
        .into_iter()
        .filter(|r| r.as_event().is_some())
        .collect();
    let reason = assert_fails_at(&rs, 1);
    assert!(reason.contains("no checkpoint"), "{reason}");

    // Seq 1 must start from the zero hash.
    let mut rs = records();
    let e = event_mut(&mut rs, 1);
    e.prev_hash = "22".repeat(32);
    e.hash = e.compute_hash();
    assert_fails_at(&rs, 1);
}

#[test]
fn partial_export_from_a_later_seq_verifies_and_says_so() {
    // An export of seqs 1001..=2500: the first event's prev_hash is the starting point, and
    // the checkpoints at 2000 and 2500 authenticate everything from there.
    let rs: Vec<ExportRecord> = records()
        .into_iter()
        .filter(|r| match r {
            ExportRecord::Event(e) => e.seq > 1000,
            ExportRecord::Checkpoint(c) => c.seq > 1000,
        })
        .collect();
    let report = check(&rs);
    assert!(report.ok, "{report}");
    assert!(!report.from_genesis);
    assert_eq!(report.first_seq, Some(1001));
    assert_eq!(report.events_checked, 1500);
    assert_eq!(
        report.to_string(),
        "OK: 1500 events, 2 checkpoints verified (through seq 2500); \
         the export starts at seq 1001, not at genesis"
    );

    // A partial export must not pretend to start at genesis.
    let mut rs = rs;
    let e = event_mut(&mut rs, 1001);
    e.prev_hash = kms_audit::ZERO_HASH.to_owned();
    e.hash = e.compute_hash();
    assert_fails_at(&rs, 1001);
}

#[test]
fn signing_key_can_be_given_as_pem_or_sec1() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let vk = fixture().signer.verifying_key();
    let pem = vk.to_public_key_pem(LineEnding::LF).unwrap();
    let sec1 = vk.to_sec1_point(false);
    let rs = build(&fixture().signer, 30, 10);
    for key in [
        VerifyingKeyInput::from_pem(&pem).unwrap(),
        VerifyingKeyInput::from_sec1(sec1.as_bytes()).unwrap(),
    ] {
        let report = kms_audit::verify(&rs, &key);
        assert!(report.ok, "{report}");
        assert_eq!(report.checkpoints_checked, 3);
    }
}
