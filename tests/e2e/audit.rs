//! The audit log through the client library: every call (allowed, refused, or a forbidden
//! audit read) is recorded with who, what, which key and context, for whom and why, and
//! nothing secret; queries filter and page; under concurrent load the chain stays gapless,
//! verifies offline, and holds exactly one event per answered call.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine};
use kms_client::kms_audit::{self, AuditEvent, ExportRecord};
use kms_client::{code_name, pki::client_uri, AuditFilter, AuditMetadata, Code, Error};
use kms_tests::{ctx, KmsServer, ServerOptions, AUDITOR};

/// Every event of the server's chain, as the auditor sees it.
async fn all_events(server: &KmsServer) -> Vec<AuditEvent> {
    server
        .audit_client(AUDITOR)
        .unwrap()
        .query_all_audit_events(&AuditFilter::default(), None)
        .await
        .unwrap()
}

/// The one event with this operation and outcome.
fn one<'a>(events: &'a [AuditEvent], operation: &str, outcome: &str) -> &'a AuditEvent {
    let found: Vec<_> = events
        .iter()
        .filter(|e| e.operation == operation && e.outcome == outcome)
        .collect();
    assert_eq!(found.len(), 1, "{operation}/{outcome} in {events:#?}");
    found[0]
}

#[tokio::test]
async fn every_call_is_recorded_with_who_what_and_why() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let app = server.client("app").unwrap();
    let key = app.create_key(Some("audit-a"), None).await.unwrap();
    let c1 = ctx(&[("site", "s-1"), ("client", "c-1"), ("note", "n-1")]);
    let dk = app.generate_data_key("audit-a", &c1).await.unwrap();
    let lee = AuditMetadata {
        acting_user: "dr-lee".into(),
        purpose: "TREATMENT".into(),
    };
    app.decrypt(&dk.ciphertext_blob, &c1, Some(lee))
        .await
        .unwrap();
    // The blob cannot move to another note.
    let wrong = ctx(&[("site", "s-1"), ("client", "c-1"), ("note", "n-2")]);
    let snoop = AuditMetadata {
        acting_user: "dr-x".into(),
        purpose: "CURIOSITY".into(),
    };
    let refused = app
        .decrypt(&dk.ciphertext_blob, &wrong, Some(snoop))
        .await
        .unwrap_err();
    let refused_code = code_name(refused.code().unwrap());
    assert_ne!(refused_code, "OK");
    // Only auditors may read the log.
    let denied = app
        .audit()
        .query_audit_events(&AuditFilter::default(), 10, None)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some(Code::PermissionDenied), "{denied}");

    let events = all_events(&server).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events[0].operation, "ServerStarted");
    let app_id = client_uri("app");
    let key_id = Some(key.key_id.as_str());

    let created = one(&events, "CreateKey", "OK");
    assert_eq!(created.caller, app_id);
    assert_eq!(created.key_id.as_deref(), key_id);

    let generated = one(&events, "GenerateDataKey", "OK");
    assert_eq!(generated.caller, app_id);
    assert_eq!(generated.key_id.as_deref(), key_id);
    assert_eq!(generated.key_version, Some(dk.key_version));
    assert_eq!(generated.context, c1);

    let decrypted = one(&events, "Decrypt", "OK");
    assert_eq!(decrypted.caller, app_id);
    assert_eq!(decrypted.key_id.as_deref(), key_id);
    assert_eq!(decrypted.key_version, Some(dk.key_version));
    assert_eq!(decrypted.context, c1);
    assert_eq!(
        (decrypted.acting_user.as_str(), decrypted.purpose.as_str()),
        ("dr-lee", "TREATMENT")
    );

    let refused = one(&events, "Decrypt", refused_code);
    assert_eq!(refused.caller, app_id);
    assert_eq!(refused.key_id.as_deref(), key_id);
    assert_eq!(refused.context, wrong);
    assert_eq!(
        (refused.acting_user.as_str(), refused.purpose.as_str()),
        ("dr-x", "CURIOSITY")
    );

    let forbidden = one(&events, "QueryAuditEvents", "PERMISSION_DENIED");
    assert_eq!(forbidden.caller, app_id);

    for e in events.iter().filter(|e| e.caller == app_id) {
        assert!(!e.request_id.is_empty(), "{e:?}");
        assert_eq!(e.caller_fingerprint.len(), 64, "{e:?}");
    }
    assert_no_secret(&events, &[&dk.plaintext, &dk.ciphertext_blob]);
    filters_and_paging(&server, &events, &key.key_id).await;
}

/// No field of any event holds these bytes, in hex or base64.
fn assert_no_secret(events: &[AuditEvent], secrets: &[&[u8]]) {
    for e in events {
        let line = serde_json::to_string(e).unwrap();
        for secret in secrets {
            for form in [hex::encode(secret), STANDARD.encode(secret)] {
                assert!(!line.contains(&form), "secret in {line}");
            }
        }
    }
}

async fn filters_and_paging(server: &KmsServer, all: &[AuditEvent], key_id: &str) {
    let auditor = server.audit_client(AUDITOR).unwrap();
    let query = |filter: AuditFilter| {
        let auditor = auditor.clone();
        async move { auditor.query_all_audit_events(&filter, None).await.unwrap() }
    };
    let decrypts = query(AuditFilter {
        operation: Some("Decrypt".into()),
        context: Some(("client".into(), "c-1".into())),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(decrypts.len(), 2, "{decrypts:#?}");
    let denied = query(AuditFilter {
        caller: Some(client_uri("app")),
        outcome: Some("PERMISSION_DENIED".into()),
        ..AuditFilter::default()
    })
    .await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].operation, "QueryAuditEvents");
    let by_key = query(AuditFilter {
        key_id: Some(key_id.into()),
        ..AuditFilter::default()
    })
    .await;
    let expected: Vec<u64> = all
        .iter()
        .filter(|e| e.key_id.as_deref() == Some(key_id))
        .map(|e| e.seq)
        .collect();
    assert_eq!(by_key.iter().map(|e| e.seq).collect::<Vec<_>>(), expected);
    assert!(expected.len() >= 4);
    let none = query(AuditFilter {
        from_time_ms: Some(all.last().unwrap().time_ms + 3_600_000),
        ..AuditFilter::default()
    })
    .await;
    assert!(none.is_empty());

    // Small pages walk the same events in order.
    let mut paged = Vec::new();
    let mut token = None;
    loop {
        let page = auditor
            .query_audit_events(&AuditFilter::default(), 2, token.as_deref())
            .await
            .unwrap();
        assert!(page.events.len() <= 2);
        paged.extend(page.events);
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let first: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        paged
            .iter()
            .map(|e| e.seq)
            .take(first.len())
            .collect::<Vec<_>>(),
        first
    );
}

#[tokio::test]
async fn concurrent_load_leaves_a_gapless_chain_with_one_event_per_answer() {
    const TASKS: usize = 8;
    const CALLS: usize = 100;
    let server = KmsServer::start(ServerOptions {
        checkpoint_every: 100,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("load"), None).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let app = app.clone();
        tasks.spawn(async move {
            let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
            for i in 0..CALLS {
                let c = ctx(&[("client", &format!("c-{t}")), ("note", &format!("n-{i}"))]);
                let code = match app.generate_data_key("load", &c).await {
                    Ok(_) => "OK",
                    Err(e @ Error::Rpc { .. }) => code_name(e.code().unwrap()),
                    Err(e) => panic!("no answer: {e}"),
                };
                *outcomes.entry(code).or_default() += 1;
            }
            outcomes
        });
    }
    let mut answered: BTreeMap<&'static str, usize> = BTreeMap::new();
    while let Some(outcomes) = tasks.join_next().await {
        for (code, n) in outcomes.unwrap() {
            *answered.entry(code).or_default() += n;
        }
    }
    // A client-side deadline would leave it open whether the server answered (and recorded).
    assert!(
        !answered.contains_key("DEADLINE_EXCEEDED") && !answered.contains_key("CANCELLED"),
        "{answered:?}"
    );
    assert_eq!(answered.values().sum::<usize>(), TASKS * CALLS);

    let auditor = server.audit_client(AUDITOR).unwrap();
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let key = auditor.audit_public_key().await.unwrap();
    let report = kms_audit::verify(&records, &key.key);
    assert!(report.ok, "{report}");
    let events: Vec<&AuditEvent> = records.iter().filter_map(ExportRecord::as_event).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(report.covered_through_seq, seqs.last().copied());
    let checkpoints = records.len() - events.len();
    assert!(
        checkpoints >= TASKS * CALLS / 100,
        "{checkpoints} checkpoints"
    );

    let mut recorded: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.operation == "GenerateDataKey") {
        *recorded.entry(e.outcome.as_str()).or_default() += 1;
    }
    let recorded: BTreeMap<&str, usize> = recorded.into_iter().collect();
    let answered: BTreeMap<&str, usize> = answered.into_iter().collect();
    assert_eq!(recorded, answered);
}

/// VerifyAuditLog asks for a checkpoint of the head; when an automatic checkpoint already
/// covers it (here: one after every event), the stored one answers instead of a duplicate.
#[tokio::test]
async fn verify_right_after_an_automatic_checkpoint_succeeds() {
    let server = KmsServer::start(ServerOptions {
        checkpoint_every: 1,
        ..ServerOptions::default()
    })
    .await
    .unwrap();
    let app = server.client("app").unwrap();
    app.create_key(Some("cp-dup"), None).await.unwrap();
    let auditor = server.audit_client(AUDITOR).unwrap();
    for _ in 0..3 {
        let report = auditor.verify_audit_log().await.unwrap();
        assert!(report.ok, "{}", report.report);
        assert!(report.checkpoints_checked >= 1, "{}", report.report);
    }
    let records = auditor.export_audit_log(0, 0).await.unwrap();
    let key = auditor.audit_public_key().await.unwrap();
    let offline = kms_audit::verify(&records, &key.key);
    assert!(offline.ok, "{offline}");
}
