//! `dbx history`: every revision of a file, or the recent changes in a folder.

use anyhow::Result;
use serde_json::json;

use super::{fail, open_folder, server_path};
use crate::cli::{GlobalArgs, HistoryArgs};
use crate::exit;
use crate::output::{human_bytes, Printer};
use crate::protocol::{EntryKind, JournalEntry, JournalOp};
use crate::timefmt::datetime_utc;

fn line(e: &JournalEntry) -> String {
    let size = match (e.op, e.kind) {
        (JournalOp::Delete, _) | (_, EntryKind::Dir) => "-".to_string(),
        _ => human_bytes(e.size),
    };
    let who = match &e.device {
        Some(d) => format!("{}@{d}", e.user),
        None => e.user.clone(),
    };
    let what = match &e.old_path {
        Some(old) => format!("/{old} -> /{}", e.path),
        None => format!(
            "/{}{}",
            e.path,
            if e.kind == EntryKind::Dir { "/" } else { "" }
        ),
    };
    let hash = e
        .content_hash
        .as_deref()
        .map_or("", |h| &h[..12.min(h.len())]);
    format!(
        "{:>7}  {}  {:<8} {:>10}  {:<12}  {:<20}  {what}",
        e.id,
        datetime_utc(e.time),
        e.op.as_str(),
        size,
        hash,
        who
    )
}

fn entry_json(e: &JournalEntry) -> serde_json::Value {
    json!({
        "rev": e.id, "time": e.time, "op": e.op, "kind": e.kind,
        "path": format!("/{}", e.path),
        "old_path": e.old_path.as_ref().map(|p| format!("/{p}")),
        "size": e.size, "content_hash": e.content_hash,
        "user": e.user, "device": e.device,
    })
}

pub async fn run(args: HistoryArgs, g: &GlobalArgs, printer: Printer) -> Result<u8> {
    let (folder, remote) = open_folder(g)?;
    let entries = if args.all {
        let dir = server_path(&folder, g, args.path.as_deref().unwrap_or("."))?;
        // Page through the journal, keeping the newest entries under `dir`.
        let mut keep = std::collections::VecDeque::new();
        let mut cursor = 0;
        loop {
            let page = remote.journal(cursor, 1000).await?;
            for e in page.entries {
                let inside =
                    |p: &str| dir.is_empty() || p == dir || p.starts_with(&format!("{dir}/"));
                if inside(&e.path) || e.old_path.as_deref().is_some_and(inside) {
                    keep.push_back(e);
                    if keep.len() > args.limit as usize {
                        keep.pop_front();
                    }
                }
            }
            cursor = page.cursor;
            if !page.has_more {
                break;
            }
        }
        keep.into_iter().rev().collect::<Vec<_>>()
    } else {
        let Some(path) = &args.path else {
            return Err(fail(
                exit::USAGE,
                "say which file (or use --all for the whole folder)",
            ));
        };
        let path = server_path(&folder, g, path)?;
        remote.history(&path, args.limit).await?.entries
    };
    printer.line(format!(
        "{:>7}  {:<19}  {:<8} {:>10}  {:<12}  {:<20}  path",
        "rev", "time (UTC)", "change", "size", "content", "by"
    ));
    for e in &entries {
        printer.line(line(e));
    }
    printer.json(&json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>()}));
    Ok(exit::OK)
}
