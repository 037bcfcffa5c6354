//! The HSM going away and coming back: requests get UNAVAILABLE (never a wrong answer or a
//! hang), health turns NOT_SERVING, and the server recovers by itself without a restart.

use std::time::{Duration, Instant};

use kms_tests::{ctx, KmsServer, ServerOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(server: &KmsServer) -> ServingStatus {
    let (cert, key) = server.cert_paths("app");
    let channel = server
        .channel_with(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
        .await
        .unwrap();
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "kms.v1.KeyManagementService".into(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

async fn wait_for_health(server: &KmsServer, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(15);
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
async fn token_removed_and_restored() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let kms = server.client("app").unwrap();
    let key = kms.create_key(Some("outage"), None).await.unwrap();
    let c = ctx(&[("note", "1")]);
    let dk = kms.generate_data_key("outage", &c).await.unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;

    // Take the token away, as if the HSM were unplugged.
    let tokens = server.token_dir.join("tokens");
    let parked = server.token_dir.join("tokens.parked");
    std::fs::rename(&tokens, &parked).unwrap();
    std::fs::create_dir(&tokens).unwrap();

    let started = Instant::now();
    let mut saw_unavailable = false;
    for _ in 0..5 {
        if let Err(e) = kms.generate_data_key("outage", &c).await {
            assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
            saw_unavailable = true;
        }
        match kms.decrypt(&dk.ciphertext_blob, &c, None).await {
            Err(e) => {
                assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
                saw_unavailable = true;
            }
            Ok(d) => assert_eq!(
                &d.plaintext[..],
                &dk.plaintext[..],
                "wrong plaintext while the HSM is away"
            ),
        }
    }
    assert!(
        saw_unavailable,
        "requests kept succeeding with the token removed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "requests hung while the HSM was away"
    );
    wait_for_health(&server, ServingStatus::NotServing).await;

    // Put it back: the server recovers on its own.
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&parked, &tokens).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let back = kms.decrypt(&dk.ciphertext_blob, &c, None).await.unwrap();
    assert_eq!(&back.plaintext[..], &dk.plaintext[..]);
    let fresh = kms.generate_data_key(&key.key_id, &c).await.unwrap();
    assert_eq!(
        kms.decrypt(&fresh.ciphertext_blob, &c, None)
            .await
            .unwrap()
            .plaintext
            .len(),
        32
    );
    assert!(!server.log().contains("panicked"));
}
