//! Wiring: backend, store, key service, health, reflection, mutual TLS, metrics, shutdown.
//! `main.rs` only parses arguments and calls `run`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kms_audit::EventFields;
use kms_proto::kms::v1::audit_service_server::AuditServiceServer;
use kms_proto::kms::v1::key_management_service_server::KeyManagementServiceServer;
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::audit::{AuditApi, AuditLog, AuditSettings};
use crate::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use crate::backend::KeyBackend;
use crate::config::{BackendConfig, Config};
use crate::policy::{Policy, PolicyStore};
use crate::service::KmsService;
use crate::store::{self, KeyStore};

const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const SERVICE_NAME: &str = "kms.v1.KeyManagementService";
/// How often the client CRL file's modification time is checked.
const CRL_POLL: Duration = Duration::from_secs(2);

/// Builds the configured key backend (blocking: loads the PKCS#11 module and logs in, or
/// connects to the TPM).
pub fn build_backend(cfg: &BackendConfig) -> anyhow::Result<Arc<dyn KeyBackend>> {
    match cfg {
        BackendConfig::Pkcs11(p) => {
            let settings = Pkcs11Settings {
                module: p.module.clone(),
                token_label: p.token_label.clone(),
                pin: p.pin()?,
                max_sessions: p.max_sessions,
                acquire_timeout: Duration::from_millis(p.acquire_timeout_ms),
                inline_calls: p.inline_calls,
            };
            let backend = Pkcs11Backend::new(settings).context("opening the PKCS#11 token")?;
            Ok(Arc::new(backend))
        }
        #[cfg(feature = "tpm")]
        BackendConfig::Tpm(t) => {
            let settings = crate::backend::tpm::TpmSettings {
                tcti: t.tcti.clone(),
                request_timeout: Duration::from_millis(t.request_timeout_ms),
            };
            let backend = crate::backend::tpm::TpmBackend::new(settings)
                .with_context(|| format!("opening the TPM at {}", t.tcti))?;
            Ok(Arc::new(backend))
        }
        #[cfg(not(feature = "tpm"))]
        BackendConfig::Tpm(_) => {
            anyhow::bail!("this kms-server was built without the `tpm` feature")
        }
    }
}

/// Runs the server until `shutdown` completes, then lets in-flight requests finish (bounded
/// by `shutdown_grace_secs`).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Certificates first: a typo there should fail before the HSM is touched.
    let tls = crate::tls::ReloadableConfig::load(crate::tls::TlsFiles {
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        client_ca: cfg.tls.client_ca.clone(),
        client_crl: cfg.tls.client_crl.clone(),
    })?;
    // Then the policy: a server that cannot know who may do what does not start.
    let policy = match &cfg.policy.file {
        Some(file) => PolicyStore::load(file)
            .map_err(|e| anyhow::anyhow!("loading the policy {}: {e}", file.display()))?,
        None => {
            tracing::warn!("no [policy] file configured: every request will be denied");
            PolicyStore::fixed(Policy::default())
        }
    };
    // Installed before readiness: SIGHUP's default action would kill the server.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    if let Some(addr) = cfg.server.metrics_listen {
        crate::metrics::install(addr).context("starting the metrics listener")?;
    }
    let backend_cfg = cfg.backend.clone();
    let backend = tokio::task::spawn_blocking(move || build_backend(&backend_cfg)).await??;
    let (store, audit_store) = store::connect_both(&cfg.database.url)
        .await
        .context("opening the metadata database")?;
    let mut audit_settings = AuditSettings::new(cfg.server.node_id.clone());
    audit_settings.checkpoint_every = cfg.audit.checkpoint_every.max(1);
    audit_settings.checkpoint_interval =
        Duration::from_millis(cfg.audit.checkpoint_interval_ms.max(10));
    let audit = AuditLog::start(audit_store, backend.clone(), audit_settings)
        .await
        .map_err(|e| anyhow::anyhow!("starting the audit log: {e}"))?;
    audit
        .record(server_event("ServerStarted", backend.kind()))
        .await
        .map_err(|e| anyhow::anyhow!("recording the start in the audit log: {e}"))?;
    let service = KmsService::new(
        store.clone(),
        backend.clone(),
        audit.clone(),
        policy.clone(),
        cfg.key_cache_ttl(),
        cfg.lifecycle.clone(),
    );
    let lifecycle_task = tokio::spawn(crate::lifecycle::run(
        service.clone(),
        audit.clone(),
        Duration::from_millis(cfg.lifecycle.check_interval_ms),
    ));
    let reload_task = tokio::spawn(reload_on_hangup(
        hangup,
        policy.clone(),
        tls.clone(),
        audit.clone(),
    ));
    let crl_task = tls.watch_crl(CRL_POLL);

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The first check runs before serving, so a client never sees "service not registered".
    let mut health = HealthWatch {
        reporter,
        backend: backend.clone(),
        store: store.clone(),
        audit: audit.clone(),
        last: None,
    };
    health.check().await;
    let health_task = tokio::spawn(health.run());

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let local = listener.local_addr()?;
    let incoming = crate::tls::incoming(listener, tls);

    let max = cfg.server.max_message_bytes;
    let audit_api = AuditServiceServer::new(AuditApi::new(audit.clone(), policy.clone()));
    let kms = KeyManagementServiceServer::new(service)
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
        .add_service(kms)
        .add_service(audit_api)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_for_serve.wait_for(|s| *s).await;
            tracing::info!("shutdown requested; finishing in-flight requests");
        });

    tracing::info!(listen = %local, node_id = %cfg.server.node_id, backend = backend.kind(), "kms-server ready");
    // A line on stdout that test harnesses and scripts wait for.
    println!("KMS_READY listen={local}");

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
    reload_task.abort();
    lifecycle_task.abort();
    if let Some(t) = crl_task {
        t.abort();
    }
    if let Err(e) = audit
        .record(server_event("ServerStopped", backend.kind()))
        .await
    {
        tracing::error!(error = %e, "could not record the stop in the audit log");
    }
    if let Err(e) = audit.checkpoint_now().await {
        tracing::warn!(error = %e, "final audit checkpoint failed");
    }
    tracing::info!("kms-server stopped");
    Ok(())
}

/// Reloads the TLS configuration (client CRL) and the policy on every SIGHUP. A policy file
/// that does not load is refused (logged and audited as PolicyReloadFailed) and the policy in
/// force stays; likewise TLS files that do not load.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    policy: PolicyStore,
    tls: crate::tls::ReloadableConfig,
    audit: AuditLog,
) {
    while hangup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS configuration reloaded"),
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "SIGHUP: TLS files refused; the previous TLS configuration stays"
            ),
        }
        let event = match policy.reload() {
            Ok(summary) => {
                tracing::info!(%summary, "SIGHUP: policy reloaded");
                EventFields {
                    detail: summary,
                    ..server_event("PolicyReloaded", "")
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: policy refused; the previous policy stays in force");
                EventFields {
                    outcome: "INVALID_ARGUMENT".into(),
                    detail: e.to_string().chars().take(256).collect(),
                    ..server_event("PolicyReloadFailed", "")
                }
            }
        };
        if let Err(e) = audit.record(event).await {
            tracing::error!(error = %e, "could not record the policy reload in the audit log");
        }
    }
}

/// An administrative audit event of the server itself.
fn server_event(operation: &str, backend: &str) -> EventFields {
    EventFields {
        time_ms: crate::audit::now_ms(),
        caller: "kms-server".into(),
        operation: operation.into(),
        outcome: "OK".into(),
        detail: format!("backend {backend}, version {}", env!("CARGO_PKG_VERSION")),
        ..EventFields::default()
    }
}

/// Polls the backend, the database and the audit log's writability; NOT_SERVING while any of
/// them fails, SERVING again as soon as all answer.
struct HealthWatch {
    reporter: HealthReporter,
    backend: Arc<dyn KeyBackend>,
    store: Arc<dyn KeyStore>,
    audit: AuditLog,
    last: Option<bool>,
}

impl HealthWatch {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(HEALTH_INTERVAL).await;
            self.check().await;
        }
    }

    async fn check(&mut self) {
        let b = self.backend.clone();
        let backend_result = tokio::task::spawn_blocking(move || b.check_health()).await;
        let backend_ok = matches!(backend_result, Ok(Ok(())));
        let store_result = tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await;
        let store_ok = matches!(store_result, Ok(Ok(())));
        let audit_ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.audit.probe()).await,
            Ok(true)
        );
        let (in_use, waiting, idle) = self.backend.session_usage();
        crate::metrics::record_pool(in_use, waiting, idle);
        crate::metrics::record_health(backend_ok, store_ok && audit_ok);
        let ok = backend_ok && store_ok && audit_ok;
        if self.last == Some(ok) {
            return;
        }
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(SERVICE_NAME, status).await;
        if ok {
            tracing::info!("health: SERVING");
        } else {
            let backend_error = match &backend_result {
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
                Ok(Ok(())) => String::new(),
            };
            let store_error = match &store_result {
                Ok(Err(e)) => e.to_string(),
                Err(_) => "ping timed out".to_string(),
                Ok(Ok(())) => String::new(),
            };
            tracing::warn!(backend_ok, store_ok, audit_ok, %backend_error, %store_error, "health: NOT_SERVING");
        }
        self.last = Some(ok);
    }
}
