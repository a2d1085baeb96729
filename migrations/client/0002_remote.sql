-- The remote tree as of the stored cursor, kept current from the journal, so a sync reads only
-- the changes since the last one. `path` is relative to the synced folder.
CREATE TABLE remote_entries (
    ns           INTEGER NOT NULL,
    path         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    rev          INTEGER NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    blocks       TEXT NOT NULL DEFAULT '',
    mtime        INTEGER NOT NULL DEFAULT 0,
    executable   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, path)
);

-- Block lengths of each synced file (comma-separated, in block order), so blocks of unchanged
-- local files can be reused instead of downloaded. Empty: unknown.
ALTER TABLE entries ADD COLUMN block_lens TEXT NOT NULL DEFAULT '';
