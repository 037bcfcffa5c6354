//! The per-client key hierarchy: every client of a site has its own KMS master key (alias from
//! `kms.client_key_alias`, by default `{kms_key}/clients/{client}`), under which the data key
//! of each of its note revisions is wrapped. Erasing the client destroys that one key in the
//! HSM, which makes every copy of the client's wrapped data keys useless, backups included.
//!
//! ```text
//!   HSM master key "notes/site-a/clients/c-1"  (one per client, destroyed on erasure)
//!     └─ wraps: data key of (site, client, note, revision)   (one per revision, in the DB)
//!          └─ AES-256-GCM: body and reason of that revision   (in the DB)
//! ```
//!
//! The key is created on the client's first note: `CreateKey`, or `DescribeKey` when a
//! concurrent writer (or a crash after creation) got there first; recorded in `client_keys`
//! (the first recorded key wins) and cached in memory. Writes for a client whose erasure has
//! begun are refused here and again inside the writing transaction (`store`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::error::NotesError;
use crate::kms::Kms;
use crate::store::{ClientState, NoteStore};

/// Resolves (and creates) client keys. Cheap to clone.
#[derive(Clone)]
pub struct ClientKeys {
    kms: Kms,
    store: Arc<dyn NoteStore>,
    cfg: Arc<Config>,
    /// (site, client) → KMS key id, for ACTIVE clients only.
    cache: Arc<Mutex<HashMap<(String, String), String>>>,
}

impl ClientKeys {
    pub fn new(kms: Kms, store: Arc<dyn NoteStore>, cfg: Arc<Config>) -> Self {
        ClientKeys {
            kms,
            store,
            cfg,
            cache: Arc::default(),
        }
    }

    /// The KMS key id new revisions of `client` at `site` are wrapped under, creating the key
    /// on first use. FAILED_PRECONDITION once the client's erasure has begun.
    pub async fn key_for_write(&self, site: &str, client: &str) -> Result<String, NotesError> {
        let slot = (site.to_string(), client.to_string());
        if let Some(id) = self.cached(&slot) {
            return Ok(id);
        }
        let row = self.store.client_key(site, client).await?;
        if let Some(row) = &row {
            if row.state != ClientState::Active {
                return Err(erased(row.state));
            }
            if let Some(id) = &row.kms_key_id {
                self.remember(slot, id);
                return Ok(id.clone());
            }
        }
        let alias = self.alias(site, client);
        let key = self
            .kms
            .create_or_find_key(
                &alias,
                &owner_description(site, client),
                self.cfg.kms.client_key_rotation_period_secs,
            )
            .await?;
        let row = self
            .store
            .record_client_key(site, client, &key.key_id, crate::service::now_ms())
            .await?;
        if row.state != ClientState::Active {
            return Err(erased(row.state));
        }
        let id = row
            .kms_key_id
            .ok_or_else(|| NotesError::Internal("client key was not recorded".into()))?;
        if id != key.key_id {
            tracing::warn!(site, client, recorded = %id, created = %key.key_id,
                "client already had another KMS key recorded; using the recorded one");
        } else {
            tracing::info!(site, client, kms_key_id = %id, "client key ready");
        }
        self.remember(slot, &id);
        Ok(id)
    }

    /// The alias of the client's KMS key.
    pub fn alias(&self, site: &str, client: &str) -> String {
        self.cfg.client_key_alias(site, client)
    }

    /// Drops the cached key of a client (its erasure begins).
    pub fn forget(&self, site: &str, client: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&(site.to_string(), client.to_string()));
        }
    }

    fn cached(&self, slot: &(String, String)) -> Option<String> {
        self.cache.lock().ok().and_then(|c| c.get(slot).cloned())
    }

    fn remember(&self, slot: (String, String), id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(slot, id.to_string());
        }
    }
}

/// The description of a client key: names its (site, client), checked when the alias exists.
pub fn owner_description(site: &str, client: &str) -> String {
    format!("notes-store client key (crypto-shredding): site={site} client={client}")
}

fn erased(state: ClientState) -> NotesError {
    NotesError::FailedPrecondition(format!(
        "the client is {}: its notes were erased and no new ones are accepted",
        state.as_str()
    ))
}
