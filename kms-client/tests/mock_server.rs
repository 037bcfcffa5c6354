//! `KmsClient` against in-process mock kms.v1 servers over real mutual TLS (certificates from
//! `kms_client::pki`): failover, retry rules, deadlines, TLS failures, type conversions.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate: helpers may panic

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use kms_client::{pki, AuditMetadata, Code, Error, KeyState, KmsClient, KmsClientConfig};
use kms_proto::kms::v1::{
    self as pb,
    key_management_service_server::{KeyManagementService, KeyManagementServiceServer},
};
use tonic::{
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
    Request, Response, Status,
};

/// Behaviour and counters of one mock server.
#[derive(Default)]
struct Mock {
    name: &'static str,
    /// Answer this many calls with UNAVAILABLE before behaving.
    fail_first: AtomicU32,
    /// Sleep this long in every call.
    delay: Option<Duration>,
    calls: AtomicU32,
    creates: AtomicU32,
}

struct Svc(Arc<Mock>);

impl Svc {
    async fn gate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated("no client certificate"));
        }
        if let Some(delay) = self.0.delay {
            tokio::time::sleep(delay).await;
        }
        let left = self.0.fail_first.load(Ordering::SeqCst);
        if left > 0 {
            self.0.fail_first.store(left - 1, Ordering::SeqCst);
            return Err(Status::unavailable(format!("{} backend down", self.0.name)));
        }
        Ok(())
    }

    fn meta(&self, key: &str, state: pb::KeyState) -> Option<pb::KeyMetadata> {
        Some(pb::KeyMetadata {
            key_id: format!("id-{key}"),
            alias: key.into(),
            description: String::new(),
            state: state as i32,
            primary_version: 1,
            created_at_unix_ms: 1_700_000_000_000,
            backend: self.0.name.into(), // tells the test which server answered
        })
    }
}

fn ctx_tag(ctx: &std::collections::HashMap<String, String>) -> Vec<u8> {
    let sorted: BTreeMap<_, _> = ctx.iter().collect();
    format!("{sorted:?}").into_bytes()
}

#[tonic::async_trait]
impl KeyManagementService for Svc {
    async fn create_key(
        &self,
        r: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.gate(&r).await?;
        self.0.creates.fetch_add(1, Ordering::SeqCst);
        let key = self.meta(&r.get_ref().alias, pb::KeyState::Enabled);
        Ok(Response::new(pb::CreateKeyResponse { key }))
    }
    async fn describe_key(
        &self,
        r: Request<pb::DescribeKeyRequest>,
    ) -> Result<Response<pb::DescribeKeyResponse>, Status> {
        self.gate(&r).await?;
        if r.get_ref().key == "missing" {
            return Err(Status::not_found("no such key"));
        }
        let key = self.meta(&r.get_ref().key, pb::KeyState::Enabled);
        Ok(Response::new(pb::DescribeKeyResponse { key }))
    }
    async fn list_keys(
        &self,
        r: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.gate(&r).await?;
        let (names, next): (&[&str], &str) = match r.get_ref().page_token.as_str() {
            "" => (&["a", "b"], "p2"),
            "p2" => (&["c"], ""),
            _ => return Err(Status::invalid_argument("bad token")),
        };
        Ok(Response::new(pb::ListKeysResponse {
            keys: names
                .iter()
                .filter_map(|n| self.meta(n, pb::KeyState::Enabled))
                .collect(),
            next_page_token: next.into(),
        }))
    }
    async fn enable_key(
        &self,
        r: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::EnableKeyResponse>, Status> {
        self.gate(&r).await?;
        let key = self.meta(&r.get_ref().key, pb::KeyState::Enabled);
        Ok(Response::new(pb::EnableKeyResponse { key }))
    }
    async fn disable_key(
        &self,
        r: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        self.gate(&r).await?;
        let key = self.meta(&r.get_ref().key, pb::KeyState::Disabled);
        Ok(Response::new(pb::DisableKeyResponse { key }))
    }
    async fn generate_data_key(
        &self,
        r: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        self.gate(&r).await?;
        let mut blob = b"enc:".to_vec();
        blob.extend(ctx_tag(&r.get_ref().encryption_context));
        blob.push(b'|');
        blob.extend([7u8; 32]);
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext: vec![7u8; 32],
            ciphertext_blob: blob,
            key_id: format!("id-{}", r.get_ref().key),
            key_version: 3,
        }))
    }
    async fn generate_data_key_without_plaintext(
        &self,
        r: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.gate(&r).await?;
        Ok(Response::new(pb::GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: b"wrapped".to_vec(),
            key_id: format!("id-{}", r.get_ref().key),
            key_version: 3,
        }))
    }
    async fn encrypt(
        &self,
        r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        self.gate(&r).await?;
        let req = r.into_inner();
        let mut blob = b"enc:".to_vec();
        blob.extend(ctx_tag(&req.encryption_context));
        blob.push(b'|');
        blob.extend(req.plaintext);
        Ok(Response::new(pb::EncryptResponse {
            ciphertext_blob: blob,
            key_id: format!("id-{}", req.key),
            key_version: 1,
        }))
    }
    async fn decrypt(
        &self,
        r: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        self.gate(&r).await?;
        let req = r.into_inner();
        if req.audit.as_ref().is_some_and(|a| a.purpose == "DENY") {
            return Err(Status::permission_denied("purpose not allowed"));
        }
        let mut prefix = b"enc:".to_vec();
        prefix.extend(ctx_tag(&req.encryption_context));
        prefix.push(b'|');
        let Some(plaintext) = req.ciphertext_blob.strip_prefix(prefix.as_slice()) else {
            return Err(Status::invalid_argument("decryption failed"));
        };
        Ok(Response::new(pb::DecryptResponse {
            plaintext: plaintext.to_vec(),
            key_id: "id-k".into(),
            key_version: 1,
        }))
    }
    async fn re_encrypt(
        &self,
        r: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        self.gate(&r).await?;
        let req = r.into_inner();
        Ok(Response::new(pb::ReEncryptResponse {
            ciphertext_blob: format!(
                "to={} ctx_set={} n={}",
                req.destination_key,
                req.destination_context_set,
                req.destination_encryption_context.len()
            )
            .into_bytes(),
            source_key_id: "id-src".into(),
            source_key_version: 1,
            key_id: "id-dst".into(),
            key_version: 2,
        }))
    }
}

/// A running mock server; stopped on drop.
struct Running {
    url: String,
    mock: Arc<Mock>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(pki: &Path, mock: Mock) -> Running {
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.pem"), read("server.key")))
        .client_ca_root(Certificate::from_pem(read("ca.pem")));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("https://{}", incoming.local_addr().unwrap());
    let mock = Arc::new(mock);
    let service = KeyManagementServiceServer::new(Svc(mock.clone()));
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(service)
        .serve_with_incoming(incoming);
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    Running { url, mock, task }
}

/// A URL where nothing listens.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", listener.local_addr().unwrap())
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki::init_dev_pki(dir.path(), &["localhost".into()], &["notes".into()]).unwrap();
    dir
}

fn config(pki: &Path, endpoints: Vec<String>) -> KmsClientConfig {
    let mut config = KmsClientConfig::from_files(
        endpoints,
        pki.join("ca.pem"),
        pki.join("notes.pem"),
        pki.join("notes.key"),
    )
    .unwrap();
    config.request_timeout = Duration::from_millis(1500);
    config.connect_timeout = Duration::from_millis(1500);
    config.initial_backoff = Duration::from_millis(10);
    config.max_retries = 2;
    config
}

fn mock(name: &'static str) -> Mock {
    Mock {
        name,
        ..Mock::default()
    }
}

#[tokio::test]
async fn all_methods_round_trip_over_mutual_tls() {
    let pki = setup();
    let server = start(pki.path(), mock("a")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![server.url.clone()])).unwrap();
    let ctx = BTreeMap::from([("note".to_string(), "42".to_string())]);

    let key = kms.create_key(Some("notes"), None).await.unwrap();
    assert_eq!((key.key_id.as_str(), key.alias.as_deref()), ("id-notes", Some("notes")));
    assert_eq!(kms.disable_key("k").await.unwrap().state, KeyState::Disabled);
    assert_eq!(kms.enable_key("k").await.unwrap().state, KeyState::Enabled);
    let all = kms.list_all_keys(2).await.unwrap();
    let aliases: Vec<_> = all.iter().filter_map(|k| k.alias.clone()).collect();
    assert_eq!(aliases, ["a", "b", "c"]);

    let dk = kms.generate_data_key("notes", &ctx).await.unwrap();
    assert_eq!(dk.plaintext.as_slice(), &[7u8; 32]);
    assert!(!format!("{dk:?}").contains("7, 7"));
    let back = kms.decrypt(&dk.ciphertext_blob, &ctx, None).await.unwrap();
    assert_eq!(back.plaintext, dk.plaintext);

    let blob = kms.encrypt("notes", b"hello", &ctx).await.unwrap();
    let audit = AuditMetadata {
        acting_user: "u1".into(),
        purpose: "TREATMENT".into(),
    };
    let back = kms.decrypt(&blob.ciphertext_blob, &ctx, Some(audit)).await.unwrap();
    assert_eq!(back.plaintext.as_slice(), b"hello");

    let wrong = BTreeMap::from([("note".to_string(), "43".to_string())]);
    let err = kms.decrypt(&blob.ciphertext_blob, &wrong, None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(!err.to_string().contains("hello"));

    let re = kms.re_encrypt(&blob.ciphertext_blob, &ctx, Some("k2"), Some(&wrong), None);
    assert_eq!(re.await.unwrap().ciphertext_blob, b"to=k2 ctx_set=true n=1");
    let re = kms.re_encrypt(&blob.ciphertext_blob, &ctx, None, None, None).await.unwrap();
    assert_eq!(re.ciphertext_blob, b"to= ctx_set=false n=0");
    assert_eq!(re.key_version, 2);

    let wrapped = kms.generate_data_key_without_plaintext("notes", &ctx).await.unwrap();
    assert_eq!(wrapped.ciphertext_blob, b"wrapped");
}

#[tokio::test]
async fn unreachable_endpoint_fails_over_even_for_create_key() {
    let pki = setup();
    let server = start(pki.path(), mock("b")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![closed_port(), server.url.clone()])).unwrap();
    kms.create_key(Some("x"), None).await.unwrap();
    assert_eq!(server.mock.creates.load(Ordering::SeqCst), 1);
    // Sticky: the next call goes straight to the endpoint that answered.
    assert_eq!(kms.describe_key("k").await.unwrap().backend, "b");
    assert_eq!(server.mock.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn server_unavailable_fails_over_idempotent_calls_but_not_create_key() {
    let pki = setup();
    let a = start(pki.path(), Mock { fail_first: AtomicU32::new(100), ..mock("a") }).await;
    let b = start(pki.path(), mock("b")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![a.url.clone(), b.url.clone()])).unwrap();

    let err = kms.create_key(Some("x"), None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(matches!(&err, Error::Rpc { endpoint, .. } if *endpoint == a.url), "{err}");
    assert_eq!(b.mock.calls.load(Ordering::SeqCst), 0, "CreateKey must not be re-sent");

    assert_eq!(kms.describe_key("k").await.unwrap().backend, "b");
    assert_eq!(a.mock.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unavailable_is_retried_with_backoff_up_to_max_retries() {
    let pki = setup();
    let s = start(pki.path(), Mock { fail_first: AtomicU32::new(2), ..mock("a") }).await;
    let kms = KmsClient::new(&config(pki.path(), vec![s.url.clone()])).unwrap();
    kms.describe_key("k").await.unwrap();
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 3);

    s.mock.fail_first.store(100, Ordering::SeqCst);
    let err = kms.encrypt("k", b"x", &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 3 + 3, "1 try + max_retries 2");

    // Errors other than UNAVAILABLE are returned at once.
    s.mock.fail_first.store(0, Ordering::SeqCst);
    let err = kms.describe_key("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn slow_server_hits_the_deadline_and_is_not_retried() {
    let pki = setup();
    let s = start(pki.path(), Mock { delay: Some(Duration::from_secs(3)), ..mock("a") }).await;
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.request_timeout = Duration::from_millis(300);
    let kms = KmsClient::new(&cfg).unwrap();
    let started = std::time::Instant::now();
    let err = kms.describe_key("k").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn tls_failures_are_errors() {
    let pki = setup();
    let s = start(pki.path(), mock("a")).await;

    // Wrong server name.
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.server_name = Some("not-the-server.example".into());
    cfg.max_retries = 0;
    let err = KmsClient::new(&cfg).unwrap().describe_key("k").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");

    // The right override works (the certificate has DNS localhost).
    cfg.server_name = Some("localhost".into());
    KmsClient::new(&cfg).unwrap().describe_key("k").await.unwrap();

    // A client certificate from another CA is refused by the server.
    let other = tempfile::tempdir().unwrap();
    pki::init_dev_pki(other.path(), &[], &["notes".into()]).unwrap();
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.cert_pem = std::fs::read(other.path().join("notes.pem")).unwrap();
    cfg.key_pem = std::fs::read(other.path().join("notes.key")).unwrap().into();
    cfg.max_retries = 0;
    assert!(KmsClient::new(&cfg).unwrap().describe_key("k").await.is_err());
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 1, "only the good client got through");
}

#[tokio::test]
async fn bad_configuration_is_rejected_up_front() {
    let pki = setup();
    let mut cfg = config(pki.path(), vec!["https://127.0.0.1:1".into()]);
    cfg.key_pem = b"not a key".to_vec().into();
    assert!(matches!(KmsClient::new(&cfg), Err(Error::Config(_))));
    let cfg = config(pki.path(), vec!["http://127.0.0.1:1".into()]);
    assert!(matches!(KmsClient::new(&cfg), Err(Error::Config(_))));
}
