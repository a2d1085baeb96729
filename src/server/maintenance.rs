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
//!   whose bytes are being deleted;
//! - then the block store gives back the space of what it deleted but still holds on disk
//!   (packs rewritten without their dead blocks), leaving alone what was written within the
//!   grace period.

use serde::Serialize;

use super::blobs::{BlobStore, BlockHealth, CompactReport};
use super::store::{MetaStore, StoreResult};
use crate::timefmt::now_secs;

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub blocks_freed: u64,
    /// The freed blocks' sizes.
    pub bytes_freed: u64,
    /// What the block store did to give the space back (nothing on a dry run).
    pub compaction: CompactReport,
    /// Versions superseded before this time (unix seconds) were collectable.
    #[serde(skip)]
    pub cutoff: i64,
}

/// Blocks whose bytes are deleted together (a crash in between leaves at most this many
/// blocks' bytes without their row, never a row without its bytes).
const GC_DELETE_BATCH: usize = 256;

pub async fn gc<M: MetaStore, B: BlobStore>(
    store: &M,
    blobs: &B,
    retention_secs: i64,
    grace_secs: i64,
    dry_run: bool,
) -> Result<GcReport, Box<dyn std::error::Error + Send + Sync>> {
    let started = now_secs();
    let candidates = store
        .gc_candidates(started, retention_secs, grace_secs)
        .await?;
    let mut report = GcReport {
        dry_run,
        cutoff: started - retention_secs,
        ..GcReport::default()
    };
    // Forgotten blocks' bytes go a batch at a time (one index transaction for packed ones).
    let mut forgotten = Vec::new();
    for (hash, size) in candidates {
        if !dry_run {
            if !store
                .forget_block(&hash, started, started - grace_secs)
                .await?
            {
                continue;
            }
            forgotten.push(hash);
            if forgotten.len() == GC_DELETE_BATCH {
                blobs.delete_many(std::mem::take(&mut forgotten)).await?;
            }
        }
        report.blocks_freed += 1;
        report.bytes_freed += size;
    }
    if !dry_run {
        blobs.delete_many(forgotten).await?;
        let min_age = std::time::Duration::from_secs(grace_secs.max(0) as u64);
        report.compaction = blobs.compact(min_age).await?;
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
    let versions = store.retained_versions(now_secs(), retention_secs).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, CommitRequest};
    use crate::server::blobs::FsBlobStore;
    use crate::server::store::{Actor, SqliteStore, StoreError};

    async fn setup() -> (tempfile::TempDir, SqliteStore, FsBlobStore, i64, Actor) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("meta.db"))
            .await
            .unwrap();
        let blobs = FsBlobStore::open(&dir.path().join("blocks")).await.unwrap();
        let user = store.create_user("u", "x", None).await.unwrap();
        let actor = Actor {
            user_id: user.id,
            device: None,
        };
        (dir, store, blobs, user.root_ns, actor)
    }

    async fn put(store: &SqliteStore, blobs: &FsBlobStore, bytes: &[u8], user: i64) -> String {
        let hash = protocol::block_hash(bytes);
        blobs
            .put(&hash, bytes::Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
        store
            .record_blocks(&[(hash.clone(), bytes.len() as u64)], user)
            .await
            .unwrap();
        hash
    }

    fn commit(path: &str, hash: &str, size: u64) -> CommitRequest {
        CommitRequest {
            path: path.into(),
            parent_rev: None,
            blocks: vec![hash.to_string()],
            size,
            content_hash: protocol::content_hash(&[hash]),
            mtime: 0,
            executable: false,
        }
    }

    /// The interleaving GC must survive: it picks a block as garbage, then a client commits a
    /// file referencing that block, then GC tries to delete it. The block must stay.
    #[tokio::test]
    async fn a_block_committed_during_gc_is_never_deleted() {
        let (_dir, store, blobs, ns, actor) = setup().await;
        let b = put(&store, &blobs, b"shared bytes", actor.user_id).await;
        store
            .commit_file(ns, &actor, &commit("old", &b, 12))
            .await
            .unwrap();
        store.delete(ns, &actor, "old", None).await.unwrap();
        // Blocks referenced in the second GC starts are spared; let that second pass.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

        let started = now_secs();
        let candidates = store.gc_candidates(started, 0, 0).await.unwrap();
        assert!(
            candidates.iter().any(|(h, _)| *h == b),
            "the orphan is a candidate"
        );

        // A client commits a new file with the same block between GC's scan and its delete.
        store
            .commit_file(ns, &actor, &commit("new", &b, 12))
            .await
            .unwrap();
        assert!(!store.forget_block(&b, started, started).await.unwrap());
        assert_eq!(blobs.check(&b, true).await.unwrap(), BlockHealth::Ok);

        // And a whole GC run keeps it too, since "new" references it.
        let report = gc(&store, &blobs, 0, 0, false).await.unwrap();
        assert_eq!(report.blocks_freed, 0);
        assert_eq!(blobs.check(&b, true).await.unwrap(), BlockHealth::Ok);
    }

    /// The other order: GC deletes first; a later commit naming the block is refused (so the
    /// client uploads it again) rather than committing a file whose bytes are gone.
    #[tokio::test]
    async fn a_commit_after_gc_deleted_its_block_is_refused() {
        let (_dir, store, blobs, ns, actor) = setup().await;
        let b = put(&store, &blobs, b"orphan", actor.user_id).await;
        store
            .commit_file(ns, &actor, &commit("f", &b, 6))
            .await
            .unwrap();
        store.delete(ns, &actor, "f", None).await.unwrap();
        // Let the clock move past the commit's `last_ref` stamp.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let report = gc(&store, &blobs, 0, 0, false).await.unwrap();
        assert_eq!((report.blocks_freed, report.bytes_freed), (1, 6));
        assert_eq!(blobs.check(&b, false).await.unwrap(), BlockHealth::Missing);
        match store.commit_file(ns, &actor, &commit("g", &b, 6)).await {
            Err(StoreError::MissingBlocks(m)) => assert_eq!(m, vec![b.clone()]),
            other => panic!("expected MissingBlocks, got {other:?}"),
        }
    }

    /// Retention and grace: nothing referenced by a retained version, nor uploaded within the
    /// grace period, is a candidate.
    #[tokio::test]
    async fn retention_and_grace_protect_blocks() {
        let (_dir, store, blobs, ns, actor) = setup().await;
        let old = put(&store, &blobs, b"version one", actor.user_id).await;
        let new = put(&store, &blobs, b"version two", actor.user_id).await;
        let loose = put(&store, &blobs, b"uploaded, never committed", actor.user_id).await;
        store
            .commit_file(ns, &actor, &commit("f", &old, 11))
            .await
            .unwrap();
        let mut second = commit("f", &new, 11);
        second.parent_rev = Some(1);
        store.commit_file(ns, &actor, &second).await.unwrap();
        // As seen by a collection starting a second later (blocks referenced in the second a
        // collection starts are spared).
        let t = now_secs() + 1;
        // A day of retention keeps the superseded version; a day of grace keeps the upload.
        let c = store.gc_candidates(t, 86_400, 86_400).await.unwrap();
        assert!(c.is_empty(), "{c:?}");
        let names =
            |c: Vec<(String, u64)>| -> BTreeSet<String> { c.into_iter().map(|(h, _)| h).collect() };
        // Fresh uploads are protected by the grace period whatever the retention.
        assert!(store.gc_candidates(t, 0, 86_400).await.unwrap().is_empty());
        // Past the grace period, retention still keeps the superseded version.
        assert_eq!(
            names(store.gc_candidates(t, 86_400, 0).await.unwrap()),
            BTreeSet::from([loose.clone()])
        );
        // With neither, the superseded version's block goes too; the live one never does.
        assert_eq!(
            names(store.gc_candidates(t, 0, 0).await.unwrap()),
            BTreeSet::from([old, loose])
        );
    }

    use std::collections::BTreeSet;
}
