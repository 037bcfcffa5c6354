//! GenerateDataKey(WithoutPlaintext), Encrypt, Decrypt and ReEncrypt: plaintext size,
//! encryption-context rules, audit metadata and disabled keys.

use std::collections::HashMap;

use kms_proto::kms::v1 as pb;
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use tonic::Code;

use super::{assert_still_serving, dec, enc, expect, gdk, gdk_wp, ok, re, re_to_ctx};

/// Contexts that break one rule each.
fn bad_contexts() -> Vec<(&'static str, HashMap<String, String>)> {
    let many: HashMap<String, String> = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    vec![
        ("65 pairs", many),
        ("key of 129 bytes", wire_ctx(&[(&"k".repeat(129), "v")])),
        (
            "key of 65 chars / 130 bytes",
            wire_ctx(&[(&"é".repeat(65), "v")]),
        ),
        ("value of 257 bytes", wire_ctx(&[("k", &"v".repeat(257))])),
        (
            "value of 129 chars / 258 bytes",
            wire_ctx(&[("k", &"é".repeat(129))]),
        ),
        ("empty key", wire_ctx(&[("", "v")])),
        ("control character in key", wire_ctx(&[("a\nb", "v")])),
        ("control character in value", wire_ctx(&[("k", "a\u{0}b")])),
    ]
}

/// The largest context the rules allow.
fn largest_context() -> HashMap<String, String> {
    (0..64)
        .map(|i| (format!("{i:0>128}"), "v".repeat(256)))
        .collect()
}

#[tokio::test]
async fn data_key_rpcs_refuse_bad_inputs_and_disabled_keys() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let c = HashMap::new;
    let key = ok(
        "create",
        raw.create_key(pb::CreateKeyRequest {
            alias: "k".into(),
            ..Default::default()
        }),
    )
    .await;
    let key_id = key.key.unwrap().key_id;
    let blob = ok("blob", raw.encrypt(enc("k", b"x", c())))
        .await
        .ciphertext_blob;

    // Plaintext for Encrypt: 1-4096 bytes; a message under the gRPC limit but over 4096 is
    // refused by validation.
    ok("plaintext of 1", raw.encrypt(enc("k", b"x", c()))).await;
    ok(
        "plaintext of 4096",
        raw.encrypt(enc("k", &[7u8; 4096], c())),
    )
    .await;
    for len in [0, 4097, 60 * 1024] {
        expect(
            &format!("plaintext of {len}"),
            Code::InvalidArgument,
            raw.encrypt(enc("k", &vec![7u8; len], c())),
        )
        .await;
    }

    // Contexts: the largest allowed one works end to end; each broken rule is refused by
    // every RPC that takes a context.
    let big = largest_context();
    let dk = ok(
        "largest context",
        raw.generate_data_key(gdk("k", big.clone())),
    )
    .await;
    let opened = ok(
        "decrypt largest context",
        raw.decrypt(dec(&dk.ciphertext_blob, big.clone())),
    )
    .await;
    assert_eq!(opened.plaintext, dk.plaintext);
    for (what, bad) in bad_contexts() {
        let want = Code::InvalidArgument;
        expect(
            &format!("GenerateDataKey, {what}"),
            want,
            raw.generate_data_key(gdk("k", bad.clone())),
        )
        .await;
        let gwp = raw.generate_data_key_without_plaintext(gdk_wp("k", bad.clone()));
        expect(
            &format!("GenerateDataKeyWithoutPlaintext, {what}"),
            want,
            gwp,
        )
        .await;
        expect(
            &format!("Encrypt, {what}"),
            want,
            raw.encrypt(enc("k", b"x", bad.clone())),
        )
        .await;
        expect(
            &format!("Decrypt, {what}"),
            want,
            raw.decrypt(dec(&blob, bad.clone())),
        )
        .await;
        expect(
            &format!("ReEncrypt source, {what}"),
            want,
            raw.re_encrypt(re(&blob, bad.clone(), "")),
        )
        .await;
        let dest = raw.re_encrypt(re_to_ctx(&blob, c(), bad.clone()));
        expect(&format!("ReEncrypt destination, {what}"), want, dest).await;
    }
    let mut inconsistent = re(&blob, c(), "");
    inconsistent.destination_encryption_context = wire_ctx(&[("a", "b")]);
    expect(
        "destination context without the flag",
        Code::InvalidArgument,
        raw.re_encrypt(inconsistent),
    )
    .await;

    // Audit metadata is bounded too.
    let mut long_audit = dec(&blob, c());
    long_audit.audit = Some(pb::AuditMetadata {
        acting_user: "u".repeat(129),
        purpose: "TREATMENT".into(),
    });
    expect(
        "audit.acting_user of 129",
        Code::InvalidArgument,
        raw.decrypt(long_audit),
    )
    .await;

    // A disabled key refuses every cryptographic use, by alias and by id, as source and as
    // destination; enabling it again makes the same requests work.
    let other = ok("other", raw.create_key(pb::CreateKeyRequest::default()))
        .await
        .key
        .unwrap()
        .key_id;
    let other_blob = ok("other blob", raw.encrypt(enc(&other, b"y", c())))
        .await
        .ciphertext_blob;
    ok(
        "disable",
        raw.disable_key(pb::DisableKeyRequest { key: "k".into() }),
    )
    .await;
    for name in ["k", key_id.as_str()] {
        let want = Code::FailedPrecondition;
        expect(
            &format!("GenerateDataKey({name}) disabled"),
            want,
            raw.generate_data_key(gdk(name, c())),
        )
        .await;
        let gwp = raw.generate_data_key_without_plaintext(gdk_wp(name, c()));
        expect(
            &format!("GenerateDataKeyWithoutPlaintext({name}) disabled"),
            want,
            gwp,
        )
        .await;
        expect(
            &format!("Encrypt({name}) disabled"),
            want,
            raw.encrypt(enc(name, b"x", c())),
        )
        .await;
        expect(
            &format!("ReEncrypt to {name} disabled"),
            want,
            raw.re_encrypt(re(&other_blob, c(), name)),
        )
        .await;
    }
    expect(
        "Decrypt disabled",
        Code::FailedPrecondition,
        raw.decrypt(dec(&blob, c())),
    )
    .await;
    expect(
        "ReEncrypt from disabled",
        Code::FailedPrecondition,
        raw.re_encrypt(re(&blob, c(), &other)),
    )
    .await;
    ok(
        "describe disabled",
        raw.describe_key(pb::DescribeKeyRequest { key: "k".into() }),
    )
    .await;
    ok(
        "enable",
        raw.enable_key(pb::EnableKeyRequest {
            key: key_id.clone(),
        }),
    )
    .await;
    assert_eq!(
        ok("decrypt enabled", raw.decrypt(dec(&blob, c())))
            .await
            .plaintext,
        b"x"
    );
    ok(
        "re-encrypt to enabled",
        raw.re_encrypt(re(&other_blob, c(), "k")),
    )
    .await;

    assert_still_serving(&server).await;
}
