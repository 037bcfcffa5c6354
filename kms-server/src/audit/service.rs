//! gRPC handlers for `kms.v1.AuditService`: query, live tail, public key, server-side
//! verification and export. Only callers holding the auditor role in the policy may call them
//! (deny by default); every call, allowed or denied, is itself audited.

use std::pin::Pin;

use futures::Stream;
use kms_audit::{interleave, ExportRecord};
use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::audit_service_server::AuditService;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{AuditLog, EventFilter};
use crate::context::EncryptionContext;
use crate::error::KmsError;
use crate::policy::{Permission, PolicyStore};
use crate::service::{authorize, observe, validate, Call};

/// Events read from the store per round trip when exporting or verifying.
const EXPORT_CHUNK: u32 = 1000;

#[derive(Clone)]
pub struct AuditApi {
    audit: AuditLog,
    policy: PolicyStore,
}

impl AuditApi {
    pub fn new(audit: AuditLog, policy: PolicyStore) -> Self {
        AuditApi { audit, policy }
    }

    /// kms:ReadAuditLog, which only the auditor role holds.
    fn authorize(&self, call: &Call) -> Result<(), KmsError> {
        authorize(
            &self.policy,
            call,
            Permission::ReadAuditLog,
            None,
            &EncryptionContext::default(),
        )
    }

    /// Every record of this node from `from_seq` to `to_seq` (inclusive; 0 = open), in order.
    async fn records(&self, from_seq: u64, to_seq: u64) -> Result<Vec<ExportRecord>, KmsError> {
        let node = self.audit.node_id().to_string();
        let mut events = Vec::new();
        let mut after = from_seq.saturating_sub(1);
        loop {
            let filter = EventFilter {
                node_id: Some(node.clone()),
                after_seq: Some(after),
                to_seq: (to_seq > 0).then_some(to_seq),
                ..EventFilter::default()
            };
            let page = self
                .audit
                .store()
                .query_events(&filter, EXPORT_CHUNK)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let full = page.len() as u32 == EXPORT_CHUNK;
            events.extend(page);
            if !full {
                break;
            }
        }
        let (lo, hi) = match (events.first(), events.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return Ok(Vec::new()),
        };
        let checkpoints = self.audit.store().checkpoints(&node, lo, hi).await?;
        Ok(interleave(events, checkpoints))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;
type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

fn page_token(seq: u64) -> String {
    format!("a1.{seq}")
}

fn parse_page_token(token: &str) -> Result<Option<u64>, KmsError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix("a1.")
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| KmsError::invalid("page_token is not valid"))
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn query_audit_events(
        &self,
        r: Request<pb::QueryAuditEventsRequest>,
    ) -> Result<Response<pb::QueryAuditEventsResponse>, Status> {
        observe(&self.audit, "QueryAuditEvents", r, |r, call| async move {
            self.authorize(&call)?;
            let q = r.into_inner();
            let limit = validate::page_size(q.page_size)?;
            if q.context_key.is_empty() != q.context_value.is_empty() {
                return Err(KmsError::invalid(
                    "context_key and context_value go together",
                ));
            }
            let filter = EventFilter {
                node_id: Some(self.audit.node_id().to_string()),
                from_time_ms: (q.from_time_ms > 0).then_some(q.from_time_ms),
                to_time_ms: (q.to_time_ms > 0).then_some(q.to_time_ms),
                key_id: opt(q.key_id),
                caller: opt(q.caller),
                operation: opt(q.operation),
                outcome: opt(q.outcome),
                context: opt(q.context_key).zip(opt(q.context_value)),
                after_seq: parse_page_token(&q.page_token)?,
                to_seq: None,
            };
            let mut events = self.audit.store().query_events(&filter, limit + 1).await?;
            let more = events.len() > limit as usize;
            events.truncate(limit as usize);
            let next_page_token = match (more, events.last()) {
                (true, Some(last)) => page_token(last.seq),
                _ => String::new(),
            };
            Ok(pb::QueryAuditEventsResponse {
                events: events.into_iter().map(Into::into).collect(),
                next_page_token,
            })
        })
        .await
    }

    type StreamAuditEventsStream = EventStream;

    async fn stream_audit_events(
        &self,
        r: Request<pb::StreamAuditEventsRequest>,
    ) -> Result<Response<Self::StreamAuditEventsStream>, Status> {
        observe(&self.audit, "StreamAuditEvents", r, |_r, call| async move {
            self.authorize(&call)?;
            let live = BroadcastStream::new(self.audit.subscribe()).map(|item| match item {
                Ok(event) => Ok(pb::AuditEvent::from(event)),
                // The tail fell behind the writer: say so rather than silently skipping events.
                Err(_) => Err(Status::data_loss(
                    "live tail fell behind; query the missed range",
                )),
            });
            Ok(Box::pin(live) as EventStream)
        })
        .await
    }

    async fn get_audit_public_key(
        &self,
        r: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Result<Response<pb::GetAuditPublicKeyResponse>, Status> {
        observe(&self.audit, "GetAuditPublicKey", r, |_r, call| async move {
            self.authorize(&call)?;
            let key = self.audit.public_key();
            let public_key_pem = key
                .to_pem()
                .map_err(|e| KmsError::Internal(e.to_string()))?;
            Ok(pb::GetAuditPublicKeyResponse {
                public_key_pem,
                fingerprint: key.fingerprint().to_string(),
                algorithm: "ECDSA-P256-SHA256".into(),
            })
        })
        .await
    }

    async fn verify_audit_log(
        &self,
        r: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        observe(&self.audit, "VerifyAuditLog", r, |_r, call| async move {
            self.authorize(&call)?;
            self.audit.checkpoint_now().await?;
            let records = self.records(0, 0).await?;
            let report = kms_audit::verify(&records, self.audit.public_key());
            Ok(pb::VerifyAuditLogResponse {
                ok: report.ok,
                events_checked: report.events_checked,
                checkpoints_checked: report.checkpoints_checked,
                covered_through_seq: report.covered_through_seq.unwrap_or(0),
                first_bad_seq: report.first_bad_seq.unwrap_or(0),
                reason: report.reason.clone().unwrap_or_default(),
                report: report.to_string(),
            })
        })
        .await
    }

    type ExportAuditLogStream = RecordStream;

    async fn export_audit_log(
        &self,
        r: Request<pb::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        observe(&self.audit, "ExportAuditLog", r, |r, call| async move {
            self.authorize(&call)?;
            let q = r.into_inner();
            if q.to_seq > 0 && q.from_seq > q.to_seq {
                return Err(KmsError::invalid("from_seq is after to_seq"));
            }
            // Sign the current head so the export is covered up to its last event.
            self.audit.checkpoint_now().await?;
            let records = self.records(q.from_seq, q.to_seq).await?;
            let stream =
                tokio_stream::iter(records.into_iter().map(|r| Ok(pb::AuditRecord::from(r))));
            Ok(Box::pin(stream) as RecordStream)
        })
        .await
    }
}
