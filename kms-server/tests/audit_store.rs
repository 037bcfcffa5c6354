//! Audit store tests: the same checks on SQLite (temp dir) and PostgreSQL (fresh database, see
//! `common`), then what only one database can show (a read-only SQLite file, a PostgreSQL
//! server that goes away).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kms_audit::{
    interleave, verify, AuditEvent, Chain, Checkpoint, EventFields, VerifyingKeyInput,
};
use kms_server::audit::{AuditStore, EventFilter};
use kms_server::store::{self, StoreError};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use sqlx::Connection;
use tempfile::TempDir;

const T0: i64 = 1_700_000_000_000;
const ALL: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// Harness

/// Runs `$body` with `$conn` bound to a new connection to the test database (PostgreSQL or
/// SQLite), then closes it; the value is the body's.
macro_rules! on_own_connection {
    ($db:expr, |$conn:ident| $body:block) => {
        if $db.pg_database.is_some() {
            let mut $conn = sqlx::PgConnection::connect(&$db.url).await.unwrap();
            let value = $body;
            let _ = $conn.close().await;
            value
        } else {
            let mut $conn = sqlx::SqliteConnection::connect(&$db.url).await.unwrap();
            let value = $body;
            let _ = $conn.close().await;
            value
        }
    };
}

struct TestDb {
    audit: Arc<dyn AuditStore>,
    url: String,
    _dir: Option<TempDir>,
    pg_database: Option<String>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("kms.db").display());
        let (_, audit) = store::connect_both(&url).await.expect("open sqlite store");
        TestDb {
            audit,
            url,
            _dir: Some(dir),
            pg_database: None,
        }
    }

    async fn postgres() -> TestDb {
        let (name, url) = common::create_pg_database().await;
        match store::connect_both(&url).await {
            Ok((_, audit)) => TestDb {
                audit,
                url,
                _dir: None,
                pg_database: Some(name),
            },
            Err(err) => {
                common::drop_pg_database(&name);
                panic!("open postgres store on {name}: {err:?}");
            }
        }
    }

    /// Runs fixed SQL on a connection of its own, below the trait (to tamper with rows).
    async fn raw(&self, sql: &'static str) {
        on_own_connection!(self, |conn| {
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        })
    }

    /// One integer from fixed SQL (NULL or no row: `None`), on a connection of its own.
    async fn scalar(&self, sql: &'static str) -> Option<i64> {
        on_own_connection!(self, |conn| {
            let v: Option<Option<i64>> = sqlx::query_scalar(sql)
                .fetch_optional(&mut conn)
                .await
                .unwrap();
            v.flatten()
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_database.take() {
            common::drop_pg_database(&name);
        }
    }
}

/// Runs each listed test function against both databases: `sqlite::<name>` and `postgres::<name>`.
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::TestDb::postgres().await).await;
                }
            )*
        }
    };
}

store_tests!(
    append_and_read_back_equal,
    batch_with_stored_seq_is_refused_entirely,
    concurrent_writers_one_wins,
    last_event_resumes_the_chain,
    batches_that_do_not_continue_the_chain_are_refused,
    query_filters,
    context_queries_read_the_lookup_table_and_the_unindexed_tail,
    checkpoints_store_range_last,
    probe_write_updates_the_probe_row,
    read_back_verifies_with_a_signed_checkpoint,
    unparsable_event_json_is_internal,
    nul_and_injection_text_round_trip,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Varied fields: Option fields set and unset, empty and multi-pair contexts, non-ASCII text.
fn fields(i: u32) -> EventFields {
    let mut context = BTreeMap::new();
    if !i.is_multiple_of(4) {
        context.insert("client".to_owned(), format!("c-{}", i % 3));
        context.insert("note_id".to_owned(), format!("n-{i}"));
    }
    if i.is_multiple_of(7) {
        context.insert("patient_id".to_owned(), "p-ü42".to_owned());
    }
    EventFields {
        time_ms: T0 + i64::from(i) * 1000,
        request_id: format!("req-{i}"),
        caller: ["spiffe://clinic/notes-store", "spiffe://clinic/billing", ""][i as usize % 3]
            .to_owned(),
        caller_fingerprint: if i % 3 == 2 {
            String::new()
        } else {
            "ab".repeat(32)
        },
        role: if i.is_multiple_of(2) { "service" } else { "" }.to_owned(),
        operation: ["GenerateDataKey", "Decrypt", "KeyCreated", "ServerStarted"][i as usize % 4]
            .to_owned(),
        key_id: (!i.is_multiple_of(5)).then(|| format!("tenant-{}/notes", i % 2)),
        key_version: (!i.is_multiple_of(3)).then_some(i % 4 + 1),
        context,
        acting_user: if i % 2 == 1 { "dr-ämes ☤" } else { "" }.to_owned(),
        purpose: "write-note".to_owned(),
        outcome: if i % 6 == 5 {
            "PERMISSION_DENIED"
        } else {
            "OK"
        }
        .to_owned(),
        latency_us: u64::from(i) * 17,
        detail: if i.is_multiple_of(9) {
            "line\nbreak \"quoted\""
        } else {
            ""
        }
        .to_owned(),
    }
}

/// Appends `count` events (fields numbered from `first`) to `chain`.
fn extend(chain: &mut Chain, first: u32, count: u32) -> Vec<AuditEvent> {
    (first..first + count)
        .map(|i| chain.append(fields(i)).unwrap())
        .collect()
}

fn chain_of(node: &str, count: u32) -> (Chain, Vec<AuditEvent>) {
    let mut chain = Chain::genesis(node);
    let events = extend(&mut chain, 1, count);
    (chain, events)
}

async fn append_in_batches(store: &dyn AuditStore, events: &[AuditEvent], batch: usize) {
    for chunk in events.chunks(batch) {
        store.append_events(chunk).await.unwrap();
    }
}

fn node_filter(node: &str) -> EventFilter {
    EventFilter {
        node_id: Some(node.to_owned()),
        ..EventFilter::default()
    }
}

async fn stored(store: &dyn AuditStore, node: &str) -> Vec<AuditEvent> {
    store.query_events(&node_filter(node), ALL).await.unwrap()
}

fn test_key() -> (SigningKey, VerifyingKeyInput) {
    let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
    let vk = VerifyingKeyInput::from_key(*sk.verifying_key()).unwrap();
    (sk, vk)
}

/// A checkpoint of `chain`'s head signed the way the HSM does (prehashed digest, raw r||s).
fn signed_checkpoint(chain: &Chain, key: &(SigningKey, VerifyingKeyInput)) -> Checkpoint {
    let mut cp = chain.checkpoint(T0 + 999_999, key.1.fingerprint()).unwrap();
    let sig: Signature = key.0.sign_prehash(&cp.digest()).unwrap();
    cp.set_signature(&sig.to_bytes()).unwrap();
    cp
}

fn assert_conflict(result: Result<(), StoreError>) {
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "expected Conflict, got {result:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests run against both databases

async fn append_and_read_back_equal(db: TestDb) {
    let store = db.audit.as_ref();
    let (_, a) = chain_of("kms-a", 40);
    let (_, b) = chain_of("kms-b", 5);
    append_in_batches(store, &a[..20], 7).await;
    append_in_batches(store, &b, 5).await;
    append_in_batches(store, &a[20..], 20).await;
    store
        .append_events(&[])
        .await
        .expect("an empty batch is a no-op");

    assert_eq!(stored(store, "kms-a").await, a);
    assert_eq!(stored(store, "kms-b").await, b);
    // No filter: every node's events, by (node_id, seq).
    let everything = store
        .query_events(&EventFilter::default(), ALL)
        .await
        .unwrap();
    assert_eq!(everything, [a.clone(), b.clone()].concat());
    assert_eq!(store.last_event("kms-a").await.unwrap().as_ref(), a.last());
    assert_eq!(store.last_event("kms-b").await.unwrap().as_ref(), b.last());
    assert_eq!(store.last_event("kms-c").await.unwrap(), None);
}

async fn batch_with_stored_seq_is_refused_entirely(db: TestDb) {
    let store = db.audit.as_ref();
    let (_, events) = chain_of("kms-a", 8);
    store.append_events(&events[..5]).await.unwrap();

    // Seqs 4..8: 4 and 5 are stored, so 6..8 must not be either.
    assert_conflict(store.append_events(&events[3..]).await);
    assert_eq!(stored(store, "kms-a").await, events[..5]);
    // A fork: another chain of the same node from genesis.
    let mut fork = Chain::genesis("kms-a");
    let forked = extend(&mut fork, 100, 3);
    assert_conflict(store.append_events(&forked).await);
    assert_eq!(stored(store, "kms-a").await, events[..5]);

    store.append_events(&events[5..]).await.unwrap();
    assert_eq!(stored(store, "kms-a").await, events);
}

async fn concurrent_writers_one_wins(db: TestDb) {
    // Four writers with different chains of one node race for seqs 1..50.
    let mut tasks = Vec::new();
    let mut candidates = Vec::new();
    for w in 0..4u32 {
        let mut chain = Chain::genesis("kms-a");
        let events = extend(&mut chain, w * 1000, 50);
        candidates.push(events.clone());
        let store = db.audit.clone();
        tasks.push(tokio::spawn(
            async move { store.append_events(&events).await },
        ));
    }
    let mut winners = Vec::new();
    for (w, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(()) => winners.push(w),
            Err(StoreError::Conflict(_)) => {}
            Err(other) => panic!("expected Ok or Conflict, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins");
    assert_eq!(
        stored(db.audit.as_ref(), "kms-a").await,
        candidates[winners[0]]
    );
}

async fn last_event_resumes_the_chain(db: TestDb) {
    let (_, first) = chain_of("kms-a", 10);
    db.audit.append_events(&first).await.unwrap();

    // A restart: a new connection, the chain resumed from the store.
    let (_, reopened) = store::connect_both(&db.url).await.unwrap();
    let last = reopened.last_event("kms-a").await.unwrap().unwrap();
    assert_eq!(&last, first.last().unwrap());
    let mut chain = Chain::resume_from(&last).unwrap();
    let next = extend(&mut chain, 11, 5);
    assert_eq!(next[0].seq, 11);
    assert_eq!(next[0].prev_hash, last.hash);
    reopened.append_events(&next).await.unwrap();

    let all = stored(db.audit.as_ref(), "kms-a").await;
    assert_eq!(all, [first, next].concat());
    assert_eq!(db.audit.last_event("kms-a").await.unwrap().unwrap().seq, 15);
}

async fn batches_that_do_not_continue_the_chain_are_refused(db: TestDb) {
    let store = db.audit.as_ref();
    let (mut chain, events) = chain_of("kms-a", 10);

    // On an empty chain the first batch must start at seq 1.
    assert_conflict(store.append_events(&events[1..4]).await);
    assert!(stored(store, "kms-a").await.is_empty());
    store.append_events(&events[..4]).await.unwrap();

    // A gap: the caller's head moved past events that were never stored.
    let mut ahead = chain.clone();
    let _lost = extend(&mut ahead, 50, 2);
    assert_conflict(store.append_events(&extend(&mut ahead, 52, 2)).await);
    assert_eq!(stored(store, "kms-a").await, events[..4]);

    // Malformed batches are the caller's bug: Internal, and nothing is stored.
    let (_, other) = chain_of("kms-b", 1);
    let bad_batches = [
        vec![events[4].clone(), other[0].clone()],
        vec![events[4].clone(), events[6].clone()],
        vec![events[4].clone(), events[5].clone(), events[5].clone()],
    ];
    for batch in bad_batches {
        match store.append_events(&batch).await {
            Err(StoreError::Internal(_)) => {}
            other => panic!("expected Internal, got {other:?}"),
        }
    }
    let mut unlinked = events[4..6].to_vec();
    unlinked[1].prev_hash = "11".repeat(32);
    assert!(matches!(
        store.append_events(&unlinked).await,
        Err(StoreError::Internal(_))
    ));
    // Right seq, wrong prev_hash (a fork at the join): Conflict.
    let mut fork = Chain::resume("kms-a", 4, "22".repeat(32)).unwrap();
    assert_conflict(store.append_events(&extend(&mut fork, 60, 1)).await);
    assert_eq!(stored(store, "kms-a").await, events[..4]);

    store.append_events(&events[4..]).await.unwrap();
    assert_eq!(stored(store, "kms-a").await, events);
    let more = extend(&mut chain, 11, 1);
    store.append_events(&more).await.unwrap();
}

/// What `query_events` must return, computed in memory.
/// Context lookups come from two tables (migration 0004): the lookup table, which the SQLite
/// appender fills behind the chain every few hundred events, and the pairs of the events after
/// it. A query must find every event either way, on both databases.
async fn context_queries_read_the_lookup_table_and_the_unindexed_tail(db: TestDb) {
    let store = db.audit.as_ref();
    let (_, a) = chain_of("kms-a", 700);
    let (_, b) = chain_of("kms-b", 30);
    append_in_batches(store, &a[..300], 16).await;
    append_in_batches(store, &b, 7).await;
    append_in_batches(store, &a[300..], 16).await;
    let all = [a.clone(), b.clone()].concat();

    let through_a = db
        .scalar("SELECT through_seq FROM audit_context_indexed WHERE node_id = 'kms-a'")
        .await;
    let indexed_pairs = db
        .scalar("SELECT count(*) FROM audit_context_index WHERE node_id = 'kms-a'")
        .await
        .unwrap();
    if db.pg_database.is_some() {
        // PostgreSQL indexes in the batch's transaction: no lag, no row.
        assert_eq!(through_a, None);
        let stored_pairs = db
            .scalar("SELECT count(*) FROM audit_event_context WHERE node_id = 'kms-a'")
            .await
            .unwrap();
        assert_eq!(indexed_pairs, stored_pairs);
    } else {
        // SQLite: passes ran (every 256 events), and the last events are not indexed yet, so
        // the queries below read both parts.
        let through = through_a.expect("kms-a has an indexed_through row");
        assert!((256..700).contains(&through), "through_seq {through}");
        let indexed_max = db
            .scalar("SELECT max(seq) FROM audit_context_index WHERE node_id = 'kms-a'")
            .await
            .expect("the lookup table holds pairs of kms-a");
        assert!(
            indexed_max <= through,
            "indexed seq {indexed_max} > {through}"
        );
        assert!(indexed_pairs > 0);
    }

    let ctx = |k: &str, v: &str| EventFilter {
        context: Some((k.to_owned(), v.to_owned())),
        ..EventFilter::default()
    };
    let filters = [
        ctx("client", "c-0"),
        ctx("client", "c-2"),
        ctx("note_id", "n-3"),
        ctx("note_id", "n-690"),
        ctx("patient_id", "p-ü42"),
        EventFilter {
            node_id: Some("kms-a".to_owned()),
            after_seq: Some(250),
            ..ctx("client", "c-1")
        },
        ctx("client", "c-9"),
    ];
    for filter in &filters {
        let expected: Vec<AuditEvent> =
            all.iter().filter(|e| matches(e, filter)).cloned().collect();
        let got = store.query_events(filter, ALL).await.unwrap();
        assert_eq!(got.len(), expected.len(), "filter {filter:?}");
        assert_eq!(got, expected, "filter {filter:?}");
    }
    // Both parts hold matches for a common pair.
    let c0: Vec<u64> = store
        .query_events(&ctx("client", "c-0"), ALL)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.node_id == "kms-a")
        .map(|e| e.seq)
        .collect();
    assert!(c0.first().is_some_and(|s| *s < 256) && c0.last().is_some_and(|s| *s > 600));

    // Pages as the service asks for them (its node, after the last seq, a small limit), so the
    // lookup-table part stops after a page, across the lookup table's end.
    for pair in [ctx("client", "c-2"), ctx("patient_id", "p-ü42")] {
        let expected: Vec<AuditEvent> = a.iter().filter(|e| matches(e, &pair)).cloned().collect();
        let (mut got, mut after_seq) = (Vec::new(), None);
        loop {
            let filter = EventFilter {
                node_id: Some("kms-a".to_owned()),
                after_seq,
                ..pair.clone()
            };
            let page = store.query_events(&filter, 25).await.unwrap();
            let Some(last) = page.last() else { break };
            after_seq = Some(last.seq);
            got.extend(page);
        }
        assert_eq!(got, expected, "paged {pair:?}");
    }
    // With another filter on the rows the lookup-table part must not stop early: the first 5
    // Decrypt events about c-2 are not among its first 5 events.
    let decrypts = EventFilter {
        operation: Some("Decrypt".to_owned()),
        ..ctx("client", "c-2")
    };
    let expected: Vec<AuditEvent> = all
        .iter()
        .filter(|e| matches(e, &decrypts))
        .take(5)
        .cloned()
        .collect();
    assert_eq!(expected.len(), 5);
    assert_eq!(store.query_events(&decrypts, 5).await.unwrap(), expected);
}

fn matches(e: &AuditEvent, f: &EventFilter) -> bool {
    let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    eq(&f.node_id, &e.node_id)
        && f.from_time_ms.is_none_or(|t| e.time_ms >= t)
        && f.to_time_ms.is_none_or(|t| e.time_ms < t)
        && f.key_id
            .as_deref()
            .is_none_or(|k| e.key_id.as_deref() == Some(k))
        && eq(&f.caller, &e.caller)
        && eq(&f.operation, &e.operation)
        && eq(&f.outcome, &e.outcome)
        && f.context
            .as_ref()
            .is_none_or(|(k, v)| e.context.get(k) == Some(v))
        && f.after_seq.is_none_or(|s| e.seq > s)
        && f.to_seq.is_none_or(|s| e.seq <= s)
}

async fn query_filters(db: TestDb) {
    let store = db.audit.as_ref();
    let (_, a) = chain_of("kms-a", 60);
    let (_, b) = chain_of("kms-b", 25);
    append_in_batches(store, &a, 16).await;
    append_in_batches(store, &b, 25).await;
    let all = [a.clone(), b.clone()].concat();

    let s = |s: &str| Some(s.to_owned());
    let ctx = |k: &str, v: &str| Some((k.to_owned(), v.to_owned()));
    let base = EventFilter::default();
    let with = |set: &dyn Fn(&mut EventFilter)| {
        let mut filter = EventFilter::default();
        set(&mut filter);
        filter
    };
    let filters = [
        base.clone(),
        with(&|f| f.node_id = s("kms-b")),
        with(&|f| f.from_time_ms = Some(T0 + 20_000)),
        with(&|f| f.to_time_ms = Some(T0 + 20_000)),
        with(&|f| (f.from_time_ms, f.to_time_ms) = (Some(T0 + 10_000), Some(T0 + 12_000))),
        with(&|f| f.key_id = s("tenant-1/notes")),
        with(&|f| f.caller = s("spiffe://clinic/billing")),
        with(&|f| f.caller = s("")),
        with(&|f| f.operation = s("Decrypt")),
        with(&|f| f.outcome = s("PERMISSION_DENIED")),
        with(&|f| f.context = ctx("client", "c-1")),
        with(&|f| f.context = ctx("patient_id", "p-ü42")),
        with(&|f| f.after_seq = Some(55)),
        with(&|f| f.to_seq = Some(3)),
        with(&|f| f.after_seq = Some(u64::MAX)),
        with(&|f| f.to_seq = Some(u64::MAX)),
        with(&|f| {
            f.node_id = s("kms-a");
            f.key_id = s("tenant-0/notes");
            f.operation = s("GenerateDataKey");
            f.context = ctx("client", "c-2");
            f.from_time_ms = Some(T0 + 5_000);
        }),
        with(&|f| {
            f.node_id = s("kms-a");
            f.caller = s("spiffe://clinic/notes-store");
            f.outcome = s("OK");
            (f.after_seq, f.to_seq) = (Some(10), Some(40));
        }),
        // Nothing matches these.
        with(&|f| f.key_id = s("tenant-9/notes")),
        with(&|f| f.context = ctx("client", "n-1")),
        with(&|f| f.caller = s("x' OR '1'='1")),
    ];
    for filter in &filters {
        let expected: Vec<AuditEvent> =
            all.iter().filter(|e| matches(e, filter)).cloned().collect();
        let got = store.query_events(filter, ALL).await.unwrap();
        assert_eq!(got, expected, "filter {filter:?}");
        if expected.len() > 2 {
            let got = store.query_events(filter, 2).await.unwrap();
            assert_eq!(got, expected[..2], "limit 2, filter {filter:?}");
        }
    }
    assert!(store.query_events(&base, 0).await.unwrap().is_empty());

    // Paging with after_seq + limit, the way the audit service pages one node.
    let filter = with(&|f| (f.node_id, f.context) = (s("kms-a"), ctx("client", "c-1")));
    let expected: Vec<AuditEvent> = a.iter().filter(|e| matches(e, &filter)).cloned().collect();
    let (mut paged, mut after, mut pages) = (Vec::new(), None, 0);
    loop {
        let page_filter = EventFilter {
            after_seq: after,
            ..filter.clone()
        };
        let page = store.query_events(&page_filter, 4).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        pages += 1;
        paged.extend(page);
    }
    assert!(expected.len() > 8);
    assert_eq!(pages, expected.len().div_ceil(4));
    assert_eq!(paged, expected);
}

async fn checkpoints_store_range_last(db: TestDb) {
    let store = db.audit.as_ref();
    let key = test_key();
    let mut a = Chain::genesis("kms-a");
    let mut cps = Vec::new();
    for round in 0..3 {
        let events = extend(&mut a, round * 10 + 1, 10);
        store.append_events(&events).await.unwrap();
        let cp = signed_checkpoint(&a, &key);
        store.append_checkpoint(&cp).await.unwrap();
        cps.push(cp);
    }
    let (b, b_events) = chain_of("kms-b", 15);
    store.append_events(&b_events).await.unwrap();
    let b_cp = signed_checkpoint(&b, &key);
    store.append_checkpoint(&b_cp).await.unwrap();

    assert_eq!(store.checkpoints("kms-a", 10, 20).await.unwrap(), cps[..2]);
    assert!(store.checkpoints("kms-a", 11, 19).await.unwrap().is_empty());
    assert_eq!(store.checkpoints("kms-a", 0, u64::MAX).await.unwrap(), cps);
    assert_eq!(store.checkpoints("kms-a", 30, 30).await.unwrap(), cps[2..]);
    assert!(store.checkpoints("kms-a", 30, 10).await.unwrap().is_empty());
    assert_eq!(
        store.checkpoints("kms-b", 0, 100).await.unwrap(),
        vec![b_cp.clone()]
    );
    assert_eq!(
        store.last_checkpoint("kms-a").await.unwrap().as_ref(),
        cps.last()
    );
    assert_eq!(store.last_checkpoint("kms-b").await.unwrap(), Some(b_cp));
    assert_eq!(store.last_checkpoint("kms-c").await.unwrap(), None);

    // One checkpoint per (node, seq).
    assert_conflict(store.append_checkpoint(&cps[1]).await);
    assert_eq!(store.checkpoints("kms-a", 0, u64::MAX).await.unwrap(), cps);
}

async fn probe_write_updates_the_probe_row(db: TestDb) {
    db.audit.probe_write().await.expect("probe_write");
    db.audit.probe_write().await.expect("probe_write again");
    let touched: Option<i64> = if db.pg_database.is_some() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT touched_ms FROM audit_probe WHERE id = 1")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT touched_ms FROM audit_probe WHERE id = 1")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    assert!(touched.unwrap() > T0, "probe_write sets touched_ms to now");
}

async fn read_back_verifies_with_a_signed_checkpoint(db: TestDb) {
    let store = db.audit.as_ref();
    let key = test_key();
    let (chain, events) = chain_of("kms-a", 25);
    append_in_batches(store, &events, 10).await;
    store
        .append_checkpoint(&signed_checkpoint(&chain, &key))
        .await
        .unwrap();

    let export = |events, cps| interleave(events, cps);
    let read = stored(store, "kms-a").await;
    let cps = store.checkpoints("kms-a", 1, 25).await.unwrap();
    let report = verify(&export(read, cps.clone()), &key.1);
    assert!(report.ok, "{report}");
    assert_eq!(report.covered_through_seq, Some(25));
    assert_eq!(report.events_checked, 25);
    assert!(report.from_genesis);

    // Someone edits a stored event: verification of what is read back points at it.
    db.raw(
        "UPDATE audit_events SET event_json = replace(event_json, 'write-note', 'read-note') \
         WHERE seq = 7",
    )
    .await;
    let report = verify(&export(stored(store, "kms-a").await, cps), &key.1);
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(7));
}

async fn unparsable_event_json_is_internal(db: TestDb) {
    let (_, events) = chain_of("kms-a", 3);
    db.audit.append_events(&events).await.unwrap();
    db.raw("UPDATE audit_events SET event_json = '{\"seq\": 3' WHERE seq = 3")
        .await;
    for result in [
        db.audit
            .query_events(&node_filter("kms-a"), ALL)
            .await
            .map(|_| ()),
        db.audit.last_event("kms-a").await.map(|_| ()),
    ] {
        assert!(
            matches!(result, Err(StoreError::Internal(_))),
            "expected Internal, got {result:?}"
        );
    }
    let first_two = EventFilter {
        to_seq: Some(2),
        ..node_filter("kms-a")
    };
    assert_eq!(
        db.audit.query_events(&first_two, ALL).await.unwrap(),
        events[..2]
    );
}

async fn nul_and_injection_text_round_trip(db: TestDb) {
    let store = db.audit.as_ref();
    let mut chain = Chain::genesis("kms-a");
    let mut f = fields(1);
    f.caller = "evil\0caller'; DROP TABLE audit_events; --".to_owned();
    f.key_id = Some("k\0ey".to_owned());
    f.context.insert("cli\0ent".to_owned(), "c\0-1".to_owned());
    f.detail = "nul \0 inside".to_owned();
    let event = chain.append(f.clone()).unwrap();
    let plain = chain.append(fields(2)).unwrap();
    store
        .append_events(&[event.clone(), plain.clone()])
        .await
        .expect("NUL characters must not make a batch unstorable");

    assert_eq!(stored(store, "kms-a").await, vec![event.clone(), plain]);
    let by = |filter: EventFilter| async move { store.query_events(&filter, ALL).await.unwrap() };
    let base = node_filter("kms-a");
    assert_eq!(
        by(EventFilter {
            caller: Some(f.caller.clone()),
            ..base.clone()
        })
        .await,
        std::slice::from_ref(&event)
    );
    assert_eq!(
        by(EventFilter {
            key_id: f.key_id.clone(),
            ..base.clone()
        })
        .await,
        std::slice::from_ref(&event)
    );
    let context = Some(("cli\0ent".to_owned(), "c\0-1".to_owned()));
    assert_eq!(
        by(EventFilter {
            context,
            ..base.clone()
        })
        .await,
        [event]
    );
}

// ---------------------------------------------------------------------------------------------
// Upgrade: a database written before migration 0004 (context pairs indexed in place)

/// SQL literal of a test string (test data only; no value here holds a NUL).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// INSERTs for `events` as the stores wrote them before migration 0004.
fn pre_0004_rows(events: &[AuditEvent]) -> String {
    let mut sql = String::new();
    for e in events {
        let json = serde_json::to_string(e).unwrap();
        let key_id = e.key_id.as_deref().map_or("NULL".to_owned(), lit);
        sql += &format!(
            "INSERT INTO audit_events (node_id, seq, time_ms, caller, operation, key_id, outcome, \
             event_json, hash) VALUES ({}, {}, {}, {}, {}, {key_id}, {}, {}, {});\n",
            lit(&e.node_id),
            e.seq,
            e.time_ms,
            lit(&e.caller),
            lit(&e.operation),
            lit(&e.outcome),
            lit(&json),
            lit(&e.hash),
        );
        for (k, v) in &e.context {
            sql += &format!(
                "INSERT INTO audit_event_context (node_id, seq, k, v) VALUES ({}, {}, {}, {});\n",
                lit(&e.node_id),
                e.seq,
                lit(k),
                lit(v)
            );
        }
    }
    sql
}

/// The migrations of `db` ("sqlite" or "postgres") before 0004, in a directory of their own.
fn migrations_before_0004(db: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(db);
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.as_str() < "0004" {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    dir
}

/// Events stored before the upgrade are found by context afterwards (the migration indexes
/// them), and so are events appended after it (on SQLite, the first batch adds the node's
/// `through_seq` row just before itself). `url` holds the schema before 0004 and, as
/// [`pre_0004_rows`] wrote them, the first 200 events of `chain_of("kms-a", 300)`.
async fn upgrade_keeps_context_lookups(url: &str) {
    let (_, a) = chain_of("kms-a", 300);
    let (_, store) = store::connect_both(url)
        .await
        .expect("migrate to the current schema");
    append_in_batches(store.as_ref(), &a[200..], 10).await;
    for (k, v) in [("client", "c-1"), ("note_id", "n-7"), ("note_id", "n-250")] {
        let filter = EventFilter {
            context: Some((k.to_owned(), v.to_owned())),
            ..EventFilter::default()
        };
        let expected: Vec<AuditEvent> = a.iter().filter(|e| matches(e, &filter)).cloned().collect();
        assert!(!expected.is_empty());
        let got = store.query_events(&filter, ALL).await.unwrap();
        assert_eq!(got, expected, "{k}={v}");
    }
}

/// On an open connection `$conn` to a new database: the migrations of `$db` before 0004, the
/// first 200 events of `chain_of("kms-a", 300)` stored as they were then; closes `$conn`.
macro_rules! pre_0004_database {
    ($conn:ident, $db:literal) => {{
        let migrations = migrations_before_0004($db);
        let migrator = sqlx::migrate::Migrator::new(migrations.path())
            .await
            .unwrap();
        migrator.run(&mut $conn).await.unwrap();
        let (_, a) = chain_of("kms-a", 300);
        let rows = pre_0004_rows(&a[..200]);
        sqlx::raw_sql(sqlx::AssertSqlSafe(rows))
            .execute(&mut $conn)
            .await
            .unwrap();
        let _ = $conn.close().await;
    }};
}

#[tokio::test]
async fn sqlite_upgrade_to_0004_keeps_context_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("kms.db").display());
    let options = url
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .unwrap()
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    pre_0004_database!(conn, "sqlite");
    upgrade_keeps_context_lookups(&url).await;
}

#[tokio::test]
async fn postgres_upgrade_to_0004_keeps_context_lookups() {
    struct Dropped(String);
    impl Drop for Dropped {
        fn drop(&mut self) {
            common::drop_pg_database(&self.0);
        }
    }
    let (name, url) = common::create_pg_database().await;
    let _dropped = Dropped(name);
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    pre_0004_database!(conn, "postgres");
    upgrade_keeps_context_lookups(&url).await;
}

// ---------------------------------------------------------------------------------------------
// SQLite only

/// The audit appender checkpoints only after 10,000 WAL pages (`WAL_AUTOCHECKPOINT_PAGES`):
/// after 300 one-event batches (about 2,300 pages, the context indexing passes included) the
/// WAL still holds them all. With SQLite's default (1,000) a commit past 1,000 pages
/// checkpoints and the next one restarts the WAL, so it would hold at most ~1,000.
#[tokio::test]
async fn sqlite_audit_checkpoints_only_after_10000_wal_pages() {
    let db = TestDb::sqlite().await;
    let (_, events) = chain_of("kms-a", 300);
    append_in_batches(db.audit.as_ref(), &events, 1).await;
    let wal_frames = common::sqlite_wal_frames(&db.url).await;
    assert!(
        (1500..10_000).contains(&wal_frames),
        "the WAL holds {wal_frames} frames: it was checkpointed and restarted early"
    );
}

/// A database file made read-only (chmod 0444) refuses appends and probes with `Unavailable`
/// while reads keep working.
#[tokio::test]
async fn sqlite_read_only_file_is_unavailable_for_writes() {
    use std::os::unix::fs::PermissionsExt;

    let db = TestDb::sqlite().await;
    let key = test_key();
    let (mut chain, events) = chain_of("kms-a", 5);
    db.audit.append_events(&events).await.unwrap();
    db.audit
        .append_checkpoint(&signed_checkpoint(&chain, &key))
        .await
        .unwrap();

    let path = db._dir.as_ref().unwrap().path().join("kms.db");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Root (CAP_DAC_OVERRIDE) writes through mode bits, and SQLite would open the file
    // read-write. Then open it read-only explicitly: SQLite's own fallback when it cannot open
    // a file for writing, with the same errors on write.
    let privileged = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    let url = if privileged {
        eprintln!("running with privileges that ignore mode 0444: opening with mode=ro");
        format!("{}?mode=ro", db.url)
    } else {
        db.url.clone()
    };
    let (_, read_only) = store::connect_both(&url)
        .await
        .expect("a read-only database still opens");

    let next = extend(&mut chain, 6, 2);
    for result in [
        read_only.append_events(&next).await,
        read_only.probe_write().await,
        read_only
            .append_checkpoint(&signed_checkpoint(&chain, &key))
            .await,
    ] {
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "expected Unavailable, got {result:?}"
        );
    }
    assert_eq!(stored(read_only.as_ref(), "kms-a").await, events);
    assert_eq!(
        read_only.last_event("kms-a").await.unwrap().as_ref(),
        events.last()
    );
    assert_eq!(
        read_only.checkpoints("kms-a", 0, 10).await.unwrap().len(),
        1
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

/// A TCP relay to the PostgreSQL server; stopping it closes every relayed connection and
/// refuses new ones, as a server that went down does.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(port: u16, target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                links.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Relay { port, task }
    }

    /// Dropping the accept loop drops the listener and the `JoinSet`, aborting every link.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn via_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let user = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"));
    format!(
        "{scheme}://{}127.0.0.1:{port}{path}",
        user.unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_unavailable_and_recovers() {
    use std::str::FromStr;

    let db = TestDb::postgres().await;
    let options = sqlx::postgres::PgConnectOptions::from_str(&db.url).unwrap();
    let target = format!("{}:{}", options.get_host(), options.get_port());
    let relay = Relay::start(0, target.clone()).await;
    let port = relay.port;
    let (_, audit) = store::connect_both(&via_port(&db.url, port)).await.unwrap();
    let (mut chain, events) = chain_of("kms-a", 3);
    audit.append_events(&events).await.unwrap();

    relay.stop().await;
    let next = extend(&mut chain, 4, 2);
    let results = tokio::time::timeout(Duration::from_secs(30), async {
        [
            audit.append_events(&next).await,
            audit.probe_write().await,
            audit.last_event("kms-a").await.map(|_| ()),
        ]
    })
    .await
    .expect("a store whose server is down must answer, not hang");
    for result in results {
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "expected Unavailable, got {result:?}"
        );
    }

    // The server comes back on the same address: the same store serves again.
    let relay = Relay::start(port, target).await;
    audit.probe_write().await.expect("probe after recovery");
    audit.append_events(&next).await.unwrap();
    assert_eq!(
        stored(audit.as_ref(), "kms-a").await,
        [events, next].concat()
    );
    relay.stop().await;
}
