//! TPM-only checks (handle hygiene, recovery bookkeeping) and the cross-backend refusal.

use std::process::Command;
use std::time::Duration;

use kms_server::backend::tpm::{TpmBackend, TpmSettings};
use kms_server::backend::{BackendError, KeyBackend, Mechanism};
use kms_server::context::EncryptionContext;
use kms_server::envelope::{self, Envelope};
use uuid::Uuid;

use crate::fixtures::{Fixture, SoftHsm, Tpm};
use crate::swtpm::Swtpm;

/// Objects left loaded by a crashed process fill the TPM's 3 transient slots; the backend
/// flushes them when it connects instead of failing with "out of object memory".
#[test]
fn stale_transient_objects_are_flushed_at_start() {
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        // Without a resource manager, tpm2_createprimary leaves its object loaded.
        let out = Command::new("tpm2_createprimary")
            .args(["-C", "o", "-G", "ecc", "-c"])
            .arg(dir.path().join(format!("p{i}.ctx")))
            .env("TPM2TOOLS_TCTI", swtpm.tcti())
            .env("TSS2_LOG", "all+none")
            .output()
            .expect("tpm2-tools must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("tpm2_getcap")
        .arg("handles-transient")
        .env("TPM2TOOLS_TCTI", swtpm.tcti())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).matches("0x80").count();
    assert_eq!(
        listed,
        3,
        "expected 3 stale objects: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let backend = TpmBackend::new(TpmSettings {
        tcti: swtpm.tcti(),
        request_timeout: Duration::from_secs(20),
    })
    .unwrap();
    let key = backend.create_key_version("kms:stale:v1").unwrap();
    let s = backend.seal(&key, b"a", b"works").unwrap();
    assert_eq!(
        &backend.open(&key, &s.iv, b"a", &s.ciphertext).unwrap()[..],
        b"works"
    );
}

/// After the TPM restarts, the backend reconnects once and re-derives the same storage
/// primary and audit key: blobs and signatures made before still work.
#[test]
fn tpm_restart_reconnects_and_keeps_keys() {
    let mut t = Tpm::new();
    let b = t.backend.clone();
    let key = b.create_key_version("kms:restart:v1").unwrap();
    let s = b.seal(&key, b"a", b"kept").unwrap();
    let audit_key = b.audit_public_key().unwrap();
    assert_eq!(b.connects().unwrap(), 1);

    t.swtpm.restart();
    // The first call after the restart hits the closed connection.
    let first = b.open(&key, &s.iv, b"a", &s.ciphertext);
    assert!(
        matches!(first, Err(BackendError::Unavailable(_))),
        "{first:?}"
    );
    assert_eq!(
        &b.open(&key, &s.iv, b"a", &s.ciphertext).unwrap()[..],
        b"kept"
    );
    assert_eq!(b.connects().unwrap(), 2);

    // A new KMS process on the restarted TPM (swtpm serves one connection at a time, so the
    // old backend goes first) re-derives the same storage primary and audit key.
    let Tpm { swtpm, backend } = t;
    drop((backend, b));
    let again = TpmBackend::new(TpmSettings {
        tcti: swtpm.tcti(),
        request_timeout: Duration::from_secs(20),
    })
    .unwrap();
    assert_eq!(again.audit_public_key().unwrap(), audit_key);
    assert_eq!(
        &again.open(&key, &s.iv, b"a", &s.ciphertext).unwrap()[..],
        b"kept"
    );
}

/// A blob sealed by one backend is refused cleanly by the other: the envelope records the
/// mechanism (the service refuses a mismatch before calling the backend), and the backends
/// themselves refuse each other's references and IVs without panicking or decrypting.
#[test]
fn blobs_of_one_backend_are_refused_by_the_other() {
    let hsm = SoftHsm::new(false);
    let tpm = Tpm::new();
    let (h, t) = (hsm.backend(), tpm.backend());
    assert_eq!(h.mechanism(), Mechanism::Pkcs11AesGcm);
    assert_eq!(t.mechanism(), Mechanism::TpmAesCfbHmacSha256);

    let id = Uuid::new_v4();
    let ctx = EncryptionContext::default();
    let h_key = h.create_key_version(&format!("kms:{id}:v1")).unwrap();
    let t_key = t.create_key_version(&format!("kms:{id}:v1")).unwrap();

    let t_aad = envelope::aad(t.mechanism(), id, 1, &ctx);
    let t_sealed = t.seal(&t_key, &t_aad, &[5u8; 32]).unwrap();
    let blob = Envelope {
        mechanism: t.mechanism(),
        key_id: id,
        key_version: 1,
        iv: t_sealed.iv.clone(),
        ciphertext: t_sealed.ciphertext.clone(),
    }
    .to_bytes();
    let parsed = Envelope::parse(&blob).unwrap();
    assert_eq!(parsed.mechanism, Mechanism::TpmAesCfbHmacSha256);
    assert_ne!(parsed.mechanism, h.mechanism());

    let h_aad = envelope::aad(h.mechanism(), id, 1, &ctx);
    let h_sealed = h.seal(&h_key, &h_aad, &[5u8; 32]).unwrap();

    // TPM blob, IV and reference handed to the PKCS#11 backend.
    let r = h.open(&t_key, &t_sealed.iv, &t_aad, &t_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::InvalidInput(_))), "{r:?}");
    let r = h.open(&t_key, &h_sealed.iv, &t_aad, &t_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
    let r = h.open(&h_key, &t_sealed.iv[..12], &t_aad, &t_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::DecryptionFailed)), "{r:?}");
    // PKCS#11 blob, IV and label handed to the TPM backend.
    let r = t.open(&h_key, &h_sealed.iv, &h_aad, &h_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::InvalidInput(_))), "{r:?}");
    let r = t.open(&h_key, &t_sealed.iv, &h_aad, &h_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
    let mut iv16 = h_sealed.iv.clone();
    iv16.extend_from_slice(&[0; 4]);
    let r = t.open(&t_key, &iv16, &h_aad, &h_sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::DecryptionFailed)), "{r:?}");
}
