//! notes-store's use of the KMS, through kms-client with notes-store's own client certificate:
//! a fresh data key per revision (`GenerateDataKeys`, under the client's own key) and an unwrap
//! per read (`BatchDecrypt` items, each with its reader's audit metadata), each gathered with
//! the other requests of its kind in flight by `crate::kms_batch`. No data-key cache: every
//! read asks the KMS. Client keys are created here (`CreateKey`, custodian role) and destroyed on
//! erasure (`EraseKey`); `crate::client_keys` decides when.
//!
//! The client connects lazily and reconnects by itself, so a KMS that was down serves again as
//! soon as it is back, without restarting notes-store.

use std::collections::BTreeMap;

use kms_client::{
    AuditMetadata, Code, ErasureReceipt, KeyMetadata, KeyState, KmsClient, KmsClientConfig,
    Zeroizing,
};

use crate::config::Config;
use crate::crypto::{RevisionIds, DATA_KEY_LEN};
use crate::error::{KmsCall, NotesError};
use crate::kms_batch::{self, DataKeyBatcher, DataKeyWanted, UnwrapBatcher, UnwrapWanted};

/// A plaintext data key (zeroized on drop) and its wrapped form.
pub struct DataKey {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub wrapped: Vec<u8>,
    pub kms_key_id: String,
    pub kms_key_version: u32,
}

/// The KMS as notes-store uses it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Kms {
    client: KmsClient,
    data_keys: DataKeyBatcher,
    unwraps: UnwrapBatcher,
    key: String,
}

impl Kms {
    /// Builds the client from the `[kms]` section. Does not connect. Needs a Tokio runtime.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let k = &cfg.kms;
        let mut client_cfg =
            KmsClientConfig::from_files(k.endpoints.clone(), &k.ca, &k.client_cert, &k.client_key)?;
        client_cfg.server_name = k.server_name.clone();
        client_cfg.request_timeout = cfg.kms_request_timeout();
        client_cfg.connect_timeout = cfg.kms_connect_timeout();
        client_cfg.max_retries = k.max_retries;
        let client = KmsClient::new(&client_cfg)?;
        Ok(Kms {
            data_keys: kms_batch::data_keys(client.clone(), k.data_key_calls_in_flight),
            unwraps: kms_batch::unwraps(client.clone(), k.decrypt_calls_in_flight),
            client,
            key: k.kms_key.clone(),
        })
    }

    /// A fresh data key for one revision under `key` (the client's key id), bound by the KMS
    /// to the revision's ids. Asked for together with the other writes in flight
    /// (`crate::kms_batch`).
    pub async fn data_key(&self, key: &str, ids: &RevisionIds<'_>) -> Result<DataKey, NotesError> {
        let dk = self
            .data_keys
            .ask(DataKeyWanted {
                key: key.to_string(),
                context: ids.kms_context(),
            })
            .await?;
        if dk.plaintext.len() != DATA_KEY_LEN {
            return Err(NotesError::Internal(format!(
                "the KMS returned a data key of {} bytes",
                dk.plaintext.len()
            )));
        }
        Ok(DataKey {
            plaintext: dk.plaintext,
            wrapped: dk.ciphertext_blob,
            kms_key_id: dk.key_id,
            kms_key_version: dk.key_version,
        })
    }

    /// Unwraps a revision's data key. The KMS refuses a blob that was not made for exactly
    /// these ids (→ `Integrity`); a blob from another key than the record says is refused here.
    /// Asked for together with the other reads in flight (`crate::kms_batch`).
    pub async fn unwrap(
        &self,
        wrapped: &[u8],
        expected_key_id: &str,
        ids: &RevisionIds<'_>,
        audit: AuditMetadata,
    ) -> Result<Zeroizing<Vec<u8>>, NotesError> {
        let out = self
            .unwraps
            .ask(UnwrapWanted {
                blob: wrapped.to_vec(),
                context: ids.kms_context(),
                audit,
            })
            .await?;
        if out.key_id != expected_key_id {
            return Err(NotesError::integrity(format!(
                "wrapped key is under KMS key {}, the record says {expected_key_id}",
                out.key_id
            )));
        }
        if out.plaintext.len() != DATA_KEY_LEN {
            return Err(NotesError::integrity(format!(
                "unwrapped data key has {} bytes",
                out.plaintext.len()
            )));
        }
        Ok(out.plaintext)
    }

    /// Creates the key `alias` or, if it exists already (a concurrent creator, or a crash
    /// between creation and recording), describes it; `description` names the owner and must
    /// match. A key that can no longer be used (erased, pending deletion) is refused: its
    /// client was erased.
    pub async fn create_or_find_key(
        &self,
        alias: &str,
        description: &str,
        rotation_period_seconds: u64,
    ) -> Result<KeyMetadata, NotesError> {
        let created = self
            .client
            .create_key_with_rotation(Some(alias), Some(description), rotation_period_seconds)
            .await;
        let key = match created {
            Ok(key) => key,
            Err(e) if e.code() == Some(Code::AlreadyExists) => {
                let key = self
                    .client
                    .describe_key(alias)
                    .await
                    .map_err(|e| NotesError::from_kms(KmsCall::ClientKey, e))?;
                // Two (site, client) pairs must never share a key: erasing one would erase
                // both. The description names the owner; a mismatch is a misconfiguration
                // (a notes-store serving several sites without {site} in client_key_alias).
                if key.description != description {
                    return Err(NotesError::FailedPrecondition(format!(
                        "KMS key {alias} belongs to another site or client ({:?}); include \
                         {{site}} in kms.client_key_alias",
                        key.description
                    )));
                }
                key
            }
            Err(e) => return Err(NotesError::from_kms(KmsCall::ClientKey, e)),
        };
        match key.state {
            KeyState::Enabled => Ok(key),
            KeyState::Destroyed | KeyState::PendingDeletion => Err(NotesError::FailedPrecondition(
                "the client's KMS key was erased: no new notes for this client".to_string(),
            )),
            other => Err(NotesError::FailedPrecondition(format!(
                "the client's KMS key is {other}"
            ))),
        }
    }

    /// Destroys `key` (crypto-shredding) with `reason` and `subject` recorded in the signed
    /// receipt. Idempotent on the KMS side.
    pub async fn erase_key(
        &self,
        key: &str,
        reason: &str,
        subject: &BTreeMap<String, String>,
    ) -> Result<ErasureReceipt, NotesError> {
        self.client
            .erase_key(key, reason, subject)
            .await
            .map_err(|e| NotesError::from_kms(KmsCall::EraseKey, e))
    }

    /// The underlying client (re-wrap campaigns use it directly).
    pub fn client(&self) -> &KmsClient {
        &self.client
    }

    /// Whether the configured key can be described (health).
    pub async fn check(&self) -> Result<(), kms_client::Error> {
        self.client.describe_key(&self.key).await.map(|_| ())
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}
