//! gRPC handlers for `kms.v1.KeyManagementService`: validate → resolve key → authorize →
//! backend → answer.
//!
//! The trait impl at the bottom is thin: each RPC wraps its handler in `observe`, which gives
//! it a request id and a tracing span, records metrics, and converts `KmsError` to a status.
//! The handlers live in `keys.rs` (key administration) and `datakeys.rs` (cryptography).

mod batch;
mod cache;
mod call;
mod datakeys;
mod item_batch;
mod keys;
mod lifecycle;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_server::KeyManagementService;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::audit::AuditLog;
use crate::backend::KeyBackend;
use crate::config::LifecycleSection;
use crate::context::EncryptionContext;
use crate::error::KmsError;
use crate::policy::{Decision, KeyName, Permission, PolicyStore, Question};
use crate::store::{KeyRecord, KeyState, KeyStore, KeyVersionRecord};
pub use batch::MAX_BATCH_ITEMS;
use cache::KeyCache;
pub use call::Call;
pub use item_batch::{MAX_DATA_KEYS_PER_CALL, MAX_DECRYPTS_PER_CALL};
pub use lifecycle::MAX_DELETION_WAITING;
use validate::KeyRef;

/// The key service. Cheap to clone.
#[derive(Clone)]
pub struct KmsService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    backend: Arc<dyn KeyBackend>,
    cache: KeyCache,
    audit: AuditLog,
    policy: PolicyStore,
    lifecycle: LifecycleSection,
}

impl KmsService {
    pub fn new(
        store: Arc<dyn KeyStore>,
        backend: Arc<dyn KeyBackend>,
        audit: AuditLog,
        policy: PolicyStore,
        key_cache_ttl: Duration,
        lifecycle: LifecycleSection,
    ) -> Self {
        KmsService {
            inner: Arc::new(Inner {
                store,
                backend,
                audit,
                policy,
                lifecycle,
                cache: KeyCache::new(key_cache_ttl),
            }),
        }
    }

    pub(crate) fn store(&self) -> &dyn KeyStore {
        self.inner.store.as_ref()
    }

    /// Runs blocking backend work on the blocking thread pool, never on the async runtime.
    async fn blocking<T, F>(&self, f: F) -> Result<T, KmsError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KeyBackend) -> Result<T, KmsError> + Send + 'static,
    {
        let backend = self.inner.backend.clone();
        tokio::task::spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|e| KmsError::Internal(format!("backend task failed: {e}")))?
    }

    /// For data-key calls only (`random`, `seal`, `open`, `reseal`): runs `f` right here if the
    /// backend can do it without waiting (`KeyBackend::run_without_waiting`), else as
    /// [`Self::blocking`]. On SoftHSM the call takes ~25 µs and the hand-off to the blocking
    /// pool and back costs more than that. `f` may run twice (a no-wait try that gave up,
    /// then the blocking pool); data-key work has no effect outside its result.
    async fn data_key_call<T, F>(&self, f: F) -> Result<T, KmsError>
    where
        T: Send + 'static,
        F: Fn(&dyn KeyBackend) -> Result<T, KmsError> + Send + 'static,
    {
        let mut outcome = None;
        if self
            .inner
            .backend
            .run_without_waiting(&mut |b| outcome = Some(f(b)))
        {
            if let Some(result) = outcome {
                return result;
            }
        }
        let backend = self.inner.backend.clone();
        tokio::task::spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|e| KmsError::Internal(format!("backend task failed: {e}")))?
    }

    /// Finds a key by id or alias (through the cache).
    async fn resolve(&self, key: &KeyRef) -> Result<KeyRecord, KmsError> {
        let id = match key {
            KeyRef::Id(id) => *id,
            KeyRef::Alias(alias) => match self.inner.cache.alias(alias) {
                Some(id) => id,
                None => {
                    let rec = self
                        .store()
                        .get_key_by_alias(alias)
                        .await?
                        .ok_or_else(|| validate::not_found(key))?;
                    self.inner.cache.put_key(&rec);
                    return Ok(rec);
                }
            },
        };
        self.key_by_id(id).await
    }

    async fn key_by_id(&self, id: Uuid) -> Result<KeyRecord, KmsError> {
        if let Some(rec) = self.inner.cache.key(id) {
            return Ok(rec);
        }
        let rec = self
            .store()
            .get_key(id)
            .await?
            .ok_or_else(|| validate::not_found(&KeyRef::Id(id)))?;
        self.inner.cache.put_key(&rec);
        Ok(rec)
    }

    async fn version(&self, key: &KeyRecord, version: u32) -> Result<KeyVersionRecord, KmsError> {
        if let Some(v) = self.inner.cache.version(key.key_id, version) {
            return Ok(v);
        }
        let v = self
            .store()
            .get_version(key.key_id, version)
            .await?
            .ok_or_else(|| {
                KmsError::NotFound(format!("key {} has no version {version}", key.key_id))
            })?;
        self.inner.cache.put_version(&v);
        Ok(v)
    }

    /// Asks the policy whether the caller may use `permission` (on `key`, named by the caller
    /// as `named`, under `context`).
    fn authorize(
        &self,
        call: &Call,
        permission: Permission,
        key: Option<(&KeyRecord, &KeyRef)>,
        context: &EncryptionContext,
    ) -> Result<(), KmsError> {
        authorize(&self.inner.policy, call, permission, key, context)
    }

    /// Refuses cryptographic use of a key that is not enabled.
    fn require_enabled(key: &KeyRecord) -> Result<(), KmsError> {
        match key.state {
            KeyState::Enabled => Ok(()),
            other => Err(KmsError::FailedPrecondition(format!(
                "key {} is {}",
                key.key_id,
                other.as_str()
            ))),
        }
    }
}

/// The one authorization helper of every handler: asks the policy in force, records the role
/// that allowed the call on its audit note, and turns a refusal into PERMISSION_DENIED (naming
/// what is missing) or, when the caller has no right on the key at all, into exactly the
/// NOT_FOUND a missing key named the same way (`named`) gets.
pub(crate) fn authorize(
    policy: &PolicyStore,
    call: &Call,
    permission: Permission,
    key: Option<(&KeyRecord, &KeyRef)>,
    context: &EncryptionContext,
) -> Result<(), KmsError> {
    let Some(identity) = &call.identity else {
        return Err(KmsError::PermissionDenied(format!(
            "missing permission {permission}: no client identity"
        )));
    };
    let id = key.map(|(k, _)| k.key_id.to_string());
    let question = Question {
        identity: &identity.name,
        permission,
        key: key.zip(id.as_deref()).map(|((k, _), id)| KeyName {
            id,
            alias: k.alias.as_deref(),
        }),
        context: context.pairs(),
    };
    match policy.current().evaluate(&question) {
        Decision::Allow { role } => {
            call.role(role.name());
            Ok(())
        }
        Decision::Deny(msg) => Err(KmsError::PermissionDenied(msg)),
        Decision::Hidden => Err(match key {
            Some((_, named)) => validate::not_found(named),
            None => KmsError::PermissionDenied(format!("missing permission {permission}")),
        }),
    }
}

pub(crate) fn metadata(key: &KeyRecord) -> pb::KeyMetadata {
    pb::KeyMetadata {
        key_id: key.key_id.to_string(),
        alias: key.alias.clone().unwrap_or_default(),
        description: key.description.clone(),
        state: match key.state {
            KeyState::Enabled => pb::KeyState::Enabled,
            KeyState::Disabled => pb::KeyState::Disabled,
            KeyState::PendingDeletion => pb::KeyState::PendingDeletion,
            KeyState::Destroyed => pb::KeyState::Destroyed,
        } as i32,
        primary_version: key.primary_version,
        created_at_unix_ms: key.created_at_ms,
        backend: key.backend.clone(),
        rotation_period_seconds: key
            .rotation_period_ms
            .map_or(0, |ms| u64::try_from(ms / 1000).unwrap_or(0)),
        next_rotation_at_unix_ms: key.next_rotation_ms.unwrap_or(0),
        min_decryption_version: key.min_decryption_version,
        deletion_at_unix_ms: key.deletion_at_ms.unwrap_or(0),
    }
}

/// The caller's request id: `x-request-id` if it is short and printable, else a new UUID.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

impl KmsService {
    async fn observe<Req, Res, Fut>(
        &self,
        rpc: &'static str,
        req: Request<Req>,
        handler: impl FnOnce(Request<Req>, Call) -> Fut,
    ) -> Result<Response<Res>, Status>
    where
        Fut: Future<Output = Result<Res, KmsError>>,
    {
        observe(&self.inner.audit, rpc, req, handler).await
    }
}

/// Request id, tracing span, audit, metrics and error conversion around one handler.
///
/// The audit event is durably committed BEFORE the answer leaves: if it cannot be stored, the
/// caller gets UNAVAILABLE instead of the result (fail closed), whatever the handler decided.
pub(crate) async fn observe<Req, Res, Fut>(
    audit: &AuditLog,
    rpc: &'static str,
    req: Request<Req>,
    handler: impl FnOnce(Request<Req>, Call) -> Fut,
) -> Result<Response<Res>, Status>
where
    Fut: Future<Output = Result<Res, KmsError>>,
{
    let started = Instant::now();
    let (rid, identity, peer) = origin(&req);
    let span = tracing::info_span!("rpc", rpc, request_id = %rid, peer = %peer);
    let call = Call::new(identity, rid.clone());
    let mut result = handler(req, call.clone()).instrument(span.clone()).await;
    let fields = event_fields(call, rpc, started, &result);
    if let Err(e) = audit.record(fields).await {
        span.in_scope(|| tracing::error!(error = %e, "audit record failed; refusing the answer"));
        result = Err(e);
    }
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
    crate::metrics::record_request(rpc, code, started.elapsed());
    span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(code = ?code, "ok"),
        Err(e) => tracing::info!(code = ?code, error = %e, "refused"),
    });
    let mut response = result.map(Response::new).map_err(Status::from)?;
    if let Ok(v) = rid.parse() {
        response.metadata_mut().insert("x-request-id", v);
    }
    Ok(response)
}

/// Who sent `req` and under which request id: (request id, identity, name for logs).
fn origin<T>(req: &Request<T>) -> (String, Option<crate::auth::Identity>, String) {
    let identity = crate::auth::peer_identity(req);
    let peer = identity
        .as_ref()
        .map_or("<unauthenticated>", |i| i.name.as_str())
        .to_string();
    (request_id(req), identity, peer)
}

/// The audit event of a call that ended with `result`: its outcome code, and the error's
/// message as detail (errors never carry secrets).
fn event_fields<Res>(
    call: Call,
    rpc: &str,
    started: Instant,
    result: &Result<Res, KmsError>,
) -> kms_audit::EventFields {
    let (code, detail) = match result {
        Ok(_) => (tonic::Code::Ok, String::new()),
        Err(e) => (e.code(), e.to_string().chars().take(256).collect()),
    };
    let latency_us = started.elapsed().as_micros() as u64;
    call.into_fields(rpc, crate::error::code_name(code), latency_us, detail)
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn create_key(
        &self,
        r: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.observe("CreateKey", r, |r, call| {
            self.handle_create_key(r.into_inner(), call)
        })
        .await
    }
    async fn describe_key(
        &self,
        r: Request<pb::DescribeKeyRequest>,
    ) -> Result<Response<pb::DescribeKeyResponse>, Status> {
        self.observe("DescribeKey", r, |r, call| {
            self.handle_describe_key(r.into_inner(), call)
        })
        .await
    }
    async fn list_keys(
        &self,
        r: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.observe("ListKeys", r, |r, call| {
            self.handle_list_keys(r.into_inner(), call)
        })
        .await
    }
    async fn enable_key(
        &self,
        r: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::EnableKeyResponse>, Status> {
        self.observe("EnableKey", r, |r, call| async move {
            let key = self
                .handle_set_state(
                    &r.into_inner().key,
                    KeyState::Enabled,
                    Permission::EnableKey,
                    call,
                )
                .await?;
            Ok(pb::EnableKeyResponse { key: Some(key) })
        })
        .await
    }
    async fn disable_key(
        &self,
        r: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        self.observe("DisableKey", r, |r, call| async move {
            let key = self
                .handle_set_state(
                    &r.into_inner().key,
                    KeyState::Disabled,
                    Permission::DisableKey,
                    call,
                )
                .await?;
            Ok(pb::DisableKeyResponse { key: Some(key) })
        })
        .await
    }
    async fn generate_data_key(
        &self,
        r: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        self.observe("GenerateDataKey", r, |r, call| {
            self.handle_generate_data_key(r.into_inner(), Permission::GenerateDataKey, call)
        })
        .await
    }
    async fn generate_data_keys(
        &self,
        r: Request<pb::GenerateDataKeysRequest>,
    ) -> Result<Response<pb::GenerateDataKeysResponse>, Status> {
        self.handle_generate_data_keys(r).await
    }
    async fn generate_data_key_without_plaintext(
        &self,
        r: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.observe("GenerateDataKeyWithoutPlaintext", r, |r, call| async move {
            let r = r.into_inner();
            let full = self
                .handle_generate_data_key(
                    pb::GenerateDataKeyRequest {
                        key: r.key,
                        encryption_context: r.encryption_context,
                    },
                    Permission::GenerateDataKeyWithoutPlaintext,
                    call,
                )
                .await?;
            // `full.plaintext` is dropped here; prost buffers are plain Vec, so wipe it.
            let mut plaintext = full.plaintext;
            zeroize::Zeroize::zeroize(&mut plaintext);
            Ok(pb::GenerateDataKeyWithoutPlaintextResponse {
                ciphertext_blob: full.ciphertext_blob,
                key_id: full.key_id,
                key_version: full.key_version,
            })
        })
        .await
    }
    async fn encrypt(
        &self,
        r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        self.observe("Encrypt", r, |r, call| {
            self.handle_encrypt(r.into_inner(), call)
        })
        .await
    }
    async fn decrypt(
        &self,
        r: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        self.observe("Decrypt", r, |r, call| {
            self.handle_decrypt(r.into_inner(), call)
        })
        .await
    }
    async fn batch_decrypt(
        &self,
        r: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        self.handle_batch_decrypt(r).await
    }
    async fn who_am_i(
        &self,
        r: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        self.observe("WhoAmI", r, |_r, call| async move {
            // Every authenticated caller may ask who it is; nothing here names a key.
            let identity = call
                .identity
                .clone()
                .ok_or_else(|| KmsError::PermissionDenied("no client identity".into()))?;
            let policy = self.inner.policy.current();
            Ok(pb::WhoAmIResponse {
                roles: policy
                    .roles(&identity.name)
                    .iter()
                    .map(|r| r.name().to_string())
                    .collect(),
                permissions: policy.effective_permissions(&identity.name),
                identity: identity.name,
                key_fingerprint: identity.key_fingerprint,
            })
        })
        .await
    }
    async fn batch_re_encrypt(
        &self,
        r: Request<pb::BatchReEncryptRequest>,
    ) -> Result<Response<pb::BatchReEncryptResponse>, Status> {
        self.observe("BatchReEncrypt", r, |r, call| {
            self.handle_batch_re_encrypt(r.into_inner(), call)
        })
        .await
    }
    async fn rotate_key(
        &self,
        r: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.observe("RotateKey", r, |r, call| {
            self.handle_rotate_key(r.into_inner(), call)
        })
        .await
    }
    async fn list_key_versions(
        &self,
        r: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.observe("ListKeyVersions", r, |r, call| {
            self.handle_list_key_versions(r.into_inner(), call)
        })
        .await
    }
    async fn enable_key_version(
        &self,
        r: Request<pb::EnableKeyVersionRequest>,
    ) -> Result<Response<pb::EnableKeyVersionResponse>, Status> {
        self.observe("EnableKeyVersion", r, |r, call| async move {
            let r = r.into_inner();
            let version = self
                .handle_set_version_state(&r.key, r.version, true, call)
                .await?;
            Ok(pb::EnableKeyVersionResponse {
                version: Some(version),
            })
        })
        .await
    }
    async fn disable_key_version(
        &self,
        r: Request<pb::DisableKeyVersionRequest>,
    ) -> Result<Response<pb::DisableKeyVersionResponse>, Status> {
        self.observe("DisableKeyVersion", r, |r, call| async move {
            let r = r.into_inner();
            let version = self
                .handle_set_version_state(&r.key, r.version, false, call)
                .await?;
            Ok(pb::DisableKeyVersionResponse {
                version: Some(version),
            })
        })
        .await
    }
    async fn set_key_rotation_period(
        &self,
        r: Request<pb::SetKeyRotationPeriodRequest>,
    ) -> Result<Response<pb::SetKeyRotationPeriodResponse>, Status> {
        self.observe("SetKeyRotationPeriod", r, |r, call| {
            self.handle_set_rotation_period(r.into_inner(), call)
        })
        .await
    }
    async fn set_min_decryption_version(
        &self,
        r: Request<pb::SetMinDecryptionVersionRequest>,
    ) -> Result<Response<pb::SetMinDecryptionVersionResponse>, Status> {
        self.observe("SetMinDecryptionVersion", r, |r, call| {
            self.handle_set_min_decryption_version(r.into_inner(), call)
        })
        .await
    }
    async fn schedule_key_deletion(
        &self,
        r: Request<pb::ScheduleKeyDeletionRequest>,
    ) -> Result<Response<pb::ScheduleKeyDeletionResponse>, Status> {
        self.observe("ScheduleKeyDeletion", r, |r, call| {
            self.handle_schedule_deletion(r.into_inner(), call)
        })
        .await
    }
    async fn cancel_key_deletion(
        &self,
        r: Request<pb::CancelKeyDeletionRequest>,
    ) -> Result<Response<pb::CancelKeyDeletionResponse>, Status> {
        self.observe("CancelKeyDeletion", r, |r, call| {
            self.handle_cancel_deletion(r.into_inner(), call)
        })
        .await
    }
    async fn erase_key(
        &self,
        r: Request<pb::EraseKeyRequest>,
    ) -> Result<Response<pb::EraseKeyResponse>, Status> {
        self.observe("EraseKey", r, |r, call| {
            self.handle_erase_key(r.into_inner(), call)
        })
        .await
    }
    async fn re_encrypt(
        &self,
        r: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        self.observe("ReEncrypt", r, |r, call| {
            self.handle_re_encrypt(r.into_inner(), call)
        })
        .await
    }
}
