//! EraseClient (crypto-shredding), PlaceLegalHold, LiftLegalHold, GetClientStatus.
//!
//! Privileged: besides acting for the site, the caller's `[[callers]]` entry needs `may_erase`
//! (erasure) or `may_hold` (holds); status needs either. Otherwise PERMISSION_DENIED, before
//! anything is read or changed.
//!
//! Erasure, every step repeatable (an interrupted erasure is finished by asking again):
//! 1. `begin_erasure`: FAILED_PRECONDITION under a legal hold; ACTIVE → ERASING, from which
//!    point every new note or amendment of the client is refused (inside its transaction);
//! 2. KMS `EraseKey` on the client's key (idempotent; audited by the KMS; returns a receipt
//!    signed with the audit key, subject {site, client});
//! 3. `finish_erasure`: one transaction deletes the client's notes and revisions (ciphertext
//!    hygiene: the live database keeps nothing of them) and stores the receipt (ERASED).
//!
//! Copies of the database taken before step 2 still hold the rows, but their data keys are
//! wrapped under a key the HSM no longer has: the KMS refuses them (FAILED_PRECONDITION).

use std::collections::BTreeMap;

use kms_proto::notes::v1 as pb;

use super::{now_ms, validate, Caller, NotesServiceImpl};
use crate::callers::Privilege;
use crate::error::NotesError;
use crate::store::{ClientKeyRecord, ClientState, ErasureRecord};

/// Longest erasure or hold reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

impl NotesServiceImpl {
    pub(super) async fn handle_erase(
        &self,
        req: pb::EraseClientRequest,
        caller: Caller,
    ) -> Result<pb::EraseClientResponse, NotesError> {
        validate::id("site_id", &req.site_id)?;
        validate::id("client_id", &req.client_id)?;
        short_reason(&req.reason)?;
        self.authorize_privileged(&caller, &req.site_id, Privilege::Erase)?;
        let (site, client) = (req.site_id.as_str(), req.client_id.as_str());

        let row = self
            .store()
            .begin_erasure(site, client, &req.reason, now_ms())
            .await?;
        self.inner.client_keys.forget(site, client);
        if row.state == ClientState::Erased {
            tracing::info!(
                site,
                client,
                "erasure repeated: returning the stored receipt"
            );
            return Ok(pb::EraseClientResponse {
                receipt: Some(receipt_of(&row)?),
            });
        }
        tracing::info!(
            site,
            client,
            "client erasure begun: writes refused from now on"
        );

        let subject = BTreeMap::from([
            ("site".to_string(), site.to_string()),
            ("client".to_string(), client.to_string()),
        ]);
        let erasure = match &row.kms_key_id {
            Some(key_id) => {
                let r = self.kms().erase_key(key_id, &req.reason, &subject).await?;
                let parsed: kms_client::kms_audit::ErasureReceipt =
                    serde_json::from_slice(&r.receipt).map_err(|e| {
                        NotesError::Internal(format!("unreadable KMS erasure receipt: {e}"))
                    })?;
                if parsed.key_id != *key_id || r.key.key_id != *key_id {
                    return Err(NotesError::Internal(format!(
                        "EraseKey receipt names key {}, expected {key_id}",
                        parsed.key_id
                    )));
                }
                ErasureRecord {
                    erased_at_ms: parsed.erased_at_unix_ms,
                    reason: req.reason.clone(),
                    receipt: r.receipt,
                    receipt_signature: r.signature,
                    receipt_fingerprint: r.signing_key_fingerprint,
                    ..ErasureRecord::default()
                }
            }
            // No key was ever recorded: the client had no note (a key created by a writer that
            // crashed before recording it is erased too, found by its alias).
            None => {
                self.erase_unrecorded_key(site, client, &req.reason, &subject)
                    .await?
            }
        };
        let row = self.store().finish_erasure(site, client, &erasure).await?;
        let receipt = receipt_of(&row)?;
        tracing::info!(
            site,
            client,
            kms_key_id = %receipt.kms_key_id,
            destroyed_versions = ?receipt.destroyed_versions,
            notes = receipt.notes_erased,
            revisions = receipt.revisions_erased,
            "client erased (KMS key destroyed, rows deleted)"
        );
        Ok(pb::EraseClientResponse {
            receipt: Some(receipt),
        })
    }

    /// Erases the key named by the client's alias if the KMS has one; no key at all is an
    /// erasure with nothing to destroy (an empty KMS receipt).
    async fn erase_unrecorded_key(
        &self,
        site: &str,
        client: &str,
        reason: &str,
        subject: &BTreeMap<String, String>,
    ) -> Result<ErasureRecord, NotesError> {
        let alias = self.inner.client_keys.alias(site, client);
        let exists = self.kms().client().describe_key(&alias).await;
        let nothing = ErasureRecord {
            erased_at_ms: now_ms(),
            reason: reason.to_string(),
            ..ErasureRecord::default()
        };
        match exists {
            Err(e) if e.code() == Some(kms_client::Code::NotFound) => Ok(nothing),
            Err(e) => Err(NotesError::from_kms(crate::error::KmsCall::ClientKey, e)),
            Ok(key) => {
                let r = self.kms().erase_key(&key.key_id, reason, subject).await?;
                let parsed: kms_client::kms_audit::ErasureReceipt =
                    serde_json::from_slice(&r.receipt).map_err(|e| {
                        NotesError::Internal(format!("unreadable KMS erasure receipt: {e}"))
                    })?;
                Ok(ErasureRecord {
                    erased_at_ms: parsed.erased_at_unix_ms,
                    receipt: r.receipt,
                    receipt_signature: r.signature,
                    receipt_fingerprint: r.signing_key_fingerprint,
                    ..nothing
                })
            }
        }
    }

    pub(super) async fn handle_hold(
        &self,
        site: String,
        client: String,
        reason: Option<String>,
        caller: Caller,
    ) -> Result<pb::ClientStatus, NotesError> {
        validate::id("site_id", &site)?;
        validate::id("client_id", &client)?;
        if let Some(reason) = &reason {
            short_reason(reason)?;
        }
        self.authorize_privileged(&caller, &site, Privilege::Hold)?;
        let row = self
            .store()
            .set_legal_hold(&site, &client, reason.as_deref(), now_ms())
            .await?;
        tracing::info!(site, client, hold = reason.is_some(), "legal hold changed");
        self.status_of(row).await
    }

    pub(super) async fn handle_status(
        &self,
        req: pb::GetClientStatusRequest,
        caller: Caller,
    ) -> Result<pb::ClientStatus, NotesError> {
        validate::id("site_id", &req.site_id)?;
        validate::id("client_id", &req.client_id)?;
        if self
            .authorize_privileged(&caller, &req.site_id, Privilege::Hold)
            .is_err()
        {
            self.authorize_privileged(&caller, &req.site_id, Privilege::Erase)?;
        }
        match self
            .store()
            .client_key(&req.site_id, &req.client_id)
            .await?
        {
            Some(row) => self.status_of(row).await,
            None => {
                let (notes, revisions) = self
                    .store()
                    .count_client_notes(&req.site_id, &req.client_id)
                    .await?;
                Ok(pb::ClientStatus {
                    site_id: req.site_id,
                    client_id: req.client_id,
                    state: pb::ClientState::Active as i32,
                    notes,
                    revisions,
                    ..Default::default()
                })
            }
        }
    }

    async fn status_of(&self, row: ClientKeyRecord) -> Result<pb::ClientStatus, NotesError> {
        let (notes, revisions) = self
            .store()
            .count_client_notes(&row.site_id, &row.client_id)
            .await?;
        let erasure = match row.state {
            ClientState::Erased => Some(receipt_of(&row)?),
            _ => None,
        };
        Ok(pb::ClientStatus {
            state: match row.state {
                ClientState::Active => pb::ClientState::Active,
                ClientState::Erasing => pb::ClientState::Erasing,
                ClientState::Erased => pb::ClientState::Erased,
            } as i32,
            kms_key_id: row.kms_key_id.clone().unwrap_or_default(),
            legal_hold: row.legal_hold.is_some(),
            legal_hold_reason: row
                .legal_hold
                .as_ref()
                .map(|h| h.reason.clone())
                .unwrap_or_default(),
            legal_hold_since_unix_ms: row.legal_hold.as_ref().map_or(0, |h| h.placed_at_ms),
            notes,
            revisions,
            erasure,
            site_id: row.site_id,
            client_id: row.client_id,
        })
    }

    fn authorize_privileged(
        &self,
        caller: &Caller,
        site: &str,
        privilege: Privilege,
    ) -> Result<(), NotesError> {
        self.inner
            .callers
            .authorize_privileged(caller.as_ref(), site, privilege)
    }
}

/// The notes-store receipt of an ERASED row.
fn receipt_of(row: &ClientKeyRecord) -> Result<pb::ErasureReceipt, NotesError> {
    let e = row
        .erasure
        .as_ref()
        .ok_or_else(|| NotesError::Internal("erased client without its erasure record".into()))?;
    let kms = if e.receipt.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice::<kms_client::kms_audit::ErasureReceipt>(&e.receipt)
                .map_err(|err| NotesError::Internal(format!("stored receipt unreadable: {err}")))?,
        )
    };
    let kms_key_id = match (&row.kms_key_id, &kms) {
        (Some(id), _) => id.clone(),
        (None, Some(k)) => k.key_id.clone(),
        (None, None) => String::new(),
    };
    let destroyed_versions = kms.map(|k| k.destroyed_versions).unwrap_or_default();
    Ok(pb::ErasureReceipt {
        site_id: row.site_id.clone(),
        client_id: row.client_id.clone(),
        erased_at_unix_ms: e.erased_at_ms,
        reason: row.erasure_reason.clone().unwrap_or_default(),
        notes_erased: e.notes_erased,
        revisions_erased: e.revisions_erased,
        kms_key_id,
        destroyed_versions,
        kms_receipt: e.receipt.clone(),
        kms_receipt_signature: e.receipt_signature.clone(),
        signing_key_fingerprint: e.receipt_fingerprint.clone(),
    })
}

/// An erasure or hold reason: 1-1024 bytes, no control characters.
fn short_reason(reason: &str) -> Result<(), NotesError> {
    if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
        return Err(NotesError::invalid(format!(
            "reason must be 1-{MAX_REASON_BYTES} bytes"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(NotesError::invalid(
            "reason must not contain control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert!(short_reason("ticket DSR-1042").is_ok());
        assert!(short_reason("").is_err());
        assert!(short_reason(&"x".repeat(MAX_REASON_BYTES + 1)).is_err());
        assert!(short_reason("a\nb").is_err());
    }
}
