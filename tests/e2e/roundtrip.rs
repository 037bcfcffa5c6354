//! The envelope-encryption round trip and its cryptographic bindings.

use kms_proto::kms::v1 as pb;
use kms_tests::{ctx, wire_ctx, KmsServer, ServerOptions};
use tonic::Code;

#[tokio::test]
async fn data_key_round_trip_and_bindings() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let kms = server.client("app").unwrap();
    let key = kms
        .create_key(Some("notes/site-a"), Some("site A notes"))
        .await
        .unwrap();
    assert_eq!(key.alias.as_deref(), Some("notes/site-a"));
    let other = kms.create_key(None, None).await.unwrap();

    let context = ctx(&[("site", "a"), ("client", "c1"), ("note", "n1")]);
    let dk = kms
        .generate_data_key("notes/site-a", &context)
        .await
        .unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    assert_eq!(dk.key_id, key.key_id);
    assert_eq!(dk.key_version, 1);

    // Decrypt needs no key id: the blob says which key.
    let back = kms
        .decrypt(&dk.ciphertext_blob, &context, None)
        .await
        .unwrap();
    assert_eq!(&back.plaintext[..], &dk.plaintext[..]);
    assert_eq!(back.key_id, key.key_id);

    // A different context, a missing pair, an extra pair: refused.
    for bad in [
        ctx(&[("site", "b"), ("client", "c1"), ("note", "n1")]),
        ctx(&[("site", "a"), ("client", "c1")]),
        ctx(&[("site", "a"), ("client", "c1"), ("note", "n1"), ("x", "y")]),
    ] {
        let err = kms
            .decrypt(&dk.ciphertext_blob, &bad, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    }

    // Every single-byte change of the blob is refused, never answered with other plaintext.
    let blob = dk.ciphertext_blob.clone();
    let mut raw = server.raw("app").await.unwrap();
    for i in 0..blob.len() {
        let mut tampered = blob.clone();
        tampered[i] ^= 0x01;
        let r = raw
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: tampered,
                encryption_context: wire_ctx(&[("site", "a"), ("client", "c1"), ("note", "n1")]),
                audit: None,
            })
            .await;
        let status = r.expect_err(&format!("byte {i} flipped but decrypt succeeded"));
        assert!(
            matches!(status.code(), Code::InvalidArgument | Code::NotFound),
            "byte {i}: unexpected {:?} {}",
            status.code(),
            status.message()
        );
    }

    // Moving the blob to another key (rewriting the key id in the header) is refused.
    let mut moved = blob.clone();
    let other_id = uuid::Uuid::parse_str(&other.key_id).unwrap();
    moved[6..22].copy_from_slice(other_id.as_bytes());
    let err = kms.decrypt(&moved, &context, None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // Without plaintext.
    let only = kms
        .generate_data_key_without_plaintext(&key.key_id, &context)
        .await
        .unwrap();
    assert_eq!(
        kms.decrypt(&only.ciphertext_blob, &context, None)
            .await
            .unwrap()
            .plaintext
            .len(),
        32
    );
}

#[tokio::test]
async fn encrypt_decrypt_reencrypt_and_disable() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let kms = server.client("app").unwrap();
    let a = kms.create_key(Some("a"), None).await.unwrap();
    let b = kms.create_key(Some("b"), None).await.unwrap();
    let c1 = ctx(&[("client", "1")]);
    let c2 = ctx(&[("client", "2")]);

    let ct = kms.encrypt("a", b"session note secret", &c1).await.unwrap();
    assert_eq!(
        &kms.decrypt(&ct.ciphertext_blob, &c1, None)
            .await
            .unwrap()
            .plaintext[..],
        b"session note secret"
    );

    // Re-encrypt to another key and context; the old context no longer opens the new blob.
    let re = kms
        .re_encrypt(&ct.ciphertext_blob, &c1, Some("b"), Some(&c2), None)
        .await
        .unwrap();
    assert_eq!(re.source_key_id, a.key_id);
    assert_eq!(re.key_id, b.key_id);
    assert_eq!(
        &kms.decrypt(&re.ciphertext_blob, &c2, None)
            .await
            .unwrap()
            .plaintext[..],
        b"session note secret"
    );
    assert_eq!(
        kms.decrypt(&re.ciphertext_blob, &c1, None)
            .await
            .unwrap_err()
            .code(),
        Some(Code::InvalidArgument)
    );

    // Disabled keys refuse every cryptographic use, with FAILED_PRECONDITION, at once.
    let disabled = kms.disable_key("a").await.unwrap();
    assert_eq!(disabled.state, kms_client::KeyState::Disabled);
    for err in [
        kms.decrypt(&ct.ciphertext_blob, &c1, None)
            .await
            .unwrap_err(),
        kms.generate_data_key("a", &c1).await.unwrap_err(),
        kms.encrypt("a", b"x", &c1).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    }
    kms.enable_key(&a.key_id).await.unwrap();
    assert_eq!(
        &kms.decrypt(&ct.ciphertext_blob, &c1, None)
            .await
            .unwrap()
            .plaintext[..],
        b"session note secret"
    );

    // Describe and list.
    assert_eq!(kms.describe_key("b").await.unwrap().key_id, b.key_id);
    let all = kms.list_all_keys(1).await.unwrap();
    assert_eq!(all.len(), 2);
}
