//! Key lifecycle on `KmsClient`: versions and rotation, minimum decryption version, scheduled
//! deletion, erasure (crypto-shredding) with its signed receipt, and batch re-encryption.

use std::{collections::BTreeMap, fmt};

use kms_proto::kms::v1::{self as pb, key_management_service_client::KeyManagementServiceClient};
use tonic::transport::Channel;

use crate::{
    transport::Method,
    types::{required_key, to_proto_context},
    AuditMetadata, EncryptionContext, Error, KeyMetadata, KmsClient,
};

type Grpc = KeyManagementServiceClient<Channel>;

/// Largest batch the server accepts in one `BatchReEncrypt` call.
pub const MAX_BATCH_RE_ENCRYPT: usize = 1000;

/// The state of one key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyVersionState {
    Enabled,
    Disabled,
    Destroyed,
    /// Unspecified or unknown to this client (the raw number).
    Unspecified(i32),
}

impl KeyVersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyVersionState::Enabled => "ENABLED",
            KeyVersionState::Disabled => "DISABLED",
            KeyVersionState::Destroyed => "DESTROYED",
            KeyVersionState::Unspecified(_) => "UNSPECIFIED",
        }
    }
}

impl From<i32> for KeyVersionState {
    fn from(raw: i32) -> Self {
        match pb::KeyVersionState::try_from(raw) {
            Ok(pb::KeyVersionState::Enabled) => KeyVersionState::Enabled,
            Ok(pb::KeyVersionState::Disabled) => KeyVersionState::Disabled,
            Ok(pb::KeyVersionState::Destroyed) => KeyVersionState::Destroyed,
            Ok(pb::KeyVersionState::Unspecified) | Err(_) => KeyVersionState::Unspecified(raw),
        }
    }
}

impl fmt::Display for KeyVersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One version of a master key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersion {
    pub key_id: String,
    pub version: u32,
    pub state: KeyVersionState,
    pub primary: bool,
    pub created_at_unix_ms: i64,
}

impl From<pb::KeyVersion> for KeyVersion {
    fn from(v: pb::KeyVersion) -> Self {
        Self {
            key_id: v.key_id,
            version: v.version,
            state: KeyVersionState::from(v.state),
            primary: v.primary,
            created_at_unix_ms: v.created_at_unix_ms,
        }
    }
}

fn required_version(method: &'static str, v: Option<pb::KeyVersion>) -> Result<KeyVersion, Error> {
    v.map(KeyVersion::from)
        .ok_or_else(|| Error::InvalidResponse {
            method,
            reason: "missing key version".into(),
        })
}

/// What `EraseKey` returns: the destroyed key and a receipt signed with the audit key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErasureReceipt {
    pub key: KeyMetadata,
    /// Canonical JSON (README "Key lifecycle", crypto-shredding).
    pub receipt: Vec<u8>,
    /// ECDSA P-256 over SHA-256(receipt), raw r||s.
    pub signature: Vec<u8>,
    /// Hex SHA-256 of the audit public key that verifies it.
    pub signing_key_fingerprint: String,
}

/// One blob to re-wrap in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReEncryptItem {
    pub ciphertext_blob: Vec<u8>,
    pub source_context: EncryptionContext,
    /// `None` keeps the source context.
    pub destination_context: Option<EncryptionContext>,
}

/// The outcome of one batch item: the new blob, or the gRPC status of its failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReEncryptOutcome {
    Ok {
        ciphertext_blob: Vec<u8>,
        source_key_id: String,
        source_key_version: u32,
        key_id: String,
        key_version: u32,
    },
    Failed {
        code: tonic::Code,
        message: String,
    },
}

impl KmsClient {
    /// Creates a key with an automatic rotation period (seconds; 0 = none). Never re-sent
    /// once it may have reached a server, like [`KmsClient::create_key`].
    pub async fn create_key_with_rotation(
        &self,
        alias: Option<&str>,
        description: Option<&str>,
        rotation_period_seconds: u64,
    ) -> Result<KeyMetadata, Error> {
        let response = self
            .transport
            .call(
                Method::CreateKey,
                || pb::CreateKeyRequest {
                    alias: alias.unwrap_or_default().to_string(),
                    description: description.unwrap_or_default().to_string(),
                    rotation_period_seconds,
                },
                |channel, request| async move { Grpc::new(channel).create_key(request).await },
            )
            .await?;
        required_key("CreateKey", response.key)
    }

    /// Creates a new version in the device and makes it primary. Not retried once sent.
    pub async fn rotate_key(&self, key: &str) -> Result<(KeyMetadata, KeyVersion), Error> {
        let r = self
            .transport
            .call(
                Method::RotateKey,
                || pb::RotateKeyRequest { key: key.into() },
                |channel, request| async move { Grpc::new(channel).rotate_key(request).await },
            )
            .await?;
        Ok((
            required_key("RotateKey", r.key)?,
            required_version("RotateKey", r.new_version)?,
        ))
    }

    /// Every version of a key, ascending.
    pub async fn list_key_versions(&self, key: &str) -> Result<Vec<KeyVersion>, Error> {
        let r =
            self.transport
                .call(
                    Method::ListKeyVersions,
                    || pb::ListKeyVersionsRequest { key: key.into() },
                    |channel, request| async move {
                        Grpc::new(channel).list_key_versions(request).await
                    },
                )
                .await?;
        Ok(r.versions.into_iter().map(KeyVersion::from).collect())
    }

    /// Enables (`true`) or disables (`false`) one version.
    pub async fn set_key_version_enabled(
        &self,
        key: &str,
        version: u32,
        enabled: bool,
    ) -> Result<KeyVersion, Error> {
        if enabled {
            let r = self
                .transport
                .call(
                    Method::EnableKeyVersion,
                    || pb::EnableKeyVersionRequest {
                        key: key.into(),
                        version,
                    },
                    |channel, request| async move {
                        Grpc::new(channel).enable_key_version(request).await
                    },
                )
                .await?;
            required_version("EnableKeyVersion", r.version)
        } else {
            let r = self
                .transport
                .call(
                    Method::DisableKeyVersion,
                    || pb::DisableKeyVersionRequest {
                        key: key.into(),
                        version,
                    },
                    |channel, request| async move {
                        Grpc::new(channel).disable_key_version(request).await
                    },
                )
                .await?;
            required_version("DisableKeyVersion", r.version)
        }
    }

    /// Sets (or clears with 0) the automatic rotation period.
    pub async fn set_key_rotation_period(
        &self,
        key: &str,
        rotation_period_seconds: u64,
    ) -> Result<KeyMetadata, Error> {
        let r = self
            .transport
            .call(
                Method::SetKeyRotationPeriod,
                || pb::SetKeyRotationPeriodRequest {
                    key: key.into(),
                    rotation_period_seconds,
                },
                |channel, request| async move {
                    Grpc::new(channel).set_key_rotation_period(request).await
                },
            )
            .await?;
        required_key("SetKeyRotationPeriod", r.key)
    }

    /// Refuses blobs under versions below `min_decryption_version` from now on.
    pub async fn set_min_decryption_version(
        &self,
        key: &str,
        min_decryption_version: u32,
    ) -> Result<KeyMetadata, Error> {
        let r = self
            .transport
            .call(
                Method::SetMinDecryptionVersion,
                || pb::SetMinDecryptionVersionRequest {
                    key: key.into(),
                    min_decryption_version,
                },
                |channel, request| async move {
                    Grpc::new(channel).set_min_decryption_version(request).await
                },
            )
            .await?;
        required_key("SetMinDecryptionVersion", r.key)
    }

    /// PENDING_DELETION for `waiting_period_seconds` (0 = 30 days), then destruction.
    pub async fn schedule_key_deletion(
        &self,
        key: &str,
        waiting_period_seconds: u64,
    ) -> Result<KeyMetadata, Error> {
        let r = self
            .transport
            .call(
                Method::ScheduleKeyDeletion,
                || pb::ScheduleKeyDeletionRequest {
                    key: key.into(),
                    waiting_period_seconds,
                },
                |channel, request| async move {
                    Grpc::new(channel).schedule_key_deletion(request).await
                },
            )
            .await?;
        required_key("ScheduleKeyDeletion", r.key)
    }

    /// Cancels a scheduled deletion; the key comes back DISABLED.
    pub async fn cancel_key_deletion(&self, key: &str) -> Result<KeyMetadata, Error> {
        let r =
            self.transport
                .call(
                    Method::CancelKeyDeletion,
                    || pb::CancelKeyDeletionRequest { key: key.into() },
                    |channel, request| async move {
                        Grpc::new(channel).cancel_key_deletion(request).await
                    },
                )
                .await?;
        required_key("CancelKeyDeletion", r.key)
    }

    /// Destroys every version of the key now (crypto-shredding) and returns the signed
    /// receipt. Repeating it on an erased key returns a receipt for the same destruction.
    pub async fn erase_key(
        &self,
        key: &str,
        reason: &str,
        subject: &BTreeMap<String, String>,
    ) -> Result<ErasureReceipt, Error> {
        let r = self
            .transport
            .call(
                Method::EraseKey,
                || pb::EraseKeyRequest {
                    key: key.into(),
                    reason: reason.into(),
                    subject: to_proto_context(subject),
                },
                |channel, request| async move { Grpc::new(channel).erase_key(request).await },
            )
            .await?;
        Ok(ErasureReceipt {
            key: required_key("EraseKey", r.key)?,
            receipt: r.receipt,
            signature: r.receipt_signature,
            signing_key_fingerprint: r.signing_key_fingerprint,
        })
    }

    /// Re-wraps up to [`MAX_BATCH_RE_ENCRYPT`] blobs; one outcome per item, in order.
    pub async fn batch_re_encrypt(
        &self,
        items: &[ReEncryptItem],
        destination_key: Option<&str>,
        audit: Option<AuditMetadata>,
    ) -> Result<Vec<ReEncryptOutcome>, Error> {
        let r = self
            .transport
            .call(
                Method::BatchReEncrypt,
                || pb::BatchReEncryptRequest {
                    items: items
                        .iter()
                        .map(|i| pb::ReEncryptItem {
                            ciphertext_blob: i.ciphertext_blob.clone(),
                            source_encryption_context: to_proto_context(&i.source_context),
                            destination_encryption_context: i
                                .destination_context
                                .as_ref()
                                .map(to_proto_context)
                                .unwrap_or_default(),
                            destination_context_set: i.destination_context.is_some(),
                        })
                        .collect(),
                    destination_key: destination_key.unwrap_or_default().to_string(),
                    audit: audit.clone().map(Into::into),
                },
                |channel, request| async move {
                    Grpc::new(channel).batch_re_encrypt(request).await
                },
            )
            .await?;
        if r.results.len() != items.len() {
            return Err(Error::InvalidResponse {
                method: "BatchReEncrypt",
                reason: format!("{} results for {} items", r.results.len(), items.len()),
            });
        }
        Ok(r.results
            .into_iter()
            .map(|x| {
                if x.code == 0 {
                    ReEncryptOutcome::Ok {
                        ciphertext_blob: x.ciphertext_blob,
                        source_key_id: x.source_key_id,
                        source_key_version: x.source_key_version,
                        key_id: x.key_id,
                        key_version: x.key_version,
                    }
                } else {
                    ReEncryptOutcome::Failed {
                        code: tonic::Code::from_i32(x.code),
                        message: x.message,
                    }
                }
            })
            .collect())
    }
}
