-- The (k, v) lookup of encryption-context pairs moves from an index on audit_event_context to
-- a table of its own that may lag behind the chain (SQLite). Kept in step with
-- migrations/postgres/0004_audit_context_index.sql.
--
-- Why: an index on (k, v) takes each new event's pairs to as many places in the B-tree as the
-- pairs have distinct values (every client, every note), so every group-commit batch dirtied
-- a page per pair and wrote it to the WAL again: with the index, GenerateDataKey ran at
-- 4.6-6.1k ops/s, without it 7.0-7.5k (kms-bench, A/B, 2026-12-02). audit_event_context itself
-- grows at its end (key: node_id, seq, k), so it stays in the event's transaction, and the
-- lookup table is filled from it in bulk, every few hundred events, by the audit appender
-- (src/audit/sqlite_appender.rs), touching each page once per pass instead of once per batch.
--
-- The rule every query relies on (src/audit/store.rs, events_query): a node with a row in
-- audit_context_indexed has the pairs of its events with seq <= through_seq in
-- audit_context_index, and those of later events only in audit_event_context; a node without
-- such a row has the pairs of ALL its events in audit_context_index (PostgreSQL writes them in
-- the event's transaction and never adds a row; on SQLite this migration indexes everything
-- stored so far, and the first batch a node appends afterwards adds its row).

CREATE TABLE audit_context_index (
    k       TEXT    NOT NULL,
    v       TEXT    NOT NULL,
    node_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (k, v, node_id, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE audit_context_indexed (
    node_id     TEXT    NOT NULL PRIMARY KEY,
    through_seq INTEGER NOT NULL CHECK (through_seq >= 0)
) STRICT;

INSERT INTO audit_context_index (k, v, node_id, seq)
    SELECT k, v, node_id, seq FROM audit_event_context ORDER BY k, v, node_id, seq;

DROP INDEX audit_event_context_k_v;
