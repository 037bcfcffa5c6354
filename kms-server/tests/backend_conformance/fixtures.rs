//! One fixture per backend: a ready `KeyBackend`, a way to take its device away and bring it
//! back, and the backend-specific check that key material cannot leave the device.
//!
//! SoftHSM: PKCS#11 can be initialised once per process, so every SoftHSM test shares one
//! private token (each test uses its own key objects). The outage test takes the token away
//! for everyone, so it holds a write lock that the other SoftHSM tests hold for reading.
//! swtpm: a private simulator per test (see `swtpm.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use kms_server::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use kms_server::backend::tpm::{TpmBackend, TpmKeyProtection, TpmSettings};
use kms_server::backend::KeyBackend;

use crate::swtpm::Swtpm;

pub trait Fixture {
    fn backend(&self) -> Arc<dyn KeyBackend>;
    /// Takes the device away (token directory moved away / TPM killed).
    fn break_device(&mut self);
    /// Brings it back (same token / same TPM state).
    fn restore_device(&mut self);
    /// Asserts the key version's material is generated in the device and cannot leave it.
    fn assert_not_extractable(&self, backend_ref: &[u8]);
}

// ---------------------------------------------------------------- SoftHSM

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "conformance";
const PIN: &str = "test-user-pin-1234";

struct Token {
    dir: tempfile::TempDir,
    backend: Arc<Pkcs11Backend>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn module() -> PathBuf {
    std::env::var("PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| MODULE.into())
}

fn token() -> &'static Token {
    static TOKEN: OnceLock<Token> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new(repo_root().join("softhsm-setup/init-token.sh"))
            .args(["--dir", dir.path().to_str().unwrap(), "--label", LABEL])
            .env("KMS_PKCS11_PIN", PIN)
            .env("KMS_PKCS11_SO_PIN", "test-so-pin-1234")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "init-token.sh failed");
        // Must happen before the PKCS#11 library is loaded in this process.
        std::env::set_var("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"));
        let backend = Pkcs11Backend::new(Pkcs11Settings {
            module: module(),
            token_label: LABEL.into(),
            pin: PIN.to_string().into(),
            max_sessions: 2,
            inline_calls: true,
            acquire_timeout: Duration::from_secs(5),
        })
        .unwrap();
        Token {
            dir,
            backend: Arc::new(backend),
        }
    })
}

static TOKEN_LOCK: RwLock<()> = RwLock::new(());

enum Guard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

pub struct SoftHsm {
    _guard: Guard,
}

impl SoftHsm {
    pub fn new(exclusive: bool) -> SoftHsm {
        let guard = if exclusive {
            Guard::Exclusive(TOKEN_LOCK.write().unwrap_or_else(|e| e.into_inner()))
        } else {
            Guard::Shared(TOKEN_LOCK.read().unwrap_or_else(|e| e.into_inner()))
        };
        token();
        SoftHsm { _guard: guard }
    }

    fn tokens(&self) -> (PathBuf, PathBuf) {
        let d = token().dir.path();
        (d.join("tokens"), d.join("tokens.parked"))
    }
}

impl Fixture for SoftHsm {
    fn backend(&self) -> Arc<dyn KeyBackend> {
        token().backend.clone()
    }

    fn break_device(&mut self) {
        assert!(matches!(self._guard, Guard::Exclusive(_)));
        let (tokens, parked) = self.tokens();
        std::fs::rename(&tokens, &parked).unwrap();
        std::fs::create_dir(&tokens).unwrap();
    }

    fn restore_device(&mut self) {
        let (tokens, parked) = self.tokens();
        std::fs::remove_dir(&tokens).unwrap();
        std::fs::rename(&parked, &tokens).unwrap();
    }

    fn assert_not_extractable(&self, backend_ref: &[u8]) {
        let p = token().backend.key_protection(backend_ref).unwrap();
        assert!(p.sensitive && p.always_sensitive, "{p:?}");
        assert!(!p.extractable && p.never_extractable, "{p:?}");
        assert!(p.local && p.token && p.private, "{p:?}");
        assert!(!p.sign && !p.wrap && !p.unwrap && !p.derive, "{p:?}");
        assert_eq!(p.value_len, 32);
    }
}

// ---------------------------------------------------------------- swtpm

pub struct Tpm {
    pub swtpm: Swtpm,
    pub backend: Arc<TpmBackend>,
}

impl Tpm {
    pub fn new() -> Tpm {
        let swtpm = Swtpm::start();
        let backend = TpmBackend::new(TpmSettings {
            tcti: swtpm.tcti(),
            request_timeout: Duration::from_secs(20),
        })
        .unwrap();
        Tpm {
            swtpm,
            backend: Arc::new(backend),
        }
    }
}

impl Fixture for Tpm {
    fn backend(&self) -> Arc<dyn KeyBackend> {
        self.backend.clone()
    }

    fn break_device(&mut self) {
        self.swtpm.stop();
    }

    fn restore_device(&mut self) {
        self.swtpm.restart();
    }

    fn assert_not_extractable(&self, backend_ref: &[u8]) {
        let p = TpmKeyProtection::of(backend_ref).unwrap();
        for o in [p.aes, p.hmac] {
            assert!(o.fixed_tpm && o.fixed_parent, "duplicable: {o:?}");
            assert!(o.sensitive_data_origin, "not generated in the TPM: {o:?}");
            assert!(!o.restricted, "{o:?}");
        }
        assert!(
            p.aes.is_aes_256_cfb && p.aes.decrypt && p.aes.sign_encrypt,
            "{:?}",
            p.aes
        );
        assert!(
            p.hmac.is_hmac_sha256 && !p.hmac.decrypt && p.hmac.sign_encrypt,
            "{:?}",
            p.hmac
        );
        // The TPM checks these public areas against the wrapped private parts on every load:
        // an edited attribute makes the blob unloadable.
        let mut edited = backend_ref.to_vec();
        let n = edited.len();
        edited[n - 3] ^= 0x01;
        let r = self.backend.seal(&edited, b"", b"x");
        assert!(r.is_err(), "an edited key blob was accepted");
    }
}
