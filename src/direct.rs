//! Writing and reading big files straight to and from the disk (`O_DIRECT`), bypassing the
//! page cache: a pulled big file on the client, the block files of big files' chunks on the
//! server.
//!
//! A buffered write copies every byte into page-cache pages the kernel must first allocate;
//! on virtual machines whose free memory goes back to the host (free page reporting), each new
//! page also costs the host a fault: writing 1 GiB took 2.7–3.5 s of CPU that way on the
//! benchmark machine, against 0.19 s with `O_DIRECT` (`dd`, bench/README.md). A download is
//! written once, in order, and read back by nobody (its blocks are verified before they are
//! written), so the page cache holds nothing it needs; a block file is written once, and read
//! again only when some client downloads it. Filesystems that refuse direct I/O get buffered
//! writes and reads, as does everything when `DBX_DIRECT_IO=0`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;

/// Direct I/O wants buffers, offsets and lengths aligned to the device's logical block size;
/// 4096 covers every common one.
const ALIGN: usize = 4096;

/// Bytes gathered before each direct write (1 MiB writes reach the disk's speed here as 4 MiB
/// ones do: 1.2 vs 1.0 GB/s with `dd oflag=direct`).
const STAGE: usize = 1 << 20;

/// Whether direct I/O is to be tried at all: unless `DBX_DIRECT_IO=0` (for filesystems whose
/// direct I/O is slow or odd: some network filesystems).
pub fn allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("DBX_DIRECT_IO").as_deref() != Ok("0"))
}

/// Whether an error is the filesystem refusing direct I/O (for this file, offset or length).
fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// `path` opened again with `O_DIRECT` (for reading or writing), if the filesystem allows it.
fn open_direct(path: &Path, write: bool) -> Option<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

/// Where the first aligned byte of `buf` is.
fn aligned_start(buf: &[u8]) -> usize {
    (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}

/// Writes `bytes` as the whole of `file`, new and empty, at `path`: the whole aligned blocks
/// directly (if `direct` and the filesystem allows it) through `stage`, an aligned copy kept by
/// the caller for the next file, and the last bytes (less than [`ALIGN`]) through `file`.
pub fn write_new(
    file: &File,
    path: &Path,
    bytes: &[u8],
    direct: bool,
    stage: &mut Vec<u8>,
) -> io::Result<()> {
    let whole = bytes.len() / ALIGN * ALIGN;
    if let Some(d) = (direct && whole > 0)
        .then(|| open_direct(path, true))
        .flatten()
    {
        if stage.len() < whole + ALIGN {
            *stage = vec![0u8; whole + ALIGN];
        }
        let start = aligned_start(stage);
        stage[start..start + whole].copy_from_slice(&bytes[..whole]);
        match d.write_all_at(&stage[start..start + whole], 0) {
            Ok(()) => return file.write_all_at(&bytes[whole..], whole as u64),
            // Nothing of what a refused write may have written stays: all is written again.
            Err(e) if refused(&e) => {}
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(bytes, 0)
}

/// Reads the whole file at `path`: directly if `direct` and the filesystem allows it (the
/// bytes land in an aligned buffer the returned `Bytes` keeps; no copy), else through the page
/// cache.
pub fn read_whole(path: &Path, direct: bool) -> io::Result<Bytes> {
    if let Some(file) = direct.then(|| open_direct(path, false)).flatten() {
        let len = file.metadata()?.len() as usize;
        let padded = len.div_ceil(ALIGN) * ALIGN;
        let mut buf = vec![0u8; padded + ALIGN];
        let start = aligned_start(&buf);
        let mut done = 0;
        // Aligned reads of aligned lengths, to the end of the file (the last one is short), or
        // a refusal.
        let mut refusal = false;
        while done < len {
            match file.read_at(&mut buf[start + done..start + padded], done as u64) {
                Ok(0) => break,
                Ok(n) if n % ALIGN == 0 || done + n >= len => done += n,
                // A short read mid-file leaves the next offset unaligned: read the rest the
                // ordinary way.
                Ok(_) => {
                    refusal = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if refused(&e) => {
                    refusal = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !refusal {
            // A file shortened since its length was read gives what it holds.
            let end = start + done.min(len);
            return Ok(Bytes::from(buf).slice(start..end));
        }
    }
    std::fs::read(path).map(Bytes::from)
}

/// Writes a file from `offset` on, in order: through a second handle opened with `O_DIRECT`
/// where the filesystem allows it, in aligned writes of [`STAGE`] bytes, and the last bytes
/// (less than [`ALIGN`]) through the ordinary handle; elsewhere through the ordinary handle.
pub struct SequentialWriter {
    file: File,
    direct: Option<File>,
    /// `ALIGN` spare bytes, so that the staged bytes can start at an aligned address.
    buf: Vec<u8>,
    /// Where the staged bytes start in `buf` (aligned).
    start: usize,
    /// Bytes staged.
    staged: usize,
    /// The file offset of the first staged byte (aligned when writing directly).
    at: u64,
}

impl SequentialWriter {
    /// A writer continuing `file` (at `path`) at `offset`: the bytes before it are kept.
    /// Directly if `direct` and the filesystem allows it.
    pub fn new(file: File, path: &Path, offset: u64, direct: bool) -> io::Result<SequentialWriter> {
        let direct = direct.then(|| open_direct(path, true)).flatten();
        let mut w = SequentialWriter {
            file,
            direct: None,
            buf: Vec::new(),
            start: 0,
            staged: 0,
            at: offset,
        };
        if let Some(direct) = direct {
            w.buf = vec![0u8; STAGE + ALIGN];
            w.start = aligned_start(&w.buf);
            // Direct writes start at an aligned offset: the bytes of the file between that
            // offset and `offset` are staged again first.
            let head = (offset % ALIGN as u64) as usize;
            w.at = offset - head as u64;
            let mut f = &w.file;
            f.seek(SeekFrom::Start(w.at))?;
            f.take(head as u64)
                .read_exact(&mut w.buf[w.start..w.start + head])?;
            w.staged = head;
            w.direct = Some(direct);
        } else {
            (&w.file).seek(SeekFrom::Start(offset))?;
        }
        Ok(w)
    }

    /// Whether writes go to the disk directly.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The ordinary handle (for the file's metadata, syncs, and a final `set_len`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends `bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.direct.is_none() {
            return (&self.file).write_all(bytes);
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(STAGE - self.staged);
            let at = self.start + self.staged;
            self.buf[at..at + n].copy_from_slice(&bytes[..n]);
            self.staged += n;
            bytes = &bytes[n..];
            if self.staged == STAGE {
                self.flush_aligned()?;
            }
        }
        Ok(())
    }

    /// Writes the staged bytes that fill whole aligned blocks; the rest stay staged.
    fn flush_aligned(&mut self) -> io::Result<()> {
        let whole = self.staged / ALIGN * ALIGN;
        let Some(direct) = self.direct.as_ref().filter(|_| whole > 0) else {
            return Ok(());
        };
        let range = self.start..self.start + whole;
        let refused = match direct.write_all_at(&self.buf[range.clone()], self.at) {
            Ok(()) => false,
            Err(e) if refused(&e) => {
                // The filesystem opened the file for direct I/O but refuses the write: write
                // through the ordinary handle from here on.
                tracing::debug!("direct write refused ({e}); writing through the page cache");
                self.file.write_all_at(&self.buf[range], self.at)?;
                true
            }
            Err(e) => return Err(e),
        };
        self.at += whole as u64;
        self.buf
            .copy_within(self.start + whole..self.start + self.staged, self.start);
        self.staged -= whole;
        if refused {
            self.fall_back()?;
        }
        Ok(())
    }

    /// Writes what is staged through the ordinary handle and stops writing directly.
    fn fall_back(&mut self) -> io::Result<()> {
        let staged = &self.buf[self.start..self.start + self.staged];
        self.file.write_all_at(staged, self.at)?;
        (&self.file).seek(SeekFrom::Start(self.at + self.staged as u64))?;
        self.direct = None;
        self.buf = Vec::new();
        self.staged = 0;
        Ok(())
    }

    /// Writes everything still staged; returns the ordinary handle.
    pub fn finish(mut self) -> io::Result<File> {
        if self.direct.is_some() {
            self.flush_aligned()?;
            if self.direct.is_some() {
                self.fall_back()?;
            }
        }
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the offset it starts at and however the bytes are cut, the file ends up with
    /// the bytes before the offset kept and the written ones after it, direct or not.
    #[test]
    fn writes_land_where_a_plain_write_puts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = crate::model_test::Rng::new(11);
        let data: Vec<u8> = (0..(3 * STAGE + 12_345))
            .map(|_| rng.next() as u8)
            .collect();
        let offsets = [0usize, 1, 4095, 4096, 4097, STAGE + 7, 3 * STAGE + 12_000];
        for (offset, direct) in offsets.into_iter().flat_map(|o| [(o, true), (o, false)]) {
            let path = dir.path().join(format!("f{offset}-{direct}"));
            // What a killed run left: the bytes before `offset`, and garbage after them.
            let mut old = data[..offset].to_vec();
            old.extend(std::iter::repeat_n(0xAB, 5000));
            std::fs::write(&path, &old).unwrap();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut w = SequentialWriter::new(file, &path, offset as u64, direct).unwrap();
            // Direct when asked for, where this filesystem allows it.
            assert!(direct || !w.is_direct());
            let mut rest = &data[offset..];
            while !rest.is_empty() {
                let n = (1 + rng.below(3 << 20)).min(rest.len());
                w.write(&rest[..n]).unwrap();
                rest = &rest[n..];
            }
            let file = w.finish().unwrap();
            file.set_len(data.len() as u64).unwrap();
            drop(file);
            assert!(
                std::fs::read(&path).unwrap() == data,
                "offset {offset}, {direct}"
            );
        }
    }

    /// A block file written whole and read back whole gives its bytes, whatever its length,
    /// direct or not, on a disk's filesystem and (where there is one) on tmpfs, which may
    /// refuse direct I/O.
    #[test]
    fn whole_files_round_trip() {
        let mut rng = crate::model_test::Rng::new(12);
        let data: Vec<u8> = (0..(2 << 20) + 4097).map(|_| rng.next() as u8).collect();
        let disk = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let dirs = std::iter::once(disk.path()).chain(shm.as_ref().map(|d| d.path()));
        let lens = [
            0,
            1,
            4095,
            4096,
            4097,
            128 << 10,
            (128 << 10) + 5,
            data.len(),
        ];
        // One stage for all, as a batch of the server's uses it: too short at first, then
        // longer than needed.
        let mut stage = Vec::new();
        for dir in dirs {
            for (len, direct) in lens.into_iter().flat_map(|l| [(l, true), (l, false)]) {
                let path = dir.join(format!("b{len}-{direct}"));
                let file = File::create(&path).unwrap();
                write_new(&file, &path, &data[..len], direct, &mut stage).unwrap();
                drop(file);
                assert!(
                    std::fs::read(&path).unwrap() == data[..len],
                    "{len} {direct}"
                );
                for read_direct in [true, false] {
                    let got = read_whole(&path, read_direct).unwrap();
                    assert!(got == data[..len], "{len} {direct} {read_direct}");
                }
            }
        }
        assert!(read_whole(&disk.path().join("absent"), true).is_err());
    }
}
