//! Concurrent amendments of one revision: exactly one wins, the others get FAILED_PRECONDITION
//! or ABORTED, and the history has no gaps and loses nothing, on SQLite and PostgreSQL.

use kms_proto::notes::v1 as pb;
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::Code;

const TASKS: usize = 8;
const ROUNDS: u32 = 3;

async fn one_amendment_wins(notes: &NotesServer) {
    let c = notes.client().await.unwrap();
    let id = c
        .clone()
        .create_note(create_request("site-a", "c-1", "2024-06-06", "revision 1"))
        .await
        .unwrap()
        .into_inner()
        .note_id;
    let mut winners = vec!["revision 1".to_string()];
    for round in 1..=ROUNDS {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let mut c = c.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let body = format!("round {round} task {t}");
                    let r = c
                        .amend_note(amend_request(&id, round, &body, "concurrent"))
                        .await;
                    (body, r)
                })
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            let (body, result) = task.await.unwrap();
            match result {
                Ok(r) => {
                    assert_eq!(r.into_inner().revision, round + 1);
                    won.push(body);
                }
                Err(s) => assert!(
                    matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
                    "a losing amendment got {s}"
                ),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        winners.extend(won);
    }
    let mut c = c;
    let history = c
        .get_note_history(pb::GetNoteHistoryRequest {
            note_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let revisions: Vec<u32> = history.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, (1..=ROUNDS + 1).collect::<Vec<_>>());
    // Every revision reads back as the body its winner wrote.
    for (i, body) in winners.iter().enumerate() {
        let got = c
            .get_note(get_request(&id, i as u32 + 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.body, body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_amendments_sqlite() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    one_amendment_wins(&notes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_amendments_postgres() {
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
        one_amendment_wins(&notes).await;
    };
    let outcome = tokio::spawn(run).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}
