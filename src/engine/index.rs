//! The client index (`.dbx/index.db`): per path, what was last synced (stat, content hash,
//! block list, server revision), and per namespace the journal cursor and server epoch.
//!
//! It is the "synced" tree of the three the planner compares. It may lag the files (a crash
//! between a rename and the index write): that is safe, because a local file whose content
//! equals the remote one is recorded, never re-transferred nor treated as a conflict.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use sqlx::{Row, SqlitePool};

use crate::sqlite::{insert_rows, Param};

use super::chunker::Fingerprint;
use super::scanner::LocalEntry;
use crate::protocol::{Entry, EntryKind};

const MIGRATIONS: &[crate::sqlite::EmbeddedMigration] = &[
    (
        1,
        "index",
        include_str!("../../migrations/client/0001_index.sql"),
    ),
    (
        2,
        "remote",
        include_str!("../../migrations/client/0002_remote.sql"),
    ),
    (
        3,
        "fingerprints",
        include_str!("../../migrations/client/0003_fingerprints.sql"),
    ),
    (
        4,
        "settled",
        include_str!("../../migrations/client/0004_settled.sql"),
    ),
];

/// Index writes are grouped into transactions of this many rows.
const WRITE_BATCH: usize = 5000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncedEntry {
    pub ns: i64,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
    pub executable: bool,
    pub content_hash: Option<String>,
    pub blocks: Vec<String>,
    /// The length of each block, when known (empty otherwise).
    pub block_lens: Vec<u32>,
    /// The fingerprint of each block, when known (empty otherwise; see `chunker::Fingerprint`).
    pub block_fps: Vec<Fingerprint>,
    pub rev: i64,
}

pub type SyncedTree = BTreeMap<String, SyncedEntry>;

/// One change to the index.
#[derive(Clone, Debug)]
pub enum IndexOp {
    Put(String, SyncedEntry),
    Remove(String),
}

/// One change to the stored remote tree.
#[derive(Clone, Debug)]
pub enum RemoteOp {
    /// Forget the whole stored remote tree of the namespace (before a full listing).
    Clear,
    Put(String, Entry),
    Remove(String),
}

/// Rows per page when the index is read whole (see `Index::load_pages`).
const LOAD_PAGE: i64 = 10_000;

fn parse_kind(kind: &str) -> Result<EntryKind, sqlx::Error> {
    EntryKind::parse(kind)
        .ok_or_else(|| sqlx::Error::Decode(format!("bad kind {kind:?} in the index").into()))
}

/// Forgets every settled direction: the index or the stored remote tree is about to change.
async fn unsettle(tx: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM settled").execute(&mut *tx).await?;
    Ok(())
}

fn json_error(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Encode(Box::new(e))
}

fn join_display<T: ToString>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn split_list(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_string).collect()
    }
}

pub struct Index {
    pool: SqlitePool,
}

impl Index {
    pub async fn open(path: &Path, create: bool) -> Result<Index, sqlx::Error> {
        let pool = crate::sqlite::open(
            path,
            create,
            MIGRATIONS,
            1,
            crate::sqlite::Durability::Normal,
        )
        .await?;
        Ok(Index { pool })
    }

    pub async fn load(&self) -> Result<SyncedTree, sqlx::Error> {
        /// One `entries` row, as the JSON array `load_pages` makes of it (fields in order).
        #[derive(serde::Deserialize)]
        struct Row {
            path: String,
            ns: i64,
            kind: String,
            size: i64,
            mtime_ns: i64,
            inode: i64,
            executable: i64,
            content_hash: Option<String>,
            blocks: String,
            block_lens: String,
            block_fps: String,
            rev: i64,
        }
        let rows: Vec<Row> = self
            .load_pages(
                "json_array(path, ns, kind, size, mtime_ns, inode, executable, content_hash,
                            blocks, block_lens, block_fps, rev)",
                "entries",
                None,
            )
            .await?;
        let mut tree = SyncedTree::new();
        for r in rows {
            tree.insert(
                r.path,
                SyncedEntry {
                    ns: r.ns,
                    kind: parse_kind(&r.kind)?,
                    size: r.size as u64,
                    mtime_ns: r.mtime_ns,
                    inode: r.inode as u64,
                    executable: r.executable != 0,
                    content_hash: r.content_hash,
                    blocks: split_list(&r.blocks),
                    block_lens: r
                        .block_lens
                        .split(',')
                        .filter_map(|l| l.parse().ok())
                        .collect(),
                    block_fps: r
                        .block_fps
                        .split(',')
                        .filter_map(|f| Fingerprint::from_str_radix(f, 16).ok())
                        .collect(),
                    rev: r.rev,
                },
            );
        }
        Ok(tree)
    }

    /// Every row of `table` (optionally of one namespace), as `row_json` makes it, in pages of
    /// [`LOAD_PAGE`] rows: SQLite builds each page as one JSON array, so one value per page
    /// crosses from sqlx's worker thread instead of one row per entry (that per-row hand-off
    /// was most of a no-op sync over 20,000 files). Memory stays bounded by the page. `NOT
    /// INDEXED`: pages walk the rowid order; through the `(ns, path)` index SQLite would sort
    /// the whole namespace again for every page (twice the time).
    async fn load_pages<T: serde::de::DeserializeOwned>(
        &self,
        row_json: &str,
        table: &str,
        ns: Option<i64>,
    ) -> Result<Vec<T>, sqlx::Error> {
        let filter = if ns.is_some() { "AND ns = ?" } else { "" };
        let sql = format!(
            "SELECT max(rowid), json_group_array({row_json})
             FROM (SELECT rowid, * FROM {table} NOT INDEXED
                   WHERE rowid > ? {filter} ORDER BY rowid LIMIT ?)"
        );
        let mut out = Vec::new();
        let mut after = i64::MIN;
        loop {
            let mut q = sqlx::query_as::<_, (Option<i64>, String)>(&sql).bind(after);
            if let Some(ns) = ns {
                q = q.bind(ns);
            }
            let (last, page) = q.bind(LOAD_PAGE).fetch_one(&self.pool).await?;
            let Some(last) = last else {
                return Ok(out);
            };
            let rows: Vec<T> = serde_json::from_str(&page)
                .map_err(|e| sqlx::Error::Decode(format!("index page: {e}").into()))?;
            out.extend(rows);
            after = last;
        }
    }

    /// Applies `ops` in order, in transactions of [`WRITE_BATCH`] rows. Consecutive puts (or
    /// removes) go in one statement over a JSON array: one hand-off to sqlx's worker thread per
    /// run of ops instead of one per row.
    pub async fn apply(&self, ops: &[IndexOp]) -> Result<(), sqlx::Error> {
        for batch in ops.chunks(WRITE_BATCH) {
            let mut tx = self.pool.begin().await?;
            unsettle(&mut tx).await?;
            for run in batch
                .chunk_by(|a, b| matches!(a, IndexOp::Put(..)) == matches!(b, IndexOp::Put(..)))
            {
                let mut rows = Vec::with_capacity(run.len());
                let mut removed = Vec::new();
                for op in run {
                    match op {
                        IndexOp::Put(path, e) => rows.push(vec![
                            Param::Text(path.clone()),
                            Param::Int(e.ns),
                            Param::Text(e.kind.as_str().into()),
                            Param::Int(e.size as i64),
                            Param::Int(e.mtime_ns),
                            Param::Int(e.inode as i64),
                            Param::Int(e.executable as i64),
                            e.content_hash.clone().map_or(Param::Null, Param::Text),
                            Param::Text(e.blocks.join(",")),
                            Param::Text(join_display(&e.block_lens)),
                            Param::Text(
                                e.block_fps
                                    .iter()
                                    .map(|f| format!("{f:032x}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ),
                            Param::Int(e.rev),
                        ]),
                        IndexOp::Remove(path) => removed.push(path),
                    }
                }
                insert_rows(
                    &mut tx,
                    "INSERT OR REPLACE INTO entries (path, ns, kind, size, mtime_ns, inode, executable, content_hash,
                       blocks, block_lens, block_fps, rev)",
                    "",
                    rows,
                )
                .await?;
                if !removed.is_empty() {
                    sqlx::query(
                        "DELETE FROM entries WHERE path IN (SELECT value FROM json_each(?))",
                    )
                    .bind(serde_json::to_string(&removed).map_err(json_error)?)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// The journal cursor and server epoch last recorded for `ns`.
    pub async fn cursor(&self, ns: i64) -> Result<Option<(i64, String)>, sqlx::Error> {
        let row = sqlx::query("SELECT cursor, epoch FROM cursors WHERE ns = ?")
            .bind(ns)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("cursor")?, r.try_get("epoch")?)))
            .transpose()
    }

    /// The stored remote tree of `ns`, keyed by path relative to the folder.
    pub async fn load_remote(&self, ns: i64) -> Result<BTreeMap<String, Entry>, sqlx::Error> {
        type Row = (String, String, i64, i64, Option<String>, i64, i64, String);
        let rows: Vec<Row> = self
            .load_pages(
                "json_array(path, kind, rev, size, content_hash, mtime, executable, blocks)",
                "remote_entries",
                Some(ns),
            )
            .await?;
        let mut tree = BTreeMap::new();
        for (path, kind, rev, size, content_hash, mtime, executable, blocks) in rows {
            let entry = Entry {
                path: path.clone(),
                kind: parse_kind(&kind)?,
                rev,
                size: size as u64,
                content_hash,
                mtime,
                executable: executable != 0,
                blocks: split_list(&blocks),
            };
            tree.insert(path, entry);
        }
        Ok(tree)
    }

    /// Applies changes to the stored remote tree and records the cursor they bring it to, in
    /// one transaction: the stored tree and its cursor always agree.
    pub async fn save_remote(
        &self,
        ns: i64,
        ops: &[RemoteOp],
        cursor: i64,
        epoch: &str,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        unsettle(&mut tx).await?;
        // Runs of consecutive puts (or removes) in one statement each, in order.
        for run in ops.chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b)) {
            match &run[0] {
                RemoteOp::Clear => {
                    sqlx::query("DELETE FROM remote_entries WHERE ns = ?")
                        .bind(ns)
                        .execute(&mut *tx)
                        .await?;
                }
                RemoteOp::Remove(_) => {
                    let paths: Vec<&String> = run
                        .iter()
                        .filter_map(|op| match op {
                            RemoteOp::Remove(p) => Some(p),
                            _ => None,
                        })
                        .collect();
                    sqlx::query(
                        "DELETE FROM remote_entries
                         WHERE ns = ? AND path IN (SELECT value FROM json_each(?))",
                    )
                    .bind(ns)
                    .bind(serde_json::to_string(&paths).map_err(json_error)?)
                    .execute(&mut *tx)
                    .await?;
                }
                RemoteOp::Put(..) => {
                    let rows = run
                        .iter()
                        .filter_map(|op| match op {
                            RemoteOp::Put(path, e) => Some(vec![
                                Param::Int(ns),
                                Param::Text(path.clone()),
                                Param::Text(e.kind.as_str().into()),
                                Param::Int(e.rev),
                                Param::Int(e.size as i64),
                                e.content_hash.clone().map_or(Param::Null, Param::Text),
                                Param::Text(e.blocks.join(",")),
                                Param::Int(e.mtime),
                                Param::Int(e.executable as i64),
                            ]),
                            _ => None,
                        })
                        .collect();
                    insert_rows(
                        &mut tx,
                        "INSERT OR REPLACE INTO remote_entries (ns, path, kind, rev, size,
                           content_hash, blocks, mtime, executable)",
                        "",
                        rows,
                    )
                    .await?;
                }
            }
        }
        sqlx::query("INSERT OR REPLACE INTO cursors (ns, cursor, epoch) VALUES (?, ?, ?)")
            .bind(ns)
            .bind(cursor)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Forgets every entry (the server's metadata was replaced: its revisions mean nothing now).
    pub async fn clear(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        unsettle(&mut tx).await?;
        for table in ["entries", "remote_entries", "cursors"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Records that a run in `direction` with the folder's remote root `remote_root` would
    /// plan nothing, given the index and the stored remote tree as they are now (the caller
    /// checked it). Any later write to either deletes the record.
    pub async fn settle(&self, direction: &str, remote_root: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT OR REPLACE INTO settled (direction, remote_root) VALUES (?, ?)")
            .bind(direction)
            .bind(remote_root)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets every settled direction (tests use it to check what a full run would do).
    #[cfg(test)]
    pub async fn unsettle(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        unsettle(&mut conn).await
    }

    /// Whether a run in `direction` with this remote root is settled (see [`Index::settle`]).
    pub async fn is_settled(
        &self,
        direction: &str,
        remote_root: &str,
    ) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM settled WHERE direction = ? AND remote_root = ?",
        )
        .bind(direction)
        .bind(remote_root)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// The stat of every entry (no content hashes or block lists: a fraction of [`Index::load`]).
    pub async fn load_stats(&self) -> Result<HashMap<String, LocalEntry>, sqlx::Error> {
        type Row = (String, String, i64, i64, i64, i64);
        let rows: Vec<Row> = self
            .load_pages(
                "json_array(path, kind, size, mtime_ns, inode, executable)",
                "entries",
                None,
            )
            .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for (path, kind, size, mtime_ns, inode, executable) in rows {
            let stat = LocalEntry {
                kind: parse_kind(&kind)?,
                size: size as u64,
                mtime_ns,
                inode: inode as u64,
                executable: executable != 0,
            };
            out.insert(path, stat);
        }
        Ok(out)
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn index_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index.db"), true)
            .await
            .unwrap();
        let e = SyncedEntry {
            ns: 1,
            kind: EntryKind::File,
            size: 3,
            mtime_ns: 1_700_000_000_123_456_789,
            inode: 42,
            executable: true,
            content_hash: Some("ab".into()),
            blocks: vec!["x".into(), "y".into()],
            block_lens: vec![1, 2],
            block_fps: vec![u128::MAX, 5],
            rev: 7,
        };
        idx.apply(&[
            IndexOp::Put("a/b".into(), e.clone()),
            IndexOp::Put("gone".into(), e.clone()),
            IndexOp::Remove("gone".into()),
            IndexOp::Put("back".into(), e.clone()),
            IndexOp::Remove("back".into()),
            IndexOp::Put(
                "back".into(),
                SyncedEntry {
                    rev: 8,
                    ..e.clone()
                },
            ),
            IndexOp::Put(
                "back".into(),
                SyncedEntry {
                    rev: 9,
                    ..e.clone()
                },
            ),
        ])
        .await
        .unwrap();
        let tree = idx.load().await.unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree["back"].rev, 9, "ops apply in order");
        assert_eq!(tree["a/b"], e);
        assert_eq!(idx.cursor(1).await.unwrap(), None);
        idx.save_remote(1, &[], 9, "ep").await.unwrap();
        assert_eq!(idx.cursor(1).await.unwrap(), Some((9, "ep".to_string())));

        let r = |rev| Entry {
            path: "x".into(),
            kind: EntryKind::File,
            rev,
            size: 1,
            content_hash: None,
            mtime: 0,
            executable: false,
            blocks: vec![],
        };
        let ops = [
            RemoteOp::Put("x".into(), r(1)),
            RemoteOp::Put("y".into(), r(1)),
            RemoteOp::Clear,
            RemoteOp::Put("x".into(), r(2)),
            RemoteOp::Remove("x".into()),
            RemoteOp::Put("x".into(), r(3)),
            RemoteOp::Put("z".into(), r(4)),
            RemoteOp::Remove("z".into()),
        ];
        idx.save_remote(1, &ops, 10, "ep").await.unwrap();
        let remote = idx.load_remote(1).await.unwrap();
        assert_eq!(remote.keys().collect::<Vec<_>>(), ["x"]);
        assert_eq!(remote["x"], r(3));
    }

    /// More rows than a load page, with awkward names: every row comes back exactly once.
    #[tokio::test]
    async fn loads_span_pages() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index.db"), true)
            .await
            .unwrap();
        let n = 2 * LOAD_PAGE as usize + 3;
        let name = |i: usize| format!("d{}/\"quoted\" ünï\tcode {i}", i % 7);
        let mut ops = Vec::new();
        let mut remote = Vec::new();
        for i in 0..n {
            let e = SyncedEntry {
                ns: 1,
                kind: if i % 10 == 0 {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                },
                size: i as u64,
                mtime_ns: 1_700_000_000_123_456_789 + i as i64,
                inode: u64::MAX / 2 + i as u64,
                executable: i % 3 == 0,
                content_hash: (i % 10 != 0).then(|| format!("h{i}")),
                blocks: vec![format!("b{i}"); i % 3],
                block_lens: vec![i as u32; i % 3],
                block_fps: vec![i as u128 * 0x1234_5678_9abc_def0; i % 3],
                rev: i as i64,
            };
            ops.push(IndexOp::Put(name(i), e));
            let r = Entry {
                path: name(i),
                kind: EntryKind::File,
                rev: i as i64,
                size: i as u64,
                content_hash: Some(format!("h{i}")),
                mtime: 1_700_000_000_000 + i as i64,
                executable: i % 2 == 0,
                blocks: vec![format!("b{i}"); i % 4],
            };
            remote.push(RemoteOp::Put(name(i), r));
        }
        idx.apply(&ops).await.unwrap();
        idx.save_remote(1, &remote, 5, "ep").await.unwrap();
        idx.save_remote(2, &remote[..5], 5, "ep").await.unwrap();
        let tree = idx.load().await.unwrap();
        let want: SyncedTree = ops
            .into_iter()
            .map(|op| match op {
                IndexOp::Put(p, e) => (p, e),
                IndexOp::Remove(_) => unreachable!(),
            })
            .collect();
        assert_eq!(tree, want);
        let rtree = idx.load_remote(1).await.unwrap();
        assert_eq!(rtree.len(), n);
        for op in &remote {
            let RemoteOp::Put(p, e) = op else {
                unreachable!()
            };
            assert_eq!(&rtree[p], e);
        }
        assert_eq!(idx.load_remote(2).await.unwrap().len(), 5);
    }
}
