//! `BlobStore`: block bytes by content hash.
//!
//! Invariants: `put` returns only once the bytes are durable (so the caller may then record the
//! block in the metadata store, which is what makes it referencable); `put` of a hash already
//! held is a no-op; `get` never returns bytes that do not hash to the requested id: a mismatch is
//! quarantined and reported as [`BlobError::Corrupt`]; `read_many` returns bytes unverified, for
//! callers that verify them. Deleting may leave the bytes on disk until `compact` (packed
//! stores reclaim space by rewriting what is still live).

pub mod fs;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

pub use fs::FsBlobStore;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("block {0} is corrupt on the server (quarantined)")]
    Corrupt(String),
    #[error("block store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("block store index error: {0}")]
    Index(sqlx::Error),
}

/// What [`BlobStore::compact`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Packs rewritten without their dead blocks.
    pub packs_rewritten: u64,
    /// Packs deleted: nothing in them was live.
    pub packs_deleted: u64,
    /// Disk space given back.
    pub bytes_reclaimed: u64,
}

pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` under `hash` durably. The caller has verified that they hash to `hash`.
    fn put(&self, hash: &str, bytes: Bytes) -> impl Future<Output = Result<(), BlobError>> + Send;
    /// The block's bytes, verified against `hash`, or `None` when the store lacks it.
    fn get(&self, hash: &str) -> impl Future<Output = Result<Option<Bytes>, BlobError>> + Send;
    /// Several blocks' bytes as stored, in the order asked (`None` where absent), *not*
    /// verified: for callers that verify every byte themselves, as the client does with what it
    /// downloads (it then asks again with [`BlobStore::get`], which verifies and quarantines).
    /// Saves the server a SHA-256 pass over everything it serves.
    fn read_many(
        &self,
        hashes: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, BlobError>> + Send;
    /// Stores several blocks, all durable when it returns; may batch the durability work.
    fn put_many(
        &self,
        blocks: Vec<(String, Bytes)>,
    ) -> impl Future<Output = Result<(), BlobError>> + Send {
        async move {
            for (hash, bytes) in blocks {
                self.put(&hash, bytes).await?;
            }
            Ok(())
        }
    }
    /// Deletes a block's bytes (garbage collection); deleting a missing block is not an error.
    fn delete(&self, hash: &str) -> impl Future<Output = Result<(), BlobError>> + Send;
    /// Deletes several blocks' bytes; may batch the work (one index transaction).
    fn delete_many(
        &self,
        hashes: Vec<String>,
    ) -> impl Future<Output = Result<(), BlobError>> + Send {
        async move {
            for hash in hashes {
                self.delete(&hash).await?;
            }
            Ok(())
        }
    }
    /// Gives back the space of deleted blocks still on disk, leaving alone anything written less
    /// than `min_age` ago. A store that deletes bytes at once has nothing to do.
    fn compact(
        &self,
        min_age: Duration,
    ) -> impl Future<Output = Result<CompactReport, BlobError>> + Send {
        let _ = min_age;
        async { Ok(CompactReport::default()) }
    }
    /// Checks a block without changing anything: present, and with `read_data` that its bytes
    /// still hash to its id.
    fn check(
        &self,
        hash: &str,
        read_data: bool,
    ) -> impl Future<Output = Result<BlockHealth, BlobError>> + Send;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockHealth {
    Ok,
    Missing,
    Corrupt,
}
