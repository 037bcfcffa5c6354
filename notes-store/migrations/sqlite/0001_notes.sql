-- Notes and their encrypted revisions (SQLite). Kept in step with
-- migrations/postgres/0001_notes.sql: same tables, same columns (checked by tests/store.rs).
-- No plaintext note text and no plaintext data key is ever stored here.
--
-- STRICT tables: SQLite enforces the declared column types instead of coercing them.
-- note_id is the canonical lower-case hyphenated UUID text, so text order = UUID byte order
-- (the order PostgreSQL's uuid type gives, which list paging relies on).

CREATE TABLE notes (
    note_id          TEXT    NOT NULL PRIMARY KEY
                             CHECK (length(note_id) = 36 AND note_id = lower(note_id)),
    site_id          TEXT    NOT NULL CHECK (length(site_id) BETWEEN 1 AND 64),
    client_id        TEXT    NOT NULL CHECK (length(client_id) BETWEEN 1 AND 64),
    author_id        TEXT    NOT NULL CHECK (length(author_id) BETWEEN 1 AND 64),
    session_date     TEXT    NOT NULL
                             CHECK (session_date GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'),
    current_revision INTEGER NOT NULL CHECK (current_revision >= 1),
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL
) STRICT;

-- ListNotes: one client's notes in (session_date, note_id) order.
CREATE INDEX notes_by_client ON notes (site_id, client_id, session_date, note_id);

CREATE TABLE note_revisions (
    note_id           TEXT    NOT NULL REFERENCES notes (note_id),
    revision          INTEGER NOT NULL CHECK (revision >= 1 AND revision <= 4294967295),
    author_id         TEXT    NOT NULL CHECK (length(author_id) BETWEEN 1 AND 64),
    created_at_ms     INTEGER NOT NULL,
    -- The KMS key (UUID text) and version that wrapped the data key.
    kms_key_id        TEXT    NOT NULL,
    kms_key_version   INTEGER NOT NULL CHECK (kms_key_version >= 1),
    -- Format of the fields below (notes-store/src/crypto.rs).
    crypto_version    INTEGER NOT NULL,
    -- The data key, wrapped by the KMS and bound to {site, client, note, revision}.
    wrapped_key       BLOB    NOT NULL,
    -- AES-256-GCM of the body: 96-bit nonce, ciphertext || 128-bit tag.
    body_nonce        BLOB    NOT NULL,
    body_ciphertext   BLOB    NOT NULL,
    -- Amendments only: the reason, sealed like the body with its own nonce.
    reason_nonce      BLOB,
    reason_ciphertext BLOB,
    PRIMARY KEY (note_id, revision),
    CHECK ((reason_nonce IS NULL) = (reason_ciphertext IS NULL))
) STRICT;
