//! `dbx admin user …`: acts on the server's data directory directly (SQLite allows it while the
//! server runs).

use anyhow::{Context, Result};
use serde_json::json;

use super::{fail, read_password};
use crate::cli::{AdminArgs, AdminCommand, UserCommand};
use crate::exit;
use crate::output::human_bytes;
use crate::output::Printer;
use crate::server::auth;
use crate::server::blobs::FsBlobStore;
use crate::server::maintenance;
use crate::server::store::{MetaStore, SqliteStore, StoreError};

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Retention in seconds: the flag, else what `dbx serve --retention` recorded, else 180 days.
async fn retention_secs(store: &SqliteStore, days: Option<f64>) -> Result<i64> {
    let days = match days {
        Some(d) => d,
        None => store
            .setting("retention_days")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::server::DEFAULT_RETENTION_DAYS),
    };
    Ok((days * 86_400.0) as i64)
}

/// The server setting recording how far back `dbx admin gc` has collected: versions superseded
/// before it (unix seconds) may be gone.
const GC_CUTOFF: &str = "gc_cutoff";

async fn gc_cutoff(store: &SqliteStore) -> Result<i64> {
    Ok(store
        .setting(GC_CUTOFF)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(i64::MIN / 2))
}

fn store_err(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::NotFound(m) => fail(exit::NOT_FOUND, m),
        StoreError::AlreadyExists(m) => fail(exit::ERROR, m),
        e => e.into(),
    }
}

pub async fn run(args: AdminArgs, printer: Printer) -> Result<u8> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let store = SqliteStore::open(&args.data.join("meta.db"))
        .await
        .with_context(|| format!("cannot open the metadata in {}", args.data.display()))?;
    let cmd = match args.command {
        AdminCommand::User(cmd) => cmd,
        AdminCommand::Gc {
            dry_run,
            retention,
            grace,
        } => {
            let retention = retention_secs(&store, retention).await?;
            let blobs = FsBlobStore::open(&args.data.join("blocks")).await?;
            let report =
                maintenance::gc(&store, &blobs, retention, (grace * 3600.0) as i64, dry_run)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            if !dry_run {
                // Versions superseded before this moment may be gone now: fsck stops there.
                let cutoff = report.cutoff.max(gc_cutoff(&store).await?);
                store.set_setting(GC_CUTOFF, &cutoff.to_string()).await?;
            }
            printer.line(format!(
                "{} {} blocks, {}",
                if dry_run { "Would free" } else { "Freed" },
                report.blocks_freed,
                human_bytes(report.bytes_freed)
            ));
            let c = &report.compaction;
            if c.packs_rewritten + c.packs_deleted > 0 {
                printer.line(format!(
                    "Rewrote {} and deleted {} pack files: {} of disk given back",
                    c.packs_rewritten,
                    c.packs_deleted,
                    human_bytes(c.bytes_reclaimed)
                ));
            }
            printer.json(&report);
            return Ok(exit::OK);
        }
        AdminCommand::Fsck {
            read_data,
            retention,
        } => {
            // Not further back than a gc with a shorter retention collected.
            let retention = retention_secs(&store, retention)
                .await?
                .min(crate::timefmt::now_secs() - gc_cutoff(&store).await?);
            let blobs = FsBlobStore::open(&args.data.join("blocks")).await?;
            let report = maintenance::fsck(&store, &blobs, retention, read_data).await??;
            for d in &report.damage {
                eprintln!(
                    "damaged: {} (revision {}): block {} is {:?}",
                    d.path, d.rev, d.block, d.health
                );
            }
            printer.line(format!(
                "Checked {} blocks of {} versions{}: {}",
                report.blocks_checked,
                report.versions_checked,
                if read_data {
                    ", reading every byte"
                } else {
                    " (existence only; --read-data hashes them)"
                },
                if report.damage.is_empty() {
                    "no damage".to_string()
                } else {
                    format!("{} damaged", report.damage.len())
                }
            ));
            printer.json(&report);
            return Ok(if report.damage.is_empty() {
                exit::OK
            } else {
                exit::ERROR
            });
        }
    };
    match cmd {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            if !valid_name(&name) {
                return Err(fail(
                    exit::USAGE,
                    format!("{name:?} is not a valid user name (letters, digits, `-`, `_`, `.`; at most 64)"),
                ));
            }
            let password = read_password(password_stdin, true)?;
            let phc = auth::hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
            let user = store
                .create_user(&name, &phc, None)
                .await
                .map_err(store_err)?;
            printer.line(format!("Created user {}", user.name));
            printer.json(&json!({"user": user.name, "created": true}));
        }
        UserCommand::List => {
            let users = store.list_users().await?;
            for u in &users {
                printer.line(format!(
                    "{}{}",
                    u.name,
                    if u.disabled { " (disabled)" } else { "" }
                ));
            }
            printer.json(&json!({"users": users.iter().map(|u| json!({
                "name": u.name, "disabled": u.disabled, "created_at": u.created_at,
                "quota_bytes": u.quota_bytes,
            })).collect::<Vec<_>>()}));
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = read_password(password_stdin, true)?;
            let phc = auth::hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
            store.set_password(&name, &phc).await.map_err(store_err)?;
            printer.line(format!("Password of {name} changed"));
            printer.json(&json!({"user": name, "password_changed": true}));
        }
        UserCommand::Disable { name } => {
            store.set_disabled(&name, true).await.map_err(store_err)?;
            printer.line(format!("Disabled {name} and revoked its tokens"));
            printer.json(&json!({"user": name, "disabled": true}));
        }
        UserCommand::Enable { name } => {
            store.set_disabled(&name, false).await.map_err(store_err)?;
            printer.line(format!("Enabled {name}"));
            printer.json(&json!({"user": name, "disabled": false}));
        }
    }
    Ok(exit::OK)
}
