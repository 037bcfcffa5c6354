//! Prometheus metrics: request counts and latency by RPC and status, HSM session pool gauges.
//! Served on a separate localhost port by `metrics-exporter-prometheus`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Starts the exporter's HTTP listener. Must be called inside a tokio runtime.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("kms_request_duration_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )?
        .install()?;
    Ok(())
}

pub fn record_request(rpc: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!("kms_requests_total", "rpc" => rpc, "code" => format!("{code:?}")).increment(1);
    histogram!("kms_request_duration_seconds", "rpc" => rpc).record(elapsed.as_secs_f64());
}

pub fn record_pool(in_use: usize, waiting: usize, idle: usize) {
    gauge!("kms_hsm_sessions_in_use").set(in_use as f64);
    gauge!("kms_hsm_sessions_waiting").set(waiting as f64);
    gauge!("kms_hsm_sessions_idle").set(idle as f64);
}

pub fn record_health(backend_ok: bool, store_ok: bool) {
    gauge!("kms_backend_up").set(if backend_ok { 1.0 } else { 0.0 });
    gauge!("kms_store_up").set(if store_ok { 1.0 } else { 0.0 });
}

pub fn record_audit_batch(events: usize) {
    counter!("kms_audit_events_total").increment(events as u64);
    histogram!("kms_audit_batch_size").record(events as f64);
}
