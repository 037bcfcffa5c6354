//! `AuditClient`: the `kms.v1.AuditService` RPCs (query, live tail, public key, server-side
//! verification, export), under the same transport as `KmsClient`. Events and export records
//! are returned as `kms_audit` types, so an export can be verified offline with
//! [`kms_audit::verify`] exactly as received.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use kms_audit::{AuditEvent, ExportRecord, VerifyingKeyInput};
use kms_proto::kms::v1::{self as pb, audit_service_client::AuditServiceClient};
use tonic::transport::Channel;

use crate::{
    transport::{Method, Transport},
    Error, KmsClientConfig,
};

/// The generated client of the audit service over one endpoint's channel.
type Grpc = AuditServiceClient<Channel>;

/// Upper bound on pages followed by [`AuditClient::query_all_audit_events`], against a server
/// that never stops returning tokens.
const MAX_PAGES: usize = 100_000;

/// The only checkpoint signature algorithm this client knows.
pub const AUDIT_SIGNATURE_ALGORITHM: &str = "ECDSA-P256-SHA256";

/// Filters of an audit query. Every field is optional; they combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Events at or after this time (ms since the Unix epoch, UTC).
    pub from_time_ms: Option<i64>,
    /// Events before this time (exclusive).
    pub to_time_ms: Option<i64>,
    /// Events about this key (UUID).
    pub key_id: Option<String>,
    /// Events of this caller identity (SAN URI or CN).
    pub caller: Option<String>,
    /// Events of this operation, e.g. `Decrypt`.
    pub operation: Option<String>,
    /// Events with this outcome (gRPC code name, e.g. `PERMISSION_DENIED`).
    pub outcome: Option<String>,
    /// Events whose encryption context holds this pair, e.g. `("client", "c-17")`.
    pub context: Option<(String, String)>,
}

impl AuditFilter {
    fn to_request(&self, page_size: u32, page_token: Option<&str>) -> pb::QueryAuditEventsRequest {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let (context_key, context_value) = self.context.clone().unwrap_or_default();
        pb::QueryAuditEventsRequest {
            from_time_ms: self.from_time_ms.unwrap_or_default(),
            to_time_ms: self.to_time_ms.unwrap_or_default(),
            key_id: text(&self.key_id),
            caller: text(&self.caller),
            operation: text(&self.operation),
            outcome: text(&self.outcome),
            context_key,
            context_value,
            page_size,
            page_token: page_token.unwrap_or_default().to_string(),
        }
    }
}

/// One page of audit events, ascending by seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEventPage {
    /// The events of this page.
    pub events: Vec<AuditEvent>,
    /// Token of the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// The key that signs the audit checkpoints, as published by the server.
#[derive(Clone, Debug)]
pub struct AuditPublicKey {
    /// PEM SubjectPublicKeyInfo, as the server sent it.
    pub public_key_pem: String,
    /// Hex SHA-256 of the key's DER SubjectPublicKeyInfo (checked against the PEM).
    pub fingerprint: String,
    /// Always [`AUDIT_SIGNATURE_ALGORITHM`] (checked).
    pub algorithm: String,
    /// The parsed key, ready for [`kms_audit::verify`].
    pub key: VerifyingKeyInput,
}

/// The server's verdict on its own chain (`VerifyAuditLog`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerVerifyReport {
    /// True if the whole chain verified.
    pub ok: bool,
    /// Events that passed the per-event rules.
    pub events_checked: u64,
    /// Checkpoints that verified.
    pub checkpoints_checked: u64,
    /// Highest seq covered by a valid checkpoint.
    pub covered_through_seq: Option<u64>,
    /// The seq the failure concerns (`None` when ok).
    pub first_bad_seq: Option<u64>,
    /// Why verification failed (`None` when ok).
    pub reason: Option<String>,
    /// One-line summary (`OK: …` or `FAILED at seq N: …`).
    pub report: String,
}

impl From<pb::VerifyAuditLogResponse> for ServerVerifyReport {
    fn from(r: pb::VerifyAuditLogResponse) -> Self {
        ServerVerifyReport {
            ok: r.ok,
            events_checked: r.events_checked,
            checkpoints_checked: r.checkpoints_checked,
            covered_through_seq: (r.covered_through_seq > 0).then_some(r.covered_through_seq),
            first_bad_seq: (r.first_bad_seq > 0).then_some(r.first_bad_seq),
            reason: (!r.reason.is_empty()).then_some(r.reason),
            report: r.report,
        }
    }
}

/// The live tail: audit events as the server commits them. Ends when the server ends the
/// stream; an item is an error if the stream broke (e.g. `DATA_LOSS` when the tail fell
/// behind: query the missed range).
pub struct AuditEventStream {
    inner: tonic::Streaming<pb::AuditEvent>,
    endpoint: String,
}

impl std::fmt::Debug for AuditEventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditEventStream")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Stream for AuditEventStream {
    type Item = Result<AuditEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        Pin::new(&mut this.inner).poll_next(cx).map(|item| {
            item.map(|result| {
                result.map(AuditEvent::from).map_err(|status| Error::Rpc {
                    method: Method::StreamAuditEvents.name(),
                    endpoint: this.endpoint.clone(),
                    status,
                })
            })
        })
    }
}

/// An async client of `kms.v1.AuditService` (for auditors: the server refuses every other
/// identity with `PERMISSION_DENIED`). Cheap to clone; see [`crate::KmsClient`] for the
/// failover, deadline and retry policy, which is the same. Every method is read-only and
/// therefore retried on `UNAVAILABLE`; a stream is retried only until it is open.
#[derive(Clone, Debug)]
pub struct AuditClient {
    transport: Transport,
}

impl AuditClient {
    /// Builds the client (does not connect; see [`crate::KmsClient::new`]).
    pub fn new(config: &KmsClientConfig) -> Result<Self, Error> {
        Ok(Self {
            transport: Transport::new(config)?,
        })
    }

    pub(crate) fn with_transport(transport: Transport) -> Self {
        Self { transport }
    }

    /// One page of events matching `filter`, ascending by seq. `page_size` 0 lets the server
    /// choose (100); `page_token` is `None` for the first page.
    pub async fn query_audit_events(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<AuditEventPage, Error> {
        let response =
            self.transport
                .call(
                    Method::QueryAuditEvents,
                    || filter.to_request(page_size, page_token),
                    |channel, request| async move {
                        Grpc::new(channel).query_audit_events(request).await
                    },
                )
                .await?;
        Ok(AuditEventPage {
            events: response.events.into_iter().map(AuditEvent::from).collect(),
            next_page_token: (!response.next_page_token.is_empty())
                .then_some(response.next_page_token),
        })
    }

    /// Events matching `filter`, following pages until the last one or until `limit` events.
    pub async fn query_all_audit_events(
        &self,
        filter: &AuditFilter,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEvent>, Error> {
        let mut events = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let want = limit.map_or(1000, |l| l.saturating_sub(events.len()).clamp(1, 1000));
            let page_size = u32::try_from(want).unwrap_or(1000);
            let page = self
                .query_audit_events(filter, page_size, token.as_deref())
                .await?;
            events.extend(page.events);
            if let Some(l) = limit {
                if events.len() >= l {
                    events.truncate(l);
                    return Ok(events);
                }
            }
            match page.next_page_token {
                None => return Ok(events),
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(Error::InvalidResponse {
                        method: Method::QueryAuditEvents.name(),
                        reason: "the server returned the same page token twice".into(),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
        Err(Error::InvalidResponse {
            method: Method::QueryAuditEvents.name(),
            reason: format!("more than {MAX_PAGES} pages"),
        })
    }

    /// Opens the live tail. Waits for no event: the stream yields them as they are committed.
    pub async fn stream_audit_events(&self) -> Result<AuditEventStream, Error> {
        let (inner, endpoint) =
            self.transport
                .open_stream(
                    Method::StreamAuditEvents,
                    || pb::StreamAuditEventsRequest {},
                    |channel, request| async move {
                        Grpc::new(channel).stream_audit_events(request).await
                    },
                )
                .await?;
        Ok(AuditEventStream { inner, endpoint })
    }

    /// The checkpoint-signing public key. Checks that the PEM parses as a P-256 key whose
    /// fingerprint is the one the server announced.
    pub async fn audit_public_key(&self) -> Result<AuditPublicKey, Error> {
        let method = Method::GetAuditPublicKey.name();
        let response =
            self.transport
                .call(
                    Method::GetAuditPublicKey,
                    || pb::GetAuditPublicKeyRequest {},
                    |channel, request| async move {
                        Grpc::new(channel).get_audit_public_key(request).await
                    },
                )
                .await?;
        let invalid = |reason: String| Error::InvalidResponse { method, reason };
        if response.algorithm != AUDIT_SIGNATURE_ALGORITHM {
            return Err(invalid(format!(
                "unknown signature algorithm {:?}",
                response.algorithm
            )));
        }
        let key = VerifyingKeyInput::from_pem(&response.public_key_pem)
            .map_err(|e| invalid(e.to_string()))?;
        if key.fingerprint() != response.fingerprint {
            return Err(invalid(
                "the announced fingerprint is not that of the key".into(),
            ));
        }
        Ok(AuditPublicKey {
            public_key_pem: response.public_key_pem,
            fingerprint: response.fingerprint,
            algorithm: response.algorithm,
            key,
        })
    }

    /// Asks the server to verify its whole chain.
    pub async fn verify_audit_log(&self) -> Result<ServerVerifyReport, Error> {
        let response = self
            .transport
            .call(
                Method::VerifyAuditLog,
                || pb::VerifyAuditLogRequest {},
                |channel, request| async move { Grpc::new(channel).verify_audit_log(request).await },
            )
            .await?;
        Ok(response.into())
    }

    /// Events and checkpoints with `from_seq <= seq <= to_seq` (0 = open end), in export
    /// order, ready for [`kms_audit::write_jsonl`] or [`kms_audit::verify`]. Each record must
    /// arrive within the request timeout of the previous one.
    pub async fn export_audit_log(
        &self,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<ExportRecord>, Error> {
        let method = Method::ExportAuditLog.name();
        let (mut stream, endpoint) = self
            .transport
            .open_stream(
                Method::ExportAuditLog,
                || pb::ExportAuditLogRequest { from_seq, to_seq },
                |channel, request| async move { Grpc::new(channel).export_audit_log(request).await },
            )
            .await?;
        let timeout = self.transport.request_timeout();
        let mut records = Vec::new();
        loop {
            let next = tokio::time::timeout(timeout, stream.message())
                .await
                .map_err(|_| Error::Rpc {
                    method,
                    endpoint: endpoint.clone(),
                    status: tonic::Status::deadline_exceeded(format!(
                        "no export record within {} ms",
                        timeout.as_millis()
                    )),
                })?;
            match next {
                Ok(Some(record)) => {
                    records.push(ExportRecord::try_from(record).map_err(|reason| {
                        Error::InvalidResponse {
                            method,
                            reason: reason.into(),
                        }
                    })?)
                }
                Ok(None) => return Ok(records),
                Err(status) => {
                    return Err(Error::Rpc {
                        method,
                        endpoint,
                        status,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_maps_to_the_request() {
        let filter = AuditFilter {
            from_time_ms: Some(5),
            operation: Some("Decrypt".into()),
            context: Some(("client".into(), "c-1".into())),
            ..AuditFilter::default()
        };
        let r = filter.to_request(10, Some("t"));
        assert_eq!(r.from_time_ms, 5);
        assert_eq!(r.to_time_ms, 0);
        assert_eq!(r.operation, "Decrypt");
        assert_eq!(r.key_id, "");
        assert_eq!(
            (r.context_key.as_str(), r.context_value.as_str()),
            ("client", "c-1")
        );
        assert_eq!((r.page_size, r.page_token.as_str()), (10, "t"));
    }

    #[test]
    fn server_report_zeroes_become_none() {
        let r = ServerVerifyReport::from(pb::VerifyAuditLogResponse {
            ok: true,
            events_checked: 3,
            checkpoints_checked: 1,
            covered_through_seq: 3,
            first_bad_seq: 0,
            reason: String::new(),
            report: "OK".into(),
        });
        assert_eq!(r.covered_through_seq, Some(3));
        assert_eq!(r.first_bad_seq, None);
        assert_eq!(r.reason, None);
    }
}
