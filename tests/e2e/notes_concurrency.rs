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

/// Concurrent CreateNote calls share KMS calls (notes-store gathers their data-key requests
/// into GenerateDataKeys), yet every note's data key is its own: one OK GenerateDataKey audit
/// event per note, carrying that note's ids. Concurrent GetNote calls share KMS calls too
/// (BatchDecrypt), yet every read is its own OK Decrypt event with that note's ids and that
/// read's acting user and purpose, and every note reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_and_reads_share_kms_calls_and_each_item_is_audited() {
    const NOTES: usize = 48;
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    let c = notes.client().await.unwrap();
    let tasks: Vec<_> = (0..NOTES)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let client = format!("c-{}", i % 3);
                let body = format!("note {i}");
                let id = c
                    .create_note(create_request("site-a", &client, "2024-06-06", &body))
                    .await
                    .unwrap()
                    .into_inner()
                    .note_id;
                (id, client, body)
            })
        })
        .collect();
    let mut created = Vec::new();
    for t in tasks {
        created.push(t.await.unwrap());
    }

    let auditor = kms.audit_client("auditor").unwrap();
    let filter = kms_client::AuditFilter {
        operation: Some("GenerateDataKey".into()),
        outcome: Some("OK".into()),
        ..Default::default()
    };
    let events = auditor
        .query_audit_events(&filter, 1000, None)
        .await
        .unwrap()
        .events;
    let mut largest_call = 0;
    for (id, client, _) in &created {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.context.get("note") == Some(id))
            .collect();
        assert_eq!(mine.len(), 1, "note {id}: {} data-key events", mine.len());
        let event = mine[0];
        assert_eq!(event.context.get("client"), Some(client));
        assert_eq!(
            event.context.get("site").map(String::as_str),
            Some("site-a")
        );
        assert_eq!(event.context.get("revision").map(String::as_str), Some("1"));
        largest_call = largest_call.max(call_size(&event.detail, "GenerateDataKeys"));
    }
    assert!(
        largest_call > 1,
        "{NOTES} concurrent notes, yet every data key had a KMS call of its own"
    );

    let purposes = [
        (pb::PurposeOfUse::Treatment, "TREATMENT"),
        (pb::PurposeOfUse::Supervision, "SUPERVISION"),
        (pb::PurposeOfUse::Legal, "LEGAL"),
    ];
    let reads: Vec<_> = created
        .iter()
        .enumerate()
        .map(|(i, (id, _, body))| {
            let (mut c, id, body) = (c.clone(), id.clone(), body.clone());
            tokio::spawn(async move {
                let request = pb::GetNoteRequest {
                    acting_user: format!("reader-{i}"),
                    purpose: purposes[i % 3].0 as i32,
                    ..get_request(&id, 0)
                };
                let got = c.get_note(request).await.unwrap().into_inner();
                assert_eq!(got.body, body);
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    let filter = kms_client::AuditFilter {
        operation: Some("Decrypt".into()),
        outcome: Some("OK".into()),
        ..Default::default()
    };
    let events = auditor
        .query_audit_events(&filter, 1000, None)
        .await
        .unwrap()
        .events;
    assert_eq!(events.len(), NOTES, "one Decrypt per read");
    let mut largest_call = 0;
    for (i, (id, client, _)) in created.iter().enumerate() {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.context.get("note") == Some(id))
            .collect();
        assert_eq!(mine.len(), 1, "note {id}: {} Decrypt events", mine.len());
        let event = mine[0];
        assert_eq!(event.context.get("client"), Some(client));
        assert_eq!(
            (event.acting_user.as_str(), event.purpose.as_str()),
            (format!("reader-{i}").as_str(), purposes[i % 3].1)
        );
        largest_call = largest_call.max(call_size(&event.detail, "BatchDecrypt"));
    }
    assert!(
        largest_call > 1,
        "{NOTES} concurrent reads, yet every unwrap had a KMS call of its own"
    );
}

/// The number of items in the `call` an item's audit event came from: its detail reads
/// "item i of n of <call> call <request id>".
fn call_size(detail: &str, call: &str) -> usize {
    assert!(detail.contains(&format!(" of {call} call ")), "{detail}");
    detail
        .split(" of ")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("detail {detail:?}"))
}
