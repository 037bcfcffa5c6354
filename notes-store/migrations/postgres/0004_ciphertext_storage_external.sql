-- Sealed bodies and reasons are AES-256-GCM ciphertext: incompressible by construction
-- (postgres; kept in step with the other database's 0004, which has nothing to change).
-- With the default storage (EXTENDED) PostgreSQL tries pglz on every value over ~2 KB before
-- moving it to the TOAST table, fails, and stores it as it was. EXTERNAL skips that attempt and
-- keeps the rest: a large value still goes to the TOAST table, out of line, so a re-wrap that
-- updates wrapped_key still leaves the body where it is. Measured on PostgreSQL 15 (README,
-- session 13): 20,000 rows of 2,064 random bytes, 21-30 us per row against 36-51, the same
-- 54 MB on disk. Rows written before this migration stay as they are (uncompressed: the
-- attempt failed for them too).
ALTER TABLE note_revisions
    ALTER COLUMN body_ciphertext SET STORAGE EXTERNAL,
    ALTER COLUMN reason_ciphertext SET STORAGE EXTERNAL;
