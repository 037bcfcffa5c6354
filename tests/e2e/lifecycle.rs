//! Process lifecycle: graceful shutdown on SIGTERM and on SIGINT with requests in flight, and
//! restarts that keep keys and blobs usable (metadata in SQLite or PostgreSQL, key objects in
//! the HSM token).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_proto::kms::v1 as pb;
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use tonic::Code;

/// The configured `shutdown_grace_secs` of test servers.
const GRACE: Duration = Duration::from_secs(5);
const WORKERS: usize = 50;

/// How one GenerateDataKey call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// UNAVAILABLE: the connection was refused or lost; safe to retry elsewhere.
    Unavailable(String),
    /// The client library never sent the request because the server had announced a graceful
    /// close (HTTP/2 GOAWAY, NO_ERROR) of the connection it was queued on. tonic 0.14 reports
    /// this as CANCELLED "operation was canceled" (source: hyper Canceled "connection closed",
    /// or "connection was not ready" when the connection task ended before the request was
    /// dispatched) or as INTERNAL "h2 protocol error" (source: h2 GoAway(NO_ERROR, Remote)).
    /// Not an answer
    /// from the server; only acceptable for calls started after the signal.
    NotSent(Code),
    /// The connection ended under a stream the client had opened, with no GOAWAY naming it:
    /// h2 fails such a stream with Io BrokenPipe "stream closed because of a broken pipe",
    /// which tonic 0.14 reports as UNKNOWN "transport error". Not an answer from the server:
    /// hyper's graceful shutdown waits for every stream it has taken, and the test checks that
    /// the server stopped within its grace period, so the server had not taken this one (seen
    /// under CI load: 7 of 50 calls started after the signal, 2026-12-07). Unlike `NotSent`,
    /// never acceptable for a call started before the signal.
    ConnectionGone(Code),
    /// Anything else: a failure.
    Other(Code, String),
}

fn outcome(status: &tonic::Status) -> Outcome {
    let mut chain = String::new();
    let mut broken_pipe = false;
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        chain.push_str(&format!(" <- {e:?}"));
        broken_pipe |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        source = e.source();
    }
    let not_sent = match status.code() {
        Code::Cancelled => {
            chain.contains(r#"hyper::Error(Canceled, "connection closed")"#)
                || chain.contains(r#"hyper::Error(Canceled, "connection was not ready")"#)
        }
        Code::Internal => chain.contains("GoAway(b\"\", NO_ERROR, Remote)"),
        _ => false,
    };
    let connection_gone = status.code() == Code::Unknown && broken_pipe;
    match status.code() {
        Code::Unavailable => Outcome::Unavailable(status.message().to_string()),
        code if not_sent => Outcome::NotSent(code),
        code if connection_gone => Outcome::ConnectionGone(code),
        code => Outcome::Other(code, format!("{}{chain}", status.message())),
    }
}

/// The classifier itself, on the error chain seen in CI: the real case is too rare to wait for.
#[test]
fn a_broken_pipe_under_unknown_is_connection_gone() {
    let mut status = tonic::Status::unknown("transport error");
    status.set_source(Arc::new(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "stream closed because of a broken pipe",
    )));
    assert_eq!(outcome(&status), Outcome::ConnectionGone(Code::Unknown));
    let mut reset = tonic::Status::unknown("transport error");
    reset.set_source(Arc::new(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )));
    assert!(matches!(outcome(&reset), Outcome::Other(Code::Unknown, _)));
}

/// One call as a worker saw it.
#[derive(Debug)]
struct Call {
    started: Instant,
    finished: Instant,
    outcome: Outcome,
}

async fn graceful_shutdown(sig: &str) {
    let mut server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut admin = server.raw("app").await.unwrap();
    let key = admin
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id;

    // 50 workers on 5 connections keep GenerateDataKey calls in flight; each stops after its
    // first failure or after a call it started after the signal.
    let signal_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..5 {
        let raw = server.raw("app").await.unwrap();
        for _ in 0..WORKERS / 5 {
            let (mut raw, key, signal_at) = (raw.clone(), key.clone(), signal_at.clone());
            workers.push(tokio::spawn(async move {
                let mut calls = Vec::new();
                loop {
                    let started = Instant::now();
                    let req = pb::GenerateDataKeyRequest {
                        key: key.clone(),
                        encryption_context: wire_ctx(&[("c", "1")]),
                    };
                    let outcome = match raw.generate_data_key(req).await {
                        Ok(r) if r.get_ref().plaintext.len() == 32 => Outcome::Ok,
                        Ok(r) => Outcome::Other(
                            Code::Ok,
                            format!("{} byte data key", r.get_ref().plaintext.len()),
                        ),
                        Err(s) => outcome(&s),
                    };
                    let failed = outcome != Outcome::Ok;
                    calls.push(Call {
                        started,
                        finished: Instant::now(),
                        outcome,
                    });
                    let after_signal = signal_at.lock().unwrap().is_some_and(|at| started > at);
                    if failed || after_signal {
                        return calls;
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sent = Instant::now();
    *signal_at.lock().unwrap() = Some(sent);
    let status =
        tokio::task::block_in_place(|| server.signal_and_wait(sig, GRACE + Duration::from_secs(5)))
            .unwrap();
    let took = sent.elapsed();
    assert!(
        status.success(),
        "SIG{sig}: exit status {status}\n{}",
        server.log()
    );
    assert!(
        took < GRACE,
        "SIG{sig}: took {took:?}, the grace period is {GRACE:?}"
    );

    let mut calls = Vec::new();
    for w in workers {
        calls.extend(
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (before, after): (Vec<&Call>, Vec<&Call>) = calls.iter().partition(|c| c.started < sent);
    let tally = |calls: &[&Call]| {
        let mut t: BTreeMap<String, usize> = BTreeMap::new();
        calls
            .iter()
            .for_each(|c| *t.entry(format!("{:?}", c.outcome)).or_default() += 1);
        t
    };
    let (tally_before, tally_after) = (tally(&before), tally(&after));
    // In flight at the signal: started before it, answered (OK) after it.
    let in_flight = before
        .iter()
        .filter(|c| c.finished > sent && c.outcome == Outcome::Ok)
        .count();
    eprintln!("SIG{sig}: exit after {took:?}; {in_flight} calls in flight at the signal");
    eprintln!("SIG{sig}: started before the signal: {tally_before:?}; after: {tally_after:?}");

    // Every call the server had (or may have had) when the signal came completes with OK. A
    // call the client had started but not yet written when the server's GOAWAY arrived ends
    // NotSent: the GOAWAY (NO_ERROR) names the last stream the server took, and h2 fails
    // only the streams above it, so the server never saw that call (seen under CI load: 1 of
    // 377 calls started before the signal).
    assert!(
        before
            .iter()
            .all(|c| matches!(c.outcome, Outcome::Ok | Outcome::NotSent(_))),
        "SIG{sig}: {tally_before:#?}"
    );
    let answered_before = before.iter().filter(|c| c.outcome == Outcome::Ok).count();
    assert!(
        answered_before >= WORKERS,
        "SIG{sig}: only {answered_before} calls answered before the signal"
    );
    assert!(
        in_flight > 0,
        "SIG{sig}: no call was in flight at the signal: the test proved nothing"
    );
    // Later calls: OK, a clean UNAVAILABLE, never sent, or refused by a connection the server
    // had closed; never CANCELLED/INTERNAL/UNKNOWN as an answer.
    for c in &after {
        assert!(
            !matches!(c.outcome, Outcome::Other(..)),
            "SIG{sig}: {:?}; all: {tally_after:#?}",
            c.outcome
        );
    }

    let log = server.log();
    let received = if sig == "TERM" {
        "SIGTERM received"
    } else {
        "SIGINT received"
    };
    assert!(log.contains(received), "{log}");
    assert!(log.contains("kms-server stopped"), "{log}");
    assert!(
        !log.contains("did not finish within the grace period"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // The port is closed.
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "still listening after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_with_requests_in_flight() {
    graceful_shutdown("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_shuts_down_gracefully_with_requests_in_flight() {
    graceful_shutdown("INT").await;
}

/// A client that never finishes its stream (a health Watch) cannot hold the server past its
/// grace period, and the listening port closes as soon as shutdown starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_listening_at_once_and_is_bounded_by_the_grace_period() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let addr = server.addr;
    let channel = server.channel("app").await.unwrap();
    let req = HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = HealthClient::new(channel)
        .watch(req)
        .await
        .unwrap()
        .into_inner();
    assert!(
        watch.message().await.unwrap().is_some(),
        "no first health status"
    );

    let sent = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        let status = server.signal_and_wait("TERM", GRACE + Duration::from_secs(5));
        (server, status)
    });
    // While the open stream keeps the server draining, new connections are refused at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !stopping.is_finished(),
        "the server exited while a stream was open: cannot test the drain"
    );
    let probe = tokio::net::TcpStream::connect(addr).await;
    assert!(
        probe.is_err(),
        "the port still accepts connections {:?} after SIGTERM",
        sent.elapsed()
    );

    let (server, status) = stopping.await.unwrap();
    let status = status.unwrap();
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= GRACE && took < GRACE + Duration::from_secs(3),
        "exit after {took:?}"
    );
    let log = server.log();
    assert!(
        log.contains("did not finish within the grace period") && !log.contains("panicked"),
        "{log}"
    );
    // The stream ends, it does not hang.
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert!(
        !matches!(end, Ok(Some(_))),
        "the watch kept streaming after exit: {end:?}"
    );
}

/// Keys, states and blobs made before a restart are all still there after it.
async fn survives_restart(server: &mut KmsServer) {
    let mut kms = server.raw("app").await.unwrap();
    let c = || wire_ctx(&[("site", "a"), ("note", "42")]);
    let create = |alias: &str| pb::CreateKeyRequest {
        alias: alias.into(),
        description: "kept".into(),
        ..Default::default()
    };
    let key = kms
        .create_key(create("persist"))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let off = kms
        .create_key(create("persist-off"))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    kms.disable_key(pb::DisableKeyRequest {
        key: off.key_id.clone(),
    })
    .await
    .unwrap();
    let dk = kms
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "persist".into(),
            encryption_context: c(),
        })
        .await
        .unwrap()
        .into_inner();
    let ct = kms
        .encrypt(pb::EncryptRequest {
            key: key.key_id.clone(),
            plaintext: b"kept across restarts".to_vec(),
            encryption_context: c(),
        })
        .await
        .unwrap()
        .into_inner();

    let old_port = server.addr.port();
    server.restart().await.unwrap();
    assert_eq!(server.addr.port(), old_port);
    let mut kms = server.raw("app").await.unwrap();

    let dec = |blob: &[u8]| pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: c(),
        audit: None,
    };
    let back = kms
        .decrypt(dec(&dk.ciphertext_blob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, dk.plaintext);
    assert_eq!(back.key_id, key.key_id);
    assert_eq!(
        kms.decrypt(dec(&ct.ciphertext_blob))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"kept across restarts"
    );

    let described = kms
        .describe_key(pb::DescribeKeyRequest {
            key: "persist".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let described = described.key.unwrap();
    assert_eq!(
        (described.key_id.as_str(), described.description.as_str()),
        (key.key_id.as_str(), "kept")
    );
    assert_eq!(described.created_at_unix_ms, key.created_at_unix_ms);
    let off_now = kms
        .describe_key(pb::DescribeKeyRequest {
            key: "persist-off".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        off_now.key.unwrap().state,
        pb::KeyState::Disabled as i32,
        "the disabled state was lost"
    );
    let refused = kms
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "persist-off".into(),
            encryption_context: c(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // The HSM object still works for new blobs, and the alias is still taken.
    let fresh = kms
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "persist".into(),
            encryption_context: c(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        kms.decrypt(dec(&fresh.ciphertext_blob))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        fresh.plaintext
    );
    let dup = kms.create_key(create("persist")).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let listed = kms
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 2);
    assert!(
        server.log().contains("SIGTERM received") && !server.log().contains("panicked"),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn restart_keeps_keys_and_blobs_sqlite() {
    let mut server = KmsServer::start(ServerOptions::default()).await.unwrap();
    survives_restart(&mut server).await;
    assert!(server.dir.path().join("kms.db").exists());
}

#[tokio::test]
async fn restart_keeps_keys_and_blobs_postgres() {
    let (url, name) = kms_tests::pg::create_database().await.unwrap();
    // Run the body as a task so that the database is dropped even when an assertion fails.
    let body = tokio::spawn({
        let url = url.clone();
        async move {
            let mut server = KmsServer::start(ServerOptions {
                database_url: Some(url.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
            survives_restart(&mut server).await;
            assert!(
                !server.dir.path().join("kms.db").exists(),
                "a SQLite file was created"
            );
            // The metadata really is in PostgreSQL.
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM keys")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(n, 2);
            conn.close().await.unwrap();
        }
    })
    .await;
    kms_tests::pg::drop_database(&name).await;
    if let Err(e) = body {
        std::panic::resume_unwind(e.into_panic());
    }
}
