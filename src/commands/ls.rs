//! `dbx ls`: list files on the server.

use anyhow::Result;
use serde_json::json;

use super::{connect, fail, start_dir};
use crate::cli::{GlobalArgs, LsArgs};
use crate::engine::config::{ConfigDir, Folder};
use crate::exit;
use crate::output::{human_bytes, Printer};
use crate::protocol::{self, EntryKind};

pub async fn run(args: LsArgs, g: &GlobalArgs, printer: Printer) -> Result<u8> {
    // Inside a synced folder: its server and remote root; elsewhere: the default login and `/`.
    let (server, user, base) = match Folder::find(&start_dir(g)?) {
        Ok(f) => (f.config.server, f.config.user, f.config.remote),
        Err(_) => match ConfigDir::locate()?.default_login()? {
            Some(l) => (l.server, l.user, "/".to_string()),
            None => {
                return Err(fail(
                    exit::AUTH,
                    "not logged in; run `dbx login URL --user NAME`",
                ))
            }
        },
    };
    let path = match &args.path {
        Some(p) if p.starts_with('/') => p.clone(),
        Some(p) => format!("{base}/{p}"),
        None => base,
    };
    let path =
        protocol::normalize_path(&path).map_err(|e| fail(exit::USAGE, format!("{path}: {e}")))?;
    let remote = connect(&server, &user)?;
    let listing = remote.list(&path, args.recursive).await?;
    for e in &listing.entries {
        let size = match e.kind {
            EntryKind::Dir => "-".to_string(),
            EntryKind::File => human_bytes(e.size),
        };
        let suffix = if e.kind == EntryKind::Dir { "/" } else { "" };
        printer.line(format!("{size:>10}  /{}{suffix}", e.path));
    }
    printer.json(&json!({
        "path": format!("/{path}"),
        "cursor": listing.cursor,
        "entries": listing.entries.iter().map(|e| json!({
            "path": format!("/{}", e.path), "kind": e.kind, "size": e.size,
            "rev": e.rev, "content_hash": e.content_hash, "mtime": e.mtime,
            "executable": e.executable,
        })).collect::<Vec<_>>(),
    }));
    Ok(exit::OK)
}
