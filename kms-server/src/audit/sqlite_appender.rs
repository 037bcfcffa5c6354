//! The SQLite audit appender: one thread with its own connection to the key-metadata database
//! file that writes each group-commit batch in one synchronous call.
//!
//! Why not the sqlx pool the rest of the store uses: sqlx runs every statement on the
//! connection's worker thread and hands the result back to the async runtime, so a batch
//! (acquire, BEGIN IMMEDIATE, read the head, two INSERTs, COMMIT) crossed threads six times.
//! With both cores busy under GenerateDataKey load each crossing waited 150–250 µs for a CPU,
//! and a one-event batch took 1.7 ms of which the fsync was a third; the audit writer, which
//! commits one batch at a time, capped the whole server near 3k events/s. Here the batch makes
//! one trip to this thread and one back, and its statements are prepared once per connection.
//!
//! Other writes of the process wait for their turn on the store's fair mutex, which this
//! thread takes around each batch (see `SqliteStore::write_turn`).
//!
//! The thread also fills the context lookup table behind the chain (migration 0004 says why
//! and states the rule queries rely on): each batch stores its pairs in `audit_event_context`
//! only, and once [`INDEX_EVERY`] events of the node are not indexed yet, the thread copies
//! their pairs to `audit_context_index`, sorted, and advances the node's `through_seq`, in one
//! transaction of its own, after the batch's callers have their answer. A failed pass changes
//! nothing (queries read the pairs from `audit_event_context` meanwhile) and the next batch
//! tries again.
//!
//! Semantics are those of the pool's transactions: `BEGIN IMMEDIATE` (write lock up front,
//! `busy_timeout` for other writers), the chain head checked under the lock, `synchronous =
//! FULL` (the batch is on disk when COMMIT returns). After any error the connection is dropped
//! and the next batch opens a new one: a failed COMMIT (e.g. "disk I/O error" from the WAL)
//! leaves nothing on this connection that a later batch should inherit.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use svc_common::sqlite_file::WAL_AUTOCHECKPOINT_PAGES;
use tokio::sync::oneshot;

use super::store::EventBatch;
use crate::store::StoreError;

/// As the pool's connections (`store::sqlite`): how long a batch waits for another writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Events of a node not yet in the context lookup table that trigger an indexing pass. A pass
/// writes each distinct (k, v) page once for all of them; queries read at most this many
/// events' pairs (plus one batch) from `audit_event_context` instead.
const INDEX_EVERY: i64 = 256;

struct Job {
    batch: EventBatch,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Handle to the appender thread; the thread ends when the last handle is dropped.
#[derive(Debug)]
pub struct SqliteAppender {
    jobs: mpsc::Sender<Job>,
}

impl SqliteAppender {
    /// Starts the thread for the database file at `path`. It opens its connection on the
    /// first batch (the pool has created the file and set WAL mode by then); `read_only`
    /// mirrors a `mode=ro` URL, so such a store refuses appends as its pool does.
    /// `write_turn` is the store's (`SqliteStore::write_turn`), held across each batch.
    pub fn start(
        path: PathBuf,
        read_only: bool,
        write_turn: Arc<tokio::sync::Mutex<()>>,
    ) -> std::io::Result<SqliteAppender> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("audit-sqlite".into())
            .spawn(move || {
                let mut conn = None;
                for job in rx {
                    let turn = take_turn(&write_turn);
                    let result = append(&mut conn, &path, read_only, &job.batch);
                    drop(turn);
                    if result.is_err() {
                        conn = None;
                    }
                    let index_due = matches!(result, Ok(true));
                    let _ = job.done.send(result.map(|_| ()));
                    if index_due {
                        let _turn = take_turn(&write_turn);
                        if let Err(e) = index_context(&mut conn, &job.batch) {
                            // Nothing changed: queries still find these pairs (see above).
                            tracing::warn!(error = %e, "audit context indexing pass failed; will retry");
                            conn = None;
                        }
                    }
                }
            })?;
        Ok(SqliteAppender { jobs })
    }

    /// Appends `batch` in one transaction; returns once it is durable (or failed).
    pub(super) async fn append(&self, batch: EventBatch) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { batch, done })
            .map_err(|_| StoreError::Unavailable("the audit appender thread is gone".into()))?;
        wait.await
            .map_err(|_| StoreError::Unavailable("the audit appender thread is gone".into()))?
    }
}

/// The process's SQLite write turn, from this (non-async) thread. try_lock first: the
/// uncontended case is nearly every batch, and blocking_lock alone (tokio's block_on machinery
/// on every call) halved GenerateDataKey throughput, 6.2-6.8k -> 3.2-3.6k ops/s measured.
fn take_turn(turn: &tokio::sync::Mutex<()>) -> tokio::sync::MutexGuard<'_, ()> {
    match turn.try_lock() {
        Ok(guard) => guard,
        Err(_) => turn.blocking_lock(),
    }
}

fn open(path: &PathBuf, read_only: bool) -> rusqlite::Result<Connection> {
    let access = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    // No CREATE: the pool created the file (mode 0600) and migrated it; a file that has gone
    // away must fail here rather than be replaced by an empty database.
    let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    Ok(conn)
}

/// Writes the batch; `Ok(true)` when an indexing pass is due.
fn append(
    conn: &mut Option<Connection>,
    path: &PathBuf,
    read_only: bool,
    batch: &EventBatch,
) -> Result<bool, StoreError> {
    let conn = match conn {
        Some(c) => c,
        None => conn.insert(open(path, read_only).map_err(map_err)?),
    };
    write_batch(conn, batch).map_err(|e| match e {
        BatchError::Sqlite(e) => map_err(e),
        BatchError::Store(e) => e,
    })
}

enum BatchError {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for BatchError {
    fn from(e: rusqlite::Error) -> Self {
        BatchError::Sqlite(e)
    }
}

/// One batch in one transaction; returns whether the node's unindexed events reach
/// [`INDEX_EVERY`].
fn write_batch(conn: &mut Connection, batch: &EventBatch) -> Result<bool, BatchError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Under the write lock: no other writer can move the head before COMMIT.
    let head: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT seq, hash FROM audit_events WHERE node_id = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([&batch.node_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    batch.check_continues(head).map_err(BatchError::Store)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit_events \
             (node_id, seq, time_ms, caller, operation, key_id, outcome, event_json, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for e in &batch.events {
            insert.execute(params![
                batch.node_id,
                e.seq,
                e.time_ms,
                e.caller,
                e.operation,
                e.key_id,
                e.outcome,
                e.event_json,
                e.hash
            ])?;
        }
        let mut context = tx.prepare_cached(
            "INSERT INTO audit_event_context (node_id, seq, k, v) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for pair in &batch.context {
            context.execute(params![batch.node_id, pair.seq, pair.k, pair.v])?;
        }
    }
    // A node without a row has every stored event indexed (migration 0004), so its row starts
    // just before this batch.
    tx.prepare_cached(
        "INSERT INTO audit_context_indexed (node_id, through_seq) VALUES (?1, ?2) \
         ON CONFLICT (node_id) DO NOTHING",
    )?
    .execute(params![batch.node_id, batch.first_seq() - 1])?;
    let through = indexed_through(&tx, &batch.node_id)?;
    // Dropping `tx` on any error above rolls the whole batch back.
    tx.commit()?;
    Ok(batch.last_seq() - through >= INDEX_EVERY)
}

fn indexed_through(conn: &Connection, node_id: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT through_seq FROM audit_context_indexed WHERE node_id = ?1")?
        .query_row([node_id], |row| row.get(0))
}

/// Copies the pairs of the node's events after its `through_seq`, up to the end of `batch`
/// (committed), to the lookup table, and advances `through_seq`: one transaction.
fn index_context(conn: &mut Option<Connection>, batch: &EventBatch) -> rusqlite::Result<()> {
    // The batch was just written on this connection; if it is gone, so is the pass.
    let Some(conn) = conn else {
        return Ok(());
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let through = indexed_through(&tx, &batch.node_id)?;
    let upto = batch.last_seq();
    if through < upto {
        // Sorted, so each page of the lookup table is written once in the pass. OR IGNORE:
        // a pair already there is the same row (the key is the whole row).
        tx.prepare_cached(
            "INSERT OR IGNORE INTO audit_context_index (k, v, node_id, seq) \
             SELECT k, v, node_id, seq FROM audit_event_context \
             WHERE node_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY k, v, seq",
        )?
        .execute(params![batch.node_id, through, upto])?;
        tx.prepare_cached("UPDATE audit_context_indexed SET through_seq = ?2 WHERE node_id = ?1")?
            .execute(params![batch.node_id, upto])?;
    }
    tx.commit()
}

/// The pool's classification (`store::sqlite::map_sqlite_err`) for rusqlite's errors.
fn map_err(e: rusqlite::Error) -> StoreError {
    let rusqlite::Error::SqliteFailure(failure, message) = &e else {
        return StoreError::Internal(format!("sqlite: {e}"));
    };
    let message = message.clone().unwrap_or_else(|| failure.to_string());
    match failure.extended_code {
        // SQLITE_CONSTRAINT_PRIMARYKEY / _UNIQUE: SQLite names the columns, never the values.
        1555 | 2067 => StoreError::Conflict(if message.contains("audit_events.") {
            "this audit event seq is already stored".into()
        } else {
            "a uniqueness constraint was violated".into()
        }),
        // Primary codes SQLITE_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN, _PROTOCOL:
        // the database is there but cannot serve now.
        code if matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14 | 15) => {
            StoreError::Unavailable(format!("sqlite: {message}"))
        }
        _ => StoreError::Internal(format!("sqlite: {message}")),
    }
}
