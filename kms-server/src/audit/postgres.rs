//! `AuditStore` on PostgreSQL: the key metadata's `PostgresStore` (same database, same pool;
//! tables in `migrations/postgres/0002_audit.sql`).
//!
//! A batch is one transaction with two INSERTs, whatever its size: each binds one array per
//! column and `UNNEST`s them, so the statement text never changes (prepared once per
//! connection) and a batch costs two round trips plus the commit's WAL flush.
//!
//! Two writers on one chain: both may read the same head under READ COMMITTED, but the second
//! INSERT of a seq waits on the first's primary-key entry and fails with a unique violation
//! (`Conflict`) once it commits.

use async_trait::async_trait;
use kms_audit::{AuditEvent, Checkpoint};
use sqlx::{PgConnection, Postgres};

use super::store::{
    checkpoint_from_json, checkpoint_to_json, event_from_json, events_query, index_text,
    probe_time_ms, seq_bound, seq_to_db, AuditStore, EventBatch, EventFilter,
};
use crate::store::{map_postgres_err as map_err, PostgresStore, StoreError};

#[async_trait]
impl AuditStore for PostgresStore {
    async fn last_event(&self, node_id: &str) -> Result<Option<AuditEvent>, StoreError> {
        let json: Option<String> = sqlx::query_scalar(
            "SELECT event_json FROM audit_events WHERE node_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(index_text(node_id))
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        json.as_deref().map(event_from_json).transpose()
    }

    async fn append_events(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let Some(batch) = EventBatch::prepare(events)? else {
            return Ok(());
        };
        let mut tx = self.pool().begin().await.map_err(map_err)?;
        let head: Option<(i64, String)> = sqlx::query_as(
            "SELECT seq, hash FROM audit_events WHERE node_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(&batch.node_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        batch.check_continues(head)?;
        insert_events(&mut tx, &batch).await?;
        if !batch.context.is_empty() {
            insert_context(&mut tx, &batch).await?;
        }
        // Dropping `tx` on any error above rolls the whole batch back.
        tx.commit().await.map_err(map_err)
    }

    async fn append_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (node_id, seq, time_ms, checkpoint_json) \
             VALUES ($1, $2, $3, $4)",
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
        let mut query = events_query::<Postgres>(filter, limit);
        // Not cached: the SQL differs with the filters set (see audit::sqlite).
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
             WHERE node_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
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
            "SELECT checkpoint_json FROM audit_checkpoints WHERE node_id = $1 \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(index_text(node_id))
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        json.as_deref().map(checkpoint_from_json).transpose()
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE audit_probe SET touched_ms = $1 WHERE id = 1")
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

async fn insert_events(conn: &mut PgConnection, batch: &EventBatch) -> Result<(), StoreError> {
    let rows = &batch.events;
    let seqs: Vec<i64> = rows.iter().map(|e| e.seq).collect();
    let times: Vec<i64> = rows.iter().map(|e| e.time_ms).collect();
    let callers: Vec<&str> = rows.iter().map(|e| e.caller.as_str()).collect();
    let operations: Vec<&str> = rows.iter().map(|e| e.operation.as_str()).collect();
    let key_ids: Vec<Option<&str>> = rows.iter().map(|e| e.key_id.as_deref()).collect();
    let outcomes: Vec<&str> = rows.iter().map(|e| e.outcome.as_str()).collect();
    let jsons: Vec<&str> = rows.iter().map(|e| e.event_json.as_str()).collect();
    let hashes: Vec<&str> = rows.iter().map(|e| e.hash.as_str()).collect();
    sqlx::query(
        "INSERT INTO audit_events \
         (node_id, seq, time_ms, caller, operation, key_id, outcome, event_json, hash) \
         SELECT $1, u.* FROM UNNEST($2::int8[], $3::int8[], $4::text[], $5::text[], \
         $6::text[], $7::text[], $8::text[], $9::text[]) AS u",
    )
    .bind(batch.node_id.as_str())
    .bind(seqs)
    .bind(times)
    .bind(callers)
    .bind(operations)
    .bind(key_ids)
    .bind(outcomes)
    .bind(jsons)
    .bind(hashes)
    .execute(conn)
    .await
    .map(|_| ())
    .map_err(map_err)
}

async fn insert_context(conn: &mut PgConnection, batch: &EventBatch) -> Result<(), StoreError> {
    let rows = &batch.context;
    let seqs: Vec<i64> = rows.iter().map(|c| c.seq).collect();
    let keys: Vec<&str> = rows.iter().map(|c| c.k.as_str()).collect();
    let values: Vec<&str> = rows.iter().map(|c| c.v.as_str()).collect();
    // Both tables in the batch's transaction, one statement: PostgreSQL keeps the lookup table
    // complete and never adds an `audit_context_indexed` row (migration 0004's rule).
    sqlx::query(
        "WITH pairs AS ( \
             SELECT u.* FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS u (seq, k, v) \
         ), stored AS ( \
             INSERT INTO audit_event_context (node_id, seq, k, v) SELECT $1, seq, k, v FROM pairs \
         ) \
         INSERT INTO audit_context_index (k, v, node_id, seq) SELECT k, v, $1, seq FROM pairs",
    )
    .bind(batch.node_id.as_str())
    .bind(seqs)
    .bind(keys)
    .bind(values)
    .execute(conn)
    .await
    .map(|_| ())
    .map_err(map_err)
}
