//! The audit writer: one task owns the node's chain. Requests hand it event fields and wait
//! until their batch is committed (group commit: everything queued while the previous batch
//! was being written goes into the next transaction). Nothing is acknowledged before it is
//! durable; a failed write is reported to every waiter (they answer UNAVAILABLE: fail closed)
//! and the chain does not advance, so no gap appears. Checkpoints sign the chain head with the
//! backend's audit key every `checkpoint_every` events or `checkpoint_interval`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_audit::{AuditEvent, Chain, Checkpoint, EventFields, VerifyingKeyInput};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::store::AuditStore;
use crate::backend::KeyBackend;
use crate::error::KmsError;

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub node_id: String,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    /// Events per transaction at most.
    pub max_batch: usize,
    /// Events waiting for the writer at most; a burst beyond waits (bounded by `enqueue_timeout`).
    pub queue: usize,
    pub enqueue_timeout: Duration,
    /// How long a caller waits for its event to become durable before UNAVAILABLE.
    pub commit_timeout: Duration,
}

impl AuditSettings {
    pub fn new(node_id: impl Into<String>) -> Self {
        AuditSettings {
            node_id: node_id.into(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(1),
            max_batch: 512,
            queue: 8192,
            enqueue_timeout: Duration::from_secs(5),
            commit_timeout: Duration::from_secs(10),
        }
    }
}

/// Where an appended event's sequence number (or the write error) is sent.
type Ack = oneshot::Sender<Result<u64, String>>;

enum Command {
    Append(Box<EventFields>, Ack),
    Checkpoint(oneshot::Sender<Result<Option<Checkpoint>, String>>),
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Command>,
    live: broadcast::Sender<AuditEvent>,
    healthy: Arc<AtomicBool>,
    public_key: Arc<VerifyingKeyInput>,
    store: Arc<dyn AuditStore>,
    settings: Arc<AuditSettings>,
}

impl AuditLog {
    /// Resumes the node's chain from the store, reads the public audit key and starts the writer.
    pub async fn start(
        store: Arc<dyn AuditStore>,
        backend: Arc<dyn KeyBackend>,
        settings: AuditSettings,
    ) -> Result<AuditLog, KmsError> {
        let chain = match store.last_event(&settings.node_id).await? {
            Some(last) => Chain::resume_from(&last)
                .map_err(|e| KmsError::Internal(format!("audit chain: {e}")))?,
            None => Chain::genesis(settings.node_id.clone()),
        };
        let b = backend.clone();
        let point = tokio::task::spawn_blocking(move || b.audit_public_key())
            .await
            .map_err(|e| KmsError::Internal(format!("audit key task: {e}")))??;
        let public_key = VerifyingKeyInput::parse(&point)
            .map_err(|e| KmsError::Internal(format!("audit public key from the backend: {e}")))?;
        let (tx, rx) = mpsc::channel(settings.queue);
        let (live, _) = broadcast::channel(4096);
        let healthy = Arc::new(AtomicBool::new(true));
        let settings = Arc::new(settings);
        let public_key = Arc::new(public_key);
        let writer = Writer {
            chain,
            store: store.clone(),
            backend,
            public_key: public_key.clone(),
            live: live.clone(),
            healthy: healthy.clone(),
            settings: settings.clone(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
        };
        tokio::spawn(writer.run(rx));
        Ok(AuditLog {
            tx,
            live,
            healthy,
            public_key,
            store,
            settings,
        })
    }

    /// Appends an event and waits until it is durable. Returns its sequence number.
    pub async fn record(&self, fields: EventFields) -> Result<u64, KmsError> {
        let (done, wait) = oneshot::channel();
        let send = self.tx.send(Command::Append(Box::new(fields), done));
        match tokio::time::timeout(self.settings.enqueue_timeout, send).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(KmsError::Unavailable("audit log is shut down".into())),
            Err(_) => return Err(KmsError::Unavailable("audit log is overloaded".into())),
        }
        self.committed(wait).await
    }

    /// Appends several events and waits until they are durable; one result per event, in
    /// order. They are queued back to back, so the writer usually commits them together.
    pub async fn record_many(&self, fields: Vec<EventFields>) -> Vec<Result<u64, KmsError>> {
        let mut waits = Vec::with_capacity(fields.len());
        for f in fields {
            let (done, wait) = oneshot::channel();
            let send = self.tx.send(Command::Append(Box::new(f), done));
            waits.push(
                match tokio::time::timeout(self.settings.enqueue_timeout, send).await {
                    Ok(Ok(())) => Ok(wait),
                    Ok(Err(_)) => Err(KmsError::Unavailable("audit log is shut down".into())),
                    Err(_) => Err(KmsError::Unavailable("audit log is overloaded".into())),
                },
            );
        }
        let mut out = Vec::with_capacity(waits.len());
        for wait in waits {
            out.push(match wait {
                Ok(wait) => self.committed(wait).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Waits for the writer's answer about one queued event.
    async fn committed(
        &self,
        wait: oneshot::Receiver<Result<u64, String>>,
    ) -> Result<u64, KmsError> {
        match tokio::time::timeout(self.settings.commit_timeout, wait).await {
            Ok(Ok(Ok(seq))) => Ok(seq),
            Ok(Ok(Err(e))) => Err(KmsError::Unavailable(format!(
                "audit record could not be stored: {e}"
            ))),
            Ok(Err(_)) => Err(KmsError::Unavailable("audit writer stopped".into())),
            Err(_) => Err(KmsError::Unavailable(
                "audit record was not committed in time".into(),
            )),
        }
    }

    /// Signs the current chain head now (e.g. before an export, so the export is covered).
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, KmsError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Checkpoint(done))
            .await
            .map_err(|_| KmsError::Unavailable("audit log is shut down".into()))?;
        match tokio::time::timeout(self.settings.commit_timeout, wait).await {
            Ok(Ok(r)) => {
                r.map_err(|e| KmsError::Unavailable(format!("audit checkpoint failed: {e}")))
            }
            _ => Err(KmsError::Unavailable(
                "audit checkpoint was not written in time".into(),
            )),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AuditEvent> {
        self.live.subscribe()
    }

    pub fn public_key(&self) -> &VerifyingKeyInput {
        &self.public_key
    }

    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// False after a failed write until a write (or the probe) succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Health probe: a write to the probe table; restores health when the store is writable.
    pub async fn probe(&self) -> bool {
        let ok = self.store.probe_write().await.is_ok();
        if ok {
            self.healthy.store(true, Ordering::Relaxed);
        }
        ok && self.is_healthy()
    }
}

struct Writer {
    chain: Chain,
    store: Arc<dyn AuditStore>,
    backend: Arc<dyn KeyBackend>,
    public_key: Arc<VerifyingKeyInput>,
    live: broadcast::Sender<AuditEvent>,
    healthy: Arc<AtomicBool>,
    settings: Arc<AuditSettings>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let wait = self
                .settings
                .checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed());
            let first = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => Some(c),
                    None => break,
                },
                _ = tokio::time::sleep(wait) => None,
            };
            let mut appends = Vec::new();
            let mut checkpoint_waiters = Vec::new();
            let mut take = |cmd: Command, appends: &mut Vec<_>| match cmd {
                Command::Append(f, done) => appends.push((f, done)),
                Command::Checkpoint(done) => checkpoint_waiters.push(done),
            };
            if let Some(cmd) = first {
                take(cmd, &mut appends);
                while appends.len() < self.settings.max_batch {
                    match rx.try_recv() {
                        Ok(cmd) => take(cmd, &mut appends),
                        Err(_) => break,
                    }
                }
            }
            if !appends.is_empty() {
                self.commit(appends).await;
            }
            let due = self.since_checkpoint >= self.settings.checkpoint_every
                || (self.since_checkpoint > 0
                    && self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval);
            if due || !checkpoint_waiters.is_empty() {
                let result = self.checkpoint().await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "audit checkpoint failed; will retry");
                }
                for done in checkpoint_waiters {
                    let _ = done.send(result.clone());
                }
            } else if self.since_checkpoint == 0 {
                self.last_checkpoint = Instant::now();
            }
        }
        // Channel closed: sign whatever is left so the chain's tail is covered.
        if self.since_checkpoint > 0 {
            if let Err(e) = self.checkpoint().await {
                tracing::warn!(error = %e, "final audit checkpoint failed");
            }
        }
    }

    async fn commit(&mut self, appends: Vec<(Box<EventFields>, Ack)>) {
        let mut next = self.chain.clone();
        let mut events = Vec::with_capacity(appends.len());
        let mut waiters = Vec::with_capacity(appends.len());
        for (fields, done) in appends {
            match next.append(*fields) {
                Ok(e) => {
                    events.push(e);
                    waiters.push(done);
                }
                Err(e) => {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
        match self.store.append_events(&events).await {
            Ok(()) => {
                self.chain = next;
                self.healthy.store(true, Ordering::Relaxed);
                self.since_checkpoint += events.len() as u64;
                crate::metrics::record_audit_batch(events.len());
                for (event, done) in events.into_iter().zip(waiters) {
                    let _ = done.send(Ok(event.seq));
                    let _ = self.live.send(event);
                }
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, events = events.len(), "audit write failed; refusing the operations");
                let msg = e.to_string();
                for done in waiters {
                    let _ = done.send(Err(msg.clone()));
                }
            }
        }
    }

    async fn checkpoint(&mut self) -> Result<Option<Checkpoint>, String> {
        // An explicit request right after an automatic checkpoint (no event in between) must
        // not store a second checkpoint for the same seq: the stored one already covers it.
        if self.since_checkpoint == 0 {
            let last = self
                .store
                .last_checkpoint(&self.settings.node_id)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(cp) = last.filter(|cp| cp.seq == self.chain.last_seq()) {
                return Ok(Some(cp));
            }
        }
        let Some(mut cp) = self
            .chain
            .checkpoint(now_ms(), self.public_key.fingerprint())
        else {
            return Ok(None);
        };
        let digest = cp.digest();
        let backend = self.backend.clone();
        let signature = tokio::task::spawn_blocking(move || backend.sign_audit_digest(&digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        cp.set_signature(&signature).map_err(|e| e.to_string())?;
        // A signature that does not verify must never be stored.
        cp.verify_signature(&self.public_key)
            .map_err(|e| e.to_string())?;
        self.store
            .append_checkpoint(&cp)
            .await
            .map_err(|e| e.to_string())?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(Some(cp))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
