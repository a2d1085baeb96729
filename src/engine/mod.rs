//! The client engine: chunker, scanner, index, planner, the remote client, and `sync`, which
//! runs a push or pull end to end. The engine never prints: it reports progress through
//! [`Progress`] and returns a [`sync::Report`]; warnings travel in the report.

pub mod chunker;
pub mod config;
pub mod index;
pub mod lock;
pub mod planner;
pub mod remote;
pub mod scanner;
pub mod sync;
pub mod watch;

use std::path::PathBuf;

pub use remote::RemoteError;

/// How long work is shown while it runs. Implemented by the CLI (progress bars); the engine
/// only calls it.
pub trait Progress: Send + Sync {
    /// A new stage of `total` units (bytes) begins.
    fn start(&self, label: &str, total: u64);
    /// `n` more units of the current stage are done.
    fn advance(&self, n: u64);
    /// The current stage is over.
    fn finish(&self);
}

/// Progress that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    State(#[from] config::StateError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("the folder's index (.dbx/index.db): {0}")]
    Index(sqlx::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The disk (or the user's quota) is full: nothing the run did is lost, and a download cut
    /// short resumes from what it wrote and verified.
    #[error(
        "no space left for {}: free some space and run again (what was downloaded and verified \
         is kept, and not fetched again)",
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "this would delete {count} of the {total} synced files, so nothing was deleted. If the \
         folder is what you expect (not an unmounted disk or a wrong directory), run again with \
         --max-delete {count}"
    )]
    TooManyDeletes { count: usize, total: usize },
    #[error("the server's chunk parameters are not usable: {0:?}")]
    BadChunkParams(crate::protocol::ChunkParams),
}

impl EngineError {
    /// An I/O error at `path`; a full disk is told as such.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                EngineError::DiskFull {
                    path,
                    source: source.into(),
                }
            }
            _ => EngineError::Io { path, source },
        }
    }
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        if crate::sqlite::is_full(&e) {
            EngineError::DiskFull {
                path: PathBuf::from(".dbx/index.db (the folder's index)"),
                source: e.into(),
            }
        } else {
            EngineError::Index(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_as_such_other_io_errors_as_they_are() {
        let full = EngineError::io(
            "/f/big.bin",
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        assert!(matches!(full, EngineError::DiskFull { .. }), "{full:?}");
        let told = full.to_string();
        assert!(
            told.starts_with("no space left for /f/big.bin: free some space"),
            "{told}"
        );
        let quota = EngineError::io("/f", std::io::ErrorKind::QuotaExceeded.into());
        assert!(matches!(quota, EngineError::DiskFull { .. }), "{quota:?}");
        let denied = EngineError::io("/f", std::io::ErrorKind::PermissionDenied.into());
        assert!(matches!(denied, EngineError::Io { .. }), "{denied:?}");
    }

    /// SQLite's own "database or disk is full", from a database that may not grow.
    #[tokio::test]
    async fn an_index_on_a_full_disk_is_told_as_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.db");
        let pool = crate::sqlite::open(&index, true, &[], 1, crate::sqlite::Durability::Normal)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&pool)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 2))
            .execute(&pool)
            .await
            .unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (zeroblob(1000000))")
            .execute(&pool)
            .await
            .unwrap_err();
        let err = EngineError::from(err);
        assert!(matches!(err, EngineError::DiskFull { .. }), "{err:?}");
        assert!(err.to_string().contains(".dbx/index.db"), "{err}");

        let other = sqlx::query("SELECT * FROM nowhere")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(matches!(EngineError::from(other), EngineError::Index(_)));
    }
}
