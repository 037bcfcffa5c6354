//! PKCS#11 library loading and a small pool of logged-in sessions.
//!
//! `Pkcs11` may be initialised only once per process (a second `C_Initialize` fails and
//! `C_Finalize` breaks every other handle), so contexts are kept in a process-wide map keyed
//! by module path. A `Session` is `Send` but not `Sync`: each blocking worker borrows one from
//! the pool and returns it. A broken session is dropped instead of returned, and the next
//! borrower opens (and logs in) a fresh one. When no session can be opened (SoftHSM keeps a
//! vanished token marked invalid until the library is initialised again), the pool
//! re-initialises the library (`C_Finalize` + `C_Initialize`, at most once a second) under an
//! exclusive lock that waits for every in-flight operation: that is how the backend recovers
//! after the token goes away and comes back, without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::errors::{self, short};
use crate::backend::BackendError;

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The process-wide, initialised context for a PKCS#11 module.
pub(super) fn context_for(module: &Path) -> Result<Pkcs11, BackendError> {
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| BackendError::Internal("pkcs11 context map poisoned".into()))?;
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        BackendError::Unavailable(format!(
            "cannot load PKCS#11 module {}: {}",
            module.display(),
            short(&e)
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(errors::unavailable("C_Initialize", &e)),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Gauges the metrics endpoint shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub in_use: usize,
    pub waiting: usize,
    pub idle: usize,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Session>,
    in_use: usize,
    waiting: usize,
}

fn poisoned() -> BackendError {
    BackendError::Internal("pkcs11 pool lock poisoned".into())
}

pub(super) struct SessionPool {
    ctx: Pkcs11,
    token_label: String,
    pin: AuthPin,
    max_sessions: usize,
    acquire_timeout: Duration,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Read-held by every borrowed session; write-held while the library is re-initialised.
    library: RwLock<()>,
    last_reinit: Mutex<Option<Instant>>,
}

const REINIT_INTERVAL: Duration = Duration::from_secs(1);

impl SessionPool {
    pub(super) fn new(
        ctx: Pkcs11,
        token_label: String,
        pin: AuthPin,
        max_sessions: usize,
        acquire_timeout: Duration,
    ) -> Self {
        SessionPool {
            ctx,
            token_label,
            pin,
            max_sessions: max_sessions.max(1),
            acquire_timeout,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            library: RwLock::new(()),
            last_reinit: Mutex::new(None),
        }
    }

    pub(super) fn stats(&self) -> PoolStats {
        match self.state.lock() {
            Ok(s) => PoolStats {
                in_use: s.in_use,
                waiting: s.waiting,
                idle: s.idle.len(),
            },
            Err(_) => PoolStats::default(),
        }
    }

    /// `acquire` without waiting: `None` when every session is lent out.
    pub(super) fn try_acquire(&self) -> Result<Option<PooledSession<'_>>, BackendError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        Ok(self.take_free(state)?.ok())
    }

    /// An idle session, or a new one while the pool is below its size; otherwise the state
    /// back, still locked, for the caller to wait on (or not).
    fn take_free<'a>(
        &'a self,
        mut state: MutexGuard<'a, PoolState>,
    ) -> Result<Result<PooledSession<'a>, MutexGuard<'a, PoolState>>, BackendError> {
        if let Some(session) = state.idle.pop() {
            state.in_use += 1;
            drop(state);
            return self.lend(session).map(Ok);
        }
        if state.in_use + state.idle.len() >= self.max_sessions {
            return Ok(Err(state));
        }
        state.in_use += 1;
        drop(state);
        match self.open_session_recovering() {
            Ok(session) => self.lend(session).map(Ok),
            Err(e) => {
                self.release_slot();
                Err(e)
            }
        }
    }

    /// Borrows a logged-in session, opening one if the pool is below its size. Waits at most
    /// `acquire_timeout` for a free slot.
    pub(super) fn acquire(&self) -> Result<PooledSession<'_>, BackendError> {
        let deadline = Instant::now() + self.acquire_timeout;
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        loop {
            state = match self.take_free(state)? {
                Ok(session) => return Ok(session),
                Err(state) => state,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(BackendError::Unavailable(
                    "all HSM sessions are busy".into(),
                ));
            }
            state.waiting += 1;
            let (s, _) = self
                .freed
                .wait_timeout(state, deadline - now)
                .map_err(|_| poisoned())?;
            state = s;
            state.waiting -= 1;
        }
    }

    fn lend(&self, session: Session) -> Result<PooledSession<'_>, BackendError> {
        match self.library.read() {
            Ok(guard) => Ok(PooledSession {
                pool: self,
                session: Some(session),
                _library: guard,
            }),
            Err(_) => {
                self.release_slot();
                Err(BackendError::Internal(
                    "pkcs11 library lock poisoned".into(),
                ))
            }
        }
    }

    /// Opens a session; if that fails, re-initialises the library once and tries again.
    fn open_session_recovering(&self) -> Result<Session, BackendError> {
        match self.open_session() {
            Ok(s) => Ok(s),
            Err(first) => {
                if self.reinitialize() {
                    self.open_session()
                } else {
                    Err(first)
                }
            }
        }
    }

    /// `C_Finalize` + `C_Initialize`, so the library scans its tokens again. Waits for every
    /// borrowed session to come back first. Returns whether it ran (it is rate-limited).
    fn reinitialize(&self) -> bool {
        match self.last_reinit.lock() {
            Ok(mut last) => {
                if last.is_some_and(|t| t.elapsed() < REINIT_INTERVAL) {
                    return false;
                }
                *last = Some(Instant::now());
            }
            Err(_) => return false,
        }
        let Ok(_exclusive) = self.library.write() else {
            return false;
        };
        // Sessions must be closed while the library is still initialised.
        self.discard_idle();
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %short(&e), "C_Finalize during recovery");
        }
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!("PKCS#11 library re-initialised");
                true
            }
            Err(e) => {
                tracing::warn!(error = %short(&e), "PKCS#11 re-initialisation failed");
                false
            }
        }
    }

    fn release_slot(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.in_use = s.in_use.saturating_sub(1);
        }
        self.freed.notify_one();
    }

    fn give_back(&self, session: Session) {
        if let Ok(mut s) = self.state.lock() {
            s.in_use = s.in_use.saturating_sub(1);
            s.idle.push(session);
        }
        self.freed.notify_one();
    }

    /// Drops every idle session (after a device fault: they are likely dead too).
    pub(super) fn discard_idle(&self) {
        let idle = match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.idle),
            Err(_) => return,
        };
        // Closing a session of a vanished token fails; nothing to do about it.
        drop(idle);
    }

    fn find_slot(&self) -> Result<Slot, BackendError> {
        let slots = self
            .ctx
            .get_slots_with_initialized_token()
            .map_err(|e| errors::unavailable("C_GetSlotList", &e))?;
        for slot in slots {
            match self.ctx.get_token_info(slot) {
                Ok(info) if info.label().trim_end() == self.token_label => return Ok(slot),
                _ => continue,
            }
        }
        Err(BackendError::Unavailable(format!(
            "no PKCS#11 token labelled {:?}",
            self.token_label
        )))
    }

    fn open_session(&self) -> Result<Session, BackendError> {
        let slot = self.find_slot()?;
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(|e| errors::unavailable("C_OpenSession", &e))?;
        match session.login(UserType::User, Some(&self.pin)) {
            // Login state is per application: a second session is already logged in.
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(errors::unavailable("C_Login", &e)),
        }
    }
}

/// A borrowed session; returned to the pool on drop unless marked broken.
pub(super) struct PooledSession<'a> {
    pool: &'a SessionPool,
    session: Option<Session>,
    _library: RwLockReadGuard<'a, ()>,
}

impl PooledSession<'_> {
    pub(super) fn session(&self) -> &Session {
        // Invariant: `session` is Some until drop or `mark_broken`, which consumes self.
        match &self.session {
            Some(s) => s,
            None => unreachable!("pooled session used after release"),
        }
    }

    /// Drops the session instead of returning it to the pool.
    pub(super) fn mark_broken(mut self) {
        // Close it now, while this borrower still holds the library lock.
        drop(self.session.take());
        self.pool.release_slot();
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.give_back(session);
        }
    }
}
