-- dbx client index: the last synced state of a synced folder.
-- `ns` is the server namespace an entry belongs to; `path` is relative to the synced folder.
CREATE TABLE entries (
    path         TEXT PRIMARY KEY,
    ns           INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    mtime_ns     INTEGER NOT NULL DEFAULT 0,
    inode        INTEGER NOT NULL DEFAULT 0,
    executable   INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    blocks       TEXT NOT NULL DEFAULT '',
    rev          INTEGER NOT NULL DEFAULT 0
);

-- Per namespace: how far this folder has read the journal, and the server epoch it read it in.
CREATE TABLE cursors (
    ns     INTEGER PRIMARY KEY,
    cursor INTEGER NOT NULL,
    epoch  TEXT NOT NULL
);
