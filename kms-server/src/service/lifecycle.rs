//! Key lifecycle handlers: rotation and versions, rotation period, minimum decryption version,
//! scheduled deletion and its cancellation, and erasure (crypto-shredding) with a signed
//! receipt. The destruction routine here is shared with the background worker
//! (`crate::lifecycle`).
//!
//! State changes are compare-and-swap on the key's state in the database, so two KMS nodes
//! (or a node and its worker) never both apply conflicting changes.

use std::time::Duration;

use kms_audit::{ErasureReceipt, ERASURE_RECEIPT_TYPE};
use kms_proto::kms::v1 as pb;

use super::keys::{now_ms, version_object_name};
use super::validate;
use super::{metadata, Call, KmsService};
use crate::context::EncryptionContext;
use crate::error::KmsError;
use crate::policy::Permission;
use crate::store::{KeyRecord, KeyState, KeyVersionRecord, StoreError, VersionState};

/// The longest and default ScheduleKeyDeletion waiting period (AWS KMS's bounds).
pub const MAX_DELETION_WAITING: Duration = Duration::from_secs(30 * 86_400);
/// The longest rotation period accepted (100 years).
const MAX_ROTATION_PERIOD_SECS: u64 = 100 * 365 * 86_400;

pub(crate) fn version_message(v: &KeyVersionRecord, primary: u32) -> pb::KeyVersion {
    pb::KeyVersion {
        key_id: v.key_id.to_string(),
        version: v.version,
        state: match v.state {
            VersionState::Enabled => pb::KeyVersionState::Enabled,
            VersionState::Disabled => pb::KeyVersionState::Disabled,
            VersionState::Destroyed => pb::KeyVersionState::Destroyed,
        } as i32,
        primary: v.version == primary,
        created_at_unix_ms: v.created_at_ms,
    }
}

fn millis(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

impl KmsService {
    /// Resolves `key` from the database (not the cache), records it on the call and checks
    /// `permission` on it.
    async fn admin_target(
        &self,
        key: &str,
        permission: Permission,
        call: &Call,
    ) -> Result<KeyRecord, KmsError> {
        let key_ref = validate::key_ref("key", key)?;
        let rec = self.resolve_uncached(&key_ref).await?;
        call.key(rec.key_id, None);
        self.authorize(
            call,
            permission,
            Some((&rec, &key_ref)),
            &EncryptionContext::default(),
        )?;
        Ok(rec)
    }

    /// Writes `updated` if the key is still in `current`'s state; refreshes the cache.
    async fn swap_key(
        &self,
        current: &KeyRecord,
        updated: KeyRecord,
    ) -> Result<KeyRecord, KmsError> {
        let saved = self.store().update_key(&updated, current.state).await?;
        self.inner.cache.invalidate(current.key_id);
        saved.ok_or_else(|| {
            KmsError::FailedPrecondition(format!(
                "key {} changed while this request ran; retry",
                current.key_id
            ))
        })
    }

    fn require_not_deleted(key: &KeyRecord) -> Result<(), KmsError> {
        match key.state {
            KeyState::Enabled | KeyState::Disabled => Ok(()),
            other => Err(KmsError::FailedPrecondition(format!(
                "key {} is {}",
                key.key_id,
                other.as_str()
            ))),
        }
    }

    /// Creates the next version in the device and makes it primary. Used by RotateKey and by
    /// the automatic rotation of the lifecycle worker.
    pub(crate) async fn rotate(
        &self,
        key: &KeyRecord,
    ) -> Result<(KeyRecord, KeyVersionRecord), KmsError> {
        Self::require_not_deleted(key)?;
        let latest = self
            .store()
            .list_versions(key.key_id)
            .await?
            .last()
            .map_or(0, |v| v.version);
        let next = latest
            .checked_add(1)
            .ok_or_else(|| KmsError::FailedPrecondition("no more key versions".into()))?;
        let name = version_object_name(key.key_id, next);
        let backend_ref = self
            .blocking(move |b| Ok(b.create_key_version(&name)?))
            .await?;
        let version = KeyVersionRecord {
            key_id: key.key_id,
            version: next,
            backend_ref: backend_ref.clone(),
            state: VersionState::Enabled,
            created_at_ms: now_ms(),
        };
        if let Err(e) = self.store().add_version(&version, true).await {
            // Another node rotated first, or the key is being deleted: leave no orphan object.
            let cleanup = self
                .blocking(move |b| Ok(b.destroy_key_version(&backend_ref)?))
                .await;
            if let Err(c) = cleanup {
                tracing::warn!(key_id = %key.key_id, error = %c, "could not remove HSM object after failed rotation");
            }
            return Err(match e {
                StoreError::Conflict(_) => KmsError::FailedPrecondition(format!(
                    "key {} was rotated or scheduled for deletion meanwhile; retry",
                    key.key_id
                )),
                other => other.into(),
            });
        }
        self.inner.cache.invalidate(key.key_id);
        let updated = self
            .store()
            .get_key(key.key_id)
            .await?
            .ok_or_else(|| KmsError::NotFound(format!("key {} not found", key.key_id)))?;
        tracing::info!(key_id = %key.key_id, version = next, "key rotated");
        Ok((updated, version))
    }

    /// Destroys every version of a PENDING_DELETION key in the device, then marks the key
    /// DESTROYED. Safe to repeat after a crash at any point: objects already gone count as
    /// destroyed. Returns the destroyed versions.
    pub(crate) async fn destroy_key(
        &self,
        key: &KeyRecord,
    ) -> Result<(KeyRecord, Vec<u32>), KmsError> {
        if key.state != KeyState::PendingDeletion && key.state != KeyState::Destroyed {
            return Err(KmsError::Internal(format!(
                "destroy_key on a key in state {}",
                key.state.as_str()
            )));
        }
        let mut destroyed = Vec::new();
        for v in self.store().list_versions(key.key_id).await? {
            if v.state != VersionState::Destroyed {
                let backend_ref = v.backend_ref.clone();
                let gone = self
                    .blocking(move |b| match b.destroy_key_version(&backend_ref) {
                        Ok(()) | Err(crate::backend::BackendError::KeyNotFound(_)) => Ok(()),
                        Err(e) => Err(e.into()),
                    })
                    .await;
                gone?;
                self.store()
                    .set_version_state(key.key_id, v.version, VersionState::Destroyed)
                    .await?;
            }
            destroyed.push(v.version);
        }
        self.inner.cache.invalidate(key.key_id);
        if key.state == KeyState::Destroyed {
            return Ok((key.clone(), destroyed));
        }
        let tombstone = KeyRecord {
            state: KeyState::Destroyed,
            deletion_at_ms: Some(now_ms()),
            rotation_period_ms: None,
            next_rotation_ms: None,
            ..key.clone()
        };
        let saved = self.store().update_key(&tombstone, key.state).await?;
        self.inner.cache.invalidate(key.key_id);
        let saved = match saved {
            Some(k) => k,
            // Another node finished first.
            None => self
                .store()
                .get_key(key.key_id)
                .await?
                .filter(|k| k.state == KeyState::Destroyed)
                .ok_or_else(|| {
                    KmsError::FailedPrecondition(format!(
                        "key {} changed during destruction; retry",
                        key.key_id
                    ))
                })?,
        };
        tracing::info!(key_id = %key.key_id, versions = ?destroyed, "key destroyed");
        Ok((saved, destroyed))
    }

    pub(super) async fn handle_rotate_key(
        &self,
        req: pb::RotateKeyRequest,
        call: Call,
    ) -> Result<pb::RotateKeyResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::RotateKey, &call)
            .await?;
        let (updated, version) = self.rotate(&key).await?;
        call.key(key.key_id, Some(version.version));
        Ok(pb::RotateKeyResponse {
            new_version: Some(version_message(&version, updated.primary_version)),
            key: Some(metadata(&updated)),
        })
    }

    pub(super) async fn handle_list_key_versions(
        &self,
        req: pb::ListKeyVersionsRequest,
        call: Call,
    ) -> Result<pb::ListKeyVersionsResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::DescribeKey, &call)
            .await?;
        let versions = self.store().list_versions(key.key_id).await?;
        Ok(pb::ListKeyVersionsResponse {
            versions: versions
                .iter()
                .map(|v| version_message(v, key.primary_version))
                .collect(),
        })
    }

    pub(super) async fn handle_set_version_state(
        &self,
        key: &str,
        version: u32,
        enable: bool,
        call: Call,
    ) -> Result<pb::KeyVersion, KmsError> {
        let permission = if enable {
            Permission::EnableKey
        } else {
            Permission::DisableKey
        };
        let key = self.admin_target(key, permission, &call).await?;
        if version == 0 {
            return Err(KmsError::invalid("version must be at least 1"));
        }
        call.key(key.key_id, Some(version));
        Self::require_not_deleted(&key)?;
        let current = self
            .store()
            .get_version(key.key_id, version)
            .await?
            .ok_or_else(|| {
                KmsError::NotFound(format!("key {} has no version {version}", key.key_id))
            })?;
        if current.state == VersionState::Destroyed {
            return Err(KmsError::FailedPrecondition(format!(
                "version {version} of key {} is destroyed",
                key.key_id
            )));
        }
        if !enable && version == key.primary_version {
            return Err(KmsError::FailedPrecondition(format!(
                "version {version} is the primary version of key {}; rotate the key first",
                key.key_id
            )));
        }
        let state = if enable {
            VersionState::Enabled
        } else {
            VersionState::Disabled
        };
        let saved = self
            .store()
            .set_version_state(key.key_id, version, state)
            .await?
            .ok_or_else(|| KmsError::NotFound(format!("key {} version {version}", key.key_id)))?;
        self.inner.cache.invalidate(key.key_id);
        tracing::info!(key_id = %key.key_id, version, state = state.as_str(), "key version state changed");
        Ok(version_message(&saved, key.primary_version))
    }

    pub(super) async fn handle_set_rotation_period(
        &self,
        req: pb::SetKeyRotationPeriodRequest,
        call: Call,
    ) -> Result<pb::SetKeyRotationPeriodResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::ConfigureKey, &call)
            .await?;
        let period = self.rotation_period(req.rotation_period_seconds)?;
        Self::require_not_deleted(&key)?;
        let updated = KeyRecord {
            rotation_period_ms: period,
            next_rotation_ms: period.map(|p| now_ms().saturating_add(p)),
            ..key.clone()
        };
        let saved = self.swap_key(&key, updated).await?;
        call.detail(format!("rotation period {} s", req.rotation_period_seconds));
        Ok(pb::SetKeyRotationPeriodResponse {
            key: Some(metadata(&saved)),
        })
    }

    /// A requested rotation period in ms (`None` for 0), within the configured bounds.
    pub(super) fn rotation_period(&self, secs: u64) -> Result<Option<i64>, KmsError> {
        if secs == 0 {
            return Ok(None);
        }
        let min = self.inner.lifecycle.min_rotation_period_secs;
        if secs < min || secs > MAX_ROTATION_PERIOD_SECS {
            return Err(KmsError::invalid(format!(
                "rotation_period_seconds must be 0 (none) or between {min} and {MAX_ROTATION_PERIOD_SECS}"
            )));
        }
        Ok(Some(millis(secs)))
    }

    pub(super) async fn handle_set_min_decryption_version(
        &self,
        req: pb::SetMinDecryptionVersionRequest,
        call: Call,
    ) -> Result<pb::SetMinDecryptionVersionResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::ConfigureKey, &call)
            .await?;
        let min = req.min_decryption_version;
        if min == 0 {
            return Err(KmsError::invalid(
                "min_decryption_version must be at least 1",
            ));
        }
        Self::require_not_deleted(&key)?;
        if min > key.primary_version {
            return Err(KmsError::FailedPrecondition(format!(
                "min_decryption_version {min} is above the primary version {} of key {}",
                key.primary_version, key.key_id
            )));
        }
        let updated = KeyRecord {
            min_decryption_version: min,
            ..key.clone()
        };
        let saved = self.swap_key(&key, updated).await?;
        call.detail(format!("min decryption version {min}"));
        Ok(pb::SetMinDecryptionVersionResponse {
            key: Some(metadata(&saved)),
        })
    }

    pub(super) async fn handle_schedule_deletion(
        &self,
        req: pb::ScheduleKeyDeletionRequest,
        call: Call,
    ) -> Result<pb::ScheduleKeyDeletionResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::ScheduleKeyDeletion, &call)
            .await?;
        let max = MAX_DELETION_WAITING.as_secs();
        let min = self.inner.lifecycle.min_deletion_waiting_secs.min(max);
        let wait = match req.waiting_period_seconds {
            0 => max,
            w if (min..=max).contains(&w) => w,
            _ => {
                return Err(KmsError::invalid(format!(
                    "waiting_period_seconds must be 0 (30 days) or between {min} and {max}"
                )))
            }
        };
        let saved = match key.state {
            // A repeat keeps the first date (idempotent).
            KeyState::PendingDeletion => key,
            KeyState::Destroyed => {
                return Err(KmsError::FailedPrecondition(format!(
                    "key {} is already destroyed",
                    key.key_id
                )))
            }
            KeyState::Enabled | KeyState::Disabled => {
                let updated = KeyRecord {
                    state: KeyState::PendingDeletion,
                    deletion_at_ms: Some(now_ms().saturating_add(millis(wait))),
                    ..key.clone()
                };
                self.swap_key(&key, updated).await?
            }
        };
        call.detail(format!(
            "destruction at {} ms",
            saved.deletion_at_ms.unwrap_or_default()
        ));
        Ok(pb::ScheduleKeyDeletionResponse {
            key: Some(metadata(&saved)),
        })
    }

    pub(super) async fn handle_cancel_deletion(
        &self,
        req: pb::CancelKeyDeletionRequest,
        call: Call,
    ) -> Result<pb::CancelKeyDeletionResponse, KmsError> {
        let key = self
            .admin_target(&req.key, Permission::CancelKeyDeletion, &call)
            .await?;
        if key.state != KeyState::PendingDeletion {
            return Err(KmsError::FailedPrecondition(format!(
                "key {} is {}, not pending deletion",
                key.key_id,
                key.state.as_str()
            )));
        }
        // Like AWS KMS: the key comes back disabled; enabling it is a separate, audited step.
        let updated = KeyRecord {
            state: KeyState::Disabled,
            deletion_at_ms: None,
            ..key.clone()
        };
        let saved = self.swap_key(&key, updated).await?;
        Ok(pb::CancelKeyDeletionResponse {
            key: Some(metadata(&saved)),
        })
    }

    pub(super) async fn handle_erase_key(
        &self,
        req: pb::EraseKeyRequest,
        call: Call,
    ) -> Result<pb::EraseKeyResponse, KmsError> {
        if req.reason.is_empty() || req.reason.len() > 1024 {
            return Err(KmsError::invalid("reason must be 1-1024 bytes"));
        }
        let subject = EncryptionContext::from_wire(&req.subject)
            .map_err(|e| KmsError::invalid(format!("subject: {e}")))?;
        call.context(&subject);
        let key = self
            .admin_target(&req.key, Permission::EraseKey, &call)
            .await?;
        // First make the key unusable everywhere (and refuse new versions), then destroy.
        let key = match key.state {
            KeyState::Enabled | KeyState::Disabled => {
                let updated = KeyRecord {
                    state: KeyState::PendingDeletion,
                    deletion_at_ms: Some(now_ms()),
                    ..key.clone()
                };
                self.swap_key(&key, updated).await?
            }
            KeyState::PendingDeletion | KeyState::Destroyed => key,
        };
        let (destroyed, versions) = self.destroy_key(&key).await?;
        let receipt = self
            .signed_receipt(&destroyed, versions, &req.reason, &subject, &call)
            .await?;
        call.detail(format!(
            "erased; reason: {}",
            req.reason.chars().take(200).collect::<String>()
        ));
        Ok(receipt)
    }

    async fn signed_receipt(
        &self,
        key: &KeyRecord,
        destroyed_versions: Vec<u32>,
        reason: &str,
        subject: &EncryptionContext,
        call: &Call,
    ) -> Result<pb::EraseKeyResponse, KmsError> {
        let fingerprint = self.inner.audit.public_key().fingerprint().to_string();
        let receipt = ErasureReceipt {
            kind: ERASURE_RECEIPT_TYPE.to_string(),
            key_id: key.key_id.to_string(),
            alias: key.alias.clone().unwrap_or_default(),
            destroyed_versions,
            subject: subject.pairs().clone(),
            reason: reason.to_string(),
            requested_by: call
                .identity
                .as_ref()
                .map(|i| i.name.clone())
                .unwrap_or_default(),
            request_id: call.request_id.clone(),
            erased_at_unix_ms: key.deletion_at_ms.unwrap_or_else(now_ms),
            backend: key.backend.clone(),
            signing_key_fingerprint: fingerprint.clone(),
        };
        let bytes = receipt
            .to_bytes()
            .map_err(|e| KmsError::Internal(e.to_string()))?;
        let digest = ErasureReceipt::digest(&bytes);
        let signature = self
            .blocking(move |b| Ok(b.sign_audit_digest(&digest)?))
            .await?;
        Ok(pb::EraseKeyResponse {
            key: Some(metadata(key)),
            receipt: bytes,
            receipt_signature: signature,
            signing_key_fingerprint: fingerprint,
        })
    }
}
