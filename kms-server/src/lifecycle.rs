//! The lifecycle worker: rotates keys whose rotation period has passed and destroys keys
//! whose deletion waiting period has ended, on every node, every `check_interval_ms`.
//!
//! Both actions go through the same code as the RPCs (`KmsService::rotate`,
//! `KmsService::destroy_key`), whose database writes are compare-and-swap, so several nodes
//! sharing one database never rotate a key twice for one due date or fight over a deletion:
//! the loser's attempt is refused and leaves nothing behind. Each action is recorded in the
//! audit log as an event of the caller `kms-server` (role `lifecycle`).

use std::time::{Duration, Instant};

use kms_audit::EventFields;

use crate::audit::AuditLog;
use crate::error::KmsError;
use crate::service::KmsService;

/// Keys handled per pass and per kind; the rest wait for the next pass.
const BATCH: u32 = 100;

/// Runs until the task is aborted.
pub async fn run(service: KmsService, audit: AuditLog, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&service, &audit).await {
            tracing::warn!(error = %e, "lifecycle pass failed; retrying on the next tick");
        }
    }
}

/// One pass: due rotations, then due destructions.
pub async fn pass(service: &KmsService, audit: &AuditLog) -> Result<(), KmsError> {
    let now = crate::audit::now_ms();
    for key in service.store().keys_due_for_rotation(now, BATCH).await? {
        let started = Instant::now();
        let result = service.rotate(&key).await;
        let version = result.as_ref().ok().map(|(_, v)| v.version);
        record(
            audit,
            "RotateKey",
            &key.key_id.to_string(),
            version,
            started,
            result.as_ref().err(),
            "automatic rotation: period elapsed",
        )
        .await?;
    }
    for key in service.store().keys_due_for_deletion(now, BATCH).await? {
        let started = Instant::now();
        let result = service.destroy_key(&key).await;
        let detail = match &result {
            Ok((_, versions)) => format!("waiting period ended; destroyed versions {versions:?}"),
            Err(_) => "waiting period ended".to_string(),
        };
        record(
            audit,
            "DestroyKey",
            &key.key_id.to_string(),
            None,
            started,
            result.as_ref().err(),
            &detail,
        )
        .await?;
    }
    Ok(())
}

async fn record(
    audit: &AuditLog,
    operation: &str,
    key_id: &str,
    version: Option<u32>,
    started: Instant,
    error: Option<&KmsError>,
    detail: &str,
) -> Result<(), KmsError> {
    let outcome = error.map_or(tonic::Code::Ok, KmsError::code);
    match error {
        None => tracing::info!(key_id, operation, "lifecycle action done"),
        Some(e) => tracing::warn!(key_id, operation, error = %e, "lifecycle action failed"),
    }
    audit
        .record(EventFields {
            time_ms: crate::audit::now_ms(),
            caller: "kms-server".into(),
            role: "lifecycle".into(),
            operation: operation.into(),
            key_id: Some(key_id.to_string()),
            key_version: version,
            outcome: crate::error::code_name(outcome).into(),
            latency_us: started.elapsed().as_micros() as u64,
            detail: match error {
                None => detail.to_string(),
                Some(e) => format!("{detail}: {e}").chars().take(256).collect(),
            },
            ..EventFields::default()
        })
        .await
        .map(|_| ())
}
