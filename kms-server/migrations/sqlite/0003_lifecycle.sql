-- no-transaction
-- Key lifecycle (SQLite): automatic rotation, minimum decryption version, scheduled deletion
-- and the DESTROYED tombstone state. Kept in step with migrations/postgres/0003_lifecycle.sql.
--
-- SQLite cannot change a CHECK constraint in place, so `keys` is rebuilt (the documented
-- "make other kinds of table schema changes" procedure): foreign keys off (only possible
-- outside a transaction, hence no-transaction), rebuild in one transaction, check, back on.
-- Dropping the old table with foreign keys on would count its rows' children as violations.

PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE keys_new (
    key_id                 TEXT    NOT NULL PRIMARY KEY
                                   CHECK (length(key_id) = 36 AND key_id = lower(key_id)),
    alias                  TEXT             CONSTRAINT keys_alias_unique UNIQUE,
    description            TEXT    NOT NULL DEFAULT '',
    state                  TEXT    NOT NULL
                                   CHECK (state IN ('ENABLED', 'DISABLED', 'PENDING_DELETION',
                                                    'DESTROYED')),
    primary_version        INTEGER NOT NULL CHECK (primary_version >= 1),
    created_at_ms          INTEGER NOT NULL,
    backend                TEXT    NOT NULL,
    -- Automatic rotation: the period, and when the next rotation is due (NULL = none).
    rotation_period_ms     INTEGER          CHECK (rotation_period_ms > 0),
    next_rotation_ms       INTEGER,
    -- Blobs under older versions are refused.
    min_decryption_version INTEGER NOT NULL DEFAULT 1 CHECK (min_decryption_version >= 1),
    -- PENDING_DELETION: when the versions are destroyed; DESTROYED: when they were.
    deletion_at_ms         INTEGER,
    CHECK ((state IN ('PENDING_DELETION', 'DESTROYED')) = (deletion_at_ms IS NOT NULL)),
    CONSTRAINT keys_primary_version_fk FOREIGN KEY (key_id, primary_version)
        REFERENCES key_versions (key_id, version) DEFERRABLE INITIALLY DEFERRED
) STRICT;

INSERT INTO keys_new (key_id, alias, description, state, primary_version, created_at_ms, backend,
                      deletion_at_ms)
SELECT key_id, alias, description, state, primary_version, created_at_ms, backend,
       CASE WHEN state = 'PENDING_DELETION' THEN created_at_ms + 2592000000 END
FROM keys;

DROP TABLE keys;
ALTER TABLE keys_new RENAME TO keys;

-- The lifecycle worker's two questions: which keys are due for rotation, for destruction.
CREATE INDEX keys_rotation_due ON keys (next_rotation_ms) WHERE next_rotation_ms IS NOT NULL;
CREATE INDEX keys_deletion_due ON keys (deletion_at_ms) WHERE state = 'PENDING_DELETION';

COMMIT;
PRAGMA foreign_keys = ON;
