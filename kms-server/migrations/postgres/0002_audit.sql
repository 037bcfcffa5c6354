-- Audit log (PostgreSQL). Kept in step with migrations/sqlite/0002_audit.sql: same tables,
-- same columns (checked by kms-server/tests/store.rs). Nothing secret is stored here: an audit
-- event never holds key material or plaintext (see kms_audit::AuditEvent).
--
-- `event_json` / `checkpoint_json` are the records (kms_audit's JSON, which exports carry and
-- verification re-hashes). The other columns are copies of the fields auditors filter on, for
-- lookups only; `src/audit/store.rs` says how they are derived.
--
-- Text columns that are compared or ordered use COLLATE "C": byte order, the order SQLite
-- gives (results are ordered by node_id), and cheaper index comparisons than a locale's.

CREATE TABLE audit_events (
    node_id    TEXT   COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL CHECK (seq >= 1),
    time_ms    BIGINT NOT NULL,
    caller     TEXT   COLLATE "C" NOT NULL,
    operation  TEXT   COLLATE "C" NOT NULL,
    key_id     TEXT   COLLATE "C",
    outcome    TEXT   COLLATE "C" NOT NULL,
    event_json TEXT   NOT NULL,
    hash       TEXT   NOT NULL CHECK (length(hash) = 64),
    PRIMARY KEY (node_id, seq)
);

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
    node_id TEXT   COLLATE "C" NOT NULL,
    seq     BIGINT NOT NULL,
    k       TEXT   COLLATE "C" NOT NULL,
    v       TEXT   COLLATE "C" NOT NULL,
    PRIMARY KEY (node_id, seq, k)
);

CREATE INDEX audit_event_context_k_v ON audit_event_context (k, v);

CREATE TABLE audit_checkpoints (
    node_id         TEXT   COLLATE "C" NOT NULL,
    seq             BIGINT NOT NULL CHECK (seq >= 1),
    time_ms         BIGINT NOT NULL,
    checkpoint_json TEXT   NOT NULL,
    PRIMARY KEY (node_id, seq)
);

-- One row that the health check rewrites to prove the database takes writes (probe_write).
CREATE TABLE audit_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    touched_ms BIGINT
);

INSERT INTO audit_probe (id, touched_ms) VALUES (1, NULL);
