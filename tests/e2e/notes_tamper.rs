//! Tampering with the database behind notes-store's back is detected, never answered with
//! wrong plaintext: ciphertexts and wrapped keys copied to another note, client or site, notes
//! moved to another client or site, revisions swapped, and every single flipped byte of the
//! nonces, ciphertexts and wrapped keys all make GetNote fail with DATA_LOSS "note ciphertext
//! does not match its record". Restoring the original bytes makes the note readable again.

use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::transport::Channel;
use tonic::Code;

const CRYPTO_COLUMNS: [&str; 3] = ["wrapped_key", "body_nonce", "body_ciphertext"];

async fn assert_refused(c: &mut NotesServiceClient<Channel>, id: &str, rev: u32, what: &str) {
    match c.get_note(get_request(id, rev)).await {
        Ok(r) => panic!(
            "{what}: answered with a body of {} bytes",
            r.into_inner().body.len()
        ),
        Err(status) => {
            assert_eq!(status.code(), Code::DataLoss, "{what}: {status}");
            assert_eq!(
                status.message(),
                "note ciphertext does not match its record",
                "{what}"
            );
        }
    }
}

async fn assert_reads(c: &mut NotesServiceClient<Channel>, id: &str, rev: u32, body: &str) {
    let got = c.get_note(get_request(id, rev)).await.unwrap().into_inner();
    assert_eq!(got.body, body);
}

/// Copies the named columns of (from, rev) into (to, rev), runs the check, restores.
async fn with_copied(
    notes: &NotesServer,
    c: &mut NotesServiceClient<Channel>,
    (from, from_rev): (&str, u32),
    (to, to_rev): (&str, u32),
    columns: &[&str],
    what: &str,
) {
    let mut saved = Vec::new();
    for col in columns {
        saved.push(notes.revision_bytes(to, to_rev, col).await.unwrap());
        let value = notes.revision_bytes(from, from_rev, col).await.unwrap();
        notes
            .set_revision_bytes(to, to_rev, col, &value)
            .await
            .unwrap();
    }
    assert_refused(c, to, to_rev, what).await;
    for (col, value) in columns.iter().zip(saved) {
        notes
            .set_revision_bytes(to, to_rev, col, &value)
            .await
            .unwrap();
    }
}

async fn tamper_suite(notes: &NotesServer) {
    let mut c = notes.client().await.unwrap();
    let create = |site: &'static str, client: &'static str, body: &'static str| {
        let mut c = c.clone();
        async move {
            c.create_note(create_request(site, client, "2024-02-02", body))
                .await
                .unwrap()
                .into_inner()
                .note_id
        }
    };
    let a = create("site-a", "c-1", "alpha: the original note").await;
    let b = create("site-a", "c-1", "bravo: same client").await;
    let other_client = create("site-a", "c-2", "charlie: other client").await;
    let other_site = create("site-b", "c-1", "delta: other site").await;
    c.amend_note(amend_request(&a, 1, "alpha amended", "reason: correction"))
        .await
        .unwrap();
    for (id, body) in [
        (&b, "bravo: same client"),
        (&other_client, "charlie: other client"),
        (&other_site, "delta: other site"),
    ] {
        assert_reads(&mut c, id, 1, body).await;
    }

    // A's ciphertext and wrapped key moved onto another note, client or site.
    for target in [&b, &other_client, &other_site] {
        with_copied(notes, &mut c, (&a, 1), (target, 1), &CRYPTO_COLUMNS, "all").await;
        with_copied(
            notes,
            &mut c,
            (&a, 1),
            (target, 1),
            &CRYPTO_COLUMNS[..1],
            "key",
        )
        .await;
        with_copied(
            notes,
            &mut c,
            (&a, 1),
            (target, 1),
            &CRYPTO_COLUMNS[1..],
            "text",
        )
        .await;
    }
    // Revisions of one note swapped.
    with_copied(
        notes,
        &mut c,
        (&a, 2),
        (&a, 1),
        &CRYPTO_COLUMNS,
        "rev 2 as rev 1",
    )
    .await;
    with_copied(
        notes,
        &mut c,
        (&a, 1),
        (&a, 2),
        &CRYPTO_COLUMNS,
        "rev 1 as rev 2",
    )
    .await;
    assert_reads(&mut c, &a, 1, "alpha: the original note").await;
    assert_reads(&mut c, &a, 2, "alpha amended").await;

    // The note row moved to another client or site.
    for (column, value, original) in [("client_id", "c-2", "c-1"), ("site_id", "site-b", "site-a")]
    {
        let set = |v: &str| format!("UPDATE notes SET {column} = '{v}' WHERE note_id = '{b}'");
        assert_eq!(notes.sql(&set(value)).await.unwrap(), 1);
        assert_refused(&mut c, &b, 1, column).await;
        notes.sql(&set(original)).await.unwrap();
        assert_reads(&mut c, &b, 1, "bravo: same client").await;
    }

    // Every single flipped byte, in every encrypted column.
    for (id, rev, columns) in [
        (&b, 1, &["wrapped_key", "body_nonce", "body_ciphertext"][..]),
        (&a, 2, &["reason_nonce", "reason_ciphertext"][..]),
    ] {
        for col in columns {
            let original = notes.revision_bytes(id, rev, col).await.unwrap();
            assert!(!original.is_empty());
            for i in 0..original.len() {
                let mut flipped = original.clone();
                flipped[i] ^= 0x01;
                notes
                    .set_revision_bytes(id, rev, col, &flipped)
                    .await
                    .unwrap();
                assert_refused(&mut c, id, rev, &format!("{col}[{i}]")).await;
            }
            notes
                .set_revision_bytes(id, rev, col, &original)
                .await
                .unwrap();
        }
    }
    assert_reads(&mut c, &b, 1, "bravo: same client").await;
    let back = c.get_note(get_request(&a, 2)).await.unwrap().into_inner();
    assert_eq!(back.reason, "reason: correction");

    // Operators are told what failed; callers only the fixed message.
    let log = notes.log();
    assert!(
        log.contains("stored note failed its integrity check"),
        "{log}"
    );
    assert!(!log.contains("panicked"));
    for text in ["alpha", "bravo", "charlie", "delta", "correction"] {
        assert!(!log.contains(text), "log contains note text {text:?}");
    }
}

#[tokio::test]
async fn tampering_is_detected_sqlite() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    tamper_suite(&notes).await;
}

#[tokio::test]
async fn tampering_is_detected_postgres() {
    let (url, name) = kms_tests::pg::create_database().await.unwrap();
    let run = async move {
        let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
        let notes = NotesServer::start(
            &kms,
            NotesOptions {
                database_url: Some(url),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        tamper_suite(&notes).await;
    };
    let outcome = tokio::spawn(run).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}
