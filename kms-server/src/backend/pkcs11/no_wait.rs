//! Data-key calls on the caller's own (async) thread, never waiting: the state that
//! `Pkcs11Backend::run_without_waiting` sets for the duration of one call.
//!
//! Such a call may only *try* the token's shared lock and the session pool. It must not wait
//! behind a key creation (which holds the exclusive lock for milliseconds, and std's `RwLock`
//! makes new readers wait for a queued writer), nor for a session: that would stall an async
//! worker and every request on it. When something would wait, the call gives up, the flag
//! below records it, and the service runs the whole call again on the blocking pool.

use std::cell::Cell;

use super::BackendError;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static WOULD_HAVE_WAITED: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as running a no-wait call until dropped (also on unwind).
pub(super) struct Scope(());

impl Scope {
    pub(super) fn enter() -> Scope {
        ACTIVE.set(true);
        WOULD_HAVE_WAITED.set(false);
        Scope(())
    }

    /// Whether the call gave up somewhere because it would have waited.
    pub(super) fn gave_up(&self) -> bool {
        WOULD_HAVE_WAITED.get()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        ACTIVE.set(false);
        WOULD_HAVE_WAITED.set(false);
    }
}

/// Whether the current call must not wait.
pub(super) fn active() -> bool {
    ACTIVE.get()
}

/// Records that the current call gave up; its (discarded) error.
pub(super) fn give_up() -> BackendError {
    WOULD_HAVE_WAITED.set(true);
    BackendError::Unavailable("the HSM is busy (no-wait call)".into())
}
