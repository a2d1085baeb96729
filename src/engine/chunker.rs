//! Content-defined chunking (FastCDC 2020) and block hashing.
//!
//! A big file is read in order and cut by one thread while [`HASH_THREADS`] threads hash its
//! chunks. With SHA extensions the chunks are hashed where the cutting read them, a buffer at
//! a time; without, many blocks are hashed in lockstep (SHA-256 is the slower of the two), so
//! the file is cut a window at a time, and the window's chunks are sorted by length and read
//! back in groups of like lengths. Only a bounded number of buffers (and a window's cuts) are
//! in memory, whatever the file's size. Block ids are SHA-256 of the chunk bytes; the file's
//! content hash is derived from the ordered block ids (`protocol::content_hash`). These
//! functions are CPU-bound and blocking: callers run them off the async reactor.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::scanner::LocalEntry;
use crate::protocol::{self, ChunkParams};

/// One block of a file: where it lies and what it hashes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub hash: String,
    pub offset: u64,
    pub len: u32,
    /// Its [`Fingerprint`], when it was computed (blocks of streamed, large files).
    pub fp: Option<Fingerprint>,
}

/// A block's BLAKE3 hash, cut to 128 bits: a second, ~15× cheaper name for the same bytes
/// (collision-resistant too) where SHA-256 is slow, kept in the client index beside the block
/// id. When a big file changes, each of its chunks is fingerprinted first, and a chunk whose
/// fingerprint and length match a block the file had before takes that block's SHA-256 id
/// without computing it: a 1-byte edit in a 512 MiB file then costs chunking plus BLAKE3, not
/// a SHA-256 of everything. Only where [`fingerprints_pay`].
pub type Fingerprint = u128;

/// Whether blocks are fingerprinted here: only on CPUs without SHA extensions. With them,
/// SHA-256 (1.85 GB/s a core) runs about as fast as BLAKE3 does on these blocks (~2 GB/s), so
/// a fingerprint costs what it could save, and it would be paid on every push and pull (a
/// dataset push: 0.27 of 3.06 client CPU-seconds) to save work on edits only, which the two
/// hashing threads do beside the cutting anyway: a 1-byte insert in the 512 MiB file took
/// 1.04 s without fingerprints, 1.08 s with (medians of four, `bench/README.md`).
pub fn fingerprints_pay() -> bool {
    !protocol::sha_extensions()
}

/// Blocks a file had before, by (fingerprint, length): their SHA-256 ids.
pub type KnownBlocks = std::collections::HashMap<(Fingerprint, u32), String>;

pub fn fingerprint(data: &[u8]) -> Fingerprint {
    let h = blake3::hash(data);
    let mut first = [0u8; 16];
    first.copy_from_slice(&h.as_bytes()[..16]);
    u128::from_be_bytes(first)
}

/// A file's content, as blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub blocks: Vec<BlockRef>,
    pub content_hash: String,
}

impl Digest {
    pub fn block_ids(&self) -> Vec<String> {
        self.blocks.iter().map(|b| b.hash.clone()).collect()
    }
}

/// Threads hashing the chunks of one file.
pub const HASH_THREADS: usize = 2;
/// Chunks are hashed many at once, one chunk per SIMD lane (see `protocol::block_hashes`),
/// and a lockstep hash of chunks costs what the longest of them costs in every lane: a group
/// of chunks of one length is hashed ~4 times faster than a group of the lengths found next to
/// each other in a file (here: 16 equal lanes ~2 GB/s a core; the ~12 chunks of one 8 MiB
/// read, the former batch, 0.45 GB/s; one at a time 0.2 GB/s). So the chunks are hashed in
/// groups of like lengths: at most this many (AVX-512's lanes)...
pub const GROUP_CHUNKS: usize = 16;
/// ...and at most this many bytes (a group's bytes are in memory at once, in one read buffer;
/// a put_blocks request carries at most 16 MiB).
const GROUP_BYTES: usize = 16 << 20;
/// A file is cut a window at a time: the cuts of the window are sorted by length and made into
/// groups, whose bytes are then read again (from the page cache: the window was just read) by
/// the hashing threads. Only the cuts are kept (a few KiB), not the bytes. Lockstep efficiency
/// on the 512 MiB benchmark file (sum of lengths / lanes × longest): 0.39 for the chunks of
/// each 8 MiB read, 0.62 sorted in 32 MiB windows, 0.74 in 128 MiB ones, 0.92 over the whole
/// file.
pub const WINDOW_BYTES: u64 = 128 << 20;
/// What the cutting thread reads at a time, beside a chunk carried over from the last read.
const CUT_READ_BYTES: usize = 4 << 20;

/// Bytes readable at any offset: a file, or bytes in memory.
pub trait ReadAt: Sync {
    /// Reads into `buf` from `offset`; fewer bytes than asked only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match std::os::unix::fs::FileExt::read_at(self, &mut buf[done..], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset as usize).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// Where the blocks of a file being hashed go once hashed, bytes and all, a group at a time
/// (see [`GROUP_CHUNKS`]): so they can be sent while the rest of the file is read, instead of
/// being read again. It may block (that holds the hashing back: memory stays bounded), and
/// must let go of the bytes before long (the read buffers are reused: the hashing waits for
/// them); returning false means it wants no more, and the hashing goes on without it.
pub type BlockSink<'a> = &'a (dyn Fn(Vec<(String, Bytes)>) -> bool + Sync);

/// A chunk to hash: its index in the file, offset and length.
pub type Cut = (usize, u64, usize);

/// Chunks and hashes all of `source`; with `known`, every chunk is fingerprinted too, and those
/// found in it (by fingerprint and length) take their id from it (`None`: no fingerprints, see
/// [`fingerprints_pay`]). Each hashed group's blocks go to `sink` too, if any. The groups' bytes
/// are in `buffers` (shared with other digests running at once), or buffers of its own.
///
/// The calling thread reads the source in order and cuts it; [`HASH_THREADS`] threads hash
/// each group of chunks: on a CPU with SHA extensions, the chunks as they lie in what the
/// cutting read (see [`digest_in_order`]); else groups of like-length chunks read back (see
/// [`digest_in_windows`]). A source that changes meanwhile (a file being written) may give a
/// digest of neither version, as reading it once could: callers compare its stat before and
/// after.
pub fn digest_source<S: ReadAt + ?Sized>(
    source: &S,
    params: ChunkParams,
    known: Option<&KnownBlocks>,
    sink: Option<BlockSink>,
    buffers: Option<&Arc<ReadBuffers>>,
) -> io::Result<Digest> {
    let buffers = match buffers {
        Some(b) => b.clone(),
        None => ReadBuffers::new(params.max, sink.is_some()),
    };
    // A buffer must hold the longest chunk, or the cutting would never finish one.
    if known.is_none() && protocol::sha_extensions() && buffers.size >= params.max as usize {
        digest_in_order(source, params, sink, &buffers)
    } else {
        digest_in_windows(source, params, known, sink, &buffers, WINDOW_BYTES)
    }
}

/// What the hashing threads of a digest make of a group: each block with its index in the file
/// and a view of its bytes.
type Named = Vec<(usize, BlockRef, Bytes)>;

/// The threads of a digest. `cut` runs on the calling thread, hands groups of chunks to the
/// function it is given (which returns false once the hashing failed: then `cut` stops) and
/// returns the blocks it named itself; [`HASH_THREADS`] threads `name` each group and hand its
/// blocks to `sink`. The digest is both, in the file's order.
fn digest_threads<G: Send>(
    sink: Option<BlockSink>,
    name: &(dyn Fn(G) -> io::Result<Named> + Sync),
    cut: impl FnOnce(&dyn Fn(G) -> bool) -> io::Result<Vec<(usize, BlockRef)>>,
) -> io::Result<Digest> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::sync::Mutex;

    let (group_tx, group_rx) = mpsc::sync_channel::<G>(0);
    let group_rx = Mutex::new(group_rx);
    let (done_tx, done_rx) = mpsc::channel::<io::Result<Vec<(usize, BlockRef)>>>();
    let sinking = AtomicBool::new(sink.is_some());
    let failed = AtomicBool::new(false);
    let cut = std::thread::scope(|s| -> io::Result<Vec<(usize, BlockRef)>> {
        // Owned here, so an early return drops it and the hashers stop: no deadlock on error.
        let group_tx = group_tx;
        for _ in 0..HASH_THREADS {
            let done_tx = done_tx.clone();
            let (group_rx, sinking, failed) = (&group_rx, &sinking, &failed);
            s.spawn(move || loop {
                let next = group_rx.lock().map(|rx| rx.recv());
                let Ok(Ok(group)) = next else {
                    return;
                };
                let hashed = name(group).map(|hashed| {
                    if let Some(sink) = sink.filter(|_| sinking.load(Ordering::Relaxed)) {
                        let blocks = hashed.iter().map(|(_, b, d)| (b.hash.clone(), d.clone()));
                        if !sink(blocks.collect()) {
                            sinking.store(false, Ordering::Relaxed);
                        }
                    }
                    hashed.into_iter().map(|(i, b, _)| (i, b)).collect()
                });
                if hashed.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                if done_tx.send(hashed).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        cut(&|group| !failed.load(Ordering::Relaxed) && group_tx.send(group).is_ok())
    });
    let mut indexed = cut?;
    for hashed in done_rx {
        indexed.extend(hashed?);
    }
    indexed.sort_by_key(|(i, _)| *i);
    let blocks: Vec<BlockRef> = indexed.into_iter().map(|(_, b)| b).collect();
    let size = blocks.iter().map(|b| u64::from(b.len)).sum();
    let content_hash = protocol::content_hash(&blocks.iter().map(|b| &b.hash).collect::<Vec<_>>());
    Ok(Digest {
        size,
        blocks,
        content_hash,
    })
}

/// [`digest_source`] where SHA-256 runs one block at a time (SHA extensions) and no block is
/// known from before: the cutting thread reads the source straight into the read buffers, a
/// buffer at a time, and hands each buffer's whole chunks to the hashers as they lie there, so
/// nothing is read twice (cutting windows and reading their chunks back by length is for
/// hashing in lockstep, without SHA extensions). The unfinished chunk at a buffer's end
/// (shorter than `params.max`) is copied to the start of the next.
fn digest_in_order<S: ReadAt + ?Sized>(
    source: &S,
    params: ChunkParams,
    sink: Option<BlockSink>,
    buffers: &Arc<ReadBuffers>,
) -> io::Result<Digest> {
    debug_assert!(
        buffers.size >= params.max as usize,
        "a buffer holds any chunk"
    );
    let name = |(buf, group): (Bytes, Vec<Cut>)| -> io::Result<Named> {
        let start = group.first().map_or(0, |c| c.1);
        let data: Vec<Bytes> = group
            .iter()
            .map(|&(_, offset, len)| {
                let at = (offset - start) as usize;
                buf.slice(at..at + len)
            })
            .collect();
        Ok(name_group(&group, data, false))
    };
    digest_threads(sink, &name, |send| {
        let mut carried: Vec<u8> = Vec::new();
        // The source offset of the buffer's first byte, and the next chunk's index.
        let (mut start, mut index) = (0u64, 0usize);
        loop {
            let mut buf = buffers.take();
            // Grown (and zeroed) only the first time a buffer holds this much: then read over.
            let room = buffers.size;
            if buf.len() < room {
                buf.resize(room, 0);
            }
            buf[..carried.len()].copy_from_slice(&carried);
            let mut filled = carried.len();
            let read = match source.read_at(&mut buf[filled..room], start + filled as u64) {
                Ok(n) => n,
                Err(e) => {
                    buffers.give_back(buf);
                    return Err(e);
                }
            };
            let eof = filled + read < room;
            filled += read;
            let (chunks, taken) = whole_chunks(&buf[..filled], eof, params);
            let group: Vec<Cut> = chunks
                .into_iter()
                .map(|(at, len)| {
                    index += 1;
                    (index - 1, start + at as u64, len)
                })
                .collect();
            carried.clear();
            carried.extend_from_slice(&buf[taken..filled]);
            start += taken as u64;
            let buf = Bytes::from_owner(Lent {
                buf,
                home: buffers.clone(),
            });
            if !group.is_empty() && !send((buf, group)) {
                return Ok(Vec::new());
            }
            if eof {
                return Ok(Vec::new());
            }
        }
    })
}

/// [`digest_source`], cutting `window_size` bytes at a time: each window's chunks are sorted
/// by length and read back in groups of like lengths, to be hashed in lockstep.
fn digest_in_windows<S: ReadAt + ?Sized>(
    source: &S,
    params: ChunkParams,
    known: Option<&KnownBlocks>,
    sink: Option<BlockSink>,
    buffers: &Arc<ReadBuffers>,
    window_size: u64,
) -> io::Result<Digest> {
    let fingerprinted = known.is_some();
    // Only a file that had blocks before is looked up as it is cut.
    let known = known.filter(|k| !k.is_empty());
    let name = |group: Vec<Cut>| hash_group(source, &group, buffers, fingerprinted);
    digest_threads(sink, &name, |send| {
        // Cut in order, keeping only where the chunks lie; a window's worth at a time goes to
        // the hashers in groups of like lengths. What follows the last whole chunk of a read
        // is moved to the front, to go on with the next read (see `whole_chunks`).
        // Zeroed once (by the kernel: fresh pages), then read over.
        let mut buf = vec![0u8; CUT_READ_BYTES + params.max as usize];
        let mut filled = 0;
        let mut window: Vec<Cut> = Vec::new();
        let (mut index, mut window_bytes) = (0usize, 0u64);
        // A file that had blocks before (an edit) is fingerprinted here, while its bytes are
        // at hand: the chunks known by fingerprint take their id at once and are not read
        // again; only the others go to the hashers (a 1-byte insert in 512 MiB: one or two).
        let mut resolved: Vec<(usize, BlockRef)> = Vec::new();
        // The source offset of `buf[0]`, and of the next read.
        let (mut start, mut next) = (0u64, 0u64);
        let mut eof = false;
        while !eof {
            let read = source.read_at(&mut buf[filled..filled + CUT_READ_BYTES], next)?;
            next += read as u64;
            filled += read;
            eof = read < CUT_READ_BYTES;
            let (chunks, taken) = whole_chunks(&buf[..filled], eof, params);
            for (at, len) in chunks {
                let offset = start + at as u64;
                if let Some(known) = known {
                    let fp = fingerprint(&buf[at..at + len]);
                    if let Some(hash) = known.get(&(fp, len as u32)) {
                        let block = BlockRef {
                            hash: hash.clone(),
                            offset,
                            len: len as u32,
                            fp: Some(fp),
                        };
                        resolved.push((index, block));
                        index += 1;
                        continue;
                    }
                }
                window.push((index, offset, len));
                index += 1;
                window_bytes += len as u64;
            }
            buf.copy_within(taken..filled, 0);
            filled -= taken;
            start += taken as u64;
            if window_bytes >= window_size || eof {
                for group in like_lengths(&mut window, buffers.size) {
                    if !send(group) {
                        return Ok(resolved);
                    }
                }
                window_bytes = 0;
            }
        }
        Ok(resolved)
    })
}

/// The chunks of `buf`, a stretch of the source read in order (to its end if `eof`), that a cut
/// of the whole source makes there, as (offset in `buf`, length), and how many bytes of `buf`
/// they take. A chunk that runs to the end of `buf` may go on in the next read: it is left
/// (to be carried over, < `params.max`) unless it is the source's last or a full-size one. A
/// cut found before the end is the one a cut of the whole source finds there: the algorithm
/// reads no byte past a cut it finds.
fn whole_chunks(buf: &[u8], eof: bool, params: ChunkParams) -> (Vec<(usize, usize)>, usize) {
    let mut chunks = Vec::new();
    for c in fastcdc::v2020::FastCDC::new(buf, params.min, params.avg, params.max) {
        if !eof && c.offset + c.length == buf.len() && c.length < params.max as usize {
            return (chunks, c.offset);
        }
        chunks.push((c.offset, c.length));
    }
    (chunks, buf.len())
}

/// A window's cuts (emptied) as groups of like lengths: sorted by length, then taken in order
/// up to [`GROUP_CHUNKS`] chunks or `cap` bytes (a read buffer's size) a group.
fn like_lengths(window: &mut Vec<Cut>, cap: usize) -> Vec<Vec<Cut>> {
    window.sort_by_key(|&(i, _, len)| (len, i));
    let mut groups: Vec<Vec<Cut>> = Vec::new();
    let mut bytes = 0;
    for cut in window.drain(..) {
        match groups.last_mut() {
            Some(g) if g.len() < GROUP_CHUNKS && bytes + cut.2 <= cap => {
                bytes += cut.2;
                g.push(cut);
            }
            _ => {
                bytes = cut.2;
                groups.push(vec![cut]);
            }
        }
    }
    groups
}

/// Names blocks of `source` whose place is known, `(index, offset, len)`, as the hashing of a
/// digest does (groups of like lengths read back, fingerprinted if `fingerprint`, hashed in
/// lockstep), on the calling thread: for bytes written before they were verified (see
/// `sync::download_one`).
pub fn hash_cuts<S: ReadAt + ?Sized>(
    source: &S,
    mut cuts: Vec<Cut>,
    buffers: &Arc<ReadBuffers>,
    fingerprint: bool,
) -> io::Result<Vec<(usize, BlockRef)>> {
    let mut named = Vec::with_capacity(cuts.len());
    for group in like_lengths(&mut cuts, buffers.size) {
        let hashed = hash_group(source, &group, buffers, fingerprint)?;
        named.extend(hashed.into_iter().map(|(i, b, _)| (i, b)));
    }
    Ok(named)
}

/// Reads a group's chunks into one buffer and names them: hashed together, and fingerprinted
/// if `fingerprinted` (chunks known from before were named as they were cut). Returns each
/// block with its index and a view of its bytes.
fn hash_group<S: ReadAt + ?Sized>(
    source: &S,
    group: &[Cut],
    buffers: &Arc<ReadBuffers>,
    fingerprinted: bool,
) -> io::Result<Named> {
    let mut buf = buffers.take();
    // Grown (and zeroed) only the first time a buffer holds this much: then read over.
    let total = group.iter().map(|c| c.2).sum();
    if buf.len() < total {
        buf.resize(total, 0);
    }
    let mut put = 0;
    for &(_, offset, len) in group {
        let short = match source.read_at(&mut buf[put..put + len], offset) {
            Ok(n) => (n < len).then(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file got shorter while it was being read",
                )
            }),
            Err(e) => Some(e),
        };
        if let Some(e) = short {
            // Back to the set, which lends out no more than its cap.
            buffers.give_back(buf);
            return Err(e);
        }
        put += len;
    }
    let buf = Bytes::from_owner(Lent {
        buf,
        home: buffers.clone(),
    });
    let mut at = 0;
    let data: Vec<Bytes> = group
        .iter()
        .map(|&(_, _, len)| {
            at += len;
            buf.slice(at - len..at)
        })
        .collect();
    Ok(name_group(group, data, fingerprinted))
}

/// Names a group's chunks, given their bytes: hashed together, and fingerprinted if
/// `fingerprinted`.
fn name_group(group: &[Cut], data: Vec<Bytes>, fingerprinted: bool) -> Named {
    let fps: Vec<Option<Fingerprint>> = data
        .iter()
        .map(|d| fingerprinted.then(|| fingerprint(d)))
        .collect();
    let slices: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
    let ids = protocol::block_hashes(&slices);
    group
        .iter()
        .zip(fps)
        .zip(ids)
        .zip(data)
        .map(|(((&(i, offset, len), fp), hash), data)| {
            let block = BlockRef {
                hash,
                offset,
                len: len as u32,
                fp,
            };
            (i, block, data)
        })
        .collect()
}

/// The sink's share of a digest's read buffers: one, so a group is sent while the next ones
/// are hashed. Three bought no speed (`bench/bigfile.sh 4`: pushed in 22.3 s with three,
/// 19.9 s with one) for more of the client's peak memory.
const SINK_BUFFERS: usize = 1;

/// Read buffers for the hashing, each allocated once and lent out as [`Bytes`] whose last
/// view gives it back: at most `cap` exist, and a hashing thread waits for one to come back
/// (a sink holds it back that way). Digests running at once share them, so their memory does
/// not add up (four new files of 512 MiB in one push: client peak 119–147 MiB with a set per
/// file, 73–79 MiB with one set). No thread holds one while it waits for another, so sharing
/// cannot deadlock. Allocating and freeing buffers of this size again and again fragments the
/// allocator's arenas: the client's peak RSS pushing the bench dataset was 128–136 MiB that
/// way, 96 MiB with glibc made to return each freed buffer at once
/// (`MALLOC_MMAP_THRESHOLD_=1048576`), 89–99 MiB with this.
#[derive(Default)]
pub struct ReadBuffers {
    /// The buffers given back, and how many were allocated.
    free: std::sync::Mutex<(Vec<Vec<u8>>, usize)>,
    back: std::sync::Condvar,
    cap: usize,
    /// Room for a group's chunks.
    size: usize,
}

impl ReadBuffers {
    /// Buffers for blocks of up to `max_block` bytes, one per hashing thread, one more for a
    /// sink if `sending`, and one for the cutting thread where it reads into them (with SHA
    /// extensions: see [`digest_in_order`]; it then has no buffer of its own).
    pub fn new(max_block: u32, sending: bool) -> Arc<ReadBuffers> {
        let cutting = usize::from(protocol::sha_extensions());
        Arc::new(ReadBuffers {
            cap: cutting + HASH_THREADS + if sending { SINK_BUFFERS } else { 0 },
            size: GROUP_BYTES.max(max_block as usize),
            ..ReadBuffers::default()
        })
    }

    /// One buffer for verifying blocks of up to `max_block` bytes (see [`hash_cuts`]): groups
    /// of at most 8 MiB there (a download holds two requests of up to 16 MiB beside it).
    pub fn for_verifying(max_block: u32) -> Arc<ReadBuffers> {
        Arc::new(ReadBuffers {
            cap: 1,
            size: (8 << 20).max(max_block as usize),
            ..ReadBuffers::default()
        })
    }

    fn take(&self) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(buf) = free.0.pop() {
                return buf;
            }
            if free.1 < self.cap {
                free.1 += 1;
                return Vec::with_capacity(self.size);
            }
            free = self.back.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.0.push(buf);
        self.back.notify_one();
    }
}

/// A buffer lent out by [`ReadBuffers`]; dropped with the last view of it, it goes back.
struct Lent {
    buf: Vec<u8>,
    home: Arc<ReadBuffers>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

/// Files up to this size are read whole and hashed on the calling thread: for the many small
/// files of a typical tree, a pipeline's threads and buffers would cost more than the hashing.
pub const SMALL_FILE: u64 = 4 << 20;

/// A file opened to be hashed: a small one read whole, a large one to be streamed.
pub enum Opened {
    Small(Vec<u8>),
    Large(File),
}

/// Opens a file to be hashed, reading it whole if it is at most [`SMALL_FILE`] bytes.
pub fn open_to_digest(path: &Path) -> io::Result<Opened> {
    let mut file = File::open(path)?;
    if file.metadata()?.len() > SMALL_FILE {
        return Ok(Opened::Large(file));
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(Opened::Small(data))
}

/// Chunks and hashes a file, streaming it (small files: in one read, without fingerprints;
/// big ones with them if `known`, see [`digest_source`]).
pub fn digest_file(
    path: &Path,
    params: ChunkParams,
    known: Option<&KnownBlocks>,
) -> io::Result<Digest> {
    match open_to_digest(path)? {
        Opened::Small(data) => Ok(digest_bytes(&data, params)),
        Opened::Large(file) => digest_source(&file, params, known, None, None),
    }
}

/// Chunks and hashes bytes in memory, on the calling thread.
pub fn digest_bytes(data: &[u8], params: ChunkParams) -> Digest {
    digest_many(&[data], params)
        .pop()
        .expect("one digest per input")
}

/// Chunks and hashes several files' bytes in memory, on the calling thread: the blocks of all
/// of them are hashed together, in lockstep (see `protocol::block_hashes`), which is how many
/// small files are hashed several times faster than one by one.
pub fn digest_many(files: &[&[u8]], params: ChunkParams) -> Vec<Digest> {
    let cuts: Vec<Vec<(usize, usize)>> = files
        .iter()
        .map(|data| {
            fastcdc::v2020::FastCDC::new(data, params.min, params.avg, params.max)
                .map(|c| (c.offset, c.length))
                .collect()
        })
        .collect();
    let chunks: Vec<&[u8]> = files
        .iter()
        .zip(&cuts)
        .flat_map(|(data, cuts)| cuts.iter().map(|&(o, l)| &data[o..o + l]))
        .collect();
    let mut hashes = protocol::block_hashes(&chunks).into_iter();
    files
        .iter()
        .zip(cuts)
        .map(|(data, cuts)| {
            let blocks: Vec<BlockRef> = cuts
                .into_iter()
                .zip(hashes.by_ref())
                .map(|((offset, len), hash)| BlockRef {
                    hash,
                    offset: offset as u64,
                    len: len as u32,
                    fp: None,
                })
                .collect();
            let content_hash =
                protocol::content_hash(&blocks.iter().map(|b| &b.hash).collect::<Vec<_>>());
            Digest {
                size: data.len() as u64,
                blocks,
                content_hash,
            }
        })
        .collect()
}

/// Reads one block of a file back (for upload) and checks it still hashes to its id; `Ok(None)`
/// when the file changed since it was hashed.
pub fn read_block(path: &Path, block: &BlockRef) -> io::Result<Option<Vec<u8>>> {
    read_block_as(path, block, None)
}

/// Reads one block of a file back for upload; `Ok(None)` when the file changed since it was
/// hashed. See [`read_block_into`].
pub fn read_block_as(
    path: &Path,
    block: &BlockRef,
    scanned: Option<&LocalEntry>,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    Ok(read_block_into(path, block, scanned, &mut buf)?.then_some(buf))
}

/// Appends one block of a file, read back for upload, to `out`; false (and `out` as it was)
/// when the file changed since it was hashed. With `scanned` (the stat the file had when it
/// was hashed), the check is that stat, taken before and after the read, instead of hashing
/// the bytes again: the server re-hashes every block it receives and refuses a mismatch, so a
/// change the stat cannot see (an in-place rewrite within one mtime tick) is refused there,
/// never stored under a wrong id.
pub fn read_block_into(
    path: &Path,
    block: &BlockRef,
    scanned: Option<&LocalEntry>,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    use std::io::Seek;
    let file = File::open(path)?;
    let unchanged = |file: &File| -> io::Result<bool> {
        let now = LocalEntry::from_metadata(&file.metadata()?);
        Ok(scanned.is_some_and(|s| {
            s.size == now.size && s.mtime_ns == now.mtime_ns && s.inode == now.inode
        }))
    };
    if scanned.is_some() && !unchanged(&file)? {
        return Ok(false);
    }
    // Read into spare capacity: zero-filling first cost a memset of every byte sent.
    let start = out.len();
    out.reserve(block.len as usize);
    if block.offset != 0 {
        (&file).seek(io::SeekFrom::Start(block.offset))?;
    }
    (&file).take(u64::from(block.len)).read_to_end(out)?;
    let same = out.len() - start == block.len as usize
        && match scanned {
            Some(_) => unchanged(&file)?,
            None => protocol::block_hash(&out[start..]) == block.hash,
        };
    if !same {
        out.truncate(start);
    }
    Ok(same)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest with the default chunking, knowing no earlier blocks.
    fn digest(data: &[u8]) -> Digest {
        digest_knowing(data, &KnownBlocks::new())
    }

    fn digest_knowing(data: &[u8], known: &KnownBlocks) -> Digest {
        digest_source(data, ChunkParams::DEFAULT, Some(known), None, None).unwrap()
    }

    /// Deterministic pseudo-random bytes (xorshift), so the test needs no RNG crate.
    fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn one_byte_insert_changes_at_most_two_chunks() {
        let data = random_bytes(64 << 20, 0x9E37_79B9_7F4A_7C15);
        let before = digest(&data);
        let mut edited = data[..1000].to_vec();
        edited.push(b'X');
        edited.extend_from_slice(&data[1000..]);
        let after = digest(&edited);

        assert_eq!(before.size, data.len() as u64);
        assert_eq!(after.size, edited.len() as u64);
        assert!(before.blocks.len() > 16, "64 MiB should make many chunks");
        let old: std::collections::HashSet<_> = before.blocks.iter().map(|b| &b.hash).collect();
        let new_chunks = after
            .blocks
            .iter()
            .filter(|b| !old.contains(&b.hash))
            .count();
        assert!(
            (1..=2).contains(&new_chunks),
            "{new_chunks} chunks changed after a one-byte insert"
        );
        assert_ne!(before.content_hash, after.content_hash);
    }

    #[test]
    fn blocks_cover_the_file_and_respect_bounds() {
        let data = random_bytes(9 << 20, 7);
        let d = digest(&data);
        let mut offset = 0u64;
        for (i, b) in d.blocks.iter().enumerate() {
            assert_eq!(b.offset, offset);
            assert!(b.len as usize <= protocol::MAX_BLOCK_SIZE);
            if i + 1 < d.blocks.len() {
                assert!(b.len >= ChunkParams::DEFAULT.min);
            }
            let bytes = &data[b.offset as usize..(b.offset + b.len as u64) as usize];
            assert_eq!(protocol::block_hash(bytes), b.hash);
            offset += b.len as u64;
        }
        assert_eq!(offset, data.len() as u64);
    }

    #[test]
    fn in_memory_and_streaming_digests_agree() {
        for len in [0, 1, 1000, 300_000, 3 << 20, 8 << 20, 9 << 20, 33 << 20] {
            let data = random_bytes(len, len as u64 + 1);
            let mut streamed = digest(&data);
            assert!(streamed.blocks.iter().all(|b| b.fp.is_some()));
            for b in &mut streamed.blocks {
                b.fp = None;
            }
            assert_eq!(
                digest_bytes(&data, ChunkParams::DEFAULT),
                streamed,
                "length {len}"
            );
            // Cut a few chunks' worth at a time: every window's chunks keep their place.
            let params = ChunkParams::DEFAULT;
            let buffers = ReadBuffers::new(params.max, false);
            let mut windowed = digest_in_windows(
                &data[..],
                params,
                Some(&KnownBlocks::new()),
                None,
                &buffers,
                3 << 20,
            )
            .unwrap();
            for b in &mut windowed.blocks {
                b.fp = None;
            }
            assert_eq!(windowed, streamed, "length {len}, small windows");
            // Read in order (as with SHA extensions), in buffers of the usual size and in ones
            // little larger than the longest chunk: most of those end inside a chunk, which
            // the next one starts with.
            let in_order = digest_in_order(&data[..], params, None, &buffers).unwrap();
            assert_eq!(in_order, streamed, "length {len}, in order");
            let small = Arc::new(ReadBuffers {
                cap: 2,
                size: params.max as usize + (300 << 10),
                ..ReadBuffers::default()
            });
            let in_order = digest_in_order(&data[..], params, None, &small).unwrap();
            assert_eq!(in_order, streamed, "length {len}, in order, small buffers");
        }
    }

    #[test]
    fn a_sink_gets_every_block_with_its_bytes_until_it_wants_no_more() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let data = random_bytes(40 << 20, 5);
        let got = std::sync::Mutex::new(Vec::new());
        let keep = |blocks: Vec<(String, Bytes)>| {
            let copies = blocks.into_iter().map(|(h, b)| (h, b.to_vec()));
            got.lock().unwrap().extend(copies);
            true
        };
        let params = ChunkParams::DEFAULT;
        // In windows (fingerprinted: as without SHA extensions), then in order (as with them).
        let ways: [&dyn Fn(BlockSink) -> Digest; 2] = [
            &|sink| {
                let known = KnownBlocks::new();
                let buffers = ReadBuffers::new(params.max, true);
                digest_in_windows(
                    &data[..],
                    params,
                    Some(&known),
                    Some(sink),
                    &buffers,
                    WINDOW_BYTES,
                )
                .unwrap()
            },
            &|sink| {
                let buffers = ReadBuffers::new(params.max, true);
                digest_in_order(&data[..], params, Some(sink), &buffers).unwrap()
            },
        ];
        for (way, digest_to) in ways.iter().enumerate() {
            got.lock().unwrap().clear();
            let d = digest_to(&keep);
            let got: std::collections::HashMap<String, Vec<u8>> =
                got.lock().unwrap().drain(..).collect();
            assert!(d.blocks.len() > 2 * GROUP_CHUNKS, "several batches");
            assert_eq!(got.len(), d.blocks.len(), "way {way}");
            for b in &d.blocks {
                let start = b.offset as usize;
                assert_eq!(&got[&b.hash][..], &data[start..start + b.len as usize]);
            }
            // A sink that refuses is not called again (each hashing thread may have one batch
            // under way), and the digest is the same.
            let calls = AtomicUsize::new(0);
            let refuse = |_: Vec<(String, Bytes)>| {
                calls.fetch_add(1, Ordering::Relaxed);
                false
            };
            assert_eq!(digest_to(&refuse), d, "way {way}");
            let calls = calls.load(Ordering::Relaxed);
            assert!(
                (1..=HASH_THREADS).contains(&calls),
                "way {way}: {calls} calls"
            );
        }
    }

    #[test]
    fn digests_at_once_share_their_read_buffers() {
        let params = ChunkParams::DEFAULT;
        let files: Vec<Vec<u8>> = (0..2).map(|i| random_bytes(30 << 20, 40 + i)).collect();
        let alone: Vec<Digest> = files.iter().map(|f| digest(f)).collect();
        // In windows (fingerprinted), and in order (the cutting thread takes buffers too),
        // with a sink holding a buffer now and then.
        for in_order in [false, true] {
            let buffers = ReadBuffers::new(params.max, true);
            let sink = |blocks: Vec<(String, Bytes)>| {
                std::thread::sleep(std::time::Duration::from_millis(blocks.len() as u64 % 3));
                true
            };
            let shared: Vec<Digest> = std::thread::scope(|s| {
                let running: Vec<_> = files
                    .iter()
                    .map(|f| {
                        let (buffers, sink) = (&buffers, &sink);
                        s.spawn(move || {
                            let known = (!in_order).then(KnownBlocks::new);
                            digest_source(&f[..], params, known.as_ref(), Some(sink), Some(buffers))
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|t| t.join().unwrap().unwrap())
                    .collect()
            });
            for (mut d, a) in shared.into_iter().zip(&alone) {
                if in_order {
                    // Not fingerprinted (where SHA-256 is slow it went in windows).
                    let mut a = a.clone();
                    for b in a.blocks.iter_mut().chain(&mut d.blocks) {
                        b.fp = None;
                    }
                    assert_eq!(d, a, "in order");
                } else {
                    assert_eq!(&d, a);
                }
            }
            let (free, allocated) = &*buffers.free.lock().unwrap();
            assert!(
                *allocated <= buffers.cap,
                "{allocated} buffers for {}",
                buffers.cap
            );
            assert_eq!(free.len(), *allocated, "every buffer came back");
        }
    }

    /// Bytes that lose their second half once they have all been read once: a file cut short
    /// between the cutting and the hashing.
    struct Shrinking {
        data: Vec<u8>,
        read: std::sync::atomic::AtomicUsize,
    }

    impl ReadAt for Shrinking {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            use std::sync::atomic::Ordering;
            let now = if self.read.load(Ordering::SeqCst) >= self.data.len() {
                &self.data[..self.data.len() / 2]
            } else {
                &self.data[..]
            };
            let n = now.read_at(buf, offset)?;
            self.read.fetch_add(n, Ordering::SeqCst);
            Ok(n)
        }
    }

    #[test]
    fn a_source_cut_short_while_hashed_is_an_error_not_a_short_digest() {
        let source = Shrinking {
            data: random_bytes(12 << 20, 9),
            read: Default::default(),
        };
        let params = ChunkParams::DEFAULT;
        let err =
            digest_source(&source, params, Some(&KnownBlocks::new()), None, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    fn known_of(d: &Digest) -> KnownBlocks {
        d.blocks
            .iter()
            .map(|b| ((b.fp.unwrap(), b.len), b.hash.clone()))
            .collect()
    }

    /// Without known blocks (where fingerprints do not pay) a digest has the same blocks and
    /// ids, and no fingerprint; with them every block has its own, the BLAKE3 of its bytes.
    #[test]
    fn fingerprints_only_when_known_blocks_are_given() {
        let data = random_bytes(12 << 20, 5);
        let with = digest(&data);
        let without = digest_source(&data[..], ChunkParams::DEFAULT, None, None, None).unwrap();
        assert!(with.blocks.len() > 2);
        assert!(without.blocks.iter().all(|b| b.fp.is_none()));
        for (w, o) in with.blocks.iter().zip(&without.blocks) {
            let bytes = &data[w.offset as usize..(w.offset + u64::from(w.len)) as usize];
            assert_eq!(w.fp, Some(fingerprint(bytes)));
            assert_eq!((&w.hash, w.offset, w.len), (&o.hash, o.offset, o.len));
        }
        assert_eq!(with.blocks.len(), without.blocks.len());
        assert_eq!(with.content_hash, without.content_hash);
    }

    #[test]
    fn known_blocks_give_the_same_digest_without_rehashing() {
        let data = random_bytes(16 << 20, 11);
        let before = digest(&data);
        let mut edited = data.clone();
        edited.insert(8 << 20, b'!');
        let fresh = digest(&edited);
        let reused = digest_knowing(&edited, &known_of(&before));
        assert_eq!(
            reused, fresh,
            "ids taken from the old blocks are the right ones"
        );

        // Proof that ids are taken, not recomputed: a planted id for the first block (which the
        // edit did not touch) comes back as is.
        let mut planted = known_of(&before);
        let first = &before.blocks[0];
        planted.insert((first.fp.unwrap(), first.len), "planted".into());
        let d = digest_knowing(&edited, &planted);
        assert_eq!(d.blocks[0].hash, "planted");
        // A chunk whose bytes differ never matches: the edited chunk is hashed.
        let changed: Vec<_> = fresh
            .blocks
            .iter()
            .filter(|b| !before.blocks.iter().any(|o| o.hash == b.hash))
            .collect();
        assert!(!changed.is_empty());
        for b in changed {
            let bytes = &edited[b.offset as usize..(b.offset + u64::from(b.len)) as usize];
            assert_eq!(protocol::block_hash(bytes), b.hash);
        }
    }

    #[test]
    fn empty_file_has_no_blocks() {
        let d = digest(&[]);
        assert_eq!(d.size, 0);
        assert!(d.blocks.is_empty());
        assert_eq!(d.content_hash, protocol::content_hash::<&str>(&[]));
    }

    #[test]
    fn read_block_detects_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, random_bytes(600_000, 3)).unwrap();
        let d = digest_file(&path, ChunkParams::DEFAULT, Some(&KnownBlocks::new())).unwrap();
        let first = &d.blocks[0];
        assert!(read_block(&path, first).unwrap().is_some());
        std::fs::write(&path, random_bytes(600_000, 4)).unwrap();
        assert!(read_block(&path, first).unwrap().is_none());
    }

    #[test]
    fn read_block_as_scanned_detects_a_changed_stat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, random_bytes(600_000, 3)).unwrap();
        let d = digest_file(&path, ChunkParams::DEFAULT, Some(&KnownBlocks::new())).unwrap();
        let scanned = LocalEntry::from_metadata(&std::fs::metadata(&path).unwrap());
        let first = &d.blocks[0];
        let bytes = read_block_as(&path, first, Some(&scanned))
            .unwrap()
            .unwrap();
        assert_eq!(protocol::block_hash(&bytes), first.hash);
        // Same size, other bytes, another mtime: refused without hashing.
        std::fs::write(&path, random_bytes(600_000, 4)).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        assert!(read_block_as(&path, first, Some(&scanned))
            .unwrap()
            .is_none());
    }

    /// Blocks read into a request's body follow what is there (each at any offset of its
    /// file); a block of a changed file leaves the body as it was.
    #[test]
    fn read_block_into_appends_each_block_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = random_bytes(1_500_000, 5);
        std::fs::write(&path, &data).unwrap();
        let d = digest_file(&path, ChunkParams::DEFAULT, Some(&KnownBlocks::new())).unwrap();
        assert!(d.blocks.len() >= 2);
        let scanned = LocalEntry::from_metadata(&std::fs::metadata(&path).unwrap());
        let mut body = b"header".to_vec();
        let mut expected = body.clone();
        for b in d.blocks.iter().rev() {
            assert!(read_block_into(&path, b, Some(&scanned), &mut body).unwrap());
            let at = b.offset as usize;
            expected.extend_from_slice(&data[at..at + b.len as usize]);
        }
        assert_eq!(body, expected);
        // Without a stat to trust, the bytes are hashed: a changed block is refused too.
        let mut changed = data.clone();
        changed[d.blocks[1].offset as usize] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert!(read_block_into(&path, &d.blocks[0], None, &mut body).unwrap());
        assert!(!read_block_into(&path, &d.blocks[1], None, &mut body).unwrap());
        let first = &d.blocks[0];
        expected.extend_from_slice(&data[..first.len as usize]);
        assert_eq!(body, expected);
    }
}
