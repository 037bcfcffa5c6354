-- Notes and their encrypted revisions (PostgreSQL). Kept in step with
-- migrations/sqlite/0001_notes.sql: same tables, same columns (checked by tests/store.rs).
-- No plaintext note text and no plaintext data key is ever stored here.

CREATE TABLE notes (
    note_id          UUID    NOT NULL PRIMARY KEY,
    site_id          TEXT    NOT NULL CHECK (length(site_id) BETWEEN 1 AND 64),
    client_id        TEXT    NOT NULL CHECK (length(client_id) BETWEEN 1 AND 64),
    author_id        TEXT    NOT NULL CHECK (length(author_id) BETWEEN 1 AND 64),
    session_date     TEXT    NOT NULL
                             CHECK (session_date ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'),
    current_revision BIGINT  NOT NULL CHECK (current_revision >= 1),
    created_at_ms    BIGINT  NOT NULL,
    updated_at_ms    BIGINT  NOT NULL
);

-- ListNotes: one client's notes in (session_date, note_id) order. Session dates all have the
-- form YYYY-MM-DD, so every collation orders them as SQLite does (by date).
CREATE INDEX notes_by_client ON notes (site_id, client_id, session_date, note_id);

CREATE TABLE note_revisions (
    note_id           UUID    NOT NULL REFERENCES notes (note_id),
    revision          BIGINT  NOT NULL CHECK (revision >= 1 AND revision <= 4294967295),
    author_id         TEXT    NOT NULL CHECK (length(author_id) BETWEEN 1 AND 64),
    created_at_ms     BIGINT  NOT NULL,
    -- The KMS key (UUID text) and version that wrapped the data key.
    kms_key_id        TEXT    NOT NULL,
    kms_key_version   BIGINT  NOT NULL CHECK (kms_key_version >= 1),
    -- Format of the fields below (notes-store/src/crypto.rs).
    crypto_version    BIGINT  NOT NULL,
    -- The data key, wrapped by the KMS and bound to {site, client, note, revision}.
    wrapped_key       BYTEA   NOT NULL,
    -- AES-256-GCM of the body: 96-bit nonce, ciphertext || 128-bit tag.
    body_nonce        BYTEA   NOT NULL,
    body_ciphertext   BYTEA   NOT NULL,
    -- Amendments only: the reason, sealed like the body with its own nonce.
    reason_nonce      BYTEA,
    reason_ciphertext BYTEA,
    CONSTRAINT note_revisions_pkey PRIMARY KEY (note_id, revision),
    CHECK ((reason_nonce IS NULL) = (reason_ciphertext IS NULL))
);
