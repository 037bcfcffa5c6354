//! Decrypt and ReEncrypt against malformed and foreign blobs; messages over the gRPC limit.

use std::collections::HashMap;

use kms_proto::kms::v1 as pb;
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use rand::{Rng, RngCore, SeedableRng};
use tonic::Code;

use super::{assert_still_serving, dec, enc, expect, gdk, ok, re};

/// Blobs that cannot be parsed, or that parse but cannot be opened: all INVALID_ARGUMENT.
fn malformed_blobs(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("1 byte".into(), vec![b'K']),
        ("magic only".into(), b"KMSB".to_vec()),
    ];
    let with = |what: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.to_vec();
        f(&mut b);
        (what.to_string(), b)
    };
    for i in 0..4 {
        out.push(with(&format!("bad magic byte {i}"), &|b| b[i] ^= 0x20));
    }
    for v in [0u8, 2, 255] {
        out.push(with(&format!("format version {v}"), &|b| b[4] = v));
    }
    for m in [0u8, 2, 3, 255] {
        out.push(with(&format!("mechanism {m}"), &|b| b[5] = m));
    }
    // A well-formed TPM blob (mechanism 2, 16-byte IV) sent to this PKCS#11 server.
    out.push(with("TPM mechanism, well formed", &|b| {
        b[5] = 2;
        b[26] = 16;
        b.splice(27..27, [0u8; 4]);
        b.extend_from_slice(&[0u8; 16]);
    }));
    out.push(with("key version 0", &|b| {
        b[22..26].copy_from_slice(&[0; 4])
    }));
    for iv in [0u8, 11, 13, 16, 255] {
        out.push(with(&format!("IV length {iv}"), &|b| b[26] = iv));
    }
    for len in 1..good.len() {
        out.push((format!("truncated to {len}"), good[..len].to_vec()));
    }
    out.push(with("one byte appended", &|b| b.push(0)));
    out.push(with("over the blob size limit", &|b| {
        b.extend(std::iter::repeat_n(0u8, 5000))
    }));
    out.push(with("ciphertext replaced", &|b| {
        let n = b.len();
        b[39..n].fill(0xAA)
    }));
    // Random garbage of many lengths (seeded: a failure can be replayed).
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let lengths = (1..=160).chain([200, 255, 256, 500, 1000, 4096, 4171, 4172, 10_000, 60_000]);
    for len in lengths {
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        out.push((format!("{len} random bytes"), b));
    }
    // Random IV and ciphertext after the real header (key, version, IV length).
    for _ in 0..20 {
        let len = rng.gen_range(27..200);
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        b[..27].copy_from_slice(&good[..27]);
        out.push((format!("real header, {len} random bytes"), b));
    }
    out
}

#[tokio::test]
async fn decrypt_and_reencrypt_refuse_malformed_blobs() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let c = || wire_ctx(&[("note", "1")]);
    let key = ok("create", raw.create_key(pb::CreateKeyRequest::default()))
        .await
        .key
        .unwrap()
        .key_id;
    let good = ok("data key", raw.generate_data_key(gdk(&key, c())))
        .await
        .ciphertext_blob;
    assert_eq!(
        good.len(),
        27 + 12 + 48,
        "format changed: update malformed_blobs"
    );
    assert_eq!(
        ok("good blob opens", raw.decrypt(dec(&good, c())))
            .await
            .plaintext
            .len(),
        32
    );

    expect(
        "Decrypt, empty blob",
        Code::InvalidArgument,
        raw.decrypt(dec(&[], c())),
    )
    .await;
    expect(
        "ReEncrypt, empty blob",
        Code::InvalidArgument,
        raw.re_encrypt(re(&[], c(), "")),
    )
    .await;
    let cases = malformed_blobs(&good);
    assert!(cases.len() > 250);
    for (what, blob) in &cases {
        expect(
            &format!("Decrypt, {what}"),
            Code::InvalidArgument,
            raw.decrypt(dec(blob, c())),
        )
        .await;
        expect(
            &format!("ReEncrypt, {what}"),
            Code::InvalidArgument,
            raw.re_encrypt(re(blob, c(), "")),
        )
        .await;
    }

    // Well-formed headers naming a key that does not exist, or a version the key lacks.
    let mut unknown = good.clone();
    unknown[6..22].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    expect(
        "Decrypt, unknown key id",
        Code::NotFound,
        raw.decrypt(dec(&unknown, c())),
    )
    .await;
    expect(
        "ReEncrypt, unknown key id",
        Code::NotFound,
        raw.re_encrypt(re(&unknown, c(), "")),
    )
    .await;
    let mut version = good.clone();
    version[22..26].copy_from_slice(&7u32.to_be_bytes());
    expect(
        "Decrypt, unknown key version",
        Code::NotFound,
        raw.decrypt(dec(&version, c())),
    )
    .await;
    expect(
        "ReEncrypt, unknown key version",
        Code::NotFound,
        raw.re_encrypt(re(&version, c(), "")),
    )
    .await;

    // The good blob still opens: nothing above changed server state.
    assert_eq!(
        ok("good blob again", raw.decrypt(dec(&good, c())))
            .await
            .plaintext
            .len(),
        32
    );
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn oversized_grpc_messages_are_refused() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let c = HashMap::new;
    let key = ok("create", raw.create_key(pb::CreateKeyRequest::default()))
        .await
        .key
        .unwrap()
        .key_id;
    let mib = vec![0x42u8; 1 << 20];

    // The server decodes at most 1 MiB per message (room for a BatchReEncrypt of 1,000
    // blobs). tonic refuses a larger one while decoding with OUT_OF_RANGE ("decoded message
    // length too large"), not RESOURCE_EXHAUSTED.
    let huge_desc = pb::CreateKeyRequest {
        alias: String::new(),
        description: "d".repeat(1 << 20),
        ..Default::default()
    };
    let big_ctx: HashMap<String, String> = (0..64)
        .map(|i| (format!("k{i}"), "v".repeat(20 * 1024)))
        .collect();
    expect(
        "Encrypt, 1 MiB plaintext",
        Code::OutOfRange,
        raw.encrypt(enc(&key, &mib, c())),
    )
    .await;
    expect(
        "Decrypt, 1 MiB blob",
        Code::OutOfRange,
        raw.decrypt(dec(&mib, c())),
    )
    .await;
    expect(
        "ReEncrypt, 1 MiB blob",
        Code::OutOfRange,
        raw.re_encrypt(re(&mib, c(), "")),
    )
    .await;
    expect(
        "CreateKey, 1 MiB description",
        Code::OutOfRange,
        raw.create_key(huge_desc),
    )
    .await;
    expect(
        "GenerateDataKey, 1.25 MiB context",
        Code::OutOfRange,
        raw.generate_data_key(gdk(&key, big_ctx)),
    )
    .await;
    // Under the transport limit but over Encrypt's 4 KiB: refused by validation.
    expect(
        "Encrypt, 65 KiB plaintext",
        Code::InvalidArgument,
        raw.encrypt(enc(&key, &[1u8; 65 * 1024], c())),
    )
    .await;

    // The same connection keeps working after each refusal.
    let ct = ok("encrypt after", raw.encrypt(enc(&key, b"still here", c()))).await;
    assert_eq!(
        ok("decrypt after", raw.decrypt(dec(&ct.ciphertext_blob, c())))
            .await
            .plaintext,
        b"still here"
    );
    assert_still_serving(&server).await;
}
