//! gRPC handlers for `notes.v1.NotesService`: validate → KMS → local crypto → store → answer.
//!
//! The trait impl at the bottom is thin: each RPC runs its handler inside `observe`, which
//! gives it a request id and a tracing span (with the caller's certificate name), records
//! metrics, and turns `NotesError` into a status (`error.rs`). Writes live in `write.rs`,
//! reads in `read.rs`, erasure and legal holds in `erasure.rs`, input rules in `validate.rs`.
//!
//! | RPC            | body limit                         | KMS call        | DB                     |
//! |----------------|------------------------------------|-----------------|------------------------|
//! | CreateNote     | `max_body_bytes` (64 KiB default)  | GenerateDataKey | one insert transaction |
//! | AmendNote      | body as above, reason 4 KiB        | GenerateDataKey | one insert transaction |
//! | GetNote        | -                                  | Decrypt (always)| reads                  |
//! | ListNotes      | -                                  | none            | reads, metadata only   |
//! | GetNoteHistory | -                                  | none            | reads, metadata only   |
//! | EraseClient    | reason 1 KiB; `may_erase`          | EraseKey        | two transactions       |
//! | Place/LiftLegalHold | reason 1 KiB; `may_hold`      | none            | one transaction        |
//! | GetClientStatus | `may_erase` or `may_hold`         | none            | reads                  |
//!
//! Every caller has passed mutual TLS with a certificate from the configured client CA; each
//! handler then checks that the caller may act for the site concerned (`crate::callers`),
//! before any KMS call — for a note id, after looking up the note's site.

mod erasure;
mod read;
pub mod validate;
mod write;

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kms_proto::notes::v1 as pb;
use kms_proto::notes::v1::notes_service_server::NotesService;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::callers::Callers;
use crate::client_keys::ClientKeys;
use crate::error::NotesError;
use crate::kms::Kms;
use crate::store::{NoteRecord, NoteStore, RevisionMeta};

/// The notes service. Cheap to clone.
#[derive(Clone)]
pub struct NotesServiceImpl {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn NoteStore>,
    kms: Kms,
    client_keys: ClientKeys,
    callers: Callers,
    max_body_bytes: usize,
}

impl NotesServiceImpl {
    pub fn new(
        store: Arc<dyn NoteStore>,
        kms: Kms,
        client_keys: ClientKeys,
        callers: Callers,
        max_body_bytes: usize,
    ) -> Self {
        NotesServiceImpl {
            inner: Arc::new(Inner {
                store,
                kms,
                client_keys,
                callers,
                max_body_bytes,
            }),
        }
    }

    fn store(&self) -> &dyn NoteStore {
        self.inner.store.as_ref()
    }

    fn kms(&self) -> &Kms {
        &self.inner.kms
    }

    /// PERMISSION_DENIED unless `caller` may act for `site`.
    fn authorize(&self, caller: &Caller, site: &str) -> Result<(), NotesError> {
        self.inner.callers.authorize(caller.as_ref(), site)
    }

    /// The note, or NOT_FOUND.
    async fn note(&self, note_id: Uuid) -> Result<NoteRecord, NotesError> {
        self.store()
            .get_note(note_id)
            .await?
            .ok_or_else(|| NotesError::NotFound(format!("note {note_id} not found")))
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn note_metadata(n: &NoteRecord) -> pb::NoteMetadata {
    pb::NoteMetadata {
        note_id: n.note_id.to_string(),
        site_id: n.site_id.clone(),
        client_id: n.client_id.clone(),
        author_id: n.author_id.clone(),
        session_date: n.session_date.clone(),
        current_revision: n.current_revision,
        created_at_unix_ms: n.created_at_ms,
        updated_at_unix_ms: n.updated_at_ms,
    }
}

pub(crate) fn revision_metadata(r: &RevisionMeta) -> pb::RevisionMetadata {
    pb::RevisionMetadata {
        revision: r.revision,
        author_id: r.author_id.clone(),
        created_at_unix_ms: r.created_at_ms,
        kms_key_id: r.kms_key_id.clone(),
        kms_key_version: r.kms_key_version,
        has_reason: r.has_reason,
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

/// The caller's identity from its verified certificate.
pub(crate) type Caller = Option<svc_common::identity::Identity>;

/// Request id, tracing span, metrics and error conversion around one handler.
async fn observe<Req, Res, Fut>(
    rpc: &'static str,
    req: Request<Req>,
    handler: impl FnOnce(Req, Caller) -> Fut,
) -> Result<Response<Res>, Status>
where
    Fut: Future<Output = Result<Res, NotesError>>,
{
    let started = Instant::now();
    let rid = request_id(&req);
    let caller = svc_common::identity::peer_identity(&req);
    let peer = caller
        .as_ref()
        .map_or("<unauthenticated>", |c| c.name.as_str())
        .to_string();
    let span = tracing::info_span!("rpc", rpc, request_id = %rid, peer = %peer);
    let result = handler(req.into_inner(), caller)
        .instrument(span.clone())
        .await;
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

#[tonic::async_trait]
impl NotesService for NotesServiceImpl {
    async fn create_note(
        &self,
        r: Request<pb::CreateNoteRequest>,
    ) -> Result<Response<pb::CreateNoteResponse>, Status> {
        observe("CreateNote", r, |r, c| self.handle_create(r, c)).await
    }

    async fn get_note(
        &self,
        r: Request<pb::GetNoteRequest>,
    ) -> Result<Response<pb::GetNoteResponse>, Status> {
        observe("GetNote", r, |r, c| self.handle_get(r, c)).await
    }

    async fn list_notes(
        &self,
        r: Request<pb::ListNotesRequest>,
    ) -> Result<Response<pb::ListNotesResponse>, Status> {
        observe("ListNotes", r, |r, c| self.handle_list(r, c)).await
    }

    async fn amend_note(
        &self,
        r: Request<pb::AmendNoteRequest>,
    ) -> Result<Response<pb::AmendNoteResponse>, Status> {
        observe("AmendNote", r, |r, c| self.handle_amend(r, c)).await
    }

    async fn get_note_history(
        &self,
        r: Request<pb::GetNoteHistoryRequest>,
    ) -> Result<Response<pb::GetNoteHistoryResponse>, Status> {
        observe("GetNoteHistory", r, |r, c| self.handle_history(r, c)).await
    }

    async fn erase_client(
        &self,
        r: Request<pb::EraseClientRequest>,
    ) -> Result<Response<pb::EraseClientResponse>, Status> {
        observe("EraseClient", r, |r, c| self.handle_erase(r, c)).await
    }

    async fn place_legal_hold(
        &self,
        r: Request<pb::PlaceLegalHoldRequest>,
    ) -> Result<Response<pb::ClientStatus>, Status> {
        observe("PlaceLegalHold", r, |r, c| {
            self.handle_hold(r.site_id, r.client_id, Some(r.reason), c)
        })
        .await
    }

    async fn lift_legal_hold(
        &self,
        r: Request<pb::LiftLegalHoldRequest>,
    ) -> Result<Response<pb::ClientStatus>, Status> {
        observe("LiftLegalHold", r, |r, c| {
            self.handle_hold(r.site_id, r.client_id, None, c)
        })
        .await
    }

    async fn get_client_status(
        &self,
        r: Request<pb::GetClientStatusRequest>,
    ) -> Result<Response<pb::ClientStatus>, Status> {
        observe("GetClientStatus", r, |r, c| self.handle_status(r, c)).await
    }
}
