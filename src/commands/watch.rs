//! `dbx watch`: sync continuously until Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use super::{connect, shutdown_signal, start_dir};
use crate::cli::{GlobalArgs, WatchArgs};
use crate::engine::config::Folder;
use crate::engine::watch::{self, WatchEvent};
use crate::exit;
use crate::output::{human_bytes, Printer};

pub async fn run(args: WatchArgs, g: &GlobalArgs, printer: Printer) -> Result<u8> {
    let start = match args.dir {
        Some(d) => d,
        None => start_dir(g)?,
    };
    let folder = Folder::find(&start)?;
    let remote = connect(&folder.config.server, &folder.config.user)?;
    let _lock = crate::engine::lock::lock(&folder.root)?;
    let progress: Arc<dyn crate::engine::Progress> = Arc::new(crate::engine::NoProgress);
    let root = folder.root.display().to_string();
    let server = format!("{}{}", folder.config.server, folder.config.remote);
    let on_event = |ev: WatchEvent| match ev {
        WatchEvent::Watching => {
            printer.line(format!("Watching {root} <-> {server} (Ctrl-C to stop)"));
            printer.json_line(&json!({"event": "watching", "root": root, "server": server}));
        }
        WatchEvent::Synced { trigger, report } => {
            for w in &report.warnings {
                printer.warn(w);
            }
            for c in &report.conflict_copies {
                printer.warn(format!(
                    "conflict: {} changed on both sides; yours is now {}",
                    c.path, c.copy
                ));
                printer.json_line(&json!({"event": "conflict", "path": c.path, "copy": c.copy}));
            }
            let changed = report.files_uploaded
                + report.files_downloaded
                + report.files_deleted
                + report.files_moved
                + report.folders_created
                + report.folders_deleted;
            if changed > 0 {
                printer.line(format!(
                    "synced ({trigger}): {} up ({}), {} down ({}), {} moved, {} deleted",
                    report.files_uploaded,
                    human_bytes(report.block_bytes_sent),
                    report.files_downloaded,
                    human_bytes(report.block_bytes_received),
                    report.files_moved,
                    report.files_deleted,
                ));
            }
            printer.json_line(&json!({"event": "synced", "trigger": trigger, "report": report}));
        }
        WatchEvent::Error { message, retry_in } => {
            if !printer.quiet {
                eprintln!(
                    "dbx watch: {message}; retrying in {:.0}s",
                    retry_in.as_secs_f64().ceil()
                );
            }
            printer.json_line(&json!({
                "event": "error", "message": message, "retry_in_ms": retry_in.as_millis() as u64,
            }));
        }
    };
    watch::run(&folder, &remote, progress, on_event, shutdown_signal()).await?;
    printer.line("Stopped.");
    printer.json_line(&json!({"event": "stopped"}));
    Ok(exit::OK)
}
