//! `AuditStore` on SQLite: the key metadata's `SqliteStore` (same file, same pool; tables in
//! `migrations/sqlite/0002_audit.sql`).
//!
//! A batch is one `BEGIN IMMEDIATE` transaction (the write lock is taken up front, as for key
//! writes) holding a few multi-row INSERTs, so its cost is dominated by the one WAL fsync of
//! the commit (`synchronous = FULL`, see `store::sqlite`). The INSERTs have a fixed number of
//! rows, so each connection prepares them once; only the shorter last chunk of a batch is
//! prepared for one use. The work runs on sqlx's per-connection worker threads, never on the
//! async runtime.

use async_trait::async_trait;
use kms_audit::{AuditEvent, Checkpoint};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

use super::store::{
    checkpoint_from_json, checkpoint_to_json, event_from_json, events_query, index_text,
    probe_time_ms, seq_bound, seq_to_db, AuditStore, ContextRow, EventBatch, EventFilter, EventRow,
};
use crate::store::{map_sqlite_err as map_err, SqliteStore, StoreError};

/// Event rows per INSERT (9 parameters each; SQLite allows 32766 per statement).
const EVENT_ROWS_PER_INSERT: usize = 128;
/// Context rows per INSERT (4 parameters each).
const CONTEXT_ROWS_PER_INSERT: usize = 256;

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
        let Some(batch) = EventBatch::prepare(events)? else {
            return Ok(());
        };
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        let result = append_batch(&mut conn, &batch).await;
        if result.is_err() {
            // When COMMIT fails (e.g. "disk I/O error" writing the WAL), SQLite has already
            // rolled the transaction back; sqlx's own ROLLBACK then fails and leaves the
            // connection at transaction depth 1, so every later `begin_with` on it would fail
            // ("attempted to call begin_with at non-zero transaction depth") long after the
            // disk is writable again, while plain statements (the health probe) still work.
            // Such a connection must not go back to the pool: close it; the pool opens anew.
            conn.close_on_drop();
        }
        result
    }

    async fn append_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
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

/// One batch in one `BEGIN IMMEDIATE` transaction (see the module docs).
async fn append_batch(conn: &mut SqliteConnection, batch: &EventBatch) -> Result<(), StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?;
    // Under the write lock: no other writer can move the head before COMMIT.
    let head: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, hash FROM audit_events WHERE node_id = ?1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(&batch.node_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    batch.check_continues(head)?;
    for chunk in batch.events.chunks(EVENT_ROWS_PER_INSERT) {
        insert_events(&mut tx, &batch.node_id, chunk).await?;
    }
    for chunk in batch.context.chunks(CONTEXT_ROWS_PER_INSERT) {
        insert_context(&mut tx, &batch.node_id, chunk).await?;
    }
    // Dropping `tx` on any error above rolls the whole batch back.
    tx.commit().await.map_err(map_err)
}

async fn insert_events(
    conn: &mut SqliteConnection,
    node_id: &str,
    rows: &[EventRow],
) -> Result<(), StoreError> {
    let mut insert = QueryBuilder::<Sqlite>::new(
        "INSERT INTO audit_events \
         (node_id, seq, time_ms, caller, operation, key_id, outcome, event_json, hash) ",
    );
    insert.push_values(rows, |mut row, event| {
        row.push_bind(node_id)
            .push_bind(event.seq)
            .push_bind(event.time_ms)
            .push_bind(event.caller.as_str())
            .push_bind(event.operation.as_str())
            .push_bind(event.key_id.as_deref())
            .push_bind(event.outcome.as_str())
            .push_bind(event.event_json.as_str())
            .push_bind(event.hash.as_str());
    });
    insert
        .build()
        .persistent(rows.len() == EVENT_ROWS_PER_INSERT)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(map_err)
}

async fn insert_context(
    conn: &mut SqliteConnection,
    node_id: &str,
    rows: &[ContextRow],
) -> Result<(), StoreError> {
    let mut insert =
        QueryBuilder::<Sqlite>::new("INSERT INTO audit_event_context (node_id, seq, k, v) ");
    insert.push_values(rows, |mut row, pair| {
        row.push_bind(node_id)
            .push_bind(pair.seq)
            .push_bind(pair.k.as_str())
            .push_bind(pair.v.as_str());
    });
    insert
        .build()
        .persistent(rows.len() == CONTEXT_ROWS_PER_INSERT)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(map_err)
}
