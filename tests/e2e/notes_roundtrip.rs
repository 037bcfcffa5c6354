//! notes-store end to end on a real KMS (SoftHSM): create, read (every revision), list,
//! amend, history, on SQLite and PostgreSQL; the read log line; health, reflection (v1 and
//! v1alpha), metrics, mutual TLS, and graceful shutdown on SIGTERM and SIGINT.

use std::time::Duration;

use kms_proto::notes::v1 as pb;
use kms_tests::metrics::{sample, scrape};
use kms_tests::notes::{amend_request, create_request, get_request};
use kms_tests::{KmsServer, NotesOptions, NotesServer, ServerOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICE: &str = "notes.v1.NotesService";

async fn round_trip(notes: &NotesServer) {
    let mut c = notes.client().await.unwrap();
    let body = "Client reported better sleep; discussed coping plan. Ünïcödé ✓";
    let created = c
        .create_note(create_request("site-a", "client-17", "2024-05-02", body))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.revision, 1);
    assert!(created.created_at_unix_ms > 0);
    let id = created.note_id.clone();
    // Time-ordered (version 7), so the databases' note-id indexes grow at their right edge.
    let first_id = uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(first_id.get_version_num(), 7, "{id}");

    let got = c.get_note(get_request(&id, 0)).await.unwrap().into_inner();
    assert_eq!(got.body, body);
    assert_eq!(got.reason, "");
    let meta = got.note.unwrap();
    assert_eq!(
        (meta.site_id.as_str(), meta.client_id.as_str()),
        ("site-a", "client-17")
    );
    assert_eq!(meta.author_id, "clin-7");
    assert_eq!(meta.session_date, "2024-05-02");
    assert_eq!(meta.current_revision, 1);
    let rev = got.revision.unwrap();
    assert_eq!(rev.revision, 1);
    assert!(!rev.has_reason);
    assert_eq!(rev.kms_key_version, 1);

    // Amend twice; every revision stays readable with its own body and reason.
    let a2 = c
        .amend_note(amend_request(
            &id,
            1,
            "corrected: slept 6h",
            "typo in hours",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a2.revision, 2);
    let a3 = c
        .amend_note(amend_request(&id, 2, "corrected again", "added detail"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a3.revision, 3);
    let expect = [
        (1, body, ""),
        (2, "corrected: slept 6h", "typo in hours"),
        (3, "corrected again", "added detail"),
    ];
    for (rev, body, reason) in expect {
        let got = c
            .get_note(get_request(&id, rev))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((got.body.as_str(), got.reason.as_str()), (body, reason));
        assert_eq!(got.revision.unwrap().revision, rev);
        assert_eq!(got.note.unwrap().current_revision, 3);
    }
    let current = c.get_note(get_request(&id, 0)).await.unwrap().into_inner();
    assert_eq!(current.body, "corrected again");

    let history = c
        .get_note_history(pb::GetNoteHistoryRequest {
            note_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let revs: Vec<_> = history
        .revisions
        .iter()
        .map(|r| (r.revision, r.author_id.as_str(), r.has_reason))
        .collect();
    assert_eq!(
        revs,
        [
            (1, "clin-7", false),
            (2, "clin-8", true),
            (3, "clin-8", true)
        ]
    );

    // Listing: metadata only, paged, date-filtered, scoped to the client.
    for (client, date) in [
        ("client-17", "2024-05-01"),
        ("client-17", "2024-06-01"),
        ("client-18", "2024-05-02"),
    ] {
        let later = c
            .create_note(create_request("site-a", client, date, "x"))
            .await
            .unwrap()
            .into_inner();
        let later_id = uuid::Uuid::parse_str(&later.note_id).unwrap();
        assert!(later_id > first_id, "{later_id} sorts before {first_id}");
    }
    let mut dates = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_notes(pb::ListNotesRequest {
                site_id: "site-a".into(),
                client_id: "client-17".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.notes.len() <= 2);
        dates.extend(page.notes.into_iter().map(|n| n.session_date));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(dates, ["2024-05-01", "2024-05-02", "2024-06-01"]);
    let may = c
        .list_notes(pb::ListNotesRequest {
            site_id: "site-a".into(),
            client_id: "client-17".into(),
            session_date_from: "2024-05-01".into(),
            session_date_to: "2024-05-31".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(may.notes.len(), 2);
    assert!(may.next_page_token.is_empty());

    // The read log lines name note, acting user and purpose, never the body or reason.
    let log = notes.log();
    let read_line = log
        .lines()
        .find(|l| l.contains("note read") && l.contains(&id))
        .unwrap_or_else(|| panic!("no read log line:\n{log}"));
    assert!(
        read_line.contains("user-42") && read_line.contains("TREATMENT"),
        "{read_line}"
    );
    for secret in [body, "slept 6h", "typo in hours", "added detail"] {
        assert!(!log.contains(secret), "log contains note text {secret:?}");
    }
    assert!(!log.contains("panicked"));
}

#[tokio::test]
async fn round_trip_sqlite() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let notes = NotesServer::start(&kms, NotesOptions::default())
        .await
        .unwrap();
    round_trip(&notes).await;
}

#[tokio::test]
async fn round_trip_postgres() {
    let (url, name) = kms_tests::pg::create_database().await.unwrap();
    let result = async move {
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
        round_trip(&notes).await;
    };
    let outcome = tokio::spawn(result).await;
    kms_tests::pg::drop_database(&name).await;
    outcome.unwrap();
}

async fn health(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

/// Lists the services over one reflection version.
macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let mut services = Vec::new();
        while let Some(answer) = answers.message().await.unwrap() {
            if let Some(MessageResponse::ListServicesResponse(l)) = answer.message_response {
                services.extend(l.service.into_iter().map(|s| s.name));
            }
        }
        services
    }};
}

#[tokio::test]
async fn transport_health_reflection_metrics_and_shutdown() {
    let kms = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut notes = NotesServer::start(
        &kms,
        NotesOptions {
            metrics: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let channel = notes.channel("app").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while health(channel.clone(), SERVICE).await != ServingStatus::Serving {
        assert!(std::time::Instant::now() < deadline, "{}", notes.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for services in [
        list_services!(v1, channel.clone()),
        list_services!(v1alpha, channel.clone()),
    ] {
        assert!(services.iter().any(|s| s == SERVICE), "{services:?}");
        assert!(services.iter().any(|s| s == "grpc.health.v1.Health"));
    }

    // A caller without a client certificate gets nowhere.
    let ca = std::fs::read(notes.pki_dir.join("ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let anonymous = async {
        let ch = tonic::transport::Endpoint::try_from(notes.endpoint())?
            .tls_config(tls)?
            .connect()
            .await?;
        kms_proto::notes::v1::notes_service_client::NotesServiceClient::new(ch)
            .get_note_history(pb::GetNoteHistoryRequest {
                note_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{s}"))
    };
    let refused: anyhow::Result<_> = anonymous.await;
    assert!(refused.is_err(), "a caller without certificate was served");

    // Metrics count requests by RPC and code, and the data keys and unwraps of each KMS call.
    let mut c = notes.client().await.unwrap();
    let err = c.get_note(get_request("nope", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let addr = notes.metrics_addr.unwrap();
    let text = scrape(addr).await.unwrap();
    assert!(
        text.contains("notes_requests_total{rpc=\"GetNote\",code=\"InvalidArgument\"}"),
        "{text}"
    );
    let mut written = Vec::new();
    for _ in 0..3 {
        let created = c
            .create_note(create_request(
                "site-m",
                "client-m",
                "2026-11-28",
                "metrics",
            ))
            .await
            .unwrap()
            .into_inner();
        written.push(created.note_id);
    }
    for id in &written[..2] {
        c.get_note(get_request(id, 0)).await.unwrap();
    }
    let text = scrape(addr).await.unwrap();
    // One at a time: three calls of one data key each (a client's first note also creates its
    // KMS key, which is not a data-key call).
    assert_eq!(
        sample(&text, "notes_kms_data_key_calls_total", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "notes_kms_data_keys_total", &[]), Some(3.0));
    assert_eq!(
        sample(&text, "notes_kms_data_keys_per_call_count", &[]),
        Some(3.0)
    );
    // ...and two reads, one at a time: two BatchDecrypt calls of one unwrap each (the refused
    // read above never reached the KMS).
    for (name, want) in [
        ("notes_kms_unwrap_calls_total", 2.0),
        ("notes_kms_unwraps_total", 2.0),
        ("notes_kms_unwraps_per_call_count", 2.0),
    ] {
        assert_eq!(sample(&text, name, &[]), Some(want), "{name}\n{text}");
    }
    // One worker thread per core unless configured (`server.worker_threads`).
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        sample(&text, "notes_runtime_worker_threads", &[]),
        Some(cores as f64)
    );

    // Graceful shutdown on SIGTERM; a second server on the same KMS, with three worker
    // threads, serves and stops on SIGINT.
    let status = notes
        .signal_and_wait("TERM", Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(notes.log().contains("notes-store stopped"));
    let mut other = NotesServer::start(
        &kms,
        NotesOptions {
            metrics: true,
            worker_threads: Some(3),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let text = scrape(other.metrics_addr.unwrap()).await.unwrap();
    assert_eq!(
        sample(&text, "notes_runtime_worker_threads", &[]),
        Some(3.0),
        "{text}"
    );
    let mut c = other.client().await.unwrap();
    c.create_note(create_request("site-m", "client-m", "2026-11-28", "three"))
        .await
        .unwrap();
    let status = other
        .signal_and_wait("INT", Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
