//! The SQLite `MetaStore`: the embedded default. WAL with `synchronous=FULL`.
//!
//! Every write takes this process's turn to write first (`sqlite::Writer`); a write transaction
//! then starts with a write to its namespace's `head` (or another row), so it takes SQLite's
//! write lock at once (waiting on `busy_timeout` for another process) instead of failing later
//! with a stale snapshot. Readers see a consistent snapshot (WAL), so a listing and its cursor
//! agree.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Actor, Committed, MetaStore, StoreError, StoreResult, User};
use crate::protocol::{
    self, CommitRequest, Entry, EntryKind, JournalEntry, JournalOp, MAX_MISSING_BATCH,
};
use crate::sqlite::{insert_rows, Param};
use crate::timefmt::now_secs;

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
    (
        3,
        "partial old path index",
        include_str!("../../../migrations/sqlite/0003_partial_old_path.sql"),
    ),
];

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Every write transaction takes its turn here (see [`crate::sqlite::Writer`]).
    writer: crate::sqlite::Writer,
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

/// A journal row as the JSON array the journal query makes of it (fields in order).
#[derive(serde::Deserialize)]
struct JournalRow {
    id: i64,
    op: String,
    path: String,
    old_path: Option<String>,
    kind: String,
    size: i64,
    content_hash: Option<String>,
    blocks: String,
    mtime: i64,
    executable: i64,
    user: String,
    device: Option<String>,
    time: i64,
}

impl JournalRow {
    fn into_entry(self) -> StoreResult<JournalEntry> {
        Ok(JournalEntry {
            id: self.id,
            op: JournalOp::parse(&self.op).ok_or_else(|| {
                sqlx::Error::Decode(format!("bad journal op {:?}", self.op).into())
            })?,
            path: self.path,
            old_path: self.old_path,
            kind: kind_from(&self.kind)?,
            size: self.size as u64,
            content_hash: self.content_hash,
            blocks: split_blocks(&self.blocks),
            mtime: self.mtime,
            executable: self.executable != 0,
            user: self.user,
            device: self.device,
            time: self.time,
        })
    }
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

/// A `files` row as a batched commit decides against it.
struct Current {
    kind: EntryKind,
    rev: i64,
    content_hash: Option<String>,
    executable: bool,
}

/// One journal row of a batched commit, and the `files` row it leaves behind: the same fields.
struct NewRow<'a> {
    id: i64,
    op: &'static str,
    path: &'a str,
    kind: &'static str,
    size: i64,
    content_hash: Option<&'a str>,
    blocks: String,
    mtime: i64,
    executable: i64,
}

impl NewRow<'_> {
    /// The columns `journal` and `files` share, in their common order: size, content_hash,
    /// blocks, mtime, executable.
    fn content_params(&self) -> [Param; 5] {
        [
            Param::Int(self.size),
            self.content_hash
                .map_or(Param::Null, |h| Param::Text(h.to_string())),
            Param::Text(self.blocks.clone()),
            Param::Int(self.mtime),
            Param::Int(self.executable),
        ]
    }
}

/// Refuses a commit whose blocks the server does not all hold (each missing one named once) or
/// whose size is not their total. `sizes` maps the blocks the server holds to their sizes.
fn check_blocks(req: &CommitRequest, sizes: &HashMap<String, i64>) -> StoreResult<()> {
    // Every referenced block must be durable already: that is what makes a commit safe to show
    // to other devices.
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    let mut total: u64 = 0;
    for hash in &req.blocks {
        match sizes.get(hash) {
            Some(s) => total += *s as u64,
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
    Ok(())
}

/// A value bound as JSON for `json_each`: one statement for a whole batch.
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))
}

/// Rows SQLite aggregated into one JSON array (`json_group_array`): one value to hand over
/// from the database thread instead of a row each (sqlx's cost per row was a fifth of the
/// server's CPU on a pull of 20,000 blocks).
fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> StoreResult<T> {
    serde_json::from_str(json).map_err(|e| StoreError::Db(sqlx::Error::Decode(e.into())))
}

impl SqliteStore {
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let pool =
            crate::sqlite::open(path, true, MIGRATIONS, 8, crate::sqlite::Durability::Full).await?;
        let store = SqliteStore {
            pool,
            writer: crate::sqlite::Writer::default(),
        };
        let epoch = protocol::block_hash(
            format!("{}-{:?}", now_secs(), std::time::SystemTime::now()).as_bytes(),
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
        let q = sqlx::query("INSERT OR REPLACE INTO server_meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value);
        self.writer.execute(&self.pool, q).await?;
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
        .bind(now_secs())
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
    ) -> StoreResult<Vec<String>> {
        let mut made = Vec::new();
        for dir in protocol::ancestors(path) {
            match Self::kind_at(tx, ns, dir).await? {
                Some((EntryKind::Dir, _)) => {}
                Some((EntryKind::File, _)) => {
                    return Err(StoreError::PathConflict(format!(
                        "/{dir} is a file, so /{path} cannot be created below it"
                    )))
                }
                None => {
                    Self::insert_dir(tx, ns, actor, dir).await?;
                    made.push(dir.to_string());
                }
            }
        }
        Ok(made)
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
    ) -> StoreResult<Committed> {
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

        // One query per block (not `json_each`): this path also takes the batches the fast path
        // declines, NUL-holding ids among them.
        let mut sizes = HashMap::new();
        for hash in &req.blocks {
            let size: Option<i64> = sqlx::query_scalar("SELECT size FROM blocks WHERE hash = ?")
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(size) = size {
                sizes.insert(hash.clone(), size);
            }
        }
        check_blocks(req, &sizes)?;

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
                return Ok(Committed {
                    rev,
                    cursor: head,
                    written: false,
                    dirs: Vec::new(),
                });
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
        let dirs = Self::ensure_ancestors(tx, ns, actor, path).await?;

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
        let now = now_secs();
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
        Ok(Committed {
            rev,
            cursor: rev,
            written: true,
            dirs,
        })
    }

    /// `commit_files` one request at a time, each in a savepoint: correct for any batch, but
    /// a dozen statements per file. The batched path falls back to it.
    async fn commit_each_in(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        reqs: &[CommitRequest],
    ) -> StoreResult<Vec<StoreResult<Committed>>> {
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
        Ok(out)
    }

    /// `commit_files` in a handful of statements whatever the batch size: one read of the
    /// blocks, one of the rows at the paths and their ancestors, the decisions in Rust (those of
    /// `write_file_in`, request by request, journal ids handed out in the same order), then one
    /// statement per table written.
    ///
    /// Returns `None`, having written nothing, for a batch it does not model; the caller then
    /// runs `commit_each_in`. The single pass assumes that no request changes what another one
    /// is decided against, apart from folders made on the way, so it falls back when two
    /// requests that pass the checks depending on the request alone (path, content hash,
    /// blocks, size) name the same path, or one names an ancestor of the other's path. It also
    /// falls back when a path or block id holds a NUL (SQLite's JSON functions cut text there)
    /// and when the namespace does not exist (each request reports that on its own).
    async fn commit_fast_in(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        reqs: &[CommitRequest],
    ) -> StoreResult<Option<Vec<StoreResult<Committed>>>> {
        if reqs
            .iter()
            .any(|r| r.path.contains('\0') || r.blocks.iter().any(|b| b.contains('\0')))
        {
            return Ok(None);
        }
        let head: Option<i64> =
            sqlx::query_scalar("UPDATE namespaces SET head = head WHERE id = ? RETURNING head")
                .bind(ns)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(mut head) = head else {
            return Ok(None);
        };

        // What depends on the request alone comes first, as in `write_file_in`.
        let mut verdicts: Vec<StoreResult<()>> = reqs
            .iter()
            .map(|req| {
                if req.path.is_empty() {
                    Err(StoreError::Invalid(
                        "cannot commit a file at the root".into(),
                    ))
                } else if protocol::content_hash(&req.blocks) != req.content_hash {
                    Err(StoreError::Invalid(
                        "content_hash does not match the block list".into(),
                    ))
                } else {
                    Ok(())
                }
            })
            .collect();
        let mut wanted = HashSet::new();
        for (req, verdict) in reqs.iter().zip(&verdicts) {
            if verdict.is_ok() {
                wanted.extend(req.blocks.iter().map(String::as_str));
            }
        }
        let mut sizes: HashMap<String, i64> = HashMap::with_capacity(wanted.len());
        if !wanted.is_empty() {
            let rows: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(hash, size)) FROM blocks
                 WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(to_json(&wanted)?)
            .fetch_one(&mut *tx)
            .await?;
            sizes.extend(from_json::<Vec<(String, i64)>>(&rows)?);
        }
        for (req, verdict) in reqs.iter().zip(verdicts.iter_mut()) {
            if verdict.is_ok() {
                *verdict = check_blocks(req, &sizes);
            }
        }

        // Only requests still standing can change the tree; see the fallback rule above.
        let mut live = HashSet::new();
        for (req, verdict) in reqs.iter().zip(&verdicts) {
            if verdict.is_ok() && !live.insert(req.path.as_str()) {
                return Ok(None);
            }
        }
        let mut paths = live.clone();
        for path in &live {
            for dir in protocol::ancestors(path) {
                if live.contains(dir) {
                    return Ok(None);
                }
                paths.insert(dir);
            }
        }
        let mut files: HashMap<String, Current> = HashMap::with_capacity(paths.len());
        if !paths.is_empty() {
            let rows = sqlx::query(
                "SELECT path, kind, rev, content_hash, executable FROM files
                 WHERE ns = ? AND path IN (SELECT value FROM json_each(?))",
            )
            .bind(ns)
            .bind(to_json(&paths)?)
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                files.insert(
                    r.try_get("path")?,
                    Current {
                        kind: kind_from(r.try_get("kind")?)?,
                        rev: r.try_get("rev")?,
                        content_hash: r.try_get("content_hash")?,
                        executable: r.try_get::<i64, _>("executable")? != 0,
                    },
                );
            }
        }

        let mut out = Vec::with_capacity(reqs.len());
        let mut rows: Vec<NewRow> = Vec::new();
        let mut made: HashSet<&str> = HashSet::new();
        // Ordered: its rows are written in key order (as in `record_blocks`).
        let mut referenced: BTreeSet<&str> = BTreeSet::new();
        for (req, verdict) in reqs.iter().zip(verdicts) {
            if let Err(e) = verdict {
                out.push(Err(e));
                continue;
            }
            let path = req.path.as_str();
            let current = files.get(path);
            if let Some(c) = current {
                if c.kind == EntryKind::Dir {
                    out.push(Err(StoreError::PathConflict(format!(
                        "/{path} is a folder on the server"
                    ))));
                    continue;
                }
                // The server already has exactly this: see `write_file_in`.
                if c.content_hash.as_deref() == Some(req.content_hash.as_str())
                    && c.executable == req.executable
                {
                    out.push(Ok(Committed {
                        rev: c.rev,
                        cursor: head,
                        written: false,
                        dirs: Vec::new(),
                    }));
                    continue;
                }
            }
            let current_rev = current.map(|c| c.rev);
            if req.parent_rev != current_rev {
                out.push(Err(StoreError::Conflict {
                    message: format!(
                        "/{path} changed on the server (now at revision {}, this change was based on {})",
                        current_rev.map_or("none".to_string(), |r| r.to_string()),
                        req.parent_rev.map_or("none".to_string(), |r| r.to_string()),
                    ),
                    current_rev,
                }));
                continue;
            }
            let mut new_dirs = Vec::new();
            let mut blocked = None;
            for dir in protocol::ancestors(path) {
                let kind = if made.contains(dir) {
                    Some(EntryKind::Dir)
                } else {
                    files.get(dir).map(|c| c.kind)
                };
                match kind {
                    Some(EntryKind::Dir) => {}
                    Some(EntryKind::File) => {
                        blocked = Some(dir);
                        break;
                    }
                    None => new_dirs.push(dir),
                }
            }
            if let Some(dir) = blocked {
                out.push(Err(StoreError::PathConflict(format!(
                    "/{dir} is a file, so /{path} cannot be created below it"
                ))));
                continue;
            }
            let dirs = new_dirs.iter().map(|d| d.to_string()).collect();
            for dir in new_dirs {
                head += 1;
                made.insert(dir);
                rows.push(NewRow {
                    id: head,
                    op: JournalOp::Add.as_str(),
                    path: dir,
                    kind: EntryKind::Dir.as_str(),
                    size: 0,
                    content_hash: None,
                    blocks: String::new(),
                    mtime: 0,
                    executable: 0,
                });
            }
            head += 1;
            rows.push(NewRow {
                id: head,
                op: if current.is_some() {
                    JournalOp::Modify.as_str()
                } else {
                    JournalOp::Add.as_str()
                },
                path,
                kind: EntryKind::File.as_str(),
                size: req.size as i64,
                content_hash: Some(&req.content_hash),
                blocks: join_blocks(&req.blocks),
                mtime: req.mtime,
                executable: req.executable as i64,
            });
            referenced.extend(req.blocks.iter().map(String::as_str));
            out.push(Ok(Committed {
                rev: head,
                cursor: head,
                written: true,
                dirs,
            }));
        }

        Self::write_batch(tx, ns, actor, &rows, head, &referenced).await?;
        Ok(Some(out))
    }

    /// Writes what `commit_fast_in` decided: the journal rows (and the tree rows they leave),
    /// the new head, and the blocks the new versions reference.
    async fn write_batch(
        tx: &mut SqliteConnection,
        ns: i64,
        actor: &Actor,
        rows: &[NewRow<'_>],
        head: i64,
        referenced: &BTreeSet<&str>,
    ) -> StoreResult<()> {
        let now = now_secs();
        if !rows.is_empty() {
            let journal = rows
                .iter()
                .map(|r| {
                    vec![
                        Param::Int(ns),
                        Param::Int(r.id),
                        Param::Text(r.op.to_string()),
                        Param::Text(r.path.to_string()),
                        Param::Null,
                        Param::Text(r.kind.to_string()),
                    ]
                    .into_iter()
                    .chain(r.content_params())
                    .chain([
                        Param::Int(actor.user_id),
                        actor.device.clone().map_or(Param::Null, Param::Text),
                        Param::Int(now),
                    ])
                    .collect()
                })
                .collect();
            insert_rows(
                &mut *tx,
                "INSERT INTO journal (ns, id, op, path, old_path, kind, size, content_hash, blocks,
                                      mtime, executable, user_id, device, created_at)",
                "",
                journal,
            )
            .await?;
            let files = rows
                .iter()
                .map(|r| {
                    vec![
                        Param::Int(ns),
                        Param::Text(r.path.to_string()),
                        Param::Text(r.kind.to_string()),
                        Param::Int(r.id),
                    ]
                    .into_iter()
                    .chain(r.content_params())
                    .collect()
                })
                .collect();
            insert_rows(
                &mut *tx,
                "INSERT INTO files (ns, path, kind, rev, size, content_hash, blocks, mtime,
                                    executable)",
                "ON CONFLICT (ns, path) DO UPDATE SET rev = excluded.rev, size = excluded.size,
                   content_hash = excluded.content_hash, blocks = excluded.blocks,
                   mtime = excluded.mtime, executable = excluded.executable",
                files,
            )
            .await?;
            sqlx::query("UPDATE namespaces SET head = ? WHERE id = ?")
                .bind(head)
                .bind(ns)
                .execute(&mut *tx)
                .await?;
        }
        if !referenced.is_empty() {
            let pairs = referenced
                .iter()
                .map(|h| vec![Param::Int(ns), Param::Text(h.to_string())])
                .collect();
            insert_rows(
                &mut *tx,
                "INSERT OR IGNORE INTO ns_blocks (ns, hash)",
                "",
                pairs,
            )
            .await?;
            let referenced = to_json(referenced)?;
            // Garbage collection spares blocks referenced after it began.
            sqlx::query(
                "UPDATE blocks SET last_ref = ? WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(now)
            .bind(&referenced)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn write_file(
        &self,
        ns: i64,
        actor: &Actor,
        req: &CommitRequest,
        op: Option<JournalOp>,
    ) -> StoreResult<(i64, i64)> {
        let mut tx = self.writer.begin(&self.pool).await?;
        let c = Self::write_file_in(&mut tx, ns, actor, req, op).await?;
        tx.commit().await?;
        Ok((c.rev, c.cursor))
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
        let mut tx = self.writer.begin(&self.pool).await?;
        let ns: i64 = sqlx::query_scalar(
            "INSERT INTO namespaces (kind, created_at) VALUES ('user', ?) RETURNING id",
        )
        .bind(now_secs())
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
        .bind(now_secs())
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
        let q = sqlx::query("UPDATE users SET password_hash = ? WHERE name = ?")
            .bind(password_hash)
            .bind(name);
        let done = self.writer.execute(&self.pool, q).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no user named {name:?}")));
        }
        Ok(())
    }

    async fn set_disabled(&self, name: &str, disabled: bool) -> StoreResult<()> {
        let mut tx = self.writer.begin(&self.pool).await?;
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
        let q = sqlx::query(
            "INSERT INTO tokens (token_hash, user_id, device, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(device)
        .bind(now_secs());
        self.writer.execute(&self.pool, q).await?;
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
    ) -> StoreResult<std::collections::HashMap<String, u64>> {
        let mut present = std::collections::HashMap::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json = to_json(batch)?;
            // A user's namespaces are its root for now; shared folders add their namespaces here.
            let rows: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(b.hash, b.size)) FROM blocks b
                 WHERE b.hash IN (SELECT value FROM json_each(?1))
                   AND (EXISTS (SELECT 1 FROM ns_blocks n WHERE n.hash = b.hash AND n.ns = ?2)
                        OR EXISTS (SELECT 1 FROM uploads u WHERE u.hash = b.hash AND u.user_id = ?3))",
            )
            .bind(json)
            .bind(user.root_ns)
            .bind(user.id)
            .fetch_one(&self.pool)
            .await?;
            present.extend(from_json::<Vec<(String, u64)>>(&rows)?);
        }
        Ok(present)
    }

    async fn existing_blocks(&self, hashes: &[String]) -> StoreResult<HashSet<String>> {
        let mut out = HashSet::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json = to_json(batch)?;
            let rows: String = sqlx::query_scalar(
                "SELECT json_group_array(hash) FROM blocks
                 WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(json)
            .fetch_one(&self.pool)
            .await?;
            out.extend(from_json::<Vec<String>>(&rows)?);
        }
        Ok(out)
    }

    async fn block_sizes(
        &self,
        hashes: &[String],
    ) -> StoreResult<std::collections::HashMap<String, u64>> {
        let mut out = std::collections::HashMap::new();
        for batch in hashes.chunks(MAX_MISSING_BATCH) {
            let json = to_json(batch)?;
            let rows: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(hash, size)) FROM blocks
                 WHERE hash IN (SELECT value FROM json_each(?))",
            )
            .bind(json)
            .fetch_one(&self.pool)
            .await?;
            out.extend(from_json::<Vec<(String, u64)>>(&rows)?);
        }
        Ok(out)
    }

    async fn record_blocks(&self, blocks: &[(String, u64)], user_id: i64) -> StoreResult<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        // In key order: rows keyed by block id land all over their indexes; in the order given
        // (by length) consecutive rows seldom share a page, sorted each page is met once.
        let mut blocks: Vec<&(String, u64)> = blocks.iter().collect();
        blocks.sort_unstable();
        let mut tx = self.writer.begin(&self.pool).await?;
        let rows = blocks
            .iter()
            .map(|(hash, size)| {
                vec![
                    Param::Text(hash.clone()),
                    Param::Int(*size as i64),
                    Param::Int(now),
                ]
            })
            .collect();
        insert_rows(
            &mut tx,
            "INSERT OR IGNORE INTO blocks (hash, size, created_at)",
            "",
            rows,
        )
        .await?;
        let rows = blocks
            .iter()
            .map(|(hash, _)| {
                vec![
                    Param::Int(user_id),
                    Param::Text(hash.clone()),
                    Param::Int(now),
                ]
            })
            .collect();
        insert_rows(
            &mut tx,
            "INSERT INTO uploads (user_id, hash, uploaded_at)",
            "ON CONFLICT (user_id, hash) DO UPDATE SET uploaded_at = excluded.uploaded_at",
            rows,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn commit_files(
        &self,
        ns: i64,
        actor: &Actor,
        reqs: &[CommitRequest],
    ) -> StoreResult<Vec<StoreResult<Committed>>> {
        // One transaction either way: the batch is durable (or refused for a database error)
        // as a whole.
        let mut tx = self.writer.begin(&self.pool).await?;
        let out = match Self::commit_fast_in(&mut tx, ns, actor, reqs).await? {
            Some(out) => out,
            None => Self::commit_each_in(&mut tx, ns, actor, reqs).await?,
        };
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
        let mut tx = self.writer.begin(&self.pool).await?;
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
        let mut tx = self.writer.begin(&self.pool).await?;
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
        let mut tx = self.writer.begin(&self.pool).await?;
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
        let mut tx = self.writer.begin(&self.pool).await?;
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
        // One JSON array built by SQLite rather than a row per entry (see `journal`).
        let listing: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(path, kind, rev, size, content_hash, mtime,
                      executable, blocks) ORDER BY path)
             FROM files WHERE ns = ? AND path >= ? AND path < ?",
        )
        .bind(ns)
        .bind(&lo)
        .bind(hi)
        .fetch_one(&mut *tx)
        .await?;
        #[derive(serde::Deserialize)]
        struct FileRow(String, String, i64, i64, Option<String>, i64, i64, String);
        let rows: Vec<FileRow> = serde_json::from_str(&listing)
            .map_err(|e| sqlx::Error::Decode(format!("listing: {e}").into()))?;
        let mut entries = Vec::with_capacity(rows.len());
        for FileRow(path, kind, rev, size, content_hash, mtime, executable, blocks) in rows {
            if recursive || !path[lo.len()..].contains('/') {
                entries.push(Entry {
                    path,
                    kind: kind_from(&kind)?,
                    rev,
                    size: size as u64,
                    content_hash,
                    mtime,
                    executable: executable != 0,
                    blocks: split_blocks(&blocks),
                });
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
        // The page is built by SQLite as one JSON array: one value crosses from sqlx's worker
        // thread instead of one row per entry (most of the cost of a long page).
        let page: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(j.id, j.op, j.path, j.old_path, j.kind, j.size,
                      j.content_hash, j.blocks, j.mtime, j.executable, u.name, j.device,
                      j.created_at) ORDER BY j.id)
             FROM (SELECT * FROM journal WHERE ns = ? AND id > ? ORDER BY id LIMIT ?) j
             JOIN users u ON u.id = j.user_id",
        )
        .bind(ns)
        .bind(cursor)
        .bind(limit as i64 + 1)
        .fetch_one(&self.pool)
        .await?;
        let rows: Vec<JournalRow> = serde_json::from_str(&page)
            .map_err(|e| sqlx::Error::Decode(format!("journal page: {e}").into()))?;
        let has_more = rows.len() > limit as usize;
        let mut entries = Vec::with_capacity(rows.len().min(limit as usize));
        for r in rows.into_iter().take(limit as usize) {
            entries.push(r.into_entry()?);
        }
        let new_cursor = match entries.last() {
            Some(e) => e.id,
            None => cursor.max(0).min(self.head(ns).await?),
        };
        Ok((entries, new_cursor, has_more))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model_test::Rng;

    type Outcomes = Vec<StoreResult<Committed>>;

    async fn store(dir: &tempfile::TempDir, name: &str) -> (SqliteStore, i64, Actor) {
        let store = SqliteStore::open(&dir.path().join(name)).await.unwrap();
        let user = store.create_user("u", "x", None).await.unwrap();
        let actor = Actor {
            user_id: user.id,
            device: Some("laptop".into()),
        };
        (store, user.root_ns, actor)
    }

    /// Blocks the server holds (id, size), and ids it does not.
    fn block_pool() -> (Vec<(String, u64)>, Vec<String>) {
        let held = (0..8u64)
            .map(|i| (protocol::block_hash(&i.to_be_bytes()), 10 + i * 7))
            .collect();
        let phantoms = (0..3u64)
            .map(|i| protocol::block_hash(format!("phantom {i}").as_bytes()))
            .collect();
        (held, phantoms)
    }

    fn request(
        path: &str,
        blocks: Vec<String>,
        size: u64,
        parent_rev: Option<i64>,
    ) -> CommitRequest {
        CommitRequest {
            path: path.to_string(),
            parent_rev,
            content_hash: protocol::content_hash(&blocks),
            blocks,
            size,
            mtime: 1_700_000_000_000,
            executable: false,
        }
    }

    async fn fast(store: &SqliteStore, ns: i64, actor: &Actor, reqs: &[CommitRequest]) -> Outcomes {
        let mut tx = store.pool.begin().await.unwrap();
        let out = SqliteStore::commit_fast_in(&mut tx, ns, actor, reqs)
            .await
            .unwrap()
            .expect("the batched path takes this batch");
        tx.commit().await.unwrap();
        out
    }

    async fn each(store: &SqliteStore, ns: i64, actor: &Actor, reqs: &[CommitRequest]) -> Outcomes {
        let mut tx = store.pool.begin().await.unwrap();
        let out = SqliteStore::commit_each_in(&mut tx, ns, actor, reqs)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        out
    }

    /// Everything a commit writes, as text: the tree, the journal (without its clock), the
    /// namespace heads, which blocks namespaces reference and which blocks were ever referenced.
    async fn snapshot(store: &SqliteStore) -> BTreeMap<&'static str, Vec<String>> {
        let queries = [
            (
                "files",
                "SELECT json_array(ns, path, kind, rev, size, content_hash, blocks, mtime,
                                   executable)
                 FROM files ORDER BY ns, path",
            ),
            (
                "journal",
                "SELECT json_array(ns, id, op, path, old_path, kind, size, content_hash, blocks,
                                   mtime, executable, user_id, device)
                 FROM journal ORDER BY ns, id",
            ),
            (
                "namespaces",
                "SELECT json_array(id, head) FROM namespaces ORDER BY id",
            ),
            (
                "ns_blocks",
                "SELECT json_array(ns, hash) FROM ns_blocks ORDER BY ns, hash",
            ),
            (
                "blocks",
                "SELECT json_array(hash, size, last_ref > 0) FROM blocks ORDER BY hash",
            ),
        ];
        let mut out = BTreeMap::new();
        for (name, sql) in queries {
            let rows: Vec<String> = sqlx::query_scalar(sql)
                .fetch_all(&store.pool)
                .await
                .unwrap();
            out.insert(name, rows);
        }
        out
    }

    fn random_path(rng: &mut Rng) -> String {
        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        let depth = 1 + rng.below(3);
        (0..depth)
            .map(|_| NAMES[rng.below(NAMES.len())])
            .collect::<Vec<_>>()
            .join("/")
    }

    fn random_blocks(rng: &mut Rng, held: &[(String, u64)]) -> (Vec<String>, u64) {
        let n = rng.below(4);
        let picked: Vec<&(String, u64)> = (0..n).map(|_| &held[rng.below(held.len())]).collect();
        (
            picked.iter().map(|(h, _)| h.clone()).collect(),
            picked.iter().map(|(_, s)| s).sum(),
        )
    }

    /// A parent revision that is right most of the time, and otherwise stale in one of the
    /// ways a client gets it wrong.
    fn parent_rev(rng: &mut Rng, right: Option<i64>) -> Option<i64> {
        if rng.chance(70) {
            return right;
        }
        match rng.below(3) {
            0 => None,
            1 => Some(right.unwrap_or(1).saturating_sub(1)),
            _ => Some(right.unwrap_or(0) + 1000),
        }
    }

    /// One random batch against `tree`. Requests that may change the tree never share a path
    /// or lie on each other's paths (that is the fallback rule); requests refused whatever the
    /// tree (bad hash, missing blocks, wrong size, the root) may land anywhere.
    fn random_batch(
        rng: &mut Rng,
        tree: &[Entry],
        held: &[(String, u64)],
        phantoms: &[String],
    ) -> Vec<CommitRequest> {
        let files: Vec<&Entry> = tree.iter().filter(|e| e.kind == EntryKind::File).collect();
        let dirs: Vec<&Entry> = tree.iter().filter(|e| e.kind == EntryKind::Dir).collect();
        let rev_at = |path: &str| tree.iter().find(|e| e.path == path).map(|e| e.rev);
        let mut taken: Vec<String> = Vec::new();
        let mut out = Vec::new();
        let len = 1 + rng.below(40);
        while out.len() < len {
            let mut refused_anyway = false;
            let req = match rng.below(12) {
                // New files in nested folders, or whatever is there.
                0..=3 => {
                    let path = random_path(rng);
                    let (blocks, size) = random_blocks(rng, held);
                    let rev = parent_rev(rng, rev_at(&path));
                    request(&path, blocks, size, rev)
                }
                // Modifications, with the right parent revision or not.
                4 | 5 if !files.is_empty() => {
                    let f = files[rng.below(files.len())];
                    let (blocks, size) = random_blocks(rng, held);
                    let mut req = request(&f.path, blocks, size, parent_rev(rng, Some(f.rev)));
                    req.executable = rng.chance(30);
                    req
                }
                // What the server already has, whatever the parent revision.
                6 if !files.is_empty() => {
                    let f = files[rng.below(files.len())];
                    let mut req = request(&f.path, f.blocks.clone(), f.size, parent_rev(rng, None));
                    req.executable = f.executable;
                    req
                }
                // Only the executable bit changes.
                7 if !files.is_empty() => {
                    let f = files[rng.below(files.len())];
                    let mut req = request(
                        &f.path,
                        f.blocks.clone(),
                        f.size,
                        parent_rev(rng, Some(f.rev)),
                    );
                    req.executable = !f.executable;
                    req
                }
                // Blocks the server does not hold, some named twice.
                8 => {
                    refused_anyway = true;
                    let (mut blocks, mut size) = random_blocks(rng, held);
                    let phantom = phantoms[rng.below(phantoms.len())].clone();
                    blocks.insert(rng.below(blocks.len() + 1), phantom.clone());
                    if rng.chance(50) {
                        blocks.push(phantom);
                    }
                    size += 5;
                    request(&random_path(rng), blocks, size, None)
                }
                // A size that is not the blocks' total.
                9 => {
                    refused_anyway = true;
                    let (blocks, size) = random_blocks(rng, held);
                    request(&random_path(rng), blocks, size + 1, None)
                }
                // A content hash that is not the block list's, or the root.
                10 => {
                    refused_anyway = true;
                    let (blocks, size) = random_blocks(rng, held);
                    let path = if rng.chance(50) {
                        String::new()
                    } else {
                        random_path(rng)
                    };
                    let mut req = request(&path, blocks, size, None);
                    if !req.path.is_empty() {
                        req.content_hash = protocol::content_hash(&[phantoms[0].as_str()]);
                    }
                    req
                }
                // A file where a folder is, or below a file.
                _ => {
                    let (blocks, size) = random_blocks(rng, held);
                    let path = if !dirs.is_empty() && rng.chance(50) {
                        dirs[rng.below(dirs.len())].path.clone()
                    } else if !files.is_empty() {
                        format!("{}/{}", files[rng.below(files.len())].path, "z")
                    } else {
                        random_path(rng)
                    };
                    request(&path, blocks, size, None)
                }
            };
            if !refused_anyway {
                let p = req.path.as_str();
                let clashes = taken.iter().any(|t| {
                    t == p || p.starts_with(&format!("{t}/")) || t.starts_with(&format!("{p}/"))
                });
                if clashes {
                    continue;
                }
                taken.push(req.path.clone());
            }
            out.push(req);
        }
        out
    }

    /// Which kind of outcome, so the test can check it saw every kind.
    fn outcome_kind(o: &StoreResult<Committed>) -> &'static str {
        match o {
            Ok(c) if c.written && c.dirs.is_empty() => "new version",
            Ok(c) if c.written => "new version and folders",
            Ok(_) => "already there",
            Err(StoreError::Conflict { .. }) => "conflict",
            Err(StoreError::PathConflict(m)) if m.contains("is a folder") => "folder there",
            Err(StoreError::PathConflict(_)) => "file above",
            Err(StoreError::MissingBlocks(_)) => "missing blocks",
            Err(StoreError::Invalid(m)) if m.starts_with("size") => "size",
            Err(StoreError::Invalid(m)) if m.starts_with("content_hash") => "content hash",
            Err(StoreError::Invalid(_)) => "root",
            Err(_) => "other",
        }
    }

    /// The batched path against the per-file one, on the same random batches: the same answer
    /// for every request and the same tables after every batch.
    #[tokio::test]
    async fn batched_commits_match_commits_one_by_one() {
        let (held, phantoms) = block_pool();
        let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
        for seed in 0..24 {
            let dir = tempfile::tempdir().unwrap();
            let (batched, ns, actor) = store(&dir, "batched.db").await;
            let (one_by_one, ns2, actor2) = store(&dir, "one_by_one.db").await;
            assert_eq!((ns, actor.user_id), (ns2, actor2.user_id));
            for s in [&batched, &one_by_one] {
                s.record_blocks(&held, actor.user_id).await.unwrap();
            }
            let mut rng = Rng::new(seed);
            for step in 0..10 {
                let (tree, _) = batched.list(ns, "", true).await.unwrap();
                let reqs = random_batch(&mut rng, &tree, &held, &phantoms);
                let got = fast(&batched, ns, &actor, &reqs).await;
                let want = each(&one_by_one, ns, &actor, &reqs).await;
                assert_eq!(got.len(), reqs.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        format!("{g:?}"),
                        format!("{w:?}"),
                        "seed {seed} step {step} request {i}: {:?}",
                        reqs[i]
                    );
                    *seen.entry(outcome_kind(w)).or_default() += 1;
                    // The rows a commit reports as its own are in the journal as it says:
                    // its folders top-down, then the file (clients rely on it; see
                    // `Committed`).
                    if let Some(c) = g.as_ref().ok().filter(|c| c.written) {
                        let n = c.dirs.len() as i64;
                        let (rows, _, _) = batched.journal(ns, c.rev - n - 1, 100).await.unwrap();
                        let mine: Vec<(i64, &str)> = rows
                            .iter()
                            .take(c.dirs.len() + 1)
                            .map(|r| (r.id, r.path.as_str()))
                            .collect();
                        let mut want: Vec<(i64, &str)> = (c.rev - n..)
                            .zip(c.dirs.iter().map(String::as_str))
                            .collect();
                        want.push((c.rev, reqs[i].path.as_str()));
                        assert_eq!(mine, want, "seed {seed} step {step} request {i}");
                    }
                }
                assert_eq!(
                    snapshot(&batched).await,
                    snapshot(&one_by_one).await,
                    "seed {seed} step {step}"
                );
            }
        }
        for kind in [
            "new version",
            "new version and folders",
            "already there",
            "conflict",
            "folder there",
            "file above",
            "missing blocks",
            "size",
            "content hash",
            "root",
        ] {
            assert!(seen.contains_key(kind), "no {kind:?} outcome in {seen:?}");
        }
    }

    /// Batches whose requests depend on each other go one by one, with the same outcome as
    /// the per-file path, through `commit_files` itself.
    #[tokio::test]
    async fn batches_with_interplay_fall_back_to_one_by_one() {
        let (held, _) = block_pool();
        let dir = tempfile::tempdir().unwrap();
        let (batched, ns, actor) = store(&dir, "batched.db").await;
        let (one_by_one, _, _) = store(&dir, "one_by_one.db").await;
        for s in [&batched, &one_by_one] {
            s.record_blocks(&held, actor.user_id).await.unwrap();
        }
        let (b0, s0) = (vec![held[0].0.clone()], held[0].1);
        let (b1, s1) = (vec![held[1].0.clone()], held[1].1);
        let batches = [
            // The same path twice: the second builds on the first (dir "d" is revision 1).
            vec![
                request("d/f", b0.clone(), s0, None),
                request("d/f", b1.clone(), s1, Some(2)),
            ],
            // A file, then a file below it.
            vec![
                request("p", b0.clone(), s0, None),
                request("p/q", b1.clone(), s1, None),
            ],
            // A file below, then a file where its folder is.
            vec![
                request("r/s", b0.clone(), s0, None),
                request("r", b1.clone(), s1, None),
            ],
            // A NUL in a path.
            vec![request("n\0ul", b0.clone(), s0, None)],
        ];
        for reqs in &batches {
            let head = batched.head(ns).await.unwrap();
            let mut tx = batched.pool.begin().await.unwrap();
            let taken = SqliteStore::commit_fast_in(&mut tx, ns, &actor, reqs)
                .await
                .unwrap();
            assert!(taken.is_none(), "{reqs:?}");
            tx.commit().await.unwrap();
            assert_eq!(batched.head(ns).await.unwrap(), head, "nothing written");

            let got = batched.commit_files(ns, &actor, reqs).await.unwrap();
            let want = each(&one_by_one, ns, &actor, reqs).await;
            assert_eq!(format!("{got:?}"), format!("{want:?}"));
            assert_eq!(snapshot(&batched).await, snapshot(&one_by_one).await);
        }
        let (entries, head) = batched.list(ns, "", true).await.unwrap();
        let tree: Vec<(&str, EntryKind, i64)> = entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.rev))
            .collect();
        assert_eq!(
            tree,
            [
                ("d", EntryKind::Dir, 1),
                ("d/f", EntryKind::File, 3),
                ("n\0ul", EntryKind::File, 7),
                ("p", EntryKind::File, 4),
                ("r", EntryKind::Dir, 5),
                ("r/s", EntryKind::File, 6),
            ]
        );
        assert_eq!(head, 7);
    }

    /// A database error refuses the whole batch: nothing of it is written.
    #[tokio::test]
    async fn a_database_error_refuses_the_whole_batch() {
        let (held, _) = block_pool();
        let dir = tempfile::tempdir().unwrap();
        let (store, ns, actor) = store(&dir, "meta.db").await;
        store.record_blocks(&held, actor.user_id).await.unwrap();
        let before = snapshot(&store).await;
        // A failure only the database knows of, met by the batch's last journal row.
        sqlx::query(
            "CREATE TRIGGER boom BEFORE INSERT ON journal WHEN NEW.path = 'x/boom'
             BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let reqs = [
            request("x/ok", vec![held[0].0.clone()], held[0].1, None),
            request("x/boom", vec![held[1].0.clone()], held[1].1, None),
        ];
        match store.commit_files(ns, &actor, &reqs).await {
            Err(StoreError::Db(_)) => {}
            other => panic!("expected a database error, got {other:?}"),
        }
        assert_eq!(snapshot(&store).await, before);
    }

    /// A block recorded again keeps its first row; the upload's time moves on, also for an id
    /// named twice in one call.
    #[tokio::test]
    async fn record_blocks_keeps_blocks_and_refreshes_uploads() {
        let (held, _) = block_pool();
        let dir = tempfile::tempdir().unwrap();
        let (store, _, actor) = store(&dir, "meta.db").await;
        let (h0, h1) = (held[0].0.clone(), held[1].0.clone());
        let batch = [(h0.clone(), 5), (h0.clone(), 5), (h1.clone(), 7)];
        store.record_blocks(&batch, actor.user_id).await.unwrap();
        sqlx::query("UPDATE blocks SET created_at = 1")
            .execute(&store.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE uploads SET uploaded_at = 1")
            .execute(&store.pool)
            .await
            .unwrap();
        store
            .record_blocks(&[(h0.clone(), 5)], actor.user_id)
            .await
            .unwrap();
        let blocks: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT hash, size, created_at FROM blocks ORDER BY hash")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        let mut want = vec![(h0.clone(), 5, 1), (h1.clone(), 7, 1)];
        want.sort();
        assert_eq!(blocks, want);
        let uploads: Vec<(i64, String, bool)> =
            sqlx::query_as("SELECT user_id, hash, uploaded_at > 1 FROM uploads ORDER BY hash")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        let mut want = vec![(actor.user_id, h0, true), (actor.user_id, h1, false)];
        want.sort();
        assert_eq!(uploads, want);
    }
}
