//! KMS calls for concurrent requests, asked for together: the data-key requests of the
//! CreateNote and AmendNote calls in flight go out as KMS `GenerateDataKeys` calls, and the
//! unwraps of the GetNote calls in flight as `BatchDecrypt` calls.
//!
//! Why: under load, each data key or unwrap cost a KMS call of its own — an HTTP/2 stream and
//! a TLS record each way on both sides, and a wake-up of the KMS's audit writer that then
//! committed only the few events that happened to be waiting. One call for the requests that
//! arrived together spreads that over the group. Nothing else changes: each data key is still
//! fresh, under its client's key, bound to its own revision's ids; each unwrap still names its
//! own blob, ids, acting user and purpose; the KMS authorizes and audits every item on its own
//! (one audit event per data key, one per read), and an item the KMS refuses fails only its
//! note.
//!
//! How: one dispatcher task per kind takes the first waiting request and everything queued
//! behind it (up to the KMS's limit per call) and sends them as one call, with at most
//! `calls_in_flight` calls outstanding. There is no gathering delay: a request that finds a
//! call slot free goes at once, alone if it is alone; requests only group while every slot is
//! busy. A slower KMS (or a farther one) therefore gets bigger groups, not a longer queue of
//! calls.
//!
//! The dispatcher yields once after the first request, before it takes the others, so that
//! the tasks already runnable (Tokio runs the woken dispatcher first, from its LIFO slot)
//! queue theirs first. Measured together with the PostgreSQL writers' yield
//! (`store::postgres_inserter`), alternating with builds that had either one alone: only the
//! two together raised the PostgreSQL ratio (README, session 16). A lone request pays one
//! scheduler turn.

use std::future::Future;
use std::sync::Arc;

use kms_client::{
    AuditMetadata, DataKey, Decrypted, EncryptionContext, KmsClient, MAX_DATA_KEYS_PER_CALL,
    MAX_DECRYPTS_PER_CALL,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{KmsCall, NotesError};

/// Default of `kms.data_key_calls_in_flight`. With notes-bench (16 streams, KMS and
/// notes-store sharing two cores), one call at a time gave the best ratio and cut the KMS's
/// CPU per note by a third; 2 slots (groups of ~3.6 data keys) gained about half as much, and
/// 4 (groups of ~2.2) nothing against one call per key (README, session 15).
pub const DEFAULT_CALLS_IN_FLIGHT: usize = 1;

/// Default of `kms.decrypt_calls_in_flight`.
pub const DEFAULT_DECRYPT_CALLS_IN_FLIGHT: usize = 1;

/// Requests waiting for a dispatcher at most; more wait to be queued.
const QUEUE: usize = 1024;

/// One data key wanted: under `key`, bound to `context`.
pub struct DataKeyWanted {
    pub key: String,
    pub context: EncryptionContext,
}

/// One unwrap wanted: `blob` opened under `context`, on behalf of `audit`.
pub struct UnwrapWanted {
    pub blob: Vec<u8>,
    pub context: EncryptionContext,
    pub audit: AuditMetadata,
}

/// Data keys through `GenerateDataKeys` calls.
pub type DataKeyBatcher = Batcher<DataKeyWanted, DataKey>;
/// Unwraps through `BatchDecrypt` calls.
pub type UnwrapBatcher = Batcher<UnwrapWanted, Decrypted>;

/// Starts the data-key dispatcher on the current Tokio runtime.
pub fn data_keys(client: KmsClient, calls_in_flight: usize) -> DataKeyBatcher {
    Batcher::start(calls_in_flight, MAX_DATA_KEYS_PER_CALL, move |group| {
        generate(client.clone(), group)
    })
}

/// Starts the unwrap dispatcher on the current Tokio runtime.
pub fn unwraps(client: KmsClient, calls_in_flight: usize) -> UnwrapBatcher {
    Batcher::start(calls_in_flight, MAX_DECRYPTS_PER_CALL, move |group| {
        decrypt(client.clone(), group)
    })
}

/// One `GenerateDataKeys` call for `group`: one result per request, in order.
async fn generate(
    client: KmsClient,
    group: Vec<DataKeyWanted>,
) -> Vec<Result<DataKey, NotesError>> {
    crate::metrics::record_data_key_call(group.len());
    let items: Vec<(&str, &EncryptionContext)> =
        group.iter().map(|w| (w.key.as_str(), &w.context)).collect();
    let answered = client.generate_data_keys(&items).await;
    per_item(answered, group.len(), KmsCall::GenerateDataKey)
}

/// One `BatchDecrypt` call for `group`: one result per request, in order.
async fn decrypt(
    client: KmsClient,
    group: Vec<UnwrapWanted>,
) -> Vec<Result<Decrypted, NotesError>> {
    crate::metrics::record_unwrap_call(group.len());
    let items: Vec<(&[u8], &EncryptionContext, Option<&AuditMetadata>)> = group
        .iter()
        .map(|w| (w.blob.as_slice(), &w.context, Some(&w.audit)))
        .collect();
    let answered = client.batch_decrypt(&items).await;
    per_item(answered, group.len(), KmsCall::Decrypt)
}

/// A call's answer as one result per item: the items' own, or the call's error for each.
fn per_item<T>(
    answered: Result<Vec<Result<T, kms_client::Error>>, kms_client::Error>,
    count: usize,
    what: KmsCall,
) -> Vec<Result<T, NotesError>> {
    match answered {
        Ok(results) => results
            .into_iter()
            .map(|r| r.map_err(|e| NotesError::from_kms(what, e)))
            .collect(),
        Err(e) => {
            let err = NotesError::from_kms(what, e);
            (0..count).map(|_| Err(err.clone())).collect()
        }
    }
}

struct Waiter<Req, Ans> {
    request: Req,
    reply: oneshot::Sender<Result<Ans, NotesError>>,
}

/// Handle to a dispatcher. Cheap to clone; the dispatcher stops when every handle is gone.
pub struct Batcher<Req, Ans> {
    tx: mpsc::Sender<Waiter<Req, Ans>>,
}

impl<Req, Ans> Clone for Batcher<Req, Ans> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req, Ans> std::fmt::Debug for Batcher<Req, Ans> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<Req: Send + 'static, Ans: Send + 'static> Batcher<Req, Ans> {
    /// Starts the dispatcher on the current Tokio runtime: groups of at most `max_per_call`
    /// requests, each sent by `call` (which answers one result per request, in order), with at
    /// most `calls_in_flight` (at least 1) calls outstanding.
    pub fn start<F, Fut>(calls_in_flight: usize, max_per_call: usize, call: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<Ans, NotesError>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(dispatch(
            rx,
            calls_in_flight.max(1),
            max_per_call.max(1),
            call,
        ));
        Batcher { tx }
    }

    /// `request`'s answer, from the next call to the KMS.
    pub async fn ask(&self, request: Req) -> Result<Ans, NotesError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || NotesError::Internal("a KMS call dispatcher has stopped".into());
        self.tx
            .send(Waiter { request, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn dispatch<Req, Ans, F, Fut>(
    mut rx: mpsc::Receiver<Waiter<Req, Ans>>,
    calls_in_flight: usize,
    max_per_call: usize,
    call: F,
) where
    Req: Send + 'static,
    Ans: Send + 'static,
    F: Fn(Vec<Req>) -> Fut,
    Fut: Future<Output = Vec<Result<Ans, NotesError>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(calls_in_flight));
    loop {
        // A slot first, then the requests: whatever queued while the slots were busy goes
        // into this call.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        // The requests already runnable queue before this call is formed (module doc).
        tokio::task::yield_now().await;
        let mut group = vec![first];
        while group.len() < max_per_call {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<Req>, Vec<_>) =
            group.into_iter().map(|w| (w.request, w.reply)).unzip();
        let answered = call(requests);
        tokio::spawn(async move {
            let mut answers = answered.await.into_iter();
            for reply in replies {
                // A waiter that gave up drops its answer here (secrets are zeroized on drop).
                let answer = answers.next().unwrap_or_else(|| {
                    Err(NotesError::Internal("the KMS answered fewer items".into()))
                });
                let _ = reply.send(answer);
            }
            drop(slot);
        });
    }
}
