-- Only the rows of a move have an old path: the others (nearly all of them) are no longer
-- indexed under NULL, one index entry less to write per file committed. Lookups by old path
-- (`old_path = ?`) imply `old_path IS NOT NULL`, so they use this index as before.
DROP INDEX journal_old_path;
CREATE INDEX journal_old_path ON journal (ns, old_path, id) WHERE old_path IS NOT NULL;
