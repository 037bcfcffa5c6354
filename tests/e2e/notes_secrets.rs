//! No plaintext at rest: after notes with distinctive bodies and amendment reasons were
//! written and read, neither the SQLite database (main file, `-wal`, `-shm`) nor a `pg_dump`
//! of the PostgreSQL database nor notes-store's log contains a body, a reason or a plaintext
//! data key (raw, hex, base64 or Debug-printed); nor do the KMS's log and audit database.
//!
//! How the data keys are found, since notes-store never reveals them: the test reads each
//! revision's wrapped key from the database and asks the KMS itself (as "app", with the
//! revision's encryption context) to unwrap it. It checks that the key really is the one the
//! revision was sealed with (opening the stored ciphertext with it and the documented AAD
//! gives the body back), that the stored wrapped key is not the 32-byte key itself nor contains
//! it, and then scans every file for every key. Controls that must be found (note ids) make
//! sure the scan sees the data at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{ctx, KmsServer, NotesOptions, NotesServer, ServerOptions};
use notes_store::crypto::{self, Field, RevisionIds, Sealed};

use crate::secrets::encodings;

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

/// (needle name, file name) for every needle found in one of `files`.
fn scan(files: &[PathBuf], needles: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for file in files {
        let content = std::fs::read(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (what, needle) in needles {
            if content
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
            {
                found.push((what.clone(), name.clone()));
            }
        }
    }
    found
}

/// Writes and reads notes; returns the secrets to look for and the note ids (controls).
async fn write_notes(notes: &NotesServer) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut c = notes.client().await.unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut secrets = Vec::new();
    let mut ids = Vec::new();
    for (i, (site, client)) in [("site-a", "c-1"), ("site-a", "c-2"), ("site-b", "c-1")]
        .into_iter()
        .enumerate()
    {
        // Long enough to be unmistakable, varied so compression-like tricks would show.
        let body = format!(
            "BODY-{tag}-{i}: client disclosed panic attacks at work; plan: CBT weekly. {}",
            "detail ".repeat(20 * (i + 1))
        );
        let id = c
            .create_note(create_request(site, client, "2024-04-01", &body))
            .await
            .unwrap()
            .into_inner()
            .note_id;
        c.get_note(get_request(&id, 0)).await.unwrap();
        secrets.extend(encodings(&format!("body {i}"), body.as_bytes()));
        ids.push(id);
    }
    let amended = format!("BODY-{tag}-amended: medication changed to a new dose.");
    let reason = format!("REASON-{tag}: wrong medication recorded by mistake");
    c.amend_note(amend_request(&ids[0], 1, &amended, &reason))
        .await
        .unwrap();
    c.get_note(get_request(&ids[0], 2)).await.unwrap();
    secrets.extend(encodings("amended body", amended.as_bytes()));
    secrets.extend(encodings("reason", reason.as_bytes()));
    (secrets, ids)
}

/// Unwraps every stored data key through the KMS, checks it is the key of its revision, and
/// returns the keys' encodings.
async fn data_keys(kms: &KmsServer, notes: &NotesServer) -> Vec<(String, Vec<u8>)> {
    // A service identity: key-admin ("admin") may not decrypt (separation of duties).
    let admin = kms.client("app").unwrap();
    let rows = notes
        .sql_text(
            "SELECT COALESCE(string_agg(n.note_id || ' ' || r.revision || ' ' || n.site_id || ' ' \
             || n.client_id, ','), '') FROM note_revisions r JOIN notes n ON n.note_id = r.note_id",
        )
        .await;
    // SQLite has group_concat, not string_agg.
    let rows = match rows {
        Ok(r) => r,
        Err(_) => notes
            .sql_text(
                "SELECT group_concat(n.note_id || ' ' || r.revision || ' ' || n.site_id || ' ' \
                 || n.client_id, ',') FROM note_revisions r JOIN notes n ON n.note_id = r.note_id",
            )
            .await
            .unwrap(),
    };
    let mut needles = Vec::new();
    for row in rows.split(',') {
        let parts: Vec<&str> = row.split(' ').collect();
        let (note_id, revision, site, client) = (parts[0], parts[1], parts[2], parts[3]);
        let revision: u32 = revision.parse().unwrap();
        let wrapped = notes
            .revision_bytes(note_id, revision, "wrapped_key")
            .await
            .unwrap();
        let context = ctx(&[
            ("site", site),
            ("client", client),
            ("note", note_id),
            ("revision", &revision.to_string()),
        ]);
        let key = admin
            .decrypt(&wrapped, &context, None)
            .await
            .unwrap()
            .plaintext;
        assert_eq!(key.len(), 32);
        assert!(
            wrapped.len() > 32 + 16,
            "wrapped key of {} bytes",
            wrapped.len()
        );
        assert!(
            !wrapped.windows(32).any(|w| w == &key[..]),
            "the stored wrapped key contains the plaintext data key"
        );
        // It is the revision's key: the stored body opens with it under the documented AAD.
        let sealed = Sealed {
            nonce: notes
                .revision_bytes(note_id, revision, "body_nonce")
                .await
                .unwrap(),
            ciphertext: notes
                .revision_bytes(note_id, revision, "body_ciphertext")
                .await
                .unwrap(),
        };
        let ids = RevisionIds {
            site_id: site,
            client_id: client,
            note_id: uuid::Uuid::parse_str(note_id).unwrap(),
            revision,
        };
        let body = crypto::open(&key, &ids, Field::Body, &sealed).unwrap();
        assert!(body.starts_with(b"BODY-"));
        needles.extend(encodings(&format!("data key {note_id}/{revision}"), &key));
    }
    assert_eq!(needles.len(), 4 * encodings("x", b"x").len(), "4 revisions");
    needles
}

fn assert_clean(found: &[(String, String)], must_see: &[&str], when: &str) {
    let leaks: Vec<_> = found
        .iter()
        .filter(|(n, _)| !n.starts_with("control"))
        .collect();
    assert!(leaks.is_empty(), "{when}: plaintext at rest: {leaks:?}");
    for file in must_see {
        assert!(
            found
                .iter()
                .any(|(n, f)| n.starts_with("control") && f.starts_with(file)),
            "{when}: the scan did not see the note ids in {file}: {found:?}"
        );
    }
}

#[tokio::test]
async fn sqlite_files_hold_no_plaintext() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    let (mut needles, ids) = write_notes(&notes).await;
    needles.extend(data_keys(&kms, &notes).await);
    for id in &ids {
        needles.push(("control: note id".into(), id.clone().into_bytes()));
    }
    // While running: the recent pages are in the WAL.
    let db = notes.sqlite_path().unwrap();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    assert!(wal.exists());
    let all = files(notes.dir.path());
    assert_clean(
        &scan(&all, &needles),
        &["notes.db-wal", "notes-store.log"],
        "running",
    );
    // The KMS made these data keys (GenerateDataKeys, several per call under load) and
    // unwrapped them (Decrypt): neither its log nor its audit database holds one, while its
    // audit events name the notes.
    assert_clean(&scan(&files(kms.dir.path()), &needles), &["kms.db"], "kms");
    // After a clean stop (SQLite may have checkpointed the WAL into the main file).
    notes
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    let all = files(notes.dir.path());
    assert_clean(&scan(&all, &needles), &["notes.db"], "stopped");
}

#[tokio::test]
async fn postgres_dump_holds_no_plaintext() {
    let (url, name) = kms_tests::pg::create_database().await.unwrap();
    let run = async move {
        let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
        let notes = NotesServer::start(
            &kms,
            NotesOptions {
                database_url: Some(url.clone()),
                log_json: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let (mut needles, ids) = write_notes(&notes).await;
        needles.extend(data_keys(&kms, &notes).await);
        for id in &ids {
            needles.push(("control: note id".into(), id.clone().into_bytes()));
        }
        // The whole database as text: schema and data, bytea as hex.
        let dump = notes.dir.path().join("pg.dump.sql");
        let out = std::process::Command::new("pg_dump")
            .arg("--dbname")
            .arg(&url)
            .arg("--file")
            .arg(&dump)
            .output()
            .expect("pg_dump must be installed (postgresql-client)");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let all = files(notes.dir.path());
        assert_clean(
            &scan(&all, &needles),
            &["pg.dump.sql", "notes-store.log"],
            "pg",
        );
    };
    let outcome = tokio::spawn(run).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}
