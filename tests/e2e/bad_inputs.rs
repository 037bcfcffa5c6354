//! Bad inputs to every KeyManagementService RPC: each gets its specific status (never a panic,
//! a hang or INTERNAL), and the server keeps answering normal requests afterwards.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_tests::{KmsServer, ServerOptions};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// Malformed ciphertext blobs and oversized messages.
mod blobs;
/// Plaintexts, encryption contexts, audit fields and disabled keys.
mod data_keys;

type Raw = KeyManagementServiceClient<Channel>;

/// Awaits a call, bounded so that a hang fails the test, and returns its outcome.
async fn answer<T>(
    what: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(Duration::from_secs(20), call).await {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => panic!("{what}: no answer within 20 s"),
    }
}

/// The call must fail with exactly `want`.
async fn expect<T>(
    what: &str,
    want: Code,
    call: impl Future<Output = Result<Response<T>, Status>>,
) {
    match answer(what, call).await {
        Ok(_) => panic!("{what}: succeeded, wanted {want:?}"),
        Err(s) => assert_eq!(s.code(), want, "{what}: {}", s.message()),
    }
}

/// The call must succeed.
async fn ok<T>(what: &str, call: impl Future<Output = Result<Response<T>, Status>>) -> T {
    answer(what, call)
        .await
        .unwrap_or_else(|s| panic!("{what}: {:?} {}", s.code(), s.message()))
}

/// After the abuse: a fresh connection still gets normal answers, and nothing panicked.
async fn assert_still_serving(server: &KmsServer) {
    let mut raw = server.raw("app").await.unwrap();
    let key = ok(
        "create after abuse",
        raw.create_key(pb::CreateKeyRequest::default()),
    )
    .await
    .key
    .unwrap();
    let dk = ok(
        "data key after abuse",
        raw.generate_data_key(gdk(&key.key_id, HashMap::new())),
    )
    .await;
    assert_eq!(dk.plaintext.len(), 32);
    let log = server.log();
    assert!(
        !log.is_empty(),
        "the server log is empty: the panic check below would see nothing"
    );
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

fn gdk(key: &str, ctx: HashMap<String, String>) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        key: key.into(),
        encryption_context: ctx,
    }
}
fn gdk_wp(key: &str, ctx: HashMap<String, String>) -> pb::GenerateDataKeyWithoutPlaintextRequest {
    pb::GenerateDataKeyWithoutPlaintextRequest {
        key: key.into(),
        encryption_context: ctx,
    }
}
fn enc(key: &str, plaintext: &[u8], ctx: HashMap<String, String>) -> pb::EncryptRequest {
    pb::EncryptRequest {
        key: key.into(),
        plaintext: plaintext.to_vec(),
        encryption_context: ctx,
    }
}
fn dec(blob: &[u8], ctx: HashMap<String, String>) -> pb::DecryptRequest {
    pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx,
        audit: None,
    }
}
fn re(blob: &[u8], src: HashMap<String, String>, dest_key: &str) -> pb::ReEncryptRequest {
    pb::ReEncryptRequest {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: src,
        destination_key: dest_key.into(),
        ..Default::default()
    }
}
fn re_to_ctx(
    blob: &[u8],
    src: HashMap<String, String>,
    dest: HashMap<String, String>,
) -> pb::ReEncryptRequest {
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
    expect(
        &format!("DescribeKey({key:.40})"),
        want,
        raw.describe_key(pb::DescribeKeyRequest { key: key.into() }),
    )
    .await;
    expect(
        &format!("EnableKey({key:.40})"),
        want,
        raw.enable_key(pb::EnableKeyRequest { key: key.into() }),
    )
    .await;
    expect(
        &format!("DisableKey({key:.40})"),
        want,
        raw.disable_key(pb::DisableKeyRequest { key: key.into() }),
    )
    .await;
    expect(
        &format!("GenerateDataKey({key:.40})"),
        want,
        raw.generate_data_key(gdk(key, c())),
    )
    .await;
    let what = format!("GenerateDataKeyWithoutPlaintext({key:.40})");
    expect(
        &what,
        want,
        raw.generate_data_key_without_plaintext(gdk_wp(key, c())),
    )
    .await;
    expect(
        &format!("Encrypt({key:.40})"),
        want,
        raw.encrypt(enc(key, b"x", c())),
    )
    .await;
    if !key.is_empty() {
        // An empty destination key means "the source key", so it is not an error there.
        expect(
            &format!("ReEncrypt(destination {key:.40})"),
            want,
            raw.re_encrypt(re(blob, c(), key)),
        )
        .await;
    }
}

#[tokio::test]
async fn key_administration_rpcs_refuse_bad_inputs() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut raw = server.raw("app").await.unwrap();
    let create = |alias: &str, description: &str| pb::CreateKeyRequest {
        alias: alias.into(),
        description: description.into(),
        ..Default::default()
    };

    // CreateKey: the limits, just inside and just outside.
    ok("alias of 256", raw.create_key(create(&"a".repeat(256), ""))).await;
    ok(
        "description of 1024",
        raw.create_key(create("", &"d".repeat(1024))),
    )
    .await;
    ok("no alias, no description", raw.create_key(create("", ""))).await;
    let invalid = [
        ("alias of 257", create(&"a".repeat(257), "")),
        ("alias with a space", create("has space", "")),
        ("alias with '!'", create("bang!", "")),
        ("alias with non-ASCII", create("ünï", "")),
        (
            "alias that is a UUID",
            create(&uuid::Uuid::new_v4().to_string(), ""),
        ),
        ("description of 1025", create("", &"d".repeat(1025))),
        (
            "description of 513 chars / 1026 bytes",
            create("", &"é".repeat(513)),
        ),
        ("description with NUL", create("", "a\u{0}b")),
    ];
    for (what, req) in invalid {
        expect(what, Code::InvalidArgument, raw.create_key(req)).await;
    }

    // Duplicate alias, one after the other and racing (the database's unique constraint).
    let first = ok("create dup", raw.create_key(create("dup", "first")))
        .await
        .key
        .unwrap();
    expect(
        "duplicate alias",
        Code::AlreadyExists,
        raw.create_key(create("dup", "second")),
    )
    .await;
    let racers = (0..8).map(|_| {
        let mut r = raw.clone();
        async move {
            r.create_key(create("race", ""))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    });
    let results = futures::future::join_all(racers).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(()) | Err(Code::AlreadyExists))),
        "{results:?}"
    );
    let described = ok(
        "describe dup",
        raw.describe_key(pb::DescribeKeyRequest { key: "dup".into() }),
    )
    .await;
    assert_eq!(
        described.key.unwrap().key_id,
        first.key_id,
        "the duplicate replaced the original"
    );

    // ListKeys: page size and page token.
    ok(
        "page_size 1000",
        raw.list_keys(pb::ListKeysRequest {
            page_size: 1000,
            page_token: String::new(),
        }),
    )
    .await;
    for size in [1001, 5000, u32::MAX] {
        let req = pb::ListKeysRequest {
            page_size: size,
            page_token: String::new(),
        };
        expect(
            &format!("page_size {size}"),
            Code::InvalidArgument,
            raw.list_keys(req),
        )
        .await;
    }
    let real = ok(
        "page 1",
        raw.list_keys(pb::ListKeysRequest {
            page_size: 1,
            page_token: String::new(),
        }),
    )
    .await;
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
        let req = pb::ListKeysRequest {
            page_size: 10,
            page_token: token,
        };
        expect(&what, Code::InvalidArgument, raw.list_keys(req)).await;
    }

    // Describe, Enable, Disable (and the data-key RPCs): bad and unknown key names.
    let blob = ok("blob", raw.encrypt(enc("dup", b"x", HashMap::new())))
        .await
        .ciphertext_blob;
    for bad in ["", "has space", "bad!", &"a".repeat(257)] {
        key_rpcs(&mut raw, bad, Code::InvalidArgument, &blob).await;
    }
    for unknown in [
        uuid::Uuid::new_v4().to_string(),
        "no-such-alias".into(),
        "b".repeat(256),
    ] {
        key_rpcs(&mut raw, &unknown, Code::NotFound, &blob).await;
    }

    assert_still_serving(&server).await;
}
