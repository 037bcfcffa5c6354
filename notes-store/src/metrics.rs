//! Prometheus metrics: request counts and latency by RPC and status, KMS and database health,
//! how many data keys each KMS `GenerateDataKeys` call carried and how many unwraps each
//! `BatchDecrypt` call carried (`kms_batch`), and the runtime's worker threads.
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
            metrics_exporter_prometheus::Matcher::Full("notes_request_duration_seconds".into()),
            &[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("notes_kms_data_keys_per_call".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("notes_kms_unwraps_per_call".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        )?
        .install()?;
    Ok(())
}

pub fn record_request(rpc: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!("notes_requests_total", "rpc" => rpc, "code" => format!("{code:?}")).increment(1);
    histogram!("notes_request_duration_seconds", "rpc" => rpc).record(elapsed.as_secs_f64());
}

/// The runtime's worker threads as Tokio counts them (`server.worker_threads`), so an operator
/// sees what the process runs with.
pub fn record_worker_threads(workers: usize) {
    gauge!("notes_runtime_worker_threads").set(workers as f64);
}

pub fn record_health(kms_ok: bool, store_ok: bool) {
    gauge!("notes_kms_up").set(if kms_ok { 1.0 } else { 0.0 });
    gauge!("notes_store_up").set(if store_ok { 1.0 } else { 0.0 });
}

/// One `GenerateDataKeys` call to the KMS with `data_keys` items, answered or not. Operators
/// see how well concurrent writes share calls; `notes-bench` reads the two counters around
/// each `notes_create` slice.
pub fn record_data_key_call(data_keys: usize) {
    counter!("notes_kms_data_key_calls_total").increment(1);
    counter!("notes_kms_data_keys_total").increment(data_keys as u64);
    histogram!("notes_kms_data_keys_per_call").record(data_keys as f64);
}

/// One `BatchDecrypt` call to the KMS with `unwraps` items (one per read), answered or not;
/// `notes-bench` reads the two counters around each `notes_get` slice.
pub fn record_unwrap_call(unwraps: usize) {
    counter!("notes_kms_unwrap_calls_total").increment(1);
    counter!("notes_kms_unwraps_total").increment(unwraps as u64);
    histogram!("notes_kms_unwraps_per_call").record(unwraps as f64);
}
