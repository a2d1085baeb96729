//! `dbx admin user …`: acts on the server's data directory directly (SQLite allows it while the
//! server runs).

use anyhow::{Context, Result};
use serde_json::json;

use super::{fail, read_password};
use crate::cli::{AdminArgs, AdminCommand, UserCommand};
use crate::exit;
use crate::output::Printer;
use crate::server::auth;
use crate::server::store::{MetaStore, SqliteStore, StoreError};

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
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
    let AdminCommand::User(cmd) = args.command;
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
