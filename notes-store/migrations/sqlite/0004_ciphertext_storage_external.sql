-- Kept in step with the other database's 0004, which stops PostgreSQL from trying to compress
-- ciphertext columns (SET STORAGE EXTERNAL). SQLite never compresses values: nothing to change.
SELECT 1;
