//! Live sync: an initial sync, then a sync whenever the folder changes (filesystem events,
//! debounced so a burst such as an editor's save-by-rename or a `git checkout` is one sync) or
//! the server says the journal grew (long poll).
//!
//! Invariants: syncs never overlap (one loop runs them); a file modified within the settle time
//! is left for a later pass, so a file still being written is not uploaded half-done; a failed
//! sync is retried with capped exponential backoff and jitter; stopping between or during syncs
//! leaves no torn file (downloads are temp + rename) and no stale lock (an OS file lock).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::config::Folder;
use super::index::Index;
use super::planner::Direction;
use super::remote::{Remote, RemoteError};
use super::scanner::{PART_PREFIX, STATE_DIR, TEMP_PREFIX};
use super::sync::{self, Report, SyncOptions, ROOT_NS};
use super::{EngineError, Progress};

/// Quiet time after the last filesystem event before a sync starts.
const DEBOUNCE: Duration = Duration::from_millis(120);
/// However busy the folder, a sync starts this long after the first event.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// Files modified more recently than this are left for the next pass.
const SETTLE: Duration = Duration::from_millis(100);
/// Long-poll hold time asked of the server.
const LONGPOLL_SECS: u64 = 30;
/// Retry backoff after a failed sync: doubles from the first to the cap.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Passes per trigger when something changed during a sync.
const MAX_PASSES: usize = 3;

/// What the watch loop reports; the CLI prints these (one JSON line each with `--json`).
#[derive(Debug)]
pub enum WatchEvent {
    /// Watching has begun (after the initial sync).
    Watching,
    /// A sync finished; `trigger` says what started it.
    Synced {
        trigger: &'static str,
        report: Report,
    },
    /// A sync failed; the next attempt is in `retry_in`.
    Error { message: String, retry_in: Duration },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Local,
    Remote,
}

/// Whether a filesystem event concerns synced files (not `.dbx/` nor dbx's temp files).
fn relevant(root: &Path, paths: &[PathBuf]) -> bool {
    paths.iter().any(|p| {
        let Ok(rel) = p.strip_prefix(root) else {
            return false;
        };
        let mut parts = rel.components();
        let first = parts
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if first.as_deref() == Some(STATE_DIR) {
            return false;
        }
        !p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with(TEMP_PREFIX) || n.starts_with(PART_PREFIX)
        })
    })
}

/// A pseudo-random fraction in [0, 1) for jitter, from the clock (no RNG crate needed).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

async fn stored_cursor(folder: &Folder) -> Option<i64> {
    let index = Index::open(&folder.index_path(), true).await.ok()?;
    let c = index.cursor(ROOT_NS).await.ok().flatten().map(|(c, _)| c);
    index.close().await;
    c
}

/// One sync with its follow-up passes.
async fn sync_once(
    folder: &Folder,
    remote: &Remote,
    progress: &Arc<dyn Progress>,
) -> Result<Report, EngineError> {
    let opts = SyncOptions {
        direction: Direction::Both,
        dry_run: false,
        max_delete: None,
        settle: Some(SETTLE),
    };
    let mut report = sync::run(folder, remote, &opts, progress.clone()).await?;
    let mut passes = 1;
    while report.retry && passes < MAX_PASSES {
        tokio::time::sleep(SETTLE).await;
        report.absorb(sync::run(folder, remote, &opts, progress.clone()).await?);
        passes += 1;
    }
    Ok(report)
}

/// Watches `folder` until `shutdown` resolves.
pub async fn run(
    folder: &Folder,
    remote: &Remote,
    progress: Arc<dyn Progress>,
    mut on_event: impl FnMut(WatchEvent),
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    let (tx, mut rx) = mpsc::channel::<Trigger>(256);

    // Filesystem events. The watcher's callback runs on its own thread.
    let root = folder.root.clone();
    let fs_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if relevant(&root, &ev.paths) {
                let _ = fs_tx.try_send(Trigger::Local);
            }
        }
    })
    .map_err(|e| EngineError::Io {
        path: folder.root.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    watcher
        .watch(&folder.root, RecursiveMode::Recursive)
        .map_err(|e| EngineError::Io {
            path: folder.root.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;

    // Long polls, from the cursor of the last sync.
    let (cursor_tx, cursor_rx) = watch::channel(stored_cursor(folder).await.unwrap_or(0));
    let poll_remote = remote.clone();
    let poller = tokio::spawn(async move {
        let mut cursor_rx = cursor_rx;
        let mut failures = 0u32;
        loop {
            let cursor = *cursor_rx.borrow_and_update();
            match poll_remote.longpoll(cursor, LONGPOLL_SECS).await {
                Ok(r) => {
                    failures = 0;
                    if r.changes {
                        if tx.send(Trigger::Remote).await.is_err() {
                            return;
                        }
                        // Wait for the sync to move the cursor (or a while, if it failed).
                        let _ = tokio::time::timeout(BACKOFF_CAP, cursor_rx.changed()).await;
                    }
                    if let Some(secs) = r.backoff {
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                }
                Err(_) => {
                    // The sync loop reports server trouble; here, just wait and poll again.
                    failures = (failures + 1).min(6);
                    let wait = BACKOFF_FIRST * 2u32.pow(failures);
                    tokio::time::sleep(wait.min(BACKOFF_CAP)).await;
                }
            }
        }
    });

    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_FIRST;
    let mut pending: Option<&'static str> = Some("start");
    let mut announced = false;
    loop {
        if let Some(trigger) = pending.take() {
            match sync_once(folder, remote, &progress).await {
                Ok(report) => {
                    backoff = BACKOFF_FIRST;
                    if let Some(c) = stored_cursor(folder).await {
                        let _ = cursor_tx.send(c);
                    }
                    let retry = report.retry;
                    on_event(WatchEvent::Synced { trigger, report });
                    if !announced {
                        announced = true;
                        on_event(WatchEvent::Watching);
                    }
                    if retry {
                        // Something was still being written: look again shortly.
                        pending = Some("settle");
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(SETTLE * 3) => {}
                        }
                        continue;
                    }
                }
                Err(e) => {
                    let fatal = matches!(
                        e,
                        EngineError::Remote(RemoteError::Unauthorized(_))
                            | EngineError::TooManyDeletes { .. }
                    );
                    if fatal {
                        poller.abort();
                        return Err(e);
                    }
                    let wait = backoff.mul_f64(1.0 + jitter() / 2.0);
                    on_event(WatchEvent::Error {
                        message: e.to_string(),
                        retry_in: wait,
                    });
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                    pending = Some("retry");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
        }
        // Wait for a trigger, then for the burst to end.
        let first = tokio::select! {
            _ = &mut shutdown => break,
            t = rx.recv() => match t {
                Some(t) => t,
                None => break,
            },
        };
        let mut local = first == Trigger::Local;
        let started = Instant::now();
        loop {
            let left = MAX_DEBOUNCE.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => {
                    poller.abort();
                    return Ok(());
                }
                t = tokio::time::timeout(DEBOUNCE.min(left), rx.recv()) => match t {
                    Ok(Some(t)) => local |= t == Trigger::Local,
                    Ok(None) | Err(_) => break,
                },
            }
        }
        pending = Some(if local { "local" } else { "remote" });
    }
    poller.abort();
    drop(watcher);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_temp_files_do_not_trigger() {
        let root = Path::new("/r");
        assert!(!relevant(root, &[PathBuf::from("/r/.dbx/index.db")]));
        assert!(!relevant(root, &[PathBuf::from("/r/a/.dbx-tmp-x1")]));
        assert!(relevant(root, &[PathBuf::from("/r/a/b.txt")]));
        assert!(relevant(
            root,
            &[PathBuf::from("/r/.dbx/x"), PathBuf::from("/r/c")]
        ));
    }
}
