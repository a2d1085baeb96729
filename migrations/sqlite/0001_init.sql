-- dbx server metadata, SQLite dialect.
CREATE TABLE server_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- A namespace is a tree of files: each user's root, later shared folders. `head` is the id of
-- its newest journal row; the next change takes head + 1.
CREATE TABLE namespaces (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    head       INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    quota_bytes   INTEGER,
    root_ns       INTEGER NOT NULL REFERENCES namespaces(id),
    created_at    INTEGER NOT NULL
);

-- Bearer tokens, stored as the SHA-256 of the token: a leaked database leaks no credentials.
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    device     TEXT,
    created_at INTEGER NOT NULL
);

-- Every block the blob store durably holds. A row is written only after the bytes are durable.
CREATE TABLE blocks (
    hash       TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

-- Which user uploaded (proved possession of) which block, and when: the upload grace period.
CREATE TABLE uploads (
    user_id     INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, hash)
);

-- Which blocks a namespace's files (current or past) reference: what its members may read.
CREATE TABLE ns_blocks (
    ns   INTEGER NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (ns, hash)
);

-- The live tree of each namespace.
CREATE TABLE files (
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

-- Append-only: every change is one row; ids increase per namespace.
CREATE TABLE journal (
    ns           INTEGER NOT NULL,
    id           INTEGER NOT NULL,
    op           TEXT NOT NULL,
    path         TEXT NOT NULL,
    old_path     TEXT,
    kind         TEXT NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    blocks       TEXT NOT NULL DEFAULT '',
    mtime        INTEGER NOT NULL DEFAULT 0,
    executable   INTEGER NOT NULL DEFAULT 0,
    user_id      INTEGER NOT NULL,
    device       TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (ns, id)
);
CREATE INDEX journal_path ON journal (ns, path, id);
