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
//!
//! The items of a call are shared out over the runtime's workers (consecutive runs of at least
//! [`MIN_ITEMS_PER_TASK`], one task per worker at most); their events are then queued in item
//! order, exactly as if the items had run one after the other. Why: a caller that gathers its
//! requests into one call (notes-store, one call in flight) waits for the call's slowest share
//! rather than the sum of its items, and the other core was idle meanwhile. Measured with
//! notes-bench (README, session 20): the KMS's `GenerateDataKeys` answered in ~2.4 ms instead
//! of ~2.7 ms and `notes_get`/`notes_create` gained 0.02-0.05 of the GenerateDataKey rate.

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
            .run_items(
                kind,
                req.map(|r| r.items),
                |service, item, call| async move {
                    service
                        .handle_generate_data_key(item, Permission::GenerateDataKey, call)
                        .await
                },
            )
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
            .run_items(
                kind,
                req.map(|r| r.items),
                |service, item, call| async move { service.handle_decrypt(item, call).await },
            )
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
    /// once; one outcome per item, in order. The items are shared out over the runtime's
    /// workers ([`tasks_for`]): a call's latency is its slowest share, not the sum of its
    /// items, while the events still go to the audit log together and in item order.
    async fn run_items<Item, Out, H, Fut>(
        &self,
        kind: ItemCall<Out>,
        req: Request<Vec<Item>>,
        handle: H,
    ) -> Result<Response<Vec<Result<Out, KmsError>>>, Status>
    where
        Item: Send + 'static,
        Out: Send + 'static,
        H: Fn(KmsService, Item, Call) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Out, KmsError>> + Send + 'static,
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
        let share = Share {
            call: kind.call,
            item: kind.item,
            count,
            request_id: rid.clone(),
            identity,
        };
        // Each item's call (which its handler fills with the key and context it resolved) is
        // made here, so an item whose task failed is still audited with what it had noted.
        let mut shares = shares(req.into_inner(), tasks_for(count)).into_iter().map(
            |items| -> Vec<(usize, Call, Item)> {
                items
                    .into_iter()
                    .map(|(index, item)| (index, share.call_for(index), item))
                    .collect()
            },
        );
        let own = shares.next().unwrap_or_default();
        let others: Vec<_> = shares
            .map(|items| {
                let calls: Vec<(usize, Call)> = items
                    .iter()
                    .map(|(index, call, _)| (*index, call.clone()))
                    .collect();
                let work = run_share(self.clone(), share.clone(), items, handle.clone());
                (calls, tokio::spawn(work.instrument(span.clone())))
            })
            .collect();
        let mut done = run_share(self.clone(), share.clone(), own, handle)
            .instrument(span.clone())
            .await;
        for (calls, task) in others {
            let started = Instant::now();
            match task.await {
                Ok(share_done) => done.extend(share_done),
                // A handler that panicked: its items fail (and are audited) without an answer.
                Err(e) => done.extend(calls.into_iter().map(|(index, call)| {
                    let outcome = Err(KmsError::Internal(format!("item task failed: {e}")));
                    let event = share.event(call, index, started, &outcome);
                    ItemDone {
                        started,
                        outcome,
                        event,
                    }
                })),
            }
        }
        let (outcomes, events): (Vec<_>, Vec<_>) = done
            .into_iter()
            .map(|d| ((d.started, d.outcome), d.event))
            .unzip();
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

/// Items one task takes at least: a lone item is not worth a hand-off to another worker.
const MIN_ITEMS_PER_TASK: usize = 2;

/// How many tasks share a call of `count` items: one per runtime worker at most.
fn tasks_for(count: usize) -> usize {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    workers.min(count / MIN_ITEMS_PER_TASK).max(1)
}

/// `items` with their indexes, cut into `tasks` runs of consecutive items as even as can be.
fn shares<Item>(items: Vec<Item>, tasks: usize) -> Vec<Vec<(usize, Item)>> {
    let count = items.len();
    let mut out: Vec<Vec<(usize, Item)>> = Vec::with_capacity(tasks);
    for (index, item) in items.into_iter().enumerate() {
        // Share k starts at index ceil(k * count / tasks).
        if out.len() * count <= index * tasks {
            out.push(Vec::new());
        }
        if let Some(last) = out.last_mut() {
            last.push((index, item));
        }
    }
    out
}

/// What every item of one call has in common.
#[derive(Clone)]
struct Share {
    call: &'static str,
    item: &'static str,
    count: usize,
    request_id: String,
    identity: Option<crate::auth::Identity>,
}

impl Share {
    fn call_for(&self, index: usize) -> Call {
        Call::new(
            self.identity.clone(),
            format!("{}/{index}", self.request_id),
        )
    }

    /// The audit event of item `index`, from the `call` its handler ran with (which holds the
    /// key and context the handler resolved), with its position in the call in the detail.
    fn event<Out>(
        &self,
        call: Call,
        index: usize,
        started: Instant,
        outcome: &Result<Out, KmsError>,
    ) -> kms_audit::EventFields {
        let mut event = event_fields(call, self.item, started, outcome);
        // Where the item came from, before the error message if it failed.
        let position = format!(
            "item {} of {} of {} call {}",
            index + 1,
            self.count,
            self.call,
            self.request_id
        );
        event.detail = if event.detail.is_empty() {
            position
        } else {
            format!("{position}: {}", event.detail)
                .chars()
                .take(256)
                .collect()
        };
        event
    }
}

/// One item handled: when it started, its outcome, its audit event (not yet recorded).
struct ItemDone<Out> {
    started: Instant,
    outcome: Result<Out, KmsError>,
    event: kms_audit::EventFields,
}

/// The items of one share, one after the other, in order.
async fn run_share<Item, Out, H, Fut>(
    service: KmsService,
    share: Share,
    items: Vec<(usize, Call, Item)>,
    handle: H,
) -> Vec<ItemDone<Out>>
where
    H: Fn(KmsService, Item, Call) -> Fut,
    Fut: Future<Output = Result<Out, KmsError>>,
{
    let mut done = Vec::with_capacity(items.len());
    for (index, call, item) in items {
        let started = Instant::now();
        let outcome = handle(service.clone(), item, call.clone()).await;
        let event = share.event(call, index, started, &outcome);
        done.push(ItemDone {
            started,
            outcome,
            event,
        });
    }
    done
}

/// An item's outcome as its result message's fields: code (0 = OK), message, answer.
fn split<Out>(outcome: Result<Out, KmsError>) -> (i32, String, Option<Out>) {
    match outcome {
        Ok(out) => (0, String::new(), Some(out)),
        Err(e) => (e.code() as i32, e.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indexes(shares: &[Vec<(usize, char)>]) -> Vec<Vec<usize>> {
        shares
            .iter()
            .map(|share| share.iter().map(|(index, _)| *index).collect())
            .collect()
    }

    #[test]
    fn shares_are_consecutive_even_and_keep_every_item_with_its_index() {
        let items: Vec<char> = "abcdefg".chars().collect();
        let two = shares(items.clone(), 2);
        assert_eq!(indexes(&two), [vec![0, 1, 2, 3], vec![4, 5, 6]]);
        let three = shares(items.clone(), 3);
        assert_eq!(indexes(&three), [vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
        let one = shares(items.clone(), 1);
        assert_eq!(indexes(&one), [vec![0, 1, 2, 3, 4, 5, 6]]);
        // Each item stays with its own index.
        for share in two.iter().chain(&three) {
            for (index, item) in share {
                assert_eq!(*item, items[*index]);
            }
        }
        assert_eq!(indexes(&shares(vec!['x'], 1)), [vec![0]]);
    }

    #[test]
    fn a_call_takes_one_task_per_worker_at_most_and_two_items_per_task_at_least() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        let tasks = runtime.block_on(async { [1, 2, 3, 4, 5, 7, 8, 64].map(tasks_for).to_vec() });
        assert_eq!(tasks, [1, 1, 1, 2, 2, 3, 4, 4]);
        let one_worker = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(one_worker.block_on(async { tasks_for(64) }), 1);
    }
}
