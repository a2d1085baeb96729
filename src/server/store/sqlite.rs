//! The SQLite `MetaStore`: the embedded default. WAL with `synchronous=FULL`.
//!
//! Every write transaction starts with a write to its namespace's `head` (or another row), so it
//! takes SQLite's write lock at once and waits on `busy_timeout` instead of failing later with a
//! stale snapshot. Readers see a consistent snapshot (WAL), so a listing and its cursor agree.

use std::collections::HashSet;
use std::path::Path;

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Actor, MetaStore, StoreError, StoreResult, User};
use crate::protocol::{
    self, CommitRequest, Entry, EntryKind, JournalEntry, JournalOp, MAX_MISSING_BATCH,
};

const MIGRATIONS: &[crate::sqlite::EmbeddedMigration] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "history",
        include_str!("../../../migrations/sqlite/0002_history.sql"),
    ),
];

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn join_blocks(blocks: &[String]) -> String {
    blocks.join(",")
}

fn split_blocks(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_string).collect()
    }
}

fn user_from_row(row: &SqliteRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        disabled: row.try_get::<i64, _>("disabled")? != 0,
        root_ns: row.try_get("root_ns")?,
        quota_bytes: row.try_get("quota_bytes")?,
        created_at: row.try_get("created_at")?,
    })
}

fn kind_from(s: &str) -> Result<EntryKind, sqlx::Error> {
    EntryKind::parse(s).ok_or_else(|| sqlx::Error::Decode(format!("bad entry kind {s:?}").into()))
}

fn entry_from_row(row: &SqliteRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        path: row.try_get("path")?,
        kind: kind_from(row.try_get("kind")?)?,
        rev: row.try_get("rev")?,
        size: row.try_get::<i64, _>("size")? as u64,
        content_hash: row.try_get("content_hash")?,
        mtime: row.try_get("mtime")?,
        executable: row.try_get::<i64, _>("executable")? != 0,
        blocks: split_blocks(row.try_get("blocks")?),
    })
}

fn journal_from_row(r: &SqliteRow) -> StoreResult<JournalEntry> {
    let op: String = r.try_get("op")?;
    Ok(JournalEntry {
        id: r.try_get("id")?,
        op: JournalOp::parse(&op)
            .ok_or_else(|| sqlx::Error::Decode(format!("bad journal op {op:?}").into()))?,
        path: r.try_get("path")?,
        old_path: r.try_get("old_path")?,
        kind: kind_from(r.try_get("kind")?)?,
        size: r.try_get::<i64, _>("size")? as u64,
        content_hash: r.try_get("content_hash")?,
        blocks: split_blocks(r.try_get("blocks")?),
        mtime: r.try_get("mtime")?,
        executable: r.try_get::<i64, _>("executable")? != 0,
        user: r.try_get("user_name")?,
        device: r.try_get("device")?,
        time: r.try_get("created_at")?,
    })
}

/// The lower and upper (exclusive) bounds of the paths strictly below `dir`: `'/'` is followed
/// by `'0'` in byte order, so `dir/` ≤ p < `dir0` holds exactly for descendants.
fn subtree_bounds(dir: &str) -> (String, String) {
    if dir.is_empty() {
        (String::new(), "\u{10ffff}".to_string())
    } else {
        (format!("{dir}/"), format!("{dir}0"))
    }
}

/// What a journal row records about the entry it changed.
struct Change<'a> {
    op: JournalOp,
    path: &'a str,
    old_path: Option<&'a str>,
    kind: EntryKind,
    size: u64,
    content_hash: Option<&'a str>,
    blocks: &'a str,
    mtime: i64,
    executable: bool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let pool =
            crate::sqlite::open(path, true, MIGRATIONS, 8, crate::sqlite::Durability::Full).await?;
        let store = SqliteStore { pool };
        let epoch = protocol::block_hash(
            format!("{}-{:?}", now(), std::time::SystemTime::now()).as_bytes(),
        );
        sqlx::query("INSERT OR IGNORE INTO server_meta (key, value) VALUES ('epoch', ?)")
            .bind(&epoch[..16])
            .execute(&store.pool)
            .await?;
        Ok(store)
    }

    /// A server setting (`server_meta`), e.g. `retention_days`.
    pub async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM server_meta WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query("INSERT OR REPLACE INTO server_meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the namespace's write lock and returns its current head.
    async fn lock_ns(tx: &mut SqliteConnection, ns: i64) -> StoreResult<i64> {
        sqlx::query_scalar("UPDATE namespaces SET head = head WHERE id = ? RETURNING head")
            .bind(ns)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("namespace {ns} does not exist")))
    }

    /// Appends one journal row; returns its id (the new head).
    async fn append(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        c: &Change<'_>,
    ) -> StoreResult<i64> {
        let id: i64 =
            sqlx::query_scalar("UPDATE namespaces SET head = head + 1 WHERE id = ? RETURNING head")
                .bind(ns)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO journal (ns, id, op, path, old_path, kind, size, content_hash, blocks,
                                  mtime, executable, user_id, device, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(ns)
        .bind(id)
        .bind(c.op.as_str())
        .bind(c.path)
        .bind(c.old_path)
        .bind(c.kind.as_str())
        .bind(c.size as i64)
        .bind(c.content_hash)
        .bind(c.blocks)
        .bind(c.mtime)
        .bind(c.executable as i64)
        .bind(actor.user_id)
        .bind(actor.device.as_deref())
        .bind(now())
        .execute(&mut *tx)
        .await?;
        Ok(id)
    }

    async fn kind_at(
        tx: &mut SqliteConnection,
        ns: i64,
        path: &str,
    ) -> StoreResult<Option<(EntryKind, i64)>> {
        let row = sqlx::query("SELECT kind, rev FROM files WHERE ns = ? AND path = ?")
            .bind(ns)
            .bind(path)
            .fetch_optional(&mut *tx)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((kind_from(r.try_get("kind")?)?, r.try_get("rev")?))),
        }
    }

    /// Makes sure every ancestor of `path` is a folder, creating missing ones (each a journal
    /// row); refuses when an ancestor is a file.
    async fn ensure_ancestors(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        path: &str,
    ) -> StoreResult<()> {
        let mut ancestors = Vec::new();
        let mut p = protocol::parent_path(path);
        while !p.is_empty() {
            ancestors.push(p);
            p = protocol::parent_path(p);
        }
        for dir in ancestors.into_iter().rev() {
            match Self::kind_at(tx, ns, dir).await? {
                Some((EntryKind::Dir, _)) => {}
                Some((EntryKind::File, _)) => {
                    return Err(StoreError::PathConflict(format!(
                        "/{dir} is a file, so /{path} cannot be created below it"
                    )))
                }
                None => Self::insert_dir(tx, ns, actor, dir).await?,
            }
        }
        Ok(())
    }

    async fn insert_dir(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        dir: &str,
    ) -> StoreResult<()> {
        let change = Change {
            op: JournalOp::Add,
            path: dir,
            old_path: None,
            kind: EntryKind::Dir,
            size: 0,
            content_hash: None,
            blocks: "",
            mtime: 0,
            executable: false,
        };
        let rev = Self::append(tx, ns, actor, &change).await?;
        sqlx::query("INSERT INTO files (ns, path, kind, rev) VALUES (?, ?, 'dir', ?)")
            .bind(ns)
            .bind(dir)
            .bind(rev)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Writes a file version: a commit (`op` None: add or modify, with the parent revision
    /// checked) or a restore (no parent check). See the module invariants.
    async fn write_file_in(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        req: &CommitRequest,
        op: Option<JournalOp>,
    ) -> StoreResult<(i64, i64)> {
        let path = req.path.as_str();
        if path.is_empty() {
            return Err(StoreError::Invalid(
                "cannot commit a file at the root".into(),
            ));
        }
        if protocol::content_hash(&req.blocks) != req.content_hash {
            return Err(StoreError::Invalid(
                "content_hash does not match the block list".into(),
            ));
        }
        let head = Self::lock_ns(tx, ns).await?;

        // Every referenced block must be durable already: that is what makes a commit safe to
        // show to other devices.
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        let mut total: u64 = 0;
        for hash in &req.blocks {
            let size: Option<i64> = sqlx::query_scalar("SELECT size FROM blocks WHERE hash = ?")
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await?;
            match size {
                Some(s) => total += s as u64,
                None => {
                    if seen.insert(hash.as_str()) {
                        missing.push(hash.clone());
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(StoreError::MissingBlocks(missing));
        }
        if total != req.size {
            return Err(StoreError::Invalid(format!(
                "size {} does not match the blocks' total {total}",
                req.size
            )));
        }

        let current = sqlx::query(
            "SELECT kind, rev, content_hash, executable FROM files WHERE ns = ? AND path = ?",
        )
        .bind(ns)
        .bind(path)
        .fetch_optional(&mut *tx)
        .await?;
        let mut current_rev = None;
        if let Some(row) = &current {
            if kind_from(row.try_get("kind")?)? == EntryKind::Dir {
                return Err(StoreError::PathConflict(format!(
                    "/{path} is a folder on the server"
                )));
            }
            current_rev = Some(row.try_get::<i64, _>("rev")?);
        }
        // The server already has exactly this: success, whatever the parent revision, so a
        // commit retried after a lost answer (or made by two devices alike) is a no-op.
        if let (Some(row), Some(rev)) = (&current, current_rev) {
            let same_hash = row.try_get::<Option<String>, _>("content_hash")?.as_deref()
                == Some(req.content_hash.as_str());
            let same_exec = (row.try_get::<i64, _>("executable")? != 0) == req.executable;
            if same_hash && same_exec {
                return Ok((rev, head));
            }
        }
        if op.is_none() && req.parent_rev != current_rev {
            return Err(StoreError::Conflict {
                message: format!(
                    "/{path} changed on the server (now at revision {}, this change was based on {})",
                    current_rev.map_or("none".to_string(), |r| r.to_string()),
                    req.parent_rev.map_or("none".to_string(), |r| r.to_string()),
                ),
                current_rev,
            });
        }
        Self::ensure_ancestors(tx, ns, actor, path).await?;

        let blocks = join_blocks(&req.blocks);
        let change = Change {
            op: match (op, &current) {
                (Some(op), _) => op,
                (None, Some(_)) => JournalOp::Modify,
                (None, None) => JournalOp::Add,
            },
            path,
            old_path: None,
            kind: EntryKind::File,
            size: req.size,
            content_hash: Some(&req.content_hash),
            blocks: &blocks,
            mtime: req.mtime,
            executable: req.executable,
        };
        let rev = Self::append(tx, ns, actor, &change).await?;
        sqlx::query(
            "INSERT INTO files (ns, path, kind, rev, size, content_hash, blocks, mtime, executable)
             VALUES (?, ?, 'file', ?, ?, ?, ?, ?, ?)
             ON CONFLICT (ns, path) DO UPDATE SET rev = excluded.rev, size = excluded.size,
               content_hash = excluded.content_hash, blocks = excluded.blocks,
               mtime = excluded.mtime, executable = excluded.executable",
        )
        .bind(ns)
        .bind(path)
        .bind(rev)
        .bind(req.size as i64)
        .bind(&req.content_hash)
        .bind(&blocks)
        .bind(req.mtime)
        .bind(req.executable as i64)
        .execute(&mut *tx)
        .await?;
        let now = now();
        for hash in req.blocks.iter().collect::<HashSet<_>>() {
            sqlx::query("INSERT OR IGNORE INTO ns_blocks (ns, hash) VALUES (?, ?)")
                .bind(ns)
                .bind(hash)
                .execute(&mut *tx)
                .await?;
            // Garbage collection spares blocks referenced after it began.
            sqlx::query("UPDATE blocks SET last_ref = ? WHERE hash = ?")
                .bind(now)
                .bind(hash)
                .execute(&mut *tx)
                .await?;
        }
        Ok((rev, rev))
    }

    async fn write_file(
        &self,
        ns: i64,
        actor: &Actor,
        req: &CommitRequest,
        op: Option<JournalOp>,
    ) -> StoreResult<(i64, i64)> {
        let mut tx = self.pool.begin().await?;
        let r = Self::write_file_in(&mut tx, ns, actor, req, op).await?;
        tx.commit().await?;
        Ok(r)
    }
}

impl MetaStore for SqliteStore {
    async fn epoch(&self) -> StoreResult<String> {
        Ok(
            sqlx::query_scalar("SELECT value FROM server_meta WHERE key = 'epoch'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn head(&self, ns: i64) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT head FROM namespaces WHERE id = ?")
                .bind(ns)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0),
        )
    }

    async fn user_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        quota_bytes: Option<i64>,
    ) -> StoreResult<User> {
        let mut tx = self.pool.begin().await?;
        let ns: i64 = sqlx::query_scalar(
            "INSERT INTO namespaces (kind, created_at) VALUES ('user', ?) RETURNING id",
        )
        .bind(now())
        .fetch_one(&mut *tx)
        .await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::AlreadyExists(format!(
                "user {name:?} already exists"
            )));
        }
        let row = sqlx::query(
            "INSERT INTO users (name, password_hash, quota_bytes, root_ns, created_at)
             VALUES (?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(name)
        .bind(password_hash)
        .bind(quota_bytes)
        .bind(ns)
        .bind(now())
        .fetch_one(&mut *tx)
        .await?;
        let user = user_from_row(&row)?;
        tx.commit().await?;
        Ok(user)
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(user_from_row).collect::<Result<_, _>>()?)
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<(User, String)>> {
        let row = sqlx::query("SELECT * FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((user_from_row(&r)?, r.try_get("password_hash")?))),
        }
    }

    async fn set_password(&self, name: &str, password_hash: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET password_hash = ? WHERE name = ?")
            .bind(password_hash)
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no user named {name:?}")));
        }
        Ok(())
    }

    async fn set_disabled(&self, name: &str, disabled: bool) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> =
            sqlx::query_scalar("UPDATE users SET disabled = ? WHERE name = ? RETURNING id")
                .bind(disabled as i64)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(id) = id else {
            return Err(StoreError::NotFound(format!("no user named {name:?}")));
        };
        if disabled {
            sqlx::query("DELETE FROM tokens WHERE user_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_token(
        &self,
        user_id: i64,
        token_hash: &str,
        device: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tokens (token_hash, user_id, device, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(device)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn user_by_token(&self, token_hash: &str) -> StoreResult<Option<(User, Option<String>)>> {
        let row = sqlx::query(
            "SELECT u.*, t.device FROM tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((user_from_row(&r)?, r.try_get("device")?))),
        }
    }

    async fn readable_blocks(
        &self,
        user: &User,
        hashes: &[String],
    ) -> StoreResult<HashSet<String>> {
        let mut present = HashSet::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json =
                serde_json::to_string(batch).map_err(|e| StoreError::Invalid(e.to_string()))?;
            // A user's namespaces are its root for now; shared folders add their namespaces here.
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT b.hash FROM blocks b
                 WHERE b.hash IN (SELECT value FROM json_each(?1))
                   AND (EXISTS (SELECT 1 FROM ns_blocks n WHERE n.hash = b.hash AND n.ns = ?2)
                        OR EXISTS (SELECT 1 FROM uploads u WHERE u.hash = b.hash AND u.user_id = ?3))",
            )
            .bind(json)
            .bind(user.root_ns)
            .bind(user.id)
            .fetch_all(&self.pool)
            .await?;
            present.extend(rows);
        }
        Ok(present)
    }

    async fn existing_blocks(&self, hashes: &[String]) -> StoreResult<HashSet<String>> {
        let mut out = HashSet::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json =
                serde_json::to_string(batch).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT hash FROM blocks WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(json)
            .fetch_all(&self.pool)
            .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    async fn block_sizes(
        &self,
        hashes: &[String],
    ) -> StoreResult<std::collections::HashMap<String, u64>> {
        let mut out = std::collections::HashMap::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json =
                serde_json::to_string(batch).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let rows = sqlx::query(
                "SELECT hash, size FROM blocks WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(json)
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                out.insert(r.try_get("hash")?, r.try_get::<i64, _>("size")? as u64);
            }
        }
        Ok(out)
    }

    async fn record_blocks(&self, blocks: &[(String, u64)], user_id: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let now = now();
        for (hash, size) in blocks {
            sqlx::query("INSERT OR IGNORE INTO blocks (hash, size, created_at) VALUES (?, ?, ?)")
                .bind(hash)
                .bind(*size as i64)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO uploads (user_id, hash, uploaded_at) VALUES (?, ?, ?)
                 ON CONFLICT (user_id, hash) DO UPDATE SET uploaded_at = excluded.uploaded_at",
            )
            .bind(user_id)
            .bind(hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn commit_files(
        &self,
        ns: i64,
        actor: &Actor,
        reqs: &[CommitRequest],
    ) -> StoreResult<Vec<StoreResult<(i64, i64)>>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(reqs.len());
        for req in reqs {
            // A savepoint per file: a refused commit rolls back alone.
            let mut sp = sqlx::Connection::begin(&mut *tx).await?;
            match Self::write_file_in(&mut sp, ns, actor, req, None).await {
                Ok(r) => {
                    sp.commit().await?;
                    out.push(Ok(r));
                }
                Err(StoreError::Db(e)) => return Err(StoreError::Db(e)),
                Err(e) => {
                    sp.rollback().await?;
                    out.push(Err(e));
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn commit_file(
        &self,
        ns: i64,
        actor: &Actor,
        req: &CommitRequest,
    ) -> StoreResult<(i64, i64)> {
        self.write_file(ns, actor, req, None).await
    }

    async fn restore(
        &self,
        ns: i64,
        actor: &Actor,
        path: &str,
        rev: i64,
    ) -> StoreResult<(i64, i64)> {
        let row = sqlx::query("SELECT * FROM journal WHERE ns = ? AND id = ?")
            .bind(ns)
            .bind(rev)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no revision {rev}")))?;
        let row_path: String = row.try_get("path")?;
        let op: String = row.try_get("op")?;
        let kind: String = row.try_get("kind")?;
        if row_path != path || op == "delete" || kind != "file" {
            return Err(StoreError::NotFound(format!(
                "revision {rev} is not a version of /{path}; see `dbx history /{path}`"
            )));
        }
        let blocks = split_blocks(row.try_get("blocks")?);
        let req = CommitRequest {
            path: path.to_string(),
            parent_rev: None,
            content_hash: row
                .try_get::<Option<String>, _>("content_hash")?
                .unwrap_or_default(),
            size: row.try_get::<i64, _>("size")? as u64,
            mtime: row.try_get("mtime")?,
            executable: row.try_get::<i64, _>("executable")? != 0,
            blocks,
        };
        match self
            .write_file(ns, actor, &req, Some(JournalOp::Restore))
            .await
        {
            Err(StoreError::MissingBlocks(_)) => Err(StoreError::NotFound(format!(
                "the content of revision {rev} of /{path} has expired (past the retention period)"
            ))),
            other => other,
        }
    }

    async fn history(&self, ns: i64, path: &str, limit: u32) -> StoreResult<Vec<JournalEntry>> {
        let rows = sqlx::query(
            "SELECT j.*, u.name AS user_name FROM journal j JOIN users u ON u.id = j.user_id
             WHERE j.ns = ?1 AND (j.path = ?2 OR j.old_path = ?2)
             ORDER BY j.id DESC LIMIT ?3",
        )
        .bind(ns)
        .bind(path)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(journal_from_row).collect()
    }

    async fn gc_candidates(
        &self,
        now: i64,
        retention_secs: i64,
        grace_secs: i64,
    ) -> StoreResult<Vec<(String, u64)>> {
        // Referenced: live files, and journal versions superseded less than `retention` ago
        // (or never superseded).
        let cutoff = now - retention_secs;
        let mut referenced: HashSet<String> = HashSet::new();
        let live: Vec<String> = sqlx::query_scalar("SELECT blocks FROM files WHERE kind = 'file'")
            .fetch_all(&self.pool)
            .await?;
        for b in live {
            referenced.extend(split_blocks(&b));
        }
        let retained: Vec<String> = sqlx::query_scalar(
            "SELECT j.blocks FROM journal j
             WHERE j.kind = 'file' AND j.op != 'delete' AND COALESCE((
                SELECT MIN(n.created_at) FROM journal n
                WHERE n.ns = j.ns AND n.id > j.id AND (n.path = j.path OR n.old_path = j.path)
             ), ?1 + 1) > ?1",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        for b in retained {
            referenced.extend(split_blocks(&b));
        }
        let rows = sqlx::query(
            "SELECT b.hash, b.size FROM blocks b
             WHERE b.created_at <= ?1 AND b.last_ref <= ?1 AND b.last_ref < ?2
               AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.hash = b.hash AND u.uploaded_at > ?1)",
        )
        .bind(now - grace_secs)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let hash: String = r.try_get("hash")?;
            if !referenced.contains(&hash) {
                out.push((hash, r.try_get::<i64, _>("size")? as u64));
            }
        }
        Ok(out)
    }

    async fn forget_block(
        &self,
        hash: &str,
        gc_started: i64,
        grace_cutoff: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // One write transaction: a commit that references the block either came first (and set
        // last_ref after the collection started, so the row stays) or comes after (and finds
        // no row, so it is refused and the client uploads the block again).
        let gone = sqlx::query(
            "DELETE FROM blocks WHERE hash = ?1 AND last_ref < ?2 AND created_at <= ?3
               AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.hash = ?1 AND u.uploaded_at > ?3)",
        )
        .bind(hash)
        .bind(gc_started)
        .bind(grace_cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if gone {
            sqlx::query("DELETE FROM uploads WHERE hash = ?")
                .bind(hash)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM ns_blocks WHERE hash = ?")
                .bind(hash)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(gone)
    }

    async fn retained_versions(
        &self,
        now: i64,
        retention_secs: i64,
    ) -> StoreResult<Vec<(String, i64, Vec<String>)>> {
        let cutoff = now - retention_secs;
        let rows = sqlx::query(
            "SELECT j.path, j.id, j.blocks FROM journal j
             WHERE j.kind = 'file' AND j.op != 'delete' AND COALESCE((
                SELECT MIN(n.created_at) FROM journal n
                WHERE n.ns = j.ns AND n.id > j.id AND (n.path = j.path OR n.old_path = j.path)
             ), ?1 + 1) > ?1
             ORDER BY j.path, j.id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((
                r.try_get("path")?,
                r.try_get("id")?,
                split_blocks(r.try_get("blocks")?),
            ));
        }
        Ok(out)
    }

    async fn mkdir(&self, ns: i64, actor: &Actor, path: &str) -> StoreResult<(i64, i64)> {
        if path.is_empty() {
            return Err(StoreError::Invalid("the root folder always exists".into()));
        }
        let mut tx = self.pool.begin().await?;
        let head = Self::lock_ns(&mut tx, ns).await?;
        match Self::kind_at(&mut tx, ns, path).await? {
            Some((EntryKind::Dir, rev)) => return Ok((rev, head)),
            Some((EntryKind::File, _)) => {
                return Err(StoreError::PathConflict(format!(
                    "/{path} is a file on the server"
                )))
            }
            None => {}
        }
        Self::ensure_ancestors(&mut tx, ns, actor, path).await?;
        Self::insert_dir(&mut tx, ns, actor, path).await?;
        let head: i64 = sqlx::query_scalar("SELECT head FROM namespaces WHERE id = ?")
            .bind(ns)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((head, head))
    }

    async fn delete(
        &self,
        ns: i64,
        actor: &Actor,
        path: &str,
        parent_rev: Option<i64>,
    ) -> StoreResult<(i64, u64)> {
        if path.is_empty() {
            return Err(StoreError::Invalid(
                "the root folder cannot be deleted".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let mut head = Self::lock_ns(&mut tx, ns).await?;
        let Some((kind, rev)) = Self::kind_at(&mut tx, ns, path).await? else {
            return Err(StoreError::NotFound(format!(
                "/{path} does not exist on the server"
            )));
        };
        if parent_rev.is_some_and(|p| p != rev) {
            return Err(StoreError::Conflict {
                message: format!("/{path} changed on the server (now at revision {rev})"),
                current_rev: Some(rev),
            });
        }
        let mut doomed: Vec<(String, EntryKind)> = Vec::new();
        if kind == EntryKind::Dir {
            let (lo, hi) = subtree_bounds(path);
            let rows = sqlx::query(
                "SELECT path, kind FROM files WHERE ns = ? AND path >= ? AND path < ?
                 ORDER BY path DESC",
            )
            .bind(ns)
            .bind(lo)
            .bind(hi)
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                doomed.push((r.try_get("path")?, kind_from(r.try_get("kind")?)?));
            }
        }
        doomed.push((path.to_string(), kind));
        for (p, k) in &doomed {
            let change = Change {
                op: JournalOp::Delete,
                path: p,
                old_path: None,
                kind: *k,
                size: 0,
                content_hash: None,
                blocks: "",
                mtime: 0,
                executable: false,
            };
            head = Self::append(&mut tx, ns, actor, &change).await?;
            sqlx::query("DELETE FROM files WHERE ns = ? AND path = ?")
                .bind(ns)
                .bind(p)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((head, doomed.len() as u64))
    }

    async fn move_path(
        &self,
        ns: i64,
        actor: &Actor,
        from: &str,
        to: &str,
        parent_rev: Option<i64>,
    ) -> StoreResult<(i64, i64)> {
        if from.is_empty() || to.is_empty() {
            return Err(StoreError::Invalid(
                "the root folder cannot be moved".into(),
            ));
        }
        if from == to || to.starts_with(&format!("{from}/")) {
            return Err(StoreError::Invalid(format!(
                "cannot move /{from} to /{to}: that is the same path or inside it"
            )));
        }
        let mut tx = self.pool.begin().await?;
        Self::lock_ns(&mut tx, ns).await?;
        let Some((_, rev)) = Self::kind_at(&mut tx, ns, from).await? else {
            return Err(StoreError::NotFound(format!(
                "/{from} does not exist on the server"
            )));
        };
        if parent_rev.is_some_and(|p| p != rev) {
            return Err(StoreError::Conflict {
                message: format!("/{from} changed on the server (now at revision {rev})"),
                current_rev: Some(rev),
            });
        }
        if Self::kind_at(&mut tx, ns, to).await?.is_some() {
            return Err(StoreError::PathConflict(format!(
                "/{to} already exists on the server"
            )));
        }
        Self::ensure_ancestors(&mut tx, ns, actor, to).await?;
        let (lo, hi) = subtree_bounds(from);
        let rows = sqlx::query(
            "SELECT * FROM files WHERE ns = ? AND (path = ? OR (path >= ? AND path < ?))
             ORDER BY path",
        )
        .bind(ns)
        .bind(from)
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut *tx)
        .await?;
        let mut moved_rev = 0;
        for r in &rows {
            let e = entry_from_row(r)?;
            let new_path = format!("{to}{}", &e.path[from.len()..]);
            let blocks = join_blocks(&e.blocks);
            let change = Change {
                op: JournalOp::Move,
                path: &new_path,
                old_path: Some(&e.path),
                kind: e.kind,
                size: e.size,
                content_hash: e.content_hash.as_deref(),
                blocks: &blocks,
                mtime: e.mtime,
                executable: e.executable,
            };
            let id = Self::append(&mut tx, ns, actor, &change).await?;
            if e.path == from {
                moved_rev = id;
            }
            sqlx::query("UPDATE files SET path = ?, rev = ? WHERE ns = ? AND path = ?")
                .bind(&new_path)
                .bind(id)
                .bind(ns)
                .bind(&e.path)
                .execute(&mut *tx)
                .await?;
        }
        let head: i64 = sqlx::query_scalar("SELECT head FROM namespaces WHERE id = ?")
            .bind(ns)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((moved_rev, head))
    }

    async fn list(&self, ns: i64, path: &str, recursive: bool) -> StoreResult<(Vec<Entry>, i64)> {
        let mut tx = self.pool.begin().await?;
        let head: i64 = sqlx::query_scalar("SELECT head FROM namespaces WHERE id = ?")
            .bind(ns)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("namespace {ns} does not exist")))?;
        if !path.is_empty() {
            let row = sqlx::query("SELECT * FROM files WHERE ns = ? AND path = ?")
                .bind(ns)
                .bind(path)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                None => {
                    return Err(StoreError::NotFound(format!(
                        "/{path} does not exist on the server"
                    )))
                }
                Some(r) => {
                    let e = entry_from_row(&r)?;
                    if e.kind == EntryKind::File {
                        return Ok((vec![e], head));
                    }
                }
            }
        }
        let (lo, hi) = subtree_bounds(path);
        let rows = sqlx::query(
            "SELECT * FROM files WHERE ns = ? AND path >= ? AND path < ? ORDER BY path",
        )
        .bind(ns)
        .bind(&lo)
        .bind(hi)
        .fetch_all(&mut *tx)
        .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in &rows {
            let e = entry_from_row(r)?;
            if recursive || !e.path[lo.len()..].contains('/') {
                entries.push(e);
            }
        }
        tx.commit().await?;
        Ok((entries, head))
    }

    async fn meta(&self, ns: i64, path: &str) -> StoreResult<Option<Entry>> {
        let row = sqlx::query("SELECT * FROM files WHERE ns = ? AND path = ?")
            .bind(ns)
            .bind(path)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(entry_from_row).transpose()?)
    }

    async fn journal(
        &self,
        ns: i64,
        cursor: i64,
        limit: u32,
    ) -> StoreResult<(Vec<JournalEntry>, i64, bool)> {
        let rows = sqlx::query(
            "SELECT j.*, u.name AS user_name FROM journal j JOIN users u ON u.id = j.user_id
             WHERE j.ns = ? AND j.id > ? ORDER BY j.id LIMIT ?",
        )
        .bind(ns)
        .bind(cursor)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let has_more = rows.len() > limit as usize;
        let mut entries = Vec::with_capacity(rows.len().min(limit as usize));
        for r in rows.iter().take(limit as usize) {
            entries.push(journal_from_row(r)?);
        }
        let new_cursor = match entries.last() {
            Some(e) => e.id,
            None => cursor.max(0).min(self.head(ns).await?),
        };
        Ok((entries, new_cursor, has_more))
    }
}
