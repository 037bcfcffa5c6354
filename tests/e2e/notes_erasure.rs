//! Client erasure (crypto-shredding) through the real binaries: each client's notes are wrapped
//! under its own KMS key; EraseClient destroys that key, so a copy of the notes database taken
//! before the erasure and restored afterwards cannot be read for that client, while every other
//! client's notes still can. Also: legal holds block erasure (FAILED_PRECONDITION), only callers
//! with `may_erase` / `may_hold` may erase or hold (PERMISSION_DENIED otherwise), the receipt
//! is signed with the audit key and verifies, writes for an erased client are refused, a
//! repeated erasure returns the same receipt, and no note text is in the database files or logs.
//!
//! Backups: SQLite `VACUUM INTO` (a consistent copy of a live database), PostgreSQL `pg_dump`
//! restored with `psql` into a fresh database. The restored copy is served by a new
//! notes-store process after the first one was stopped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_client::kms_audit;
use kms_proto::notes::v1 as pb;
use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use kms_tests::notes::{amend_request, create_request, get_request, DEFAULT_CALLERS};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::transport::Channel;
use tonic::Code;

/// "app" acts for every site (no privileges); "auditor" plays the privacy officer's tool.
fn callers() -> String {
    format!(
        "{DEFAULT_CALLERS}
[[callers]]
identity = \"spiffe://dev.clinic/client/auditor\"
sites = [\"*\"]
may_erase = true
may_hold = true
"
    )
}

async fn officer(notes: &NotesServer) -> NotesServiceClient<Channel> {
    NotesServiceClient::new(notes.channel("auditor").await.unwrap())
}

/// A note written for a test: id, revision count and its texts per revision.
struct Written {
    id: String,
    texts: Vec<String>,
}

async fn write(
    c: &mut NotesServiceClient<Channel>,
    site: &str,
    client: &str,
    body: &str,
) -> Written {
    let id = c
        .create_note(create_request(site, client, "2024-05-01", body))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    Written {
        id,
        texts: vec![body.to_string()],
    }
}

async fn assert_reads(c: &mut NotesServiceClient<Channel>, w: &Written) {
    for (i, text) in w.texts.iter().enumerate() {
        let r = c
            .get_note(get_request(&w.id, i as u32 + 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&r.body, text);
    }
}

/// Every revision of `w` is refused with `code` (and never answered with text).
async fn assert_refused(c: &mut NotesServiceClient<Channel>, w: &Written, code: Code) {
    for i in 0..w.texts.len() {
        let err = c
            .get_note(get_request(&w.id, i as u32 + 1))
            .await
            .expect_err("an erased client's note must not be readable");
        assert_eq!(err.code(), code, "{err:?}");
    }
}

/// How the database is copied and restored.
enum Db {
    Sqlite,
    Postgres { url: String },
}

/// A consistent copy of the live database; returns the URL a restored notes-store uses.
async fn backup(db: &Db, notes: &NotesServer, dir: &Path) -> (String, Option<String>) {
    match db {
        Db::Sqlite => {
            let copy = dir.join("backup.db");
            notes
                .sql(&format!("VACUUM INTO '{}'", copy.display()))
                .await
                .unwrap();
            (format!("sqlite:{}", copy.display()), None)
        }
        Db::Postgres { url } => {
            let (copy_url, copy_name) = kms_tests::pg::create_database().await.unwrap();
            let dump = dir.join("backup.sql");
            let out = std::process::Command::new("pg_dump")
                .args(["--no-owner", "--dbname", url, "--file"])
                .arg(&dump)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = std::process::Command::new("psql")
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &copy_url, "-f"])
                .arg(&dump)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (copy_url, Some(copy_name))
        }
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn scenario(db: Db) {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let database_url = match &db {
        Db::Sqlite => None,
        Db::Postgres { url } => Some(url.clone()),
    };
    let mut notes = NotesServer::start(
        &kms,
        NotesOptions {
            database_url,
            callers: callers(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (site, a, b) = (
        "site-e",
        format!("ca-{}", &tag[..8]),
        format!("cb-{}", &tag[..8]),
    );
    let mut app = notes.client().await.unwrap();
    let mut off = officer(&notes).await;

    // Client A: two notes, one amended; client B: one note.
    let mut a1 = write(&mut app, site, &a, &format!("ERASE-ME-{tag}-1 nightmares")).await;
    let a2 = write(
        &mut app,
        site,
        &a,
        &format!("ERASE-ME-{tag}-2 family conflict"),
    )
    .await;
    let amended = format!("ERASE-ME-{tag}-1b nightmares, less often");
    app.amend_note(amend_request(
        &a1.id,
        1,
        &amended,
        &format!("ERASE-ME-{tag}-reason"),
    ))
    .await
    .unwrap();
    a1.texts.push(amended);
    let b1 = write(&mut app, site, &b, &format!("KEEP-ME-{tag} sleep improved")).await;
    for w in [&a1, &a2, &b1] {
        assert_reads(&mut app, w).await;
    }
    // A's revisions are wrapped under A's own KMS key, B's under B's.
    let admin = kms.client("admin").unwrap();
    let key_a = admin
        .describe_key(&format!("notes/{site}/clients/{a}"))
        .await
        .unwrap();
    let key_b = admin
        .describe_key(&format!("notes/{site}/clients/{b}"))
        .await
        .unwrap();
    assert_ne!(key_a.key_id, key_b.key_id);
    let history = app
        .get_note_history(pb::GetNoteHistoryRequest {
            note_id: a1.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history
        .revisions
        .iter()
        .all(|r| r.kms_key_id == key_a.key_id));

    let dir = tempfile::tempdir().unwrap();
    let (restore_url, copy_db) = backup(&db, &notes, dir.path()).await;

    // Privileges: the ordinary app may neither erase nor hold.
    let erase = |reason: &str| pb::EraseClientRequest {
        site_id: site.into(),
        client_id: a.clone(),
        reason: reason.into(),
    };
    let err = app.erase_client(erase("DSR-1")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let hold = pb::PlaceLegalHoldRequest {
        site_id: site.into(),
        client_id: a.clone(),
        reason: "case 2024-17".into(),
    };
    let err = app.place_legal_hold(hold.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A legal hold blocks the erasure, changing nothing; lifted, the erasure goes through.
    let status = off.place_legal_hold(hold).await.unwrap().into_inner();
    assert!(status.legal_hold);
    assert_eq!((status.notes, status.revisions), (2, 3));
    let err = off.erase_client(erase("DSR-1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("legal hold"), "{err:?}");
    assert_reads(&mut app, &a1).await;
    let lift = pb::LiftLegalHoldRequest {
        site_id: site.into(),
        client_id: a.clone(),
    };
    assert!(
        !off.lift_legal_hold(lift)
            .await
            .unwrap()
            .into_inner()
            .legal_hold
    );
    let receipt = off
        .erase_client(erase("DSR-1"))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(
        (receipt.site_id.as_str(), receipt.client_id.as_str()),
        (site, a.as_str())
    );
    assert_eq!((receipt.notes_erased, receipt.revisions_erased), (2, 3));
    assert_eq!(receipt.kms_key_id, key_a.key_id);
    assert_eq!(receipt.destroyed_versions, vec![1]);
    assert!(receipt.erased_at_unix_ms > 0);

    // The KMS receipt verifies with the audit public key and names what was destroyed.
    let public = kms
        .audit_client("auditor")
        .unwrap()
        .audit_public_key()
        .await
        .unwrap();
    let signed = kms_audit::verify_receipt(
        &receipt.kms_receipt,
        &receipt.kms_receipt_signature,
        &public.key,
    )
    .unwrap();
    assert_eq!(signed.key_id, key_a.key_id);
    assert_eq!(signed.destroyed_versions, vec![1]);
    assert_eq!(signed.subject.get("client"), Some(&a));
    assert_eq!(signed.subject.get("site").map(String::as_str), Some(site));
    assert_eq!(signed.erased_at_unix_ms, receipt.erased_at_unix_ms);
    assert_eq!(receipt.signing_key_fingerprint, public.key.fingerprint());
    // A flipped byte does not verify.
    let mut forged = receipt.kms_receipt.clone();
    forged[10] ^= 1;
    assert!(
        kms_audit::verify_receipt(&forged, &receipt.kms_receipt_signature, &public.key).is_err()
    );

    // Live database: A's notes are gone (NOT_FOUND), B's read; A gets no new notes.
    assert_refused(&mut app, &a1, Code::NotFound).await;
    assert_reads(&mut app, &b1).await;
    let err = app
        .create_note(create_request(site, &a, "2024-06-01", "new"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Repeating the erasure returns the same receipt; a hold can no longer be placed.
    let again = off
        .erase_client(erase("DSR-1 (retry)"))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(again, receipt);
    let status = off
        .get_client_status(pb::GetClientStatusRequest {
            site_id: site.into(),
            client_id: a.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, pb::ClientState::Erased as i32);
    assert_eq!(status.erasure, Some(receipt.clone()));
    assert_eq!((status.notes, status.revisions), (0, 0));

    // Restore the copy taken before the erasure into a new notes-store: A's rows are back,
    // but their data keys are wrapped under a destroyed key.
    notes
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    let restored = NotesServer::start(
        &kms,
        NotesOptions {
            database_url: Some(restore_url),
            callers: callers(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut app2 = restored.client().await.unwrap();
    for w in [&a1, &a2] {
        assert_refused(&mut app2, w, Code::FailedPrecondition).await;
    }
    assert_reads(&mut app2, &b1).await;
    // Even the KMS itself, asked directly with the right context, cannot unwrap A's keys.
    let wrapped = restored
        .revision_bytes(&a1.id, 1, "wrapped_key")
        .await
        .unwrap();
    let ctx = kms_tests::ctx(&[
        ("site", site),
        ("client", &a),
        ("note", &a1.id),
        ("revision", "1"),
    ]);
    let err = kms
        .client("app")
        .unwrap()
        .decrypt(&wrapped, &ctx, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err:?}");

    // No note text anywhere: database files (live and restored), backups, both logs.
    let mut all = files(notes.dir.path());
    all.extend(files(restored.dir.path()));
    all.extend(files(dir.path()).into_iter().filter(|p| {
        // The pg_dump text holds hex bytea, the SQLite copy raw bytes: both are scanned.
        p.extension().is_some_and(|e| e == "db" || e == "sql")
    }));
    let needles: Vec<String> = a1
        .texts
        .iter()
        .chain(&a2.texts)
        .chain(&b1.texts)
        .cloned()
        .collect();
    let mut seen_control = false;
    for file in &all {
        let content = std::fs::read(file).unwrap();
        for needle in &needles {
            assert!(
                !content
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes()),
                "note text in {}",
                file.display()
            );
        }
        seen_control |= content.windows(b1.id.len()).any(|w| w == b1.id.as_bytes());
    }
    assert!(
        seen_control,
        "the scan never saw a note id: it looked at the wrong files"
    );
    if let Some(name) = copy_db {
        kms_tests::pg::drop_database(&name).await;
    }
}

#[tokio::test]
async fn erased_client_unreadable_in_restored_sqlite_copy() {
    scenario(Db::Sqlite).await;
}

#[tokio::test]
async fn erased_client_unreadable_in_restored_postgres_dump() {
    let (url, name) = kms_tests::pg::create_database().await.unwrap();
    let outcome = tokio::spawn(scenario(Db::Postgres { url })).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}
