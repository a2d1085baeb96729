//! One module per subcommand: thin glue that turns arguments into engine or server calls and
//! prints the outcome through the [`Printer`].

mod admin;
mod cat;
mod history;
mod init;
mod login;
mod ls;
mod restore;
mod serve;
mod transfer;
mod watch;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::Result;

use crate::cli::{Cli, Command, GlobalArgs};
use crate::engine::config::{ConfigDir, Folder};
use crate::engine::planner::Direction;
use crate::engine::remote::Remote;
use crate::exit;
use crate::output::Printer;

/// An error that carries its exit code (everything else maps by type, see `main`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
    }
    .into()
}

/// Runs the parsed command; returns the exit code for a run that completed.
pub async fn run(cli: Cli) -> Result<u8> {
    let printer = Printer::new(cli.global.json, cli.global.quiet, cli.global.verbose);
    let g = cli.global;
    match cli.command {
        Command::Serve(a) => serve::run(a, printer).await,
        Command::Admin(a) => admin::run(a, printer).await,
        Command::Login(a) => login::login(a, printer).await,
        Command::Logout(a) => login::logout(a, printer).await,
        Command::Init(a) => init::run(a, &g, printer).await,
        Command::Push(a) => transfer::run(a, &g, printer, Direction::Push).await,
        Command::Pull(a) => transfer::run(a, &g, printer, Direction::Pull).await,
        Command::Sync(a) => transfer::run(a, &g, printer, Direction::Both).await,
        Command::Status => {
            let args = crate::cli::TransferArgs {
                dry_run: true,
                max_delete: None,
            };
            transfer::run(args, &g, printer, Direction::Both).await
        }
        Command::Ls(a) => ls::run(a, &g, printer).await,
        Command::Watch(a) => watch::run(a, &g, printer).await,
        Command::History(a) => history::run(a, &g, printer).await,
        Command::Cat(a) => cat::run(a, &g).await,
        Command::Restore(a) => restore::run(a, &g, printer).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "dbx", &mut std::io::stdout());
            Ok(exit::OK)
        }
    }
}

/// The directory commands act on: `-C DIR` or the current one.
fn start_dir(g: &GlobalArgs) -> Result<PathBuf> {
    match &g.dir {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_dir()?),
    }
}

/// A password from stdin (`--password-stdin`: the first line) or an interactive prompt.
fn read_password(from_stdin: bool, confirm: bool) -> Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let mut prompt = dialoguer::Password::new().with_prompt("Password");
        if confirm {
            prompt = prompt.with_confirmation("Repeat password", "the passwords do not match");
        }
        prompt.interact()?
    } else {
        return Err(fail(
            exit::USAGE,
            "no terminal to ask for a password on; pass --password-stdin and pipe it in",
        ));
    };
    if password.is_empty() {
        return Err(fail(exit::USAGE, "the password is empty"));
    }
    Ok(password)
}

/// A client for `server` as `user`, with the token from `DBX_TOKEN` or the stored login.
/// `DBX_SERVER` overrides the server.
fn connect(server: &str, user: &str) -> Result<Remote> {
    let server = std::env::var("DBX_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| server.to_string());
    let token = match std::env::var("DBX_TOKEN").ok().filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => {
            let cfg = ConfigDir::locate()?;
            let base = Remote::new(&server, None)?.base_url().to_string();
            let login = cfg.login(&base, user)?.ok_or_else(|| {
                fail(
                    exit::AUTH,
                    format!(
                        "not logged in to {base} as {user}; run `dbx login {base} --user {user}`"
                    ),
                )
            })?;
            cfg.token(&login)?.ok_or_else(|| {
                fail(
                    exit::AUTH,
                    format!("no stored token for {user} on {base}; run `dbx login {base} --user {user}`"),
                )
            })?
        }
    };
    Ok(Remote::new(&server, Some(token))?)
}

/// The synced folder commands act on, and a client for its server.
fn open_folder(g: &GlobalArgs) -> Result<(Folder, Remote)> {
    let folder = Folder::find(&start_dir(g)?)?;
    let remote = connect(&folder.config.server, &folder.config.user)?;
    Ok((folder, remote))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// A path argument as a server path: `/x` is a server path; anything else is a local path,
/// relative to the current directory, inside the synced folder.
fn server_path(folder: &Folder, g: &GlobalArgs, arg: &str) -> Result<String> {
    if arg.starts_with('/') {
        return crate::protocol::normalize_path(arg)
            .map_err(|e| fail(exit::USAGE, format!("{arg}: {e}")));
    }
    let mut abs = start_dir(g)?.canonicalize()?;
    for part in std::path::Path::new(arg).components() {
        match part {
            std::path::Component::ParentDir => {
                abs.pop();
            }
            std::path::Component::Normal(p) => abs.push(p),
            _ => {}
        }
    }
    let rel = abs.strip_prefix(&folder.root).map_err(|_| {
        fail(
            exit::USAGE,
            format!(
                "{arg} is outside the synced folder {}",
                folder.root.display()
            ),
        )
    })?;
    let rel = rel
        .to_str()
        .ok_or_else(|| fail(exit::USAGE, format!("{arg}: not valid UTF-8")))?;
    let remote = crate::protocol::normalize_path(&folder.config.remote)
        .map_err(|e| fail(exit::ERROR, format!("the folder's remote path: {e}")))?;
    let rel = crate::protocol::normalize_path(rel)
        .map_err(|e| fail(exit::USAGE, format!("{arg}: {e}")))?;
    Ok(crate::protocol::join_path(&remote, &rel))
}
