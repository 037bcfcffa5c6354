-- Per-client KMS keys (crypto-shredding) and re-wrap support (PostgreSQL). Kept in step with
-- migrations/sqlite/0002_client_keys.sql (checked by tests/store.rs).
--
-- Every client of a site has its own KMS master key (alias "<kms_key>/clients/<client_id>");
-- each revision's data key is wrapped under it. Erasing a client destroys that key in the HSM,
-- so every copy of the client's wrapped data keys (backups included) becomes useless.
-- Nothing secret is stored here: ids, states, times and the KMS's signed erasure receipt.

CREATE TABLE client_keys (
    site_id             TEXT    NOT NULL CHECK (length(site_id) BETWEEN 1 AND 64),
    client_id           TEXT    NOT NULL CHECK (length(client_id) BETWEEN 1 AND 64),
    -- The client's KMS key (UUID text); NULL until the first note (or a hold placed first).
    kms_key_id          TEXT,
    -- ACTIVE, ERASING (erasure started: writes refused) or ERASED.
    state               TEXT    NOT NULL CHECK (state IN ('ACTIVE', 'ERASING', 'ERASED')),
    created_at_ms       BIGINT  NOT NULL,
    erasure_started_ms  BIGINT,
    erased_at_ms        BIGINT,
    erasure_reason      TEXT,
    -- Legal hold: erasure is refused while it is set (0 or 1, as in SQLite).
    legal_hold          BIGINT  NOT NULL DEFAULT 0 CHECK (legal_hold IN (0, 1)),
    legal_hold_reason   TEXT,
    legal_hold_at_ms    BIGINT,
    -- What the erasure made unreadable, and the KMS's receipt (canonical JSON), its ECDSA
    -- P-256 signature (raw r||s over SHA-256 of the receipt) and the signing key fingerprint.
    notes_erased        BIGINT,
    revisions_erased    BIGINT,
    receipt             BYTEA,
    receipt_signature   BYTEA,
    receipt_fingerprint TEXT,
    PRIMARY KEY (site_id, client_id)
);

-- Re-wrap campaigns and key-usage reports walk the revisions by KMS key.
CREATE INDEX note_revisions_by_key ON note_revisions (kms_key_id, kms_key_version);
