//! Re-wrap campaigns (`notes-store rewrap`) through the real binaries: after the client keys
//! are rotated, a campaign moves every stored data key to its key's primary version; a run
//! killed with SIGKILL mid-way and run again completes, the two runs' counts add up exactly to
//! the number of revisions (nothing lost, nothing applied twice), every note still reads with
//! its text, and once the key-usage report shows nothing below the primary the minimum
//! decryption version can be raised without breaking a read — while an old blob put back is
//! refused, so the raise really took effect.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{binary, KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::transport::Channel;

/// `notes-store <args> --config <notes' config>`, without inherited NOTES_* variables.
fn notes_store(notes: &NotesServer, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("notes-store").unwrap());
    cmd.args(args).arg("--config").arg(&notes.config_path);
    for (key, _) in std::env::vars() {
        if key.starts_with("NOTES_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs a campaign to completion; returns its JSON output.
fn rewrap(notes: &NotesServer, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["rewrap", "--json"];
    args.extend_from_slice(extra);
    let out = notes_store(notes, &args).output().unwrap();
    assert!(
        out.status.success(),
        "rewrap failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn count(notes: &NotesServer, sql: &str) -> u64 {
    notes
        .sql_text(&format!("SELECT CAST(({sql}) AS TEXT)"))
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// (note id, texts per revision) of every note written.
type Notes = Vec<(String, Vec<String>)>;

async fn write_notes(c: &mut NotesServiceClient<Channel>, clients: &[(&str, usize)]) -> Notes {
    let mut out = Vec::new();
    for (client, n) in clients {
        for i in 0..*n {
            let body = format!("rewrap test: {client} session {i}");
            let id = c
                .create_note(create_request("site-r", client, "2024-03-01", &body))
                .await
                .unwrap()
                .into_inner()
                .note_id;
            let mut texts = vec![body];
            if i % 4 == 0 {
                let amended = format!("rewrap test: {client} session {i}, amended");
                c.amend_note(amend_request(&id, 1, &amended, "typo"))
                    .await
                    .unwrap();
                texts.push(amended);
            }
            out.push((id, texts));
        }
    }
    out
}

async fn assert_all_read(c: &mut NotesServiceClient<Channel>, notes: &Notes) {
    for (id, texts) in notes {
        for (i, text) in texts.iter().enumerate() {
            let r = c
                .get_note(get_request(id, i as u32 + 1))
                .await
                .unwrap_or_else(|e| panic!("note {id} revision {}: {e:?}", i + 1))
                .into_inner();
            assert_eq!(&r.body, text);
        }
    }
}

#[tokio::test]
async fn rewrap_survives_sigkill_and_allows_raising_min_version() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    let mut c = notes.client().await.unwrap();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let clients = [
        (format!("r0-{tag}"), 24),
        (format!("r1-{tag}"), 12),
        (format!("r2-{tag}"), 4),
    ];
    let spec: Vec<(&str, usize)> = clients.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    let written = write_notes(&mut c, &spec).await;
    let total = count(&notes, "SELECT count(*) FROM note_revisions").await;
    assert_eq!(total, 40 + 6 + 3 + 1);

    // Nothing to do before a rotation.
    let idle = rewrap(&notes, &[]);
    assert_eq!(idle["summary"]["to_rewrap"], 0);
    assert_eq!(idle["summary"]["already_current"], total);

    // Keep one v1 blob aside for the negative control at the end.
    let (old_note, _) = &written[0];
    let old_blob = notes
        .revision_bytes(old_note, 1, "wrapped_key")
        .await
        .unwrap();

    let admin = kms.client("admin").unwrap();
    for (client, _) in &clients {
        let (key, v) = admin
            .rotate_key(&format!("notes/site-r/clients/{client}"))
            .await
            .unwrap();
        assert_eq!((key.primary_version, v.version), (2, 2));
    }
    // The report (and a dry run) see every revision below the primary, and change nothing.
    let dry = rewrap(&notes, &["--dry-run"]);
    assert_eq!(dry["summary"]["to_rewrap"], total);
    assert_eq!(dry["summary"]["rewrapped"], 0);
    let usage = dry["key_usage"].as_array().unwrap();
    assert_eq!(usage.len(), 3);
    assert!(usage.iter().all(|k| k["safe_min_decryption_version"] == 1));
    // One key only: the campaign counts and would walk that key's revisions alone.
    let one = &clients[2].0;
    let of_one = count(
        &notes,
        &format!(
            "SELECT count(*) FROM note_revisions r JOIN notes n ON n.note_id = r.note_id \
             WHERE n.client_id = '{one}'"
        ),
    )
    .await;
    assert!(of_one > 0 && of_one < total);
    let alias = format!("notes/site-r/clients/{one}");
    let only = rewrap(&notes, &["--dry-run", "--key", &alias]);
    assert_eq!(only["summary"]["scanned"], of_one, "{only}");
    assert_eq!(only["summary"]["to_rewrap"], of_one, "{only}");
    assert_eq!(only["summary"]["already_current"], 0, "{only}");
    assert_eq!(
        count(
            &notes,
            "SELECT count(*) FROM note_revisions WHERE kms_key_version = 1"
        )
        .await,
        total
    );

    // A slow run (batches of 5, 10 blobs/s), killed with SIGKILL once some batches landed.
    let mut child = notes_store(
        &notes,
        &[
            "rewrap",
            "--batch",
            "5",
            "--rate",
            "10",
            "--progress-interval-ms",
            "100",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut progress_lines = 0;
    loop {
        assert!(Instant::now() < deadline, "no progress from the campaign");
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        if line.starts_with("rewrap: progress") {
            progress_lines += 1;
            assert!(line.contains(&format!("total={total}")), "{line}");
        }
        let done = count(
            &notes,
            "SELECT count(*) FROM note_revisions WHERE kms_key_version = 2",
        )
        .await;
        if done >= 10 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(progress_lines > 0);
    let first_run = count(
        &notes,
        "SELECT count(*) FROM note_revisions WHERE kms_key_version = 2",
    )
    .await;
    assert!(
        (10..total).contains(&first_run),
        "killed after {first_run} of {total}: not mid-run"
    );
    // Mid-campaign, every note reads (old and new blobs alike).
    assert_all_read(&mut c, &written).await;

    // The second run completes: the counts add up exactly.
    let second = rewrap(&notes, &["--batch", "7"]);
    let s = &second["summary"];
    assert_eq!(s["failed"], 0, "{second}");
    assert_eq!(s["raced"], 0, "{second}");
    assert_eq!(
        s["rewrapped"].as_u64().unwrap() + first_run,
        total,
        "{second}"
    );
    assert_eq!(
        s["already_current"].as_u64().unwrap(),
        first_run,
        "{second}"
    );
    assert_eq!(
        count(
            &notes,
            "SELECT count(*) FROM note_revisions WHERE kms_key_version = 2"
        )
        .await,
        total
    );
    assert_all_read(&mut c, &written).await;
    // The report: nothing depends on v1 any more.
    for k in second["key_usage"].as_array().unwrap() {
        assert_eq!(k["below_primary"], 0, "{k}");
        assert_eq!(k["safe_min_decryption_version"], 2, "{k}");
    }
    // A third run has nothing to do.
    let third = rewrap(&notes, &[]);
    assert_eq!(third["summary"]["rewrapped"], 0);
    assert_eq!(third["summary"]["already_current"], total);

    // Raise the minimum decryption version: every note still reads...
    for (client, _) in &clients {
        let key = admin
            .set_min_decryption_version(&format!("notes/site-r/clients/{client}"), 2)
            .await
            .unwrap();
        assert_eq!(key.min_decryption_version, 2);
    }
    // (metadata caches of the KMS expire within its key TTL)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_all_read(&mut c, &written).await;
    // ...while the old v1 blob, put back, is refused: the raise is in force.
    notes
        .set_revision_bytes(old_note, 1, "wrapped_key", &old_blob)
        .await
        .unwrap();
    let err = c.get_note(get_request(old_note, 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}
