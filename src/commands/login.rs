//! `dbx login` and `dbx logout`.

use anyhow::Result;
use serde_json::json;

use super::{fail, read_password};
use crate::cli::{LoginArgs, LogoutArgs};
use crate::engine::config::{ConfigDir, TokenStore};
use crate::engine::remote::Remote;
use crate::exit;
use crate::output::Printer;
use crate::protocol::LoginRequest;

/// The name this device's changes carry in history: `DBX_DEVICE`, else the host name.
fn device_name() -> Option<String> {
    std::env::var("DBX_DEVICE")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub async fn login(args: LoginArgs, printer: Printer) -> Result<u8> {
    let remote = Remote::new(&args.url, None)?;
    let password = read_password(args.password_stdin, false)?;
    let resp = remote
        .login(&LoginRequest {
            user: args.user.clone(),
            password,
            device: device_name(),
        })
        .await?;
    let cfg = ConfigDir::locate()?;
    let login = cfg.save_login(remote.base_url(), &resp.user, &resp.token)?;
    let where_ = match login.store {
        TokenStore::Keyring => "the OS keyring".to_string(),
        TokenStore::File => format!("{}", cfg.path.join("credentials.toml").display()),
    };
    printer.line(format!(
        "Logged in to {} as {} (token stored in {where_})",
        login.server, login.user
    ));
    printer.json(&json!({"server": login.server, "user": login.user, "token_store": login.store}));
    Ok(exit::OK)
}

pub async fn logout(args: LogoutArgs, printer: Printer) -> Result<u8> {
    let cfg = ConfigDir::locate()?;
    let default = cfg.default_login()?;
    let server = match (&args.url, &default) {
        (Some(u), _) => Remote::new(u, None)?.base_url().to_string(),
        (None, Some(l)) => l.server.clone(),
        (None, None) => return Err(fail(exit::AUTH, "not logged in anywhere")),
    };
    let user = match (&args.user, &default) {
        (Some(u), _) => u.clone(),
        (None, Some(l)) => l.user.clone(),
        (None, None) => return Err(fail(exit::USAGE, "say which user with --user")),
    };
    if !cfg.remove_login(&server, &user)? {
        return Err(fail(
            exit::NOT_FOUND,
            format!("no login for {user} on {server}"),
        ));
    }
    printer.line(format!("Logged out {user} from {server}"));
    printer.json(&json!({"server": server, "user": user, "logged_out": true}));
    Ok(exit::OK)
}
