-- Key lifecycle (PostgreSQL): automatic rotation, minimum decryption version, scheduled
-- deletion and the DESTROYED tombstone state. Kept in step with
-- migrations/sqlite/0003_lifecycle.sql.

ALTER TABLE keys DROP CONSTRAINT keys_state_check;
ALTER TABLE keys ADD CONSTRAINT keys_state_check
    CHECK (state IN ('ENABLED', 'DISABLED', 'PENDING_DELETION', 'DESTROYED'));

-- Automatic rotation: the period, and when the next rotation is due (NULL = none).
ALTER TABLE keys ADD COLUMN rotation_period_ms BIGINT CHECK (rotation_period_ms > 0);
ALTER TABLE keys ADD COLUMN next_rotation_ms BIGINT;
-- Blobs under older versions are refused.
ALTER TABLE keys ADD COLUMN min_decryption_version BIGINT NOT NULL DEFAULT 1
    CHECK (min_decryption_version >= 1);
-- PENDING_DELETION: when the versions are destroyed; DESTROYED: when they were.
ALTER TABLE keys ADD COLUMN deletion_at_ms BIGINT;
UPDATE keys SET deletion_at_ms = created_at_ms + 2592000000 WHERE state = 'PENDING_DELETION';
ALTER TABLE keys ADD CONSTRAINT keys_deletion_at_check
    CHECK ((state IN ('PENDING_DELETION', 'DESTROYED')) = (deletion_at_ms IS NOT NULL));

-- The lifecycle worker's two questions: which keys are due for rotation, for destruction.
CREATE INDEX keys_rotation_due ON keys (next_rotation_ms) WHERE next_rotation_ms IS NOT NULL;
CREATE INDEX keys_deletion_due ON keys (deletion_at_ms) WHERE state = 'PENDING_DELETION';
