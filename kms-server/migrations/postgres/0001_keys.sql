-- Key metadata (PostgreSQL). Kept in step with migrations/sqlite/0001_keys.sql: same tables,
-- same columns (checked by kms-server/tests/store.rs). No key material is ever stored here.

CREATE TABLE keys (
    key_id          UUID    NOT NULL PRIMARY KEY,
    alias           TEXT             CONSTRAINT keys_alias_unique UNIQUE,
    description     TEXT    NOT NULL DEFAULT '',
    state           TEXT    NOT NULL
                            CHECK (state IN ('ENABLED', 'DISABLED', 'PENDING_DELETION')),
    primary_version BIGINT  NOT NULL CHECK (primary_version >= 1),
    created_at_ms   BIGINT  NOT NULL,
    backend         TEXT    NOT NULL
);

CREATE TABLE key_versions (
    key_id        UUID    NOT NULL REFERENCES keys (key_id),
    version       BIGINT  NOT NULL CHECK (version >= 1 AND version <= 4294967295),
    -- The backend's reference to the version's key object (PKCS#11 label, TPM-wrapped blob).
    backend_ref   BYTEA   NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROYED')),
    created_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (key_id, version)
);

-- The primary version must exist. Deferred: a key and its first version are inserted in one
-- transaction, and the check runs at COMMIT.
ALTER TABLE keys
    ADD CONSTRAINT keys_primary_version_fk FOREIGN KEY (key_id, primary_version)
        REFERENCES key_versions (key_id, version) DEFERRABLE INITIALLY DEFERRED;
