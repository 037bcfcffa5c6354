//! Bad inputs to every KeyManagementService RPC: each gets its specific status (never a panic,
//! a hang or INTERNAL), and the server keeps answering normal requests afterwards.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use rand::{Rng, RngCore, SeedableRng};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

type Raw = KeyManagementServiceClient<Channel>;

/// Awaits a call, bounded so that a hang fails the test, and returns its outcome.
async fn answer<T>(what: &str, call: impl Future<Output = Result<Response<T>, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(Duration::from_secs(20), call).await {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => panic!("{what}: no answer within 20 s"),
    }
}

/// The call must fail with exactly `want`.
async fn expect<T>(what: &str, want: Code, call: impl Future<Output = Result<Response<T>, Status>>) {
    match answer(what, call).await {
        Ok(_) => panic!("{what}: succeeded, wanted {want:?}"),
        Err(s) => assert_eq!(s.code(), want, "{what}: {}", s.message()),
    }
}

/// The call must succeed.
async fn ok<T>(what: &str, call: impl Future<Output = Result<Response<T>, Status>>) -> T {
    answer(what, call).await.unwrap_or_else(|s| panic!("{what}: {:?} {}", s.code(), s.message()))
}

/// After the abuse: a fresh connection still gets normal answers, and nothing panicked.
async fn assert_still_serving(server: &KmsServer) {
    let mut raw = server.raw("app").await.unwrap();
    let key = ok("create after abuse", raw.create_key(pb::CreateKeyRequest::default())).await.key.unwrap();
    let dk = ok("data key after abuse", raw.generate_data_key(gdk(&key.key_id, HashMap::new()))).await;
    assert_eq!(dk.plaintext.len(), 32);
    let log = server.log();
    assert!(!log.is_empty(), "the server log is empty: the panic check below would see nothing");
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

fn gdk(key: &str, ctx: HashMap<String, String>) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest { key: key.into(), encryption_context: ctx }
}
fn gdk_wp(key: &str, ctx: HashMap<String, String>) -> pb::GenerateDataKeyWithoutPlaintextRequest {
    pb::GenerateDataKeyWithoutPlaintextRequest { key: key.into(), encryption_context: ctx }
}
fn enc(key: &str, plaintext: &[u8], ctx: HashMap<String, String>) -> pb::EncryptRequest {
    pb::EncryptRequest { key: key.into(), plaintext: plaintext.to_vec(), encryption_context: ctx }
}
fn dec(blob: &[u8], ctx: HashMap<String, String>) -> pb::DecryptRequest {
    pb::DecryptRequest { ciphertext_blob: blob.to_vec(), encryption_context: ctx, audit: None }
}
fn re(blob: &[u8], src: HashMap<String, String>, dest_key: &str) -> pb::ReEncryptRequest {
    pb::ReEncryptRequest {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: src,
        destination_key: dest_key.into(),
        ..Default::default()
    }
}
fn re_to_ctx(blob: &[u8], src: HashMap<String, String>, dest: HashMap<String, String>) -> pb::ReEncryptRequest {
    pb::ReEncryptRequest {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: src,
        destination_encryption_context: dest,
        destination_context_set: true,
        ..Default::default()
    }
}

/// Every RPC that names a key, called with `key` (the other fields valid).
async fn key_rpcs(raw: &mut Raw, key: &str, want: Code, blob: &[u8]) {
    let c = HashMap::new;
    expect(&format!("DescribeKey({key:.40})"), want, raw.describe_key(pb::DescribeKeyRequest { key: key.into() })).await;
    expect(&format!("EnableKey({key:.40})"), want, raw.enable_key(pb::EnableKeyRequest { key: key.into() })).await;
    expect(&format!("DisableKey({key:.40})"), want, raw.disable_key(pb::DisableKeyRequest { key: key.into() })).await;
    expect(&format!("GenerateDataKey({key:.40})"), want, raw.generate_data_key(gdk(key, c()))).await;
    let what = format!("GenerateDataKeyWithoutPlaintext({key:.40})");
    expect(&what, want, raw.generate_data_key_without_plaintext(gdk_wp(key, c()))).await;
    expect(&format!("Encrypt({key:.40})"), want, raw.encrypt(enc(key, b"x", c()))).await;
    if !key.is_empty() {
        // An empty destination key means "the source key", so it is not an error there.
        expect(&format!("ReEncrypt(destination {key:.40})"), want, raw.re_encrypt(re(blob, c(), key))).await;
    }
}

/// Contexts that break one rule each.
fn bad_contexts() -> Vec<(&'static str, HashMap<String, String>)> {
    let many: HashMap<String, String> = (0..65).map(|i| (format!("k{i}"), "v".to_string())).collect();
    vec![
        ("65 pairs", many),
        ("key of 129 bytes", wire_ctx(&[(&"k".repeat(129), "v")])),
        ("key of 65 chars / 130 bytes", wire_ctx(&[(&"é".repeat(65), "v")])),
        ("value of 257 bytes", wire_ctx(&[("k", &"v".repeat(257))])),
        ("value of 129 chars / 258 bytes", wire_ctx(&[("k", &"é".repeat(129))])),
        ("empty key", wire_ctx(&[("", "v")])),
        ("control character in key", wire_ctx(&[("a\nb", "v")])),
        ("control character in value", wire_ctx(&[("k", "a\u{0}b")])),
    ]
}

/// The largest context the rules allow.
fn largest_context() -> HashMap<String, String> {
    (0..64).map(|i| (format!("{i:0>128}"), "v".repeat(256))).collect()
}

#[tokio::test]
async fn key_administration_rpcs_refuse_bad_inputs() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let create = |alias: &str, description: &str| pb::CreateKeyRequest { alias: alias.into(), description: description.into() };

    // CreateKey: the limits, just inside and just outside.
    ok("alias of 256", raw.create_key(create(&"a".repeat(256), ""))).await;
    ok("description of 1024", raw.create_key(create("", &"d".repeat(1024)))).await;
    ok("no alias, no description", raw.create_key(create("", ""))).await;
    let invalid = [
        ("alias of 257", create(&"a".repeat(257), "")),
        ("alias with a space", create("has space", "")),
        ("alias with '!'", create("bang!", "")),
        ("alias with non-ASCII", create("ünï", "")),
        ("alias that is a UUID", create(&uuid::Uuid::new_v4().to_string(), "")),
        ("description of 1025", create("", &"d".repeat(1025))),
        ("description of 513 chars / 1026 bytes", create("", &"é".repeat(513))),
        ("description with NUL", create("", "a\u{0}b")),
    ];
    for (what, req) in invalid {
        expect(what, Code::InvalidArgument, raw.create_key(req)).await;
    }

    // Duplicate alias, one after the other and racing (the database's unique constraint).
    let first = ok("create dup", raw.create_key(create("dup", "first"))).await.key.unwrap();
    expect("duplicate alias", Code::AlreadyExists, raw.create_key(create("dup", "second"))).await;
    let racers = (0..8).map(|_| {
        let mut r = raw.clone();
        async move { r.create_key(create("race", "")).await.map(|_| ()).map_err(|s| s.code()) }
    });
    let results = futures::future::join_all(racers).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(()) | Err(Code::AlreadyExists))), "{results:?}");
    let described = ok("describe dup", raw.describe_key(pb::DescribeKeyRequest { key: "dup".into() })).await;
    assert_eq!(described.key.unwrap().key_id, first.key_id, "the duplicate replaced the original");

    // ListKeys: page size and page token.
    ok("page_size 1000", raw.list_keys(pb::ListKeysRequest { page_size: 1000, page_token: String::new() })).await;
    for size in [1001, 5000, u32::MAX] {
        let req = pb::ListKeysRequest { page_size: size, page_token: String::new() };
        expect(&format!("page_size {size}"), Code::InvalidArgument, raw.list_keys(req)).await;
    }
    let real = ok("page 1", raw.list_keys(pb::ListKeysRequest { page_size: 1, page_token: String::new() })).await;
    assert!(!real.next_page_token.is_empty());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let bad_tokens = [
        "garbage".to_string(),
        "k1.".into(),
        "k1.zz".into(),
        format!("k2.{id}"),
        format!("K1.{id}"),
        format!("k1.{id}x"),
        format!("{}x", real.next_page_token),
        real.next_page_token[3..].to_string(),
        "k1.".to_string() + &"a".repeat(10_000),
        " ".into(),
    ];
    for token in bad_tokens {
        let what = format!("page_token {token:.40?}");
        let req = pb::ListKeysRequest { page_size: 10, page_token: token };
        expect(&what, Code::InvalidArgument, raw.list_keys(req)).await;
    }

    // Describe, Enable, Disable (and the data-key RPCs): bad and unknown key names.
    let blob = ok("blob", raw.encrypt(enc("dup", b"x", HashMap::new()))).await.ciphertext_blob;
    for bad in ["", "has space", "bad!", &"a".repeat(257)] {
        key_rpcs(&mut raw, bad, Code::InvalidArgument, &blob).await;
    }
    for unknown in [uuid::Uuid::new_v4().to_string(), "no-such-alias".into(), "b".repeat(256)] {
        key_rpcs(&mut raw, &unknown, Code::NotFound, &blob).await;
    }

    assert_still_serving(&server).await;
}

#[tokio::test]
async fn data_key_rpcs_refuse_bad_inputs_and_disabled_keys() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let c = HashMap::new;
    let key = ok("create", raw.create_key(pb::CreateKeyRequest { alias: "k".into(), ..Default::default() })).await;
    let key_id = key.key.unwrap().key_id;
    let blob = ok("blob", raw.encrypt(enc("k", b"x", c()))).await.ciphertext_blob;

    // Plaintext for Encrypt: 1-4096 bytes; a message under the gRPC limit but over 4096 is
    // refused by validation.
    ok("plaintext of 1", raw.encrypt(enc("k", b"x", c()))).await;
    ok("plaintext of 4096", raw.encrypt(enc("k", &[7u8; 4096], c()))).await;
    for len in [0, 4097, 60 * 1024] {
        expect(&format!("plaintext of {len}"), Code::InvalidArgument, raw.encrypt(enc("k", &vec![7u8; len], c()))).await;
    }

    // Contexts: the largest allowed one works end to end; each broken rule is refused by
    // every RPC that takes a context.
    let big = largest_context();
    let dk = ok("largest context", raw.generate_data_key(gdk("k", big.clone()))).await;
    let opened = ok("decrypt largest context", raw.decrypt(dec(&dk.ciphertext_blob, big.clone()))).await;
    assert_eq!(opened.plaintext, dk.plaintext);
    for (what, bad) in bad_contexts() {
        let want = Code::InvalidArgument;
        expect(&format!("GenerateDataKey, {what}"), want, raw.generate_data_key(gdk("k", bad.clone()))).await;
        let gwp = raw.generate_data_key_without_plaintext(gdk_wp("k", bad.clone()));
        expect(&format!("GenerateDataKeyWithoutPlaintext, {what}"), want, gwp).await;
        expect(&format!("Encrypt, {what}"), want, raw.encrypt(enc("k", b"x", bad.clone()))).await;
        expect(&format!("Decrypt, {what}"), want, raw.decrypt(dec(&blob, bad.clone()))).await;
        expect(&format!("ReEncrypt source, {what}"), want, raw.re_encrypt(re(&blob, bad.clone(), ""))).await;
        let dest = raw.re_encrypt(re_to_ctx(&blob, c(), bad.clone()));
        expect(&format!("ReEncrypt destination, {what}"), want, dest).await;
    }
    let mut inconsistent = re(&blob, c(), "");
    inconsistent.destination_encryption_context = wire_ctx(&[("a", "b")]);
    expect("destination context without the flag", Code::InvalidArgument, raw.re_encrypt(inconsistent)).await;

    // Audit metadata is bounded too.
    let mut long_audit = dec(&blob, c());
    long_audit.audit = Some(pb::AuditMetadata { acting_user: "u".repeat(129), purpose: "TREATMENT".into() });
    expect("audit.acting_user of 129", Code::InvalidArgument, raw.decrypt(long_audit)).await;

    // A disabled key refuses every cryptographic use, by alias and by id, as source and as
    // destination; enabling it again makes the same requests work.
    let other = ok("other", raw.create_key(pb::CreateKeyRequest::default())).await.key.unwrap().key_id;
    let other_blob = ok("other blob", raw.encrypt(enc(&other, b"y", c()))).await.ciphertext_blob;
    ok("disable", raw.disable_key(pb::DisableKeyRequest { key: "k".into() })).await;
    for name in ["k", key_id.as_str()] {
        let want = Code::FailedPrecondition;
        expect(&format!("GenerateDataKey({name}) disabled"), want, raw.generate_data_key(gdk(name, c()))).await;
        let gwp = raw.generate_data_key_without_plaintext(gdk_wp(name, c()));
        expect(&format!("GenerateDataKeyWithoutPlaintext({name}) disabled"), want, gwp).await;
        expect(&format!("Encrypt({name}) disabled"), want, raw.encrypt(enc(name, b"x", c()))).await;
        expect(&format!("ReEncrypt to {name} disabled"), want, raw.re_encrypt(re(&other_blob, c(), name))).await;
    }
    expect("Decrypt disabled", Code::FailedPrecondition, raw.decrypt(dec(&blob, c()))).await;
    expect("ReEncrypt from disabled", Code::FailedPrecondition, raw.re_encrypt(re(&blob, c(), &other))).await;
    ok("describe disabled", raw.describe_key(pb::DescribeKeyRequest { key: "k".into() })).await;
    ok("enable", raw.enable_key(pb::EnableKeyRequest { key: key_id.clone() })).await;
    assert_eq!(ok("decrypt enabled", raw.decrypt(dec(&blob, c()))).await.plaintext, b"x");
    ok("re-encrypt to enabled", raw.re_encrypt(re(&other_blob, c(), "k"))).await;

    assert_still_serving(&server).await;
}

/// Blobs that cannot be parsed, or that parse but cannot be opened: all INVALID_ARGUMENT.
fn malformed_blobs(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = vec![("1 byte".into(), vec![b'K']), ("magic only".into(), b"KMSB".to_vec())];
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
    out.push(with("key version 0", &|b| b[22..26].copy_from_slice(&[0; 4])));
    for iv in [0u8, 11, 13, 16, 255] {
        out.push(with(&format!("IV length {iv}"), &|b| b[26] = iv));
    }
    for len in 1..good.len() {
        out.push((format!("truncated to {len}"), good[..len].to_vec()));
    }
    out.push(with("one byte appended", &|b| b.push(0)));
    out.push(with("over the blob size limit", &|b| b.extend(std::iter::repeat_n(0u8, 5000))));
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
    let key = ok("create", raw.create_key(pb::CreateKeyRequest::default())).await.key.unwrap().key_id;
    let good = ok("data key", raw.generate_data_key(gdk(&key, c()))).await.ciphertext_blob;
    assert_eq!(good.len(), 27 + 12 + 48, "format changed: update malformed_blobs");
    assert_eq!(ok("good blob opens", raw.decrypt(dec(&good, c()))).await.plaintext.len(), 32);

    expect("Decrypt, empty blob", Code::InvalidArgument, raw.decrypt(dec(&[], c()))).await;
    expect("ReEncrypt, empty blob", Code::InvalidArgument, raw.re_encrypt(re(&[], c(), ""))).await;
    let cases = malformed_blobs(&good);
    assert!(cases.len() > 250);
    for (what, blob) in &cases {
        expect(&format!("Decrypt, {what}"), Code::InvalidArgument, raw.decrypt(dec(blob, c()))).await;
        expect(&format!("ReEncrypt, {what}"), Code::InvalidArgument, raw.re_encrypt(re(blob, c(), ""))).await;
    }

    // Well-formed headers naming a key that does not exist, or a version the key lacks.
    let mut unknown = good.clone();
    unknown[6..22].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    expect("Decrypt, unknown key id", Code::NotFound, raw.decrypt(dec(&unknown, c()))).await;
    expect("ReEncrypt, unknown key id", Code::NotFound, raw.re_encrypt(re(&unknown, c(), ""))).await;
    let mut version = good.clone();
    version[22..26].copy_from_slice(&7u32.to_be_bytes());
    expect("Decrypt, unknown key version", Code::NotFound, raw.decrypt(dec(&version, c()))).await;
    expect("ReEncrypt, unknown key version", Code::NotFound, raw.re_encrypt(re(&version, c(), ""))).await;

    // The good blob still opens: nothing above changed server state.
    assert_eq!(ok("good blob again", raw.decrypt(dec(&good, c()))).await.plaintext.len(), 32);
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn oversized_grpc_messages_are_refused() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let c = HashMap::new;
    let key = ok("create", raw.create_key(pb::CreateKeyRequest::default())).await.key.unwrap().key_id;
    let mib = vec![0x42u8; 1 << 20];

    // The server decodes at most 64 KiB per message. tonic refuses a larger one while
    // decoding with OUT_OF_RANGE ("decoded message length too large"), not RESOURCE_EXHAUSTED.
    let huge_desc = pb::CreateKeyRequest { alias: String::new(), description: "d".repeat(1 << 20) };
    let big_ctx: HashMap<String, String> = (0..64).map(|i| (format!("k{i}"), "v".repeat(2048))).collect();
    expect("Encrypt, 1 MiB plaintext", Code::OutOfRange, raw.encrypt(enc(&key, &mib, c()))).await;
    expect("Decrypt, 1 MiB blob", Code::OutOfRange, raw.decrypt(dec(&mib, c()))).await;
    expect("ReEncrypt, 1 MiB blob", Code::OutOfRange, raw.re_encrypt(re(&mib, c(), ""))).await;
    expect("CreateKey, 1 MiB description", Code::OutOfRange, raw.create_key(huge_desc)).await;
    expect("GenerateDataKey, 128 KiB context", Code::OutOfRange, raw.generate_data_key(gdk(&key, big_ctx))).await;
    expect("Encrypt, 65 KiB plaintext", Code::OutOfRange, raw.encrypt(enc(&key, &[1u8; 65 * 1024], c()))).await;

    // The same connection keeps working after each refusal.
    let ct = ok("encrypt after", raw.encrypt(enc(&key, b"still here", c()))).await;
    assert_eq!(ok("decrypt after", raw.decrypt(dec(&ct.ciphertext_blob, c()))).await.plaintext, b"still here");
    assert_still_serving(&server).await;
}
