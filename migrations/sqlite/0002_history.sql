-- When a block was last referenced by a commit (Unix seconds): garbage collection deletes a
-- block only if no commit referenced it since the collection began.
ALTER TABLE blocks ADD COLUMN last_ref INTEGER NOT NULL DEFAULT 0;
-- History follows renames: the rows that moved a path away.
CREATE INDEX journal_old_path ON journal (ns, old_path, id);
