//! TPM 2.0 backend (tss-esapi 7.7 over libtss2; swtpm in development and tests).
//!
//! Each key version is a pair of TPM objects created under a storage primary: an AES-256-CFB
//! key and an HMAC-SHA256 key, both fixedTPM, fixedParent and sensitiveDataOrigin (generated
//! in the TPM, never duplicable out of it). Their TPM-wrapped blobs are the `backend_ref`
//! stored in the metadata database (`blob.rs`); only this TPM, with this owner seed, can load
//! them. The storage primary is re-derived from a fixed template at every connect, so nothing
//! needs to persist in the TPM. `seal`/`open` are AES-256-CFB + HMAC-SHA256 encrypt-then-MAC
//! (`cipher.rs`); audit checkpoints are signed by a re-derived ECDSA P-256 primary
//! (`signing.rs`). One owner thread holds the TSS context and serialises TPM access
//! (`device.rs`); TSS/TPM faults become UNAVAILABLE and the next call reconnects
//! (`errors.rs`).
//!
//! `destroy_key_version` flushes the version's objects and refuses its blob for the rest of
//! this process's life; the durable destruction is the caller deleting the `backend_ref`
//! from the metadata database (a TPM-wrapped blob cannot be revoked inside the TPM without
//! changing the owner seed, which would destroy every key). A copy of the blob kept
//! elsewhere (a database backup) stays loadable by this same TPM: protect backups, or clear
//! the TPM's owner hierarchy to retire all keys at once.

mod blob;
mod cipher;
mod device;
mod errors;
mod signing;
mod templates;

use std::str::FromStr;
use std::time::Duration;

use rand::RngCore;
use tss_esapi::tcti_ldr::TctiNameConf;
use zeroize::Zeroizing;

use self::blob::{ref_id, KeyBlobs};
pub use self::blob::{ObjectProtection, TpmKeyProtection};
use self::cipher::IV_LEN;
use self::device::{Device, Worker};
use super::{BackendError, KeyBackend, Mechanism, Sealed};

/// Settings for the TPM backend.
#[derive(Debug, Clone)]
pub struct TpmSettings {
    /// A TCTI string: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0`, `tabrmd:`.
    pub tcti: String,
    /// How long a request waits for the TPM before UNAVAILABLE.
    pub request_timeout: Duration,
}

pub struct TpmBackend {
    worker: Worker,
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend").finish_non_exhaustive()
    }
}

impl TpmBackend {
    /// Starts the owner thread and checks that the TPM answers and can derive the audit key.
    pub fn new(settings: TpmSettings) -> Result<Self, BackendError> {
        // (main.rs sets TSS2_LOG=all+none before any thread exists, to silence libtss2's
        // stderr: setting it here could race with C code reading the environment.)
        let tcti = TctiNameConf::from_str(&settings.tcti).map_err(|_| {
            BackendError::InvalidInput(format!("invalid TPM TCTI string {:?}", settings.tcti))
        })?;
        let worker = Worker::start(Device::new(tcti), settings.request_timeout)?;
        let backend = TpmBackend { worker };
        backend.check_health()?;
        backend.audit_public_key()?;
        Ok(backend)
    }

    /// How many times the backend has connected to the TPM (1 after start; one more after
    /// each recovery).
    pub fn connects(&self) -> Result<u64, BackendError> {
        self.worker.call(|d| Ok(d.connects))
    }

    fn blobs_for(
        device: &Device,
        backend_ref: &[u8],
    ) -> Result<([u8; 32], KeyBlobs), BackendError> {
        let id = ref_id(backend_ref);
        if device.destroyed.contains(&id) {
            return Err(BackendError::KeyNotFound(
                "the TPM key version was destroyed".into(),
            ));
        }
        Ok((id, KeyBlobs::decode(backend_ref)?))
    }
}

impl KeyBackend for TpmBackend {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::TpmAesCfbHmacSha256
    }

    fn create_key_version(&self, _name: &str) -> Result<Vec<u8>, BackendError> {
        // The name is not stored in the TPM: transient objects have no labels, and the blob
        // itself is what the metadata database keeps.
        let blobs = self.worker.call(|d| d.run(cipher::create_version))?;
        blobs.encode()
    }

    fn seal(
        &self,
        backend_ref: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Sealed, BackendError> {
        // IV: 16 fresh bytes from the OS CSPRNG (getrandom), as the PKCS#11 backend does; a
        // TPM round trip for it would cost a third of the seal.
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let backend_ref = backend_ref.to_vec();
        let aad = aad.to_vec();
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let ciphertext = self.worker.call(move |d| {
            let (id, blobs) = Self::blobs_for(d, &backend_ref)?;
            d.run(|c| cipher::seal(c, id, &blobs, &iv, &aad, &plaintext))
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
        let iv: [u8; IV_LEN] = iv
            .try_into()
            .map_err(|_| BackendError::InvalidInput(format!("CFB IV must be {IV_LEN} bytes")))?;
        let backend_ref = backend_ref.to_vec();
        let aad = aad.to_vec();
        let ciphertext = ciphertext.to_vec();
        self.worker.call(move |d| {
            let (id, blobs) = Self::blobs_for(d, &backend_ref)?;
            d.run(|c| cipher::open(c, id, &blobs, &iv, &aad, &ciphertext))
        })
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        if len > 1 << 20 {
            return Err(BackendError::InvalidInput("random length too large".into()));
        }
        self.worker.call(move |d| d.run(|c| cipher::random(c, len)))
    }

    fn destroy_key_version(&self, backend_ref: &[u8]) -> Result<(), BackendError> {
        let backend_ref = backend_ref.to_vec();
        self.worker.call(move |d| {
            let (id, _blobs) = Self::blobs_for(d, &backend_ref)?;
            d.run(|c| {
                if c.loaded.as_ref().is_some_and(|v| v.id == id) {
                    cipher::unload(c)?;
                }
                Ok(())
            })?;
            d.destroyed.insert(id);
            Ok(())
        })
    }

    fn check_health(&self) -> Result<(), BackendError> {
        self.worker
            .call(|d| d.run(|c| cipher::random(c, 1).map(|_| ())))
    }

    fn audit_public_key(&self) -> Result<Vec<u8>, BackendError> {
        self.worker.call(|d| {
            if let Some(p) = &d.audit_public {
                return Ok(p.clone());
            }
            let p = d.run(signing::public_key)?;
            d.audit_public = Some(p.clone());
            Ok(p)
        })
    }

    fn sign_audit_digest(&self, digest: &[u8; 32]) -> Result<Vec<u8>, BackendError> {
        let digest = *digest;
        self.worker
            .call(move |d| d.run(|c| signing::sign(c, &digest)))
    }

    fn session_usage(&self) -> (usize, usize, usize) {
        // One "session": the owner thread. Busy while a job runs; the rest wait.
        let pending = self.worker.pending();
        let in_use = pending.min(1);
        (in_use, pending - in_use, 1 - in_use)
    }
}
