-- Audit log (SQLite). Kept in step with migrations/postgres/0002_audit.sql: same tables, same
-- columns (checked by kms-server/tests/store.rs). Nothing secret is stored here: an audit
-- event never holds key material or plaintext (see kms_audit::AuditEvent).
--
-- `event_json` / `checkpoint_json` are the records (kms_audit's JSON, which exports carry and
-- verification re-hashes). The other columns are copies of the fields auditors filter on, for
-- lookups only; `src/audit/store.rs` says how they are derived.

CREATE TABLE audit_events (
    node_id    TEXT    NOT NULL,
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    time_ms    INTEGER NOT NULL,
    caller     TEXT    NOT NULL,
    operation  TEXT    NOT NULL,
    key_id     TEXT,
    outcome    TEXT    NOT NULL,
    event_json TEXT    NOT NULL,
    hash       TEXT    NOT NULL CHECK (length(hash) = 64),
    PRIMARY KEY (node_id, seq)
) STRICT;

CREATE INDEX audit_events_time_ms ON audit_events (time_ms);
-- (value, node_id, seq): results come out in the order queries return them, so a LIMIT stops
-- the scan early.
CREATE INDEX audit_events_key_id ON audit_events (key_id, node_id, seq);
CREATE INDEX audit_events_caller ON audit_events (caller, node_id, seq);
CREATE INDEX audit_events_operation ON audit_events (operation, node_id, seq);

-- One row per encryption-context pair of an event ("every event about client X"), written in
-- the event's transaction. A derived index of event_json like the columns above, so no foreign
-- key to audit_events: it would protect nothing the hash chain relies on and, on PostgreSQL,
-- doubles the cost of inserting these rows.
CREATE TABLE audit_event_context (
    node_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    k       TEXT    NOT NULL,
    v       TEXT    NOT NULL,
    PRIMARY KEY (node_id, seq, k)
) STRICT, WITHOUT ROWID;

CREATE INDEX audit_event_context_k_v ON audit_event_context (k, v);

CREATE TABLE audit_checkpoints (
    node_id         TEXT    NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 1),
    time_ms         INTEGER NOT NULL,
    checkpoint_json TEXT    NOT NULL,
    PRIMARY KEY (node_id, seq)
) STRICT;

-- One row that the health check rewrites to prove the database takes writes (probe_write).
CREATE TABLE audit_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    touched_ms INTEGER
) STRICT;

INSERT INTO audit_probe (id, touched_ms) VALUES (1, NULL);
