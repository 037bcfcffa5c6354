//! GenerateDataKeys: up to 64 data keys in one call, for services that need many at once
//! (notes-store gathers the CreateNote requests that arrive together).
//!
//! Each item is exactly a GenerateDataKey call as far as policy and auditors are concerned: the
//! same handler checks, authorizes and seals it, and it gets its own audit event (operation
//! `GenerateDataKey`, request id `<call's request id>/<index>`, its own key and context). All
//! the items' events are queued together, so they usually share one durable commit, and an
//! item's data key is answered only if its own event was stored (fail closed, per item). One
//! bad item does not fail the others. What the call saves is per-call work: one HTTP/2 stream,
//! one TLS record each way, one wake-up of the audit writer for the whole group.

use std::time::Instant;

use kms_proto::kms::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroize;

use super::{event_fields, observe, origin, Call, KmsService};
use crate::auth::Identity;
use crate::error::KmsError;
use crate::policy::Permission;

/// Largest number of items in one GenerateDataKeys call.
pub const MAX_DATA_KEYS_PER_CALL: usize = 64;

/// The audit operation of each item: the same as a single call's, so auditors' queries by
/// operation find every data key however it was asked for.
const ITEM_OPERATION: &str = "GenerateDataKey";

impl KmsService {
    pub(super) async fn handle_generate_data_keys(
        &self,
        req: Request<pb::GenerateDataKeysRequest>,
    ) -> Result<Response<pb::GenerateDataKeysResponse>, Status> {
        let count = req.get_ref().items.len();
        if count == 0 || count > MAX_DATA_KEYS_PER_CALL {
            // Refused as a whole: one audit event for the call, as any other refusal.
            return observe(
                &self.inner.audit,
                "GenerateDataKeys",
                req,
                |_, _| async move {
                    Err::<pb::GenerateDataKeysResponse, _>(KmsError::invalid(format!(
                        "items must hold 1-{MAX_DATA_KEYS_PER_CALL} requests, not {count}"
                    )))
                },
            )
            .await;
        }
        let (rid, identity, peer) = origin(&req);
        let span = tracing::info_span!("rpc", rpc = "GenerateDataKeys", request_id = %rid,
            peer = %peer, items = count);
        let items = req.into_inner().items;
        let results = self
            .generate_items(items, identity, &rid)
            .instrument(span.clone())
            .await;
        let failed = results.iter().filter(|r| r.code != 0).count();
        span.in_scope(|| tracing::debug!(failed, "answered"));
        let mut response = Response::new(pb::GenerateDataKeysResponse { results });
        if let Ok(v) = rid.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }

    /// Every item through the GenerateDataKey handler, then all their audit events at once.
    async fn generate_items(
        &self,
        items: Vec<pb::GenerateDataKeyRequest>,
        identity: Option<Identity>,
        rid: &str,
    ) -> Vec<pb::GenerateDataKeyResult> {
        let count = items.len();
        let mut outcomes = Vec::with_capacity(count);
        let mut events = Vec::with_capacity(count);
        for (index, item) in items.into_iter().enumerate() {
            let started = Instant::now();
            let call = Call::new(identity.clone(), format!("{rid}/{index}"));
            let outcome = self
                .handle_generate_data_key(item, Permission::GenerateDataKey, call.clone())
                .await;
            let mut event = event_fields(call, ITEM_OPERATION, started, &outcome);
            // Where the item came from, before the error message if it failed.
            let position = format!(
                "item {} of {count} of GenerateDataKeys call {rid}",
                index + 1
            );
            event.detail = if event.detail.is_empty() {
                position
            } else {
                format!("{position}: {}", event.detail)
                    .chars()
                    .take(256)
                    .collect()
            };
            events.push(event);
            outcomes.push((started, outcome));
        }
        let stored = self.inner.audit.record_many(events).await;
        outcomes
            .into_iter()
            .zip(stored)
            .map(|((started, outcome), stored)| {
                // No data key leaves without its durable audit event.
                let outcome = match stored {
                    Ok(_) => outcome,
                    Err(e) => {
                        tracing::error!(error = %e, "audit record failed; refusing the item");
                        if let Ok(mut refused) = outcome {
                            refused.plaintext.zeroize();
                        }
                        Err(e)
                    }
                };
                let code = outcome
                    .as_ref()
                    .map_or_else(KmsError::code, |_| tonic::Code::Ok);
                crate::metrics::record_request(ITEM_OPERATION, code, started.elapsed());
                item_result(outcome)
            })
            .collect()
    }
}

fn item_result(
    outcome: Result<pb::GenerateDataKeyResponse, KmsError>,
) -> pb::GenerateDataKeyResult {
    match outcome {
        Ok(data_key) => pb::GenerateDataKeyResult {
            code: 0,
            message: String::new(),
            data_key: Some(data_key),
        },
        Err(e) => pb::GenerateDataKeyResult {
            code: e.code() as i32,
            message: e.to_string(),
            data_key: None,
        },
    }
}
