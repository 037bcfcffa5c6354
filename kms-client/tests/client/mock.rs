//! An in-process mock kms.v1 server over real mutual TLS (certificates from
//! `kms_client::pki`), with knobs for failures and delays and call counters.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use kms_client::{pki, KmsClientConfig};
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
pub struct Mock {
    pub name: &'static str,
    /// Answer this many calls with UNAVAILABLE before behaving.
    pub fail_first: AtomicU32,
    /// Sleep this long in every call.
    pub delay: Option<Duration>,
    pub calls: AtomicU32,
    pub creates: AtomicU32,
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
            ..Default::default()
        })
    }
}

fn ctx_tag(ctx: &std::collections::HashMap<String, String>) -> Vec<u8> {
    let sorted: BTreeMap<_, _> = ctx.iter().collect();
    format!("{sorted:?}").into_bytes()
}

#[tonic::async_trait]
impl KeyManagementService for Svc {
    async fn generate_data_keys(
        &self,
        r: Request<pb::GenerateDataKeysRequest>,
    ) -> Result<Response<pb::GenerateDataKeysResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use GenerateDataKeys (tests/e2e covers it)",
        ))
    }
    async fn batch_decrypt(
        &self,
        r: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use BatchDecrypt (tests/e2e covers it)",
        ))
    }
    async fn batch_re_encrypt(
        &self,
        r: Request<pb::BatchReEncryptRequest>,
    ) -> Result<Response<pb::BatchReEncryptResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn rotate_key(
        &self,
        r: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn list_key_versions(
        &self,
        r: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.gate(&r).await?;
        // Two versions, the second primary (for kmsctl's rendering).
        let version = |v: u32, primary: bool| pb::KeyVersion {
            version: v,
            state: pb::KeyVersionState::Enabled as i32,
            primary,
            created_at_unix_ms: 1_700_000_000_000 + i64::from(v) * 86_400_000,
            ..Default::default()
        };
        Ok(Response::new(pb::ListKeyVersionsResponse {
            versions: vec![version(1, false), version(2, true)],
        }))
    }
    async fn enable_key_version(
        &self,
        r: Request<pb::EnableKeyVersionRequest>,
    ) -> Result<Response<pb::EnableKeyVersionResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn disable_key_version(
        &self,
        r: Request<pb::DisableKeyVersionRequest>,
    ) -> Result<Response<pb::DisableKeyVersionResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn set_key_rotation_period(
        &self,
        r: Request<pb::SetKeyRotationPeriodRequest>,
    ) -> Result<Response<pb::SetKeyRotationPeriodResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn set_min_decryption_version(
        &self,
        r: Request<pb::SetMinDecryptionVersionRequest>,
    ) -> Result<Response<pb::SetMinDecryptionVersionResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn schedule_key_deletion(
        &self,
        r: Request<pb::ScheduleKeyDeletionRequest>,
    ) -> Result<Response<pb::ScheduleKeyDeletionResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn cancel_key_deletion(
        &self,
        r: Request<pb::CancelKeyDeletionRequest>,
    ) -> Result<Response<pb::CancelKeyDeletionResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn erase_key(
        &self,
        r: Request<pb::EraseKeyRequest>,
    ) -> Result<Response<pb::EraseKeyResponse>, Status> {
        self.gate(&r).await?;
        Err(Status::unimplemented(
            "the transport tests do not use key lifecycle RPCs",
        ))
    }
    async fn who_am_i(
        &self,
        r: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        self.gate(&r).await?;
        Ok(Response::new(pb::WhoAmIResponse::default()))
    }
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
pub struct Running {
    pub url: String,
    pub mock: Arc<Mock>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start(pki: &Path, mock: Mock) -> Running {
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
pub fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", listener.local_addr().unwrap())
}

pub fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki::init_dev_pki(dir.path(), &["localhost".into()], &["notes".into()]).unwrap();
    dir
}

pub fn config(pki: &Path, endpoints: Vec<String>) -> KmsClientConfig {
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

pub fn mock(name: &'static str) -> Mock {
    Mock {
        name,
        ..Mock::default()
    }
}
