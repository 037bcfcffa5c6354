//! Durable storage of the audit chain: events and signed checkpoints, in the same database as
//! the key metadata (SQLite or PostgreSQL), with one implementation per database.
//!
//! Events are stored whole (their JSON, which `kms_audit` can re-hash) plus indexed columns for
//! queries, and the context pairs in a side table so auditors can ask "every event about
//! client X". Appends are one transaction per batch (group commit).

use async_trait::async_trait;
use kms_audit::{AuditEvent, Checkpoint};
use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::store::StoreError;

/// Filters for `query_events`; every field is optional and they combine with AND.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub node_id: Option<String>,
    pub from_time_ms: Option<i64>,
    /// Exclusive.
    pub to_time_ms: Option<i64>,
    pub key_id: Option<String>,
    pub caller: Option<String>,
    pub operation: Option<String>,
    pub outcome: Option<String>,
    /// Events whose encryption context has this key with this value (e.g. ("client", "c-17")).
    pub context: Option<(String, String)>,
    /// Only events with seq > after_seq (paging).
    pub after_seq: Option<u64>,
    /// Only events with seq <= to_seq.
    pub to_seq: Option<u64>,
}

impl EventFilter {
    /// Whether a filter beyond the context pair, the node and the seq bounds drops events, so
    /// that a context query's lookup-table part must not stop after one page
    /// ([`events_query`]). Every field is named: a new filter must be placed on one side.
    fn narrows_events_of_a_context(&self) -> bool {
        let EventFilter {
            node_id: _,
            context: _,
            after_seq: _,
            to_seq: _,
            from_time_ms,
            to_time_ms,
            key_id,
            caller,
            operation,
            outcome,
        } = self;
        from_time_ms.is_some()
            || to_time_ms.is_some()
            || key_id.is_some()
            || caller.is_some()
            || operation.is_some()
            || outcome.is_some()
    }
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// The last stored event of a node's chain, to resume it after a restart.
    async fn last_event(&self, node_id: &str) -> Result<Option<AuditEvent>, StoreError>;
    /// Appends events (consecutive seqs of one node) in ONE transaction: all or nothing.
    /// A seq that already exists is a `Conflict` (two writers on one chain).
    async fn append_events(&self, events: &[AuditEvent]) -> Result<(), StoreError>;
    async fn append_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError>;
    /// Events matching `filter`, ascending by (node_id, seq), at most `limit`.
    async fn query_events(
        &self,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// Checkpoints of a node with from_seq <= seq <= to_seq, ascending.
    async fn checkpoints(
        &self,
        node_id: &str,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    /// The latest checkpoint of a node.
    async fn last_checkpoint(&self, node_id: &str) -> Result<Option<Checkpoint>, StoreError>;
    /// Proves the database accepts writes right now without touching the chain (updates a
    /// one-row probe table). Used by the health check so service resumes by itself.
    async fn probe_write(&self) -> Result<(), StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the implementations (`super::sqlite`, `super::postgres`).
//
// Indexed columns: `node_id`, `caller`, `operation`, `key_id`, `outcome` and the context pairs
// are copied from the event with every NUL character replaced by U+FFFD ([`index_text`]), and
// filter values go through the same function. PostgreSQL text cannot hold NUL, and a value a
// client controls must not be able to make a whole batch unstorable; the event itself (its
// JSON, which escapes NUL) is stored unchanged.

/// An event row ready to insert.
pub(super) struct EventRow {
    pub seq: i64,
    pub time_ms: i64,
    pub caller: String,
    pub operation: String,
    pub key_id: Option<String>,
    pub outcome: String,
    pub event_json: String,
    pub hash: String,
}

/// A context row ready to insert (its node is the batch's).
pub(super) struct ContextRow {
    pub seq: i64,
    pub k: String,
    pub v: String,
}

/// A batch of events checked and turned into rows, before any transaction starts.
pub(super) struct EventBatch {
    /// Already passed through [`index_text`].
    pub node_id: String,
    pub events: Vec<EventRow>,
    pub context: Vec<ContextRow>,
    first_seq: i64,
    first_prev_hash: String,
}

impl EventBatch {
    /// `None` for an empty batch (nothing to do). A batch must be one node's events with
    /// consecutive seqs, each linked to the one before by `prev_hash`; anything else is a bug
    /// in the caller (`Internal`) and nothing is written.
    pub fn prepare(events: &[AuditEvent]) -> Result<Option<EventBatch>, StoreError> {
        let Some(first) = events.first() else {
            return Ok(None);
        };
        for pair in events.windows(2) {
            let (prev, next) = (&pair[0], &pair[1]);
            if next.node_id != first.node_id {
                return Err(malformed("events of several nodes"));
            }
            if prev.seq.checked_add(1) != Some(next.seq) {
                return Err(malformed("seqs that are not consecutive"));
            }
            if next.prev_hash != prev.hash {
                return Err(malformed("an event not linked to the one before it"));
            }
        }
        let mut rows = Vec::with_capacity(events.len());
        let mut context = Vec::new();
        for event in events {
            let seq = seq_to_db(event.seq)?;
            let event_json = serde_json::to_string(event)
                .map_err(|e| StoreError::Internal(format!("encode audit event: {e}")))?;
            rows.push(EventRow {
                seq,
                time_ms: event.time_ms,
                caller: index_text(&event.caller),
                operation: index_text(&event.operation),
                key_id: event.key_id.as_deref().map(index_text),
                outcome: index_text(&event.outcome),
                event_json,
                hash: event.hash.clone(),
            });
            context.extend(event.context.iter().map(|(k, v)| ContextRow {
                seq,
                k: index_text(k),
                v: index_text(v),
            }));
        }
        Ok(Some(EventBatch {
            node_id: index_text(&first.node_id),
            events: rows,
            context,
            first_seq: seq_to_db(first.seq)?,
            first_prev_hash: first.prev_hash.clone(),
        }))
    }

    /// The seq of the batch's first event, as stored.
    pub fn first_seq(&self) -> i64 {
        self.first_seq
    }

    /// The seq of the batch's last event, as stored.
    pub fn last_seq(&self) -> i64 {
        self.events.last().map_or(self.first_seq, |e| e.seq)
    }

    /// Checks, inside the writing transaction, that the batch continues the node's stored
    /// chain: `head` is the stored (seq, hash) of its last event, `None` for an empty chain.
    /// Otherwise `Conflict`: another writer got there first, or the caller's chain head moved
    /// past what was stored (an event it believes written was not). Storing the batch would
    /// leave a gap or a fork that verification reports forever; resuming the chain from
    /// [`AuditStore::last_event`] is the way out.
    pub fn check_continues(&self, head: Option<(i64, String)>) -> Result<(), StoreError> {
        let (last_seq, last_hash) = head.unwrap_or_else(|| (0, kms_audit::ZERO_HASH.to_owned()));
        if last_seq >= self.first_seq {
            Err(StoreError::Conflict(
                "this audit event seq is already stored".to_string(),
            ))
        } else if last_seq + 1 != self.first_seq || last_hash != self.first_prev_hash {
            Err(StoreError::Conflict(
                "the audit batch does not continue the stored chain".to_string(),
            ))
        } else {
            Ok(())
        }
    }
}

fn malformed(what: &str) -> StoreError {
    StoreError::Internal(format!("append_events: the batch holds {what}"))
}

/// `s` as stored in (and compared with) an indexed column: NUL → U+FFFD (see above).
pub(super) fn index_text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// A seq as stored (both databases store 64-bit signed integers).
pub(super) fn seq_to_db(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Internal(format!("audit seq {seq} is too large")))
}

/// A seq used as a query bound: values beyond what can be stored clamp to the largest one,
/// which gives the same result.
pub(super) fn seq_bound(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

pub(super) fn checkpoint_to_json(checkpoint: &Checkpoint) -> Result<String, StoreError> {
    serde_json::to_string(checkpoint)
        .map_err(|e| StoreError::Internal(format!("encode audit checkpoint: {e}")))
}

/// A stored event; JSON that does not parse is `Internal` (the database was altered or
/// damaged: never guess).
pub(super) fn event_from_json(json: &str) -> Result<AuditEvent, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Internal(format!("malformed audit event in database: {e}")))
}

/// A stored checkpoint; as [`event_from_json`].
pub(super) fn checkpoint_from_json(json: &str) -> Result<Checkpoint, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Internal(format!("malformed audit checkpoint in database: {e}")))
}

/// Milliseconds since the Unix epoch, for the probe row.
pub(super) fn probe_time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `SELECT e.event_json FROM audit_events AS e WHERE …` for `filter`, ordered by (node_id,
/// seq), at most `limit` rows. Every value is a bound parameter; only fixed SQL is pushed.
///
/// With a context filter the query starts from the events that have the pair and looks each
/// one up by its key (`CROSS JOIN` makes SQLite keep that order; without it, SQLite 3.51
/// scanned the whole chain in seq order and probed the pairs). The pairs come from two places
/// (migration 0004 states the rule): `audit_context_index` for every event up to its node's
/// `through_seq` (or all of a node's events when it has no `audit_context_indexed` row), and
/// `audit_event_context` for the events after it, which the SQLite appender has not indexed
/// yet (a few hundred at most, read by their key range). `UNION` (not `ALL`): an event listed
/// by both parts, which the rule excludes, still comes out once.
///
/// The lookup-table part also takes the node and seq bounds, and when nothing else filters the
/// rows it stops after `limit` pairs in (node_id, seq) order: a page then costs what it returns
/// (plus the unindexed tail, which the rule bounds), not every pair of that value. A page of
/// 101 events of a site with 200,000 took 129 ms on SQLite and 37 ms on PostgreSQL with the
/// whole part read and sorted, about 1 ms with it limited (sqlite3 3.40 and psql 15 by hand,
/// README session 21). The tail keeps its plain form: with the bounds pushed into it too,
/// PostgreSQL scanned `audit_event_context` before looking at (empty) `audit_context_indexed`.
pub(super) fn events_query<DB>(filter: &EventFilter, limit: u32) -> QueryBuilder<DB>
where
    DB: Database,
    DB::Arguments: Default,
    String: for<'a> Encode<'a, DB> + Type<DB>,
    i64: for<'a> Encode<'a, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new("SELECT e.event_json FROM ");
    match &filter.context {
        None => {
            q.push("audit_events AS e WHERE 1 = 1");
        }
        Some((k, v)) => {
            let (k, v) = (index_text(k), index_text(v));
            let rows_filtered_further = filter.narrows_events_of_a_context();
            q.push(
                "(SELECT * FROM (SELECT x.node_id, x.seq FROM audit_context_index AS x \
                 WHERE x.k = ",
            )
            .push_bind(k.clone())
            .push(" AND x.v = ")
            .push_bind(v.clone());
            push_node_seq_bounds(&mut q, "x", filter);
            if !rows_filtered_further {
                q.push(" ORDER BY x.node_id, x.seq LIMIT ")
                    .push_bind(i64::from(limit));
            }
            q.push(
                ") AS indexed UNION SELECT c.node_id, c.seq \
                 FROM audit_context_indexed AS w CROSS JOIN audit_event_context AS c \
                 WHERE c.node_id = w.node_id AND c.seq > w.through_seq AND c.k = ",
            )
            .push_bind(k)
            .push(" AND c.v = ")
            .push_bind(v)
            .push(
                ") AS m CROSS JOIN audit_events AS e \
                 WHERE e.node_id = m.node_id AND e.seq = m.seq",
            );
        }
    }
    push_node_seq_bounds(&mut q, "e", filter);
    let text_filters = [
        (" AND e.key_id = ", &filter.key_id),
        (" AND e.caller = ", &filter.caller),
        (" AND e.operation = ", &filter.operation),
        (" AND e.outcome = ", &filter.outcome),
    ];
    for (sql, value) in text_filters {
        if let Some(value) = value {
            q.push(sql).push_bind(index_text(value));
        }
    }
    if let Some(from) = filter.from_time_ms {
        q.push(" AND e.time_ms >= ").push_bind(from);
    }
    if let Some(to) = filter.to_time_ms {
        q.push(" AND e.time_ms < ").push_bind(to);
    }
    q.push(" ORDER BY e.node_id, e.seq LIMIT ")
        .push_bind(i64::from(limit));
    q
}

/// ` AND {t}.node_id = … AND {t}.seq > … AND {t}.seq <= …` for the bounds `filter` sets, on the
/// (node_id, seq) columns of table alias `t` (fixed SQL, never a value).
fn push_node_seq_bounds<DB>(q: &mut QueryBuilder<DB>, t: &str, filter: &EventFilter)
where
    DB: Database,
    String: for<'a> Encode<'a, DB> + Type<DB>,
    i64: for<'a> Encode<'a, DB> + Type<DB>,
{
    if let Some(node_id) = &filter.node_id {
        q.push(format_args!(" AND {t}.node_id = "))
            .push_bind(index_text(node_id));
    }
    if let Some(after) = filter.after_seq {
        q.push(format_args!(" AND {t}.seq > "))
            .push_bind(seq_bound(after));
    }
    if let Some(to) = filter.to_seq {
        q.push(format_args!(" AND {t}.seq <= "))
            .push_bind(seq_bound(to));
    }
}
