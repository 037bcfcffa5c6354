//! The owner thread: the one place that holds the TSS `Context` (which is `Send`, not `Sync`).
//!
//! Callers (the blocking pool) send a job and block on a reply channel with a timeout, so TPM
//! commands are serialised by construction. The thread keeps the connection state: the
//! storage primary (re-derived from its fixed template at every connect) and at most one
//! loaded key version (its AES and HMAC objects). With the primary that is 3 transient
//! objects, all a TPM without a resource manager guarantees; anything else that needs a slot
//! (creating a key version, the audit signing key) flushes the cached version first.
//!
//! At every connect, transient objects left loaded by a crashed process are flushed. A device
//! fault (socket closed, TPM restarted, a handle that is no longer loaded) drops the
//! connection and answers UNAVAILABLE; the next call connects again.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, TpmHandle};
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::CapabilityData;
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

use super::blob::RefId;
use super::errors::{describe, is_device_fault, tss, unavailable, Fault};
use super::templates;
use crate::backend::BackendError;

/// The live connection to the TPM.
pub(super) struct Conn {
    pub ctx: Context,
    pub primary: KeyHandle,
    pub loaded: Option<LoadedVersion>,
}

/// The key version whose objects are loaded right now.
pub(super) struct LoadedVersion {
    pub id: RefId,
    pub aes: KeyHandle,
    pub hmac: KeyHandle,
}

/// Everything the owner thread owns.
pub(super) struct Device {
    tcti: TctiNameConf,
    conn: Option<Conn>,
    /// Versions destroyed during this process's life (see `destroy_key_version`).
    pub destroyed: HashSet<RefId>,
    /// The audit public key, once derived (it never changes for an owner seed).
    pub audit_public: Option<Vec<u8>>,
    /// Connections made so far (for tests and logs).
    pub connects: u64,
}

impl Device {
    pub fn new(tcti: TctiNameConf) -> Self {
        Device {
            tcti,
            conn: None,
            destroyed: HashSet::new(),
            audit_public: None,
            connects: 0,
        }
    }

    fn connect(&mut self) -> Result<Conn, BackendError> {
        let mut ctx = Context::new(self.tcti.clone()).map_err(|e| unavailable("connect", &e))?;
        let primary = (|| {
            flush_stale_transients(&mut ctx)?;
            let template = templates::storage_primary().map_err(tss("storage primary template"))?;
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map(|r| r.key_handle)
            .map_err(tss("create storage primary"))
        })()
        .map_err(|f| match f {
            Fault::Tss(what, e) => unavailable(what, &e),
            Fault::Backend(e) => e,
        })?;
        self.connects += 1;
        tracing::info!(
            connects = self.connects,
            "TPM connected, storage primary loaded"
        );
        Ok(Conn {
            ctx,
            primary,
            loaded: None,
        })
    }

    /// Runs `op` on the connection (connecting first if needed) and turns TSS errors into
    /// backend errors; a device fault drops the connection.
    pub fn run<T>(
        &mut self,
        op: impl FnOnce(&mut Conn) -> Result<T, Fault>,
    ) -> Result<T, BackendError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(BackendError::Unavailable("TPM not connected".into()));
        };
        match op(conn) {
            Ok(v) => Ok(v),
            Err(Fault::Backend(e)) => Err(e),
            Err(Fault::Tss(what, e)) if is_device_fault(&e) => {
                tracing::warn!(error = %describe(&e), what, "TPM device fault: reconnecting on the next call");
                self.disconnect();
                Err(unavailable(what, &e))
            }
            Err(Fault::Tss(what, e)) => Err(BackendError::Internal(format!(
                "TPM {what}: {}",
                describe(&e)
            ))),
        }
    }

    pub fn disconnect(&mut self) {
        // Dropping the Context tries to flush the objects it loaded; on a dead socket that
        // fails quietly, and the next connect flushes whatever is left.
        self.conn = None;
    }
}

/// Flushes every transient object currently loaded (left by a crashed process or an earlier
/// connection). Without a resource manager the KMS must own the TPM: with `/dev/tpmrm0` the
/// kernel shows each connection only its own objects, so this is harmless there.
fn flush_stale_transients(ctx: &mut Context) -> Result<(), Fault> {
    let (data, _more) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        .map_err(tss("list transient handles"))?;
    let CapabilityData::Handles(list) = data else {
        return Ok(());
    };
    let mut flushed = 0;
    for handle in list.into_inner() {
        if let TpmHandle::Transient(_) = handle {
            let object = ctx
                .tr_from_tpm_public(handle)
                .map_err(tss("open stale transient handle"))?;
            ctx.flush_context(object)
                .map_err(tss("flush stale transient handle"))?;
            flushed += 1;
        }
    }
    if flushed > 0 {
        tracing::info!(flushed, "flushed stale TPM transient objects");
    }
    Ok(())
}

type Job = Box<dyn FnOnce(&mut Device) + Send>;

/// The handle callers use: a job queue to the owner thread.
pub(super) struct Worker {
    jobs: mpsc::Sender<Job>,
    pending: Arc<AtomicUsize>,
    timeout: Duration,
}

impl Worker {
    pub fn start(device: Device, timeout: Duration) -> Result<Self, BackendError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kms-tpm".into())
            .spawn(move || {
                let mut device = device;
                while let Ok(job) = queue.recv() {
                    job(&mut device);
                }
            })
            .map_err(|e| BackendError::Internal(format!("starting the TPM thread: {e}")))?;
        Ok(Worker {
            jobs,
            pending: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// Runs `job` on the owner thread and waits for its answer (at most the timeout: a TPM
    /// that does not answer is UNAVAILABLE).
    pub fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Device) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let pending = self.pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        let sent = self.jobs.send(Box::new(move |device: &mut Device| {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut *device)))
                .unwrap_or_else(|_| {
                    tracing::error!("TPM job panicked; dropping the connection");
                    device.disconnect();
                    Err(BackendError::Internal("TPM job panicked".into()))
                });
            pending.fetch_sub(1, Ordering::SeqCst);
            let _ = reply.send(result);
        }));
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Unavailable(
                "the TPM thread has stopped".into(),
            ));
        }
        match answer.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(BackendError::Unavailable(format!(
                "the TPM did not answer within {} ms",
                self.timeout.as_millis()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(BackendError::Unavailable(
                "the TPM job was abandoned".into(),
            )),
        }
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}
