//! The backend-level tests, written once against `dyn Fixture` and run for every backend by
//! the `conformance!` macro in `main.rs`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kms_server::backend::{BackendError, KeyBackend, Opening};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use uuid::Uuid;

use crate::fixtures::Fixture;

fn new_version(b: &dyn KeyBackend) -> Vec<u8> {
    b.create_key_version(&format!("kms:{}:v1", Uuid::new_v4()))
        .unwrap()
}

fn failed<T: std::fmt::Debug>(r: Result<T, BackendError>) -> bool {
    matches!(r, Err(BackendError::DecryptionFailed))
}

pub fn round_trip_32_bytes_and_4_kib(f: &mut dyn Fixture) {
    let b = f.backend();
    let m = b.mechanism();
    let key = new_version(b.as_ref());
    for len in [0usize, 1, 32, 1000, 1024, 1025, 4096] {
        let plain = b.random(len).unwrap();
        let sealed = b.seal(&key, b"aad", &plain).unwrap();
        assert_eq!(sealed.iv.len(), m.iv_len());
        assert_eq!(sealed.ciphertext.len(), len + m.overhead(), "len {len}");
        if len >= 16 {
            assert_ne!(&sealed.ciphertext[..16], &plain[..16], "not encrypted");
        }
        let opened = b
            .open(&key, &sealed.iv, b"aad", &sealed.ciphertext)
            .unwrap();
        assert_eq!(&opened[..], &plain[..], "len {len}");
    }
}

pub fn fresh_iv_per_seal(f: &mut dyn Fixture) {
    let b = f.backend();
    let key = new_version(b.as_ref());
    let mut ivs = HashSet::new();
    let mut cts = HashSet::new();
    for _ in 0..500 {
        let s = b.seal(&key, b"iv", &[7u8; 32]).unwrap();
        assert!(ivs.insert(s.iv), "IV repeated");
        assert!(cts.insert(s.ciphertext), "ciphertext repeated");
    }
}

pub fn tampering_is_detected(f: &mut dyn Fixture) {
    let b = f.backend();
    let m = b.mechanism();
    let key = new_version(b.as_ref());
    let other = new_version(b.as_ref());
    for len in [32usize, 4096] {
        let plain = b.random(len).unwrap();
        let s = b.seal(&key, b"aad-1", &plain).unwrap();
        let ct = &s.ciphertext;
        assert!(
            failed(b.open(&key, &s.iv, b"aad-2", ct)),
            "wrong AAD accepted"
        );
        assert!(failed(b.open(&key, &s.iv, b"", ct)), "empty AAD accepted");
        assert!(
            failed(b.open(&other, &s.iv, b"aad-1", ct)),
            "wrong key version accepted"
        );
        for i in [0, m.iv_len() - 1] {
            let mut iv = s.iv.clone();
            iv[i] ^= 1;
            assert!(
                failed(b.open(&key, &iv, b"aad-1", ct)),
                "modified IV byte {i} accepted"
            );
        }
        let tag_start = ct.len() - m.overhead();
        for i in [0, len / 2, tag_start - 1, tag_start, ct.len() - 1] {
            let mut c = ct.clone();
            c[i] ^= 0x80;
            assert!(
                failed(b.open(&key, &s.iv, b"aad-1", &c)),
                "flipped byte {i} accepted"
            );
        }
        for cut in [1, m.overhead(), ct.len()] {
            assert!(
                failed(b.open(&key, &s.iv, b"aad-1", &ct[..ct.len() - cut])),
                "truncation by {cut} accepted"
            );
        }
        let mut longer = ct.clone();
        longer.push(0);
        assert!(
            failed(b.open(&key, &s.iv, b"aad-1", &longer)),
            "extended ciphertext accepted"
        );
    }
    let s = b.seal(&key, b"a", b"x").unwrap();
    let r = b.open(&key, &[0u8; 7], b"a", &s.ciphertext);
    assert!(matches!(r, Err(BackendError::InvalidInput(_))), "{r:?}");
}

pub fn reseal_moves_a_blob_to_another_version_and_context(f: &mut dyn Fixture) {
    let b = f.backend();
    let m = b.mechanism();
    let v1 = new_version(b.as_ref());
    let v2 = new_version(b.as_ref());
    let plain = b.random(32).unwrap();
    let s1 = b.seal(&v1, b"ctx-1", &plain).unwrap();
    let from = |aad: &'static [u8]| Opening {
        backend_ref: &v1,
        iv: &s1.iv,
        aad,
        ciphertext: &s1.ciphertext,
    };
    let s2 = b.reseal(from(b"ctx-1"), &v2, b"ctx-2").unwrap();
    assert_eq!(s2.iv.len(), m.iv_len());
    assert_ne!(s2.iv, s1.iv, "the re-wrap reused the IV");
    assert_ne!(s2.ciphertext, s1.ciphertext);
    let opened = b.open(&v2, &s2.iv, b"ctx-2", &s2.ciphertext).unwrap();
    assert_eq!(&opened[..], &plain[..]);
    // Bound to the new version and context, not the old ones.
    assert!(failed(b.open(&v2, &s2.iv, b"ctx-1", &s2.ciphertext)));
    assert!(failed(b.open(&v1, &s2.iv, b"ctx-2", &s2.ciphertext)));
    // A wrong source context, a tampered source or a wrong IV length re-wraps nothing.
    assert!(failed(b.reseal(from(b"ctx-x"), &v2, b"ctx-2")));
    let mut tampered = s1.ciphertext.clone();
    tampered[0] ^= 1;
    let bad = Opening {
        ciphertext: &tampered,
        ..from(b"ctx-1")
    };
    assert!(failed(b.reseal(bad, &v2, b"ctx-2")));
    let short = Opening {
        iv: &s1.iv[1..],
        ..from(b"ctx-1")
    };
    assert!(matches!(
        b.reseal(short, &v2, b"ctx-2"),
        Err(BackendError::InvalidInput(_))
    ));
}

pub fn random_lengths_and_non_repetition(f: &mut dyn Fixture) {
    let b = f.backend();
    for len in [0usize, 1, 16, 31, 32, 33, 64, 100, 1000] {
        assert_eq!(b.random(len).unwrap().len(), len);
    }
    let mut seen = HashSet::new();
    for _ in 0..300 {
        assert!(
            seen.insert(b.random(32).unwrap().to_vec()),
            "random repeated"
        );
    }
    // Not constant: 1000 bytes use well over a few distinct values.
    let r = b.random(1000).unwrap();
    assert!(r.iter().collect::<HashSet<_>>().len() > 200);
}

pub fn unknown_reference_is_not_found(f: &mut dyn Fixture) {
    let b = f.backend();
    for r in [&b"kms:no-such-key:v1"[..], b"", b"KTPM\x01\x00\x05abc"] {
        let got = b.seal(r, b"", b"x");
        assert!(matches!(got, Err(BackendError::KeyNotFound(_))), "{got:?}");
    }
}

pub fn destroyed_version_never_opens_again(f: &mut dyn Fixture) {
    let b = f.backend();
    let key = new_version(b.as_ref());
    let keep = new_version(b.as_ref());
    let sealed = b.seal(&key, b"a", b"secret").unwrap();
    let kept = b.seal(&keep, b"a", b"other").unwrap();
    b.destroy_key_version(&key).unwrap();
    let r = b.open(&key, &sealed.iv, b"a", &sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
    let r = b.seal(&key, b"a", b"more");
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
    assert_eq!(
        &b.open(&keep, &kept.iv, b"a", &kept.ciphertext).unwrap()[..],
        b"other"
    );
}

pub fn key_material_is_not_extractable(f: &mut dyn Fixture) {
    let key = new_version(f.backend().as_ref());
    f.assert_not_extractable(&key);
}

fn verifying_key(point: &[u8]) -> VerifyingKey {
    // PKCS#11 returns CKA_EC_POINT DER-wrapped (04 41 04…); the TPM the raw point.
    let raw = match point {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        _ => point,
    };
    VerifyingKey::from_sec1_bytes(raw).unwrap()
}

pub fn audit_signatures_verify(f: &mut dyn Fixture) {
    let b = f.backend();
    let public = b.audit_public_key().unwrap();
    assert_eq!(b.audit_public_key().unwrap(), public, "audit key changed");
    let key = verifying_key(&public);
    for i in 0..3u8 {
        let digest = [i; 32];
        let raw = b.sign_audit_digest(&digest).unwrap();
        assert_eq!(raw.len(), 64);
        let sig = Signature::from_slice(&raw).unwrap();
        key.verify_prehash(&digest, &sig).unwrap();
        let mut other = digest;
        other[0] ^= 1;
        assert!(key.verify_prehash(&other, &sig).is_err());
    }
}

pub fn concurrent_use_from_many_threads(f: &mut dyn Fixture) {
    let b = f.backend();
    // Several versions, so a TPM's one-version object cache keeps changing hands.
    let keys: Vec<Vec<u8>> = (0..3).map(|_| new_version(b.as_ref())).collect();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let b = b.clone();
            let keys = keys.clone();
            std::thread::spawn(move || {
                for i in 0..60 {
                    let key = &keys[(t + i) % keys.len()];
                    let aad = format!("{t}-{i}");
                    let plain = b.random(32).unwrap();
                    let s = b.seal(key, aad.as_bytes(), &plain).unwrap();
                    let o = b.open(key, &s.iv, aad.as_bytes(), &s.ciphertext).unwrap();
                    assert_eq!(&o[..], &plain[..]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    b.check_health().unwrap();
}

/// Retries `op` until it succeeds (the device is back) or 20 s pass.
fn eventually<T>(what: &str, mut op: impl FnMut() -> Result<T, BackendError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match op() {
            Ok(v) => return v,
            Err(e) => {
                assert!(
                    matches!(e, BackendError::Unavailable(_)),
                    "{what}: while recovering got {e:?}, not Unavailable"
                );
                assert!(Instant::now() < deadline, "{what}: no recovery: {e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

pub fn device_outage_then_recovery(f: &mut dyn Fixture) {
    let b = f.backend();
    let key = new_version(b.as_ref());
    let before = b.seal(&key, b"a", b"before the outage").unwrap();
    b.check_health().unwrap();

    f.break_device();
    // Every kind of call fails as Unavailable: never a wrong answer, never DecryptionFailed.
    for _ in 0..3 {
        let r = b.open(&key, &before.iv, b"a", &before.ciphertext);
        assert!(
            matches!(r, Err(BackendError::Unavailable(_))),
            "open: {r:?}"
        );
        let r = b.seal(&key, b"a", b"x");
        assert!(
            matches!(r, Err(BackendError::Unavailable(_))),
            "seal: {r:?}"
        );
        let r = b.random(32);
        assert!(
            matches!(r, Err(BackendError::Unavailable(_))),
            "random: {r:?}"
        );
        let r = b.check_health();
        assert!(
            matches!(r, Err(BackendError::Unavailable(_))),
            "health: {r:?}"
        );
    }

    f.restore_device();
    // The same backend object recovers by itself; keys made before the outage still work.
    let opened = eventually("open", || {
        b.open(&key, &before.iv, b"a", &before.ciphertext)
    });
    assert_eq!(&opened[..], b"before the outage");
    b.check_health().unwrap();
    let after = b.seal(&key, b"a", b"after").unwrap();
    assert_eq!(
        &b.open(&key, &after.iv, b"a", &after.ciphertext).unwrap()[..],
        b"after"
    );
    let fresh = new_version(b.as_ref());
    b.seal(&fresh, b"a", b"x").unwrap();
    let digest = [9u8; 32];
    let raw = b.sign_audit_digest(&digest).unwrap();
    let key = verifying_key(&b.audit_public_key().unwrap());
    key.verify_prehash(&digest, &Signature::from_slice(&raw).unwrap())
        .unwrap();
}
