//! Two sites: notes-store refuses a caller acting for a site it is not bound to before any KMS
//! call, and the KMS refuses site B's notes-store the data keys of site A's notes even when B
//! holds a copy of A's rows (the encryption context says site a; B's identity says site b).

use std::path::PathBuf;
use std::time::Duration;

use kms_proto::kms::v1 as kpb;
use kms_proto::kms::v1::audit_service_client::AuditServiceClient;
use kms_proto::notes::v1 as pb;
use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use time::OffsetDateTime;
use tonic::Code;

/// Sites share the key "notes"; each may use it only for data whose context says its site, and
/// keeps its per-client keys under "notes/{site}/clients/".
const SHARED_KEY_POLICY: &str = r#"
[[allow]]
identity = "spiffe://dev.clinic/client/admin"
role = "key-admin"

[[allow]]
identity = "spiffe://dev.clinic/client/auditor"
role = "auditor"

[[allow]]
identity = "spiffe://dev.clinic/site/{site}/notes-store"
role = "service"
keys = ["notes"]
context = { site = "{site}" }

# Per-client keys (crypto-shredding), under the same context condition.
[[allow]]
identity = "spiffe://dev.clinic/site/{site}/notes-store"
role = "custodian"
keys = ["notes/{site}/clients/*"]
context = { site = "{site}" }
"#;

/// Writes a client certificate for `uri` from the KMS's CA into `dir`; returns (cert, key).
fn site_cert(kms: &KmsServer, dir: &std::path::Path, name: &str, uri: &str) -> (PathBuf, PathBuf) {
    let now = OffsetDateTime::now_utc();
    let cert = kms
        .ca()
        .unwrap()
        .issue_client_cert(
            name,
            Some(uri),
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    let paths = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    cert.write(&paths.0, &paths.1).unwrap();
    paths
}

async fn audit_events(kms: &KmsServer, q: kpb::QueryAuditEventsRequest) -> Vec<kpb::AuditEvent> {
    let mut audit = AuditServiceClient::new(kms.channel("auditor").await.unwrap());
    audit
        .query_audit_events(kpb::QueryAuditEventsRequest {
            page_size: 1000,
            ..q
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

#[tokio::test]
async fn site_b_cannot_decrypt_a_copy_of_site_a_notes() {
    let kms = KmsServer::start(ServerOptions {
        policy: SHARED_KEY_POLICY.to_string(),
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site_a = site_cert(
        &kms,
        dir.path(),
        "site-a",
        "spiffe://dev.clinic/site/a/notes-store",
    );
    let site_b = site_cert(
        &kms,
        dir.path(),
        "site-b",
        "spiffe://dev.clinic/site/b/notes-store",
    );
    let db_a = dir.path().join("a.db");
    let db_b = dir.path().join("b.db");

    let mut notes_a = NotesServer::start(
        &kms,
        NotesOptions {
            database_url: Some(format!("sqlite:{}", db_a.display())),
            kms_client_cert: Some(site_a),
            callers:
                "[[callers]]\nidentity = \"spiffe://dev.clinic/client/app\"\nsites = [\"a\"]\n"
                    .into(),
            ..NotesOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = notes_a.client().await.unwrap();
    let note_id = c
        .create_note(create_request("a", "c-1", "2026-01-02", "site A's note"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    c.get_note(get_request(&note_id, 0)).await.unwrap();
    drop(c);
    // Stopped, so the database file holds everything; B gets a copy of A's rows.
    notes_a
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    std::fs::copy(&db_a, &db_b).unwrap();
    for suffix in ["-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", db_a.display()));
        if from.exists() {
            std::fs::copy(&from, format!("{}{suffix}", db_b.display())).unwrap();
        }
    }

    // B is (mis)configured to serve "app" for every site: only the KMS stands in the way.
    let notes_b = NotesServer::start(
        &kms,
        NotesOptions {
            database_url: Some(format!("sqlite:{}", db_b.display())),
            kms_client_cert: Some(site_b),
            ..NotesOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = notes_b.client().await.unwrap();
    let err = c.get_note(get_request(&note_id, 0)).await.unwrap_err();
    assert_ne!(
        err.code(),
        Code::NotFound,
        "the copy lacks the note: {err:?}"
    );
    // The KMS refused B's Decrypt: the data key is wrapped under site A's client key
    // (notes/a/clients/c-1), which B's grants do not cover, so to B it does not exist.
    let events = audit_events(
        &kms,
        kpb::QueryAuditEventsRequest {
            caller: "spiffe://dev.clinic/site/b/notes-store".into(),
            operation: "Decrypt".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!events.is_empty(), "no Decrypt by site B was audited");
    for e in &events {
        assert_eq!(e.outcome, "NOT_FOUND", "{e:?}");
        assert_eq!(
            e.context.get("site").map(String::as_str),
            Some("a"),
            "{e:?}"
        );
        assert!(e.detail.ends_with("not found"), "{e:?}");
    }
    // B may of course still write and read its own site's notes.
    let own = c
        .create_note(create_request("b", "c-2", "2026-01-03", "site B's note"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    c.get_note(get_request(&own, 0)).await.unwrap();
}

#[tokio::test]
async fn notes_store_refuses_another_site_before_any_kms_call() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    // "app" acts for site a, "admin" (used here as a second practice application) for site b.
    let callers = "[[callers]]\nidentity = \"spiffe://dev.clinic/client/app\"\nsites = [\"a\"]\n\n\
                   [[callers]]\nidentity = \"spiffe://dev.clinic/client/admin\"\nsites = [\"b\"]\n";
    let notes = NotesServer::start(
        &kms,
        NotesOptions {
            callers: callers.into(),
            ..NotesOptions::default()
        },
    )
    .await
    .unwrap();
    let mut app = notes.client().await.unwrap();
    let mut other = NotesServiceClient::new(notes.channel("admin").await.unwrap());
    let b_note = other
        .create_note(create_request("b", "c-9", "2026-01-04", "site B's note"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    let a_note = app
        .create_note(create_request("a", "c-1", "2026-01-04", "site A's note"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    app.get_note(get_request(&a_note, 0)).await.unwrap();

    let denied = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("site b"), "{what}: {}", e.message());
    };
    denied(
        app.create_note(create_request("b", "c-9", "2026-01-05", "x"))
            .await
            .map(drop),
        "CreateNote",
    );
    denied(
        app.get_note(get_request(&b_note, 0)).await.map(drop),
        "GetNote",
    );
    denied(
        app.amend_note(amend_request(&b_note, 1, "y", "why"))
            .await
            .map(drop),
        "AmendNote",
    );
    denied(
        app.get_note_history(pb::GetNoteHistoryRequest {
            note_id: b_note.clone(),
        })
        .await
        .map(drop),
        "GetNoteHistory",
    );
    denied(
        app.list_notes(pb::ListNotesRequest {
            site_id: "b".into(),
            client_id: "c-9".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        "ListNotes",
    );
    // An identity with no [[callers]] entry is refused for every site.
    let mut stranger = NotesServiceClient::new(notes.channel("auditor").await.unwrap());
    let e = stranger
        .get_note(get_request(&a_note, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // None of the refused calls reached the KMS: site b saw exactly one data key (admin's
    // create) and no Decrypt of b's note; the stranger's read of a's note no Decrypt either.
    let site_b_keys = audit_events(
        &kms,
        kpb::QueryAuditEventsRequest {
            operation: "GenerateDataKey".into(),
            context_key: "site".into(),
            context_value: "b".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(site_b_keys.len(), 1, "{site_b_keys:?}");
    for note in [&b_note, &a_note] {
        let decrypts = audit_events(
            &kms,
            kpb::QueryAuditEventsRequest {
                operation: "Decrypt".into(),
                context_key: "note".into(),
                context_value: note.clone(),
                ..Default::default()
            },
        )
        .await;
        let expected = if note == &a_note { 1 } else { 0 };
        assert_eq!(decrypts.len(), expected, "{note}: {decrypts:?}");
    }
}
