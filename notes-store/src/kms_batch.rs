//! Data keys for concurrent writes, asked for together: the data-key requests of the
//! CreateNote and AmendNote calls in flight are gathered into KMS `GenerateDataKeys` calls.
//!
//! Why: under load, each data key cost a KMS call of its own — an HTTP/2 stream and a TLS
//! record each way on both sides, and a wake-up of the KMS's audit writer that then committed
//! only the few events that happened to be waiting. One call for the requests that arrived
//! together spreads that over the group. Nothing else changes: each data key is still fresh,
//! under its client's key, bound to its own revision's ids, authorized and audited by the KMS
//! on its own (one audit event per data key), and an item the KMS refuses fails only its note.
//!
//! How: one dispatcher task takes the first waiting request and everything queued behind it
//! (up to the KMS's limit per call) and sends them as one call, with at most
//! `kms.data_key_calls_in_flight` calls outstanding. There is no gathering delay: a request
//! that finds a call slot free goes at once, alone if it is alone; requests only group while
//! every slot is busy. A slower KMS (or a farther one) therefore gets bigger groups, not a
//! longer queue of calls.
//!
//! The dispatcher yields once after the first request, before it takes the others, so that
//! the CreateNote tasks already runnable (Tokio runs the woken dispatcher first, from its LIFO
//! slot) queue theirs first. Measured together with the PostgreSQL writers' yield
//! (`store::postgres_inserter`), alternating with builds that had either one alone: only the
//! two together raised the PostgreSQL ratio (README, session 16). A lone request pays one
//! scheduler turn.

use std::sync::Arc;

use kms_client::{DataKey, EncryptionContext, KmsClient, MAX_DATA_KEYS_PER_CALL};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{KmsCall, NotesError};

/// Default of `kms.data_key_calls_in_flight`. With notes-bench (16 streams, KMS and
/// notes-store sharing two cores), one call at a time gave the best ratio and cut the KMS's
/// CPU per note by a third; 2 slots (groups of ~3.6 data keys) gained about half as much, and
/// 4 (groups of ~2.2) nothing against one call per key (README, session 15).
pub const DEFAULT_CALLS_IN_FLIGHT: usize = 1;

/// Requests waiting for the dispatcher at most; more wait to be queued.
const QUEUE: usize = 1024;

struct Wanted {
    key: String,
    context: EncryptionContext,
    reply: oneshot::Sender<Result<DataKey, NotesError>>,
}

/// Handle to the dispatcher. Cheap to clone; the dispatcher stops when every handle is gone.
#[derive(Clone, Debug)]
pub struct DataKeyBatcher {
    tx: mpsc::Sender<Wanted>,
}

impl DataKeyBatcher {
    /// Starts the dispatcher on the current Tokio runtime, with at most `calls_in_flight`
    /// (at least 1) calls outstanding.
    pub fn start(client: KmsClient, calls_in_flight: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(dispatch(client, rx, calls_in_flight.max(1)));
        DataKeyBatcher { tx }
    }

    /// A fresh data key under `key`, bound to `context`, from the next call to the KMS.
    pub async fn data_key(
        &self,
        key: &str,
        context: EncryptionContext,
    ) -> Result<DataKey, NotesError> {
        let (reply, answer) = oneshot::channel();
        let wanted = Wanted {
            key: key.to_string(),
            context,
            reply,
        };
        let stopped = || NotesError::Internal("the data-key dispatcher has stopped".into());
        self.tx.send(wanted).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn dispatch(client: KmsClient, mut rx: mpsc::Receiver<Wanted>, calls_in_flight: usize) {
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
        while group.len() < MAX_DATA_KEYS_PER_CALL {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            ask(&client, group).await;
            drop(slot);
        });
    }
}

/// One `GenerateDataKeys` call for `group`; every waiter gets its own answer.
async fn ask(client: &KmsClient, group: Vec<Wanted>) {
    crate::metrics::record_data_key_call(group.len());
    let items: Vec<(&str, &EncryptionContext)> =
        group.iter().map(|w| (w.key.as_str(), &w.context)).collect();
    let answered = client.generate_data_keys(&items).await;
    drop(items);
    match answered {
        Ok(results) => {
            for (wanted, result) in group.into_iter().zip(results) {
                // A waiter that gave up drops its data key here (zeroized on drop).
                let _ = wanted
                    .reply
                    .send(result.map_err(|e| NotesError::from_kms(KmsCall::GenerateDataKey, e)));
            }
        }
        Err(e) => {
            let err = NotesError::from_kms(KmsCall::GenerateDataKey, e);
            for wanted in group {
                let _ = wanted.reply.send(Err(err.clone()));
            }
        }
    }
}
