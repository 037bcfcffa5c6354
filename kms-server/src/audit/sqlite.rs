//! `AuditStore` on SQLite: the key metadata's `SqliteStore` (same file; tables in
//! `migrations/sqlite/0002_audit.sql`).
//!
//! Event batches, the hot path, go to the store's `SqliteAppender` (its own thread and
//! connection, one `BEGIN IMMEDIATE` transaction per batch, see `sqlite_appender`).
//! Checkpoints, queries and the health probe use the pool; the work runs on sqlx's
//! per-connection worker threads, never on the async runtime.

use async_trait::async_trait;
use kms_audit::{AuditEvent, Checkpoint};
use sqlx::Sqlite;

use super::store::{
    checkpoint_from_json, checkpoint_to_json, event_from_json, events_query, index_text,
    probe_time_ms, seq_bound, seq_to_db, AuditStore, EventBatch, EventFilter,
};
use crate::store::{map_sqlite_err as map_err, SqliteStore, StoreError};

#[async_trait]
impl AuditStore for SqliteStore {
    async fn last_event(&self, node_id: &str) -> Result<Option<AuditEvent>, StoreError> {
        let json: Option<String> = sqlx::query_scalar(
            "SELECT event_json FROM audit_events WHERE node_id = ?1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(index_text(node_id))
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        json.as_deref().map(event_from_json).transpose()
    }

    async fn append_events(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        match EventBatch::prepare(events)? {
            Some(batch) => self.audit_appender().append(batch).await,
            None => Ok(()),
        }
    }

    async fn append_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query(
            "INSERT INTO audit_checkpoints (node_id, seq, time_ms, checkpoint_json) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(index_text(&checkpoint.node_id))
        .bind(seq_to_db(checkpoint.seq)?)
        .bind(checkpoint.time_ms)
        .bind(checkpoint_to_json(checkpoint)?)
        .execute(self.pool())
        .await
        .map(|_| ())
        .map_err(map_err)
    }

    async fn query_events(
        &self,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let mut query = events_query::<Sqlite>(filter, limit);
        // Not cached: the SQL differs with the filters set, and caching every combination
        // would push the key store's statements out of the per-connection cache.
        let rows: Vec<String> = query
            .build_query_scalar()
            .persistent(false)
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        rows.iter().map(|json| event_from_json(json)).collect()
    }

    async fn checkpoints(
        &self,
        node_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT checkpoint_json FROM audit_checkpoints \
             WHERE node_id = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
        )
        .bind(index_text(node_id))
        .bind(seq_bound(from_seq))
        .bind(seq_bound(to_seq))
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter().map(|json| checkpoint_from_json(json)).collect()
    }

    async fn last_checkpoint(&self, node_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let json: Option<String> = sqlx::query_scalar(
            "SELECT checkpoint_json FROM audit_checkpoints WHERE node_id = ?1 \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(index_text(node_id))
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        json.as_deref().map(checkpoint_from_json).transpose()
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("UPDATE audit_probe SET touched_ms = ?1 WHERE id = 1")
            .bind(probe_time_ms())
            .execute(self.pool())
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Internal(
                "the audit_probe row is missing".to_string(),
            ))
        }
    }
}
