//! The kmsctl binary against a mock server: output formats, exit codes, error lines.

use std::{path::Path, process::Output};

use serde_json::Value;

use crate::mock::{closed_port, mock, setup, start};

/// Runs kmsctl with the dev PKI of `pki` and `args`; no KMSCTL_* variable leaks in.
async fn kmsctl(pki: &Path, endpoint: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kmsctl"));
    for var in ["ENDPOINT", "CA", "CERT", "KEY", "SERVER_NAME"] {
        command.env_remove(format!("KMSCTL_{var}"));
    }
    command
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("notes.pem"))
        .arg("--key")
        .arg(pki.join("notes.key"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The value of a `name: value` line of kmsctl's aligned text output.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == name).then(|| v.trim())
    })
}

fn json(out: &Output) -> Value {
    let text = stdout(out);
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn key_commands_in_text_and_json() {
    let pki = setup();
    let s = start(pki.path(), mock("a")).await;

    let text = stdout(&kmsctl(pki.path(), &s.url, &["key", "describe", "notes"]).await);
    assert_eq!(field(&text, "key_id"), Some("id-notes"), "{text}");
    assert_eq!(field(&text, "state"), Some("ENABLED"), "{text}");
    assert_eq!(
        field(&text, "created_at"),
        Some("2023-11-14T22:13:20Z"),
        "{text}"
    );
    assert_eq!(field(&text, "next_rotation_at"), Some("-"), "{text}");

    let text = stdout(&kmsctl(pki.path(), &s.url, &["key", "versions", "notes"]).await);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["VERSION", "STATE", "PRIMARY", "CREATED_AT"],
        "{text}"
    );
    assert_eq!(lines[1], ["1", "ENABLED", "2023-11-15T22:13:20Z"], "{text}");
    assert_eq!(
        lines[2],
        ["2", "ENABLED", "yes", "2023-11-16T22:13:20Z"],
        "{text}"
    );
    let v = json(&kmsctl(pki.path(), &s.url, &["--json", "key", "versions", "notes"]).await);
    assert_eq!(v["versions"][1]["primary"], true, "{v}");
    assert_eq!(v["versions"][0]["version"], 1, "{v}");

    let v = json(&kmsctl(pki.path(), &s.url, &["--json", "key", "disable", "k"]).await);
    assert_eq!(v["state"], "DISABLED");

    let list = stdout(&kmsctl(pki.path(), &s.url, &["key", "list", "--page-size", "2"]).await);
    assert_eq!(
        list.lines().count(),
        4,
        "header + 3 keys over 2 pages:\n{list}"
    );
    let v = json(&kmsctl(pki.path(), &s.url, &["key", "list", "--json"]).await);
    assert_eq!(v["keys"].as_array().unwrap().len(), 3);

    let v = json(
        &kmsctl(
            pki.path(),
            &s.url,
            &["--json", "key", "create", "--alias", "x"],
        )
        .await,
    );
    assert_eq!(v["alias"], "x");
}

#[tokio::test]
async fn encrypt_decrypt_reencrypt_and_datakeys() {
    let pki = setup();
    let s = start(pki.path(), mock("a")).await;
    let ctx = ["--context", "site=1", "--context", "note=2"];

    let mut args = vec!["--json", "encrypt", "notes", "--plaintext", "hello"];
    args.extend(ctx);
    let v = json(&kmsctl(pki.path(), &s.url, &args).await);
    let blob = v["ciphertext_blob"].as_str().unwrap().to_string();

    let mut args = vec!["decrypt", "--blob", &blob, "--purpose", "TREATMENT"];
    args.extend(ctx);
    let text = stdout(&kmsctl(pki.path(), &s.url, &args).await);
    assert!(text.contains("plaintext_encoding: utf8\n"), "{text}");
    assert!(text.contains("plaintext:          hello\n"), "{text}");
    args.insert(0, "--json");
    let v = json(&kmsctl(pki.path(), &s.url, &args).await);
    assert_eq!(v["plaintext"], "aGVsbG8="); // base64 of "hello"

    // Input from a file with non-UTF-8 bytes: shown as base64.
    let file = pki.path().join("in.bin");
    std::fs::write(&file, [0xff, 0x00]).unwrap();
    let v = json(
        &kmsctl(
            pki.path(),
            &s.url,
            &["--json", "encrypt", "k", "--in", file.to_str().unwrap()],
        )
        .await,
    );
    let blob = v["ciphertext_blob"].as_str().unwrap().to_string();
    let text = stdout(&kmsctl(pki.path(), &s.url, &["decrypt", "--blob", &blob]).await);
    assert!(text.contains("plaintext_encoding: base64\n"), "{text}");
    assert!(text.contains("/wA=\n"), "{text}");

    let v = json(
        &kmsctl(
            pki.path(),
            &s.url,
            &[
                "--json",
                "reencrypt",
                "--blob",
                &blob,
                "--to-key",
                "k2",
                "--to-context",
                "a=b",
            ],
        )
        .await,
    );
    assert_eq!(v["key_version"], 2);

    let v = json(&kmsctl(pki.path(), &s.url, &["--json", "datakey", "generate", "k"]).await);
    assert_eq!(v["plaintext"].as_str().unwrap().len(), 44); // 32 bytes in base64
    let v = json(
        &kmsctl(
            pki.path(),
            &s.url,
            &["--json", "datakey", "generate", "k", "--no-plaintext"],
        )
        .await,
    );
    assert!(v.get("plaintext").is_none());
    assert_eq!(v["ciphertext_blob"], "d3JhcHBlZA=="); // "wrapped"
}

#[tokio::test]
async fn failures_print_one_error_line_with_the_grpc_code() {
    let pki = setup();
    let s = start(pki.path(), mock("a")).await;

    let out = kmsctl(pki.path(), &s.url, &["key", "describe", "missing"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: NOT_FOUND: no such key\n"
    );

    let out = kmsctl(
        pki.path(),
        &s.url,
        &["decrypt", "--blob", "aGVsbG8=", "--purpose", "DENY"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: PERMISSION_DENIED: purpose not allowed\n"
    );

    let out = kmsctl(
        pki.path(),
        &closed_port(),
        &["--timeout-ms", "500", "key", "list"],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.starts_with("error: UNAVAILABLE: "), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert_eq!(err.lines().count(), 1);

    let out = kmsctl(pki.path(), &s.url, &["decrypt", "--blob", "not base64!"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --blob is not valid base64"));
}

#[tokio::test]
async fn pki_init_needs_no_server_and_never_prints_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmsctl"))
        .args(["--json", "pki", "init", "--dir"])
        .arg(&pki)
        .args([
            "--server-name",
            "localhost",
            "--server-name",
            "kms.dev",
            "--client",
            "notes",
        ])
        .env_remove("KMSCTL_SERVER_NAME")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(!text.contains("PRIVATE KEY"));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["created"].as_array().unwrap().len(), 6);
    assert!(pki.join("notes.key").exists());
}
