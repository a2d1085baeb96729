//! `dbx push` and `dbx pull`: one direction of the sync engine.

use std::sync::Arc;

use anyhow::Result;

use super::open_folder;
use crate::cli::{GlobalArgs, TransferArgs};
use crate::engine::planner::Direction;
use crate::engine::sync::{self, SyncOptions};
use crate::exit;
use crate::output::{human_bytes, Printer};

pub async fn run(
    args: TransferArgs,
    g: &GlobalArgs,
    printer: Printer,
    direction: Direction,
) -> Result<u8> {
    let (folder, remote) = open_folder(g)?;
    let progress: Arc<dyn crate::engine::Progress> = Arc::from(printer.progress());
    let report = sync::run(
        &folder,
        &remote,
        &SyncOptions {
            direction,
            dry_run: args.dry_run,
        },
        progress,
    )
    .await?;
    for w in &report.warnings {
        printer.warn(w);
    }
    for c in &report.conflicts {
        if !printer.quiet {
            eprintln!("conflict: {}: {}", c.path, c.reason);
        }
    }
    if report.dry_run {
        for a in &report.plan {
            printer.line(format!("{:<14} {}", a.action, a.path));
        }
        if report.plan.is_empty() {
            printer.line("Nothing to do.");
        }
    } else {
        for a in &report.plan {
            printer.detail(format!("{:<14} {}", a.action, a.path));
        }
        let line = match direction {
            Direction::Push => format!(
                "Pushed: {} uploaded, {} deleted, {} folders created; sent {} in {} blocks ({} deduplicated)",
                report.files_uploaded,
                report.files_deleted,
                report.folders_created,
                human_bytes(report.block_bytes_sent),
                report.blocks_uploaded,
                human_bytes(report.bytes_deduplicated),
            ),
            Direction::Pull => format!(
                "Pulled: {} downloaded, {} deleted, {} folders created; received {} in {} blocks",
                report.files_downloaded,
                report.files_deleted,
                report.folders_created,
                human_bytes(report.block_bytes_received),
                report.blocks_downloaded,
            ),
        };
        printer.line(line);
    }
    printer.json(&report);
    if report.has_problems() {
        if !printer.quiet {
            eprintln!(
                "dbx: {} conflict(s) left untouched; nothing was overwritten",
                report.conflicts.len()
            );
        }
        return Ok(exit::ERROR);
    }
    Ok(exit::OK)
}
