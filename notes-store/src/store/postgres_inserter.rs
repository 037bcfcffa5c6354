//! New notes on PostgreSQL, group-committed: every `insert_note` queued while a writer was busy
//! goes into one transaction (the clients' rows locked, one multi-row INSERT, one COMMIT), so
//! one WAL flush and one statement's fixed work cover the whole group.
//!
//! Why: as one autocommit statement per note, PostgreSQL spent most of a note's CPU on fixed
//! per-statement work (profile of `notes_create`, 16 streams, README session 8): the commit's
//! WAL flush (`XLogFlush`/`fdatasync`, 27 %), building the tables' CHECK expressions for the
//! statement (`ExecConstraints` → `stringToNode`, 16 %), executor start-up and protocol.
//!
//! Same guarantees as the one-note statement (`postgres::insert_one`, still used for a
//! note that arrives alone): the rows of the group's clients are read `FOR SHARE` inside the
//! transaction that inserts (an erasure, which updates its client's row, waits for it, or this
//! transaction sees the new state) and a note of a client that is not ACTIVE is refused alone;
//! a note is committed before it is acknowledged. If the INSERT breaks a constraint (a
//! duplicate id, a CHECK) the transaction is rolled back and every note of the group is
//! inserted on its own, so the offending one fails alone; any other error (connection, COMMIT)
//! is every note's error, and nothing of the group is acknowledged.
//!
//! [`WRITERS`] tasks take turns at the queue: while one waits for its COMMIT, the other is
//! already collecting and writing the next group.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::postgres::{insert_one, map_err};
use super::{ClientState, NoteRecord, RevisionRecord, StoreError};

/// Notes per transaction at most.
const MAX_GROUP: usize = 128;
/// Groups in flight at once (each on its own pooled connection).
const WRITERS: usize = 2;

struct Job {
    note: NoteRecord,
    first: RevisionRecord,
    done: oneshot::Sender<Result<(), StoreError>>,
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Job>>>;

/// Handle to the writer tasks; they end when the last handle is dropped.
#[derive(Debug)]
pub struct PgInserter {
    jobs: mpsc::UnboundedSender<Job>,
}

impl PgInserter {
    /// Starts the writer tasks on the current Tokio runtime.
    pub fn start(pool: PgPool) -> PgInserter {
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        let queue: Queue = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            let (queue, pool) = (queue.clone(), pool.clone());
            tokio::spawn(async move {
                while let Some(group) = next_group(&queue).await {
                    let results = insert_group(&pool, &group).await;
                    for (job, result) in group.into_iter().zip(results) {
                        let _ = job.done.send(result);
                    }
                }
            });
        }
        PgInserter { jobs }
    }

    /// Inserts a note and its first revision; returns once committed (or failed).
    pub async fn insert(&self, note: NoteRecord, first: RevisionRecord) -> Result<(), StoreError> {
        let gone = || StoreError::Unavailable("the note writer tasks are gone".into());
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { note, first, done })
            .map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }
}

/// The next group: waits for one job, then takes what else is queued. `None` once every
/// handle is dropped.
async fn next_group(queue: &Queue) -> Option<Vec<Job>> {
    let mut rx = queue.lock().await;
    let mut group = vec![rx.recv().await?];
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    Some(group)
}

/// One result per job, in order.
async fn insert_group(pool: &PgPool, group: &[Job]) -> Vec<Result<(), StoreError>> {
    if let [job] = group {
        return vec![insert_one(pool, &job.note, &job.first).await];
    }
    match insert_together(pool, group).await {
        Ok(results) => results,
        Err(e) if fails_alone(&e) => {
            let mut results = Vec::with_capacity(group.len());
            for job in group {
                results.push(insert_one(pool, &job.note, &job.first).await);
            }
            results
        }
        Err(e) => {
            let e = map_err(e);
            group.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

/// An error that one note's values can cause (integrity constraint or data exception): the
/// transaction was rolled back and inserting the notes one by one isolates the culprit. Any
/// other error is not retried: after a lost connection the COMMIT's outcome is unknown.
fn fails_alone(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code()
        .is_some_and(|code| code.starts_with("23") || code.starts_with("22"))
}

/// `Err` only for what fails the whole group; a note of a client that is not ACTIVE gets its
/// own error and is not written.
async fn insert_together(
    pool: &PgPool,
    group: &[Job],
) -> Result<Vec<Result<(), StoreError>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let states = lock_clients(&mut tx, group).await?;
    let mut results = Vec::with_capacity(group.len());
    let mut writable = Vec::with_capacity(group.len());
    for job in group {
        let key = (job.note.site_id.as_str(), job.note.client_id.as_str());
        let state = states.get(&key).map(String::as_str);
        let result = ClientState::check_writable(state);
        if result.is_ok() {
            writable.push(job);
        }
        results.push(result);
    }
    if !writable.is_empty() {
        let inserted = insert_rows(&mut tx, &writable).await?;
        if inserted != writable.len() as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "a group insert of {} notes wrote {inserted} revisions",
                writable.len()
            )));
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Reads the state of every client the group writes to, `FOR SHARE`, in one order. A client
/// without a row is absent from the map (writable, as in the one-note statement).
async fn lock_clients<'g>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    group: &'g [Job],
) -> Result<BTreeMap<(&'g str, &'g str), String>, sqlx::Error> {
    let mut clients: Vec<(&str, &str)> = group
        .iter()
        .map(|j| (j.note.site_id.as_str(), j.note.client_id.as_str()))
        .collect();
    clients.sort_unstable();
    clients.dedup();
    let (sites, ids): (Vec<&str>, Vec<&str>) = clients.iter().copied().unzip();
    let rows = sqlx::query(
        "SELECT site_id, client_id, state FROM client_keys \
         WHERE (site_id, client_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
         ORDER BY site_id, client_id FOR SHARE",
    )
    .bind(&sites)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut states = BTreeMap::new();
    for row in rows {
        let site: String = row.try_get(0)?;
        let client: String = row.try_get(1)?;
        // Keyed by the group's own strings, so the map borrows from the group.
        if let Ok(i) = clients.binary_search(&(site.as_str(), client.as_str())) {
            states.insert(clients[i], row.try_get(2)?);
        }
    }
    Ok(states)
}

/// Inserts the notes and their first revisions in one statement; returns the revisions
/// written. The revisions' foreign key is checked at the end of the statement, when the
/// notes exist.
async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    jobs: &[&Job],
) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(
        "WITH note AS ( \
             INSERT INTO notes (note_id, site_id, client_id, author_id, session_date, \
                 current_revision, created_at_ms, updated_at_ms) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::bigint[], $7::bigint[], $8::bigint[]) \
         ) \
         INSERT INTO note_revisions (note_id, revision, author_id, created_at_ms, kms_key_id, \
             kms_key_version, crypto_version, wrapped_key, body_nonce, body_ciphertext, \
             reason_nonce, reason_ciphertext) \
         SELECT * FROM unnest($1::uuid[], $9::bigint[], $10::text[], $11::bigint[], \
             $12::text[], $13::bigint[], $14::bigint[], $15::bytea[], $16::bytea[], \
             $17::bytea[], $18::bytea[], $19::bytea[])",
    )
    .bind(column(jobs, |j| j.note.note_id))
    .bind(column(jobs, |j| j.note.site_id.as_str()))
    .bind(column(jobs, |j| j.note.client_id.as_str()))
    .bind(column(jobs, |j| j.note.author_id.as_str()))
    .bind(column(jobs, |j| j.note.session_date.as_str()))
    .bind(column(jobs, |j| i64::from(j.note.current_revision)))
    .bind(column(jobs, |j| j.note.created_at_ms))
    .bind(column(jobs, |j| j.note.updated_at_ms))
    .bind(column(jobs, |j| i64::from(j.first.meta.revision)))
    .bind(column(jobs, |j| j.first.meta.author_id.as_str()))
    .bind(column(jobs, |j| j.first.meta.created_at_ms))
    .bind(column(jobs, |j| j.first.meta.kms_key_id.as_str()))
    .bind(column(jobs, |j| i64::from(j.first.meta.kms_key_version)))
    .bind(column(jobs, |j| i64::from(j.first.crypto_version)))
    .bind(column(jobs, |j| j.first.wrapped_key.as_slice()))
    .bind(column(jobs, |j| j.first.body.nonce.as_slice()))
    .bind(column(jobs, |j| j.first.body.ciphertext.as_slice()))
    .bind(column(jobs, |j| {
        j.first.reason.as_ref().map(|s| s.nonce.as_slice())
    }))
    .bind(column(jobs, |j| {
        j.first.reason.as_ref().map(|s| s.ciphertext.as_slice())
    }))
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

/// One column of the group, as an array parameter for `unnest`.
fn column<'j, T>(jobs: &[&'j Job], value: impl Fn(&'j Job) -> T) -> Vec<T> {
    jobs.iter().map(|&job| value(job)).collect()
}
