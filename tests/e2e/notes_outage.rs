//! Fail closed, nothing lost: with the KMS stopped, CreateNote and AmendNote answer UNAVAILABLE
//! and write nothing, GetNote answers UNAVAILABLE, health turns NOT_SERVING; once the KMS is
//! back everything works again without restarting notes-store. A database failure after the
//! data key was generated (a trigger that refuses revision inserts) leaves no half-written
//! note or revision, on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use kms_proto::notes::v1 as pb;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn count(notes: &NotesServer, table: &str) -> u64 {
    notes
        .sql_text(&format!("SELECT CAST(COUNT(*) AS TEXT) FROM {table}"))
        .await
        .unwrap()
        .parse()
        .unwrap()
}

async fn wait_for_health(notes: &NotesServer, want: ServingStatus) {
    let channel = notes.channel("app").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "notes.v1.NotesService".into(),
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn history(id: &str) -> pb::GetNoteHistoryRequest {
    pb::GetNoteHistoryRequest { note_id: id.into() }
}

#[tokio::test]
async fn kms_outage_fails_closed_and_recovers_without_restart() {
    let mut kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    let mut c = notes.client().await.unwrap();
    let id = c
        .create_note(create_request(
            "site-a",
            "c-1",
            "2024-03-03",
            "before the outage",
        ))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    wait_for_health(&notes, ServingStatus::Serving).await;

    kms.signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let r = c
            .create_note(create_request(
                "site-a",
                "c-1",
                "2024-03-04",
                "during the outage",
            ))
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        let r = c.get_note(get_request(&id, 0)).await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        let r = c.amend_note(amend_request(&id, 1, "amended", "why")).await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    }
    assert!(started.elapsed() < Duration::from_secs(30), "requests hung");
    // Nothing was written; metadata stays readable.
    assert_eq!(count(&notes, "notes").await, 1);
    assert_eq!(count(&notes, "note_revisions").await, 1);
    let h = c.get_note_history(history(&id)).await.unwrap().into_inner();
    assert_eq!(h.revisions.len(), 1);
    assert_eq!(h.note.unwrap().current_revision, 1);
    wait_for_health(&notes, ServingStatus::NotServing).await;

    // The KMS comes back on the same address: notes-store serves again by itself.
    kms.restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match c.get_note(get_request(&id, 0)).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("after the KMS came back: {s}"),
        }
    };
    assert_eq!(got.body, "before the outage");
    let amended = c
        .amend_note(amend_request(&id, 1, "after the outage", "follow-up"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amended.revision, 2);
    let fresh = c
        .create_note(create_request("site-a", "c-1", "2024-03-05", "new note"))
        .await
        .unwrap()
        .into_inner();
    let back = c.get_note(get_request(&fresh.note_id, 0)).await.unwrap();
    assert_eq!(back.into_inner().body, "new note");
    wait_for_health(&notes, ServingStatus::Serving).await;
    assert!(!notes.log().contains("panicked"));
}

const SQLITE_TRIGGER: &str = "CREATE TRIGGER fail_revisions BEFORE INSERT ON note_revisions \
     BEGIN SELECT RAISE(ABORT, 'injected failure'); END;";
const PG_TRIGGER: &str = "CREATE FUNCTION fail_revisions() RETURNS trigger LANGUAGE plpgsql AS \
     $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
     CREATE TRIGGER fail_revisions BEFORE INSERT ON note_revisions \
     FOR EACH ROW EXECUTE FUNCTION fail_revisions();";

async fn database_failure_leaves_nothing(notes: &NotesServer) {
    let mut c = notes.client().await.unwrap();
    let id = c
        .create_note(create_request("site-a", "c-1", "2024-03-03", "kept"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    let postgres = notes.sqlite_path().is_none();
    notes
        .sql(if postgres { PG_TRIGGER } else { SQLITE_TRIGGER })
        .await
        .unwrap();

    // The KMS hands out a data key, then the database refuses the revision row.
    let err = c
        .create_note(create_request("site-a", "c-1", "2024-03-04", "lost?"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert_eq!(err.message(), "internal error");
    let err = c
        .amend_note(amend_request(&id, 1, "lost?", "why"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    // No note row without its revision, no moved revision counter.
    assert_eq!(count(notes, "notes").await, 1);
    assert_eq!(count(notes, "note_revisions").await, 1);
    let h = c.get_note_history(history(&id)).await.unwrap().into_inner();
    assert_eq!(h.note.unwrap().current_revision, 1);
    assert_eq!(
        c.get_note(get_request(&id, 0))
            .await
            .unwrap()
            .into_inner()
            .body,
        "kept"
    );

    let drop = if postgres {
        "DROP TRIGGER fail_revisions ON note_revisions"
    } else {
        "DROP TRIGGER fail_revisions"
    };
    notes.sql(drop).await.unwrap();
    c.amend_note(amend_request(&id, 1, "now it works", "retry"))
        .await
        .unwrap();
    assert!(
        notes.log().contains("injected failure"),
        "the detail is logged"
    );
}

#[tokio::test]
async fn database_failure_after_data_key_sqlite() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    database_failure_leaves_nothing(&notes).await;
}

#[tokio::test]
async fn database_failure_after_data_key_postgres() {
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
        database_failure_leaves_nothing(&notes).await;
    };
    let outcome = tokio::spawn(run).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}
