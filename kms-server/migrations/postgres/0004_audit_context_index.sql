-- The (k, v) lookup of encryption-context pairs moves from an index on audit_event_context to
-- a table of its own (PostgreSQL). Kept in step with migrations/sqlite/0004_audit_context_index.sql,
-- which says why: on SQLite the table is filled behind the chain, in bulk.
--
-- On PostgreSQL every batch writes its pairs to both tables in its own transaction (the same
-- work as the index it replaces) and never adds an audit_context_indexed row: by the rule in
-- the SQLite migration, a node without such a row has all its pairs in audit_context_index.

CREATE TABLE audit_context_index (
    k       TEXT   COLLATE "C" NOT NULL,
    v       TEXT   COLLATE "C" NOT NULL,
    node_id TEXT   COLLATE "C" NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (k, v, node_id, seq)
);

CREATE TABLE audit_context_indexed (
    node_id     TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    through_seq BIGINT NOT NULL CHECK (through_seq >= 0)
);

INSERT INTO audit_context_index (k, v, node_id, seq)
    SELECT k, v, node_id, seq FROM audit_event_context;

DROP INDEX audit_event_context_k_v;
