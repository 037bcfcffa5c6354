//! Who may do what, against the real server with real certificates: an authorization matrix
//! (every role × every RPC × own site / other site / missing or wrong context, each cell
//! asserted), NOT_FOUND for keys outside a caller's rights identical to a missing key's (by
//! alias, by id, and for Decrypt where the key comes from the blob), the role in the audit
//! event, policy reload on SIGHUP (grant added and removed; an invalid file refused while the
//! old policy stays in force), WhoAmI / `kmsctl whoami`, and at the handshake: expired
//! certificates, certificates from another CA, and revoked ones (CRL reloaded on SIGHUP and
//! when the file changes, without restart).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::audit_service_client::AuditServiceClient;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::Code;

/// Admin, auditor and one service identity per site, bound to its own site's keys and context.
const POLICY: &str = r#"
[[allow]]
identity = "spiffe://dev.clinic/client/admin"
role = "key-admin"

[[allow]]
identity = "spiffe://dev.clinic/client/auditor"
role = "auditor"

[[allow]]
identity = "spiffe://dev.clinic/site/{site}/notes-store"
role = "service"
keys = ["notes/{site}", "notes/{site}/*"]
context = { site = "{site}" }
"#;

fn site_uri(site: &str) -> String {
    format!("spiffe://dev.clinic/site/{site}/notes-store")
}

/// A channel for a certificate with `uri` issued now by the server's CA.
async fn channel_for(server: &KmsServer, uri: &str) -> Channel {
    let now = OffsetDateTime::now_utc();
    let cert = server
        .ca()
        .unwrap()
        .issue_client_cert(
            "authz-test",
            Some(uri),
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    server
        .channel_with(cert.cert_pem.into_bytes(), cert.key_pem.as_bytes().to_vec())
        .await
        .unwrap()
}

struct Caller {
    name: &'static str,
    kms: KeyManagementServiceClient<Channel>,
    audit: AuditServiceClient<Channel>,
}

async fn caller(server: &KmsServer, name: &'static str, uri: &str) -> Caller {
    let ch = channel_for(server, uri).await;
    Caller {
        name,
        kms: KeyManagementServiceClient::new(ch.clone()),
        audit: AuditServiceClient::new(ch),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    CreateKey,
    ListKeys,
    DescribeKey,
    EnableKey,
    DisableKey,
    GenerateDataKey,
    GenerateDataKeys,
    GenerateDataKeyWithoutPlaintext,
    Encrypt,
    Decrypt,
    BatchDecrypt,
    ReEncrypt,
    BatchReEncrypt,
    RotateKey,
    ListKeyVersions,
    EnableKeyVersion,
    DisableKeyVersion,
    SetKeyRotationPeriod,
    SetMinDecryptionVersion,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    EraseKey,
    WhoAmI,
    QueryAuditEvents,
    StreamAuditEvents,
    GetAuditPublicKey,
    VerifyAuditLog,
    ExportAuditLog,
}

/// The AuditService RPCs: auditor only, key-independent.
fn is_audit(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::QueryAuditEvents
            | Rpc::StreamAuditEvents
            | Rpc::GetAuditPublicKey
            | Rpc::VerifyAuditLog
            | Rpc::ExportAuditLog
    )
}

const RPCS: [Rpc; 28] = [
    Rpc::CreateKey,
    Rpc::ListKeys,
    Rpc::DescribeKey,
    Rpc::EnableKey,
    Rpc::DisableKey,
    Rpc::GenerateDataKey,
    Rpc::GenerateDataKeys,
    Rpc::GenerateDataKeyWithoutPlaintext,
    Rpc::Encrypt,
    Rpc::Decrypt,
    Rpc::BatchDecrypt,
    Rpc::ReEncrypt,
    Rpc::BatchReEncrypt,
    Rpc::RotateKey,
    Rpc::ListKeyVersions,
    Rpc::EnableKeyVersion,
    Rpc::DisableKeyVersion,
    Rpc::SetKeyRotationPeriod,
    Rpc::SetMinDecryptionVersion,
    Rpc::ScheduleKeyDeletion,
    Rpc::CancelKeyDeletion,
    Rpc::EraseKey,
    Rpc::WhoAmI,
    Rpc::QueryAuditEvents,
    Rpc::StreamAuditEvents,
    Rpc::GetAuditPublicKey,
    Rpc::VerifyAuditLog,
    Rpc::ExportAuditLog,
];

/// What a key RPC is aimed at: a key and the encryption context sent (and, for Decrypt and
/// ReEncrypt, the context the blob was sealed with).
#[derive(Debug, Clone, Copy)]
enum Target {
    /// notes/a with site = a.
    SiteA,
    /// notes/b with site = b.
    SiteB,
    /// notes/a without any context.
    SiteANoContext,
    /// notes/a with site = b (a blob of site A presented with another site's context).
    SiteAWrongContext,
}

const TARGETS: [Target; 4] = [
    Target::SiteA,
    Target::SiteB,
    Target::SiteANoContext,
    Target::SiteAWrongContext,
];

struct Fixture {
    key_a: pb::KeyMetadata,
    key_b: pb::KeyMetadata,
    /// Blobs sealed under notes/a (site=a), notes/b (site=b), notes/a (no context).
    blob_a: Vec<u8>,
    blob_b: Vec<u8>,
    blob_a_noctx: Vec<u8>,
}

impl Target {
    fn key<'f>(&self, f: &'f Fixture) -> &'f pb::KeyMetadata {
        match self {
            Target::SiteB => &f.key_b,
            _ => &f.key_a,
        }
    }
    fn context(&self) -> HashMap<String, String> {
        match self {
            Target::SiteA => wire_ctx(&[("site", "a")]),
            Target::SiteB | Target::SiteAWrongContext => wire_ctx(&[("site", "b")]),
            Target::SiteANoContext => HashMap::new(),
        }
    }
    /// A blob sealed under the target key with the context `context()` sends, except for
    /// SiteAWrongContext, whose blob is site A's (so only the context is wrong).
    fn blob<'f>(&self, f: &'f Fixture) -> &'f [u8] {
        match self {
            Target::SiteA | Target::SiteAWrongContext => &f.blob_a,
            Target::SiteB => &f.blob_b,
            Target::SiteANoContext => &f.blob_a_noctx,
        }
    }
}

/// Runs one cell; returns the code and message.
async fn run(
    c: &mut Caller,
    rpc: Rpc,
    t: Target,
    f: &Fixture,
    admin: &mut Caller,
) -> (Code, String) {
    let key = t.key(f).alias.clone();
    let ctx = t.context();
    let r: Result<(), tonic::Status> = match rpc {
        Rpc::CreateKey => c
            .kms
            .create_key(pb::CreateKeyRequest {
                alias: format!("scratch/{}", uuid::Uuid::new_v4()),
                description: String::new(),
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::ListKeys => c
            .kms
            .list_keys(pb::ListKeysRequest::default())
            .await
            .map(drop),
        Rpc::DescribeKey => c
            .kms
            .describe_key(pb::DescribeKeyRequest { key })
            .await
            .map(drop),
        Rpc::EnableKey => c
            .kms
            .enable_key(pb::EnableKeyRequest { key })
            .await
            .map(drop),
        Rpc::DisableKey => {
            let r = c
                .kms
                .disable_key(pb::DisableKeyRequest { key: key.clone() })
                .await
                .map(drop);
            if r.is_ok() {
                admin
                    .kms
                    .enable_key(pb::EnableKeyRequest { key })
                    .await
                    .unwrap();
            }
            r
        }
        Rpc::GenerateDataKey => c
            .kms
            .generate_data_key(pb::GenerateDataKeyRequest {
                key,
                encryption_context: ctx,
            })
            .await
            .map(drop),
        // One item: the call succeeds and the item carries the verdict GenerateDataKey would
        // give.
        Rpc::GenerateDataKeys => c
            .kms
            .generate_data_keys(pb::GenerateDataKeysRequest {
                items: vec![pb::GenerateDataKeyRequest {
                    key,
                    encryption_context: ctx,
                }],
            })
            .await
            .and_then(|r| {
                let item = r.into_inner().results.remove(0);
                match item.code {
                    0 => Ok(()),
                    code => Err(tonic::Status::new(Code::from(code), item.message)),
                }
            }),
        Rpc::GenerateDataKeyWithoutPlaintext => c
            .kms
            .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                key,
                encryption_context: ctx,
            })
            .await
            .map(drop),
        Rpc::Encrypt => c
            .kms
            .encrypt(pb::EncryptRequest {
                key,
                plaintext: b"x".to_vec(),
                encryption_context: ctx,
            })
            .await
            .map(drop),
        Rpc::Decrypt => c
            .kms
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: t.blob(f).to_vec(),
                encryption_context: ctx,
                audit: None,
            })
            .await
            .map(drop),
        // One item: the call succeeds and the item carries the verdict Decrypt would give.
        Rpc::BatchDecrypt => c
            .kms
            .batch_decrypt(pb::BatchDecryptRequest {
                items: vec![pb::DecryptRequest {
                    ciphertext_blob: t.blob(f).to_vec(),
                    encryption_context: ctx,
                    audit: None,
                }],
            })
            .await
            .and_then(|r| {
                let item = r.into_inner().results.remove(0);
                match item.code {
                    0 => Ok(()),
                    code => Err(tonic::Status::new(Code::from(code), item.message)),
                }
            }),
        Rpc::ReEncrypt => c
            .kms
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: t.blob(f).to_vec(),
                source_encryption_context: ctx,
                ..Default::default()
            })
            .await
            .map(drop),
        // One item: the call succeeds and the item carries the verdict ReEncrypt would give.
        Rpc::BatchReEncrypt => c
            .kms
            .batch_re_encrypt(pb::BatchReEncryptRequest {
                items: vec![pb::ReEncryptItem {
                    ciphertext_blob: t.blob(f).to_vec(),
                    source_encryption_context: ctx,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .and_then(|r| {
                let item = r.into_inner().results.remove(0);
                match item.code {
                    0 => Ok(()),
                    code => Err(tonic::Status::new(Code::from(code), item.message)),
                }
            }),
        Rpc::RotateKey => c
            .kms
            .rotate_key(pb::RotateKeyRequest { key })
            .await
            .map(drop),
        Rpc::ListKeyVersions => c
            .kms
            .list_key_versions(pb::ListKeyVersionsRequest { key })
            .await
            .map(drop),
        Rpc::EnableKeyVersion => c
            .kms
            .enable_key_version(pb::EnableKeyVersionRequest { key, version: 1 })
            .await
            .map(drop),
        // Version 1 is no longer primary (start() rotated both keys); put it back on success.
        Rpc::DisableKeyVersion => {
            let r = c
                .kms
                .disable_key_version(pb::DisableKeyVersionRequest {
                    key: key.clone(),
                    version: 1,
                })
                .await
                .map(drop);
            if r.is_ok() {
                admin
                    .kms
                    .enable_key_version(pb::EnableKeyVersionRequest { key, version: 1 })
                    .await
                    .unwrap();
            }
            r
        }
        Rpc::SetKeyRotationPeriod => c
            .kms
            .set_key_rotation_period(pb::SetKeyRotationPeriodRequest {
                key,
                rotation_period_seconds: 0,
            })
            .await
            .map(drop),
        Rpc::SetMinDecryptionVersion => c
            .kms
            .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
                key,
                min_decryption_version: 1,
            })
            .await
            .map(drop),
        // On success the key is put back: cancel (→ DISABLED), then enable.
        Rpc::ScheduleKeyDeletion => {
            let r = c
                .kms
                .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                    key: key.clone(),
                    waiting_period_seconds: 0,
                })
                .await
                .map(drop);
            if r.is_ok() {
                admin
                    .kms
                    .cancel_key_deletion(pb::CancelKeyDeletionRequest { key: key.clone() })
                    .await
                    .unwrap();
                admin
                    .kms
                    .enable_key(pb::EnableKeyRequest { key })
                    .await
                    .unwrap();
            }
            r
        }
        // The keys are never pending deletion here: an authorized caller learns that.
        Rpc::CancelKeyDeletion => c
            .kms
            .cancel_key_deletion(pb::CancelKeyDeletionRequest { key })
            .await
            .map(drop),
        // Nobody in this policy holds EraseKey (custodians only), so nothing is destroyed.
        Rpc::EraseKey => c
            .kms
            .erase_key(pb::EraseKeyRequest {
                key,
                reason: "authz matrix".into(),
                subject: HashMap::new(),
            })
            .await
            .map(drop),
        Rpc::QueryAuditEvents => c
            .audit
            .query_audit_events(pb::QueryAuditEventsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::WhoAmI => c.kms.who_am_i(pb::WhoAmIRequest::default()).await.map(drop),
        // The streams are refused before the first message, so opening them is the test.
        Rpc::StreamAuditEvents => c
            .audit
            .stream_audit_events(pb::StreamAuditEventsRequest::default())
            .await
            .map(drop),
        Rpc::GetAuditPublicKey => c
            .audit
            .get_audit_public_key(pb::GetAuditPublicKeyRequest::default())
            .await
            .map(drop),
        Rpc::VerifyAuditLog => c
            .audit
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await
            .map(drop),
        Rpc::ExportAuditLog => c
            .audit
            .export_audit_log(pb::ExportAuditLogRequest::default())
            .await
            .map(drop),
    };
    match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn is_crypto(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::GenerateDataKey
            | Rpc::GenerateDataKeys
            | Rpc::GenerateDataKeyWithoutPlaintext
            | Rpc::Encrypt
            | Rpc::Decrypt
            | Rpc::BatchDecrypt
            | Rpc::ReEncrypt
            | Rpc::BatchReEncrypt
    )
}

/// Blob RPCs: the key comes from the blob, so a hidden key is named by id.
fn is_blob(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::Decrypt | Rpc::BatchDecrypt | Rpc::ReEncrypt | Rpc::BatchReEncrypt
    )
}

/// The expected code of a cell.
fn expected(caller: &str, rpc: Rpc, t: Target) -> Code {
    use Code::*;
    let key_rpc = !matches!(rpc, Rpc::CreateKey | Rpc::ListKeys | Rpc::WhoAmI) && !is_audit(rpc);
    if rpc == Rpc::WhoAmI {
        // Everyone may ask who they are (an unbound identity learns it has no roles).
        return Ok;
    }
    match caller {
        "key-admin" => match rpc {
            r if is_audit(r) => PermissionDenied,
            r if is_crypto(r) => PermissionDenied,
            // Crypto-shredding is the custodian's, not the key administrator's.
            Rpc::EraseKey => PermissionDenied,
            Rpc::CancelKeyDeletion => FailedPrecondition,
            _ => Ok,
        },
        "auditor" => match rpc {
            r if is_audit(r) => Ok,
            Rpc::ListKeys | Rpc::DescribeKey | Rpc::ListKeyVersions => Ok,
            _ => PermissionDenied,
        },
        "nobody" if key_rpc => NotFound,
        "nobody" => PermissionDenied,
        site => {
            let own = if site == "service-a" { "a" } else { "b" };
            let key_site = if matches!(t, Target::SiteB) { "b" } else { "a" };
            if !key_rpc {
                PermissionDenied
            } else if key_site != own {
                // Not its key: indistinguishable from a missing key.
                NotFound
            } else if matches!(rpc, Rpc::DescribeKey | Rpc::ListKeyVersions) {
                Ok
            } else if !is_crypto(rpc) {
                PermissionDenied
            } else {
                let context_site = match t {
                    Target::SiteA => Some("a"),
                    Target::SiteB | Target::SiteAWrongContext => Some("b"),
                    Target::SiteANoContext => None,
                };
                if context_site == Some(own) {
                    Ok
                } else {
                    PermissionDenied
                }
            }
        }
    }
}

async fn start() -> (KmsServer, Fixture, Caller) {
    let server = KmsServer::start(ServerOptions {
        policy: POLICY.to_string(),
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let admin = caller(&server, "key-admin", &kms_client::pki::client_uri("admin")).await;
    let create = |alias: &'static str| {
        let mut kms = admin.kms.clone();
        async move {
            kms.create_key(pb::CreateKeyRequest {
                alias: alias.into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
        }
    };
    let key_a = create("notes/a").await;
    let key_b = create("notes/b").await;
    // Blobs: sealed by a temporary policy that lets the sites seal without conditions would
    // weaken the test; instead each site seals its own.
    let mut a = caller(&server, "service-a", &site_uri("a")).await;
    let mut b = caller(&server, "service-b", &site_uri("b")).await;
    let seal = |c: &mut Caller, key: &str, ctx: HashMap<String, String>| {
        let mut kms = c.kms.clone();
        let key = key.to_string();
        async move {
            kms.encrypt(pb::EncryptRequest {
                key,
                plaintext: b"note".to_vec(),
                encryption_context: ctx,
            })
            .await
            .map(|r| r.into_inner().ciphertext_blob)
        }
    };
    let blob_a = seal(&mut a, "notes/a", wire_ctx(&[("site", "a")]))
        .await
        .unwrap();
    let blob_b = seal(&mut b, "notes/b", wire_ctx(&[("site", "b")]))
        .await
        .unwrap();
    // Site A may not seal without its context; a context-free blob under notes/a comes from a
    // policy that briefly allows it.
    assert_eq!(
        seal(&mut a, "notes/a", HashMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    std::fs::write(&server.policy_path, format!("{POLICY}\n[[allow]]\nidentity = \"spiffe://dev.clinic/client/sealer\"\nrole = \"service\"\n")).unwrap();
    server.hangup().unwrap();
    let mut sealer = caller(&server, "sealer", "spiffe://dev.clinic/client/sealer").await;
    let blob_a_noctx = eventually(|| seal(&mut sealer, "notes/a", HashMap::new())).await;
    std::fs::write(&server.policy_path, POLICY).unwrap();
    server.hangup().unwrap();
    wait_until_denied(&mut sealer).await;
    // The blobs stay on version 1; version 2 is primary, so version 1 may be disabled.
    for key in ["notes/a", "notes/b"] {
        admin
            .kms
            .clone()
            .rotate_key(pb::RotateKeyRequest { key: key.into() })
            .await
            .unwrap();
    }
    (
        server,
        Fixture {
            key_a,
            key_b,
            blob_a,
            blob_b,
            blob_a_noctx,
        },
        admin,
    )
}

/// Retries `f` (a policy reload is asynchronous) for up to 10 s.
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still refused after the reload: {e}"),
        }
    }
}

async fn wait_until_denied(c: &mut Caller) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .kms
            .encrypt(pb::EncryptRequest {
                key: "notes/a".into(),
                plaintext: b"x".to_vec(),
                encryption_context: HashMap::new(),
            })
            .await;
        if r.is_err() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the grant was not removed by the reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn authorization_matrix() {
    let (server, f, mut admin) = start().await;
    let mut callers = vec![
        caller(&server, "key-admin", &kms_client::pki::client_uri("admin")).await,
        caller(&server, "service-a", &site_uri("a")).await,
        caller(&server, "service-b", &site_uri("b")).await,
        caller(&server, "auditor", &kms_client::pki::client_uri("auditor")).await,
        caller(&server, "nobody", "spiffe://dev.clinic/client/nobody").await,
    ];
    let mut failures = Vec::new();
    let mut cells = 0;
    for c in &mut callers {
        for rpc in RPCS {
            for t in TARGETS {
                let want = expected(c.name, rpc, t);
                let (got, msg) = run(c, rpc, t, &f, &mut admin).await;
                cells += 1;
                if got != want {
                    failures.push(format!(
                        "{} {rpc:?} {t:?}: want {want:?}, got {got:?} {msg:?}",
                        c.name
                    ));
                }
                // Refusals name what is missing; hidden keys say exactly what a missing key says.
                if got == Code::NotFound && !is_blob(rpc) {
                    let alias = &t.key(&f).alias;
                    assert_eq!(
                        msg,
                        format!("key {alias:?} not found"),
                        "{} {rpc:?} {t:?}",
                        c.name
                    );
                }
                if got == Code::NotFound && is_blob(rpc) {
                    assert_eq!(
                        msg,
                        format!("key {} not found", t.key(&f).key_id),
                        "{} {rpc:?} {t:?}",
                        c.name
                    );
                }
                if got == Code::PermissionDenied && is_crypto(rpc) && c.name.starts_with("service")
                {
                    assert!(
                        msg.contains("context site must be"),
                        "{} {rpc:?} {t:?}: {msg}",
                        c.name
                    );
                }
                if got == Code::PermissionDenied && c.name == "key-admin" && is_crypto(rpc) {
                    assert!(msg.contains("separation of duties"), "{msg}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cells} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 5 callers x 28 RPCs (22 key RPCs, WhoAmI, 5 audit RPCs) x 4 targets.
    assert_eq!(cells, 5 * RPCS.len() * TARGETS.len());
    assert_eq!(RPCS.len(), 28);

    // The role that allowed a call is in its audit event.
    let mut auditor = callers.remove(3);
    let events = auditor
        .audit
        .query_audit_events(pb::QueryAuditEventsRequest {
            caller: site_uri("a"),
            operation: "Decrypt".into(),
            outcome: "OK".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e.role == "service"), "{events:?}");
}

#[tokio::test]
async fn hidden_keys_look_missing_by_id_and_from_blobs() {
    let (server, f, _admin) = start().await;
    let mut a = caller(&server, "service-a", &site_uri("a")).await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (key, absent) in [
        (f.key_b.key_id.clone(), missing.clone()),
        ("notes/b".to_string(), "notes/zz".to_string()),
    ] {
        let hidden = a
            .kms
            .encrypt(pb::EncryptRequest {
                key: key.clone(),
                plaintext: b"x".to_vec(),
                encryption_context: wire_ctx(&[("site", "a")]),
            })
            .await
            .unwrap_err();
        let gone = a
            .kms
            .encrypt(pb::EncryptRequest {
                key: absent.clone(),
                plaintext: b"x".to_vec(),
                encryption_context: wire_ctx(&[("site", "a")]),
            })
            .await
            .unwrap_err();
        assert_eq!(hidden.code(), Code::NotFound);
        assert_eq!(gone.code(), Code::NotFound);
        assert_eq!(
            hidden.message().replace(&key, "K"),
            gone.message().replace(&absent, "K")
        );
    }
    // Site B's blob, even with site B's own context, is not there for site A.
    let e = a
        .kms
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: f.blob_b.clone(),
            encryption_context: wire_ctx(&[("site", "b")]),
            audit: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), format!("key {} not found", f.key_b.key_id));
}

#[tokio::test]
async fn policy_reload_on_sighup() {
    let (server, _f, _admin) = start().await;
    let mut c = caller(&server, "sealer", "spiffe://dev.clinic/client/sealer").await;
    let encrypt = |c: &mut Caller| {
        let mut kms = c.kms.clone();
        async move {
            kms.encrypt(pb::EncryptRequest {
                key: "notes/a".into(),
                plaintext: b"x".to_vec(),
                encryption_context: HashMap::new(),
            })
            .await
            .map(drop)
        }
    };
    assert_eq!(encrypt(&mut c).await.unwrap_err().code(), Code::NotFound);
    // A grant added takes effect without a restart...
    let granted = format!("{POLICY}\n[[allow]]\nidentity = \"spiffe://dev.clinic/client/sealer\"\nrole = \"service\"\n");
    std::fs::write(&server.policy_path, &granted).unwrap();
    server.hangup().unwrap();
    eventually(|| encrypt(&mut c)).await;
    // ...an invalid file is refused and the policy in force stays...
    std::fs::write(
        &server.policy_path,
        "[[allow]]\nidentity = \"x\"\nrole = \"superuser\"\n",
    )
    .unwrap();
    server.hangup().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("policy refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    encrypt(&mut c).await.unwrap();
    // ...and a grant removed is gone.
    std::fs::write(&server.policy_path, POLICY).unwrap();
    server.hangup().unwrap();
    wait_until_denied(&mut c).await;
    // Both reloads and the refusal are in the audit log.
    let mut auditor = caller(&server, "auditor", &kms_client::pki::client_uri("auditor")).await;
    let count = |op: &'static str| {
        let mut audit = auditor.audit.clone();
        async move {
            audit
                .query_audit_events(pb::QueryAuditEventsRequest {
                    operation: op.into(),
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .events
                .len()
        }
    };
    // start() reloaded twice, this test twice more.
    assert!(count("PolicyReloaded").await >= 4);
    assert_eq!(count("PolicyReloadFailed").await, 1);
    let _ = &mut auditor;
}

/// Whether a fresh connection with `cert` can make a call (ListKeys: any answer from the
/// service, even PERMISSION_DENIED, means the handshake was accepted).
async fn handshake_accepted(server: &KmsServer, cert: &kms_client::pki::IssuedCert) -> bool {
    let Ok(channel) = server
        .channel_with(
            cert.cert_pem.clone().into_bytes(),
            cert.key_pem.as_bytes().to_vec(),
        )
        .await
    else {
        return false;
    };
    match KeyManagementServiceClient::new(channel)
        .list_keys(pb::ListKeysRequest::default())
        .await
    {
        Ok(_) => true,
        Err(s) => s.code() == Code::PermissionDenied,
    }
}

/// Waits until fresh connections with `cert` are refused at the handshake.
async fn wait_until_refused(server: &KmsServer, cert: &kms_client::pki::IssuedCert, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake_accepted(server, cert).await {
        assert!(
            Instant::now() < deadline,
            "{what}: still accepted:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn revoked_certificates_are_refused_and_the_crl_reloads_without_restart() {
    let server = KmsServer::start(ServerOptions {
        client_crl: true,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let ca = server.ca().unwrap();
    let now = OffsetDateTime::now_utc();
    let (nb, na) = (
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let first = ca
        .issue_client_cert("first", Some("spiffe://dev.clinic/client/admin"), nb, na)
        .unwrap();
    let second = ca
        .issue_client_cert("second", Some("spiffe://dev.clinic/client/admin"), nb, na)
        .unwrap();
    assert!(
        handshake_accepted(&server, &first).await,
        "{}",
        server.log()
    );
    assert!(handshake_accepted(&server, &second).await);
    let crl_path = server.pki_dir.join("ca.crl");

    // Revoke the first, rewrite the CRL, SIGHUP: refused; the second still works.
    let crl = ca
        .issue_crl(&[&first.cert_pem], 2, now - time::Duration::minutes(1), na)
        .unwrap();
    std::fs::write(&crl_path, crl).unwrap();
    server.hangup().unwrap();
    wait_until_refused(&server, &first, "revoked, after SIGHUP").await;
    assert!(handshake_accepted(&server, &second).await);
    assert!(server.log().contains("Revoked"), "{}", server.log());

    // Revoke the second as well, without a signal: the changed file is noticed by itself.
    let crl = ca
        .issue_crl(
            &[&first.cert_pem, &second.cert_pem],
            3,
            now - time::Duration::minutes(1),
            na,
        )
        .unwrap();
    // A different modification time even on coarse-grained file systems.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&crl_path, crl).unwrap();
    wait_until_refused(&server, &second, "revoked, file changed").await;

    // A CRL that does not load leaves the last good one in force.
    std::fs::write(&crl_path, "not a CRL").unwrap();
    server.hangup().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("TLS files refused") {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!handshake_accepted(&server, &first).await);
    assert!(
        handshake_accepted(
            &server,
            &ca.issue_client_cert("third", Some("spiffe://dev.clinic/client/admin"), nb, na)
                .unwrap()
        )
        .await
    );
}

#[tokio::test]
async fn whoami_reports_identity_roles_and_permissions() {
    let server = KmsServer::start(ServerOptions {
        policy: POLICY.to_string(),
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    // kmsctl whoami, text and JSON.
    let out = server
        .kmsctl("admin")
        .unwrap()
        .arg("whoami")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("spiffe://dev.clinic/client/admin"), "{text}");
    assert!(text.contains("key-admin"), "{text}");
    assert!(text.contains("kms:CreateKey"), "{text}");
    assert!(!text.contains("kms:Decrypt"), "{text}");
    let out = server
        .kmsctl("auditor")
        .unwrap()
        .args(["--json", "whoami"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["roles"], serde_json::json!(["auditor"]));
    assert_eq!(v["key_fingerprint"].as_str().unwrap().len(), 64);
    // A site service: its keys and its context condition, with the capture filled in.
    let mut a = caller(&server, "service-a", &site_uri("a")).await;
    let me = a
        .kms
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, site_uri("a"));
    assert_eq!(me.roles, ["service"]);
    assert!(
        me.permissions
            .contains(&"kms:Decrypt on notes/a,notes/a/* if context site=a".to_string()),
        "{:?}",
        me.permissions
    );
    // No binding: an answer, with nothing in it.
    let mut nobody = caller(&server, "nobody", "spiffe://dev.clinic/client/nobody").await;
    let me = nobody
        .kms
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(me.roles.is_empty() && me.permissions.is_empty(), "{me:?}");
}

#[tokio::test]
async fn expired_and_foreign_certificates_are_refused_at_the_handshake() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let uri = kms_client::pki::client_uri("admin");
    let expired = server
        .ca()
        .unwrap()
        .issue_client_cert(
            "expired",
            Some(&uri),
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    assert!(
        !handshake_accepted(&server, &expired).await,
        "expired certificate accepted"
    );
    let other = kms_client::pki::CertAuthority::generate(
        "authz-other-ca",
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap()
    .issue_client_cert(
        "admin",
        Some(&uri),
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    assert!(
        !handshake_accepted(&server, &other).await,
        "certificate from another CA accepted"
    );
    let good = server
        .ca()
        .unwrap()
        .issue_client_cert(
            "good",
            Some(&uri),
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    assert!(handshake_accepted(&server, &good).await);
}
