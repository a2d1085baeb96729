//! `dbx push`, `dbx pull`, `dbx sync` and `dbx status`: the sync engine one way or both.

use std::sync::Arc;

use anyhow::Result;

use super::open_folder;
use crate::cli::{GlobalArgs, TransferArgs};
use crate::engine::planner::Direction;
use crate::engine::sync::{self, Report, SyncOptions};
use crate::exit;
use crate::output::{human_bytes, Printer};

/// Passes a two-way sync makes at most when something changed under it (a commit refused
/// because another device committed first, a file edited during the run).
const MAX_PASSES: usize = 3;

pub async fn run(
    args: TransferArgs,
    g: &GlobalArgs,
    printer: Printer,
    direction: Direction,
) -> Result<u8> {
    let (folder, remote) = open_folder(g)?;
    // Only one process changes a folder at a time; `status` only reads.
    let _lock = if args.dry_run {
        None
    } else {
        Some(crate::engine::lock::lock(&folder.root)?)
    };
    let progress: Arc<dyn crate::engine::Progress> = Arc::from(printer.progress());
    let opts = SyncOptions {
        direction,
        dry_run: args.dry_run,
        max_delete: args.max_delete,
        settle: None,
    };
    let mut report = sync::run(&folder, &remote, &opts, progress.clone()).await?;
    let mut passes = 1;
    while report.retry && !opts.dry_run && direction == Direction::Both && passes < MAX_PASSES {
        let later = sync::run(&folder, &remote, &opts, progress.clone()).await?;
        report.absorb(later);
        passes += 1;
    }
    print_report(&report, printer, direction);
    if report.has_problems() {
        if !printer.quiet {
            eprintln!(
                "dbx: {} conflict(s) left untouched; nothing was overwritten. `dbx sync` keeps both \
                 versions (yours as a conflicted copy)",
                report.conflicts.len()
            );
        }
        return Ok(exit::ERROR);
    }
    Ok(exit::OK)
}

fn print_report(report: &Report, printer: Printer, direction: Direction) {
    for w in &report.warnings {
        printer.warn(w);
    }
    for c in &report.conflicts {
        if !printer.quiet {
            eprintln!("conflict: {}: {}", c.path, c.reason);
        }
    }
    for c in &report.conflict_copies {
        printer.warn(format!(
            "{} changed on both sides: the server's version kept the name, yours is now {}",
            c.path, c.copy
        ));
    }
    let describe = |a: &sync::PlannedAction| match (&a.from, &a.copy) {
        (Some(from), _) => format!("{:<14} {} -> {}", a.action, from, a.path),
        (_, Some(copy)) => format!("{:<14} {} -> {}", a.action, a.path, copy),
        _ => format!("{:<14} {}", a.action, a.path),
    };
    if report.dry_run {
        for a in report.plan.iter().filter(|a| a.action != "record") {
            printer.line(describe(a));
        }
        if report.plan.iter().all(|a| a.action == "record") {
            printer.line("Up to date.");
        }
    } else {
        if report.settled {
            printer.detail("nothing changed since the last run (no journal entry, no file's stat)");
        }
        for a in &report.plan {
            printer.detail(describe(a));
        }
        let mut parts = Vec::new();
        if report.files_uploaded > 0 || report.block_bytes_sent > 0 {
            parts.push(format!(
                "{} uploaded ({} sent, {} deduplicated)",
                report.files_uploaded,
                human_bytes(report.block_bytes_sent),
                human_bytes(report.bytes_deduplicated),
            ));
        }
        if report.files_downloaded > 0 {
            let reused = if report.bytes_reused > 0 {
                format!(
                    ", {} reused from local files",
                    human_bytes(report.bytes_reused)
                )
            } else {
                String::new()
            };
            parts.push(format!(
                "{} downloaded ({} received{reused})",
                report.files_downloaded,
                human_bytes(report.block_bytes_received),
            ));
        }
        for (n, one, many) in [
            (report.files_moved, "moved", "moved"),
            (report.files_deleted, "deleted", "deleted"),
            (report.folders_created, "folder created", "folders created"),
            (report.folders_deleted, "folder deleted", "folders deleted"),
            (
                report.conflict_copies.len() as u64,
                "conflicted copy",
                "conflicted copies",
            ),
        ] {
            if n > 0 {
                parts.push(format!("{n} {}", if n == 1 { one } else { many }));
            }
        }
        let verb = match direction {
            Direction::Push => "Pushed",
            Direction::Pull => "Pulled",
            Direction::Both => "Synced",
        };
        if parts.is_empty() {
            printer.line("Up to date.");
        } else {
            printer.line(format!("{verb}: {}", parts.join(", ")));
        }
    }
    printer.json(report);
}
