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
    Index(#[from] sqlx::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
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
