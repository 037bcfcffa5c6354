//! GetNote (decrypts: every call asks the KMS), ListNotes and GetNoteHistory (metadata only).
//!
//! A read names the acting user and the purpose of use. Both go to the KMS `Decrypt` as audit
//! metadata (not into the AAD), and into notes-store's own log line for the read, which names
//! note id, revision, acting user and purpose — never the body.

use kms_client::AuditMetadata;
use kms_proto::notes::v1 as pb;

use super::{note_metadata, revision_metadata, validate, Caller, NotesServiceImpl};
use crate::crypto::{self, Field, RevisionIds, CRYPTO_VERSION};
use crate::error::NotesError;
use crate::store::ListQuery;

impl NotesServiceImpl {
    pub(super) async fn handle_get(
        &self,
        req: pb::GetNoteRequest,
        caller: Caller,
    ) -> Result<pb::GetNoteResponse, NotesError> {
        let note_id = validate::note_id(&req.note_id)?;
        validate::id("acting_user", &req.acting_user)?;
        let purpose = validate::purpose(req.purpose)?;
        let acting_user = req.acting_user.clone();
        let result = self.read(req, purpose, &caller).await;
        match &result {
            Ok(r) => tracing::info!(
                note_id = %note_id,
                revision = r.revision.as_ref().map_or(0, |m| m.revision),
                acting_user = %acting_user,
                purpose,
                "note read"
            ),
            Err(e) => tracing::warn!(
                note_id = %note_id,
                acting_user = %acting_user,
                purpose,
                code = ?e.code(),
                "note read refused"
            ),
        }
        result
    }

    async fn read(
        &self,
        req: pb::GetNoteRequest,
        purpose: &'static str,
        caller: &Caller,
    ) -> Result<pb::GetNoteResponse, NotesError> {
        let note_id = validate::note_id(&req.note_id)?;
        // The note and the revision in one query; the checks keep their order (the caller's
        // site before anything about revisions).
        let asked = (req.revision != 0).then_some(req.revision);
        let (note, rec) = self
            .store()
            .get_note_with_revision(note_id, asked)
            .await?
            .ok_or_else(|| NotesError::NotFound(format!("note {note_id} not found")))?;
        self.authorize(caller, &note.site_id)?;
        let wanted = asked.unwrap_or(note.current_revision);
        if wanted > note.current_revision {
            return Err(NotesError::NotFound(format!(
                "note {note_id} has no revision {wanted} (current is {})",
                note.current_revision
            )));
        }
        let rec =
            rec.ok_or_else(|| NotesError::integrity(format!("revision {wanted} is missing")))?;
        if rec.crypto_version != CRYPTO_VERSION {
            return Err(NotesError::integrity(format!(
                "unknown crypto version {}",
                rec.crypto_version
            )));
        }
        let ids = RevisionIds {
            site_id: &note.site_id,
            client_id: &note.client_id,
            note_id,
            revision: wanted,
        };
        let audit = AuditMetadata {
            acting_user: req.acting_user,
            purpose: purpose.to_string(),
        };
        let data_key = self
            .kms()
            .unwrap(&rec.wrapped_key, &rec.meta.kms_key_id, &ids, audit)
            .await?;
        let body = crypto::open(&data_key, &ids, Field::Body, &rec.body)?;
        let reason = match &rec.reason {
            Some(sealed) => Some(crypto::open(&data_key, &ids, Field::Reason, sealed)?),
            None => None,
        };
        drop(data_key);
        if rec.meta.has_reason != reason.is_some() {
            return Err(NotesError::integrity("reason presence does not match"));
        }
        let body = utf8(body)?;
        let reason = reason.map(utf8).transpose()?.unwrap_or_default();
        Ok(pb::GetNoteResponse {
            note: Some(note_metadata(&note)),
            revision: Some(revision_metadata(&rec.meta)),
            body,
            reason,
        })
    }

    pub(super) async fn handle_list(
        &self,
        req: pb::ListNotesRequest,
        caller: Caller,
    ) -> Result<pb::ListNotesResponse, NotesError> {
        validate::id("site_id", &req.site_id)?;
        self.authorize(&caller, &req.site_id)?;
        validate::id("client_id", &req.client_id)?;
        let date_from = optional_date("session_date_from", req.session_date_from)?;
        let date_to = optional_date("session_date_to", req.session_date_to)?;
        if let (Some(from), Some(to)) = (&date_from, &date_to) {
            if from > to {
                return Err(NotesError::invalid(
                    "session_date_from is after session_date_to",
                ));
            }
        }
        let limit = validate::page_size(req.page_size)?;
        let after = validate::decode_page_token(&req.page_token)?;
        // One more than asked tells whether another page follows.
        let mut notes = self
            .store()
            .list_notes(&ListQuery {
                site_id: req.site_id,
                client_id: req.client_id,
                date_from,
                date_to,
                after,
                limit: limit + 1,
            })
            .await?;
        let more = notes.len() > limit as usize;
        notes.truncate(limit as usize);
        let next_page_token = match notes.last() {
            Some(last) if more => validate::encode_page_token(&last.session_date, last.note_id),
            _ => String::new(),
        };
        Ok(pb::ListNotesResponse {
            notes: notes.iter().map(note_metadata).collect(),
            next_page_token,
        })
    }

    pub(super) async fn handle_history(
        &self,
        req: pb::GetNoteHistoryRequest,
        caller: Caller,
    ) -> Result<pb::GetNoteHistoryResponse, NotesError> {
        let note_id = validate::note_id(&req.note_id)?;
        let note = self.note(note_id).await?;
        self.authorize(&caller, &note.site_id)?;
        let revisions = self.store().list_revisions(note_id).await?;
        Ok(pb::GetNoteHistoryResponse {
            note: Some(note_metadata(&note)),
            revisions: revisions.iter().map(revision_metadata).collect(),
        })
    }
}

fn optional_date(field: &str, value: String) -> Result<Option<String>, NotesError> {
    if value.is_empty() {
        return Ok(None);
    }
    validate::date(field, &value)?;
    Ok(Some(value))
}

/// Decrypted text back to a string; invalid UTF-8 cannot have been written by this service.
fn utf8(bytes: zeroize::Zeroizing<Vec<u8>>) -> Result<String, NotesError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| NotesError::integrity("decrypted text is not UTF-8"))
}
