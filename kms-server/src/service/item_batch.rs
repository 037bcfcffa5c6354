//! Calls that carry several items of a single-item RPC, for services that need many at once:
//! GenerateDataKeys (items of GenerateDataKey; notes-store gathers the CreateNote requests that
//! arrive together) and BatchDecrypt (items of Decrypt; notes-store gathers the reads).
//!
//! Each item is exactly its single call as far as policy and auditors are concerned: the same
//! handler checks, authorizes and runs it, and it gets its own audit event (the single call's
//! operation, request id `<call's request id>/<index>`, its own key, context and — for
//! Decrypt — acting user and purpose). All the items' events are queued together, so they
//! usually share one durable commit, and an item is answered only if its own event was stored
//! (fail closed, per item). One bad item does not fail the others. What the call saves is
//! per-call work: one HTTP/2 stream, one TLS record each way, one wake-up of the audit writer
//! for the whole group.

use std::future::Future;
use std::time::Instant;

use kms_proto::kms::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroize;

use super::{event_fields, observe, origin, Call, KmsService};
use crate::error::KmsError;
use crate::policy::Permission;

/// Largest number of items in one GenerateDataKeys call.
pub const MAX_DATA_KEYS_PER_CALL: usize = 64;
/// Largest number of items in one BatchDecrypt call.
pub const MAX_DECRYPTS_PER_CALL: usize = 64;

/// How a call of several items is named, and what it may hold.
struct ItemCall<Out> {
    /// The call's own operation (for a refusal of the whole call).
    call: &'static str,
    /// Each item's operation: the single call's, so auditors' queries by operation find every
    /// item however it was asked for.
    item: &'static str,
    max_items: usize,
    /// Wipes the secret of an answer that is refused after all (its audit event failed).
    wipe: fn(&mut Out),
}

impl KmsService {
    pub(super) async fn handle_generate_data_keys(
        &self,
        req: Request<pb::GenerateDataKeysRequest>,
    ) -> Result<Response<pb::GenerateDataKeysResponse>, Status> {
        let kind = ItemCall {
            call: "GenerateDataKeys",
            item: "GenerateDataKey",
            max_items: MAX_DATA_KEYS_PER_CALL,
            wipe: |dk: &mut pb::GenerateDataKeyResponse| dk.plaintext.zeroize(),
        };
        let answered = self
            .run_items(kind, req.map(|r| r.items), |item, call| {
                self.handle_generate_data_key(item, Permission::GenerateDataKey, call)
            })
            .await?;
        Ok(answered.map(|outcomes| pb::GenerateDataKeysResponse {
            results: outcomes
                .into_iter()
                .map(|outcome| {
                    let (code, message, data_key) = split(outcome);
                    pb::GenerateDataKeyResult {
                        code,
                        message,
                        data_key,
                    }
                })
                .collect(),
        }))
    }

    pub(super) async fn handle_batch_decrypt(
        &self,
        req: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let kind = ItemCall {
            call: "BatchDecrypt",
            item: "Decrypt",
            max_items: MAX_DECRYPTS_PER_CALL,
            wipe: |out: &mut pb::DecryptResponse| out.plaintext.zeroize(),
        };
        let answered = self
            .run_items(kind, req.map(|r| r.items), |item, call| {
                self.handle_decrypt(item, call)
            })
            .await?;
        Ok(answered.map(|outcomes| pb::BatchDecryptResponse {
            results: outcomes
                .into_iter()
                .map(|outcome| {
                    let (code, message, decrypted) = split(outcome);
                    pb::DecryptResult {
                        code,
                        message,
                        decrypted,
                    }
                })
                .collect(),
        }))
    }

    /// Every item through `handle` (the single call's handler), then all their audit events at
    /// once; one outcome per item, in order.
    async fn run_items<Item, Out, Fut>(
        &self,
        kind: ItemCall<Out>,
        req: Request<Vec<Item>>,
        handle: impl Fn(Item, Call) -> Fut,
    ) -> Result<Response<Vec<Result<Out, KmsError>>>, Status>
    where
        Fut: Future<Output = Result<Out, KmsError>>,
    {
        let count = req.get_ref().len();
        if count == 0 || count > kind.max_items {
            // Refused as a whole: one audit event for the call, as any other refusal.
            let max = kind.max_items;
            return observe(&self.inner.audit, kind.call, req, |_, _| async move {
                Err::<Vec<Result<Out, KmsError>>, _>(KmsError::invalid(format!(
                    "items must hold 1-{max} requests, not {count}"
                )))
            })
            .await;
        }
        let (rid, identity, peer) = origin(&req);
        let span = tracing::info_span!("rpc", rpc = kind.call, request_id = %rid,
            peer = %peer, items = count);
        let mut outcomes = Vec::with_capacity(count);
        let mut events = Vec::with_capacity(count);
        let work = async {
            for (index, item) in req.into_inner().into_iter().enumerate() {
                let started = Instant::now();
                let call = Call::new(identity.clone(), format!("{rid}/{index}"));
                let outcome = handle(item, call.clone()).await;
                let mut event = event_fields(call, kind.item, started, &outcome);
                // Where the item came from, before the error message if it failed.
                let position = format!("item {} of {count} of {} call {rid}", index + 1, kind.call);
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
        };
        work.instrument(span.clone()).await;
        let stored = self.inner.audit.record_many(events).await;
        let outcomes: Vec<Result<Out, KmsError>> = outcomes
            .into_iter()
            .zip(stored)
            .map(|((started, outcome), stored)| {
                // No item is answered without its durable audit event.
                let outcome = match stored {
                    Ok(_) => outcome,
                    Err(e) => {
                        span.in_scope(|| {
                            tracing::error!(error = %e, "audit record failed; refusing the item")
                        });
                        if let Ok(mut refused) = outcome {
                            (kind.wipe)(&mut refused);
                        }
                        Err(e)
                    }
                };
                let code = outcome
                    .as_ref()
                    .map_or_else(KmsError::code, |_| tonic::Code::Ok);
                crate::metrics::record_request(kind.item, code, started.elapsed());
                outcome
            })
            .collect();
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        span.in_scope(|| tracing::debug!(failed, "answered"));
        let mut response = Response::new(outcomes);
        if let Ok(v) = rid.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }
}

/// An item's outcome as its result message's fields: code (0 = OK), message, answer.
fn split<Out>(outcome: Result<Out, KmsError>) -> (i32, String, Option<Out>) {
    match outcome {
        Ok(out) => (0, String::new(), Some(out)),
        Err(e) => (e.code() as i32, e.to_string(), None),
    }
}
