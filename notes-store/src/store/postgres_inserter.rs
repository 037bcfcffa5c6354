//! New notes on PostgreSQL, group-committed: every `insert_note` queued while a writer was busy
//! goes into one autocommit statement (the clients' rows locked, the notes and their first
//! revisions inserted, one COMMIT), so one WAL flush, one statement's fixed work and one round
//! trip cover the whole group.
//!
//! Why: as one autocommit statement per note, PostgreSQL spent most of a note's CPU on fixed
//! per-statement work (profile of `notes_create`, 16 streams, README session 8): the commit's
//! WAL flush (`XLogFlush`/`fdatasync`, 27 %), building the tables' CHECK expressions for the
//! statement (`ExecConstraints` → `stringToNode`, 16 %), executor start-up and protocol.
//! Why one statement and a connection of its own per writer (README, session 14): a group
//! written as BEGIN, a locking SELECT, the INSERT and COMMIT on a pooled connection took six
//! round trips, counting the pool's pings when the connection is lent and when it is given
//! back; each one wakes a PostgreSQL backend and a Tokio task on the same two cores.
//!
//! Same guarantees as the one-note statement (`postgres::insert_one`, still used for a
//! note that arrives alone): the rows of the group's clients are read `FOR SHARE` by the
//! statement that inserts (an erasure, which updates its client's row, waits for it, or this
//! statement sees the new state) and a note of a client that is not ACTIVE is refused alone;
//! a note is committed before it is acknowledged. If the statement breaks a constraint (a
//! duplicate id, a CHECK) nothing of it is written and every note of the group is inserted on
//! its own, so the offending one fails alone; any other error (connection, COMMIT) is every
//! note's error, and nothing of the group is acknowledged.
//!
//! [`WRITERS`] tasks take turns at the queue: while one waits for its COMMIT, the other is
//! already collecting and writing the next group.
//!
//! A writer yields once after the first job of a group, before it takes the others. The notes
//! of one KMS `GenerateDataKeys` answer (`kms_batch`) reach the queue together, from tasks
//! woken together; Tokio runs the writer woken by the first of them next on that worker (its
//! LIFO slot), before the others have queued theirs, so a burst was split into two or three
//! commits. Measured with the data-key dispatcher's yield too (`kms_batch`): notes-bench's
//! groups grew from 2.6 to 5 notes (2.8 with the dispatcher's yield alone; this one alone was
//! not timed) and PostgreSQL's CPU per note fell by about a fifth (README, session 16). A note
//! that arrives alone pays one scheduler turn.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Postgres, Row};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::postgres::{insert_one, map_err};
use super::{ClientState, NoteRecord, RevisionRecord, StoreError};

/// Notes per statement at most.
const MAX_GROUP: usize = 128;
/// Groups in flight at once (each on its own connection).
const WRITERS: usize = 2;
/// A writer's connection idle this long is pinged before its next group: a restart of
/// PostgreSQL or a dropped network path may have broken it unseen. Under load a writer uses
/// its connection every few milliseconds and the ping would only cost a round trip.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// A writer gives its connection back to the pool after this long (as the pool retires its
/// own: server-side caches do not grow for ever) and takes another.
const KEEP_CONNECTION_FOR: Duration = Duration::from_secs(30 * 60);

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
            let queue = queue.clone();
            let mut writer = Writer {
                pool: pool.clone(),
                held: None,
            };
            tokio::spawn(async move {
                while let Some(group) = next_group(&queue).await {
                    let results = writer.insert_group(&group).await;
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
    // The jobs already runnable queue before the group is formed: see the module doc.
    tokio::task::yield_now().await;
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    Some(group)
}

/// A writer task's connection, taken from the pool and kept between groups, so that no
/// group pays the pool's pings. The [`WRITERS`] connections count against the pool's size.
struct Writer {
    pool: PgPool,
    held: Option<Held>,
}

struct Held {
    conn: PoolConnection<Postgres>,
    taken: Instant,
    last_used: Instant,
}

impl Writer {
    /// One result per job, in order.
    async fn insert_group(&mut self, group: &[Job]) -> Vec<Result<(), StoreError>> {
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(e) => return every_note_fails(group, e),
        };
        let outcome = if let [job] = group {
            Ok(vec![insert_one(&mut *conn, &job.note, &job.first).await])
        } else {
            insert_together(conn, group).await
        };
        let results = match outcome {
            Ok(results) => results,
            Err(e) if fails_alone(&e) => {
                let mut results = Vec::with_capacity(group.len());
                for job in group {
                    results.push(insert_one(&mut *conn, &job.note, &job.first).await);
                }
                results
            }
            Err(e) => {
                // The connection may be broken: the pool's ping on its return decides.
                self.held = None;
                return every_note_fails(group, e);
            }
        };
        // An error that may have come from the connection itself (rather than from a note's
        // values or its client's state) gives the connection back: the pool's ping decides.
        if results
            .iter()
            .any(|r| matches!(r, Err(StoreError::Unavailable(_) | StoreError::Internal(_))))
        {
            self.held = None;
        } else if let Some(held) = &mut self.held {
            held.last_used = Instant::now();
        }
        results
    }

    /// The held connection, pinged first if it has been idle for [`PING_IF_IDLE_FOR`]; a new
    /// one from the pool (which pings it) if there is none, it failed the ping, or it has been
    /// held for [`KEEP_CONNECTION_FOR`]. A held connection broken while in use fails one group
    /// (UNAVAILABLE, nothing acknowledged) and is given back, so the next group gets another.
    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if let Some(held) = &mut self.held {
            let stale = held.taken.elapsed() >= KEEP_CONNECTION_FOR;
            let idle = held.last_used.elapsed() >= PING_IF_IDLE_FOR;
            if stale || (idle && held.conn.ping().await.is_err()) {
                self.held = None;
            }
        }
        let held = match self.held.take() {
            Some(held) => held,
            None => {
                let now = Instant::now();
                Held {
                    conn: self.pool.acquire().await?,
                    taken: now,
                    last_used: now,
                }
            }
        };
        Ok(&mut *self.held.insert(held).conn)
    }
}

/// An error that one note's values can cause (integrity constraint or data exception): the
/// statement wrote nothing and inserting the notes one by one isolates the culprit. Any other
/// error is not retried: after a lost connection the COMMIT's outcome is unknown.
fn fails_alone(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code()
        .is_some_and(|code| code.starts_with("23") || code.starts_with("22"))
}

/// Writes the group in one autocommit statement. `Err` only for what fails the whole group; a
/// note of a client that is not ACTIVE gets its own error and is not written.
///
/// The statement locks the rows of the group's clients `FOR SHARE`, in one order, inserts the
/// notes whose client is ACTIVE or has no row yet (as the one-note statement does) and their
/// first revisions, and returns the ids of the notes it wrote and the clients it refused. The
/// revisions' foreign key is checked at the end of the statement, when the notes exist.
async fn insert_together(
    conn: &mut PgConnection,
    group: &[Job],
) -> Result<Vec<Result<(), StoreError>>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH client AS MATERIALIZED ( \
             SELECT site_id, client_id, state FROM client_keys \
             WHERE (site_id, client_id) IN (SELECT * FROM unnest($2::text[], $3::text[])) \
             ORDER BY site_id, client_id FOR SHARE \
         ), note AS ( \
             INSERT INTO notes (note_id, site_id, client_id, author_id, session_date, \
                 current_revision, created_at_ms, updated_at_ms) \
             SELECT n.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::bigint[], $7::bigint[], $8::bigint[]) \
                 AS n (note_id, site_id, client_id, author_id, session_date, \
                     current_revision, created_at_ms, updated_at_ms) \
             WHERE NOT EXISTS (SELECT 1 FROM client c WHERE c.site_id = n.site_id \
                 AND c.client_id = n.client_id AND c.state <> 'ACTIVE') \
             RETURNING note_id \
         ), revision AS ( \
             INSERT INTO note_revisions (note_id, revision, author_id, created_at_ms, \
                 kms_key_id, kms_key_version, crypto_version, wrapped_key, body_nonce, \
                 body_ciphertext, reason_nonce, reason_ciphertext) \
             SELECT r.* FROM unnest($1::uuid[], $9::bigint[], $10::text[], $11::bigint[], \
                 $12::text[], $13::bigint[], $14::bigint[], $15::bytea[], $16::bytea[], \
                 $17::bytea[], $18::bytea[], $19::bytea[]) \
                 AS r (note_id, revision, author_id, created_at_ms, kms_key_id, \
                     kms_key_version, crypto_version, wrapped_key, body_nonce, \
                     body_ciphertext, reason_nonce, reason_ciphertext) \
             WHERE r.note_id IN (SELECT note_id FROM note) \
             RETURNING note_id \
         ) \
         SELECT note_id, NULL::text, NULL::text, NULL::text FROM revision \
         UNION ALL \
         SELECT NULL::uuid, site_id, client_id, state FROM client WHERE state <> 'ACTIVE'",
    )
    .bind(column(group, |j| j.note.note_id))
    .bind(column(group, |j| j.note.site_id.as_str()))
    .bind(column(group, |j| j.note.client_id.as_str()))
    .bind(column(group, |j| j.note.author_id.as_str()))
    .bind(column(group, |j| j.note.session_date.as_str()))
    .bind(column(group, |j| i64::from(j.note.current_revision)))
    .bind(column(group, |j| j.note.created_at_ms))
    .bind(column(group, |j| j.note.updated_at_ms))
    .bind(column(group, |j| i64::from(j.first.meta.revision)))
    .bind(column(group, |j| j.first.meta.author_id.as_str()))
    .bind(column(group, |j| j.first.meta.created_at_ms))
    .bind(column(group, |j| j.first.meta.kms_key_id.as_str()))
    .bind(column(group, |j| i64::from(j.first.meta.kms_key_version)))
    .bind(column(group, |j| i64::from(j.first.crypto_version)))
    .bind(column(group, |j| j.first.wrapped_key.as_slice()))
    .bind(column(group, |j| j.first.body.nonce.as_slice()))
    .bind(column(group, |j| j.first.body.ciphertext.as_slice()))
    .bind(column(group, |j| {
        j.first.reason.as_ref().map(|s| s.nonce.as_slice())
    }))
    .bind(column(group, |j| {
        j.first.reason.as_ref().map(|s| s.ciphertext.as_slice())
    }))
    .fetch_all(&mut *conn)
    .await?;

    let mut written = BTreeSet::new();
    // (site, client, state): almost always empty.
    let mut refused = Vec::new();
    for row in &rows {
        let note_id: Option<Uuid> = row.try_get(0)?;
        let site: Option<String> = row.try_get(1)?;
        let client: Option<String> = row.try_get(2)?;
        let state: Option<String> = row.try_get(3)?;
        match (note_id, site, client, state) {
            (Some(note_id), ..) => {
                written.insert(note_id);
            }
            (None, Some(site), Some(client), Some(state)) => {
                refused.push((site, client, state));
            }
            _ => {}
        }
    }
    Ok(group
        .iter()
        .map(|job| {
            if written.contains(&job.note.note_id) {
                return Ok(());
            }
            let state = refused
                .iter()
                .find(|(site, client, _)| {
                    *site == job.note.site_id && *client == job.note.client_id
                })
                .map(|(_, _, state)| state.as_str());
            ClientState::check_writable(state)?;
            // Cannot happen: a note whose client was not refused is written.
            Err(StoreError::Internal(
                "the group insert neither wrote nor refused a note".into(),
            ))
        })
        .collect())
}

/// One column of the group, as an array parameter for `unnest`.
fn column<'j, T>(group: &'j [Job], value: impl Fn(&'j Job) -> T) -> Vec<T> {
    group.iter().map(value).collect()
}

/// The same error for every note of the group.
fn every_note_fails(group: &[Job], e: sqlx::Error) -> Vec<Result<(), StoreError>> {
    let e = map_err(e);
    group.iter().map(|_| Err(e.clone())).collect()
}
