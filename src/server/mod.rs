//! `dbx serve`: the block, metadata and journal services over HTTP (axum).
//!
//! Ordering invariants, enforced in `routes`: a block is durable in the `BlobStore` before its
//! row is recorded in the `MetaStore`, and a commit referencing a block that has no row is
//! refused, so no device ever sees a file whose blocks are not all there. This module never
//! prints; it logs with `tracing` and returns what the command layer reports.

pub mod auth;
pub mod blobs;
pub mod error;
pub mod maintenance;
pub mod notify;
pub mod routes;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::protocol::ChunkParams;
use blobs::{BlobStore, FsBlobStore};
use store::{MetaStore, SqliteStore, StoreError};

/// Everything a request handler can reach.
pub struct App<M, B> {
    pub store: M,
    pub blobs: B,
    pub hub: Arc<dyn notify::NotifyHub>,
    pub chunk: ChunkParams,
    pub epoch: String,
    /// Long polls being held right now.
    pub polls: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the metadata database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot open the block store: {0}")]
    Blobs(#[from] blobs::BlobError),
}

/// How long versions are kept when nobody says.
pub const DEFAULT_RETENTION_DAYS: f64 = 180.0;

/// The embedded default: SQLite `meta.db` and `blocks/` under `data`.
pub type DefaultApp = App<SqliteStore, FsBlobStore>;

/// Opens (creating) the metadata store and block store under `data`.
pub async fn open_default(data: &Path) -> Result<DefaultApp, OpenError> {
    let dir_err = |source| OpenError::DataDir {
        path: data.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data).map_err(dir_err)?;
    let store = SqliteStore::open(&data.join("meta.db")).await?;
    let blobs = FsBlobStore::open(&data.join("blocks")).await?;
    blobs.remove_stale_temp_files().map_err(dir_err)?;
    let epoch = store.epoch().await?;
    Ok(App {
        store,
        blobs,
        hub: Arc::new(notify::LocalHub::default()),
        chunk: ChunkParams::DEFAULT,
        epoch,
        polls: Default::default(),
    })
}

/// The first start: when there are no users, creates `admin` with a random password and returns
/// it, so the operator can be told once how to log in.
pub async fn bootstrap_admin<M: MetaStore>(store: &M) -> Result<Option<String>, StoreError> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let password = auth::random_secret("")[..24].to_string();
    let phc = auth::hash_password(&password).map_err(|e| StoreError::Invalid(e.to_string()))?;
    store.create_user("admin", &phc, None).await?;
    Ok(Some(password))
}

/// Serves `app` on `listener` until `shutdown` resolves; in-flight requests finish first.
pub async fn serve<M: MetaStore, B: BlobStore>(
    app: App<M, B>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = routes::router(Arc::new(app));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
