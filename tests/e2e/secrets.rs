//! No secret reaches the server's files: after data keys, encryption and decryption (and some
//! refused requests), neither the log (JSON and text) nor the SQLite database (with its WAL)
//! nor any other file the server writes outside the HSM token directory contains the PIN, a
//! plaintext data key (raw, hex or base64) or a caller's plaintext.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_proto::kms::v1 as pb;
use kms_tests::{wire_ctx, KmsServer, ServerOptions, PIN};

/// Standard base64; `url` selects the URL-safe alphabet, `pad` the trailing '='.
fn base64(data: &[u8], url: bool, pad: bool) -> String {
    let alphabet: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

/// A secret and the encodings in which it might leak.
pub(crate) fn encodings(name: &str, secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{name} (raw)"), secret.to_vec()),
        (format!("{name} (hex)"), hex::encode(secret).into_bytes()),
        (
            format!("{name} (HEX)"),
            hex::encode_upper(secret).into_bytes(),
        ),
        (
            format!("{name} (base64)"),
            base64(secret, false, true).into_bytes(),
        ),
        (
            format!("{name} (base64, unpadded)"),
            base64(secret, false, false).into_bytes(),
        ),
        (
            format!("{name} (base64url)"),
            base64(secret, true, false).into_bytes(),
        ),
        // Debug of a Vec<u8>: "[12, 200, ...]".
        (
            format!("{name} (Debug bytes)"),
            format!("{secret:?}").into_bytes(),
        ),
    ]
}

/// Every file under `root` except the HSM token directory (which legitimately holds the PIN
/// file and the wrapped key objects).
fn files_outside(root: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.starts_with(skip) {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Which needles occur in which files (by file name).
fn scan(server: &KmsServer, needles: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for file in files_outside(server.dir.path(), &server.token_dir) {
        let content = std::fs::read(&file).unwrap();
        let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (name, needle) in needles {
            if content
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
            {
                found.push((name.clone(), file_name.clone()));
            }
        }
    }
    found
}

/// Scans for the secrets, plus controls that must be found: the key id (in the log and the
/// database), so a scan that cannot see the files fails.
fn assert_no_secrets(server: &KmsServer, secrets: &[(String, Vec<u8>)], key_id: &str, when: &str) {
    let mut needles = secrets.to_vec();
    needles.push(("control: key id".into(), key_id.as_bytes().to_vec()));
    needles.push((
        "control: key id bytes".into(),
        uuid::Uuid::parse_str(key_id).unwrap().as_bytes().to_vec(),
    ));
    let found = scan(server, &needles);
    let leaks: Vec<_> = found
        .iter()
        .filter(|(name, _)| !name.starts_with("control"))
        .collect();
    assert!(
        leaks.is_empty(),
        "{when}: secrets found in server files: {leaks:?}"
    );
    let controls: Vec<_> = found
        .iter()
        .filter(|(name, _)| name.starts_with("control"))
        .map(|(_, f)| f.as_str())
        .collect();
    assert!(
        controls.contains(&"kms-server.log"),
        "{when}: the scan did not see the key id in the log: {found:?}"
    );
    assert!(
        controls.iter().any(|f| f.starts_with("kms.db")),
        "{when}: the scan did not see the key in the database: {found:?}"
    );
}

async fn no_secrets_in_files(log_json: bool) {
    let mut server = KmsServer::start(ServerOptions {
        log_json,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut kms = server.raw("app").await.unwrap();
    let note = format!("TRAUMA-NOTE-{}", uuid::Uuid::new_v4());
    let c = || wire_ctx(&[("site", "a"), ("client", "c-17"), ("note", "n-3")]);
    let create = |alias: &str| pb::CreateKeyRequest {
        alias: alias.into(),
        description: "notes".into(),
        ..Default::default()
    };
    let key = kms
        .create_key(create("secrets"))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let other = kms
        .create_key(create("secrets-2"))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let dec = |blob: &[u8], ctx| pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx,
        audit: None,
    };

    let mut data_keys: Vec<Vec<u8>> = Vec::new();
    for _ in 0..5 {
        let req = pb::GenerateDataKeyRequest {
            key: "secrets".into(),
            encryption_context: c(),
        };
        let dk = kms.generate_data_key(req).await.unwrap().into_inner();
        let back = kms
            .decrypt(dec(&dk.ciphertext_blob, c()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, dk.plaintext);
        data_keys.push(dk.plaintext);
    }
    for _ in 0..2 {
        let req = pb::GenerateDataKeyWithoutPlaintextRequest {
            key: key.key_id.clone(),
            encryption_context: c(),
        };
        let blob = kms
            .generate_data_key_without_plaintext(req)
            .await
            .unwrap()
            .into_inner()
            .ciphertext_blob;
        data_keys.push(
            kms.decrypt(dec(&blob, c()))
                .await
                .unwrap()
                .into_inner()
                .plaintext,
        );
    }
    let req = pb::EncryptRequest {
        key: "secrets".into(),
        plaintext: note.as_bytes().to_vec(),
        encryption_context: c(),
    };
    let ct = kms.encrypt(req).await.unwrap().into_inner().ciphertext_blob;
    assert_eq!(
        kms.decrypt(dec(&ct, c()))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        note.as_bytes()
    );
    let req = pb::ReEncryptRequest {
        ciphertext_blob: ct.clone(),
        source_encryption_context: c(),
        destination_key: "secrets-2".into(),
        ..Default::default()
    };
    let moved = kms
        .re_encrypt(req)
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    assert_eq!(
        kms.decrypt(dec(&moved, c()))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        note.as_bytes()
    );
    // Refusals are logged: they must not carry the plaintext either.
    let wrong = kms
        .decrypt(dec(&ct, wire_ctx(&[("site", "b")])))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    let req = pb::EncryptRequest {
        key: "no-such-key".into(),
        plaintext: note.as_bytes().to_vec(),
        encryption_context: c(),
    };
    assert_eq!(
        kms.encrypt(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    kms.disable_key(pb::DisableKeyRequest {
        key: "secrets".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        kms.decrypt(dec(&ct, c())).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    let mut needles = vec![("the PIN".to_string(), PIN.as_bytes().to_vec())];
    needles.extend(encodings("the note", note.as_bytes()));
    for (i, dk) in data_keys.iter().enumerate() {
        assert_eq!(dk.len(), 32);
        needles.extend(encodings(&format!("data key {i}"), dk));
    }

    // The scan can see things: the log names the keys created, in the chosen format.
    let log = server.log();
    assert!(
        log.contains(&key.key_id) && log.contains(&other.key_id),
        "log lacks the key ids:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    if log_json {
        for line in &lines {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        }
    } else {
        assert!(
            lines.iter().all(|l| !l.starts_with('{')),
            "text log looks like JSON:\n{log}"
        );
    }

    // While running (the SQLite WAL holds recent writes), then after a clean stop.
    assert_no_secrets(&server, &needles, &key.key_id, "running");
    let status =
        tokio::task::block_in_place(|| server.signal_and_wait("TERM", Duration::from_secs(10)))
            .unwrap();
    assert!(status.success());
    assert_no_secrets(&server, &needles, &key.key_id, "stopped");
    assert!(!server.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secrets_in_json_log_or_database() {
    no_secrets_in_files(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secrets_in_text_log_or_database() {
    no_secrets_in_files(false).await;
}

#[test]
fn base64_matches_known_answers() {
    assert_eq!(base64(b"", false, true), "");
    assert_eq!(base64(b"f", false, true), "Zg==");
    assert_eq!(base64(b"fo", false, true), "Zm8=");
    assert_eq!(base64(b"foo", false, true), "Zm9v");
    assert_eq!(base64(b"foob", false, false), "Zm9vYg");
    assert_eq!(base64(&[0xfb, 0xff], false, true), "+/8=");
    assert_eq!(base64(&[0xfb, 0xff], true, false), "-_8");
}
