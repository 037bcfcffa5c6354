//! The `KeyBackend` trait: the only code that touches master keys.
//!
//! Invariants every backend keeps:
//! 1. Master key material is generated inside the device and never leaves it in plaintext.
//!    `create_key_version` returns a *reference* (`backend_ref`) that is safe to store in the
//!    metadata database: a PKCS#11 object label, or a blob only the same TPM can load.
//! 2. `seal` is an authenticated encryption with associated data: `open` succeeds only with
//!    the same key version, the same AAD and an unmodified IV/ciphertext; any mismatch gives
//!    `BackendError::DecryptionFailed`, never wrong plaintext.
//! 3. Every `seal` uses a fresh random IV of `Mechanism::iv_len()` bytes.
//! 4. Plaintext returned by `open` and `random` is held in `Zeroizing` buffers.
//! 5. Device trouble (lost session, token gone, library error) is `Unavailable`; the backend
//!    recovers by itself on a later call once the device is back.
//! 6. Methods block: callers run them off the async runtime (`spawn_blocking`).

pub mod pkcs11;
#[cfg(feature = "tpm")]
pub mod tpm;

use zeroize::Zeroizing;

/// How a blob was sealed. Recorded in every wrapped-key envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mechanism {
    /// PKCS#11 `CKM_AES_GCM` with a 96-bit IV and a 128-bit tag.
    Pkcs11AesGcm = 1,
    /// TPM AES-256-CFB encrypt-then-MAC with a TPM HMAC-SHA256 key (TPM backend).
    TpmAesCfbHmacSha256 = 2,
}

impl Mechanism {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Mechanism::Pkcs11AesGcm),
            2 => Some(Mechanism::TpmAesCfbHmacSha256),
            _ => None,
        }
    }

    /// IV length in bytes.
    pub fn iv_len(self) -> usize {
        match self {
            Mechanism::Pkcs11AesGcm => 12,
            Mechanism::TpmAesCfbHmacSha256 => 16,
        }
    }

    /// Bytes the ciphertext grows by (GCM tag or HMAC).
    pub fn overhead(self) -> usize {
        match self {
            Mechanism::Pkcs11AesGcm => 16,
            Mechanism::TpmAesCfbHmacSha256 => 32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Authentication failed: wrong key version, AAD, IV or modified ciphertext.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The device or library is not usable right now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The referenced key object does not exist in the device.
    #[error("{0}")]
    KeyNotFound(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Internal(String),
}

/// The output of `seal`.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub iv: Vec<u8>,
    /// Ciphertext followed by the authentication tag.
    pub ciphertext: Vec<u8>,
}

/// What `open` needs, bundled for `reseal`.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    pub backend_ref: &'a [u8],
    pub iv: &'a [u8],
    pub aad: &'a [u8],
    pub ciphertext: &'a [u8],
}

pub trait KeyBackend: Send + Sync {
    /// "pkcs11" or "tpm", as stored in key metadata.
    fn kind(&self) -> &'static str;
    /// The mechanism `seal` uses.
    fn mechanism(&self) -> Mechanism;
    /// Generates a new AES-256 master key version inside the device; `name` is a unique,
    /// non-secret name (e.g. "kms:<key id>:v<version>"). Returns the reference to store.
    fn create_key_version(&self, name: &str) -> Result<Vec<u8>, BackendError>;
    /// Encrypts `plaintext` under the key version with AAD; fresh random IV.
    fn seal(
        &self,
        backend_ref: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Sealed, BackendError>;
    /// Decrypts and authenticates.
    fn open(
        &self,
        backend_ref: &[u8],
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackendError>;
    /// Opens a blob sealed under `source_ref` and seals its plaintext under `dest_ref` with a
    /// fresh IV: a re-wrap. The plaintext exists only inside this call, in a `Zeroizing`
    /// buffer. Backends that can do both in one device session override this.
    fn reseal(
        &self,
        source: Opening<'_>,
        dest_ref: &[u8],
        dest_aad: &[u8],
    ) -> Result<Sealed, BackendError> {
        let plaintext = self.open(source.backend_ref, source.iv, source.aad, source.ciphertext)?;
        self.seal(dest_ref, dest_aad, &plaintext)
    }
    /// `len` bytes from the device's random number generator.
    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, BackendError>;
    /// Destroys a key version's object. Blobs sealed under it can never be opened again.
    fn destroy_key_version(&self, backend_ref: &[u8]) -> Result<(), BackendError>;
    /// Checks that the device answers (used by the health service).
    fn check_health(&self) -> Result<(), BackendError>;
    /// The public half of the audit signing key (ECDSA P-256, private key inside the device,
    /// created on first use), as the device reports it: an uncompressed SEC1 point, possibly
    /// DER-wrapped (CKA_EC_POINT).
    fn audit_public_key(&self) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::Internal(format!(
            "{} backend cannot sign audit checkpoints",
            self.kind()
        )))
    }
    /// Signs a SHA-256 digest with the audit signing key: raw r||s, 64 bytes.
    fn sign_audit_digest(&self, _digest: &[u8; 32]) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::Internal(format!(
            "{} backend cannot sign audit checkpoints",
            self.kind()
        )))
    }
    /// Runs `op` (data-key work: `random`, `seal`, `open`, `reseal`) on the calling thread, an
    /// async worker, if the device answers in tens of µs, and such that nothing in it waits:
    /// no lock or session that is not free at once. Returns false when `op`'s outcome must be
    /// discarded and the work done again on the blocking pool: the backend does not run
    /// calls this way (the default), or something in `op` would have waited and gave up.
    fn run_without_waiting(&self, _op: &mut dyn FnMut(&dyn KeyBackend)) -> bool {
        false
    }

    /// Device sessions (in use, waiting for one, idle), for metrics.
    fn session_usage(&self) -> (usize, usize, usize) {
        (0, 0, 0)
    }
}
