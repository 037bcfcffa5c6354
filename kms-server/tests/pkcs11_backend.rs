//! The PKCS#11 backend against a real SoftHSM token (no mocks).
//!
//! PKCS#11 can be initialised once per process, so this test binary shares one private token
//! directory (SOFTHSM2_CONF is set before the library loads) and one token; every test uses
//! its own key objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kms_server::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use kms_server::backend::{BackendError, KeyBackend};
use uuid::Uuid;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "backend-tests";
const PIN: &str = "test-user-pin-1234";

struct Token {
    _dir: tempfile::TempDir,
    conf: PathBuf,
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
        let conf = dir.path().join("softhsm2.conf");
        // Must happen before the PKCS#11 library is loaded in this process.
        std::env::set_var("SOFTHSM2_CONF", &conf);
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
            _dir: dir,
            conf,
            backend: Arc::new(backend),
        }
    })
}

fn new_key() -> Vec<u8> {
    token()
        .backend
        .create_key_version(&format!("kms:{}:v1", Uuid::new_v4()))
        .unwrap()
}

#[test]
fn master_keys_are_sensitive_and_never_extractable() {
    let key = new_key();
    let p = token().backend.key_protection(&key).unwrap();
    assert!(p.sensitive && p.always_sensitive, "{p:?}");
    assert!(!p.extractable && p.never_extractable, "{p:?}");
    assert!(p.local && p.token && p.private, "{p:?}");
    assert!(p.encrypt && p.decrypt, "{p:?}");
    assert!(!p.sign && !p.wrap && !p.unwrap && !p.derive, "{p:?}");
    assert_eq!(p.value_len, 32);
}

#[test]
fn pkcs11_tool_sees_a_non_extractable_key() {
    let key = new_key();
    let label = String::from_utf8(key).unwrap();
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            module().to_str().unwrap(),
            "--token-label",
            LABEL,
            "--login",
            "--pin",
            PIN,
        ])
        .args(["--list-objects", "--type", "secrkey", "--label", &label])
        .env("SOFTHSM2_CONF", &token().conf)
        .output()
        .expect("pkcs11-tool (package opensc) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pkcs11-tool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&label), "{text}");
    assert!(text.contains("AES length 32"), "{text}");
    for flag in [
        "sensitive",
        "always sensitive",
        "never extractable",
        "local",
    ] {
        assert!(text.contains(flag), "missing {flag:?} in: {text}");
    }
    // The key's usage line must not offer wrap/sign.
    let usage = text
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .unwrap_or("");
    assert!(
        usage.contains("encrypt") && usage.contains("decrypt"),
        "{usage}"
    );
    assert!(
        !usage.contains("wrap") && !usage.contains("sign"),
        "{usage}"
    );
}

#[test]
fn seal_open_round_trip_and_authentication() {
    let b = &token().backend;
    let key = new_key();
    let other_key = new_key();
    let dk = b.random(32).unwrap();
    let sealed = b.seal(&key, b"aad-1", &dk).unwrap();
    assert_eq!(sealed.iv.len(), 12);
    assert_eq!(sealed.ciphertext.len(), 48);
    assert_ne!(&sealed.ciphertext[..32], &dk[..]);
    assert_eq!(
        &b.open(&key, &sealed.iv, b"aad-1", &sealed.ciphertext)
            .unwrap()[..],
        &dk[..]
    );

    let fail = |r: Result<_, BackendError>| matches!(r, Err(BackendError::DecryptionFailed));
    assert!(
        fail(b.open(&key, &sealed.iv, b"aad-2", &sealed.ciphertext)),
        "wrong AAD accepted"
    );
    assert!(
        fail(b.open(&other_key, &sealed.iv, b"aad-1", &sealed.ciphertext)),
        "wrong key accepted"
    );
    let mut iv = sealed.iv.clone();
    iv[0] ^= 1;
    assert!(
        fail(b.open(&key, &iv, b"aad-1", &sealed.ciphertext)),
        "wrong IV accepted"
    );
    for i in [0, 31, 32, 47] {
        let mut ct = sealed.ciphertext.clone();
        ct[i] ^= 0x80;
        assert!(
            fail(b.open(&key, &sealed.iv, b"aad-1", &ct)),
            "flipped byte {i} accepted"
        );
    }
    assert!(
        fail(b.open(&key, &sealed.iv, b"aad-1", &sealed.ciphertext[..47])),
        "truncated tag accepted"
    );
    assert!(matches!(
        b.open(&key, &[0u8; 16], b"aad-1", &sealed.ciphertext),
        Err(BackendError::InvalidInput(_))
    ));
}

#[test]
fn unknown_key_object_is_reported() {
    let b = &token().backend;
    let r = b.seal(b"kms:no-such-key:v1", b"", b"x");
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
}

#[test]
fn destroyed_key_version_can_never_open_again() {
    let b = &token().backend;
    let key = new_key();
    let sealed = b.seal(&key, b"a", b"secret").unwrap();
    b.destroy_key_version(&key).unwrap();
    let r = b.open(&key, &sealed.iv, b"a", &sealed.ciphertext);
    assert!(matches!(r, Err(BackendError::KeyNotFound(_))), "{r:?}");
}

#[test]
fn ivs_are_unique_over_100k_wraps() {
    let b = token().backend.clone();
    let key = new_key();
    let mut seen = HashSet::with_capacity(100_000);
    let data = [7u8; 32];
    for _ in 0..100_000 {
        let s = b.seal(&key, b"iv-test", &data).unwrap();
        assert!(seen.insert(s.iv), "IV repeated");
    }
    assert_eq!(seen.len(), 100_000);
}

#[test]
fn concurrent_use_from_many_threads() {
    let b = token().backend.clone();
    let key = new_key();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let b = b.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let aad = format!("{t}-{i}");
                    let s = b.seal(&key, aad.as_bytes(), b"payload").unwrap();
                    assert_eq!(
                        &b.open(&key, &s.iv, aad.as_bytes(), &s.ciphertext).unwrap()[..],
                        b"payload"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Other tests share this backend, so only the bound is checked here.
    let (in_use, _waiting, idle) = b.session_usage();
    assert!(
        in_use + idle <= 2,
        "pool grew beyond max_sessions: {in_use} in use, {idle} idle"
    );
}

/// A no-wait call (`run_without_waiting`, what the service uses for data-key calls on its
/// async workers) gives up instead of waiting while a key creation holds the token, and
/// succeeds once the token is free. If it waited, it would wait for this very thread: the
/// call runs on a helper thread with a deadline so that shows as a failure, not a hang.
#[test]
fn no_wait_calls_give_up_while_the_token_is_held() {
    let key = new_key();
    let b = token().backend.clone();
    let attempt = |b: Arc<Pkcs11Backend>, key: Vec<u8>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sealed = None;
            let ran = b.run_without_waiting(&mut |b| {
                sealed = Some(b.seal(&key, b"aad", b"payload"));
            });
            let _ = tx.send((ran, sealed));
        });
        rx.recv_timeout(Duration::from_secs(3))
            .expect("a no-wait call waited for the token")
    };

    let held = b.hold_token_exclusively();
    let (ran, sealed) = attempt(b.clone(), key.clone());
    assert!(!ran, "the call must report that it gave up");
    assert!(
        matches!(sealed, Some(Err(BackendError::Unavailable(_)))),
        "{sealed:?}"
    );
    drop(held);

    let (ran, sealed) = attempt(b.clone(), key.clone());
    assert!(ran);
    let s = sealed.unwrap().unwrap();
    assert_eq!(
        &b.open(&key, &s.iv, b"aad", &s.ciphertext).unwrap()[..],
        b"payload"
    );
}
