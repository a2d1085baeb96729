//! Garbage collection and integrity checks over a `MetaStore` and a `BlobStore`.
//!
//! GC is safe while clients upload and commit:
//! - candidates are blocks that no live file and no retained version references, created and
//!   last uploaded before the grace period (so an upload not yet committed is never taken);
//! - each candidate's row is deleted in one write transaction that re-checks that no commit
//!   referenced the block since the collection began (commits stamp `last_ref` in their own
//!   transaction). SQLite serialises the two: a commit that came first keeps the block; one
//!   that comes after finds no row and is refused, naming the block, so the client uploads it
//!   again (its bytes are never silently missing);
//! - bytes are deleted only after the row is gone, so no commit can ever reference a block
//!   whose bytes are being deleted.

use serde::Serialize;

use super::blobs::{BlobStore, BlockHealth};
use super::store::{MetaStore, StoreResult};

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub blocks_freed: u64,
    pub bytes_freed: u64,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub async fn gc<M: MetaStore, B: BlobStore>(
    store: &M,
    blobs: &B,
    retention_secs: i64,
    grace_secs: i64,
    dry_run: bool,
) -> Result<GcReport, Box<dyn std::error::Error + Send + Sync>> {
    let started = now();
    let candidates = store
        .gc_candidates(started, retention_secs, grace_secs)
        .await?;
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    for (hash, size) in candidates {
        if !dry_run {
            if !store
                .forget_block(&hash, started, started - grace_secs)
                .await?
            {
                continue;
            }
            blobs.delete(&hash).await?;
        }
        report.blocks_freed += 1;
        report.bytes_freed += size;
    }
    Ok(report)
}

#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    pub path: String,
    pub rev: i64,
    pub block: String,
    pub health: BlockHealth,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub read_data: bool,
    pub versions_checked: u64,
    pub blocks_checked: u64,
    pub damage: Vec<Damage>,
}

/// Checks every block of every retained version; changes nothing.
pub async fn fsck<M: MetaStore, B: BlobStore>(
    store: &M,
    blobs: &B,
    retention_secs: i64,
    read_data: bool,
) -> StoreResult<Result<FsckReport, super::blobs::BlobError>> {
    let versions = store.retained_versions(now(), retention_secs).await?;
    let mut report = FsckReport {
        read_data,
        ..FsckReport::default()
    };
    let mut health: std::collections::HashMap<String, BlockHealth> = Default::default();
    for (path, rev, blocks) in versions {
        report.versions_checked += 1;
        for b in blocks {
            let h = match health.get(&b) {
                Some(h) => *h,
                None => {
                    let h = match blobs.check(&b, read_data).await {
                        Ok(h) => h,
                        Err(e) => return Ok(Err(e)),
                    };
                    report.blocks_checked += 1;
                    health.insert(b.clone(), h);
                    h
                }
            };
            if h != BlockHealth::Ok {
                report.damage.push(Damage {
                    path: format!("/{path}"),
                    rev,
                    block: b,
                    health: h,
                });
            }
        }
    }
    Ok(Ok(report))
}
