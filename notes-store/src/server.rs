//! Wiring: store, KMS client, notes service, health, reflection, mutual TLS, metrics, shutdown.
//! `main.rs` only parses arguments and calls `run`.
//!
//! notes-store starts without the KMS: while the KMS cannot be reached, health says
//! NOT_SERVING and requests that need it get UNAVAILABLE; it serves again as soon as the KMS
//! is back.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kms_proto::notes::v1::notes_service_server::NotesServiceServer;
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::kms::Kms;
use crate::service::NotesServiceImpl;
use crate::store::{self, NoteStore};

const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
const SERVICE_NAME: &str = "notes.v1.NotesService";

/// Runs the server until `shutdown` completes, then lets in-flight requests finish (bounded
/// by `shutdown_grace_secs`).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = svc_common::tls::ReloadableConfig::load(svc_common::tls::TlsFiles {
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        client_ca: cfg.tls.client_ca.clone(),
        client_crl: cfg.tls.client_crl.clone(),
    })?;
    // A changed revocation list applies to new connections within a few seconds.
    let crl_task = tls.watch_crl(std::time::Duration::from_secs(2));
    if let Some(addr) = cfg.server.metrics_listen {
        crate::metrics::install(addr).context("starting the metrics listener")?;
        crate::metrics::record_worker_threads(
            tokio::runtime::Handle::current().metrics().num_workers(),
        );
    }
    let kms = Kms::from_config(&cfg).context("KMS client")?;
    let store = store::connect(&cfg.database.url)
        .await
        .context("opening the notes database")?;
    let callers = crate::callers::Callers::new(&cfg.callers).map_err(|e| anyhow::anyhow!(e))?;
    if cfg.callers.is_empty() {
        tracing::warn!("no [[callers]] configured: every call will be refused");
    }
    let client_keys =
        crate::client_keys::ClientKeys::new(kms.clone(), store.clone(), Arc::new(cfg.clone()));
    let service = NotesServiceImpl::new(
        store.clone(),
        kms.clone(),
        client_keys,
        callers,
        cfg.server.max_body_bytes,
    );

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Registered from the start (NOT_SERVING until the first check), so a health check never
    // gets "service not registered".
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let health_task = tokio::spawn(watch_health(reporter, kms, store));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::NOTES_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::NOTES_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let local = listener.local_addr()?;
    let incoming = svc_common::tls::incoming(listener, tls);

    let max = cfg.max_message_bytes();
    let notes = NotesServiceServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop_for_serve = stop_rx.clone();
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(notes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_for_serve.wait_for(|s| *s).await;
            tracing::info!("shutdown requested; finishing in-flight requests");
        });

    tracing::info!(listen = %local, kms_key = %cfg.kms.kms_key, "notes-store ready");
    // A line on stdout that test harnesses and scripts wait for.
    println!("NOTES_READY listen={local}");

    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let mut stop_for_grace = stop_rx;
    tokio::select! {
        result = serve => result.context("gRPC server")?,
        _ = async move {
            let _ = stop_for_grace.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("in-flight requests did not finish within the grace period"),
    }
    health_task.abort();
    if let Some(t) = crl_task {
        t.abort();
    }
    tracing::info!("notes-store stopped");
    Ok(())
}

/// Polls the KMS (the configured key must be describable) and the database; NOT_SERVING while
/// either is unreachable.
async fn watch_health(reporter: HealthReporter, kms: Kms, store: Arc<dyn NoteStore>) {
    let mut last: Option<bool> = None;
    loop {
        let kms_result = tokio::time::timeout(HEALTH_TIMEOUT, kms.check()).await;
        let kms_ok = matches!(kms_result, Ok(Ok(())));
        let store_result = tokio::time::timeout(HEALTH_TIMEOUT, store.ping()).await;
        let store_ok = matches!(store_result, Ok(Ok(())));
        crate::metrics::record_health(kms_ok, store_ok);
        let ok = kms_ok && store_ok;
        if last != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            if ok {
                tracing::info!("health: SERVING");
            } else {
                let kms_error = match &kms_result {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                    Ok(Ok(())) => String::new(),
                };
                let store_error = match &store_result {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "ping timed out".to_string(),
                    Ok(Ok(())) => String::new(),
                };
                tracing::warn!(kms_ok, store_ok, %kms_error, %store_error, "health: NOT_SERVING");
            }
            last = Some(ok);
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}
