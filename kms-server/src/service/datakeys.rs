//! Cryptographic handlers: GenerateDataKey, Encrypt, Decrypt, ReEncrypt.
//!
//! Every blob is sealed by the backend under the key's primary version with
//! AAD = envelope header || canonical encryption context (see `envelope`). Plaintext data keys
//! exist only in `Zeroizing` buffers here and in the response message.

use kms_proto::kms::v1 as pb;
use zeroize::Zeroizing;

use super::validate::{self, KeyRef};
use super::{Call, KmsService};
use crate::backend::Sealed;
use crate::context::EncryptionContext;
use crate::envelope::{self, Envelope};
use crate::error::KmsError;
use crate::policy::Permission;
use crate::store::{KeyRecord, KeyVersionRecord, VersionState};

/// Data keys are AES-256 keys.
const DATA_KEY_LEN: usize = 32;

/// A freshly sealed blob and what it was sealed under.
struct SealedBlob {
    blob: Vec<u8>,
    key_id: String,
    key_version: u32,
}

impl KmsService {
    /// Checks that `key` may seal now and returns its primary version and the AAD binding
    /// the blob to `context`.
    pub(super) async fn seal_target(
        &self,
        key: &KeyRecord,
        context: &EncryptionContext,
    ) -> Result<(KeyVersionRecord, Vec<u8>), KmsError> {
        Self::require_enabled(key)?;
        let version = self.version(key, key.primary_version).await?;
        if version.state != VersionState::Enabled {
            return Err(KmsError::FailedPrecondition(format!(
                "primary version {} of key {} is {}",
                version.version,
                key.key_id,
                version.state.as_str()
            )));
        }
        let aad = envelope::aad(
            self.inner.backend.mechanism(),
            key.key_id,
            version.version,
            context,
        );
        Ok((version, aad))
    }

    /// The blob for a backend `seal` result.
    fn sealed_blob(&self, key: &KeyRecord, version: u32, sealed: Sealed) -> SealedBlob {
        let env = Envelope {
            mechanism: self.inner.backend.mechanism(),
            key_id: key.key_id,
            key_version: version,
            iv: sealed.iv,
            ciphertext: sealed.ciphertext,
        };
        SealedBlob {
            blob: env.to_bytes(),
            key_id: key.key_id.to_string(),
            key_version: version,
        }
    }

    /// Seals `plaintext` under the primary version of `key`.
    async fn seal_under(
        &self,
        key: &KeyRecord,
        context: &EncryptionContext,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<SealedBlob, KmsError> {
        let (version, aad) = self.seal_target(key, context).await?;
        let backend_ref = version.backend_ref;
        let sealed = self
            .data_key_call(move |b| Ok(b.seal(&backend_ref, &aad, &plaintext)?))
            .await?;
        Ok(self.sealed_blob(key, version.version, sealed))
    }

    /// Parses, checks and authorizes (`permission` on the key named in the blob) a blob
    /// without opening it: the key and version must be enabled and the version at least the
    /// key's minimum decryption version.
    pub(super) async fn check_blob(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        permission: Permission,
        call: &Call,
    ) -> Result<(Envelope, KeyRecord, KeyVersionRecord), KmsError> {
        if blob.is_empty() {
            return Err(KmsError::invalid("ciphertext_blob is required"));
        }
        let env = Envelope::parse(blob).map_err(|e| KmsError::InvalidArgument(e.to_string()))?;
        call.key(env.key_id, Some(env.key_version));
        if env.mechanism != self.inner.backend.mechanism() {
            return Err(KmsError::invalid(format!(
                "ciphertext blob was sealed by another kind of backend ({:?}); this server uses {}",
                env.mechanism,
                self.inner.backend.kind()
            )));
        }
        let key = self.key_by_id(env.key_id).await?;
        self.authorize(
            call,
            permission,
            Some((&key, &KeyRef::Id(env.key_id))),
            context,
        )?;
        Self::require_enabled(&key)?;
        if env.key_version < key.min_decryption_version {
            return Err(KmsError::FailedPrecondition(format!(
                "version {} of key {} is below its minimum decryption version {}",
                env.key_version, key.key_id, key.min_decryption_version
            )));
        }
        let version = self.version(&key, env.key_version).await?;
        if version.state != VersionState::Enabled {
            return Err(KmsError::FailedPrecondition(format!(
                "version {} of key {} is {}",
                version.version,
                key.key_id,
                version.state.as_str()
            )));
        }
        Ok((env, key, version))
    }

    /// [`Self::check_blob`], then opens the blob. Returns the plaintext and the key it was
    /// sealed under.
    async fn open_blob(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        permission: Permission,
        call: &Call,
    ) -> Result<(Zeroizing<Vec<u8>>, KeyRecord, u32), KmsError> {
        let (env, key, version) = self.check_blob(blob, context, permission, call).await?;
        let aad = env.aad(context);
        let backend_ref = version.backend_ref;
        let plaintext = self
            .data_key_call(move |b| Ok(b.open(&backend_ref, &env.iv, &aad, &env.ciphertext)?))
            .await?;
        Ok((plaintext, key, version.version))
    }

    pub(super) async fn handle_generate_data_key(
        &self,
        req: pb::GenerateDataKeyRequest,
        permission: Permission,
        call: Call,
    ) -> Result<pb::GenerateDataKeyResponse, KmsError> {
        let key_ref = validate::key_ref("key", &req.key)?;
        let context = EncryptionContext::from_wire(&req.encryption_context)?;
        call.context(&context);
        let key = self.resolve(&key_ref).await?;
        call.key(key.key_id, None);
        self.authorize(&call, permission, Some((&key, &key_ref)), &context)?;
        let (version, aad) = self.seal_target(&key, &context).await?;
        call.key(key.key_id, Some(version.version));
        let backend_ref = version.backend_ref;
        // Both HSM calls in one go: a trip to the blocking pool costs thread wake-ups.
        let (data_key, sealed) = self
            .data_key_call(move |b| {
                let data_key = b.random(DATA_KEY_LEN)?;
                let sealed = b.seal(&backend_ref, &aad, &data_key)?;
                Ok((data_key, sealed))
            })
            .await?;
        let sealed = self.sealed_blob(&key, version.version, sealed);
        Ok(pb::GenerateDataKeyResponse {
            // The response owns this copy; tonic drops it after encoding.
            plaintext: data_key.to_vec(),
            ciphertext_blob: sealed.blob,
            key_id: sealed.key_id,
            key_version: sealed.key_version,
        })
    }

    pub(super) async fn handle_encrypt(
        &self,
        req: pb::EncryptRequest,
        call: Call,
    ) -> Result<pb::EncryptResponse, KmsError> {
        let key_ref = validate::key_ref("key", &req.key)?;
        let plaintext = Zeroizing::new(req.plaintext);
        validate::plaintext(&plaintext)?;
        let context = EncryptionContext::from_wire(&req.encryption_context)?;
        call.context(&context);
        let key = self.resolve(&key_ref).await?;
        call.key(key.key_id, None);
        self.authorize(&call, Permission::Encrypt, Some((&key, &key_ref)), &context)?;
        let sealed = self.seal_under(&key, &context, plaintext).await?;
        call.key(key.key_id, Some(sealed.key_version));
        Ok(pb::EncryptResponse {
            ciphertext_blob: sealed.blob,
            key_id: sealed.key_id,
            key_version: sealed.key_version,
        })
    }

    pub(super) async fn handle_decrypt(
        &self,
        req: pb::DecryptRequest,
        call: Call,
    ) -> Result<pb::DecryptResponse, KmsError> {
        let context = EncryptionContext::from_wire(&req.encryption_context)?;
        call.context(&context);
        if let Some(audit) = &req.audit {
            validate::audit_field("audit.acting_user", &audit.acting_user)?;
            validate::audit_field("audit.purpose", &audit.purpose)?;
            call.actor(&audit.acting_user, &audit.purpose);
        }
        let (plaintext, key, version) = self
            .open_blob(&req.ciphertext_blob, &context, Permission::Decrypt, &call)
            .await?;
        Ok(pb::DecryptResponse {
            plaintext: plaintext.to_vec(),
            key_id: key.key_id.to_string(),
            key_version: version,
        })
    }

    pub(super) async fn handle_re_encrypt(
        &self,
        req: pb::ReEncryptRequest,
        call: Call,
    ) -> Result<pb::ReEncryptResponse, KmsError> {
        let source_context = EncryptionContext::from_wire(&req.source_encryption_context)?;
        call.context(&source_context);
        let dest_context = if req.destination_context_set {
            EncryptionContext::from_wire(&req.destination_encryption_context)?
        } else {
            if !req.destination_encryption_context.is_empty() {
                return Err(KmsError::invalid(
                    "destination_encryption_context is set but destination_context_set is false",
                ));
            }
            source_context.clone()
        };
        let dest_ref = if req.destination_key.is_empty() {
            None
        } else {
            Some(validate::key_ref("destination_key", &req.destination_key)?)
        };
        if let Some(audit) = &req.audit {
            validate::audit_field("audit.acting_user", &audit.acting_user)?;
            validate::audit_field("audit.purpose", &audit.purpose)?;
            call.actor(&audit.acting_user, &audit.purpose);
        }
        let (plaintext, source_key, source_version) = self
            .open_blob(
                &req.ciphertext_blob,
                &source_context,
                Permission::ReEncrypt,
                &call,
            )
            .await?;
        // The destination is authorized on its own, under the destination context.
        let dest_ref = dest_ref.unwrap_or(KeyRef::Id(source_key.key_id));
        let dest_key = self.resolve(&dest_ref).await?;
        self.authorize(
            &call,
            Permission::ReEncrypt,
            Some((&dest_key, &dest_ref)),
            &dest_context,
        )?;
        let sealed = self.seal_under(&dest_key, &dest_context, plaintext).await?;
        call.detail(format!(
            "re-encrypted to key {} version {}",
            sealed.key_id, sealed.key_version
        ));
        Ok(pb::ReEncryptResponse {
            ciphertext_blob: sealed.blob,
            source_key_id: source_key.key_id.to_string(),
            source_key_version: source_version,
            key_id: sealed.key_id,
            key_version: sealed.key_version,
        })
    }
}
