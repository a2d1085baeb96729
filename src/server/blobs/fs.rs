//! The filesystem `BlobStore`, under the data directory's `blocks/`.
//!
//! - A block of [`PACK_BELOW`] bytes or more (a chunk of a big file) is a file of its own,
//!   `blocks/ab/abcdef…`.
//! - Smaller blocks (small files, and the tails of big ones) are packed: the small blocks of one
//!   `put_many` are one pack file, `blocks/packs/<id>.pack`, and the SQLite index
//!   `blocks/packs.db` says where each lies. 20,000 small files cost a few dozen files created
//!   instead of 20,000 creates, renames and directory updates. A pack is a run of records, each a
//!   [`HEADER`]-byte header (`dbxP`, the block's hash in hex, its length as u32 LE) and then its
//!   bytes, so a pack can be read without its index: a lost `packs.db` is rebuilt from the packs
//!   when the store opens.
//!
//! Durability, in `put_many`: block files are written to `tmp/`; the pack is written to `tmp/`
//! and linked into `packs/` (nothing refers to it until its index rows are committed); one
//! `syncfs` makes all of it durable; block files are renamed into place and a second `syncfs`
//! makes their names durable; then the pack's index rows are committed (`synchronous=FULL`).
//! Only then does `put_many` return. A crash before that commit leaves a pack nothing refers
//! to, which [`FsBlobStore::compact`] deletes. Writing a block that is held is harmless, so
//! retries are safe.
//!
//! Packs are never modified. Deleting a packed block deletes its index row; `compact` (run by
//! `dbx admin gc`) rewrites the packs that are at least a quarter dead and deletes those that
//! are all dead. A pack is locked (`flock`) by the process writing it until its rows are
//! committed, and by compaction while it rewrites it, so `dbx serve` and `dbx admin gc` can run
//! at once; a reader that finds a pack gone (compacted under it) looks its blocks up again.
//!
//! A block whose bytes no longer match its id on a verified read is copied (packed) or moved
//! (a file) to `quarantine/` for inspection and forgotten.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sqlx::SqlitePool;

use super::{BlobError, BlobStore, BlockHealth, CompactReport};
use crate::direct;
use crate::protocol;
use crate::sqlite::{insert_rows, Durability, EmbeddedMigration, Param};

/// Blocks smaller than this are packed: the chunker's minimum, so only whole small files and
/// the last chunk of a big one.
pub const PACK_BELOW: usize = 128 << 10;

const MAGIC: &[u8; 4] = b"dbxP";
/// A packed record's header: magic, 64 hex digits of hash, length (u32 LE).
pub const HEADER: usize = 4 + 64 + 4;

/// A pack is rewritten when at least this share of it is dead (1/4).
const DEAD_SHARE_TO_REWRITE: u64 = 4;

const MIGRATIONS: &[EmbeddedMigration] = &[(
    1,
    "packs",
    "CREATE TABLE packed (
         hash   TEXT PRIMARY KEY NOT NULL,
         pack   INTEGER NOT NULL,
         offset INTEGER NOT NULL,
         len    INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX packed_by_pack ON packed (pack);",
)];

#[derive(Clone, Debug)]
pub struct FsBlobStore {
    root: PathBuf,
    index: SqlitePool,
    /// Every write transaction of the index takes its turn here (see
    /// [`crate::sqlite::Writer`]).
    writer: crate::sqlite::Writer,
    /// Whether block files are written and read with direct I/O where the filesystem allows
    /// it (see [`crate::direct`]): written once, read when a client downloads them, they have
    /// no business in the page cache.
    direct: bool,
}

/// Where a packed block's bytes lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    pack: i64,
    offset: u64,
    len: u32,
}

/// What reading one block found.
enum Read {
    Bytes(Bytes),
    Absent,
    /// The index named a pack that is no longer there (compacted since): look it up again.
    PackGone,
}

fn index_err(e: sqlx::Error) -> BlobError {
    // The disk is full, which the server reports as such (507).
    if crate::sqlite::is_full(&e) {
        return BlobError::Io(io::ErrorKind::StorageFull.into());
    }
    BlobError::Index(e)
}

fn join_err(e: tokio::task::JoinError) -> BlobError {
    BlobError::Io(io::Error::other(e))
}

fn syncfs(dir: &Path) -> io::Result<()> {
    rustix::fs::syncfs(File::open(dir)?)?;
    Ok(())
}

/// A fresh pack id: positive, unlikely to collide (a collision is detected and retried).
fn new_pack_id() -> i64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = nanos
        ^ (u64::from(std::process::id()) << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 2) as i64
}

/// Reads up to `len` bytes at `offset`; fewer when the file ends first (a truncated pack: the
/// caller's hash check then fails).
fn read_at(file: &File, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// What one lookup-and-read found: the hashes asked, what each read gave, where the packed
/// ones were.
type ReadOnce = (Vec<String>, Vec<Read>, HashMap<String, Loc>);

/// A pack written and locked, not yet in the index: its lock is held until the rows are.
struct NewPack {
    _locked: File,
    id: i64,
    locs: Vec<(String, Loc)>,
}

impl FsBlobStore {
    /// Opens the store at `root`, creating it (and its pack index) if needed. Leaves `tmp/` as
    /// it is: another process (`dbx serve`) may be writing there; the server clears it when it
    /// starts ([`FsBlobStore::remove_stale_temp_files`]).
    pub async fn open(root: &Path) -> Result<FsBlobStore, BlobError> {
        fs::create_dir_all(root.join("tmp"))?;
        fs::create_dir_all(root.join("packs"))?;
        let had_index = root.join("packs.db").exists();
        let index = crate::sqlite::open(
            &root.join("packs.db"),
            true,
            MIGRATIONS,
            4,
            Durability::Full,
        )
        .await
        .map_err(index_err)?;
        let store = FsBlobStore {
            root: root.to_path_buf(),
            index,
            writer: crate::sqlite::Writer::default(),
            direct: direct::allowed(),
        };
        if !had_index {
            store.rebuild_index().await?;
        }
        Ok(store)
    }

    /// Rebuilds a lost pack index from the packs themselves (each record names its block; each
    /// is verified). Nothing to do for a new store. A pack's damaged tail ends its reading;
    /// the blocks before it are kept.
    async fn rebuild_index(&self) -> Result<(), BlobError> {
        let mut packs = Vec::new();
        for entry in fs::read_dir(self.root.join("packs"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(".pack")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            {
                packs.push(id as i64);
            }
        }
        if packs.is_empty() {
            return Ok(());
        }
        let mut blocks = 0usize;
        for &id in &packs {
            let path = self.pack_path(id);
            let rows = tokio::task::spawn_blocking(move || -> io::Result<Vec<Vec<Param>>> {
                let raw = fs::read(&path)?;
                let mut rows = Vec::new();
                let mut at = 0usize;
                while at + HEADER <= raw.len() && &raw[at..at + 4] == MAGIC {
                    let hash = String::from_utf8_lossy(&raw[at + 4..at + 68]).into_owned();
                    let len =
                        u32::from_le_bytes(raw[at + 68..at + 72].try_into().expect("4 bytes"));
                    let start = at + HEADER;
                    let Some(bytes) = raw.get(start..start + len as usize) else {
                        break;
                    };
                    if protocol::block_hash(bytes) == hash {
                        rows.push(vec![
                            Param::Text(hash),
                            Param::Int(id),
                            Param::Int(start as i64),
                            Param::Int(i64::from(len)),
                        ]);
                    }
                    at = start + len as usize;
                }
                if at != raw.len() {
                    tracing::warn!(pack = %path.display(), at, "pack damaged past this offset");
                }
                Ok(rows)
            })
            .await
            .map_err(join_err)??;
            blocks += rows.len();
            self.insert_index("INSERT OR IGNORE", rows).await?;
        }
        tracing::warn!(
            packs = packs.len(),
            blocks,
            "the pack index was missing; rebuilt it from the packs"
        );
        Ok(())
    }

    /// Deletes what a server killed mid-write left in `tmp/`: nothing there was acknowledged.
    /// Only for the server, when it starts.
    pub fn remove_stale_temp_files(&self) -> io::Result<()> {
        let tmp = self.root.join("tmp");
        fs::remove_dir_all(&tmp)?;
        fs::create_dir_all(&tmp)
    }

    fn path_of(&self, hash: &str) -> PathBuf {
        self.root.join(&hash[..2]).join(hash)
    }

    fn pack_path(&self, id: i64) -> PathBuf {
        self.root.join("packs").join(format!("{id:016x}.pack"))
    }

    /// Writes `blocks` as one new pack, locked, linked into `packs/`, not yet synced.
    fn write_pack(&self, blocks: &[(&str, &[u8])]) -> io::Result<NewPack> {
        // Written under `tmp/` and locked before it has a name in `packs/`, so compaction never
        // sees it unlocked before its rows exist.
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.as_file().lock()?;
        // Through a small buffer: a batch's blocks are not copied into one more batch-sized one.
        let mut out = io::BufWriter::with_capacity(1 << 20, tmp);
        let mut places = Vec::with_capacity(blocks.len());
        let mut at = 0u64;
        for (hash, bytes) in blocks {
            out.write_all(MAGIC)?;
            out.write_all(hash.as_bytes())?;
            out.write_all(&(bytes.len() as u32).to_le_bytes())?;
            at += HEADER as u64;
            places.push((at, bytes.len() as u32));
            out.write_all(bytes)?;
            at += bytes.len() as u64;
        }
        let tmp = out.into_inner().map_err(|e| e.into_error())?;
        let id = loop {
            let id = new_pack_id();
            match fs::hard_link(tmp.path(), self.pack_path(id)) {
                Ok(()) => break id,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let locked = tmp.into_file(); // the temp name is removed; `packs/<id>.pack` remains
        let locs = blocks
            .iter()
            .zip(places)
            .map(|((hash, _), (offset, len))| {
                (
                    hash.to_string(),
                    Loc {
                        pack: id,
                        offset,
                        len,
                    },
                )
            })
            .collect();
        Ok(NewPack {
            _locked: locked,
            id,
            locs,
        })
    }

    /// Writes a batch: small blocks as one pack, the others as files; all durable on return
    /// except the pack's index rows, which the caller commits next (holding the pack's lock).
    fn put_many_sync(&self, blocks: &[(String, Bytes)]) -> io::Result<Option<NewPack>> {
        let tmp_dir = self.root.join("tmp");
        let mut staged = Vec::new();
        let mut small: Vec<(&str, &[u8])> = Vec::new();
        // The aligned copy for direct writes, made for the first block file and reused.
        let mut stage = Vec::new();
        // Each hash once: the routes drop repeats before they get here.
        for (hash, bytes) in blocks {
            if bytes.len() < PACK_BELOW {
                small.push((hash, bytes));
                continue;
            }
            let dest = self.path_of(hash);
            if dest.exists() {
                continue;
            }
            let tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
            direct::write_new(tmp.as_file(), tmp.path(), bytes, self.direct, &mut stage)?;
            staged.push((tmp, dest));
        }
        let pack = if small.is_empty() {
            None
        } else {
            Some(self.write_pack(&small)?)
        };
        if staged.is_empty() && pack.is_none() {
            return Ok(None);
        }
        // One filesystem sync for every byte of the batch: cheaper than an fsync per file.
        syncfs(&tmp_dir)?;
        if !staged.is_empty() {
            for (tmp, dest) in staged {
                let dir = dest.parent().expect("block path has a parent");
                if !dir.exists() {
                    fs::create_dir_all(dir)?;
                }
                tmp.persist(&dest).map_err(|e| e.error)?;
            }
            // The renames (cheaper than an fsync per fan-out directory, up to 256 a batch).
            syncfs(&self.root)?;
        }
        Ok(pack)
    }

    async fn commit_pack(&self, pack: NewPack) -> Result<(), BlobError> {
        // In key order, as the metadata store's rows keyed by block id.
        let mut locs: Vec<&(String, Loc)> = pack.locs.iter().collect();
        locs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let rows = locs
            .iter()
            .map(|(hash, loc)| {
                vec![
                    Param::Text(hash.clone()),
                    Param::Int(loc.pack),
                    Param::Int(loc.offset as i64),
                    Param::Int(i64::from(loc.len)),
                ]
            })
            .collect();
        // REPLACE: a copy held before (e.g. from an upload never recorded) gives way to the
        // one just written and verified; the old bytes become dead space for `compact`.
        self.insert_index("INSERT OR REPLACE", rows).await?;
        tracing::debug!(pack = pack.id, blocks = pack.locs.len(), "pack committed");
        Ok(())
    }

    /// Index rows (hash, pack, offset, len) in one transaction; `verb` says what becomes of
    /// a hash already indexed.
    async fn insert_index(&self, verb: &str, rows: Vec<Vec<Param>>) -> Result<(), BlobError> {
        let mut tx = self.writer.begin(&self.index).await.map_err(index_err)?;
        let head = format!("{verb} INTO packed (hash, pack, offset, len)");
        insert_rows(&mut tx, &head, "", rows)
            .await
            .map_err(index_err)?;
        tx.commit().await.map_err(index_err)
    }

    /// Where the packed ones among `hashes` lie.
    async fn locate(&self, hashes: &[String]) -> Result<HashMap<String, Loc>, BlobError> {
        let json = serde_json::to_string(hashes).map_err(io::Error::other)?;
        // One JSON array rather than a row per block (see the metadata store's `from_json`).
        let rows: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(hash, pack, offset, len)) FROM packed
             WHERE hash IN (SELECT value FROM json_each(?))",
        )
        .bind(json)
        .fetch_one(&self.index)
        .await
        .map_err(index_err)?;
        let rows: Vec<(String, i64, u64, u32)> =
            serde_json::from_str(&rows).map_err(io::Error::other)?;
        Ok(rows
            .into_iter()
            .map(|(hash, pack, offset, len)| (hash, Loc { pack, offset, len }))
            .collect())
    }

    /// Reads each block as stored (packed per `locs`, else its file), unverified.
    fn read_sync(&self, hashes: &[String], locs: &HashMap<String, Loc>) -> io::Result<Vec<Read>> {
        let mut packs: HashMap<i64, Option<File>> = HashMap::new();
        hashes
            .iter()
            .map(|hash| {
                if let Some(loc) = locs.get(hash) {
                    let file = match packs.entry(loc.pack) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(match File::open(self.pack_path(loc.pack)) {
                                Ok(f) => Some(f),
                                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                                Err(err) => return Err(err),
                            })
                        }
                    };
                    return Ok(match file {
                        Some(f) => Read::Bytes(Bytes::from(read_at(f, loc.offset, loc.len)?)),
                        None => Read::PackGone,
                    });
                }
                match direct::read_whole(&self.path_of(hash), self.direct) {
                    Ok(b) => Ok(Read::Bytes(b)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Read::Absent),
                    Err(e) => Err(e),
                }
            })
            .collect()
    }

    /// Looks `hashes` up and reads them (on a blocking thread), with where each was found.
    async fn read_once(&self, hashes: Vec<String>) -> Result<ReadOnce, BlobError> {
        let locs = self.locate(&hashes).await?;
        let this = self.clone();
        let (hashes, found, locs) = tokio::task::spawn_blocking(move || {
            let found = this.read_sync(&hashes, &locs);
            (hashes, found, locs)
        })
        .await
        .map_err(join_err)?;
        Ok((hashes, found?, locs))
    }

    /// Reads blocks as stored, with where each packed one was found. A block whose pack was
    /// compacted away between lookup and read is looked up and read once more.
    async fn read(
        &self,
        hashes: Vec<String>,
    ) -> Result<(Vec<Option<Bytes>>, HashMap<String, Loc>), BlobError> {
        let (hashes, found, mut locs) = self.read_once(hashes).await?;
        let gone: Vec<String> = hashes
            .iter()
            .zip(&found)
            .filter(|(_, r)| matches!(r, Read::PackGone))
            .map(|(h, _)| h.clone())
            .collect();
        let mut again = HashMap::new();
        if !gone.is_empty() {
            let (gone, reread, relocated) = self.read_once(gone).await?;
            for (hash, r) in gone.into_iter().zip(reread) {
                if let Some(loc) = relocated.get(&hash) {
                    locs.insert(hash.clone(), *loc);
                }
                again.insert(hash, r);
            }
        }
        let out = hashes
            .iter()
            .zip(found)
            .map(|(hash, r)| {
                let r = match r {
                    Read::PackGone => again.remove(hash).unwrap_or(Read::Absent),
                    r => r,
                };
                match r {
                    Read::Bytes(b) => Some(b),
                    Read::Absent | Read::PackGone => None,
                }
            })
            .collect();
        Ok((out, locs))
    }

    /// Takes a block that failed its hash check out of service: its bytes go to `quarantine/`
    /// and the store forgets it.
    async fn quarantine(
        &self,
        hash: &str,
        bytes: &[u8],
        loc: Option<Loc>,
    ) -> Result<(), BlobError> {
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q)?;
        match loc {
            Some(loc) => {
                fs::write(q.join(hash), bytes)?;
                let q = sqlx::query("DELETE FROM packed WHERE hash = ? AND pack = ?")
                    .bind(hash)
                    .bind(loc.pack);
                self.writer
                    .execute(&self.index, q)
                    .await
                    .map_err(index_err)?;
            }
            None => fs::rename(self.path_of(hash), q.join(hash))?,
        }
        tracing::error!(
            block = hash,
            "block failed its hash check; moved to quarantine"
        );
        Ok(())
    }

    /// Rewrites the packs that are at least a quarter dead (blocks deleted, or never indexed
    /// because their writer died) into new ones, and deletes the packs that hold nothing live.
    /// Packs modified less than `min_age` ago are left alone, as are packs another process has
    /// locked. A block found corrupt on the way is quarantined, not copied.
    pub async fn compact(&self, min_age: Duration) -> Result<CompactReport, BlobError> {
        let mut report = CompactReport::default();
        let live: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
            "SELECT pack, SUM(len) + COUNT(*) * ? FROM packed GROUP BY pack",
        )
        .bind(HEADER as i64)
        .fetch_all(&self.index)
        .await
        .map_err(index_err)?
        .into_iter()
        .collect();
        let now = SystemTime::now();
        // The packs there now: not the ones this pass writes.
        let entries = fs::read_dir(self.root.join("packs"))?.collect::<io::Result<Vec<_>>>()?;
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".pack")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .map(|id| id as i64)
            else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let age = now
                .duration_since(meta.modified()?)
                .unwrap_or(Duration::ZERO);
            let (size, live) = (meta.len(), live.get(&id).copied().unwrap_or(0) as u64);
            let dead = size.saturating_sub(live);
            if age < min_age || (live > 0 && dead * DEAD_SHARE_TO_REWRITE < size) {
                continue;
            }
            let file = match File::open(entry.path()) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if file.try_lock().is_err() {
                continue; // being written, or compacted by another process
            }
            let kept = self.rewrite_pack(id, &file).await?;
            fs::remove_file(entry.path())?;
            report.bytes_reclaimed += size.saturating_sub(kept);
            if kept > 0 {
                report.packs_rewritten += 1;
            } else {
                report.packs_deleted += 1;
            }
        }
        Ok(report)
    }

    /// Copies pack `id`'s live blocks (read again now that it is locked) into a new pack and
    /// points the index at it. Returns the new pack's size (0: nothing was live, no new pack).
    async fn rewrite_pack(&self, id: i64, file: &File) -> Result<u64, BlobError> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT hash, offset, len FROM packed WHERE pack = ?")
                .bind(id)
                .fetch_all(&self.index)
                .await
                .map_err(index_err)?;
        let mut good = Vec::new();
        for (hash, offset, len) in rows {
            let loc = Loc {
                pack: id,
                offset: offset as u64,
                len: len as u32,
            };
            let bytes = read_at(file, loc.offset, loc.len)?;
            if protocol::block_hash(&bytes) == hash {
                good.push((hash, bytes));
            } else {
                self.quarantine(&hash, &bytes, Some(loc)).await?;
            }
        }
        if good.is_empty() {
            return Ok(0);
        }
        let this = self.clone();
        let (new, good) = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, &[u8])> = good
                .iter()
                .map(|(h, b)| (h.as_str(), b.as_slice()))
                .collect();
            let new = this.write_pack(&refs).and_then(|p| {
                syncfs(&this.root)?;
                Ok(p)
            });
            (new, good)
        })
        .await
        .map_err(join_err)?;
        let new = new?;
        let mut tx = self.writer.begin(&self.index).await.map_err(index_err)?;
        for (hash, loc) in &new.locs {
            // Only rows still in the old pack: one replaced meanwhile keeps its new place.
            sqlx::query("UPDATE packed SET pack = ?, offset = ? WHERE hash = ? AND pack = ?")
                .bind(loc.pack)
                .bind(loc.offset as i64)
                .bind(hash)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(index_err)?;
        }
        tx.commit().await.map_err(index_err)?;
        Ok(good.iter().map(|(_, b)| (HEADER + b.len()) as u64).sum())
    }
}

impl BlobStore for FsBlobStore {
    async fn put_many(&self, blocks: Vec<(String, Bytes)>) -> Result<(), BlobError> {
        let this = self.clone();
        let pack = tokio::task::spawn_blocking(move || this.put_many_sync(&blocks))
            .await
            .map_err(join_err)??;
        if let Some(pack) = pack {
            self.commit_pack(pack).await?;
        }
        Ok(())
    }

    async fn put(&self, hash: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.put_many(vec![(hash.to_string(), bytes)]).await
    }

    async fn delete(&self, hash: &str) -> Result<(), BlobError> {
        self.delete_many(vec![hash.to_string()]).await
    }

    async fn delete_many(&self, hashes: Vec<String>) -> Result<(), BlobError> {
        let json = serde_json::to_string(&hashes).map_err(io::Error::other)?;
        let q = sqlx::query("DELETE FROM packed WHERE hash IN (SELECT value FROM json_each(?))")
            .bind(json);
        self.writer
            .execute(&self.index, q)
            .await
            .map_err(index_err)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            for hash in &hashes {
                match fs::remove_file(this.path_of(hash)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(join_err)??;
        Ok(())
    }

    async fn check(&self, hash: &str, read_data: bool) -> Result<BlockHealth, BlobError> {
        if !read_data {
            // Present: its file, or its pack holding at least its bytes' worth.
            let locs = self.locate(&[hash.to_string()]).await?;
            let present = match locs.get(hash) {
                Some(loc) => fs::metadata(self.pack_path(loc.pack))
                    .is_ok_and(|m| m.len() >= loc.offset + u64::from(loc.len)),
                None => self.path_of(hash).exists(),
            };
            if present {
                return Ok(BlockHealth::Ok);
            }
            // Perhaps compacted between the lookup and the look: read it to be sure.
        }
        let (mut found, _) = self.read(vec![hash.to_string()]).await?;
        Ok(match found.pop().flatten() {
            None => BlockHealth::Missing,
            Some(b) if protocol::block_hash(&b) == hash => BlockHealth::Ok,
            Some(_) => BlockHealth::Corrupt,
        })
    }

    async fn read_many(&self, hashes: Vec<String>) -> Result<Vec<Option<Bytes>>, BlobError> {
        Ok(self.read(hashes).await?.0)
    }

    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlobError> {
        let (mut found, locs) = self.read(vec![hash.to_string()]).await?;
        let Some(bytes) = found.pop().flatten() else {
            return Ok(None);
        };
        if protocol::block_hash(&bytes) != hash {
            self.quarantine(hash, &bytes, locs.get(hash).copied())
                .await?;
            return Err(BlobError::Corrupt(hash.to_string()));
        }
        Ok(Some(bytes))
    }

    async fn compact(&self, min_age: Duration) -> Result<CompactReport, BlobError> {
        FsBlobStore::compact(self, min_age).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flips a byte of `bytes` wherever the store keeps them (its file, or its packs).
    fn corrupt(root: &Path, bytes: &[u8]) {
        let mut files: Vec<PathBuf> = Vec::new();
        for dir in fs::read_dir(root).unwrap() {
            let dir = dir.unwrap().path();
            if dir.is_dir() {
                files.extend(fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path()));
            }
        }
        let mut found = false;
        for f in files {
            let mut raw = fs::read(&f).unwrap();
            if let Some(at) = raw.windows(bytes.len()).position(|w| w == bytes) {
                raw[at] ^= 1;
                fs::write(&f, raw).unwrap();
                found = true;
            }
        }
        assert!(found, "bytes not found in the store");
    }

    #[tokio::test]
    async fn put_get_and_quarantine_packed_and_loose() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let small = Bytes::from_static(b"hello block");
        let big = Bytes::from(vec![7u8; PACK_BELOW]);
        for data in [small, big] {
            let hash = protocol::block_hash(&data);
            assert!(store.get(&hash).await.unwrap().is_none());
            store.put(&hash, data.clone()).await.unwrap();
            store.put(&hash, data.clone()).await.unwrap();
            assert_eq!(store.get(&hash).await.unwrap().unwrap(), data);
            assert_eq!(store.check(&hash, true).await.unwrap(), BlockHealth::Ok);
            assert_eq!(store.path_of(&hash).exists(), data.len() >= PACK_BELOW);

            // Flip a byte on disk: the read must fail, not serve bad bytes, and quarantine it.
            corrupt(dir.path(), &data);
            assert_eq!(store.check(&hash, false).await.unwrap(), BlockHealth::Ok);
            assert_eq!(
                store.check(&hash, true).await.unwrap(),
                BlockHealth::Corrupt
            );
            assert!(matches!(store.get(&hash).await, Err(BlobError::Corrupt(_))));
            let q = fs::read(dir.path().join("quarantine").join(&hash)).unwrap();
            assert_eq!(q.len(), data.len());
            assert_ne!(q, data);
            assert!(store.get(&hash).await.unwrap().is_none());
            assert_eq!(
                store.check(&hash, false).await.unwrap(),
                BlockHealth::Missing
            );
        }
    }

    #[tokio::test]
    async fn read_many_returns_what_is_stored_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let (a, b) = (
            Bytes::from_static(b"a block"),
            Bytes::from(vec![1u8; PACK_BELOW + 1]),
        );
        let (ha, hb) = (protocol::block_hash(&a), protocol::block_hash(&b));
        store.put(&ha, a.clone()).await.unwrap();
        store.put(&hb, b.clone()).await.unwrap();
        let absent = protocol::block_hash(b"absent");
        let got = store
            .read_many(vec![hb.clone(), absent, ha.clone()])
            .await
            .unwrap();
        assert_eq!(got, vec![Some(b), None, Some(a)]);
    }

    fn pack_files(root: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(root.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn small_blocks_of_a_batch_share_one_pack_and_compaction_reclaims_the_dead() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let blocks: Vec<(String, Bytes)> = (0..10u8)
            .map(|i| {
                let b = Bytes::from(vec![i; 1000 + usize::from(i)]);
                (protocol::block_hash(&b), b)
            })
            .collect();
        store.put_many(blocks.clone()).await.unwrap();
        assert_eq!(pack_files(dir.path()).len(), 1, "one pack for the batch");
        assert!(fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none());

        // Nothing dead yet: compaction leaves the pack alone.
        let none = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!(none, CompactReport::default());
        // Young packs are left alone whatever their state.
        let doomed = blocks[..6].iter().map(|(h, _)| h.clone()).collect();
        store.delete_many(doomed).await.unwrap();
        let young = store.compact(Duration::from_secs(3600)).await.unwrap();
        assert_eq!(young, CompactReport::default());

        let before = fs::metadata(&pack_files(dir.path())[0]).unwrap().len();
        let r = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!(r.packs_rewritten, 1, "{r:?}");
        let packs = pack_files(dir.path());
        assert_eq!(packs.len(), 1);
        let after = fs::metadata(&packs[0]).unwrap().len();
        let kept: u64 = blocks[6..]
            .iter()
            .map(|(_, b)| (HEADER + b.len()) as u64)
            .sum();
        assert_eq!(after, kept);
        assert_eq!(r.bytes_reclaimed, before - after);
        for (i, (h, b)) in blocks.iter().enumerate() {
            let got = store.get(h).await.unwrap();
            assert_eq!(got.as_ref(), (i >= 6).then_some(b), "block {i}");
        }

        // All dead: the pack is deleted.
        for (h, _) in &blocks[6..] {
            store.delete(h).await.unwrap();
        }
        let r = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!((r.packs_deleted, r.bytes_reclaimed), (1, after), "{r:?}");
        assert!(pack_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_pack_being_written_is_never_compacted_and_a_compacted_one_is_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        let b = Bytes::from_static(b"written, rows not yet committed");
        let h = protocol::block_hash(&b);
        // Written and linked, but its rows not committed: compaction must not take it.
        let pending = store.write_pack(&[(h.as_str(), &b[..])]).unwrap();
        let r = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!(r, CompactReport::default(), "a locked pack is left alone");
        store.commit_pack(pending).await.unwrap();
        assert_eq!(store.get(&h).await.unwrap(), Some(b.clone()));

        // A lookup taken before a compaction reads the block from its new place.
        let stale = store.locate(std::slice::from_ref(&h)).await.unwrap();
        let other = Bytes::from_static(b"dead weight");
        let mut pack = store
            .write_pack(&[(h.as_str(), &b[..]), ("0".repeat(64).as_str(), &other[..])])
            .unwrap();
        pack.locs.truncate(1);
        store.commit_pack(pack).await.unwrap();
        let r = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!(r.packs_deleted, 1, "the first pack is all dead: {r:?}");
        assert_eq!(r.packs_rewritten, 1, "the second is mostly dead: {r:?}");
        let this = store.clone();
        let gone = tokio::task::spawn_blocking(move || {
            let read = this.read_sync(std::slice::from_ref(&h), &stale).unwrap();
            matches!(read[0], Read::PackGone)
        })
        .await
        .unwrap();
        assert!(gone, "the stale place is gone");
        let h = protocol::block_hash(&b);
        assert_eq!(store.read_many(vec![h]).await.unwrap(), vec![Some(b)]);

        // A writer killed before committing its rows leaves a pack nothing refers to (its
        // lock goes with it): the next compaction deletes it.
        let orphan = Bytes::from_static(b"never acknowledged");
        let oh = protocol::block_hash(&orphan);
        drop(store.write_pack(&[(oh.as_str(), &orphan[..])]).unwrap());
        let before = pack_files(dir.path()).len();
        let r = store.compact(Duration::ZERO).await.unwrap();
        assert_eq!(r.packs_deleted, 1, "{r:?}");
        assert_eq!(pack_files(dir.path()).len(), before - 1);
        assert_eq!(store.get(&oh).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_lost_pack_index_is_rebuilt_from_the_packs() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<(String, Bytes)> = (0..5u8)
            .map(|i| {
                let b = Bytes::from(vec![i; 500 + usize::from(i)]);
                (protocol::block_hash(&b), b)
            })
            .collect();
        {
            let store = FsBlobStore::open(dir.path()).await.unwrap();
            store.put_many(blocks[..3].to_vec()).await.unwrap();
            store.put_many(blocks[3..].to_vec()).await.unwrap();
            store.index.close().await;
        }
        for f in ["packs.db", "packs.db-wal", "packs.db-shm"] {
            let _ = fs::remove_file(dir.path().join(f));
        }
        // Damage the second pack's last record: the blocks before it survive.
        let packs = pack_files(dir.path());
        let last = packs
            .iter()
            .find(|p| {
                let raw = fs::read(p).unwrap();
                raw.windows(blocks[4].1.len()).any(|w| w == blocks[4].1)
            })
            .unwrap();
        let mut raw = fs::read(last).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(last, raw).unwrap();

        let store = FsBlobStore::open(dir.path()).await.unwrap();
        for (i, (h, b)) in blocks.iter().enumerate() {
            let got = store.get(h).await.unwrap();
            assert_eq!(got.as_ref(), (i < 4).then_some(b), "block {i}");
        }
    }

    /// A data directory from before packs keeps its small blocks as files: still served,
    /// checked, deleted.
    #[tokio::test]
    async fn small_blocks_stored_as_files_by_earlier_versions_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let old = Bytes::from_static(b"a small block from an older server");
        let h = protocol::block_hash(&old);
        fs::create_dir_all(dir.path().join(&h[..2])).unwrap();
        fs::write(dir.path().join(&h[..2]).join(&h), &old).unwrap();
        let store = FsBlobStore::open(dir.path()).await.unwrap();
        assert_eq!(store.get(&h).await.unwrap(), Some(old.clone()));
        assert_eq!(
            store.read_many(vec![h.clone()]).await.unwrap(),
            vec![Some(old)]
        );
        assert_eq!(store.check(&h, true).await.unwrap(), BlockHealth::Ok);
        store.delete_many(vec![h.clone()]).await.unwrap();
        assert_eq!(store.check(&h, false).await.unwrap(), BlockHealth::Missing);
        assert!(!dir.path().join(&h[..2]).join(&h).exists());
    }
}
