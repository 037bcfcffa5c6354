//! GenerateDataKeys: several data keys in one call, each item checked, bound and audited as a
//! GenerateDataKey call of its own, one bad item failing alone; the call's own limits; and
//! fail closed per item when the audit store cannot be written (see `audit_outage`).

use kms_client::kms_audit::{AuditEvent, ExportRecord};
use kms_client::MAX_DATA_KEYS_PER_CALL;
use kms_proto::kms::v1 as pb;
use kms_tests::{ctx, KmsServer, ServerOptions, AUDITOR};
use tonic::Code;

#[tokio::test]
async fn data_keys_in_one_call_are_bound_and_audited_one_by_one() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let kms = server.client("app").unwrap();
    let key_a = kms.create_key(Some("dk/a"), None).await.unwrap();
    let key_b = kms.create_key(Some("dk/b"), None).await.unwrap();
    kms.create_key(Some("dk/off"), None).await.unwrap();
    kms.disable_key("dk/off").await.unwrap();

    let note = |n: &str| ctx(&[("site", "s1"), ("client", "c1"), ("note", n)]);
    let (c0, c1, c2, c3) = (note("n0"), note("n1"), note("n2"), note("n3"));
    let bad_context = ctx(&[("", "no key")]);
    let results = kms
        .generate_data_keys(&[
            ("dk/a", &c0),
            ("dk/b", &c1),
            ("dk/off", &c2),
            ("dk/missing", &c3),
            ("dk/a", &bad_context),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    let codes: Vec<Option<Code>> = results
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.code().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            Some(Code::FailedPrecondition),
            Some(Code::NotFound),
            Some(Code::InvalidArgument)
        ]
    );
    let dk0 = results[0].as_ref().unwrap();
    let dk1 = results[1].as_ref().unwrap();
    assert_eq!(dk0.plaintext.len(), 32);
    assert_ne!(
        &dk0.plaintext[..],
        &dk1.plaintext[..],
        "each item is a fresh key"
    );
    assert_eq!(
        (dk0.key_id.as_str(), dk0.key_version),
        (key_a.key_id.as_str(), 1)
    );
    assert_eq!(dk1.key_id, key_b.key_id);

    // Each blob opens under its own context only.
    for (dk, own, other) in [(dk0, &c0, &c1), (dk1, &c1, &c0)] {
        let back = kms.decrypt(&dk.ciphertext_blob, own, None).await.unwrap();
        assert_eq!(&back.plaintext[..], &dk.plaintext[..]);
        let err = kms
            .decrypt(&dk.ciphertext_blob, other, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    }

    // The call as a whole: 1 to MAX_DATA_KEYS_PER_CALL items.
    let mut raw = server.raw("app").await.unwrap();
    let item = || pb::GenerateDataKeyRequest {
        key: "dk/a".into(),
        encryption_context: Default::default(),
    };
    for count in [0, MAX_DATA_KEYS_PER_CALL + 1] {
        let status = raw
            .generate_data_keys(pb::GenerateDataKeysRequest {
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
        .generate_data_keys(pb::GenerateDataKeysRequest {
            items: (0..MAX_DATA_KEYS_PER_CALL).map(|_| item()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(full.results.len(), MAX_DATA_KEYS_PER_CALL);
    assert!(full
        .results
        .iter()
        .all(|r| r.code == 0 && r.data_key.is_some()));

    // One GenerateDataKey event per item of the first call, in item order, each with its own
    // key, context and outcome, and the refused calls as one GenerateDataKeys event each.
    let auditor = server.audit_client(AUDITOR).unwrap();
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let events: Vec<&AuditEvent> = records.iter().filter_map(ExportRecord::as_event).collect();
    let first_call: Vec<&&AuditEvent> = events
        .iter()
        .filter(|e| {
            e.operation == "GenerateDataKey" && e.detail.contains("of 5 of GenerateDataKeys")
        })
        .collect();
    let seen: Vec<(&str, Option<&str>, Option<&str>, &str)> = first_call
        .iter()
        .map(|e| {
            (
                e.request_id.rsplit('/').next().unwrap(),
                e.key_id.as_deref(),
                e.context.get("note").map(String::as_str),
                e.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("0", Some(key_a.key_id.as_str()), Some("n0"), "OK"),
            ("1", Some(key_b.key_id.as_str()), Some("n1"), "OK"),
            ("2", seen[2].1, Some("n2"), "FAILED_PRECONDITION"),
            ("3", None, Some("n3"), "NOT_FOUND"),
            ("4", None, None, "INVALID_ARGUMENT"),
        ]
    );
    assert!(
        seen[2].1.is_some(),
        "the disabled key is named in its event"
    );
    let prefix = first_call[0].request_id.rsplit_once('/').unwrap().0;
    assert!(first_call.iter().all(|e| e.request_id.starts_with(prefix)));
    let refused = events
        .iter()
        .filter(|e| e.operation == "GenerateDataKeys" && e.outcome == "INVALID_ARGUMENT")
        .count();
    assert_eq!(refused, 2);
    let from_full_call = events
        .iter()
        .filter(|e| {
            e.operation == "GenerateDataKey"
                && e.outcome == "OK"
                && e.detail
                    .contains(&format!("of {MAX_DATA_KEYS_PER_CALL} of GenerateDataKeys"))
        })
        .count();
    assert_eq!(from_full_call, MAX_DATA_KEYS_PER_CALL);
}
