//! Key lifecycle against the real server and SoftHSM: versions and rotation (manual and
//! automatic), per-version states, the minimum decryption version, scheduled deletion (with
//! proof that the HSM objects are gone and that a database backup does not bring the key
//! back), BatchReEncrypt and EraseKey with its signed receipt.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use kms_client::{
    AuditFilter, KeyState, KeyVersionState, KmsClient, ReEncryptItem, ReEncryptOutcome,
};
use kms_tests::{ctx, pkcs11_module, KmsServer, ServerOptions, PIN};
use tonic::Code;

/// Whether the server's SoftHSM token holds a secret key object labelled `label`.
fn hsm_has_key(server: &KmsServer, label: &str) -> bool {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", server.token_dir.join("softhsm2.conf"))
        .arg("--module")
        .arg(pkcs11_module())
        .args(["--token-label", "kms-e2e", "--login", "--pin", PIN])
        .args(["--list-objects", "--type", "secrkey"])
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains(&format!("label:      {label}"))
        || String::from_utf8_lossy(&out.stdout).contains(&format!("label: {label}"))
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn code(err: &kms_client::Error) -> Option<Code> {
    err.code()
}

#[tokio::test]
async fn rotation_versions_and_minimum_decryption_version() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let admin = server.client("admin").unwrap();
    let app = server.client("app").unwrap();
    let service = server.client("notes-store").unwrap();
    let key = admin.create_key(Some("rotating"), None).await.unwrap();
    let c = ctx(&[("note", "n1")]);
    let v1 = app.generate_data_key("rotating", &c).await.unwrap();
    assert_eq!(v1.key_version, 1);
    assert!(hsm_has_key(&server, &format!("kms:{}:v1", key.key_id)));

    // A service may not rotate; a key-admin may.
    let err = service.rotate_key("rotating").await.unwrap_err();
    assert_eq!(code(&err), Some(Code::PermissionDenied), "{err}");
    let (rotated, version) = admin.rotate_key("rotating").await.unwrap();
    assert_eq!((rotated.primary_version, version.version), (2, 2));
    assert!(version.primary);
    assert!(hsm_has_key(&server, &format!("kms:{}:v2", key.key_id)));

    // New data keys use v2; v1 blobs still decrypt.
    let v2 = app.generate_data_key("rotating", &c).await.unwrap();
    assert_eq!(v2.key_version, 2);
    let back = app.decrypt(&v1.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(back.plaintext, v1.plaintext);
    assert_eq!(back.key_version, 1);

    let versions = admin.list_key_versions("rotating").await.unwrap();
    let summary: Vec<_> = versions
        .iter()
        .map(|v| (v.version, v.state, v.primary))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, KeyVersionState::Enabled, false),
            (2, KeyVersionState::Enabled, true)
        ]
    );

    // Per-version disable: its blobs are refused; the primary cannot be disabled.
    let off = admin
        .set_key_version_enabled("rotating", 1, false)
        .await
        .unwrap();
    assert_eq!(off.state, KeyVersionState::Disabled);
    let err = app
        .decrypt(&v1.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    app.decrypt(&v2.ciphertext_blob, &c, None).await.unwrap();
    let err = admin
        .set_key_version_enabled("rotating", 2, false)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    let err = admin
        .set_key_version_enabled("rotating", 9, true)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::NotFound), "{err}");
    admin
        .set_key_version_enabled("rotating", 1, true)
        .await
        .unwrap();
    app.decrypt(&v1.ciphertext_blob, &c, None).await.unwrap();

    // ReEncrypt moves a v1 blob to v2 without the plaintext leaving the server.
    let moved = app
        .re_encrypt(&v1.ciphertext_blob, &c, None, None, None)
        .await
        .unwrap();
    assert_eq!((moved.source_key_version, moved.key_version), (1, 2));

    // Minimum decryption version: v1 blobs refused, v2 and the re-wrapped blob fine.
    let err = admin
        .set_min_decryption_version("rotating", 3)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    let err = admin
        .set_min_decryption_version("rotating", 0)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    let meta = admin
        .set_min_decryption_version("rotating", 2)
        .await
        .unwrap();
    assert_eq!(meta.min_decryption_version, 2);
    let err = app
        .decrypt(&v1.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("minimum decryption version"),
        "{err}"
    );
    let back = app.decrypt(&moved.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(back.plaintext, v1.plaintext);
    // Lowering it again is allowed (nothing was destroyed).
    admin
        .set_min_decryption_version("rotating", 1)
        .await
        .unwrap();
    app.decrypt(&v1.ciphertext_blob, &c, None).await.unwrap();

    // Every change is in the audit log, allowed and denied alike.
    let audit = server.audit_client("auditor").unwrap();
    let events = audit
        .query_all_audit_events(
            &AuditFilter {
                key_id: Some(key.key_id.clone()),
                ..AuditFilter::default()
            },
            None,
        )
        .await
        .unwrap();
    let seen = |op: &str, outcome: &str| {
        events
            .iter()
            .any(|e| e.operation == op && e.outcome == outcome)
    };
    assert!(seen("RotateKey", "OK"));
    assert!(seen("RotateKey", "PERMISSION_DENIED"));
    assert!(seen("DisableKeyVersion", "OK"));
    assert!(seen("DisableKeyVersion", "FAILED_PRECONDITION"));
    assert!(seen("SetMinDecryptionVersion", "OK"));
    assert!(seen("Decrypt", "FAILED_PRECONDITION"));
}

#[tokio::test]
async fn automatic_rotation_runs_and_is_audited() {
    let server = KmsServer::start(ServerOptions {
        lifecycle_check_ms: 200,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let admin = server.client("admin").unwrap();
    let err = admin
        .create_key_with_rotation(Some("too-long"), None, 101 * 365 * 86_400)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    let key = admin
        .create_key_with_rotation(Some("auto"), None, 1)
        .await
        .unwrap();
    assert_eq!(key.rotation_period_seconds, 1);
    assert!(key.next_rotation_at_unix_ms > key.created_at_unix_ms);
    // A key without a period never rotates by itself.
    let fixed = admin.create_key(Some("fixed"), None).await.unwrap();

    wait_for(
        "two automatic rotations",
        Duration::from_secs(15),
        || async { admin.describe_key("auto").await.unwrap().primary_version >= 3 },
    )
    .await;
    let now = admin.describe_key("auto").await.unwrap();
    assert!(now.next_rotation_at_unix_ms > key.next_rotation_at_unix_ms);
    assert_eq!(
        admin.describe_key("fixed").await.unwrap().primary_version,
        1
    );

    let events = server
        .audit_client("auditor")
        .unwrap()
        .query_all_audit_events(
            &AuditFilter {
                key_id: Some(key.key_id.clone()),
                operation: Some("RotateKey".into()),
                ..AuditFilter::default()
            },
            None,
        )
        .await
        .unwrap();
    assert!(events.len() >= 2, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e.caller == "kms-server" && e.role == "lifecycle" && e.outcome == "OK"));
    assert!(events.iter().any(|e| e.key_version == Some(2)));

    // Clearing the period stops it.
    let cleared = admin.set_key_rotation_period("auto", 0).await.unwrap();
    assert_eq!(cleared.next_rotation_at_unix_ms, 0);
    let frozen = cleared.primary_version;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        admin.describe_key("auto").await.unwrap().primary_version,
        frozen
    );
    drop(fixed);
}

#[tokio::test]
async fn scheduled_deletion_destroys_the_hsm_objects_for_good() {
    let mut server = KmsServer::start(ServerOptions {
        lifecycle_check_ms: 200,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let admin = server.client("admin").unwrap();
    let app = server.client("app").unwrap();
    let key = admin.create_key(Some("doomed"), None).await.unwrap();
    admin.rotate_key("doomed").await.unwrap();
    let c = ctx(&[("client", "c9")]);
    let blob = app.generate_data_key("doomed", &c).await.unwrap();

    // Waiting period bounds: at most 30 days; 0 means 30 days.
    let err = admin
        .schedule_key_deletion("doomed", 31 * 86_400)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    let pending = admin.schedule_key_deletion("doomed", 0).await.unwrap();
    assert_eq!(pending.state, KeyState::PendingDeletion);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let wait = pending.deletion_at_unix_ms - now;
    assert!(
        (29 * 86_400_000..=30 * 86_400_000).contains(&wait),
        "{wait}"
    );
    // A repeat keeps the first date.
    let again = admin.schedule_key_deletion("doomed", 3600).await.unwrap();
    assert_eq!(again.deletion_at_unix_ms, pending.deletion_at_unix_ms);

    // Pending deletion: unusable, and the attempts are audited.
    let err = app.generate_data_key("doomed", &c).await.unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    let err = app
        .decrypt(&blob.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    let err = admin.enable_key("doomed").await.unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    let err = admin.rotate_key("doomed").await.unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");

    // Cancel: back as DISABLED (enabling is a separate step), then usable again.
    let cancelled = admin.cancel_key_deletion("doomed").await.unwrap();
    assert_eq!(cancelled.state, KeyState::Disabled);
    assert_eq!(cancelled.deletion_at_unix_ms, 0);
    let err = admin.cancel_key_deletion("doomed").await.unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    admin.enable_key("doomed").await.unwrap();
    app.decrypt(&blob.ciphertext_blob, &c, None).await.unwrap();

    // A backup of the key database taken before the deletion.
    let db_path = server
        .database_url
        .strip_prefix("sqlite:")
        .expect("sqlite harness database")
        .to_string();
    let backup = server.dir.path().join("kms-backup.db");
    let sqlite = Command::new("sqlite3")
        .arg(&db_path)
        .arg(format!(".backup {}", backup.display()))
        .output()
        .expect("sqlite3");
    assert!(
        sqlite.status.success(),
        "{}",
        String::from_utf8_lossy(&sqlite.stderr)
    );

    // The server's minimum waiting period (1 s in the harness), then destruction.
    admin.schedule_key_deletion("doomed", 1).await.unwrap();
    wait_for("destruction", Duration::from_secs(15), || async {
        admin.describe_key("doomed").await.unwrap().state == KeyState::Destroyed
    })
    .await;
    for v in [1, 2] {
        assert!(
            !hsm_has_key(&server, &format!("kms:{}:v{v}", key.key_id)),
            "version {v} still in the HSM"
        );
    }
    let versions = admin.list_key_versions("doomed").await.unwrap();
    assert!(versions
        .iter()
        .all(|v| v.state == KeyVersionState::Destroyed));
    let err = app
        .decrypt(&blob.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    for err in [
        admin.cancel_key_deletion("doomed").await.unwrap_err(),
        admin.enable_key("doomed").await.unwrap_err(),
        admin.schedule_key_deletion("doomed", 0).await.unwrap_err(),
    ] {
        assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    }
    let destroyed = server
        .audit_client("auditor")
        .unwrap()
        .query_all_audit_events(
            &AuditFilter {
                key_id: Some(key.key_id.clone()),
                operation: Some("DestroyKey".into()),
                ..AuditFilter::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(destroyed.len(), 1, "{destroyed:?}");
    assert_eq!(destroyed[0].caller, "kms-server");

    // Restore the old database: the metadata says ENABLED again, but the HSM objects are gone,
    // so the blob still cannot be decrypted.
    server
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db_path}{suffix}"));
    }
    std::fs::copy(&backup, &db_path).unwrap();
    server.restart().await.unwrap();
    let app = server.client("app").unwrap();
    let admin = server.client("admin").unwrap();
    assert_eq!(
        admin.describe_key("doomed").await.unwrap().state,
        KeyState::Enabled
    );
    let err = app
        .decrypt(&blob.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    assert!(!server.log().contains(&hex_of(&blob.plaintext)));
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn batch_re_encrypt_keeps_contexts_and_reports_per_item() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let admin = server.client("admin").unwrap();
    let app = server.client("app").unwrap();
    admin.create_key(Some("batch"), None).await.unwrap();
    let other = admin.create_key(Some("batch-other"), None).await.unwrap();
    let mut items = Vec::new();
    let mut plain = Vec::new();
    for i in 0..20 {
        let c = ctx(&[("note", &format!("n{i}"))]);
        let dk = app.generate_data_key("batch", &c).await.unwrap();
        plain.push(dk.plaintext.clone());
        items.push(ReEncryptItem {
            ciphertext_blob: dk.ciphertext_blob,
            source_context: c,
            destination_context: None,
        });
    }
    admin.rotate_key("batch").await.unwrap();
    // Item 3 carries the wrong context, item 7 is garbage: they fail alone.
    items[3].source_context = ctx(&[("note", "someone-else")]);
    items[7].ciphertext_blob = b"not a blob".to_vec();
    let outcomes = app.batch_re_encrypt(&items, None, None).await.unwrap();
    assert_eq!(outcomes.len(), 20);
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (3 | 7, ReEncryptOutcome::Failed { code, .. }) => {
                assert_eq!(*code, Code::InvalidArgument, "item {i}")
            }
            (3 | 7, other) => panic!("item {i} should fail: {other:?}"),
            (
                _,
                ReEncryptOutcome::Ok {
                    ciphertext_blob,
                    source_key_version,
                    key_version,
                    ..
                },
            ) => {
                assert_eq!((*source_key_version, *key_version), (1, 2), "item {i}");
                // Each new blob is bound to its own note's context.
                let back = app
                    .decrypt(ciphertext_blob, &items[i].source_context, None)
                    .await
                    .unwrap();
                assert_eq!(back.plaintext, plain[i]);
                let wrong = ctx(&[("note", &format!("n{}", (i + 1) % 20))]);
                let err = app
                    .decrypt(ciphertext_blob, &wrong, None)
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Some(Code::InvalidArgument));
            }
            (_, other) => panic!("item {i} failed: {other:?}"),
        }
    }

    // Another destination key and context.
    let moved = app
        .batch_re_encrypt(
            &[ReEncryptItem {
                destination_context: Some(ctx(&[("note", "moved")])),
                ..items[0].clone()
            }],
            Some("batch-other"),
            None,
        )
        .await
        .unwrap();
    let ReEncryptOutcome::Ok {
        ciphertext_blob,
        key_id,
        ..
    } = &moved[0]
    else {
        panic!("{moved:?}")
    };
    assert_eq!(key_id, &other.key_id);
    let back = app
        .decrypt(ciphertext_blob, &ctx(&[("note", "moved")]), None)
        .await
        .unwrap();
    assert_eq!(back.plaintext, plain[0]);

    // Size limits.
    let too_many = vec![items[0].clone(); 1001];
    let err = app
        .batch_re_encrypt(&too_many, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let err = app.batch_re_encrypt(&[], None, None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let full = vec![items[0].clone(); 1000];
    let outcomes = app.batch_re_encrypt(&full, None, None).await.unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ReEncryptOutcome::Ok { .. })));

    // A caller without rights on the key gets per-item NOT_FOUND, like a missing key.
    let auditor = server.client("auditor").unwrap();
    let denied = auditor
        .batch_re_encrypt(&items[..2], None, None)
        .await
        .unwrap();
    assert!(denied.iter().all(|o| matches!(
        o,
        ReEncryptOutcome::Failed {
            code: Code::NotFound,
            ..
        }
    ) || matches!(
        o,
        ReEncryptOutcome::Failed {
            code: Code::PermissionDenied,
            ..
        }
    )));
}

async fn erase(
    kms: &KmsClient,
    key: &str,
) -> Result<kms_client::ErasureReceipt, kms_client::Error> {
    let subject = BTreeMap::from([
        ("site".to_string(), "a".to_string()),
        ("client".to_string(), "c42".to_string()),
    ]);
    kms.erase_key(key, "right to erasure, request #17", &subject)
        .await
}

#[tokio::test]
async fn erase_key_destroys_now_and_returns_a_signed_receipt() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let custodian = server.client("notes-store").unwrap();
    let admin = server.client("admin").unwrap();
    let key = custodian
        .create_key(Some("notes/a/clients/c42"), None)
        .await
        .unwrap();
    admin.rotate_key("notes/a/clients/c42").await.unwrap();
    let c = ctx(&[("site", "a"), ("client", "c42")]);
    let dk = custodian
        .generate_data_key("notes/a/clients/c42", &c)
        .await
        .unwrap();

    // Key-admins and auditors cannot erase (it bypasses the waiting period).
    let err = erase(&admin, "notes/a/clients/c42").await.unwrap_err();
    assert_eq!(code(&err), Some(Code::PermissionDenied), "{err}");
    let err = custodian
        .erase_key("notes/a/clients/c42", "", &BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");

    let receipt = erase(&custodian, "notes/a/clients/c42").await.unwrap();
    assert_eq!(receipt.key.state, KeyState::Destroyed);
    for v in [1, 2] {
        assert!(!hsm_has_key(&server, &format!("kms:{}:v{v}", key.key_id)));
    }
    let public = server
        .audit_client("auditor")
        .unwrap()
        .audit_public_key()
        .await
        .unwrap();
    assert_eq!(receipt.signing_key_fingerprint, public.fingerprint);
    let parsed =
        kms_client::kms_audit::verify_receipt(&receipt.receipt, &receipt.signature, &public.key)
            .unwrap();
    assert_eq!(parsed.key_id, key.key_id);
    assert_eq!(parsed.destroyed_versions, vec![1, 2]);
    assert_eq!(
        parsed.subject.get("client").map(String::as_str),
        Some("c42")
    );
    assert_eq!(parsed.reason, "right to erasure, request #17");
    assert_eq!(
        parsed.requested_by,
        "spiffe://dev.clinic/client/notes-store"
    );
    // A modified receipt does not verify.
    let mut forged = receipt.receipt.clone();
    let at = forged.iter().position(|b| *b == b'2').unwrap();
    forged[at] = b'3';
    assert!(
        kms_client::kms_audit::verify_receipt(&forged, &receipt.signature, &public.key).is_err()
    );

    let err = custodian
        .decrypt(&dk.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    // Repeating the erasure returns a receipt for the same destruction.
    let again = erase(&custodian, "notes/a/clients/c42").await.unwrap();
    let again =
        kms_client::kms_audit::verify_receipt(&again.receipt, &again.signature, &public.key)
            .unwrap();
    assert_eq!(again.destroyed_versions, vec![1, 2]);
    assert_eq!(again.erased_at_unix_ms, parsed.erased_at_unix_ms);

    // Audited with its reason and subject.
    let events = server
        .audit_client("auditor")
        .unwrap()
        .query_all_audit_events(
            &AuditFilter {
                key_id: Some(key.key_id.clone()),
                operation: Some("EraseKey".into()),
                ..AuditFilter::default()
            },
            None,
        )
        .await
        .unwrap();
    assert!(events.iter().any(|e| e.outcome == "OK"
        && e.request_id == parsed.request_id
        && e.context.get("client").map(String::as_str) == Some("c42")));
    assert!(events.iter().any(|e| e.outcome == "PERMISSION_DENIED"));
}
