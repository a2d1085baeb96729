//! The filesystem `BlobStore`: `blocks/ab/abcdef…` under the data directory.
//!
//! A write goes to a temp file in `blocks/tmp/` (deleted if dropped on error), is fsynced,
//! renamed into place, and the destination directory is fsynced: after `put` returns, the block
//! survives a crash or power loss. Writing a block that exists is a no-op, so retries are safe.
//! A block whose bytes no longer match its id on read is moved to `quarantine/` for inspection.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{BlobError, BlobStore, BlockHealth};
use crate::protocol;

#[derive(Clone, Debug)]
pub struct FsBlobStore {
    root: PathBuf,
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FsBlobStore {
    pub fn open(root: &Path) -> io::Result<FsBlobStore> {
        // Temp files left by a server that was killed mid-write hold nothing that was
        // acknowledged: start from an empty `tmp/`.
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(FsBlobStore {
            root: root.to_path_buf(),
        })
    }

    /// The store at `root`, as it is: for read-only checks (no temp-file cleanup).
    pub fn open_existing(root: &Path) -> FsBlobStore {
        FsBlobStore {
            root: root.to_path_buf(),
        }
    }

    fn path_of(&self, hash: &str) -> PathBuf {
        self.root.join(&hash[..2]).join(hash)
    }

    fn put_sync(&self, hash: &str, bytes: &[u8]) -> io::Result<()> {
        let dest = self.path_of(hash);
        if dest.exists() {
            return Ok(());
        }
        let dir = dest.parent().expect("block path has a parent");
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            fsync_dir(&self.root)?;
        }
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        fsync_dir(dir)
    }

    /// Many blocks with two filesystem syncs: write every temp file, `syncfs` (the bytes),
    /// rename each into place, `syncfs` again (the directory entries: cheaper than an fsync per
    /// fan-out directory, of which a batch touches up to 256). Nothing is acknowledged before
    /// all of it is durable.
    fn put_many_sync(&self, blocks: &[(String, Bytes)]) -> io::Result<()> {
        let tmp_dir = self.root.join("tmp");
        let mut staged = Vec::new();
        for (hash, bytes) in blocks {
            let dest = self.path_of(hash);
            if dest.exists() {
                continue;
            }
            let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
            tmp.write_all(bytes)?;
            staged.push((tmp, dest));
        }
        if staged.is_empty() {
            return Ok(());
        }
        rustix::fs::syncfs(File::open(&tmp_dir)?)?;
        for (tmp, dest) in staged {
            let dir = dest.parent().expect("block path has a parent");
            if !dir.exists() {
                fs::create_dir_all(dir)?;
            }
            tmp.persist(&dest).map_err(|e| e.error)?;
        }
        rustix::fs::syncfs(File::open(&self.root)?)?;
        Ok(())
    }

    fn get_sync(&self, hash: &str) -> Result<Option<Bytes>, BlobError> {
        let path = self.path_of(hash);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if protocol::block_hash(&bytes) != hash {
            let q = self.root.join("quarantine");
            fs::create_dir_all(&q)?;
            fs::rename(&path, q.join(hash))?;
            tracing::error!(
                block = hash,
                "block failed its hash check; moved to quarantine"
            );
            return Err(BlobError::Corrupt(hash.to_string()));
        }
        Ok(Some(Bytes::from(bytes)))
    }
}

impl BlobStore for FsBlobStore {
    async fn put_many(&self, blocks: Vec<(String, Bytes)>) -> Result<(), BlobError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.put_many_sync(&blocks))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    async fn delete(&self, hash: &str) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path_of(hash)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn check(&self, hash: &str, read_data: bool) -> Result<BlockHealth, BlobError> {
        let path = self.path_of(hash);
        let hash = hash.to_string();
        let health = tokio::task::spawn_blocking(move || -> io::Result<BlockHealth> {
            if !read_data {
                return Ok(if path.exists() {
                    BlockHealth::Ok
                } else {
                    BlockHealth::Missing
                });
            }
            match fs::read(&path) {
                Ok(b) if protocol::block_hash(&b) == hash => Ok(BlockHealth::Ok),
                Ok(_) => Ok(BlockHealth::Corrupt),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BlockHealth::Missing),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(io::Error::other)??;
        Ok(health)
    }

    async fn put(&self, hash: &str, bytes: Bytes) -> Result<(), BlobError> {
        let this = self.clone();
        let hash = hash.to_string();
        tokio::task::spawn_blocking(move || this.put_sync(&hash, &bytes))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    async fn read_many(&self, hashes: Vec<String>) -> Result<Vec<Option<Bytes>>, BlobError> {
        let this = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            hashes
                .iter()
                .map(|h| match fs::read(this.path_of(h)) {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                })
                .collect::<io::Result<Vec<_>>>()
        })
        .await
        .map_err(io::Error::other)??;
        Ok(read)
    }

    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlobError> {
        let this = self.clone();
        let hash = hash.to_string();
        tokio::task::spawn_blocking(move || this.get_sync(&hash))
            .await
            .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_and_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"hello block");
        let hash = protocol::block_hash(&data);
        assert!(store.get(&hash).await.unwrap().is_none());
        store.put(&hash, data.clone()).await.unwrap();
        store.put(&hash, data.clone()).await.unwrap();
        assert_eq!(store.get(&hash).await.unwrap().unwrap(), data);
        assert!(store.path_of(&hash).exists());

        // Flip a byte on disk: the read must fail, not serve bad bytes, and quarantine the file.
        let path = store.path_of(&hash);
        let mut raw = fs::read(&path).unwrap();
        raw[0] ^= 1;
        fs::write(&path, raw).unwrap();
        assert!(matches!(store.get(&hash).await, Err(BlobError::Corrupt(_))));
        assert!(!path.exists());
        assert!(dir.path().join("quarantine").join(&hash).exists());
        assert!(store.get(&hash).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn read_many_returns_what_is_stored_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let (a, b) = (
            Bytes::from_static(b"a block"),
            Bytes::from_static(b"b block"),
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
}
