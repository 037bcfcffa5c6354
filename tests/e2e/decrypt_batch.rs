//! BatchDecrypt: several blobs opened in one call, each item checked, authorized and audited
//! as a Decrypt call of its own (with its own acting user and purpose), one bad item failing
//! alone with the status Decrypt gives it; the call's own limits. Fail closed per item when
//! the audit store cannot be written is in `audit_outage`.

use kms_client::kms_audit::{AuditEvent, ExportRecord};
use kms_client::{AuditMetadata, EncryptionContext, MAX_DECRYPTS_PER_CALL};
use kms_proto::kms::v1 as pb;
use kms_tests::{ctx, KmsServer, ServerOptions, AUDITOR};
use tonic::Code;

/// What one item's audit event says: request id suffix, key id, note, acting user, purpose,
/// outcome.
type Seen<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    &'a str,
);

fn who(user: &str, purpose: &str) -> AuditMetadata {
    AuditMetadata {
        acting_user: user.into(),
        purpose: purpose.into(),
    }
}

#[tokio::test]
async fn blobs_in_one_call_open_alone_and_are_audited_one_by_one() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let kms = server.client("app").unwrap();
    let key_a = kms.create_key(Some("dec/a"), None).await.unwrap();
    let key_b = kms.create_key(Some("dec/b"), None).await.unwrap();
    kms.create_key(Some("dec/off"), None).await.unwrap();

    let note = |n: &str| ctx(&[("site", "s1"), ("client", "c1"), ("note", n)]);
    let (c0, c1, c2, c3, c4) = (note("n0"), note("n1"), note("n2"), note("n3"), note("n4"));
    let dk0 = kms.generate_data_key("dec/a", &c0).await.unwrap();
    let dk1 = kms.generate_data_key("dec/b", &c1).await.unwrap();
    let dk2 = kms.generate_data_key("dec/a", &c2).await.unwrap();
    let dk3 = kms.generate_data_key("dec/a", &c3).await.unwrap();
    let dk4 = kms.generate_data_key("dec/off", &c4).await.unwrap();
    kms.disable_key("dec/off").await.unwrap();
    let mut flipped = dk3.ciphertext_blob.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;

    let (lee, kim, ray) = (
        who("dr-lee", "TREATMENT"),
        who("dr-kim", "SUPERVISION"),
        who("dr-ray", "LEGAL"),
    );
    let bad_who = who("dr\nlee", "TREATMENT");
    let items: [(&[u8], &EncryptionContext, Option<&AuditMetadata>); 6] = [
        (&dk0.ciphertext_blob, &c0, Some(&lee)),
        (&dk1.ciphertext_blob, &c1, Some(&kim)),
        // A blob moved to another note's context.
        (&dk2.ciphertext_blob, &c1, Some(&lee)),
        // A flipped byte.
        (&flipped, &c3, Some(&ray)),
        // Under a disabled key.
        (&dk4.ciphertext_blob, &c4, None),
        // Audit metadata that cannot go into a log line.
        (&dk0.ciphertext_blob, &c0, Some(&bad_who)),
    ];
    let results = kms.batch_decrypt(&items).await.unwrap();
    assert_eq!(results.len(), items.len());

    // The two good items open to their own data keys.
    let opened0 = results[0].as_ref().unwrap();
    let opened1 = results[1].as_ref().unwrap();
    assert_eq!(&opened0.plaintext[..], &dk0.plaintext[..]);
    assert_eq!(&opened1.plaintext[..], &dk1.plaintext[..]);
    assert_eq!(
        (opened0.key_id.as_str(), opened0.key_version),
        (key_a.key_id.as_str(), 1)
    );
    assert_eq!(opened1.key_id, key_b.key_id);

    // Each bad item fails alone, with exactly the status a Decrypt call of it gets.
    let codes: Vec<Option<Code>> = results
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.code().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            Some(Code::InvalidArgument),
            Some(Code::InvalidArgument),
            Some(Code::FailedPrecondition),
            Some(Code::InvalidArgument),
        ]
    );
    for (i, (blob, context, audit)) in items.iter().enumerate().skip(2) {
        let single = kms
            .decrypt(blob, context, audit.cloned())
            .await
            .unwrap_err();
        let batched = results[i].as_ref().unwrap_err();
        assert_eq!(single.code(), batched.code(), "item {i}");
        let message = |e: &kms_client::Error| match e {
            kms_client::Error::Rpc { status, .. } => status.message().to_string(),
            other => panic!("item {i}: {other}"),
        };
        assert_eq!(message(&single), message(batched), "item {i}");
    }

    // The call as a whole: 1 to MAX_DECRYPTS_PER_CALL items.
    let mut raw = server.raw("app").await.unwrap();
    let item = || pb::DecryptRequest {
        ciphertext_blob: dk0.ciphertext_blob.clone(),
        encryption_context: c0.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        audit: None,
    };
    for count in [0, MAX_DECRYPTS_PER_CALL + 1] {
        let status = raw
            .batch_decrypt(pb::BatchDecryptRequest {
                items: (0..count).map(|_| item()).collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{count} items: {status}"
        );
    }
    let full = raw
        .batch_decrypt(pb::BatchDecryptRequest {
            items: (0..MAX_DECRYPTS_PER_CALL).map(|_| item()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.results.len(), MAX_DECRYPTS_PER_CALL);
    assert!(full.results.iter().all(|r| r.code == 0
        && r.decrypted.as_ref().map(|d| &d.plaintext[..]) == Some(&dk0.plaintext[..])));

    // One Decrypt event per item of the first call, in item order, each with its own key,
    // context, acting user, purpose and outcome; the refused calls one BatchDecrypt event each.
    let auditor = server.audit_client(AUDITOR).unwrap();
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let events: Vec<&AuditEvent> = records.iter().filter_map(ExportRecord::as_event).collect();
    let first_call: Vec<&&AuditEvent> = events
        .iter()
        .filter(|e| e.operation == "Decrypt" && e.detail.contains("of 6 of BatchDecrypt"))
        .collect();
    let seen: Vec<Seen> = first_call
        .iter()
        .map(|e| {
            (
                e.request_id.rsplit('/').next().unwrap(),
                e.key_id.as_deref(),
                e.context.get("note").map(String::as_str),
                e.acting_user.as_str(),
                e.purpose.as_str(),
                e.outcome.as_str(),
            )
        })
        .collect();
    let (a, b) = (Some(key_a.key_id.as_str()), Some(key_b.key_id.as_str()));
    assert_eq!(
        seen,
        [
            ("0", a, Some("n0"), "dr-lee", "TREATMENT", "OK"),
            ("1", b, Some("n1"), "dr-kim", "SUPERVISION", "OK"),
            (
                "2",
                a,
                Some("n1"),
                "dr-lee",
                "TREATMENT",
                "INVALID_ARGUMENT"
            ),
            (
                "3",
                seen[3].1,
                Some("n3"),
                "dr-ray",
                "LEGAL",
                "INVALID_ARGUMENT"
            ),
            ("4", seen[4].1, Some("n4"), "", "", "FAILED_PRECONDITION"),
            ("5", seen[5].1, Some("n0"), "", "", "INVALID_ARGUMENT"),
        ]
    );
    let prefix = first_call[0].request_id.rsplit_once('/').unwrap().0;
    assert!(first_call.iter().all(|e| e.request_id.starts_with(prefix)));
    assert!(first_call
        .iter()
        .all(|e| e.detail.contains(&format!("BatchDecrypt call {prefix}"))));
    let refused = events
        .iter()
        .filter(|e| e.operation == "BatchDecrypt" && e.outcome == "INVALID_ARGUMENT")
        .count();
    assert_eq!(refused, 2);
    let from_full_call = events
        .iter()
        .filter(|e| {
            e.operation == "Decrypt"
                && e.outcome == "OK"
                && e.detail
                    .contains(&format!("of {MAX_DECRYPTS_PER_CALL} of BatchDecrypt"))
        })
        .count();
    assert_eq!(from_full_call, MAX_DECRYPTS_PER_CALL);
}
