//! PKCS#11 backend (cryptoki; SoftHSM in development and tests).
//!
//! Each key version is an AES-256 secret-key token object generated inside the HSM:
//! sensitive, never extractable, usable only to encrypt and decrypt. Its label
//! ("kms:<key id>:v<n>") is the `backend_ref` stored in the metadata database. Data keys come
//! from the HSM's RNG; `seal`/`open` are `CKM_AES_GCM` with a fresh random 96-bit IV and a
//! 128-bit tag. The token is found by label, never by slot number.

mod errors;
mod inspect;
mod no_wait;
mod pool;
mod signing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::types::AuthPin;
use rand::RngCore;
use zeroize::Zeroizing;

use self::errors::{classify, Fault};
pub use self::inspect::KeyProtection;
pub use self::pool::PoolStats;
use self::pool::{PooledSession, SessionPool};
use super::{BackendError, KeyBackend, Mechanism, Opening, Sealed};

const GCM_IV_LEN: usize = 12;
/// Label of a small data object the backend keeps in its token. A session that can no longer
/// see it is looking at a token that went away (SoftHSM then shows an empty object list
/// instead of failing), so "key not found" is only believed while the sentinel is visible.
const SENTINEL_LABEL: &[u8] = b"kms-backend-sentinel";
const GCM_TAG_BITS: u64 = 128;

/// Settings for the PKCS#11 backend.
#[derive(Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    pub token_label: String,
    pub pin: AuthPin,
    /// Sessions opened at most (SoftHSM's file store serialises work; 2-4 is plenty).
    pub max_sessions: usize,
    /// How long a request waits for a free session before UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Whether seal/open/random may run on the caller's (async) thread when the token and a
    /// session are free at once ([`KeyBackend::run_without_waiting`]). Right for a token whose
    /// calls take tens of µs (SoftHSM, a PCIe HSM): the hand-off to the blocking pool costs two
    /// thread wake-ups, more than the call. Wrong for a network HSM whose calls take
    /// milliseconds.
    pub inline_calls: bool,
}

impl std::fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("max_sessions", &self.max_sessions)
            .field("inline_calls", &self.inline_calls)
            .finish()
    }
}

pub struct Pkcs11Backend {
    pool: SessionPool,
    /// Object handles by label. Handles stay valid across sessions of this process, and
    /// looking one up (C_FindObjects) costs as much as the encryption itself.
    handles: RwLock<HashMap<Vec<u8>, ObjectHandle>>,
    /// Held exclusively while a token object is created or destroyed, shared by every other
    /// call: SoftHSM's file object store fails a creation now and then with
    /// CKR_GENERAL_ERROR when other sessions use the token at the same moment (SoftHSMv2
    /// issue 573; seen here with C_GenerateKey next to parallel tests). Creations are rare.
    object_store: RwLock<()>,
    inline_calls: bool,
}

impl Pkcs11Backend {
    /// Loads the module (once per process) and checks that the token can be logged into.
    pub fn new(settings: Pkcs11Settings) -> Result<Self, BackendError> {
        let ctx = pool::context_for(&settings.module)?;
        let backend = Pkcs11Backend {
            pool: SessionPool::new(
                ctx,
                settings.token_label,
                settings.pin,
                settings.max_sessions,
                settings.acquire_timeout,
            ),
            handles: RwLock::new(HashMap::new()),
            object_store: RwLock::new(()),
            inline_calls: settings.inline_calls,
        };
        backend.ensure_sentinel()?;
        backend.ensure_audit_key()?;
        backend.check_health()?;
        Ok(backend)
    }

    /// Creates the sentinel object at start-up if this token does not have one yet.
    fn ensure_sentinel(&self) -> Result<(), BackendError> {
        self.with_exclusive_session("create token sentinel", |s| {
            if sentinel_visible(s)? {
                return Ok(());
            }
            let template = [
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(SENTINEL_LABEL.to_vec()),
                Attribute::Value(b"kms".to_vec()),
            ];
            s.session()
                .create_object(&template)
                .map(|_| ())
                .map_err(OpError::Ck)
        })
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// `C_Encrypt` with `CKM_AES_GCM` in the given session.
    fn encrypt_in(
        &self,
        s: &PooledSession<'_>,
        backend_ref: &[u8],
        mut iv: [u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, OpError> {
        let key = self.key_handle(s, backend_ref)?;
        let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())
            .map_err(|e| OpError::Backend(errors::internal("GCM parameters", &e)))?;
        s.session()
            .encrypt(&CkMechanism::AesGcm(params), key, plaintext)
            .map_err(OpError::Ck)
    }

    /// `C_Decrypt` with `CKM_AES_GCM` in the given session. A failed tag check is
    /// `DecryptionFailed` only while the token is visibly healthy: SoftHSM reports a vanished
    /// token the same way.
    fn decrypt_in(
        &self,
        s: &PooledSession<'_>,
        source: &Opening<'_>,
        mut iv: [u8; GCM_IV_LEN],
    ) -> Result<Zeroizing<Vec<u8>>, OpError> {
        let key = self.key_handle(s, source.backend_ref)?;
        let params = GcmParams::new(&mut iv, source.aad, GCM_TAG_BITS.into())
            .map_err(|e| OpError::Backend(errors::internal("GCM parameters", &e)))?;
        match s
            .session()
            .decrypt(&CkMechanism::AesGcm(params), key, source.ciphertext)
        {
            Ok(plain) => Ok(Zeroizing::new(plain)),
            Err(e)
                if errors::is_auth_failure(&e)
                    && self.token_still_healthy(s, source.backend_ref) =>
            {
                Err(OpError::Backend(BackendError::DecryptionFailed))
            }
            Err(e) if errors::is_auth_failure(&e) => Err(OpError::Backend(errors::unavailable(
                "AES-GCM decrypt (token check failed)",
                &e,
            ))),
            Err(e) => Err(OpError::Ck(e)),
        }
    }

    /// Runs `op` with a pooled session and turns PKCS#11 errors into backend errors: a device
    /// fault discards the session (and the other idle ones) so the next call starts afresh.
    fn with_session<T>(
        &self,
        what: &str,
        op: impl Fn(&PooledSession<'_>) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        if no_wait::active() {
            let _shared = match self.object_store.try_read() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Err(no_wait::give_up()),
            };
            let Some(session) = self.pool.try_acquire()? else {
                return Err(no_wait::give_up());
            };
            return self.finish(what, session, op);
        }
        let _shared = self.object_store.read().unwrap_or_else(|e| e.into_inner());
        self.run(what, op)
    }

    /// Holds the token as a key creation does (exclusively) until the guard is dropped. For
    /// tests of what other calls do meanwhile; nothing in the server calls it.
    #[doc(hidden)]
    pub fn hold_token_exclusively(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.object_store.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `with_session` for calls that create or destroy token objects: alone on the token.
    fn with_exclusive_session<T>(
        &self,
        what: &str,
        op: impl Fn(&PooledSession<'_>) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        let _exclusive = self.object_store.write().unwrap_or_else(|e| e.into_inner());
        self.run(what, op)
    }

    fn run<T>(
        &self,
        what: &str,
        op: impl Fn(&PooledSession<'_>) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        let session = self.pool.acquire()?;
        self.finish(what, session, op)
    }

    /// Runs `op` on `session` and classifies its errors (see `with_session`).
    fn finish<T>(
        &self,
        what: &str,
        session: PooledSession<'_>,
        op: impl Fn(&PooledSession<'_>) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        match op(&session) {
            Ok(v) => Ok(v),
            Err(OpError::Backend(e)) => Err(e),
            Err(OpError::TokenGone) => {
                session.mark_broken();
                self.pool.discard_idle();
                self.forget_handles();
                Err(BackendError::Unavailable(format!(
                    "{what}: the HSM token's objects are not visible"
                )))
            }
            Err(OpError::Ck(e)) => match classify(&e) {
                Fault::Device => {
                    session.mark_broken();
                    self.pool.discard_idle();
                    self.forget_handles();
                    Err(errors::unavailable(what, &e))
                }
                Fault::StaleHandle => {
                    self.forget_handles();
                    Err(errors::unavailable(what, &e))
                }
                Fault::Request => Err(errors::internal(what, &e)),
            },
        }
    }

    fn forget_handles(&self) {
        if let Ok(mut h) = self.handles.write() {
            h.clear();
        }
    }

    /// The object handle of a key version, from the cache or by label.
    fn key_handle(
        &self,
        session: &PooledSession<'_>,
        label: &[u8],
    ) -> Result<ObjectHandle, OpError> {
        // A zero-length label in a find template does not reliably match nothing in SoftHSM
        // (it once found another test's key): an empty reference names no key, full stop.
        if label.is_empty() {
            return Err(OpError::Backend(BackendError::KeyNotFound(
                "empty HSM object label".into(),
            )));
        }
        if let Ok(h) = self.handles.read() {
            if let Some(handle) = h.get(label) {
                return Ok(*handle);
            }
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.to_vec()),
        ];
        let found = session
            .session()
            .find_objects(&template)
            .map_err(OpError::Ck)?;
        let handle = match found.as_slice() {
            [one] => *one,
            [] if !sentinel_visible(session)? => {
                return Err(OpError::TokenGone);
            }
            [] => {
                return Err(OpError::Backend(BackendError::KeyNotFound(format!(
                    "no HSM object labelled {}",
                    String::from_utf8_lossy(label)
                ))))
            }
            _ => {
                return Err(OpError::Backend(BackendError::Internal(format!(
                    "several HSM objects labelled {}",
                    String::from_utf8_lossy(label)
                ))))
            }
        };
        if let Ok(mut h) = self.handles.write() {
            h.insert(label.to_vec(), handle);
        }
        Ok(handle)
    }

    /// After a GCM failure, tell "the ciphertext is wrong" from "the token is gone": SoftHSM
    /// reports both as CKR_GENERAL_ERROR. A fresh lookup of the key object succeeds only on a
    /// healthy token.
    fn token_still_healthy(&self, session: &PooledSession<'_>, label: &[u8]) -> bool {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.to_vec()),
        ];
        session.session().get_session_info().is_ok()
            && matches!(sentinel_visible(session), Ok(true))
            && matches!(session.session().find_objects(&template), Ok(v) if v.len() == 1)
    }
}

/// Whether this session still sees the backend's sentinel object.
fn sentinel_visible(session: &PooledSession<'_>) -> Result<bool, OpError> {
    let template = [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Label(SENTINEL_LABEL.to_vec()),
    ];
    Ok(!session
        .session()
        .find_objects(&template)
        .map_err(OpError::Ck)?
        .is_empty())
}

/// Errors inside a session operation: raw PKCS#11 errors are classified by `with_session`.
enum OpError {
    Ck(cryptoki::error::Error),
    Backend(BackendError),
    /// The session works but the token's objects are gone (see `SENTINEL_LABEL`).
    TokenGone,
}

fn aes_key_template(label: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.to_vec()),
        Attribute::Id(label.to_vec()),
    ]
}

impl KeyBackend for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::Pkcs11AesGcm
    }

    fn create_key_version(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        let label = name.as_bytes().to_vec();
        self.with_exclusive_session("generate AES key", |s| {
            s.session()
                .generate_key(&CkMechanism::AesKeyGen, &aes_key_template(&label))
                .map_err(OpError::Ck)
        })?;
        Ok(label)
    }

    fn seal(
        &self,
        backend_ref: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Sealed, BackendError> {
        let iv = fresh_iv();
        let ciphertext = self.with_session("AES-GCM encrypt", |s| {
            self.encrypt_in(s, backend_ref, iv, aad, plaintext)
        })?;
        Ok(Sealed {
            iv: iv.to_vec(),
            ciphertext,
        })
    }

    fn open(
        &self,
        backend_ref: &[u8],
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let source = Opening {
            backend_ref,
            iv,
            aad,
            ciphertext,
        };
        let iv = gcm_iv(iv)?;
        self.with_session("AES-GCM decrypt", |s| self.decrypt_in(s, &source, iv))
    }

    /// Both operations in one pooled session: a campaign re-wraps thousands of blobs a
    /// second, and each session hand-over wakes a waiting thread.
    fn reseal(
        &self,
        source: Opening<'_>,
        dest_ref: &[u8],
        dest_aad: &[u8],
    ) -> Result<Sealed, BackendError> {
        let source_iv = gcm_iv(source.iv)?;
        let iv = fresh_iv();
        let ciphertext = self.with_session("AES-GCM re-wrap", |s| {
            let plaintext = self.decrypt_in(s, &source, source_iv)?;
            self.encrypt_in(s, dest_ref, iv, dest_aad, &plaintext)
        })?;
        Ok(Sealed {
            iv: iv.to_vec(),
            ciphertext,
        })
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let len = u32::try_from(len)
            .map_err(|_| BackendError::InvalidInput("random length too large".into()))?;
        self.with_session("C_GenerateRandom", |s| {
            s.session()
                .generate_random_vec(len)
                .map(Zeroizing::new)
                .map_err(OpError::Ck)
        })
    }

    fn destroy_key_version(&self, backend_ref: &[u8]) -> Result<(), BackendError> {
        self.with_exclusive_session("destroy key object", |s| {
            let key = self.key_handle(s, backend_ref)?;
            s.session().destroy_object(key).map_err(OpError::Ck)
        })?;
        if let Ok(mut h) = self.handles.write() {
            h.remove(backend_ref);
        }
        Ok(())
    }

    fn audit_public_key(&self) -> Result<Vec<u8>, BackendError> {
        self.audit_point()
    }

    fn sign_audit_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, BackendError> {
        self.audit_sign(digest)
    }

    fn run_without_waiting(&self, op: &mut dyn FnMut(&dyn KeyBackend)) -> bool {
        if !self.inline_calls {
            return false;
        }
        let scope = no_wait::Scope::enter();
        op(self);
        !scope.gave_up()
    }

    fn session_usage(&self) -> (usize, usize, usize) {
        let s = self.pool.stats();
        (s.in_use, s.waiting, s.idle)
    }

    fn check_health(&self) -> Result<(), BackendError> {
        self.with_session("health check", |s| {
            s.session().get_session_info().map_err(OpError::Ck)?;
            if sentinel_visible(s)? {
                Ok(())
            } else {
                Err(OpError::TokenGone)
            }
        })
    }
}

/// A fresh random 96-bit GCM IV from the OS CSPRNG (SoftHSM never makes one).
fn fresh_iv() -> [u8; GCM_IV_LEN] {
    let mut iv = [0u8; GCM_IV_LEN];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    iv
}

/// A stored IV, which must be exactly 96 bits.
fn gcm_iv(iv: &[u8]) -> Result<[u8; GCM_IV_LEN], BackendError> {
    iv.try_into()
        .map_err(|_| BackendError::InvalidInput(format!("GCM IV must be {GCM_IV_LEN} bytes")))
}
