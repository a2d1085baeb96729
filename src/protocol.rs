//! Wire types and routes shared by client and server.
//!
//! Both ends import these, so a wire change is a compile error, not a runtime surprise. New fields
//! are `Option` (or defaulted) with `#[serde(default)]`, so old peers keep working.
//!
//! Paths on the wire are relative to a namespace root, `/`-separated, without a leading slash
//! (the root itself is the empty string); [`normalize_path`] is the one gate both ends use.

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

/// Prefix of every API route.
pub const API_PREFIX: &str = "/api/v1";
/// The largest block the server accepts (and the chunker's upper bound).
pub const MAX_BLOCK_SIZE: usize = 4 << 20;
/// The longest path, in bytes, either end accepts.
pub const MAX_PATH_LEN: usize = 4096;
/// The longest path component, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// The most hashes one `blocks/missing` request may carry.
pub const MAX_MISSING_BATCH: usize = 10_000;

/// Route paths, relative to [`API_PREFIX`].
pub mod routes {
    pub const INFO: &str = "/info";
    pub const LOGIN: &str = "/login";
    pub const BLOCKS_MISSING: &str = "/blocks/missing";
    pub const BLOCK: &str = "/blocks/{hash}";
    pub const BLOCKS_BATCH: &str = "/blocks/batch";
    pub const BLOCKS_FETCH: &str = "/blocks/fetch";
    pub const FILES_COMMIT_BATCH: &str = "/files/commit_batch";
    pub const FILES_COMMIT: &str = "/files/commit";
    pub const FILES_MKDIR: &str = "/files/mkdir";
    pub const FILES_DELETE: &str = "/files/delete";
    pub const FILES_MOVE: &str = "/files/move";
    pub const FILES_LIST: &str = "/files/list";
    pub const FILES_META: &str = "/files/meta";
    pub const JOURNAL: &str = "/journal";
    pub const LONGPOLL: &str = "/longpoll";
    pub const FILES_HISTORY: &str = "/files/history";
    pub const FILES_CONTENT: &str = "/files/content";
    pub const FILES_RESTORE: &str = "/files/restore";

    /// The URL path of one block.
    pub fn block(hash: &str) -> String {
        format!("/blocks/{hash}")
    }
}

/// Content-defined chunking parameters, fixed per server so dedup is stable across clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// 128 KiB / 512 KiB / 2 MiB: a one-byte edit re-sends one or two chunks, well under 2 MiB
    /// in all (with a 4 MiB maximum the edited chunk alone was 2.9 MB on the benchmark file).
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 128 << 10,
        avg: 512 << 10,
        max: 2 << 20,
    };

    /// Whether these parameters are ones the `fastcdc` crate and the server limits accept.
    pub fn is_valid(&self) -> bool {
        self.min >= 64
            && self.min <= self.avg
            && self.avg <= self.max
            && self.max as usize <= MAX_BLOCK_SIZE
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InfoResponse {
    pub version: String,
    pub chunk: ChunkParams,
    /// Changes when the server's metadata is recreated (or restored from a backup).
    pub epoch: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub device: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("device", &self.device)
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub user: String,
    pub root_ns: i64,
}

impl std::fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginResponse")
            .field("token", &"<redacted>")
            .field("user", &self.user)
            .field("root_ns", &self.root_ns)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MissingRequest {
    pub hashes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MissingResponse {
    pub missing: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PutBlockResponse {
    pub hash: String,
    /// False when the server already held these bytes (proof of possession only).
    pub stored: bool,
}

/// The most bytes of block data one batch request or response carries.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// The most blocks one batch request or response carries.
pub const MAX_BATCH_BLOCKS: usize = 4096;
/// The most commits one `files/commit_batch` request carries.
pub const MAX_COMMIT_BATCH: usize = 2000;

/// Encodes several blocks in one binary body (see [`block_header`]).
#[cfg(test)]
pub fn encode_blocks<'a>(blocks: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let blocks = blocks
        .into_iter()
        .map(|(hash, bytes)| (hash, bytes::Bytes::copy_from_slice(bytes)));
    frame_blocks(blocks).concat()
}

/// The length of a [`block_header`].
pub const BLOCK_HEADER_LEN: usize = 68;

/// Several blocks travel in one binary body (`application/octet-stream`): for each, this
/// header (its 64-character hex id, its length as a big-endian u32), then its bytes.
pub fn block_header(hash: &str, len: usize) -> [u8; BLOCK_HEADER_LEN] {
    let mut out = [0u8; BLOCK_HEADER_LEN];
    let n = hash.len().min(64);
    out[..n].copy_from_slice(&hash.as_bytes()[..n]);
    out[64..].copy_from_slice(&(len as u32).to_be_bytes());
    out
}

/// Blocks at most this long go into a body's pieces copied, header and all; a longer one is a
/// piece of its own, not copied (its header ends the piece before it).
const COPIED_BLOCK: usize = 64 << 10;
/// A body's pieces of headers and copied blocks are cut at about this length. The pieces are
/// what the HTTP layer queues and writes: with a piece per header and per block, the server's
/// answers to a pull of 20,000 small files took 3,443 `writev` calls; in these pieces, 1,270.
const PIECE_BYTES: usize = 256 << 10;

/// `blocks` in [`block_header`]'s framing, as the pieces of a streamed body: small blocks
/// copied with their headers into pieces of about [`PIECE_BYTES`], big ones as they are.
pub fn frame_blocks<H: AsRef<str>>(
    blocks: impl IntoIterator<Item = (H, bytes::Bytes)>,
) -> Vec<bytes::Bytes> {
    let blocks: Vec<(H, bytes::Bytes)> = blocks.into_iter().collect();
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < blocks.len() {
        // Blocks `start..end` go into one piece, of exactly `len` bytes: copied, but for a
        // long one, which ends the piece with its header and follows it as it is.
        let (mut end, mut len, mut long) = (start, 0, None);
        while end < blocks.len() && len < PIECE_BYTES {
            let n = blocks[end].1.len();
            end += 1;
            len += BLOCK_HEADER_LEN;
            if n > COPIED_BLOCK {
                long = Some(end - 1);
                break;
            }
            len += n;
        }
        let mut piece = Vec::with_capacity(len);
        for (k, (hash, bytes)) in blocks[start..end].iter().enumerate() {
            piece.extend_from_slice(&block_header(hash.as_ref(), bytes.len()));
            if long != Some(start + k) {
                piece.extend_from_slice(bytes);
            }
        }
        pieces.push(bytes::Bytes::from(piece));
        if let Some(k) = long {
            pieces.push(blocks[k].1.clone());
        }
        start = end;
    }
    pieces
}

/// Decodes the framing of [`block_header`] as it arrives, piece by piece, each block into a buffer
/// of its exact size (a whole batch is never held twice, nor in one growing buffer).
#[derive(Default)]
pub struct BlockDecoder {
    /// The start of a block header cut by the end of a piece.
    header: Vec<u8>,
    /// The block being filled: its id, its bytes so far, its length.
    current: Option<(String, bytes::BytesMut, usize)>,
    blocks: Vec<(String, bytes::Bytes)>,
}

impl BlockDecoder {
    pub fn feed(&mut self, mut piece: &[u8]) -> Result<(), String> {
        while !piece.is_empty() {
            if let Some((_, buf, len)) = &mut self.current {
                let take = (*len - buf.len()).min(piece.len());
                buf.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if buf.len() == *len {
                    if let Some((hash, buf, _)) = self.current.take() {
                        self.blocks.push((hash, buf.freeze()));
                    }
                }
                continue;
            }
            let take = (BLOCK_HEADER_LEN - self.header.len()).min(piece.len());
            self.header.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.header.len() < BLOCK_HEADER_LEN {
                continue;
            }
            let hash = std::str::from_utf8(&self.header[..64])
                .ok()
                .filter(|h| is_block_hash(h))
                .ok_or("a block id is not 64 lowercase hex digits")?
                .to_string();
            let h = &self.header[64..];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > MAX_BLOCK_SIZE {
                return Err(format!(
                    "block {hash} is larger than {MAX_BLOCK_SIZE} bytes"
                ));
            }
            self.header.clear();
            if len == 0 {
                self.blocks.push((hash, bytes::Bytes::new()));
            } else {
                self.current = Some((hash, bytes::BytesMut::with_capacity(len), len));
            }
        }
        Ok(())
    }

    /// The blocks decoded; an error if the input stopped inside one.
    pub fn finish(self) -> Result<Vec<(String, bytes::Bytes)>, String> {
        match (&self.current, self.header.is_empty()) {
            (Some((hash, ..)), _) => Err(format!("block {hash} is truncated")),
            (None, false) => Err("truncated block header".into()),
            (None, true) => Ok(self.blocks),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PutBlocksResponse {
    /// Blocks whose bytes were new to the server.
    pub stored: u64,
    /// Blocks the server already held (possession proven, nothing stored).
    pub already_held: u64,
}

/// `GET blocks/{hash}?verify=true`: the server hashes the block before sending it (and
/// quarantines it when damaged). Without it the bytes are sent as stored: clients verify every
/// block they receive and ask again with `verify` after a mismatch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GetBlockQuery {
    #[serde(default)]
    pub verify: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchRequest {
    pub hashes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitBatchRequest {
    pub commits: Vec<CommitRequest>,
}

/// One commit's outcome in a batch: `rev` and `cursor`, or `error`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Whether the commit wrote a new version (journal row `rev`); false when the server
    /// already had exactly this content.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub written: bool,
    /// Folders the commit created on the way, top-down: journal rows `rev - dirs.len()` to
    /// `rev - 1`, right before the file's. With `written`, a client knows every row its
    /// commits added, so it need not read them back from the journal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
}

/// What a file commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The file's revision: the new one, or the existing one when the server already had
    /// exactly this content (then `written` is false and nothing was written).
    pub rev: i64,
    /// The journal head after the commit.
    pub cursor: i64,
    /// Whether the commit wrote a new version (journal row `rev`).
    pub written: bool,
    /// Folders the commit created on the way, top-down: journal rows `rev - dirs.len()` to
    /// `rev - 1`, one each, right before the file's.
    pub dirs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitBatchResponse {
    pub results: Vec<CommitResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "file" => Some(EntryKind::File),
            "dir" => Some(EntryKind::Dir),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    pub path: String,
    /// The revision this change was based on; `None` for a path the client believes is new.
    #[serde(default)]
    pub parent_rev: Option<i64>,
    pub blocks: Vec<String>,
    pub size: u64,
    pub content_hash: String,
    /// Modification time, Unix milliseconds.
    pub mtime: i64,
    #[serde(default)]
    pub executable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitResponse {
    pub rev: i64,
    pub cursor: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub path: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub path: String,
    /// When set, the delete is refused (409) unless the path is still at this revision.
    #[serde(default)]
    pub parent_rev: Option<i64>,
}

/// Moves (renames) a file, or a folder with everything below it. No block moves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    /// When set, the move is refused (409) unless `from` is still at this revision.
    #[serde(default)]
    pub parent_rev: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub cursor: i64,
    /// How many entries (the path and, for a folder, everything below it) were deleted.
    pub deleted: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathQuery {
    pub path: String,
}

/// One live file or folder in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub rev: i64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub content_hash: Option<String>,
    #[serde(default)]
    pub mtime: i64,
    #[serde(default)]
    pub executable: bool,
    #[serde(default)]
    pub blocks: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListResponse {
    pub entries: Vec<Entry>,
    pub cursor: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalQuery {
    #[serde(default)]
    pub cursor: i64,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalOp {
    Add,
    Modify,
    Delete,
    Move,
    Restore,
}

impl JournalOp {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalOp::Add => "add",
            JournalOp::Modify => "modify",
            JournalOp::Delete => "delete",
            JournalOp::Move => "move",
            JournalOp::Restore => "restore",
        }
    }

    pub fn parse(s: &str) -> Option<JournalOp> {
        Some(match s {
            "add" => JournalOp::Add,
            "modify" => JournalOp::Modify,
            "delete" => JournalOp::Delete,
            "move" => JournalOp::Move,
            "restore" => JournalOp::Restore,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: i64,
    pub op: JournalOp,
    pub path: String,
    #[serde(default)]
    pub old_path: Option<String>,
    pub kind: EntryKind,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub content_hash: Option<String>,
    #[serde(default)]
    pub blocks: Vec<String>,
    #[serde(default)]
    pub mtime: i64,
    #[serde(default)]
    pub executable: bool,
    pub user: String,
    #[serde(default)]
    pub device: Option<String>,
    /// When the server recorded the change, Unix seconds.
    pub time: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalResponse {
    pub entries: Vec<JournalEntry>,
    pub cursor: i64,
    pub has_more: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryQuery {
    pub path: String,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Every journal row that touched a path, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub entries: Vec<JournalEntry>,
}

/// Makes revision `rev` of `path` its current content (a new RESTORE journal row).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub path: String,
    pub rev: i64,
}

/// The longest a long poll may be held, in seconds.
pub const MAX_LONGPOLL_SECS: u64 = 60;
/// How long a long poll is held when the client does not say.
pub const DEFAULT_LONGPOLL_SECS: u64 = 30;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LongpollQuery {
    pub cursor: i64,
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Only says whether something changed after the cursor; the client then reads the journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LongpollResponse {
    pub changes: bool,
    /// Seconds the client should wait before its next long poll (the server is busy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<u64>,
}

/// The one error body every API error carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable, machine-readable: `unauthorized`, `not_found`, `conflict`, `missing_blocks`,
    /// `hash_mismatch`, `invalid_path`, `bad_request`, `too_large`, `unavailable`,
    /// `storage_full` (507: the server's disk is full), `internal`.
    pub code: String,
    pub message: String,
    /// For `missing_blocks`: the hashes the server does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
    /// For `conflict`: the path's current revision on the server (absent: the path is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_rev: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path component {0:?} is not allowed (no `.` or `..`)")]
    DotComponent(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("path component is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("path must not contain a backslash")]
    Backslash,
}

/// Normalises a namespace path: one leading `/` and repeated or trailing `/` are dropped;
/// `.`/`..` components, NUL bytes, backslashes and over-long names are refused, so no path can
/// ever escape a namespace root or a synced folder. The root is `""`.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let mut out = String::with_capacity(path.len());
    for part in path.split('/') {
        match part {
            "" => continue,
            "." | ".." => return Err(PathError::DotComponent(part.to_string())),
            _ if part.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong),
            _ => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(part);
            }
        }
    }
    Ok(out)
}

/// The parent of a normalised path (`""` for a top-level name and for the root).
pub fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// The folders above a normalised path, outermost first, the root excluded (`a/b/c`: `a`,
/// `a/b`): the order folders are made in.
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut dirs: Vec<&str> =
        std::iter::successors(Some(parent_path(path)), |p| Some(parent_path(p)))
            .take_while(|p| !p.is_empty())
            .collect();
    dirs.reverse();
    dirs.into_iter()
}

/// Joins two normalised paths.
pub fn join_path(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (_, true) => base.to_string(),
        _ => format!("{base}/{rel}"),
    }
}

/// Whether `hash` looks like a block id: 64 lowercase hex digits.
pub fn is_block_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A block's id: the lowercase hex SHA-256 of its bytes.
pub fn block_hash(bytes: &[u8]) -> String {
    // ring's SHA-256 uses the CPU's SHA extensions or AVX2 where present: twice the speed of
    // a portable implementation on CPUs without SHA-NI (measured in bench/README.md).
    hex::encode(ring::digest::digest(&SHA256, bytes))
}

/// Whether the CPU has SHA extensions (SHA-NI). With them one SHA-256 at a time runs at
/// 1.2–1.85 GB/s a core (`../shared/bench/FACTS.md`), as fast as 16 lanes of AVX-512 whose
/// messages have one length, and much faster than lanes of unlike lengths (0.4–0.8 GB/s):
/// [`block_hashes`] then hashes one block at a time, and a big download is verified as it
/// arrives. `DBX_SHA_EXTENSIONS=0` or `1` overrides the detection, to test or measure either
/// way on any CPU (both give the same ids; only the speed differs).
pub fn sha_extensions() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| match std::env::var("DBX_SHA_EXTENSIONS").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => {
            #[cfg(target_arch = "x86_64")]
            let has = std::arch::is_x86_feature_detected!("sha");
            #[cfg(not(target_arch = "x86_64"))]
            let has = false;
            has
        }
    })
}

/// Below this many blocks, [`block_hashes`] hashes one block at a time.
const MIN_LOCKSTEP: usize = 4;

/// The ids of many blocks at once. SHA-256 of independent messages runs in lockstep, one
/// message per SIMD lane (16 with AVX-512), several times the speed of one at a time on CPUs
/// without SHA-NI. A lockstep group costs what its longest message costs in every lane, so the
/// blocks are taken shortest first (lanes finish together), and callers bring blocks of like
/// lengths (see `chunker::GROUP_CHUNKS`): on this machine 16 blocks of one length hash at
/// ~2 GB/s a core, the ~12 unlike ones of 8 MiB of a file at 0.45 GB/s, one at a time 0.2.
pub fn block_hashes(blocks: &[&[u8]]) -> Vec<String> {
    if blocks.len() < MIN_LOCKSTEP || sha_extensions() {
        return blocks.iter().map(|b| block_hash(b)).collect();
    }
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by_key(|&i| blocks[i].len());
    let sorted: Vec<&[u8]> = order.iter().map(|&i| blocks[i]).collect();
    let mut digests = vec![[0u8; 32]; blocks.len()];
    tape_sha256::hash_many(&sorted, &mut digests);
    let mut out = vec![String::new(); blocks.len()];
    for (&i, d) in order.iter().zip(&digests) {
        out[i] = hex::encode(d);
    }
    out
}

/// A file's content hash: SHA-256 over the concatenated raw block digests, so two files are
/// equal exactly when their block lists are, without comparing bytes.
pub fn content_hash<S: AsRef<str>>(blocks: &[S]) -> String {
    let mut h = Context::new(&SHA256);
    for b in blocks {
        let mut raw = [0u8; 32];
        if hex::decode_to_slice(b.as_ref(), &mut raw).is_ok() {
            h.update(&raw);
        } else {
            h.update(b.as_ref().as_bytes());
        }
    }
    hex::encode(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streaming decoder reads what `encode_blocks` wrote, however the bytes are cut,
    /// and refuses input that stops inside a block or a header.
    #[test]
    fn block_decoder_reads_any_cut_of_the_framing() {
        let mut rng = crate::model_test::Rng::new(3);
        let blocks: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| {
                // Some empty, the first not (the cuts below fall inside it).
                let len = if i % 3 == 1 { 0 } else { 1 + rng.below(5000) };
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                (block_hash(&data), data)
            })
            .collect();
        let body = encode_blocks(blocks.iter().map(|(h, b)| (h.as_str(), &b[..])));
        for _ in 0..20 {
            let mut dec = BlockDecoder::default();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(300)).min(rest.len());
                dec.feed(&rest[..n]).unwrap();
                rest = &rest[n..];
            }
            let got: Vec<(String, Vec<u8>)> = dec
                .finish()
                .unwrap()
                .into_iter()
                .map(|(h, b)| (h, b.to_vec()))
                .collect();
            assert_eq!(got, blocks);
        }
        for cut in [1, 67, 68, 69, body.len() - 1] {
            let mut dec = BlockDecoder::default();
            dec.feed(&body[..cut]).unwrap();
            assert!(dec.finish().is_err(), "cut at {cut}");
        }
    }

    /// Lockstep hashing gives each block the id an independent SHA-256 gives it, in the order
    /// asked, for batch sizes around the lane count and lengths around SHA-256's 64-byte
    /// blocks and padding edges.
    #[test]
    fn block_hashes_match_one_at_a_time() {
        use sha2::Digest as _;
        let mut rng = crate::model_test::Rng::new(7);
        let edges = [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 70_000];
        for n in [0usize, 1, 3, 4, 5, 15, 16, 17, 33, 70] {
            let blocks: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let len = if i % 2 == 0 {
                        edges[i % edges.len()]
                    } else {
                        rng.below(300_000)
                    };
                    (0..len).map(|_| rng.next() as u8).collect()
                })
                .collect();
            let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            let want: Vec<String> = refs
                .iter()
                .map(|b| hex::encode(sha2::Sha256::digest(b)))
                .collect();
            assert_eq!(block_hashes(&refs), want, "{n} blocks");
        }
    }

    /// A body's pieces: small blocks copied many to a piece, long ones passed on as they are
    /// (not copied), and the pieces decode to the blocks given, in order.
    #[test]
    fn framed_blocks_coalesce_small_ones_and_decode_back() {
        let mut rng = crate::model_test::Rng::new(11);
        let lens: Vec<usize> = [10usize, 0, COPIED_BLOCK, COPIED_BLOCK + 1, 5, 300_000, 3]
            .into_iter()
            .chain((0..400).map(|_| rng.below(16_000)))
            .collect();
        let blocks: Vec<(String, bytes::Bytes)> = lens
            .into_iter()
            .enumerate()
            .map(|(i, len)| {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                (format!("{i:064x}"), bytes::Bytes::from(bytes))
            })
            .collect();
        let pieces = frame_blocks(blocks.clone());
        assert!(pieces.len() < 20, "{} pieces for 407 blocks", pieces.len());
        for (_, long) in blocks.iter().filter(|(_, b)| b.len() > COPIED_BLOCK) {
            assert!(
                pieces.iter().any(|p| p.as_ptr() == long.as_ptr()),
                "a long block is not copied"
            );
        }
        let mut decoder = BlockDecoder::default();
        for piece in &pieces {
            decoder.feed(piece).unwrap();
        }
        assert_eq!(decoder.finish().unwrap(), blocks);
    }

    #[test]
    fn normalize_accepts_and_cleans() {
        assert_eq!(normalize_path("/a//b/c/").unwrap(), "a/b/c");
        assert_eq!(normalize_path("").unwrap(), "");
        assert_eq!(normalize_path("/").unwrap(), "");
        assert_eq!(
            normalize_path("héllo wörld/ñ.txt").unwrap(),
            "héllo wörld/ñ.txt"
        );
        assert_eq!(normalize_path("a/...b").unwrap(), "a/...b");
    }

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(
            normalize_path("a/../../etc/passwd"),
            Err(PathError::DotComponent("..".into()))
        );
        assert_eq!(
            normalize_path(".."),
            Err(PathError::DotComponent("..".into()))
        );
        assert_eq!(
            normalize_path("./a"),
            Err(PathError::DotComponent(".".into()))
        );
        assert_eq!(normalize_path("a\0b"), Err(PathError::Nul));
        assert_eq!(normalize_path("a\\..\\b"), Err(PathError::Backslash));
        assert_eq!(
            normalize_path(&"x".repeat(256)),
            Err(PathError::NameTooLong)
        );
    }

    #[test]
    fn paths_join_and_split() {
        assert_eq!(parent_path("a/b/c"), "a/b");
        assert_eq!(parent_path("a"), "");
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(ancestors("a").count(), 0);
        assert_eq!(join_path("", "a"), "a");
        assert_eq!(join_path("a", "b/c"), "a/b/c");
        assert_eq!(join_path("a", ""), "a");
    }

    #[test]
    fn block_batches_round_trip_and_reject_garbage() {
        let decode = |body: &[u8]| {
            let mut d = BlockDecoder::default();
            d.feed(body)?;
            d.finish()
        };
        let (a, b) = (b"first".to_vec(), vec![7u8; 1000]);
        let (ha, hb) = (block_hash(&a), block_hash(&b));
        let body = encode_blocks([(ha.as_str(), &a[..]), (hb.as_str(), &b[..])]);
        let decoded = decode(&body).unwrap();
        assert_eq!(decoded, vec![(ha.clone(), a.into()), (hb, b.into())]);
        assert!(decode(&body[..body.len() - 1]).is_err());
        assert!(decode(&body[..10]).is_err());
        assert_eq!(decode(&[]).unwrap(), vec![]);
        let mut bad = body.clone();
        bad[0] = b'X';
        assert!(decode(&bad).is_err());
        let mut huge = body.clone();
        huge[64..68].copy_from_slice(&(MAX_BLOCK_SIZE as u32 + 1).to_be_bytes());
        assert!(decode(&huge).is_err());
    }

    #[test]
    fn content_hash_depends_on_block_order() {
        let a = block_hash(b"a");
        let b = block_hash(b"b");
        assert_ne!(
            content_hash(&[a.clone(), b.clone()]),
            content_hash(&[b.clone(), a.clone()])
        );
        assert_eq!(content_hash::<&str>(&[]), block_hash(b""));
        assert!(is_block_hash(&a));
        assert!(!is_block_hash(&a.to_uppercase()));
    }
}
