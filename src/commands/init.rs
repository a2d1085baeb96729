//! `dbx init`: make a folder a synced folder.

use anyhow::Result;
use serde_json::json;

use super::{fail, start_dir};
use crate::cli::{GlobalArgs, InitArgs};
use crate::engine::config::{ConfigDir, Folder, FolderConfig};
use crate::engine::remote::Remote;
use crate::exit;
use crate::output::Printer;
use crate::protocol;

pub async fn run(args: InitArgs, g: &GlobalArgs, printer: Printer) -> Result<u8> {
    let dir = match args.dir {
        Some(d) => d,
        None => start_dir(g)?,
    };
    if let Some(existing) = Folder::exists_at_or_above(&dir) {
        return Err(fail(
            exit::ERROR,
            format!(
                "{} is already inside the synced folder {}",
                dir.display(),
                existing.display()
            ),
        ));
    }
    let remote = protocol::normalize_path(&args.remote)
        .map_err(|e| fail(exit::USAGE, format!("--remote {}: {e}", args.remote)))?;
    let cfg = ConfigDir::locate()?;
    let default = cfg.default_login()?;
    let server = match (&args.server, &default) {
        (Some(s), _) => Remote::new(s, None)?.base_url().to_string(),
        (None, Some(l)) => l.server.clone(),
        (None, None) => return Err(fail(
            exit::AUTH,
            "not logged in; run `dbx login URL --user NAME` first (or pass --server and --user)",
        )),
    };
    let user = match (&args.user, &default) {
        (Some(u), _) => u.clone(),
        (None, Some(l)) => l.user.clone(),
        (None, None) => return Err(fail(exit::USAGE, "say which user with --user")),
    };
    let folder = Folder::create(
        &dir,
        FolderConfig {
            server,
            user,
            remote: format!("/{remote}"),
        },
    )?;
    printer.line(format!(
        "Initialised {} ↔ {}{} as {}\nNext: `dbx push` to upload, `dbx pull` to download.",
        folder.root.display(),
        folder.config.server,
        folder.config.remote,
        folder.config.user
    ));
    printer.json(&json!({
        "root": folder.root, "server": folder.config.server,
        "remote": folder.config.remote, "user": folder.config.user,
    }));
    Ok(exit::OK)
}
