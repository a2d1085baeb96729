//! `BlobStore`: block bytes by content hash.
//!
//! Invariants: `put` returns only once the bytes are durable (so the caller may then record the
//! block in the metadata store, which is what makes it referencable); `put` of a hash already
//! held is a no-op; `get` never returns bytes that do not hash to the requested id: a mismatch is
//! quarantined and reported as [`BlobError::Corrupt`]; `read_many` returns bytes unverified, for
//! callers that verify them.

pub mod fs;

use std::future::Future;

use bytes::Bytes;

pub use fs::FsBlobStore;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("block {0} is corrupt on the server (quarantined)")]
    Corrupt(String),
    #[error("block store I/O error: {0}")]
    Io(#[from] std::io::Error),
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
