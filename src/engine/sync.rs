//! One push, pull or two-way sync, end to end: bring the remote tree up to date from the
//! journal, scan, hash what changed, plan, apply.
//!
//! Upload order is the commit protocol: ask which blocks the server lacks, upload those
//! (re-reading and re-hashing each from the file, so a file edited since it was hashed is
//! skipped, never committed with mixed bytes), then commit the file's metadata.
//! Downloads go to a temp file in the destination folder, each block verified, then fsync and
//! rename: a crash never leaves a torn file, and a file the user changed while its download was
//! in flight is kept (reported as a conflict), not overwritten. Small files are fetched many to
//! a request and made durable with one filesystem sync per batch; a big file is written into a
//! partial file named after its content (`.dbx-part-…`), which a killed run leaves behind and
//! the next run resumes from.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{stream, StreamExt, TryStreamExt};
use serde::Serialize;

use super::chunker::{self, BlockRef, Digest, Fingerprint, KnownBlocks};
use super::config::Folder;
use super::index::{Index, IndexOp, RemoteOp, SyncedEntry, SyncedTree};
use super::planner::{self, Action, Direction, LocalState, LocalStates, RemoteTree};
use super::remote::{Remote, RemoteError};
use super::scanner::{self, LocalEntry, Scan, PART_PREFIX, TEMP_PREFIX};
use super::{EngineError, Progress};
use crate::direct;
use crate::protocol::{self, ChunkParams, CommitRequest, EntryKind};

/// Hashing tasks at once (CPU-bound; this machine class has 2 cores).
const HASH_PARALLELISM: usize = 2;
/// Small files hashed together in one task, at most (and at most this many bytes).
const HASH_BATCH_FILES: usize = 64;
const HASH_BATCH_BYTES: u64 = 8 << 20;
/// Block upload requests in flight per upload chunk (each ≤ 8 MiB, so with two chunks under
/// way at most 32 MiB of block data in memory).
const UPLOAD_PARALLELISM: usize = 2;
/// Commits per request (each batch is one durable transaction on the server).
const COMMIT_BATCH: usize = 1000;
/// Content per upload chunk, at most (a chunk may hold one bigger file).
const UPLOAD_CHUNK_BYTES: u64 = 64 << 20;
/// Blocks of one upload chunk turned into requests at a time (~512 MiB of a big file).
const UPLOAD_WINDOW: usize = 1024;
/// Upload chunks under way at once: one committing while the next one's blocks travel.
const UPLOAD_CHUNKS_IN_FLIGHT: usize = 2;
/// Files this small download many to a request.
const DOWNLOAD_SMALL_FILE: usize = 1 << 20;
/// Bytes of small files per download request.
const DOWNLOAD_BATCH_BYTES: usize = 4 << 20;
/// Bytes of blocks per upload request: many blocks each, so the server verifies them in
/// lockstep (see `protocol::block_hashes`).
const UPLOAD_BATCH_BYTES: usize = 8 << 20;
/// Files downloaded at once, and block requests in flight per big file (each ≤ 16 MiB).
const DOWNLOAD_FILES_PARALLELISM: usize = 2;
/// Requests of small files in flight: while some wait for their filesystem sync, others
/// fetch and write (2 left a core idle a third of the time; a pull of the 20,000 small files
/// of bench/peers.sh took ~3.05 s with 2, ~2.65 s with 3 or 4, alternated runs).
const DOWNLOAD_GROUPS_IN_FLIGHT: usize = 3;
const DOWNLOAD_FETCHES_IN_FLIGHT: usize = 2;
/// Bytes of a big download written between two background flushes (see `download_one`).
const WRITEBACK_BYTES: u64 = 64 << 20;
/// Index rows handed to the index writer at a time while a run goes on.
const RECORD_BATCH: usize = 2000;
/// Hashes per `blocks/missing` request.
const MISSING_BATCH: usize = 1000;
/// Blocks of new files sent while others are still being hashed, per round (see
/// [`EarlySend`]): two requests' worth, one per upload request in flight.
const EARLY_SEND_BYTES: u64 = (2 * UPLOAD_BATCH_BYTES) as u64;
/// Hashed groups of a big file waiting to be sent (each up to 16 chunks of like lengths,
/// ≤ 16 MiB: see `chunker::GROUP_CHUNKS`), beside the [`UPLOAD_PARALLELISM`] being sent.
const STREAMED_BATCHES: usize = 1;
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
    /// Files (or whole folders) renamed instead of re-transferred.
    pub files_moved: u64,
    pub folders_created: u64,
    pub folders_deleted: u64,
    pub blocks_uploaded: u64,
    pub block_bytes_sent: u64,
    pub bytes_deduplicated: u64,
    pub blocks_downloaded: u64,
    pub block_bytes_received: u64,
    /// Bytes a download copied from blocks of files already on disk instead of fetching.
    pub bytes_reused: u64,
    /// Conflicts resolved by keeping the local version under another name.
    pub conflict_copies: Vec<ConflictCopy>,
    /// Conflicts left for the user (one-way runs): nothing was changed for these.
    pub conflicts: Vec<Conflict>,
    pub warnings: Vec<String>,
    /// The planned actions (all of them with `dry_run`).
    pub plan: Vec<PlannedAction>,
    /// Something changed while this run worked; another pass will settle it.
    #[serde(skip)]
    pub retry: bool,
    /// The run stopped early: nothing changed since a run that left nothing to do.
    #[serde(skip)]
    pub settled: bool,
}

impl Report {
    /// Whether anything needs the user's attention (sets a non-zero exit code).
    pub fn has_problems(&self) -> bool {
        !self.conflicts.is_empty()
    }

    /// Adds a later pass's work to this report (its plan and conflicts replace the earlier
    /// ones: they describe where things stand now).
    pub fn absorb(&mut self, later: Report) {
        self.files_uploaded += later.files_uploaded;
        self.files_downloaded += later.files_downloaded;
        self.files_deleted += later.files_deleted;
        self.files_moved += later.files_moved;
        self.folders_created += later.folders_created;
        self.folders_deleted += later.folders_deleted;
        self.blocks_uploaded += later.blocks_uploaded;
        self.block_bytes_sent += later.block_bytes_sent;
        self.bytes_deduplicated += later.bytes_deduplicated;
        self.blocks_downloaded += later.blocks_downloaded;
        self.block_bytes_received += later.block_bytes_received;
        self.bytes_reused += later.bytes_reused;
        self.conflict_copies.extend(later.conflict_copies);
        self.conflicts = later.conflicts;
        self.warnings.extend(later.warnings);
        self.plan.extend(later.plan);
        self.retry = later.retry;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConflictCopy {
    pub path: String,
    pub copy: String,
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
    /// For a move: where it comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For a conflicted copy: the name the local version is kept under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

fn planned(a: &Action) -> PlannedAction {
    let action = match a {
        Action::MoveRemote { .. } => "move_remote",
        Action::MoveLocal { .. } => "move_local",
        Action::ConflictCopy { .. } => "conflict_copy",
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
        from: match a {
            Action::MoveRemote { from, .. } | Action::MoveLocal { from, .. } => Some(from.clone()),
            _ => None,
        },
        copy: match a {
            Action::ConflictCopy { copy, .. } => Some(copy.clone()),
            _ => None,
        },
    }
}

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub direction: Direction,
    pub dry_run: bool,
    /// Stop before deleting more than this many files (default: more than 100 files and more
    /// than half of the folder).
    pub max_delete: Option<usize>,
    /// Leave alone local files modified less than this long ago (still being written); the
    /// report then asks for a retry.
    pub settle: Option<Duration>,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::io(path, source)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// A file modified this recently may be modified again within the filesystem's timestamp
/// granularity without its mtime changing ("racy clean", as git calls it).
const RACY_NS: i64 = 2_000_000_000;

/// The mtime to record in the index: the file's, unless it is so recent that a further write
/// could leave it unchanged; then a value no stat matches, so the next run reads the file again.
fn index_mtime(l: &LocalEntry) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(i64::MAX);
    if now - l.mtime_ns < RACY_NS {
        i64::MIN
    } else {
        l.mtime_ns
    }
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

/// How many journal rows one request reads.
const JOURNAL_PAGE: u32 = 5000;
/// The default delete guard: a run that would delete more than this many files, and more than
/// half of the folder, stops before deleting anything.
const DEFAULT_MAX_DELETE: usize = 100;

/// The path of `path` relative to the folder's remote root, if it lies below it.
fn relative_to(root: &str, path: &str) -> Option<String> {
    if root.is_empty() {
        return (!path.is_empty()).then(|| path.to_string());
    }
    path.strip_prefix(root)?
        .strip_prefix('/')
        .map(str::to_string)
}

/// A folder as the remote tree holds it (and as a journal row makes it).
fn dir_entry(path: String, rev: i64) -> protocol::Entry {
    protocol::Entry {
        path,
        kind: EntryKind::Dir,
        rev,
        size: 0,
        content_hash: None,
        mtime: 0,
        executable: false,
        blocks: Vec::new(),
    }
}

/// Folds one journal row into the remote tree (and the ops that persist it).
fn apply_journal_entry(
    tree: &mut RemoteTree,
    ops: &mut Vec<RemoteOp>,
    root: &str,
    e: protocol::JournalEntry,
) {
    if let Some(old) = e.old_path.as_deref().and_then(|p| relative_to(root, p)) {
        tree.remove(&old);
        ops.push(RemoteOp::Remove(old));
    }
    let Some(rel) = relative_to(root, &e.path) else {
        return;
    };
    if e.op == protocol::JournalOp::Delete {
        tree.remove(&rel);
        ops.push(RemoteOp::Remove(rel));
        return;
    }
    let entry = protocol::Entry {
        path: rel.clone(),
        kind: e.kind,
        rev: e.id,
        size: e.size,
        content_hash: e.content_hash,
        mtime: e.mtime,
        executable: e.executable,
        blocks: e.blocks,
    };
    // Our own commits are in the stored tree already (see `Apply::remote_ops`): no write.
    if tree.get(&rel) == Some(&entry) {
        return;
    }
    tree.insert(rel.clone(), entry.clone());
    ops.push(RemoteOp::Put(rel, entry));
}

/// The remote tree now: the stored one brought up to date from the journal, page by page; or,
/// on the first sync or when the server is not the one this folder synced with (another epoch,
/// or a journal behind the stored cursor), a full listing. Returns the tree, the ops that store
/// it, its cursor, and whether the server was found replaced.
async fn fetch_remote(
    index: &Index,
    remote: &Remote,
    root: &str,
    epoch: &str,
) -> Result<(RemoteTree, Vec<RemoteOp>, i64, bool), EngineError> {
    let stored = index.cursor(ROOT_NS).await?;
    let mut replaced = stored.as_ref().is_some_and(|(_, e)| e != epoch);
    if let Some((mut cursor, _)) = stored.filter(|_| !replaced) {
        let t = std::time::Instant::now();
        let mut tree = index.load_remote(ROOT_NS).await?;
        tracing::debug!(elapsed = ?t.elapsed(), entries = tree.len(), "remote tree: stored part loaded");
        let mut ops = Vec::new();
        loop {
            let page = remote.journal(cursor, JOURNAL_PAGE).await?;
            if page.cursor < cursor {
                replaced = true;
                break;
            }
            for e in page.entries {
                apply_journal_entry(&mut tree, &mut ops, root, e);
            }
            cursor = page.cursor;
            if !page.has_more {
                return Ok((tree, ops, cursor, false));
            }
        }
    }
    // The head first: anything committed after it is read from the journal next time.
    let head = remote.journal(i64::MAX, 1).await?.cursor;
    let (entries, cursor) = match remote.list(root, true).await {
        Ok(l) => (l.entries, l.cursor),
        Err(RemoteError::NotFound(_)) => (Vec::new(), head),
        Err(e) => return Err(e.into()),
    };
    let mut tree = RemoteTree::new();
    let mut ops = vec![RemoteOp::Clear];
    for mut e in entries {
        if let Some(rel) = relative_to(root, &e.path) {
            e.path = rel.clone();
            ops.push(RemoteOp::Put(rel.clone(), e.clone()));
            tree.insert(rel, e);
        }
    }
    Ok((tree, ops, cursor, replaced))
}

/// `HOST's conflicted copy YYYY-MM-DD` (UTC date).
fn conflict_label() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this device".into());
    format!(
        "{host}'s conflicted copy {}",
        crate::timefmt::date_utc(crate::timefmt::now_secs())
    )
}

/// Where each block of an unchanged, synced local file lies, so downloads can copy it instead
/// of fetching it.
fn local_block_sources(scan: &Scan, synced: &SyncedTree) -> HashMap<String, (String, BlockRef)> {
    let mut out = HashMap::new();
    for (path, s) in synced {
        let unchanged = scan.tree.get(path).is_some_and(|l| stat_matches(l, s));
        if !unchanged || s.block_lens.len() != s.blocks.len() {
            continue;
        }
        let mut offset = 0u64;
        for (i, (hash, len)) in s.blocks.iter().zip(&s.block_lens).enumerate() {
            out.entry(hash.clone()).or_insert_with(|| {
                (
                    path.clone(),
                    BlockRef {
                        hash: hash.clone(),
                        offset,
                        len: *len,
                        fp: s.block_fps.get(i).copied(),
                    },
                )
            });
            offset += u64::from(*len);
        }
    }
    out
}

/// Runs one push, pull or two-way sync of `folder` against `remote`.
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
    let t0 = std::time::Instant::now();
    // The scan runs on its own thread while the index and the server's changes are read.
    let root = folder.root.clone();
    let mut scanning = Scanning::Running(tokio::task::spawn_blocking(move || scanner::scan(&root)));
    let index = Index::open(&folder.index_path(), true).await?;
    tracing::debug!(elapsed = ?t0.elapsed(), "index opened");
    let direction = direction_name(opts.direction);
    if index.is_settled(direction, &remote_root).await? {
        match settled_run(&index, remote, &info.epoch, &folder.root, scanning, opts).await? {
            Settled::NothingToDo(report) => {
                tracing::debug!(elapsed = ?t0.elapsed(), "settled: nothing changed since the last run");
                index.close().await;
                return Ok(report);
            }
            Settled::Changed(scan) => scanning = scan,
        }
    }
    let (mut remote_tree, remote_ops, cursor, replaced) =
        fetch_remote(&index, remote, &remote_root, &info.epoch).await?;
    tracing::debug!(elapsed = ?t0.elapsed(), "remote tree loaded");
    // The server's metadata is not the one this folder synced with (restored from a backup,
    // or rebuilt): its revisions mean nothing, so sync as if for the first time. Nothing is
    // deleted on either side then; what the server lacks is uploaded again.
    let mut synced = if replaced {
        SyncedTree::new()
    } else {
        index.load().await?
    };
    tracing::debug!(elapsed = ?t0.elapsed(), "index loaded");

    let scan = scanning.finish(&folder.root).await?;
    tracing::debug!(elapsed = ?t0.elapsed(), "scanned");

    // A file that vanished from the index's view and reappeared elsewhere with the same inode,
    // size and mtime was renamed: its content hash is known without reading it.
    let by_inode: HashMap<u64, &SyncedEntry> = synced
        .iter()
        .filter(|(p, s)| s.kind == EntryKind::File && !scan.tree.contains_key(*p))
        .map(|(_, s)| (s.inode, s))
        .collect();
    let mut renamed: HashMap<String, String> = HashMap::new();
    // Hash what the index cannot vouch for. A pull needs hashes only where they decide
    // something: paths the server or the index knows.
    let to_hash: Vec<(String, u64, Option<KnownBlocks>)> = scan
        .tree
        .iter()
        .filter(|(p, l)| {
            if l.kind != EntryKind::File || synced.get(*p).is_some_and(|s| stat_matches(l, s)) {
                return false;
            }
            if !synced.contains_key(*p) {
                if let Some(s) = by_inode.get(&l.inode).filter(|s| stat_matches(l, s)) {
                    if let Some(h) = &s.content_hash {
                        renamed.insert((*p).clone(), h.clone());
                        return false;
                    }
                }
            }
            opts.direction != Direction::Pull
                || remote_tree.contains_key(*p)
                || synced.contains_key(*p)
        })
        .map(|(p, l)| (p.clone(), l.size, known_blocks(synced.get(p))))
        .collect();
    let mut report = Report {
        direction,
        dry_run: opts.dry_run,
        warnings: scan.warnings.clone(),
        ..Report::default()
    };
    if replaced {
        report.warnings.push(
            "the server's metadata changed since the last sync (restored or rebuilt); \
             syncing as for the first time: nothing is deleted, missing files are sent again"
                .into(),
        );
    }
    // New files the server does not know are uploaded whatever they hold: their blocks may go
    // while the rest is hashed. Not on a dry run, a pull, or in watch mode (files still being
    // written wait there).
    // The small ones' commits may go too, while the rest is hashed, when nothing synced is
    // gone from here (no move can pair such a file with a vanished one) or from the server (no
    // delete can stop the run: `--max-delete` promises a run that changes nothing) and nothing
    // on the server or in the index stands where the file's folders go: the plan then uploads
    // each of them as new, and commits it, whatever else it finds (see `EarlySend::commit`).
    // Not a big one: sent as it is read, it is known untorn only once the hashing is over.
    let early =
        (opts.direction != Direction::Pull && !opts.dry_run && opts.settle.is_none()).then(|| {
            let eligible: HashSet<String> = to_hash
                .iter()
                .filter(|(p, _, _)| !synced.contains_key(p) && !remote_tree.contains_key(p))
                .map(|(p, _, _)| p.clone())
                .collect();
            let nothing_gone = synced.iter().all(|(p, s)| {
                scan.tree.get(p).is_some_and(|l| l.kind == s.kind)
                    && remote_tree.get(p).is_some_and(|r| r.kind == s.kind)
            });
            let committable = if nothing_gone {
                to_hash
                    .iter()
                    .filter(|(p, size, _)| {
                        *size <= chunker::SMALL_FILE
                            && eligible.contains(p)
                            && protocol::ancestors(p).all(|d| {
                                remote_tree.get(d).is_none_or(|e| e.kind == EntryKind::Dir)
                                    && synced.get(d).is_none_or(|e| e.kind == EntryKind::Dir)
                            })
                    })
                    .map(|(p, _, _)| p.clone())
                    .collect()
            } else {
                HashSet::new()
            };
            EarlySend {
                remote: remote.single_attempt(),
                remote_root: &remote_root,
                scan: &scan,
                eligible,
                committable,
            }
        });
    let (digests, early_sent, early_commits) = hash_files(
        &folder.root,
        to_hash,
        info.chunk,
        &progress,
        &mut report,
        early,
    )
    .await?;
    tracing::debug!(elapsed = ?t0.elapsed(), "hashed");
    let mut local = local_states(&scan, &synced, &digests);
    for (path, hash) in &renamed {
        if let Some(l) = local.get_mut(path) {
            l.content_hash = Some(hash.clone());
        }
    }
    let mut plan = planner::plan(
        &local,
        &synced,
        &remote_tree,
        opts.direction,
        &planner::Options {
            allow_remote_delete: !scan.incomplete,
            conflict_label: conflict_label(),
        },
    );
    let mut unsettled = false;
    if let Some(settle) = opts.settle {
        // Files still being written: nothing touches them this pass.
        let cutoff = SystemTime::now()
            .checked_sub(settle)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i64);
        let busy = |p: &str| {
            scan.tree
                .get(p)
                .is_some_and(|l| l.kind == EntryKind::File && l.mtime_ns > cutoff)
        };
        let before = plan.actions.len();
        plan.actions.retain(|a| {
            let from_busy = match a {
                Action::MoveRemote { from, .. } | Action::MoveLocal { from, .. } => busy(from),
                _ => false,
            };
            !busy(a.path()) && !from_busy
        });
        unsettled = plan.actions.len() != before;
    }
    if scan.incomplete && opts.direction != Direction::Pull {
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

    let deletes = plan.files_deleted(&remote_tree);
    let total = synced
        .values()
        .filter(|s| s.kind == EntryKind::File)
        .count();
    let too_many = match opts.max_delete {
        Some(max) => deletes > max,
        None => deletes > DEFAULT_MAX_DELETE && deletes * 2 > total,
    };
    if too_many {
        if opts.dry_run {
            report.warnings.push(format!(
                "this would delete {deletes} of {total} files: a real run stops before deleting \
                 anything unless given --max-delete {deletes}"
            ));
        } else {
            index.close().await;
            return Err(EngineError::TooManyDeletes {
                count: deletes,
                total,
            });
        }
    }
    if opts.dry_run {
        index.close().await;
        return Ok(report);
    }

    if replaced {
        index.clear().await?;
    }
    // The stored remote tree and its cursor describe the server whatever happens next. They
    // are written on the index's thread while the transfers start (a full listing is ~0.25 s
    // of writing for 20,000 files); then, as the transfers go on, the index rows of what is
    // done (see `Apply::hand_over_records`), so a run killed halfway keeps them and the next
    // run does not read those files again. Nothing is recorded before the remote tree is saved.
    let index_ref = &index;
    let epoch = info.epoch.as_str();
    let (records, mut to_record) = futures::channel::mpsc::unbounded::<Vec<IndexOp>>();
    let recording = async move {
        let saved = index_ref
            .save_remote(ROOT_NS, &remote_ops, cursor, epoch)
            .await;
        tracing::debug!(elapsed = ?t0.elapsed(), rows = remote_ops.len(), "remote tree saved");
        // After a full listing these are a copy of the whole tree: not kept through the
        // transfers.
        drop(remote_ops);
        let mut recorded = Recorded {
            saved,
            written: Vec::new(),
            unwritten: Vec::new(),
            failed: None,
        };
        while let Some(batch) = to_record.next().await {
            if recorded.failed.is_none() {
                match index_ref.apply(&batch).await {
                    Ok(()) => {
                        recorded.written.extend(batch);
                        let rows = recorded.written.len();
                        tracing::debug!(rows, "index rows written during the run");
                        continue;
                    }
                    Err(e) => recorded.failed = Some(e),
                }
            }
            recorded.unwritten.extend(batch);
        }
        recorded
    };
    // Leftovers of a run that was killed mid-download: never synced, safe to drop; partial
    // big files are kept while this run still downloads them (it resumes from them).
    let wanted: HashSet<String> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Download { path } => remote_tree.get(path)?.content_hash.clone(),
            _ => None,
        })
        .map(|h| format!("{PART_PREFIX}{}", &h[..h.len().min(32)]))
        .collect();
    for t in &scan.stale_temps {
        let name = t.file_name().map(|n| n.to_string_lossy().into_owned());
        if !name.is_some_and(|n| wanted.contains(&n)) {
            let _ = fs::remove_file(t);
        }
    }

    // Only downloads use local block sources; a run without any skips building the map.
    let sources = if plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Download { .. }))
    {
        local_block_sources(&scan, &synced)
    } else {
        HashMap::new()
    };
    let mut ctx = Apply {
        root: &folder.root,
        remote,
        remote_root: &remote_root,
        scan: &scan,
        synced: &synced,
        remote_tree: &remote_tree,
        digests,
        early_sent,
        early_commits,
        params: info.chunk,
        sources: &sources,
        renamed_away: HashSet::new(),
        ops: Vec::new(),
        remote_ops: Vec::new(),
        own_rows: Vec::new(),
        records: Some(records),
        unsynced: false,
        report,
        progress: progress.clone(),
    };
    ctx.report.retry |= unsettled;
    // Files read again whose content is what the index holds (touched, or recorded while racy):
    // refresh their stat so they are not read again next time.
    for (path, d) in &ctx.digests {
        if let (Some(s), Some(l)) = (synced.get(path), scan.tree.get(path)) {
            if s.content_hash.as_deref() == Some(d.content_hash.as_str())
                && s.executable == l.executable
                && !stat_matches(l, s)
            {
                ctx.ops.push(IndexOp::Put(
                    path.clone(),
                    SyncedEntry {
                        size: l.size,
                        mtime_ns: index_mtime(l),
                        inode: l.inode,
                        block_lens: lens_of(d),
                        block_fps: fps_of(d),
                        ..s.clone()
                    },
                ));
            }
        }
    }
    let applying = async {
        let r = ctx.apply(&plan.actions).await;
        // Closes the channel: the writer ends once it has written what it was handed.
        ctx.records = None;
        r
    };
    let (recorded, result) = futures::join!(recording, applying);
    tracing::debug!(elapsed = ?t0.elapsed(), rows = recorded.written.len(), "applied");
    let Apply {
        ops: rest,
        remote_ops,
        own_rows,
        report,
        unsynced,
        ..
    } = ctx;
    if unsynced {
        // Local moves, deletes or folders are recorded below: durable first.
        if let Err(e) = sync_filesystem(&folder.root) {
            tracing::warn!("syncing the folder's filesystem failed: {e}");
        }
    }
    // Whatever happened, record what was done, so a re-run does not redo it: what the writer
    // could not write, then what it was not handed; `ops` is all of it, in order.
    let Recorded {
        saved,
        written,
        mut unwritten,
        failed,
    } = recorded;
    let first_unwritten = written.len();
    let mut ops = written;
    ops.append(&mut unwritten);
    ops.extend(rest);
    index.apply(&ops[first_unwritten..]).await?;
    tracing::debug!(elapsed = ?t0.elapsed(), rows = ops.len() - first_unwritten, "index entries written");
    if let Some(e) = failed {
        // Written now instead; the run goes on as if nothing happened.
        tracing::warn!("writing the index during the run failed ({e}); written at its end");
    }
    if let Err(e) = saved {
        // The stored remote tree is still the previous run's, and its cursor with it: the next
        // run lists the server's changes from there. This run's rows cannot go on top of it.
        index.close().await;
        return Err(e.into());
    }
    // What this run committed goes into the stored remote tree now. The cursor moves over the
    // journal rows right after it that this run wrote and knows (its commits); any other row
    // is read next time (rows of this run among them cost no write then).
    let cursor = cursor_over(cursor, own_rows);
    index
        .save_remote(ROOT_NS, &remote_ops, cursor, &info.epoch)
        .await?;
    tracing::debug!(elapsed = ?t0.elapsed(), "index written");
    if result.is_ok() && report.conflicts.is_empty() && !report.retry && !unsettled {
        // The state this run leaves, as the next run would load it: if that run would have
        // nothing to do, say so in the index, so it can stop early (see `settled_run`).
        apply_ops(&mut synced, ops);
        apply_remote_ops(&mut remote_tree, remote_ops);
        let unchanged_local = synced
            .iter()
            .map(|(p, s)| {
                let l = LocalState {
                    kind: s.kind,
                    content_hash: s.content_hash.clone(),
                    executable: s.executable,
                };
                (p.clone(), l)
            })
            .collect();
        let next = planner::plan(
            &unchanged_local,
            &synced,
            &remote_tree,
            opts.direction,
            &planner::Options::default(),
        );
        if next.actions.is_empty() {
            index.settle(direction, &remote_root).await?;
        }
        tracing::debug!(elapsed = ?t0.elapsed(), settled = next.actions.is_empty(), "checked the next run");
    }
    index.close().await;
    result?;
    Ok(report)
}

/// What the index writer of a run did (see `run`): the stored remote tree saved or not, then
/// the index rows it was handed, in order, written or (after a failed write) not.
struct Recorded {
    saved: Result<(), sqlx::Error>,
    written: Vec<IndexOp>,
    unwritten: Vec<IndexOp>,
    failed: Option<sqlx::Error>,
}

/// The name of a direction, in reports and in the index's `settled` table.
fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Push => "push",
        Direction::Pull => "pull",
        Direction::Both => "sync",
    }
}

/// How far the stored cursor may move: over the rows right after it that this run wrote.
fn cursor_over(mut cursor: i64, mut own_rows: Vec<i64>) -> i64 {
    own_rows.sort_unstable();
    for id in own_rows {
        if id == cursor + 1 {
            cursor = id;
        } else if id > cursor + 1 {
            break;
        }
    }
    cursor
}

/// Applies index ops to an in-memory tree, as `Index::apply` does to the stored one.
fn apply_ops(tree: &mut SyncedTree, ops: Vec<IndexOp>) {
    for op in ops {
        match op {
            IndexOp::Put(p, e) => {
                tree.insert(p, e);
            }
            IndexOp::Remove(p) => {
                tree.remove(&p);
            }
        }
    }
}

/// Applies remote-tree ops to an in-memory tree, as `Index::save_remote` does to the stored one.
fn apply_remote_ops(tree: &mut RemoteTree, ops: Vec<RemoteOp>) {
    for op in ops {
        match op {
            RemoteOp::Clear => tree.clear(),
            RemoteOp::Put(p, e) => {
                tree.insert(p, e);
            }
            RemoteOp::Remove(p) => {
                tree.remove(&p);
            }
        }
    }
}

/// The local scan: still running on its own thread, or done.
enum Scanning {
    Running(tokio::task::JoinHandle<std::io::Result<Scan>>),
    Done(Scan),
}

impl Scanning {
    async fn finish(self, root: &Path) -> Result<Scan, EngineError> {
        match self {
            Scanning::Done(scan) => Ok(scan),
            Scanning::Running(task) => task
                .await
                .map_err(|e| io_at(root)(std::io::Error::other(e)))?
                .map_err(io_at(root)),
        }
    }
}

/// What a settled folder's run found.
enum Settled {
    /// No local change and no journal row past the stored cursor: nothing to do.
    NothingToDo(Report),
    /// Something changed: the full run goes on with this scan.
    Changed(Scanning),
}

/// The early stop of a run in a direction the last run left settled (see `Index::settle`):
/// if no journal row came after the stored cursor and every local file and folder is as the
/// index records it (the same paths, and for files the same stat, as a full run would check
/// before trusting the index), the full run would load the same three trees the last run
/// checked and plan nothing. Costs a journal request, the index's stats and the scan.
async fn settled_run(
    index: &Index,
    remote: &Remote,
    epoch: &str,
    root: &Path,
    scanning: Scanning,
    opts: &SyncOptions,
) -> Result<Settled, EngineError> {
    let Some((cursor, stored_epoch)) = index.cursor(ROOT_NS).await? else {
        return Ok(Settled::Changed(scanning));
    };
    if stored_epoch != epoch {
        return Ok(Settled::Changed(scanning));
    }
    let page = remote.journal(cursor, 1).await?;
    if !page.entries.is_empty() || page.cursor != cursor {
        return Ok(Settled::Changed(scanning));
    }
    let stats = index.load_stats().await?;
    let scan = scanning.finish(root).await?;
    let same = !scan.incomplete
        && scan.stale_temps.is_empty()
        && scan.tree.len() == stats.len()
        && scan.tree.iter().all(|(p, l)| {
            stats.get(p).is_some_and(|s| match l.kind {
                EntryKind::Dir => s.kind == EntryKind::Dir,
                EntryKind::File => s == l,
            })
        });
    if !same {
        return Ok(Settled::Changed(Scanning::Done(scan)));
    }
    Ok(Settled::NothingToDo(Report {
        direction: direction_name(opts.direction),
        dry_run: opts.dry_run,
        warnings: scan.warnings,
        settled: true,
        ..Report::default()
    }))
}

async fn hash_files(
    root: &Path,
    files: Vec<(String, u64, Option<KnownBlocks>)>,
    params: ChunkParams,
    progress: &Arc<dyn Progress>,
    report: &mut Report,
    early: Option<EarlySend<'_>>,
) -> Result<(HashMap<String, Digest>, EarlySent, EarlyCommits), EngineError> {
    let total: u64 = files.iter().map(|(_, s, _)| s).sum();
    progress.start("hashing", total);
    // Big files one at a time (each is cut by one thread and hashed by others); small ones
    // many to a task, so their blocks are hashed together.
    let (small, big): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(_, size, _)| *size <= chunker::SMALL_FILE);
    let eligible = early.as_ref().map(|e| &e.eligible);
    // The blocks of big files sent early go as they are hashed, straight from the hashing's
    // buffers (see `EarlySend::stream`); not those of a file modified in the last moments,
    // whose stat cannot tell whether it changed while being read (see below).
    let streamable = |path: &str| {
        early.as_ref().is_some_and(|e| {
            e.eligible.contains(path)
                && e.scan
                    .tree
                    .get(path)
                    .is_some_and(|l| index_mtime(l) != i64::MIN)
        })
    };
    let (hashed_blocks, to_stream) = tokio::sync::mpsc::channel(STREAMED_BATCHES);
    let mut streamed = Vec::new();
    let mut jobs: Vec<(HashJob, Option<HashedBlocks>)> = big
        .into_iter()
        .map(|(path, _, known)| {
            let sink = streamable(&path).then(|| hashed_blocks.clone());
            if sink.is_some() {
                streamed.push(path.clone());
            }
            (vec![(path, known)], sink)
        })
        .collect();
    drop(hashed_blocks);
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for (path, size, known) in small {
        if batch.len() == HASH_BATCH_FILES || batch_bytes + size > HASH_BATCH_BYTES {
            jobs.push((std::mem::take(&mut batch), None));
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((path, known));
    }
    if !batch.is_empty() {
        jobs.push((batch, None));
    }
    let (digested, to_send) = futures::channel::mpsc::unbounded::<Vec<(String, Digest)>>();
    // The big files hashed at once share their read buffers (at most two: `HASH_PARALLELISM`).
    let buffers = chunker::ReadBuffers::new(params.max, !streamed.is_empty());
    let hashing = stream::iter(jobs)
        .map(|(job, sink)| {
            let root = root.to_path_buf();
            let progress = progress.clone();
            let buffers = buffers.clone();
            async move {
                let done = blocking(move || digest_files(&root, job, params, sink, &buffers)).await;
                for d in done.iter().filter_map(|(_, r)| r.as_ref().ok()) {
                    progress.advance(d.size);
                }
                done
            }
        })
        .buffer_unordered(HASH_PARALLELISM)
        .inspect(move |done| {
            let new: Vec<(String, Digest)> = done
                .iter()
                .filter(|(p, _)| eligible.is_some_and(|e| e.contains(p)))
                .filter_map(|(p, r)| Some((p.clone(), r.as_ref().ok()?.clone())))
                .collect();
            if !new.is_empty() {
                let _ = digested.unbounded_send(new);
            }
        })
        .flat_map(stream::iter)
        .collect::<Vec<(String, std::io::Result<Digest>)>>();
    let hashed = std::sync::atomic::AtomicBool::new(false);
    let hashing = async {
        let results = hashing.await;
        hashed.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    };
    let sending = async {
        match &early {
            Some(e) => {
                let (sent_files, to_commit) = futures::channel::mpsc::unbounded();
                let (mut sent, streamed, committed) = futures::join!(
                    e.run(root, to_send, &hashed, sent_files),
                    e.stream(to_stream),
                    e.commit(to_commit)
                );
                sent.extend(streamed);
                (sent, committed)
            }
            None => (EarlySent::default(), EarlyCommits::new()),
        }
    };
    let (results, (early_sent, early_commits)) = futures::join!(hashing, sending);
    progress.finish();
    let (blocks, bytes) = (early_sent.len() as u64, early_sent.values().sum::<u64>());
    if blocks > 0 {
        tracing::debug!(blocks, bytes, "sent while hashing");
    }
    report.blocks_uploaded += blocks;
    report.block_bytes_sent += bytes;
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
            // Cut short between the cutting and the hashing (see `chunker::digest_source`):
            // without a digest it is not taken for changed (or, new, it is hashed again by
            // the upload, which finds it changed since the scan): it goes next time.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                report.warnings.push(format!(
                    "{path} changed while being read; it will go next time"
                ));
            }
            Err(e) => return Err(io_at(&root.join(&path))(e)),
        }
    }
    // A file sent as it was read, if it changed since the scan, may have been read torn: its
    // digest is dropped, so the upload hashes it again and, finding it changed since the scan,
    // leaves it for next time (what was sent waits on the server, uncommitted).
    if let Some(e) = &early {
        for path in streamed {
            let now = now_stat(&root.join(&path));
            if e.scan.tree.get(&path) != now.as_ref() {
                out.remove(&path);
            }
        }
    }
    if !early_commits.is_empty() {
        tracing::debug!(files = early_commits.len(), "committed while hashing");
    }
    Ok((out, early_sent, early_commits))
}

/// Sends the blocks of new files while the other files are still being hashed, so the network
/// and the server's disk work while this machine's cores hash: without it a first push hashes
/// everything first (the server idle), then uploads (the disk busy, the client's cores half
/// idle). Only for files the plan will upload whatever their content (new here and unknown to
/// the server); their blocks wait on the server, uncommitted, as an interrupted upload's do,
/// until the upload commits them (finding them present, it sends nothing again). A big file's
/// blocks go as it is read (see [`EarlySend::stream`]); of the small files, whatever is
/// not sent by the end of the hashing is left to the upload, which shows its progress; a
/// failure here only stops the early sending (the upload meets it again, retries and reports
/// it): its requests are tried once, so a failing server is not waited for twice.
///
/// Of these files, the small ones the plan will upload as new whatever else it finds
/// (`committable`) are committed too once their blocks are sent, a batch at a time, while
/// the hashing goes on: the commits (one SQLite writer on the server) no longer wait for the
/// last file to be hashed. The upload takes their outcomes as its own (see `Apply::upload`);
/// a run that stops before leaves them unrecorded here, and the next run finds the same
/// content on both sides, which it records without a transfer.
struct EarlySend<'a> {
    remote: Remote,
    remote_root: &'a str,
    scan: &'a Scan,
    /// Files the plan will upload whatever their content.
    eligible: HashSet<String>,
    /// Small files the plan will upload as new whatever else it finds.
    committable: HashSet<String>,
}

/// What [`EarlySend`] sent: each block with its length.
type EarlySent = HashMap<String, u64>;

/// What [`EarlySend`] committed, by path: the stat the index records, the outcome (the request
/// is made again from the digest: see [`commit_request`]).
type EarlyCommits = HashMap<String, (LocalEntry, Result<protocol::Committed, RemoteError>)>;

/// The commit of `path` (relative to the folder) with content `d`, as stat `l` describes it.
fn commit_request(
    remote_root: &str,
    path: &str,
    parent_rev: Option<i64>,
    d: &Digest,
    l: &LocalEntry,
) -> CommitRequest {
    CommitRequest {
        path: protocol::join_path(remote_root, path),
        parent_rev,
        blocks: d.block_ids(),
        size: d.size,
        content_hash: d.content_hash.clone(),
        mtime: l.mtime_ms(),
        executable: l.executable,
    }
}

/// Files hashed together: one big file, or many small ones (with the blocks each had before,
/// where fingerprints are kept: see [`known_blocks`]).
type HashJob = Vec<(String, Option<KnownBlocks>)>;

/// Where the hashing of a big file hands its blocks, bytes and all (see `EarlySend::stream`).
type HashedBlocks = tokio::sync::mpsc::Sender<Vec<(String, bytes::Bytes)>>;

impl EarlySend<'_> {
    async fn run(
        &self,
        root: &Path,
        mut digested: futures::channel::mpsc::UnboundedReceiver<Vec<(String, Digest)>>,
        hashed: &std::sync::atomic::AtomicBool,
        to_commit: futures::channel::mpsc::UnboundedSender<Vec<(String, Digest)>>,
    ) -> EarlySent {
        let mut sent = EarlySent::default();
        let mut pending: Vec<(String, Digest)> = Vec::new();
        let mut pending_bytes = 0u64;
        while let Some(files) = digested.next().await {
            pending_bytes += files.iter().map(|(_, d)| d.size).sum::<u64>();
            pending.extend(files);
            if pending_bytes < EARLY_SEND_BYTES {
                continue;
            }
            if hashed.load(std::sync::atomic::Ordering::Relaxed) {
                break; // hashing is over: the upload sends the rest, several requests at once
            }
            let round = std::mem::take(&mut pending);
            pending_bytes = 0;
            match self.send(root, &round, &mut sent, hashed).await {
                Ok(unsent) => {
                    // Files whose every block is on the server now, unchanged since hashed.
                    let ready: Vec<(String, Digest)> = round
                        .into_iter()
                        .filter(|(p, d)| {
                            self.committable.contains(p)
                                && d.blocks.iter().all(|b| !unsent.contains(&b.hash))
                        })
                        .collect();
                    if !ready.is_empty() {
                        let _ = to_commit.unbounded_send(ready);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "early upload stopped; the upload will send the rest");
                    break;
                }
            }
        }
        sent
    }

    /// Commits the files `run` hands over, [`COMMIT_BATCH`] to a request, one request at a
    /// time, as new files; stops at the first failed request (those files and the rest go
    /// with the upload, which retries: a commit that reached the server finds it has exactly
    /// this and writes nothing).
    async fn commit(
        &self,
        mut ready: futures::channel::mpsc::UnboundedReceiver<Vec<(String, Digest)>>,
    ) -> EarlyCommits {
        let mut done = EarlyCommits::new();
        while let Some(files) = ready.next().await {
            for batch in files.chunks(COMMIT_BATCH) {
                let (kept, reqs): (Vec<_>, Vec<_>) = batch
                    .iter()
                    .filter_map(|(path, d)| {
                        let l = self.scan.tree.get(path)?.clone();
                        let req = commit_request(self.remote_root, path, None, d, &l);
                        Some(((path.clone(), l), req))
                    })
                    .unzip();
                match self.remote.commit_batch(reqs).await {
                    Ok(outcomes) => {
                        for ((path, l), r) in kept.into_iter().zip(outcomes) {
                            done.insert(path, (l, r));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "committing while hashing stopped; the upload will commit the rest");
                        return done;
                    }
                }
            }
        }
        done
    }

    /// Sends the blocks that the hashing of big files hands over (each group once hashed: one
    /// request of blocks of like lengths, which the server verifies in lockstep),
    /// those the server lacks, [`UPLOAD_PARALLELISM`] requests at a time: a big file travels
    /// while it is read, and is not read again to be sent. The bounded channel holds the
    /// hashing back when the sending lags, so memory stays bounded. On a failure it takes no
    /// more (the hashing goes on; the upload sends the rest, with retries).
    async fn stream(
        &self,
        hashed: tokio::sync::mpsc::Receiver<Vec<(String, bytes::Bytes)>>,
    ) -> EarlySent {
        let batches = stream::unfold(hashed, |mut rx| async move {
            rx.recv().await.map(|batch| (batch, rx))
        });
        let requests = batches
            .map(|batch| async move {
                let mut seen = HashSet::new();
                let batch: Vec<(String, bytes::Bytes)> = batch
                    .into_iter()
                    .filter(|(h, _)| seen.insert(h.clone()))
                    .collect();
                let hashes = batch.iter().map(|(h, _)| h.clone()).collect();
                let missing: HashSet<String> =
                    self.remote.missing(hashes).await?.into_iter().collect();
                let send: Vec<(String, bytes::Bytes)> = batch
                    .into_iter()
                    .filter(|(h, _)| missing.contains(h))
                    .collect();
                let lens: Vec<(String, u64)> = send
                    .iter()
                    .map(|(h, b)| (h.clone(), b.len() as u64))
                    .collect();
                if !send.is_empty() {
                    self.remote.put_blocks(send).await?;
                }
                Ok::<_, RemoteError>(lens)
            })
            .buffer_unordered(UPLOAD_PARALLELISM);
        let mut requests = std::pin::pin!(requests);
        let mut sent = EarlySent::default();
        while let Some(r) = requests.next().await {
            match r {
                Ok(lens) => sent.extend(lens),
                Err(e) => {
                    tracing::debug!(error = %e, "sending while hashing stopped; the upload will send the rest");
                    break;
                }
            }
        }
        if !sent.is_empty() {
            let bytes: u64 = sent.values().sum();
            tracing::debug!(blocks = sent.len(), bytes, "sent as hashed");
        }
        sent
    }

    /// Sends what the server lacks of `files`' blocks; returns the blocks it lacks still (not
    /// sent: the hashing ended first, or their file changed under the stat check).
    async fn send(
        &self,
        root: &Path,
        files: &[(String, Digest)],
        sent: &mut EarlySent,
        hashed: &std::sync::atomic::AtomicBool,
    ) -> Result<HashSet<String>, EngineError> {
        let mut sources: HashMap<&str, (&str, &BlockRef)> = HashMap::new();
        for (path, d) in files {
            for b in &d.blocks {
                if !sent.contains_key(&b.hash) {
                    sources.entry(&b.hash).or_insert((path, b));
                }
            }
        }
        let missing = missing_blocks(&self.remote, &sources).await?;
        let mut unsent: HashSet<String> = missing.iter().cloned().collect();
        let quiet: Arc<dyn Progress> = Arc::new(super::NoProgress);
        for window in missing.chunks(UPLOAD_WINDOW) {
            if hashed.load(std::sync::atomic::Ordering::Relaxed) {
                break; // the rest of a big file goes with the upload
            }
            let jobs = upload_jobs(root, self.scan, window, &sources);
            let outcome = send_blocks(&self.remote, &quiet, jobs).await?;
            // Every block of a file that changed under the stat check stays unsent.
            let changed: HashSet<&str> = outcome
                .iter()
                .filter(|(_, _, ok)| !ok)
                .map(|(p, _, _)| p.as_str())
                .collect();
            for h in window {
                if let Some((path, b)) = sources.get(h.as_str()) {
                    if !changed.contains(path) {
                        sent.insert(h.clone(), u64::from(b.len));
                        unsent.remove(h);
                    }
                }
            }
        }
        Ok(unsent)
    }
}

/// Which of `sources`' blocks the server lacks (or the caller may not use), in hash order.
async fn missing_blocks(
    remote: &Remote,
    sources: &HashMap<&str, (&str, &BlockRef)>,
) -> Result<Vec<String>, EngineError> {
    let mut hashes: Vec<String> = sources.keys().map(|h| h.to_string()).collect();
    hashes.sort();
    let mut missing = Vec::new();
    for batch in hashes.chunks(MISSING_BATCH) {
        missing.extend(remote.missing(batch.to_vec()).await?);
    }
    Ok(missing)
}

/// Digests of `files` (paths relative to `root`, with the blocks each had before): one big
/// file streamed, or many small ones read whole and hashed together.
fn digest_files(
    root: &Path,
    files: HashJob,
    params: ChunkParams,
    sink: Option<HashedBlocks>,
    buffers: &Arc<chunker::ReadBuffers>,
) -> Vec<(String, std::io::Result<Digest>)> {
    let send = sink.map(|tx| move |blocks| tx.blocking_send(blocks).is_ok());
    let sink = send.as_ref().map(|f| f as chunker::BlockSink);
    let mut out = Vec::with_capacity(files.len());
    let mut read: Vec<(String, Vec<u8>)> = Vec::with_capacity(files.len());
    for (path, known) in files {
        match chunker::open_to_digest(&root.join(&path)) {
            Ok(chunker::Opened::Small(data)) => read.push((path, data)),
            // Big (or grown since the scan): streamed on its own.
            Ok(chunker::Opened::Large(file)) => {
                let d = chunker::digest_source(&file, params, known.as_ref(), sink, Some(buffers));
                out.push((path, d));
            }
            Err(e) => out.push((path, Err(e))),
        }
    }
    let bytes: Vec<&[u8]> = read.iter().map(|(_, d)| d.as_slice()).collect();
    let digests = chunker::digest_many(&bytes, params);
    out.extend(
        read.into_iter()
            .map(|(p, _)| p)
            .zip(digests.into_iter().map(Ok)),
    );
    out
}

struct Apply<'a> {
    root: &'a Path,
    remote: &'a Remote,
    remote_root: &'a str,
    scan: &'a Scan,
    synced: &'a SyncedTree,
    remote_tree: &'a RemoteTree,
    digests: HashMap<String, Digest>,
    /// Blocks sent while hashing (see [`EarlySend`]), with their lengths: counted as sent, not
    /// as deduplicated, when the upload finds them on the server.
    early_sent: HashMap<String, u64>,
    /// Files committed while hashing (see [`EarlySend`]): their upload is done.
    early_commits: EarlyCommits,
    params: ChunkParams,
    sources: &'a HashMap<String, (String, BlockRef)>,
    /// Paths whose local file was renamed to a conflicted copy in this run.
    renamed_away: HashSet<String>,
    ops: Vec<IndexOp>,
    /// Entries this run committed, as the journal will report them.
    remote_ops: Vec<RemoteOp>,
    /// Ids of the journal rows this run wrote whose effect is in `remote_ops` (folders made
    /// and files written by commits): the stored cursor may move over them.
    own_rows: Vec<i64>,
    /// Where recorded index rows go to be written while the run goes on (see `run`).
    records: Option<futures::channel::mpsc::UnboundedSender<Vec<IndexOp>>>,
    /// Whether local changes recorded in `ops` may not be durable yet (no filesystem sync
    /// since): moves, deletes, folders, conflicted copies.
    unsynced: bool,
    report: Report,
    progress: Arc<dyn Progress>,
}

/// What one chunk of an upload did (see `Apply::upload`).
#[derive(Default)]
struct ChunkUploaded {
    blocks_uploaded: u64,
    block_bytes_sent: u64,
    bytes_deduplicated: u64,
    /// Files that changed since they were hashed: not committed, they go next time.
    changed: Vec<String>,
    commits: Vec<(
        String,
        LocalEntry,
        CommitRequest,
        Result<protocol::Committed, RemoteError>,
    )>,
}

/// The requests that send `missing` blocks: many to a request, up to [`UPLOAD_BATCH_BYTES`]
/// (one durable write and one lockstep verification on the server for all of them), blocks
/// of like lengths together (a lockstep group costs what its longest block costs in every
/// lane: see `protocol::block_hashes`).
fn upload_jobs(
    root: &Path,
    scan: &Scan,
    missing: &[String],
    sources: &HashMap<&str, (&str, &BlockRef)>,
) -> Vec<Vec<UploadJob>> {
    let mut jobs: Vec<Vec<UploadJob>> = Vec::new();
    let mut batch: Vec<UploadJob> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut found: Vec<&(&str, &BlockRef)> = missing
        .iter()
        .filter_map(|h| sources.get(h.as_str()))
        .collect();
    found.sort_by_key(|(_, b)| b.len);
    for (p, b) in found {
        // A file modified in the last moments may change again within one mtime tick:
        // its blocks are re-hashed on read instead of trusting the stat.
        let scanned = scan.tree.get(*p).filter(|l| index_mtime(l) != i64::MIN);
        let job = (p.to_string(), root.join(p), (*b).clone(), scanned.cloned());
        if batch_bytes + b.len as usize > UPLOAD_BATCH_BYTES
            || batch.len() == protocol::MAX_BATCH_BLOCKS
        {
            jobs.push(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
        batch_bytes += b.len as usize;
        batch.push(job);
    }
    if !batch.is_empty() {
        jobs.push(batch);
    }
    jobs
}

/// Sends blocks, [`UPLOAD_PARALLELISM`] requests at a time. Per block: its file, its length,
/// and whether it was sent (false: the file changed since it was hashed; not sent).
async fn send_blocks(
    remote: &Remote,
    progress: &Arc<dyn Progress>,
    jobs: Vec<Vec<UploadJob>>,
) -> Result<Vec<BlockSent>, EngineError> {
    let results: Vec<Vec<BlockSent>> = stream::iter(jobs)
        .map(|job| {
            let progress = progress.clone();
            async move {
                // Read here, on the runtime's worker, not on a blocking-pool thread: the
                // buffers are freed on the workers once sent, and with allocation and free
                // on the same few threads glibc's per-thread arenas do not pile up freed
                // blocks (the client's peak RSS pushing 10 GiB: 119 → 98 MiB). Reads of at
                // most a few MiB, mostly from the page cache the hashing just filled.
                let mut outcome = Vec::with_capacity(job.len());
                let mut len = 0u64;
                let sent = if let [(path, full, b, scanned)] = &job[..] {
                    let bytes = chunker::read_block_as(full, b, scanned.as_ref())
                        .map_err(|e| EngineError::io(full, e))?;
                    match bytes {
                        Some(bytes) => {
                            len = bytes.len() as u64;
                            outcome.push((path.clone(), len, true));
                            remote.put_block(&b.hash, bytes.into()).await.map(drop)
                        }
                        // Changed since it was hashed: not sent, not committed.
                        None => {
                            outcome.push((path.clone(), 0, false));
                            Ok(())
                        }
                    }
                } else {
                    // Read straight into the request's body, each block after its header
                    // (the framing of `protocol::frame_blocks`): not read into a buffer of
                    // its own and copied again.
                    let size = job
                        .iter()
                        .map(|(_, _, b, _)| protocol::BLOCK_HEADER_LEN + b.len as usize)
                        .sum();
                    let mut body = Vec::with_capacity(size);
                    for (path, full, b, scanned) in job {
                        let at = body.len();
                        body.extend_from_slice(&protocol::block_header(&b.hash, b.len as usize));
                        let read = chunker::read_block_into(&full, &b, scanned.as_ref(), &mut body)
                            .map_err(|e| EngineError::io(&full, e))?;
                        if read {
                            len += u64::from(b.len);
                            outcome.push((path, u64::from(b.len), true));
                        } else {
                            body.truncate(at);
                            outcome.push((path, 0, false));
                        }
                    }
                    match len {
                        0 => Ok(()),
                        _ => remote.put_framed(vec![body.into()]).await.map(drop),
                    }
                };
                match sent {
                    Ok(()) => {}
                    // Bytes that no longer hash to the id computed when the file was
                    // hashed: a file of this request changed under the stat check. The
                    // server stored none of it; those files go next time.
                    Err(RemoteError::Refused { code, .. }) if code == "hash_mismatch" => {
                        for o in &mut outcome {
                            (o.1, o.2) = (0, false);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                progress.advance(len);
                Ok::<_, EngineError>(outcome)
            }
        })
        .buffer_unordered(UPLOAD_PARALLELISM)
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}

/// What became of one block sent: its file, its length, whether it went.
type BlockSent = (String, u64, bool);

/// A block to upload: the file's relative and full path, where the block lies, and the stat the
/// file had when it was hashed (`None`: re-hash the bytes read instead of trusting the stat).
type UploadJob = (String, PathBuf, BlockRef, Option<LocalEntry>);

fn now_stat(path: &Path) -> Option<LocalEntry> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| LocalEntry::from_metadata(&m))
}

/// Block lengths from a digest, for the index.
fn lens_of(d: &Digest) -> Vec<u32> {
    d.blocks.iter().map(|b| b.len).collect()
}

/// Block fingerprints from a digest, for the index: all of them, or none.
fn fps_of(d: &Digest) -> Vec<Fingerprint> {
    d.blocks
        .iter()
        .map(|b| b.fp)
        .collect::<Option<_>>()
        .unwrap_or_default()
}

/// The blocks a synced file had, by fingerprint and length, for re-hashing it after an edit
/// (none for a new file, or one recorded without fingerprints); `None` where fingerprints are
/// not kept (see [`chunker::fingerprints_pay`]): its blocks are then hashed, not fingerprinted.
fn known_blocks(s: Option<&SyncedEntry>) -> Option<KnownBlocks> {
    if !chunker::fingerprints_pay() {
        return None;
    }
    let Some(s) =
        s.filter(|s| s.block_fps.len() == s.blocks.len() && s.block_lens.len() == s.blocks.len())
    else {
        return Some(KnownBlocks::new());
    };
    let known = s
        .block_fps
        .iter()
        .zip(&s.block_lens)
        .zip(&s.blocks)
        .map(|((fp, len), hash)| ((*fp, *len), hash.clone()))
        .collect();
    Some(known)
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

    /// The index row for a path whose local and remote sides now agree, from the file's
    /// current stat.
    fn record(&mut self, path: &str, e: &protocol::Entry, shape: (Vec<u32>, Vec<Fingerprint>)) {
        let (block_lens, block_fps) = shape;
        let Some(l) = now_stat(&self.root.join(path)) else {
            return;
        };
        self.ops.push(IndexOp::Put(
            path.to_string(),
            SyncedEntry {
                ns: ROOT_NS,
                kind: l.kind,
                size: l.size,
                mtime_ns: index_mtime(&l),
                inode: l.inode,
                executable: l.executable,
                content_hash: e.content_hash.clone(),
                blocks: e.blocks.clone(),
                block_lens,
                block_fps,
                rev: e.rev,
            },
        ));
    }

    /// Hands the first `durable` index rows recorded so far to the index writer once there
    /// are enough of them for a transaction (they are written while the transfers go on), and
    /// says how many it handed over: all `durable` or none. `durable`: how many rows describe
    /// local changes the filesystem has made durable (a row written before the rename it
    /// describes could, after a power cut, tell the next run a file was deleted here). Rows of
    /// commits need no local sync.
    fn hand_over_records(&mut self, durable: usize) -> usize {
        if durable < RECORD_BATCH {
            return 0;
        }
        let Some(records) = &self.records else {
            return 0;
        };
        let batch: Vec<IndexOp> = self.ops.drain(..durable).collect();
        if let Err(e) = records.unbounded_send(batch) {
            // The writer is gone: the rows are written at the end of the run.
            let mut back = e.into_inner();
            back.append(&mut self.ops);
            self.ops = back;
            self.records = None;
            return 0;
        }
        durable
    }

    fn record_dir(&mut self, path: &str, rev: i64) {
        let entry = dir_entry(path.to_string(), rev);
        self.record(path, &entry, (Vec::new(), Vec::new()));
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

    /// Whether the local file is still as the scan saw it.
    fn unchanged_since_scan(&self, path: &str) -> bool {
        now_stat(&self.root.join(path)).as_ref() == self.scan.tree.get(path)
    }

    async fn apply(&mut self, actions: &[Action]) -> Result<(), EngineError> {
        // Folders that will hold an uploaded file.
        let mut filled: HashSet<&str> = HashSet::new();
        for a in actions {
            if let Action::Upload { path, .. } | Action::ConflictCopy { copy: path, .. } = a {
                let mut p = path.as_str();
                while let Some((parent, _)) = p.rsplit_once('/') {
                    if !filled.insert(parent) {
                        break;
                    }
                    p = parent;
                }
            }
        }
        let mut uploads = Vec::new();
        let mut downloads = Vec::new();
        for a in actions {
            if matches!(
                a,
                Action::MoveLocal { .. }
                    | Action::DeleteLocal { .. }
                    | Action::MkdirLocal { .. }
                    | Action::ConflictCopy { .. }
            ) {
                self.unsynced = true;
            }
            match a {
                Action::MoveRemote { from, to, rev } => self.move_remote(from, to, *rev).await?,
                Action::MoveLocal { from, to } => self.move_local(from, to)?,
                Action::DeleteRemote { path, rev } => self.delete_remote(path, *rev).await?,
                Action::DeleteLocal { path, kind } => self.delete_local(path, *kind)?,
                Action::MkdirRemote { path } => {
                    // A folder that receives a file is created by that file's commit (the
                    // server makes missing parents); only empty ones need a request.
                    let rev = if filled.contains(path.as_str()) {
                        0
                    } else {
                        self.remote.mkdir(&self.remote_path(path)).await?.rev
                    };
                    self.report.folders_created += 1;
                    self.record_dir(path, rev);
                }
                Action::MkdirLocal { path } => {
                    let full = self.root.join(path);
                    fs::create_dir_all(&full).map_err(io_at(&full))?;
                    self.report.folders_created += 1;
                    let rev = self.remote_tree.get(path).map_or(0, |e| e.rev);
                    self.record_dir(path, rev);
                }
                Action::ConflictCopy { path, copy } => {
                    if self.conflict_copy(path, copy)? {
                        uploads.push((copy.clone(), None));
                    }
                }
                Action::Upload { path, parent_rev } => uploads.push((path.clone(), *parent_rev)),
                Action::Download { path } => downloads.push(path.clone()),
                Action::Record { path } => {
                    if let Some(r) = self.remote_tree.get(path) {
                        let shape = self
                            .digests
                            .get(path)
                            .map(|d| (lens_of(d), fps_of(d)))
                            .unwrap_or_default();
                        self.record(path, &r.clone(), shape);
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

    async fn move_remote(&mut self, from: &str, to: &str, rev: i64) -> Result<(), EngineError> {
        let (rf, rt) = (self.remote_path(from), self.remote_path(to));
        match self.remote.move_path(&rf, &rt, Some(rev)).await {
            Ok(resp) => {
                self.report.files_moved += 1;
                // The index follows: every synced entry below `from` now lives below `to`.
                let lo = format!("{from}/");
                let hi = format!("{from}0");
                let moved: Vec<(String, SyncedEntry)> = std::iter::once(from.to_string())
                    .chain(self.synced.range(lo..hi).map(|(p, _)| p.clone()))
                    .filter_map(|p| self.synced.get(&p).map(|s| (p, s.clone())))
                    .collect();
                for (old, s) in moved {
                    let new = format!("{to}{}", &old[from.len()..]);
                    self.ops.push(IndexOp::Remove(old));
                    if let Some(l) = now_stat(&self.root.join(&new)) {
                        let rev = if new == to { resp.rev } else { s.rev };
                        self.ops.push(IndexOp::Put(
                            new,
                            SyncedEntry {
                                mtime_ns: index_mtime(&l),
                                inode: l.inode,
                                rev,
                                ..s
                            },
                        ));
                    }
                }
                Ok(())
            }
            Err(
                RemoteError::Conflict { .. }
                | RemoteError::NotFound(_)
                | RemoteError::Refused { .. },
            ) => {
                // The server moved on meanwhile; the next pass sees it as a delete and a new file.
                self.report.retry = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn move_local(&mut self, from: &str, to: &str) -> Result<(), EngineError> {
        let (src, dst) = (self.root.join(from), self.root.join(to));
        if !self.unchanged_since_scan(from) || now_stat(&dst).is_some() {
            self.report.retry = true;
            return Ok(());
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::rename(&src, &dst).map_err(io_at(&src))?;
        self.report.files_moved += 1;
        self.ops.push(IndexOp::Remove(from.to_string()));
        if let Some(r) = self.remote_tree.get(to).cloned() {
            let shape = self
                .synced
                .get(from)
                .map(|s| (s.block_lens.clone(), s.block_fps.clone()))
                .unwrap_or_default();
            self.record(to, &r, shape);
        }
        Ok(())
    }

    /// Renames the local file to its conflicted-copy name; false when it changed meanwhile
    /// (then it is left alone and the next pass decides again).
    fn conflict_copy(&mut self, path: &str, copy: &str) -> Result<bool, EngineError> {
        let (src, dst) = (self.root.join(path), self.root.join(copy));
        if !self.unchanged_since_scan(path) || now_stat(&dst).is_some() {
            self.report.retry = true;
            return Ok(false);
        }
        fs::rename(&src, &dst).map_err(io_at(&src))?;
        if let Some(d) = self.digests.get(path).cloned() {
            self.digests.insert(copy.to_string(), d);
        }
        self.renamed_away.insert(path.to_string());
        self.report.conflict_copies.push(ConflictCopy {
            path: path.to_string(),
            copy: copy.to_string(),
        });
        Ok(true)
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
                // Changed on the server since we looked: the edit wins, the next pass brings it.
                self.report.retry = true;
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
                if !self.unchanged_since_scan(path) {
                    self.report.retry = true;
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

    /// Uploads files: in chunks of at most [`COMMIT_BATCH`] files and [`UPLOAD_CHUNK_BYTES`]
    /// of content, each checked against the server, sent and committed on its own, with
    /// [`UPLOAD_CHUNKS_IN_FLIGHT`] chunks at a time so the next chunk's blocks travel while this
    /// one commits. A run killed halfway keeps every chunk it committed. New files committed
    /// while hashing (see [`EarlySend`]) are taken as uploaded, their outcomes as the commits'.
    async fn upload(&mut self, files: Vec<(String, Option<i64>)>) -> Result<(), EngineError> {
        // Files planned without a digest (renamed ones whose hash came from the index).
        let undigested: Vec<(String, u64, Option<KnownBlocks>)> = files
            .iter()
            .filter(|(p, _)| !self.digests.contains_key(p))
            .map(|(p, _)| (p.clone(), 0, known_blocks(None)))
            .collect();
        if !undigested.is_empty() {
            let (more, _, _) = hash_files(
                self.root,
                undigested,
                self.params,
                &self.progress,
                &mut self.report,
                None,
            )
            .await?;
            self.digests.extend(more);
        }
        let size_of = |p: &str| self.digests.get(p).map_or(0, |d| d.size);
        let total: u64 = files.iter().map(|(p, _)| size_of(p)).sum();
        // Those committed while hashing, as new files: done (see `EarlySend::commit`).
        let mut early = Vec::new();
        let files: Vec<(String, Option<i64>)> = files
            .into_iter()
            .filter(|(path, parent_rev)| {
                let Some((l, r)) = parent_rev
                    .is_none()
                    .then(|| self.early_commits.remove(path))
                    .flatten()
                    .filter(|_| self.digests.contains_key(path))
                else {
                    return true;
                };
                early.push((path.clone(), l, r));
                false
            })
            .collect();
        let mut chunks: Vec<Vec<(String, Option<i64>)>> = Vec::new();
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0u64;
        for f in files {
            let size = size_of(&f.0);
            if !chunk.is_empty()
                && (chunk.len() == COMMIT_BATCH || chunk_bytes + size > UPLOAD_CHUNK_BYTES)
            {
                chunks.push(std::mem::take(&mut chunk));
                chunk_bytes = 0;
            }
            chunk_bytes += size;
            chunk.push(f);
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
        self.progress.start("uploading", total);
        let t0 = std::time::Instant::now();
        // Their blocks were sent while hashing (counted then), or the server had them.
        let mut seen = HashSet::new();
        let mut early_deduplicated: u64 = early
            .iter()
            .flat_map(|(path, ..)| self.digests.get(path).into_iter().flat_map(|d| &d.blocks))
            .filter(|b| seen.insert(&b.hash) && !self.early_sent.contains_key(&b.hash))
            .map(|b| u64::from(b.len))
            .sum();
        drop(seen);
        // A batch at a time, as the upload's own chunks: their records go to the index as
        // they are made, not all at once.
        let mut early = early.into_iter().peekable();
        while early.peek().is_some() {
            let digests = std::mem::take(&mut self.digests);
            let mut done = ChunkUploaded {
                bytes_deduplicated: std::mem::take(&mut early_deduplicated),
                ..ChunkUploaded::default()
            };
            let mut bytes = 0;
            for (path, l, r) in early.by_ref().take(COMMIT_BATCH) {
                if let Some(d) = digests.get(&path) {
                    let req = commit_request(self.remote_root, &path, None, d, &l);
                    bytes += req.size;
                    done.commits.push((path, l, req, r));
                }
            }
            let absorbed = self.absorb_upload(done, &digests);
            self.digests = digests;
            absorbed?;
            self.progress.advance(bytes);
            if !self.unsynced {
                self.hand_over_records(self.ops.len());
            }
        }
        // Lent to the chunks while their outcomes are absorbed as they come.
        let digests = std::mem::take(&mut self.digests);
        let early_sent = std::mem::take(&mut self.early_sent);
        let cx = UploadCx {
            root: self.root,
            remote: self.remote,
            remote_root: self.remote_root,
            scan: self.scan,
            digests: &digests,
            early_sent: &early_sent,
            progress: self.progress.clone(),
        };
        let mut sent = stream::iter(chunks)
            .map(|c| cx.upload_chunk(c))
            .buffer_unordered(UPLOAD_CHUNKS_IN_FLIGHT);
        let mut failed = None;
        while let Some(r) = sent.next().await {
            // A failure stops starting chunks; what committed so far is recorded.
            if let Err(e) = r.and_then(|o| self.absorb_upload(o, &digests)) {
                failed = Some(e);
                break;
            }
            if self.ops.len() >= RECORD_BATCH && self.unsynced {
                // Rows of local changes made before the upload are among them.
                if let Err(e) = sync_filesystem(self.root) {
                    failed = Some(io_at(self.root)(e));
                    break;
                }
                self.unsynced = false;
            }
            if !self.unsynced {
                self.hand_over_records(self.ops.len());
            }
        }
        drop(sent);
        self.digests = digests;
        self.early_sent = early_sent;
        self.progress.finish();
        tracing::debug!(elapsed = ?t0.elapsed(), "upload: sent and committed");
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// What the chunks of an upload read: borrowed from [`Apply`] while it absorbs their outcomes.
struct UploadCx<'a> {
    root: &'a Path,
    remote: &'a Remote,
    remote_root: &'a str,
    scan: &'a Scan,
    digests: &'a HashMap<String, Digest>,
    early_sent: &'a EarlySent,
    progress: Arc<dyn Progress>,
}

impl UploadCx<'_> {
    /// One chunk of an upload: which blocks the server lacks, sending them, then one commit
    /// request for the chunk's files. The caller absorbs the result.
    async fn upload_chunk(
        &self,
        files: Vec<(String, Option<i64>)>,
    ) -> Result<ChunkUploaded, EngineError> {
        // Each distinct block once, with where to read it from.
        let mut sources: HashMap<&str, (&str, &BlockRef)> = HashMap::new();
        let mut total_bytes = 0u64;
        for (path, _) in &files {
            if let Some(d) = self.digests.get(path) {
                for b in &d.blocks {
                    total_bytes += u64::from(b.len);
                    sources.entry(&b.hash).or_insert((path, b));
                }
            }
        }
        // Blocks sent earlier in this run are on the server, held for this user through the
        // upload grace period: not asked about again.
        let unsent: HashMap<&str, (&str, &BlockRef)> = sources
            .iter()
            .filter(|(h, _)| !self.early_sent.contains_key(**h))
            .map(|(h, s)| (*h, *s))
            .collect();
        let missing = missing_blocks(self.remote, &unsent).await?;
        let root = self.root;
        let remote = self.remote;
        let progress = self.progress.clone();
        let mut out = ChunkUploaded::default();
        let mut changed: HashSet<String> = HashSet::new();
        // A window of blocks at a time: the per-block requests and results of a huge file
        // never all exist at once.
        for window in missing.chunks(UPLOAD_WINDOW) {
            let jobs = upload_jobs(root, self.scan, window, &sources);
            for (path, len, sent) in send_blocks(remote, &progress, jobs).await? {
                if sent {
                    out.blocks_uploaded += 1;
                    out.block_bytes_sent += len;
                } else {
                    changed.insert(path);
                }
            }
        }
        let sent_early: u64 = sources.keys().filter_map(|h| self.early_sent.get(*h)).sum();
        out.bytes_deduplicated = total_bytes
            .saturating_sub(out.block_bytes_sent)
            .saturating_sub(sent_early);
        // What was deduplicated or sent while hashing counts as done too.
        progress.advance(out.bytes_deduplicated + sent_early);
        let commits: Vec<(String, LocalEntry, CommitRequest)> = files
            .iter()
            .filter(|(p, _)| !changed.contains(p))
            .filter_map(|(path, parent_rev)| {
                let d = self.digests.get(path)?;
                let l = self
                    .scan
                    .tree
                    .get(path)
                    .cloned()
                    .or_else(|| now_stat(&self.root.join(path)))?;
                let req = commit_request(self.remote_root, path, *parent_rev, d, &l);
                Some((path.clone(), l, req))
            })
            .collect();
        out.changed = changed.into_iter().collect();
        // One request and one durable transaction for the chunk's commits.
        if !commits.is_empty() {
            let reqs: Vec<CommitRequest> = commits.iter().map(|(_, _, r)| r.clone()).collect();
            let outcomes = remote.commit_batch(reqs).await?;
            for ((path, l, req), r) in commits.into_iter().zip(outcomes) {
                out.commits.push((path, l, req, r));
            }
        }
        Ok(out)
    }
}

impl Apply<'_> {
    /// Records what an upload chunk did: counts, warnings, conflicts, index and remote ops.
    fn absorb_upload(
        &mut self,
        o: ChunkUploaded,
        digests: &HashMap<String, Digest>,
    ) -> Result<(), EngineError> {
        self.report.blocks_uploaded += o.blocks_uploaded;
        self.report.block_bytes_sent += o.block_bytes_sent;
        self.report.bytes_deduplicated += o.bytes_deduplicated;
        for path in o.changed {
            self.report.retry = true;
            self.report.warnings.push(format!(
                "{path} changed while being uploaded; it will go next time"
            ));
        }
        for (path, l, req, r) in o.commits {
            match r {
                Ok(resp) => {
                    self.report.files_uploaded += 1;
                    // The index records the stat seen when the file was hashed: an edit since
                    // then has another stat and is picked up by the next run.
                    let (block_lens, block_fps) = digests
                        .get(&path)
                        .map(|d| (lens_of(d), fps_of(d)))
                        .unwrap_or_default();
                    let entry = protocol::Entry {
                        path: path.clone(),
                        kind: EntryKind::File,
                        rev: resp.rev,
                        size: req.size,
                        content_hash: Some(req.content_hash.clone()),
                        mtime: req.mtime,
                        executable: req.executable,
                        blocks: req.blocks.clone(),
                    };
                    if resp.written {
                        // The rows this commit wrote, as the journal holds them: the folders
                        // it made (top-down, right before the file's row), then the file.
                        let first = resp.rev - resp.dirs.len() as i64;
                        for (id, dir) in (first..).zip(&resp.dirs) {
                            if let Some(rel) = relative_to(self.remote_root, dir) {
                                self.remote_ops
                                    .push(RemoteOp::Put(rel.clone(), dir_entry(rel, id)));
                            }
                        }
                        self.own_rows.extend(first..=resp.rev);
                        self.remote_ops.push(RemoteOp::Put(path.clone(), entry));
                    } else if self
                        .remote_tree
                        .get(&path)
                        .is_none_or(|r| r.rev != resp.rev || r.content_hash != entry.content_hash)
                    {
                        // The server had this content already, in a row this run has not
                        // read (its mtime may differ; the journal corrects it).
                        self.remote_ops.push(RemoteOp::Put(path.clone(), entry));
                    }
                    self.ops.push(IndexOp::Put(
                        path.clone(),
                        SyncedEntry {
                            ns: ROOT_NS,
                            kind: EntryKind::File,
                            size: l.size,
                            mtime_ns: index_mtime(&l),
                            inode: l.inode,
                            executable: l.executable,
                            content_hash: Some(req.content_hash),
                            blocks: req.blocks,
                            block_lens,
                            block_fps,
                            rev: resp.rev,
                        },
                    ));
                }
                Err(RemoteError::Conflict { message, .. }) => {
                    // Someone committed first. Two-way: the next pass makes a conflicted copy.
                    self.report.retry = true;
                    self.conflict(&path, message);
                }
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
        let sources = self.sources;
        let jobs: Vec<_> = files
            .iter()
            .filter_map(|p| self.remote_tree.get(p).map(|e| (p.clone(), e.clone())))
            .map(|(p, e)| {
                // What must be at the destination for the download to replace it.
                let expected = if self.renamed_away.contains(&p) {
                    None
                } else {
                    self.scan.tree.get(&p).cloned()
                };
                (p, e, expected)
            })
            .collect();
        // Small files whose blocks are not on disk already come many to a request, and are
        // made durable together (one filesystem sync); others one by one, blocks in flight.
        let (small, large): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(_, e, _)| {
            e.size as usize <= DOWNLOAD_SMALL_FILE
                && e.blocks.iter().all(|h| !sources.contains_key(h))
        });
        let mut groups: Vec<Vec<(String, protocol::Entry, Option<LocalEntry>)>> = Vec::new();
        let (mut group, mut group_bytes, mut group_blocks) = (Vec::new(), 0usize, 0usize);
        for job in small {
            let (bytes, blocks) = (job.1.size as usize, job.1.blocks.len());
            if !group.is_empty()
                && (group_bytes + bytes > DOWNLOAD_BATCH_BYTES
                    || group_blocks + blocks > protocol::MAX_BATCH_BLOCKS)
            {
                groups.push(std::mem::take(&mut group));
                (group_bytes, group_blocks) = (0, 0);
            }
            group_bytes += bytes;
            group_blocks += blocks;
            group.push(job);
        }
        if !group.is_empty() {
            groups.push(group);
        }
        let clock = Arc::new(SyncClock::default());
        let grouped = stream::iter(groups)
            .map(|g| {
                let progress = progress.clone();
                let clock = clock.clone();
                async move { download_group(root, remote, g, &progress, clock).await }
            })
            .buffer_unordered(DOWNLOAD_GROUPS_IN_FLIGHT)
            .flat_map(stream::iter);
        let source = BlockSource {
            root,
            remote,
            sources,
            max_block: self.params.max,
        };
        let source = &source;
        let single = stream::iter(large)
            .map(|(path, entry, expected)| {
                let progress = progress.clone();
                async move {
                    let r = download_one(source, &path, &entry, expected.as_ref(), &progress).await;
                    (path, entry, r)
                }
            })
            .buffer_unordered(DOWNLOAD_FILES_PARALLELISM);
        // Both at once: a big file downloads while the small ones are written. Each file is
        // recorded as it lands, its row handed to the index writer once a filesystem sync
        // that started after its rename has completed (`landed`: marks and row counts, in
        // order; `durable`: rows known durable, not yet handed over).
        let mut results = stream::select(grouped, single);
        let mut landed: std::collections::VecDeque<(u64, usize)> = Default::default();
        let mut durable = 0;
        // Whether any file was renamed into place (its rename waits for the sync below).
        let mut renamed = false;
        let mut first_err = None;
        while let Some((path, entry, r)) = results.next().await {
            match r {
                Ok(Some(got)) => {
                    self.report.files_downloaded += 1;
                    self.report.blocks_downloaded += got.blocks_fetched;
                    self.report.block_bytes_received += got.bytes_fetched;
                    self.report.bytes_reused += got.bytes_reused;
                    renamed = true;
                    self.record(&path, &entry, (got.block_lens, got.block_fps));
                }
                Ok(None) => {
                    self.report.retry = true;
                    self.conflict(&path, "changed locally during the download; kept yours");
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            landed.push_back((clock.mark(), self.ops.len()));
            while let Some(&(mark, rows)) = landed.front() {
                if !clock.covers(mark) {
                    break;
                }
                durable = rows;
                landed.pop_front();
            }
            let handed = self.hand_over_records(durable);
            if handed > 0 {
                durable = 0;
                for (_, rows) in landed.iter_mut() {
                    *rows -= handed;
                }
            }
        }
        drop(results);
        self.progress.finish();
        // The renames become durable with the directories: one filesystem sync for them all
        // (cheaper than an fsync per folder when a pull touches many folders).
        if (renamed || self.unsynced) && clock.sync(self.root).is_ok() {
            self.unsynced = false;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Orders the index rows of downloaded files after the filesystem syncs that make their
/// renames durable: a sync that started after a rename covers it once it has completed.
#[derive(Default)]
struct SyncClock {
    /// Syncs started, and the latest-started of those completed (by their order of start).
    started: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

impl SyncClock {
    /// Syncs the filesystem that holds `dir`.
    fn sync(&self, dir: &Path) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let seq = self.started.fetch_add(1, SeqCst) + 1;
        sync_filesystem(dir)?;
        self.completed.fetch_max(seq, SeqCst);
        Ok(())
    }

    /// A mark for the changes made so far (see [`SyncClock::covers`]).
    fn mark(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a sync started after `mark` was taken has completed.
    fn covers(&self, mark: u64) -> bool {
        self.completed.load(std::sync::atomic::Ordering::SeqCst) > mark
    }
}

/// Makes everything written to the filesystem that holds `dir` durable (`syncfs`: one call
/// for many files, cheaper than an fsync each).
fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    let d = File::open(dir)?;
    rustix::fs::syncfs(d).map_err(Into::into)
}

/// What one download took.
struct Downloaded {
    blocks_fetched: u64,
    bytes_fetched: u64,
    bytes_reused: u64,
    block_lens: Vec<u32>,
    /// Fingerprints of all the blocks, or empty (small files are not fingerprinted, nor any
    /// file where fingerprints do not pay: see [`chunker::fingerprints_pay`]).
    block_fps: Vec<Fingerprint>,
}

type Job = (String, protocol::Entry, Option<LocalEntry>);

/// Downloads a group of small files with one request, writes them all, syncs the filesystem
/// once, then renames each into place (unless its destination changed since the scan).
async fn download_group(
    root: &Path,
    remote: &Remote,
    group: Vec<Job>,
    progress: &Arc<dyn Progress>,
    clock: Arc<SyncClock>,
) -> Vec<(
    String,
    protocol::Entry,
    Result<Option<Downloaded>, EngineError>,
)> {
    let hashes: Vec<String> = group
        .iter()
        .flat_map(|(_, e, _)| e.blocks.clone())
        .collect();
    let fetched = match remote.fetch_blocks(&hashes).await {
        Ok(f) => f,
        Err(e) => {
            let msg = e.to_string();
            return group
                .into_iter()
                .map(|(p, e, _)| {
                    let err = EngineError::Remote(RemoteError::Protocol(msg.clone()));
                    (p, e, Err(err))
                })
                .collect();
        }
    };
    let root = root.to_path_buf();
    let total: u64 = fetched.iter().map(|b| b.len() as u64).sum();
    let written = blocking(move || {
        let mut blocks = fetched.into_iter();
        let mut staged = Vec::with_capacity(group.len());
        for (path, entry, expected) in group {
            let bytes: Vec<bytes::Bytes> = blocks.by_ref().take(entry.blocks.len()).collect();
            let r = stage_file(&root, &path, &entry, &bytes);
            // Written: only the lengths are kept through the sync, not the bytes.
            let lens: Vec<u32> = bytes.iter().map(|b| b.len() as u32).collect();
            staged.push((path, entry, expected, lens, r));
        }
        // One sync makes every staged file durable; then each rename.
        let synced = clock.sync(&root);
        staged
            .into_iter()
            .map(|(path, entry, expected, lens, r)| {
                let dest = root.join(&path);
                let r = match (r, &synced) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => {
                        Err(io_at(&dest)(std::io::Error::new(e.kind(), e.to_string())))
                    }
                    (Ok(tmp), Ok(())) => {
                        match rename_if_unchanged(&tmp, &dest, expected.as_ref()) {
                            Err(e) => Err(io_at(&dest)(e)),
                            // Left for the drop of `tmp` to delete.
                            Ok(false) => Ok(None),
                            Ok(true) => {
                                // In place: not to be deleted.
                                let _ = tmp.keep();
                                Ok(Some(Downloaded {
                                    blocks_fetched: lens.len() as u64,
                                    bytes_fetched: lens.iter().map(|&l| u64::from(l)).sum(),
                                    bytes_reused: 0,
                                    block_lens: lens,
                                    block_fps: Vec::new(),
                                }))
                            }
                        }
                    }
                };
                (path, entry, r)
            })
            .collect::<Vec<_>>()
    })
    .await;
    progress.advance(total);
    written
}

/// Writes one downloaded file to a temp file beside its destination (not yet synced).
fn stage_file(
    root: &Path,
    path: &str,
    entry: &protocol::Entry,
    blocks: &[bytes::Bytes],
) -> Result<tempfile::TempPath, EngineError> {
    let (dest, mut file, tmp_path) = temp_beside(root, path)?;
    let mut size = 0u64;
    for b in blocks {
        file.write_all(b).map_err(io_at(&dest))?;
        size += b.len() as u64;
    }
    if blocks.len() != entry.blocks.len() {
        return Err(EngineError::Remote(RemoteError::Protocol(format!(
            "/{path}: received {} blocks, expected {}",
            blocks.len(),
            entry.blocks.len()
        ))));
    }
    finish_file(&file, entry, path, size, &dest)?;
    Ok(tmp_path)
}

/// A temp file beside where `path` goes (its folder created if needed).
fn temp_beside(
    root: &Path,
    path: &str,
) -> Result<(PathBuf, File, tempfile::TempPath), EngineError> {
    let dest = root.join(path);
    let dir = dest.parent().unwrap_or(root).to_path_buf();
    let create = || {
        tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&dir)
    };
    // The folder is made only when it is missing: two system calls a file fewer than asking
    // for it first (20,000 files a pull of the bench dataset).
    let tmp = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            create()
        }
        r => r,
    }
    .map_err(io_at(&dir))?;
    let (file, tmp_path) = tmp.into_parts();
    Ok((dest, file, tmp_path))
}

/// Checks a downloaded file's size, then gives it the entry's mode and mtime.
fn finish_file(
    file: &File,
    entry: &protocol::Entry,
    path: &str,
    received: u64,
    dest: &Path,
) -> Result<(), EngineError> {
    if received != entry.size {
        return Err(EngineError::Remote(RemoteError::Protocol(format!(
            "/{path}: received {received} bytes, expected {}",
            entry.size
        ))));
    }
    let mode = if entry.executable { 0o755 } else { 0o644 };
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(dest))?;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_millis(entry.mtime.max(0) as u64);
    file.set_modified(mtime).map_err(io_at(dest))?;
    Ok(())
}

/// Where a big file's blocks come from: unchanged local files that hold them, else the server.
struct BlockSource<'a> {
    root: &'a Path,
    remote: &'a Remote,
    sources: &'a HashMap<String, (String, BlockRef)>,
    /// The largest block the server's chunking makes.
    max_block: u32,
}

impl BlockSource<'_> {
    /// Blocks fetched per request for `entry`: lockstep verification wants many at once (see
    /// `protocol::block_hashes`), the server's batch limit caps their bytes. Block sizes are
    /// not known before they arrive, so this counts on the file's average block plus a quarter
    /// (random data: ~10 blocks of ~1.2 MiB); a request the server still finds too large is
    /// split (see [`BlockSource::fetch_remote`]).
    fn per_fetch(&self, entry: &protocol::Entry) -> usize {
        let average = entry.size / entry.blocks.len().max(1) as u64;
        let expected = (average + average / 4).clamp(1, u64::from(self.max_block.max(1)));
        (protocol::MAX_BATCH_BYTES as u64 / expected).clamp(1, 16) as usize
    }

    /// Blocks from the server, in order, not verified (`download_one` verifies them, a window
    /// at a time): in one request, or, when the server finds that too large (413), in halves
    /// of it, down to one block at a time.
    async fn fetch_remote(&self, hashes: &[String]) -> Result<Vec<bytes::Bytes>, EngineError> {
        let mut out = Vec::with_capacity(hashes.len());
        // Parts still to fetch, the next on top.
        let mut parts = vec![hashes];
        while let Some(part) = parts.pop() {
            match self.remote.fetch_blocks_unverified(part).await {
                Err(RemoteError::Refused { status: 413, .. }) if part.len() > 1 => {
                    tracing::debug!(blocks = part.len(), "too large for one request; split");
                    let (first, rest) = part.split_at(part.len() / 2);
                    parts.push(rest);
                    parts.push(first);
                }
                Err(RemoteError::Refused { status: 413, .. }) => {
                    out.push(self.remote.get_block(&part[0]).await?);
                }
                other => out.extend(other?),
            }
        }
        Ok(out)
    }

    /// Fetches again, alone and verified at the source, a block that did not match its id.
    async fn fetch_again(&self, want: &str) -> Result<bytes::Bytes, EngineError> {
        tracing::warn!(block = %want, "a downloaded block did not match its id; fetching it again");
        Ok(self.remote.get_block(want).await?)
    }

    /// Verifies fetched blocks against `hashes` (those read from local files were verified
    /// as they were read) and fingerprints them all where that pays, on a blocking thread. A
    /// block that is not what its id says (damaged on the way) is fetched again alone,
    /// verified at the source.
    async fn verified(
        &self,
        hashes: &[String],
        blocks: Vec<(bytes::Bytes, bool)>,
    ) -> Result<Vec<Fetched>, EngineError> {
        let wanted = hashes.to_vec();
        let (mut blocks, bad) = blocking(move || {
            let mut bad = Vec::new();
            let blocks: Vec<Fetched> = blocks
                .into_iter()
                .enumerate()
                .map(|(k, (bytes, reused))| {
                    if !reused && protocol::block_hash(&bytes) != wanted[k] {
                        bad.push(k);
                    }
                    let fp = chunker::fingerprints_pay().then(|| chunker::fingerprint(&bytes));
                    Fetched {
                        bytes,
                        reused,
                        fp,
                        again: 0,
                    }
                })
                .collect();
            (blocks, bad)
        })
        .await;
        for k in bad {
            let bytes = self.fetch_again(&hashes[k]).await?;
            let block = &mut blocks[k];
            block.fp = chunker::fingerprints_pay().then(|| chunker::fingerprint(&bytes));
            block.again = bytes.len() as u64;
            block.bytes = bytes;
        }
        Ok(blocks)
    }

    /// Blocks, in order: each from an unchanged local file that holds it (re-verified), else
    /// from the server (not verified yet), those in one request (or one by one if the server
    /// finds it too large). With each, whether it was reused from a local file.
    async fn fetch(&self, hashes: &[String]) -> Result<Vec<(bytes::Bytes, bool)>, EngineError> {
        let root = self.root;
        let mut out: Vec<Option<(bytes::Bytes, bool)>> = vec![None; hashes.len()];
        for (slot, hash) in out.iter_mut().zip(hashes) {
            if let Some((path, block)) = self.sources.get(hash) {
                let (full, block) = (root.join(path), block.clone());
                if let Ok(Some(bytes)) = blocking(move || chunker::read_block(&full, &block)).await
                {
                    *slot = Some((bytes::Bytes::from(bytes), true));
                }
            }
        }
        let wanted: Vec<String> = hashes
            .iter()
            .zip(&out)
            .filter(|(_, slot)| slot.is_none())
            .map(|(h, _)| h.clone())
            .collect();
        let fetched = self.fetch_remote(&wanted).await?;
        let mut fetched = fetched.into_iter();
        Ok(out
            .into_iter()
            .map(|slot| slot.or_else(|| Some((fetched.next()?, false))))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RemoteError::Protocol("fewer blocks than asked for".into()))?)
    }
}

/// A block of a big download, verified (with its fingerprint) or to be verified.
struct Fetched {
    bytes: bytes::Bytes,
    /// Read from a local file rather than fetched.
    reused: bool,
    fp: Option<Fingerprint>,
    /// Bytes fetched again because the first copy did not match its id.
    again: u64,
}

/// A big download's writer (see `download_one`): idle, or writing a group's blocks on a
/// blocking thread.
enum Writer {
    Idle(direct::SequentialWriter),
    Writing(tokio::task::JoinHandle<(direct::SequentialWriter, std::io::Result<()>)>),
    /// Only while changing state, or after a failed write.
    Gone,
}

impl Writer {
    /// The writer, once the writes under way succeeded (`Gone` until it is put back).
    async fn take(&mut self) -> std::io::Result<direct::SequentialWriter> {
        match std::mem::replace(self, Writer::Gone) {
            Writer::Idle(w) => Ok(w),
            Writer::Writing(handle) => {
                let (w, r) = handle.await.map_err(std::io::Error::other)?;
                r.map(|()| w)
            }
            Writer::Gone => Err(std::io::Error::other("an earlier write failed")),
        }
    }

    /// Waits for the writes under way.
    async fn idle(&mut self) -> std::io::Result<()> {
        *self = Writer::Idle(self.take().await?);
        Ok(())
    }

    /// Appends `blocks` on a blocking thread, once the writes before them succeeded.
    async fn write(&mut self, blocks: Vec<bytes::Bytes>) -> std::io::Result<()> {
        let mut w = self.take().await?;
        *self = Writer::Writing(tokio::task::spawn_blocking(move || {
            let r = blocks.iter().try_for_each(|b| w.write(b));
            (w, r)
        }));
        Ok(())
    }

    /// Waits for the writes, writes what is staged, and returns the ordinary handle.
    async fn finish(mut self) -> std::io::Result<File> {
        self.take().await?.finish()
    }
}

/// The outcome of a background flush started by `download_one`.
async fn flushed(flush: tokio::task::JoinHandle<std::io::Result<()>>) -> std::io::Result<()> {
    flush.await.map_err(std::io::Error::other)?
}

/// A window of a big download being verified (see `download_one`).
type Verifying = tokio::task::JoinHandle<std::io::Result<Vec<(usize, BlockRef)>>>;

/// Starts verifying a window of a big download: its blocks read back from the partial file.
fn verify(
    reader: &Arc<File>,
    buffers: &Arc<chunker::ReadBuffers>,
    window: Vec<chunker::Cut>,
) -> Verifying {
    let (reader, buffers) = (reader.clone(), buffers.clone());
    tokio::task::spawn_blocking(move || {
        chunker::hash_cuts(&*reader, window, &buffers, chunker::fingerprints_pay())
    })
}

/// Waits for a window's verification and takes its fingerprints. A block that is not what its
/// id says (damaged on the way) is fetched again alone, verified at the source, and written
/// over the bad one. Returns the bytes fetched again.
async fn checked(
    verifying: Verifying,
    source: &BlockSource<'_>,
    entry: &protocol::Entry,
    (file, part): (&File, &Path),
    fps: &mut [Option<Fingerprint>],
) -> Result<u64, EngineError> {
    use std::os::unix::fs::FileExt;
    let named = verifying
        .await
        .map_err(std::io::Error::other)
        .and_then(|named| named)
        .map_err(io_at(part))?;
    let mut again = 0;
    for (i, block) in named {
        let want = &entry.blocks[i];
        if block.hash == *want {
            fps[i] = block.fp;
            continue;
        }
        let bytes = source.fetch_again(want).await?;
        if bytes.len() != block.len as usize {
            return Err(RemoteError::Protocol(format!(
                "block {want} came back with another length on a second fetch"
            ))
            .into());
        }
        file.write_all_at(&bytes, block.offset)
            .map_err(io_at(part))?;
        fps[i] = chunker::fingerprints_pay().then(|| chunker::fingerprint(&bytes));
        again += bytes.len() as u64;
    }
    Ok(again)
}

/// Downloads one file into place. Returns `None` when the destination changed since the scan
/// (then nothing was replaced).
async fn download_one(
    source: &BlockSource<'_>,
    path: &str,
    entry: &protocol::Entry,
    expected: Option<&LocalEntry>,
    progress: &Arc<dyn Progress>,
) -> Result<Option<Downloaded>, EngineError> {
    let root = source.root;
    // A big file downloads into a partial file named after its content, kept if the run is
    // killed: the next run keeps every block already written (re-verified) and fetches the rest.
    let dest = root.join(path);
    let dir = dest.parent().unwrap_or(root).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let hash = entry.content_hash.as_deref().unwrap_or("unknown");
    let part = dir.join(format!("{PART_PREFIX}{}", &hash[..hash.len().min(32)]));
    // Content-defined boundaries: the partial file's complete chunks are the file's first
    // chunks (the cut-short last one hashes differently and is fetched again).
    let already: HashMap<u64, (String, u32, Option<Fingerprint>)> = if part.exists() {
        let p = part.clone();
        blocking(move || {
            chunker::digest_file(&p, ChunkParams::DEFAULT, known_blocks(None).as_ref())
        })
        .await
        .map(|d| {
            d.blocks
                .into_iter()
                .map(|b| (b.offset, (b.hash, b.len, b.fp)))
                .collect()
        })
        .unwrap_or_default()
    } else {
        HashMap::new()
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(io_at(&part))?;
    let mut got = Downloaded {
        blocks_fetched: 0,
        bytes_fetched: 0,
        bytes_reused: 0,
        block_lens: Vec::with_capacity(entry.blocks.len()),
        block_fps: Vec::new(),
    };
    // Fingerprinted as they are verified where SHA-256 is slow (see
    // `chunker::fingerprints_pay`), so a later edit of the file re-hashes only what changed.
    let mut fps: Vec<Option<Fingerprint>> = vec![None; entry.blocks.len()];
    // Blocks already in the partial file at the right offset are skipped (their offsets
    // follow from the lengths of the blocks before them, which are re-verified as they pass).
    let mut offset = 0u64;
    let mut i = 0;
    while let Some((hash, len, fp)) = already.get(&offset) {
        if i >= entry.blocks.len() || *hash != entry.blocks[i] {
            break;
        }
        let len = u64::from(*len);
        got.bytes_reused += len;
        got.block_lens.push(len as u32);
        fps[i] = *fp;
        progress.advance(len);
        offset += len;
        i += 1;
    }
    // With SHA extensions, blocks are verified as they arrive, one at a time, and written to
    // the disk directly (see `direct`). Without them, lockstep hashing wants groups of like
    // lengths: blocks are written as they come and verified a window at a time, on a blocking
    // thread, while the next ones come, read back from the page cache in groups of like
    // lengths (see `chunker::GROUP_CHUNKS`; blocks in file order made lanes wait on the
    // longest one). Nothing is renamed into place before every block is verified; a killed
    // run's partial file is re-verified by the next one.
    let in_memory = protocol::sha_extensions();
    let writer = direct::SequentialWriter::new(file, &part, offset, in_memory && direct::allowed())
        .map_err(io_at(&part))?;
    let mut groups = stream::iter(entry.blocks[i..].chunks(source.per_fetch(entry)))
        .map(|hashes| async move {
            let blocks = source.fetch(hashes).await?;
            if in_memory {
                source.verified(hashes, blocks).await
            } else {
                Ok(blocks
                    .into_iter()
                    .map(|(bytes, reused)| Fetched {
                        bytes,
                        reused,
                        fp: None,
                        again: 0,
                    })
                    .collect())
            }
        })
        .buffered(DOWNLOAD_FETCHES_IN_FLIGHT);
    let mut received = offset;
    let reader = Arc::new(writer.file().try_clone().map_err(io_at(&part))?);
    // Each fetched group's bytes are written on a blocking thread (direct writes wait for the
    // disk) while the next groups come: one group's writes at a time, in order.
    let mut writer = Writer::Idle(writer);
    // The disk is asked to catch up every WRITEBACK_BYTES, on a blocking thread, while the
    // download goes on: with much RAM the kernel starts writing dirty pages late, and the final
    // fsync of a big file would otherwise wait for all of it (~1 s for 512 MiB here).
    let mut flushing: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
    let mut unflushed = 0u64;
    let buffers = chunker::ReadBuffers::for_verifying(source.max_block);
    let mut unverified: Vec<chunker::Cut> = Vec::new();
    let mut unverified_bytes = 0u64;
    let mut verifying: Option<Verifying> = None;
    while let Some(group) = groups.next().await {
        if unflushed >= WRITEBACK_BYTES && flushing.as_ref().is_none_or(|f| f.is_finished()) {
            if let Some(done) = flushing.take() {
                flushed(done).await.map_err(io_at(&part))?;
            }
            let f = reader.clone();
            flushing = Some(tokio::task::spawn_blocking(move || f.sync_data()));
            unflushed = 0;
        }
        let group = group?;
        let mut bytes = Vec::with_capacity(group.len());
        for block in group {
            let len = block.bytes.len() as u64;
            if block.reused {
                got.bytes_reused += len;
            } else {
                got.blocks_fetched += 1;
                got.bytes_fetched += len + block.again;
            }
            if in_memory {
                fps[got.block_lens.len()] = block.fp;
            } else {
                unverified.push((got.block_lens.len(), received, block.bytes.len()));
                unverified_bytes += len;
            }
            got.block_lens.push(len as u32);
            received += len;
            unflushed += len;
            progress.advance(len);
            bytes.push(block.bytes);
        }
        writer.write(bytes).await.map_err(io_at(&part))?;
        if unverified_bytes >= chunker::WINDOW_BYTES {
            // A window is read back once its bytes are written (through `reader`, the same
            // file as the writer's handle).
            writer.idle().await.map_err(io_at(&part))?;
            if let Some(v) = verifying.take() {
                let file = &*reader;
                got.bytes_fetched += checked(v, source, entry, (file, &part), &mut fps).await?;
            }
            let window = std::mem::take(&mut unverified);
            verifying = Some(verify(&reader, &buffers, window));
            unverified_bytes = 0;
        }
    }
    let file = writer.finish().await.map_err(io_at(&part))?;
    if let Some(v) = verifying {
        got.bytes_fetched += checked(v, source, entry, (&file, &part), &mut fps).await?;
    }
    if !unverified.is_empty() {
        let v = verify(&reader, &buffers, unverified);
        got.bytes_fetched += checked(v, source, entry, (&file, &part), &mut fps).await?;
    }
    if let Some(done) = flushing {
        // A failed flush is reported (a later fsync may not see the error again).
        flushed(done).await.map_err(io_at(&part))?;
    }
    got.block_fps = fps.into_iter().collect::<Option<_>>().unwrap_or_default();
    file.set_len(received).map_err(io_at(&part))?;
    finish_file(&file, entry, path, received, &dest)?;
    file.sync_all().map_err(io_at(&part))?;
    drop(file);
    if !rename_if_unchanged(&part, &dest, expected).map_err(io_at(&dest))? {
        return Ok(None);
    }
    Ok(Some(got))
}

/// Renames a downloaded file from `from` to `dest` if `dest` is still as the scan saw it
/// (`expected`; `None`: nothing there); whether it did. Where nothing is expected the rename
/// itself refuses to replace anything (`RENAME_NOREPLACE`), so a file created there since
/// the scan, even a moment before, is never overwritten (and no `stat` is needed first);
/// filesystems without it get the check then the rename, as does a replacement.
fn rename_if_unchanged(
    from: &Path,
    dest: &Path,
    expected: Option<&LocalEntry>,
) -> std::io::Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    if expected.is_none() {
        match renameat_with(CWD, from, CWD, dest, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::EXIST) => return Ok(false),
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if now_stat(dest).as_ref() != expected {
        return Ok(false);
    }
    fs::rename(from, dest)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A download goes in place only over what the scan saw there: over nothing, never over
    /// a file that appeared since (the rename itself refuses), and over a file only while it
    /// is unchanged.
    #[test]
    fn downloads_never_replace_what_changed_since_the_scan() {
        let root = tempfile::tempdir().unwrap();
        let (from, dest) = (root.path().join("from"), root.path().join("dest"));
        fs::write(&from, b"downloaded").unwrap();
        assert!(rename_if_unchanged(&from, &dest, None).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"downloaded");
        assert!(!from.exists());
        // Appeared since a scan that saw nothing: kept, and the download stays where it was.
        fs::write(&from, b"newer download").unwrap();
        assert!(!rename_if_unchanged(&from, &dest, None).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"downloaded");
        assert!(from.exists());
        // Replaced while as the scan saw it; not once it changed.
        let seen = now_stat(&dest).unwrap();
        assert!(rename_if_unchanged(&from, &dest, Some(&seen)).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"newer download");
        fs::write(&from, b"third").unwrap();
        fs::write(&dest, b"edited here since").unwrap();
        assert!(!rename_if_unchanged(&from, &dest, Some(&seen)).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"edited here since");
    }

    /// A temp file lands beside its destination whether the folders on the way exist or not.
    #[test]
    fn temp_files_go_beside_their_destination_making_missing_folders() {
        let root = tempfile::tempdir().unwrap();
        for path in ["top.txt", "a/b/c/deep.txt", "a/b/sibling.txt"] {
            let (dest, mut file, tmp) = temp_beside(root.path(), path).unwrap();
            assert_eq!(dest, root.path().join(path));
            assert_eq!(tmp.parent(), dest.parent());
            file.write_all(path.as_bytes()).unwrap();
            tmp.persist(&dest).unwrap();
            assert_eq!(fs::read(&dest).unwrap(), path.as_bytes());
        }
    }
}
