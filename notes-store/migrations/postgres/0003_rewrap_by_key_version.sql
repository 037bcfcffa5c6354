-- Re-wrap campaigns walk the revisions of one (KMS key, version) at a time, in
-- (note_id, revision) order, from this index (postgres; kept in step with the other database's
-- 0003). Walking in index order keeps the index maintenance of a re-wrap sequential: the
-- entries leave (key, old version) and join (key, new version) in the order they are visited,
-- instead of at random pages of an index walked in note order. It also serves key-usage
-- reports (GROUP BY key, version) as before.
DROP INDEX note_revisions_by_key;
CREATE INDEX note_revisions_by_key_version
    ON note_revisions (kms_key_id, kms_key_version, note_id, revision);
