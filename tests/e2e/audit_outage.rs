//! Fail closed on the audit store: while the SQLite database cannot be written, every key
//! operation is answered UNAVAILABLE (none OK) and health is NOT_SERVING; once it can be
//! written again the server resumes by itself and the chain is still gapless and verifies.
//!
//! How the store is made unwritable: `chattr +i` (the immutable attribute) on the database
//! file and its `-wal` file. What does *not* work against a server that already holds its
//! connections open: `chmod 0444` on the files or `0555` on the directory (permissions are
//! checked at open, and root ignores them anyway), or `chattr +i` on the directory (it only
//! stops creating and removing names). The immutable attribute is checked on every write, so
//! SQLite's `pwrite` to the WAL fails with EPERM and the commit with "disk I/O error".
//! The `-shm` file must be left alone: SQLite maps it into memory, and a store into a mapped
//! page of an immutable file kills the process with SIGBUS. Needs root (CAP_LINUX_IMMUTABLE)
//! and a file system with the attribute (ext4, xfs, btrfs; not tmpfs or overlayfs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::kms_audit::{self, AuditEvent, ExportRecord};
use kms_client::{code_name, AuditMetadata, Error, KmsClient};
use kms_tests::{ctx, KmsServer, ServerOptions, AUDITOR};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Files made immutable; the attribute is cleared again on drop (even if the test fails),
/// so the temporary directory can be removed.
struct Immutable(Vec<PathBuf>);

fn chattr(flag: &str, paths: &[PathBuf]) -> std::io::Result<std::process::Output> {
    Command::new("chattr").arg(flag).args(paths).output()
}

impl Immutable {
    fn set(paths: Vec<PathBuf>) -> Immutable {
        let out = chattr("+i", &paths).unwrap();
        assert!(
            out.status.success(),
            "chattr +i failed ({}): this test needs root (CAP_LINUX_IMMUTABLE) and a file \
             system with the immutable attribute for TMPDIR",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Immutable(paths)
    }

    fn clear(&mut self) {
        let paths = std::mem::take(&mut self.0);
        if !paths.is_empty() {
            let out = chattr("-i", &paths).unwrap();
            assert!(out.status.success(), "chattr -i failed");
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = chattr("-i", &self.0);
        }
    }
}

/// One answered call: when it was sent and answered, and its code name.
struct Answer {
    operation: &'static str,
    sent: Instant,
    answered: Instant,
    code: &'static str,
}

fn code_of<T>(result: Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "OK",
        Err(e @ Error::Rpc { .. }) => code_name(e.code().unwrap()),
        Err(e) => panic!("no answer: {e}"),
    }
}

/// Calls GenerateDataKey, Decrypt and their batched forms in turn until `stop`.
async fn load(app: KmsClient, task: usize, stop: Arc<AtomicBool>) -> Vec<Answer> {
    let c = ctx(&[("client", &format!("c-{task}"))]);
    let blob = app
        .generate_data_key("outage", &c)
        .await
        .unwrap()
        .ciphertext_blob;
    let who = AuditMetadata {
        acting_user: "dr-lee".into(),
        purpose: "TREATMENT".into(),
    };
    let mut answers = Vec::new();
    let mut turn = 0;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let (operation, code) = match turn % 4 {
            0 => (
                "GenerateDataKey",
                code_of(app.generate_data_key("outage", &c).await),
            ),
            1 => (
                "Decrypt",
                code_of(app.decrypt(&blob, &c, Some(who.clone())).await),
            ),
            2 => (
                "BatchDecrypt",
                items_code(
                    app.batch_decrypt(&[(blob.as_slice(), &c, Some(&who)); BATCH_ITEMS])
                        .await
                        .unwrap(),
                ),
            ),
            _ => (
                "GenerateDataKeys",
                items_code(
                    app.generate_data_keys(&[("outage", &c); BATCH_ITEMS])
                        .await
                        .unwrap(),
                ),
            ),
        };
        answers.push(Answer {
            operation,
            sent,
            answered: Instant::now(),
            code,
        });
        turn += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    answers
}

/// Items per GenerateDataKeys and BatchDecrypt call of `load`.
const BATCH_ITEMS: usize = 3;

/// The code of a batched call's items: OK if all are, else the one code they all
/// share (each item is audited, so each fails closed on its own).
fn items_code<T>(items: Vec<Result<T, Error>>) -> &'static str {
    let codes: Vec<&'static str> = items.into_iter().map(code_of).collect();
    assert!(
        codes.iter().all(|c| *c == codes[0]),
        "items differ: {codes:?}"
    );
    codes[0]
}

async fn wait_for_health(server: &KmsServer, want: ServingStatus) {
    let mut health = HealthClient::new(server.channel("app").await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = health
            .check(HealthCheckRequest {
                service: "kms.v1.KeyManagementService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if got == want as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {got}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of the server's log.
fn log_tail(server: &KmsServer, n: usize) -> String {
    let log = server.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn database_files(server: &KmsServer) -> Vec<PathBuf> {
    let path = server.database_url.strip_prefix("sqlite:").unwrap();
    let wal = PathBuf::from(format!("{path}-wal"));
    assert!(wal.exists(), "{} missing: not in WAL mode?", wal.display());
    vec![Path::new(path).to_path_buf(), wal]
}

#[tokio::test]
async fn unwritable_sqlite_audit_store_fails_closed_and_recovers() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("outage"), None).await.unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|t| tokio::spawn(load(app.clone(), t, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut frozen = Immutable::set(database_files(&server));
    let blocked = Instant::now();
    wait_for_health(&server, ServingStatus::NotServing).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unblocking = Instant::now();
    frozen.clear();
    wait_for_health(&server, ServingStatus::Serving).await;
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }

    // Sent after the store froze and answered before it thawed: all UNAVAILABLE.
    let inside: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent > blocked && a.answered < unblocking)
        .collect();
    assert!(
        inside.len() >= 4,
        "only {} calls in the window",
        inside.len()
    );
    for batched in ["GenerateDataKeys", "BatchDecrypt"] {
        assert!(
            inside.iter().any(|a| a.operation == batched),
            "no {batched} call in the window"
        );
    }
    let codes: BTreeMap<&str, usize> = inside.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.code).or_default() += 1;
        m
    });
    assert_eq!(
        codes.keys().copied().collect::<Vec<_>>(),
        ["UNAVAILABLE"],
        "{codes:?}"
    );
    // After health came back, calls work again without a restart.
    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent > resumed).collect();
    let late: Vec<_> = after.iter().map(|a| (a.operation, a.code)).collect();
    assert!(
        !after.is_empty() && after.iter().all(|a| a.code == "OK"),
        "{late:?}\nserver log (end):\n{}",
        log_tail(&server, 20)
    );
    assert!(
        server.log().contains("audit write failed"),
        "{}",
        log_tail(&server, 20)
    );

    let auditor = server.audit_client(AUDITOR).unwrap();
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let key = auditor.audit_public_key().await.unwrap();
    let report = kms_audit::verify(&records, &key.key);
    assert!(report.ok, "{report}");
    let events: Vec<&AuditEvent> = records.iter().filter_map(ExportRecord::as_event).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    // Every OK answer is on record (the refused ones could not be); a batched call's items are
    // events of the single operation.
    for (op, batched) in [
        ("GenerateDataKey", "GenerateDataKeys"),
        ("Decrypt", "BatchDecrypt"),
    ] {
        let ok = |operation: &str| {
            answers
                .iter()
                .filter(|a| a.operation == operation && a.code == "OK")
                .count()
        };
        let (ok_answers, ok_items) = (ok(op), BATCH_ITEMS * ok(batched));
        let ok_events = events
            .iter()
            .filter(|e| e.operation == op && e.outcome == "OK" && e.context.contains_key("client"))
            .count();
        // `load` makes one untimed GenerateDataKey per task for its blob.
        let setup = if op == "GenerateDataKey" { 4 } else { 0 };
        assert_eq!(ok_events, ok_answers + ok_items + setup, "{op}");
    }
}
