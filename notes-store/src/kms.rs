//! notes-store's use of the KMS, through kms-client with notes-store's own client certificate:
//! a fresh data key per revision (`GenerateDataKey`) and an unwrap per read (`Decrypt`, with
//! the reader's audit metadata). No data-key cache: every read asks the KMS.
//!
//! The client connects lazily and reconnects by itself, so a KMS that was down serves again as
//! soon as it is back, without restarting notes-store.

use kms_client::{AuditMetadata, KmsClient, KmsClientConfig, Zeroizing};

use crate::config::Config;
use crate::crypto::{RevisionIds, DATA_KEY_LEN};
use crate::error::{KmsCall, NotesError};

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
        Ok(Kms {
            client: KmsClient::new(&client_cfg)?,
            key: k.kms_key.clone(),
        })
    }

    /// A fresh data key for one revision, bound by the KMS to the revision's ids.
    pub async fn data_key(&self, ids: &RevisionIds<'_>) -> Result<DataKey, NotesError> {
        let dk = self
            .client
            .generate_data_key(&self.key, &ids.kms_context())
            .await
            .map_err(|e| NotesError::from_kms(KmsCall::GenerateDataKey, e))?;
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
    pub async fn unwrap(
        &self,
        wrapped: &[u8],
        expected_key_id: &str,
        ids: &RevisionIds<'_>,
        audit: AuditMetadata,
    ) -> Result<Zeroizing<Vec<u8>>, NotesError> {
        let out = self
            .client
            .decrypt(wrapped, &ids.kms_context(), Some(audit))
            .await
            .map_err(|e| NotesError::from_kms(KmsCall::Decrypt, e))?;
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

    /// Whether the configured key can be described (health).
    pub async fn check(&self) -> Result<(), kms_client::Error> {
        self.client.describe_key(&self.key).await.map(|_| ())
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}
