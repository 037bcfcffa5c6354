//! The audit log through the real `kmsctl`: export (client library and CLI) verifies offline,
//! an edited or deleted line is caught and named by its seq, the server verifies its own
//! chain, query and tail print events, non-auditors are refused, and `audit report` accounts
//! for every Decrypt/ReEncrypt of one client.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kms_client::kms_audit::{self, ExportRecord};
use kms_client::{pki::client_uri, AuditMetadata, KmsClient};
use kms_tests::{binary, ctx, KmsServer, ServerOptions, AUDITOR};
use serde_json::Value;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `kmsctl audit verify` with no TLS material and an endpoint nobody listens on: offline.
fn verify_offline(export: &Path, key: &Path) -> Output {
    let mut cmd = Command::new(binary("kmsctl").unwrap());
    for var in ["ENDPOINT", "CA", "CERT", "KEY", "SERVER_NAME"] {
        cmd.env_remove(format!("KMSCTL_{var}"));
    }
    run(cmd
        .args([
            "--endpoint",
            "https://127.0.0.1:9",
            "audit",
            "verify",
            "--in",
        ])
        .arg(export)
        .arg("--public-key")
        .arg(key))
}

fn who(user: &str, purpose: &str) -> Option<AuditMetadata> {
    Some(AuditMetadata {
        acting_user: user.into(),
        purpose: purpose.into(),
    })
}

#[tokio::test]
async fn export_verifies_offline_and_tampering_is_named_by_seq() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("exp"), None).await.unwrap();
    let mut blobs = Vec::new();
    for note in ["n-1", "n-2", "n-3"] {
        let c = ctx(&[("client", "c-1"), ("note", note)]);
        blobs.push((app.generate_data_key("exp", &c).await.unwrap(), c));
    }
    let (dk, c) = &blobs[0];
    app.decrypt(&dk.ciphertext_blob, c, who("dr-lee", "TREATMENT"))
        .await
        .unwrap();

    // The client library: export + offline verification.
    let auditor = server.audit_client(AUDITOR).unwrap();
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let key = auditor.audit_public_key().await.unwrap();
    let report = kms_audit::verify(&records, &key.key);
    assert!(report.ok && report.from_genesis, "{report}");
    let range = auditor.export_audit_log(2, 4).await.unwrap();
    let seqs: Vec<u64> = range
        .iter()
        .filter_map(ExportRecord::as_event)
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [2, 3, 4]);

    // The CLI: export, public key, offline verification.
    let dir = tempfile::tempdir().unwrap();
    let (export, pem) = (dir.path().join("audit.jsonl"), dir.path().join("audit.pem"));
    let out = stdout_of(&run(server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["audit", "export", "--out"])
        .arg(&export)));
    assert!(out.contains("checkpoints:"), "{out}");
    stdout_of(&run(server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["audit", "public-key", "--out"])
        .arg(&pem)));
    assert!(std::fs::read_to_string(&pem)
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let out = stdout_of(&verify_offline(&export, &pem));
    assert!(out.starts_with("OK: "), "{out}");

    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |op: &str| {
        parsed
            .iter()
            .position(|v| v["type"] == "event" && v["operation"] == op)
            .unwrap()
    };

    // Edit one field of the Decrypt event: caught, and its seq named.
    let at = find("Decrypt");
    let mut edited = parsed[at].clone();
    edited["acting_user"] = "someone-else".into();
    let tampered = dir.path().join("edited.jsonl");
    write_lines(&tampered, &lines, at, Some(&edited.to_string()));
    let out = verify_offline(&tampered, &pem);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("FAILED at seq {}:", parsed[at]["seq"])),
        "{said}"
    );

    // Delete the line of the first GenerateDataKey event: the gap is named.
    let at = find("GenerateDataKey");
    let deleted = dir.path().join("deleted.jsonl");
    write_lines(&deleted, &lines, at, None);
    let out = verify_offline(&deleted, &pem);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("FAILED at seq {}:", parsed[at]["seq"])),
        "{said}"
    );

    // A field the format does not know is tampering too.
    let mut extra = parsed[at].clone();
    extra["note"] = "hi".into();
    let added = dir.path().join("added.jsonl");
    write_lines(&added, &lines, at, Some(&extra.to_string()));
    let out = verify_offline(&added, &pem);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("FAILED at seq {}:", parsed[at]["seq"])),
        "{said}"
    );

    // The server's own verification, and the readable CSV.
    let out = stdout_of(&run(server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["audit", "verify", "--server"])));
    assert!(out.starts_with("OK: "), "{out}");
    let csv = dir.path().join("audit.csv");
    stdout_of(&run(server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["audit", "export", "--format", "csv", "--out"])
        .arg(&csv)));
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.starts_with("seq,time_ms,time_utc,"), "{csv}");
    assert!(csv.contains(",Decrypt,"), "{csv}");
}

/// `lines` with line `at` replaced (or removed when `with` is `None`).
fn write_lines(path: &Path, lines: &[&str], at: usize, with: Option<&str>) {
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        match (i == at, with) {
            (true, None) => continue,
            (true, Some(new)) => out.push_str(new),
            (false, _) => out.push_str(line),
        }
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

#[tokio::test]
async fn query_and_tail_for_auditors_only() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("q"), None).await.unwrap();
    let c = ctx(&[("client", "c-7"), ("note", "n-1")]);
    let dk = app.generate_data_key("q", &c).await.unwrap();
    app.decrypt(&dk.ciphertext_blob, &c, who("dr-lee", "TREATMENT"))
        .await
        .unwrap();

    let table = stdout_of(&run(server.kmsctl(AUDITOR).unwrap().args([
        "audit",
        "query",
        "--operation",
        "Decrypt",
        "--context",
        "client=c-7",
    ])));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("SEQ  "), "{table}");
    for word in [
        &client_uri("app"),
        "Decrypt",
        "OK",
        "dr-lee",
        "TREATMENT",
        &dk.key_id,
    ] {
        assert!(rows[1].contains(word), "{word} in {table}");
    }
    let lines = stdout_of(&run(server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["--json", "audit", "query", "--limit", "3"])));
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[0]["hash"].as_str().unwrap().len(), 64);

    // Not an auditor: refused, and the refusal is itself on record.
    let out = run(server.kmsctl("app").unwrap().args(["audit", "query"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: PERMISSION_DENIED"));

    tail(&server, &app).await;
}

/// `audit tail --count 3` prints the next three events as they are committed.
async fn tail(server: &KmsServer, app: &KmsClient) {
    let mut child = server
        .kmsctl(AUDITOR)
        .unwrap()
        .args(["--json", "audit", "tail", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let c = ctx(&[("client", "c-8")]);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("audit tail did not see 3 events");
        }
        app.generate_data_key("q", &c).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = stdout_of(&child.wait_with_output().unwrap());
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    let first = events[0]["seq"].as_u64().unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(first + i as u64), "{out}");
    }
    assert!(
        events.iter().any(|e| e["operation"] == "GenerateDataKey"),
        "{out}"
    );
}

#[tokio::test]
async fn report_accounts_for_every_decrypt_of_one_client() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("rep"), None).await.unwrap();
    let n1 = ctx(&[("site", "s"), ("client", "c-1"), ("note", "n-1")]);
    let n2 = ctx(&[("site", "s"), ("client", "c-1"), ("note", "n-2")]);
    let n3 = ctx(&[("site", "s"), ("client", "c-1"), ("note", "n-3")]);
    let other = ctx(&[("site", "s"), ("client", "c-2"), ("note", "n-9")]);
    let k1 = app.generate_data_key("rep", &n1).await.unwrap();
    let k2 = app.generate_data_key("rep", &n2).await.unwrap();
    let k9 = app.generate_data_key("rep", &other).await.unwrap();
    app.decrypt(&k1.ciphertext_blob, &n1, who("dr-lee", "TREATMENT"))
        .await
        .unwrap();
    app.decrypt(&k2.ciphertext_blob, &n2, who("dr-kim", "SUPERVISION"))
        .await
        .unwrap();
    app.decrypt(&k1.ciphertext_blob, &n3, who("dr-x", "CURIOSITY"))
        .await
        .unwrap_err();
    app.re_encrypt(
        &k1.ciphertext_blob,
        &n1,
        None,
        None,
        who("svc-ops", "KEY_ROTATION"),
    )
    .await
    .unwrap();
    app.decrypt(&k9.ciphertext_blob, &other, who("dr-lee", "TREATMENT"))
        .await
        .unwrap();

    let report = |args: &[&str]| {
        stdout_of(&run(server
            .kmsctl(AUDITOR)
            .unwrap()
            .args(["audit", "report", "--client", "c-1"])
            .args(args)))
    };
    let json: Value = serde_json::from_str(&report(&["--json"])).unwrap();
    assert_eq!(json["client"], "c-1");
    assert_eq!(json["count"], 4, "{json:#}");
    assert_eq!(
        (json["allowed"].as_u64(), json["denied"].as_u64()),
        (Some(3), Some(1))
    );
    let got: Vec<(String, String, String, String, String)> = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (
                s("operation"),
                s("acting_user"),
                s("purpose"),
                s("note_id"),
                s("result"),
            )
        })
        .collect();
    let want = [
        ("Decrypt", "dr-lee", "TREATMENT", "n-1", "allowed"),
        ("Decrypt", "dr-kim", "SUPERVISION", "n-2", "allowed"),
        ("Decrypt", "dr-x", "CURIOSITY", "n-3", "DENIED"),
        ("ReEncrypt", "svc-ops", "KEY_ROTATION", "n-1", "allowed"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(a, b, c, d, e)| {
            (
                a.to_string(),
                b.to_string(),
                c.to_string(),
                d.to_string(),
                e.to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
    for e in json["entries"].as_array().unwrap() {
        assert_eq!(e["caller"], client_uri("app").as_str());
        assert_eq!(e["key_id"], k1.key_id.as_str());
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }

    let text = report(&[]);
    assert!(
        text.starts_with("Accounting of disclosures for client c-1\n"),
        "{text}"
    );
    assert!(text.contains("Period: all recorded events\n"), "{text}");
    assert!(
        text.contains("Accesses: 4 (3 allowed, 1 denied, 0 failed)\n"),
        "{text}"
    );
    assert!(!text.contains("n-9"), "{text}");
    let csv = report(&["--csv"]);
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("seq,time_ms,time_utc,caller,operation,acting_user,purpose,"));
    let later = report(&["--from", "2999-01-01"]);
    assert!(later.contains("Accesses: 0 "), "{later}");
}
