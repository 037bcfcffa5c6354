//! kms-server on a TPM (swtpm): the data-key round trip, context binding, audit checkpoints
//! signed by the TPM-resident key, a SoftHSM blob refused cleanly, and a TPM outage and
//! restart (UNAVAILABLE, then recovery without restarting the server).

use std::time::{Duration, Instant};

use kms_client::kms_audit::{self, ExportRecord};
use kms_tests::{ctx, KmsServer, ServerOptions, Swtpm, AUDITOR};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(server: &KmsServer) -> ServingStatus {
    let channel = server.channel("app").await.unwrap();
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "kms.v1.KeyManagementService".into(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

async fn wait_for_health(server: &KmsServer, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = health(server).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {got:?}, wanted {want:?}; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn tpm_backend_end_to_end() {
    let mut tpm = Swtpm::start().unwrap();
    let server = KmsServer::start(ServerOptions {
        tpm_tcti: Some(tpm.tcti()),
        checkpoint_every: 5,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    assert!(server.log().contains("backend=tpm") || server.log().contains("tpm"));
    let admin = server.client("admin").unwrap();
    let app = server.client("app").unwrap();
    let key = admin.create_key(Some("notes/tpm"), None).await.unwrap();

    let c = ctx(&[("site", "a"), ("client", "c-1"), ("note", "n-1")]);
    let dk = app.generate_data_key("notes/tpm", &c).await.unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    assert_eq!(dk.key_id, key.key_id);
    // The envelope records the TPM mechanism (2) and its 16-byte IV.
    assert_eq!(dk.ciphertext_blob[5], 2);
    assert_eq!(dk.ciphertext_blob[26], 16);
    let back = app.decrypt(&dk.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(&back.plaintext[..], &dk.plaintext[..]);

    // Wrong context, tampered blob: refused.
    let wrong = ctx(&[("site", "a"), ("client", "c-2"), ("note", "n-1")]);
    let err = app
        .decrypt(&dk.ciphertext_blob, &wrong, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let mut tampered = dk.ciphertext_blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = app.decrypt(&tampered, &c, None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // A blob from a SoftHSM server is refused with a clear reason, not INTERNAL.
    let hsm = KmsServer::start(ServerOptions::default()).await.unwrap();
    let hsm_app = hsm.client("app").unwrap();
    hsm_app.create_key(Some("notes/tpm"), None).await.unwrap();
    let hsm_dk = hsm_app.generate_data_key("notes/tpm", &c).await.unwrap();
    drop(hsm);
    let err = app
        .decrypt(&hsm_dk.ciphertext_blob, &c, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("another kind of backend"), "{err}");

    // Enough events for a checkpoint (every 5), then the audit log verifies with the
    // TPM-signed checkpoints, on the server and offline.
    for i in 0..6 {
        let c = ctx(&[("note", &format!("n-{i}"))]);
        app.generate_data_key("notes/tpm", &c).await.unwrap();
    }
    let auditor = server.audit_client(AUDITOR).unwrap();
    let report = auditor.verify_audit_log().await.unwrap();
    assert!(report.ok, "{}", report.report);
    assert!(report.checkpoints_checked >= 1, "{}", report.report);
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let public = auditor.audit_public_key().await.unwrap();
    let offline = kms_audit::verify(&records, &public.key);
    assert!(offline.ok, "{offline}");
    assert!(records.iter().any(|r| !matches!(r, ExportRecord::Event(_))));

    // The TPM goes away: UNAVAILABLE (never a wrong answer, never a hang), NOT_SERVING.
    tpm.stop();
    let started = Instant::now();
    for _ in 0..3 {
        let err = app.generate_data_key("notes/tpm", &c).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        let err = app
            .decrypt(&dk.ciphertext_blob, &c, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(20), "requests hung");
    wait_for_health(&server, ServingStatus::NotServing).await;

    // It comes back on the same state: the server recovers by itself, old blobs open.
    tpm.restart().unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let back = app.decrypt(&dk.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(&back.plaintext[..], &dk.plaintext[..]);

    // A quick restart between two calls: the server reconnects (the client may see one
    // UNAVAILABLE, retried) and keeps working.
    tpm.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let fresh = loop {
        match app.generate_data_key("notes/tpm", &c).await {
            Ok(d) => break d,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
                assert!(Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let back = app.decrypt(&fresh.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(&back.plaintext[..], &fresh.plaintext[..]);

    let report = auditor.verify_audit_log().await.unwrap();
    assert!(report.ok, "{}", report.report);
    assert!(!server.log().contains("panicked"));
}
