-- Key metadata (SQLite). Kept in step with migrations/postgres/0001_keys.sql: same tables,
-- same columns (checked by kms-server/tests/store.rs). No key material is ever stored here.
--
-- STRICT tables: SQLite enforces the declared column types instead of coercing them.
-- key_id is the canonical lower-case hyphenated UUID text, so text order = UUID byte order
-- (the same order PostgreSQL's uuid type gives, which list paging relies on).

CREATE TABLE keys (
    key_id          TEXT    NOT NULL PRIMARY KEY
                            CHECK (length(key_id) = 36 AND key_id = lower(key_id)),
    alias           TEXT             CONSTRAINT keys_alias_unique UNIQUE,
    description     TEXT    NOT NULL DEFAULT '',
    state           TEXT    NOT NULL
                            CHECK (state IN ('ENABLED', 'DISABLED', 'PENDING_DELETION')),
    primary_version INTEGER NOT NULL CHECK (primary_version >= 1),
    created_at_ms   INTEGER NOT NULL,
    backend         TEXT    NOT NULL,
    -- The primary version must exist. Deferred: a key and its first version are inserted in
    -- one transaction, and the check runs at COMMIT.
    CONSTRAINT keys_primary_version_fk FOREIGN KEY (key_id, primary_version)
        REFERENCES key_versions (key_id, version) DEFERRABLE INITIALLY DEFERRED
) STRICT;

CREATE TABLE key_versions (
    key_id        TEXT    NOT NULL REFERENCES keys (key_id),
    version       INTEGER NOT NULL CHECK (version >= 1 AND version <= 4294967295),
    -- The backend's reference to the version's key object (PKCS#11 label, TPM-wrapped blob).
    backend_ref   BLOB    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
) STRICT;
