//! Key administration handlers: create, describe, list, enable, disable.

use kms_proto::kms::v1 as pb;
use uuid::Uuid;

use super::validate::{self, KeyRef};
use super::{metadata, Call, KmsService};
use crate::context::EncryptionContext;
use crate::error::KmsError;
use crate::policy::Permission;
use crate::store::{KeyRecord, KeyState, KeyVersionRecord, VersionState};

/// The backend object name of a key version. Not secret; unique per key and version.
pub(crate) fn version_object_name(key_id: Uuid, version: u32) -> String {
    format!("kms:{key_id}:v{version}")
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl KmsService {
    pub(super) async fn handle_create_key(
        &self,
        req: pb::CreateKeyRequest,
        call: Call,
    ) -> Result<pb::CreateKeyResponse, KmsError> {
        let alias = if req.alias.is_empty() {
            None
        } else {
            validate::alias("alias", &req.alias)?;
            Some(req.alias)
        };
        validate::description(&req.description)?;
        let rotation_period_ms = self.rotation_period(req.rotation_period_seconds)?;
        let key_id = Uuid::new_v4();
        // CreateKey is authorized on the key to be: its alias (or new id) must be covered by
        // one of the caller's rules. Not being covered is a plain refusal here, not NOT_FOUND.
        let planned = KeyRecord {
            key_id,
            alias: alias.clone(),
            description: String::new(),
            state: KeyState::Enabled,
            primary_version: 1,
            created_at_ms: 0,
            backend: String::new(),
            rotation_period_ms: None,
            next_rotation_ms: None,
            min_decryption_version: 1,
            deletion_at_ms: None,
        };
        let named = KeyRef::Id(key_id);
        self.authorize(
            &call,
            Permission::CreateKey,
            Some((&planned, &named)),
            &EncryptionContext::default(),
        )
        .map_err(|e| match e {
            KmsError::NotFound(_) => {
                KmsError::PermissionDenied("missing permission kms:CreateKey".into())
            }
            other => other,
        })?;
        if let Some(a) = &alias {
            if self.store().get_key_by_alias(a).await?.is_some() {
                return Err(KmsError::AlreadyExists(format!(
                    "alias {a:?} is already in use"
                )));
            }
        }
        call.key(key_id, Some(1));
        let name = version_object_name(key_id, 1);
        let backend_ref = self
            .blocking(move |b| Ok(b.create_key_version(&name)?))
            .await?;
        let now = now_ms();
        let key = KeyRecord {
            key_id,
            alias,
            description: req.description,
            state: KeyState::Enabled,
            primary_version: 1,
            created_at_ms: now,
            backend: self.inner.backend.kind().to_string(),
            rotation_period_ms,
            next_rotation_ms: rotation_period_ms.map(|p| now.saturating_add(p)),
            min_decryption_version: 1,
            deletion_at_ms: None,
        };
        let version = KeyVersionRecord {
            key_id,
            version: 1,
            backend_ref: backend_ref.clone(),
            state: VersionState::Enabled,
            created_at_ms: now,
        };
        if let Err(e) = self.store().insert_key(&key, &version).await {
            // Do not leave an orphaned master key in the HSM.
            let cleanup = self
                .blocking(move |b| Ok(b.destroy_key_version(&backend_ref)?))
                .await;
            if let Err(c) = cleanup {
                tracing::warn!(key_id = %key_id, error = %c, "could not remove HSM object after failed insert");
            }
            return Err(e.into());
        }
        tracing::info!(key_id = %key_id, "key created");
        Ok(pb::CreateKeyResponse {
            key: Some(metadata(&key)),
        })
    }

    pub(super) async fn handle_describe_key(
        &self,
        req: pb::DescribeKeyRequest,
        call: Call,
    ) -> Result<pb::DescribeKeyResponse, KmsError> {
        let key_ref = validate::key_ref("key", &req.key)?;
        // Administrative reads go to the database so they show the latest state.
        let key = self.resolve_uncached(&key_ref).await?;
        call.key(key.key_id, None);
        self.authorize(
            &call,
            Permission::DescribeKey,
            Some((&key, &key_ref)),
            &EncryptionContext::default(),
        )?;
        Ok(pb::DescribeKeyResponse {
            key: Some(metadata(&key)),
        })
    }

    /// Key-admins and auditors list every key; services are refused (they name the keys they
    /// use, and a list would tell them which other keys exist).
    pub(super) async fn handle_list_keys(
        &self,
        req: pb::ListKeysRequest,
        call: Call,
    ) -> Result<pb::ListKeysResponse, KmsError> {
        let limit = validate::page_size(req.page_size)?;
        let after = validate::decode_page_token(&req.page_token)?;
        self.authorize(
            &call,
            Permission::ListKeys,
            None,
            &EncryptionContext::default(),
        )?;
        // One extra row tells whether another page exists.
        let mut keys = self.store().list_keys(after, limit + 1).await?;
        let more = keys.len() > limit as usize;
        keys.truncate(limit as usize);
        let next_page_token = match (more, keys.last()) {
            (true, Some(last)) => validate::encode_page_token(last.key_id),
            _ => String::new(),
        };
        Ok(pb::ListKeysResponse {
            keys: keys.iter().map(metadata).collect(),
            next_page_token,
        })
    }

    pub(super) async fn handle_set_state(
        &self,
        key: &str,
        state: KeyState,
        permission: Permission,
        call: Call,
    ) -> Result<pb::KeyMetadata, KmsError> {
        let key_ref = validate::key_ref("key", key)?;
        let current = self.resolve_uncached(&key_ref).await?;
        call.key(current.key_id, None);
        self.authorize(
            &call,
            permission,
            Some((&current, &key_ref)),
            &EncryptionContext::default(),
        )?;
        match current.state {
            KeyState::PendingDeletion => {
                return Err(KmsError::FailedPrecondition(format!(
                    "key {} is pending deletion; cancel the deletion first",
                    current.key_id
                )))
            }
            KeyState::Destroyed => {
                return Err(KmsError::FailedPrecondition(format!(
                    "key {} is destroyed",
                    current.key_id
                )))
            }
            KeyState::Enabled | KeyState::Disabled => {}
        }
        // Compare and swap on the state read above: a concurrent ScheduleKeyDeletion wins.
        let updated = self
            .store()
            .update_key(
                &KeyRecord {
                    state,
                    ..current.clone()
                },
                current.state,
            )
            .await?
            .ok_or_else(|| {
                KmsError::FailedPrecondition(format!(
                    "key {} changed while this request ran; retry",
                    current.key_id
                ))
            })?;
        self.inner.cache.invalidate(updated.key_id);
        tracing::info!(key_id = %updated.key_id, state = state.as_str(), "key state changed");
        Ok(metadata(&updated))
    }

    pub(super) async fn resolve_uncached(&self, key: &KeyRef) -> Result<KeyRecord, KmsError> {
        let found = match key {
            KeyRef::Id(id) => self.store().get_key(*id).await?,
            KeyRef::Alias(a) => self.store().get_key_by_alias(a).await?,
        };
        found.ok_or_else(|| validate::not_found(key))
    }
}
