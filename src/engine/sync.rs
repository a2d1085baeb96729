//! One push or pull, end to end: scan, hash what changed, list the server, plan, apply.
//!
//! Upload order is the commit protocol: ask which blocks the server lacks, upload those
//! (re-reading and re-hashing each from the file, so a file edited since it was hashed is
//! skipped, never committed with mixed bytes), then commit the file's metadata.
//! Downloads go to a temp file in the destination folder, each block verified, then fsync and
//! rename: a crash never leaves a torn file, and a file the user changed while its download was
//! in flight is kept (reported as a conflict), not overwritten.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{stream, StreamExt, TryStreamExt};
use serde::Serialize;

use super::chunker::{self, BlockRef, Digest};
use super::config::Folder;
use super::index::{Index, IndexOp, SyncedEntry, SyncedTree};
use super::planner::{self, Action, Direction, LocalState, LocalStates, RemoteTree};
use super::remote::{Remote, RemoteError};
use super::scanner::{self, LocalEntry, Scan, TEMP_PREFIX};
use super::{EngineError, Progress};
use crate::protocol::{self, ChunkParams, CommitRequest, EntryKind};

/// Files hashed at once (CPU-bound; this machine class has 2 cores).
const HASH_PARALLELISM: usize = 2;
/// Block uploads in flight (each ≤ 4 MiB, so at most 16 MiB of block data in memory).
const UPLOAD_PARALLELISM: usize = 4;
/// Metadata commits in flight.
const COMMIT_PARALLELISM: usize = 8;
/// Files downloaded at once, and blocks in flight per file (≤ 2 × 4 × 4 MiB in memory).
const DOWNLOAD_FILES_PARALLELISM: usize = 2;
const DOWNLOAD_BLOCKS_PARALLELISM: usize = 4;
/// Hashes per `blocks/missing` request.
const MISSING_BATCH: usize = 1000;
/// The namespace id the index uses for the user's root namespace.
pub const ROOT_NS: i64 = 0;

/// What one run did (or, with `dry_run`, would do). Field names are a stable JSON contract.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub direction: &'static str,
    pub dry_run: bool,
    pub files_uploaded: u64,
    pub files_downloaded: u64,
    pub files_deleted: u64,
    pub folders_created: u64,
    pub folders_deleted: u64,
    pub blocks_uploaded: u64,
    pub block_bytes_sent: u64,
    pub bytes_deduplicated: u64,
    pub blocks_downloaded: u64,
    pub block_bytes_received: u64,
    pub conflicts: Vec<Conflict>,
    pub warnings: Vec<String>,
    /// The planned actions (all of them with `dry_run`).
    pub plan: Vec<PlannedAction>,
}

impl Report {
    /// Whether anything needs the user's attention (sets a non-zero exit code).
    pub fn has_problems(&self) -> bool {
        !self.conflicts.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Conflict {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedAction {
    pub action: &'static str,
    pub path: String,
}

fn planned(a: &Action) -> PlannedAction {
    let action = match a {
        Action::DeleteRemote { .. } => "delete_remote",
        Action::DeleteLocal { .. } => "delete_local",
        Action::MkdirRemote { .. } => "mkdir_remote",
        Action::MkdirLocal { .. } => "mkdir_local",
        Action::Upload { .. } => "upload",
        Action::Download { .. } => "download",
        Action::Record { .. } => "record",
        Action::Forget { .. } => "forget",
        Action::Conflict { .. } => "conflict",
    };
    PlannedAction {
        action,
        path: a.path().to_string(),
    }
}

pub struct SyncOptions {
    pub direction: Direction,
    pub dry_run: bool,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// Whether a file's stat still matches what the index recorded (then it is not re-read).
fn stat_matches(l: &LocalEntry, s: &SyncedEntry) -> bool {
    l.kind == s.kind
        && l.size == s.size
        && l.mtime_ns == s.mtime_ns
        && l.inode == s.inode
        && l.executable == s.executable
}

/// The state the planner sees; `content_hash` is `None` for a file that was not hashed.
fn local_states(
    scan: &Scan,
    synced: &SyncedTree,
    digests: &HashMap<String, Digest>,
) -> LocalStates {
    scan.tree
        .iter()
        .map(|(path, l)| {
            let content_hash = match l.kind {
                EntryKind::Dir => None,
                EntryKind::File => digests
                    .get(path)
                    .map(|d| d.content_hash.clone())
                    .or_else(|| synced.get(path).and_then(|s| s.content_hash.clone())),
            };
            (
                path.clone(),
                LocalState {
                    kind: l.kind,
                    content_hash,
                    executable: l.executable,
                },
            )
        })
        .collect()
}

/// Runs one push or pull of `folder` against `remote`.
pub async fn run(
    folder: &Folder,
    remote: &Remote,
    opts: &SyncOptions,
    progress: Arc<dyn Progress>,
) -> Result<Report, EngineError> {
    let info = remote.info().await?;
    if !info.chunk.is_valid() {
        return Err(EngineError::BadChunkParams(info.chunk));
    }
    let remote_root = protocol::normalize_path(&folder.config.remote).map_err(|e| {
        EngineError::State(super::config::StateError::Parse {
            path: Folder::state_dir(&folder.root).join("config.toml"),
            message: format!("remote path: {e}"),
        })
    })?;
    let index = Index::open(&folder.index_path(), true).await?;
    let mut epoch_changed = false;
    let synced = match index.cursor(ROOT_NS).await? {
        // The server's metadata is not the one this folder synced with (restored from a backup,
        // or rebuilt): its revisions mean nothing, so sync as if for the first time. Nothing is
        // deleted on either side then; what the server lacks is uploaded again.
        Some((_, epoch)) if epoch != info.epoch => {
            epoch_changed = true;
            SyncedTree::new()
        }
        _ => index.load().await?,
    };

    let root = folder.root.clone();
    let scan = blocking(move || scanner::scan(&root))
        .await
        .map_err(io_at(&folder.root))?;

    let listing = match remote.list(&remote_root, true).await {
        Ok(l) => l,
        Err(RemoteError::NotFound(_)) => protocol::ListResponse {
            entries: Vec::new(),
            cursor: 0,
        },
        Err(e) => return Err(e.into()),
    };
    let prefix_len = if remote_root.is_empty() {
        0
    } else {
        remote_root.len() + 1
    };
    let remote_tree: RemoteTree = listing
        .entries
        .into_iter()
        .filter(|e| e.path.len() > prefix_len)
        .map(|e| (e.path[prefix_len..].to_string(), e))
        .collect();

    // Hash what the index cannot vouch for. A pull needs hashes only where they decide
    // something: paths the server or the index knows.
    let to_hash: Vec<(String, u64)> = scan
        .tree
        .iter()
        .filter(|(p, l)| {
            l.kind == EntryKind::File
                && !synced.get(*p).is_some_and(|s| stat_matches(l, s))
                && (opts.direction == Direction::Push
                    || remote_tree.contains_key(*p)
                    || synced.contains_key(*p))
        })
        .map(|(p, l)| (p.clone(), l.size))
        .collect();
    let mut report = Report {
        direction: match opts.direction {
            Direction::Push => "push",
            Direction::Pull => "pull",
        },
        dry_run: opts.dry_run,
        warnings: scan.warnings.clone(),
        ..Report::default()
    };
    if epoch_changed {
        report.warnings.push(
            "the server's metadata changed since the last sync (restored or rebuilt); \
             syncing as for the first time: nothing is deleted, missing files are sent again"
                .into(),
        );
    }
    let digests = hash_files(&folder.root, to_hash, info.chunk, &progress, &mut report).await?;
    let local = local_states(&scan, &synced, &digests);
    let plan = planner::plan(
        &local,
        &synced,
        &remote_tree,
        opts.direction,
        planner::Options {
            allow_remote_delete: !scan.incomplete,
        },
    );
    if scan.incomplete && opts.direction == Direction::Push {
        report
            .warnings
            .push("some files could not be read, so no server file was deleted this time".into());
    }
    for a in &plan.actions {
        if let Action::Conflict { path, reason } = a {
            report.conflicts.push(Conflict {
                path: path.clone(),
                reason: reason.clone(),
            });
        }
    }
    report.plan = plan.actions.iter().map(planned).collect();
    if opts.dry_run {
        index.close().await;
        return Ok(report);
    }

    let mut ctx = Apply {
        root: &folder.root,
        remote,
        remote_root: &remote_root,
        scan: &scan,
        synced: &synced,
        remote_tree: &remote_tree,
        digests: &digests,
        ops: Vec::new(),
        report,
        progress: progress.clone(),
    };
    if epoch_changed {
        index.clear().await?;
    }
    // Leftovers of a run that was killed mid-download: never synced, safe to drop.
    for t in &scan.stale_temps {
        let _ = fs::remove_file(t);
    }
    let result = ctx.apply(&plan.actions).await;
    // Whatever happened, record what was done, so a re-run does not redo it.
    index.apply(&ctx.ops).await?;
    result?;
    index
        .set_cursor(ROOT_NS, listing.cursor, &info.epoch)
        .await?;
    index.close().await;
    Ok(ctx.report)
}

async fn hash_files(
    root: &Path,
    files: Vec<(String, u64)>,
    params: ChunkParams,
    progress: &Arc<dyn Progress>,
    report: &mut Report,
) -> Result<HashMap<String, Digest>, EngineError> {
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    progress.start("hashing", total);
    let results: Vec<_> = stream::iter(files)
        .map(|(path, _)| {
            let full = root.join(&path);
            let progress = progress.clone();
            async move {
                let r = blocking(move || chunker::digest_file(&full, params)).await;
                if let Ok(d) = &r {
                    progress.advance(d.size);
                }
                (path, r)
            }
        })
        .buffer_unordered(HASH_PARALLELISM)
        .collect()
        .await;
    progress.finish();
    let mut out = HashMap::new();
    for (path, r) in results {
        match r {
            Ok(d) => {
                out.insert(path, d);
            }
            // Vanished between scan and read: the next run sees it gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report
                    .warnings
                    .push(format!("{path} vanished while being read"));
            }
            Err(e) => return Err(io_at(&root.join(&path))(e)),
        }
    }
    Ok(out)
}

struct Apply<'a> {
    root: &'a Path,
    remote: &'a Remote,
    remote_root: &'a str,
    scan: &'a Scan,
    synced: &'a SyncedTree,
    remote_tree: &'a RemoteTree,
    digests: &'a HashMap<String, Digest>,
    ops: Vec<IndexOp>,
    report: Report,
    progress: Arc<dyn Progress>,
}

fn now_stat(path: &Path) -> Option<LocalEntry> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| LocalEntry::from_metadata(&m))
}

impl Apply<'_> {
    fn remote_path(&self, rel: &str) -> String {
        protocol::join_path(self.remote_root, rel)
    }

    fn conflict(&mut self, path: &str, reason: impl Into<String>) {
        self.report.conflicts.push(Conflict {
            path: path.to_string(),
            reason: reason.into(),
        });
    }

    /// The index row for a path whose local and remote sides now agree.
    fn record(&mut self, path: &str, rev: i64, blocks: Vec<String>, content_hash: Option<String>) {
        let Some(l) = now_stat(&self.root.join(path)) else {
            return;
        };
        self.ops.push(IndexOp::Put(
            path.to_string(),
            SyncedEntry {
                ns: ROOT_NS,
                kind: l.kind,
                size: l.size,
                mtime_ns: l.mtime_ns,
                inode: l.inode,
                executable: l.executable,
                content_hash,
                blocks,
                rev,
            },
        ));
    }

    /// Forgets `path` and, for a folder, everything the index holds below it.
    fn forget_tree(&mut self, path: &str) {
        self.ops.push(IndexOp::Remove(path.to_string()));
        let lo = format!("{path}/");
        let hi = format!("{path}0");
        for p in self.synced.range(lo..hi).map(|(p, _)| p.clone()) {
            self.ops.push(IndexOp::Remove(p));
        }
    }

    async fn apply(&mut self, actions: &[Action]) -> Result<(), EngineError> {
        let mut uploads = Vec::new();
        let mut downloads = Vec::new();
        for a in actions {
            match a {
                Action::DeleteRemote { path, rev } => self.delete_remote(path, *rev).await?,
                Action::DeleteLocal { path, kind } => self.delete_local(path, *kind)?,
                Action::MkdirRemote { path } => {
                    let resp = self.remote.mkdir(&self.remote_path(path)).await?;
                    self.report.folders_created += 1;
                    self.record(path, resp.rev, Vec::new(), None);
                }
                Action::MkdirLocal { path } => {
                    let full = self.root.join(path);
                    fs::create_dir_all(&full).map_err(io_at(&full))?;
                    self.report.folders_created += 1;
                    let rev = self.remote_tree.get(path).map_or(0, |e| e.rev);
                    self.record(path, rev, Vec::new(), None);
                }
                Action::Upload { path, parent_rev } => uploads.push((path.clone(), *parent_rev)),
                Action::Download { path } => downloads.push(path.clone()),
                Action::Record { path } => {
                    if let Some(r) = self.remote_tree.get(path) {
                        let (rev, blocks, hash) = (r.rev, r.blocks.clone(), r.content_hash.clone());
                        self.record(path, rev, blocks, hash);
                    }
                }
                Action::Forget { path } => self.ops.push(IndexOp::Remove(path.clone())),
                Action::Conflict { .. } => {}
            }
        }
        if !uploads.is_empty() {
            self.upload(uploads).await?;
        }
        if !downloads.is_empty() {
            self.download(downloads).await?;
        }
        Ok(())
    }

    async fn delete_remote(&mut self, path: &str, rev: i64) -> Result<(), EngineError> {
        match self.remote.delete(&self.remote_path(path), Some(rev)).await {
            Ok(resp) => {
                let is_dir = self
                    .remote_tree
                    .get(path)
                    .is_some_and(|e| e.kind == EntryKind::Dir);
                if is_dir {
                    self.report.folders_deleted += 1;
                    self.report.files_deleted += resp.deleted.saturating_sub(1);
                } else {
                    self.report.files_deleted += 1;
                }
            }
            Err(RemoteError::NotFound(_)) => {}
            Err(RemoteError::Conflict { .. }) => {
                self.conflict(
                    path,
                    "changed on the server since the last sync; not deleted",
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.forget_tree(path);
        Ok(())
    }

    fn delete_local(&mut self, path: &str, kind: EntryKind) -> Result<(), EngineError> {
        let full = self.root.join(path);
        match kind {
            EntryKind::File => {
                // Changed since the scan: the user is working on it; keep it.
                if now_stat(&full).as_ref() != self.scan.tree.get(path) {
                    self.conflict(path, "changed locally during the pull; not deleted");
                    return Ok(());
                }
                match fs::remove_file(&full) {
                    Ok(()) => self.report.files_deleted += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&full)(e)),
                }
            }
            EntryKind::Dir => match fs::remove_dir(&full) {
                Ok(()) => self.report.folders_deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    self.report
                        .warnings
                        .push(format!("{path}/ was kept: it is not empty"));
                    return Ok(());
                }
            },
        }
        self.ops.push(IndexOp::Remove(path.to_string()));
        Ok(())
    }

    async fn upload(&mut self, files: Vec<(String, Option<i64>)>) -> Result<(), EngineError> {
        // Each distinct block once, with where to read it from.
        let mut sources: HashMap<&str, (&str, &BlockRef)> = HashMap::new();
        let mut total_bytes = 0u64;
        for (path, _) in &files {
            if let Some(d) = self.digests.get(path) {
                for b in &d.blocks {
                    total_bytes += b.len as u64;
                    sources.entry(&b.hash).or_insert((path, b));
                }
            }
        }
        let mut hashes: Vec<String> = sources.keys().map(|h| h.to_string()).collect();
        hashes.sort();
        let mut missing = Vec::new();
        for batch in hashes.chunks(MISSING_BATCH) {
            missing.extend(self.remote.missing(batch.to_vec()).await?);
        }
        let send_bytes: u64 = missing
            .iter()
            .filter_map(|h| sources.get(h.as_str()))
            .map(|(_, b)| b.len as u64)
            .sum();
        self.progress.start("uploading", send_bytes);
        let root = self.root;
        let remote = self.remote;
        let progress = self.progress.clone();
        let jobs: Vec<(String, PathBuf, BlockRef)> = missing
            .iter()
            .filter_map(|h| sources.get(h.as_str()))
            .map(|(p, b)| (p.to_string(), root.join(p), (*b).clone()))
            .collect();
        let results: Vec<(String, u64, Option<bool>)> = stream::iter(jobs)
            .map(|(path, full, block)| {
                let progress = progress.clone();
                async move {
                    let b = block.clone();
                    let bytes = blocking(move || chunker::read_block(&full, &b))
                        .await
                        .map_err(|e| EngineError::Io {
                            path: PathBuf::from(&path),
                            source: e,
                        })?;
                    let Some(bytes) = bytes else {
                        return Ok::<_, EngineError>((path, 0, None));
                    };
                    let len = bytes.len() as u64;
                    let resp = remote.put_block(&block.hash, bytes).await?;
                    progress.advance(len);
                    Ok((path, len, Some(resp.stored)))
                }
            })
            .buffer_unordered(UPLOAD_PARALLELISM)
            .try_collect()
            .await?;
        self.progress.finish();
        let mut changed: HashSet<String> = HashSet::new();
        for (path, len, sent) in results {
            match sent {
                Some(_) => {
                    self.report.blocks_uploaded += 1;
                    self.report.block_bytes_sent += len;
                }
                None => {
                    changed.insert(path);
                }
            }
        }
        self.report.bytes_deduplicated += total_bytes.saturating_sub(self.report.block_bytes_sent);

        let commits: Vec<(String, CommitRequest)> = files
            .iter()
            .filter(|(p, _)| !changed.contains(p))
            .filter_map(|(path, parent_rev)| {
                let d = self.digests.get(path)?;
                let l = self.scan.tree.get(path)?;
                Some((
                    path.clone(),
                    CommitRequest {
                        path: self.remote_path(path),
                        parent_rev: *parent_rev,
                        blocks: d.block_ids(),
                        size: d.size,
                        content_hash: d.content_hash.clone(),
                        mtime: l.mtime_ms(),
                        executable: l.executable,
                    },
                ))
            })
            .collect();
        for path in changed {
            self.report.warnings.push(format!(
                "{path} changed while being uploaded; it will go next time"
            ));
        }
        let results: Vec<_> = stream::iter(commits)
            .map(|(path, req)| async move {
                let r = remote.commit(&req).await;
                (path, req, r)
            })
            .buffer_unordered(COMMIT_PARALLELISM)
            .collect()
            .await;
        for (path, req, r) in results {
            match r {
                Ok(resp) => {
                    self.report.files_uploaded += 1;
                    // The index records the stat seen at scan time: an edit since then has
                    // another stat and is picked up by the next run.
                    if let Some(l) = self.scan.tree.get(&path) {
                        self.ops.push(IndexOp::Put(
                            path.clone(),
                            SyncedEntry {
                                ns: ROOT_NS,
                                kind: EntryKind::File,
                                size: l.size,
                                mtime_ns: l.mtime_ns,
                                inode: l.inode,
                                executable: l.executable,
                                content_hash: Some(req.content_hash),
                                blocks: req.blocks,
                                rev: resp.rev,
                            },
                        ));
                    }
                }
                Err(RemoteError::Conflict { message, .. }) => self.conflict(&path, message),
                Err(RemoteError::Refused { code, message, .. }) if code == "path_conflict" => {
                    self.conflict(&path, message)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn download(&mut self, files: Vec<String>) -> Result<(), EngineError> {
        let total: u64 = files
            .iter()
            .filter_map(|p| self.remote_tree.get(p))
            .map(|e| e.size)
            .sum();
        self.progress.start("downloading", total);
        let root = self.root;
        let remote = self.remote;
        let progress = self.progress.clone();
        let scan = self.scan;
        let jobs: Vec<_> = files
            .iter()
            .filter_map(|p| self.remote_tree.get(p).map(|e| (p.clone(), e.clone())))
            .collect();
        let results: Vec<_> = stream::iter(jobs)
            .map(|(path, entry)| {
                let progress = progress.clone();
                async move {
                    let r =
                        download_one(root, remote, &path, &entry, scan.tree.get(&path), &progress)
                            .await;
                    (path, entry, r)
                }
            })
            .buffer_unordered(DOWNLOAD_FILES_PARALLELISM)
            .collect()
            .await;
        self.progress.finish();
        let mut dirs = HashSet::new();
        let mut first_err = None;
        for (path, entry, r) in results {
            match r {
                Ok(Some(bytes)) => {
                    self.report.files_downloaded += 1;
                    self.report.blocks_downloaded += entry.blocks.len() as u64;
                    self.report.block_bytes_received += bytes;
                    dirs.insert(self.root.join(protocol::parent_path(&path)));
                    self.record(
                        &path,
                        entry.rev,
                        entry.blocks.clone(),
                        entry.content_hash.clone(),
                    );
                }
                Ok(None) => self.conflict(&path, "changed locally during the pull; kept yours"),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // One directory fsync per folder makes the renames durable.
        for d in dirs {
            if let Ok(f) = File::open(&d) {
                let _ = f.sync_all();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Downloads one file into place. Returns the bytes received, or `None` when the local file
/// changed since the scan (then nothing was replaced).
async fn download_one(
    root: &Path,
    remote: &Remote,
    path: &str,
    entry: &protocol::Entry,
    scanned: Option<&LocalEntry>,
    progress: &Arc<dyn Progress>,
) -> Result<Option<u64>, EngineError> {
    let dest = root.join(path);
    let dir = dest.parent().unwrap_or(root).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&dir)
        .map_err(io_at(&dir))?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = file;
    let mut received = 0u64;
    let mut blocks = stream::iter(entry.blocks.iter())
        .map(|h| remote.get_block(h))
        .buffered(DOWNLOAD_BLOCKS_PARALLELISM);
    while let Some(bytes) = blocks.next().await {
        let bytes = bytes?;
        received += bytes.len() as u64;
        file.write_all(&bytes).map_err(io_at(&dest))?;
        progress.advance(bytes.len() as u64);
    }
    if received != entry.size {
        return Err(EngineError::Remote(RemoteError::Protocol(format!(
            "/{path}: received {received} bytes, expected {}",
            entry.size
        ))));
    }
    let mode = if entry.executable { 0o755 } else { 0o644 };
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(&dest))?;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_millis(entry.mtime.max(0) as u64);
    file.set_modified(mtime).map_err(io_at(&dest))?;
    file.sync_all().map_err(io_at(&dest))?;
    drop(file);
    // The last check before the rename: the destination must be as the scan saw it.
    let current = now_stat(&dest);
    if current.as_ref() != scanned {
        return Ok(None);
    }
    tmp_path.persist(&dest).map_err(|e| io_at(&dest)(e.error))?;
    Ok(Some(received))
}
