//! `dbx`: parse the command line, run the command, map the outcome to a documented exit code.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod direct;
mod engine;
mod output;
mod protocol;
mod server;
mod sqlite;
mod timefmt;

#[cfg(test)]
mod model_test;

use std::process::ExitCode;

use clap::Parser;

use commands::Failure;
use engine::{EngineError, RemoteError};

/// The exit codes, as documented in `dbx --help` and the man page.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const UNAVAILABLE: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
}

/// glibc gives threads that allocate at the same time their own malloc arenas (up to 8 per
/// core), and each arena keeps what was freed in it for reuse. The server's threads (runtime
/// workers, the blocking pool, one per SQLite connection) all handle block-sized buffers, so its
/// resident memory grew with its arenas: a restore of 20,000 files (715 MB) took the server to
/// 113–121 MiB, 61–66 MiB with two arenas, no slower (bench/README.md). The limit is read when a
/// process starts, so `dbx serve` runs itself again once with `MALLOC_ARENA_MAX=2`, unless the
/// variable is set already (then it is respected). If that fails, it goes on as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    // Returns only on failure.
    let _ = cmd.args(args).env("MALLOC_ARENA_MAX", "2").exec();
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Command::Serve(_)) {
        limit_malloc_arenas();
    }
    let filter = match cli.global.verbose {
        _ if matches!(cli.command, cli::Command::Serve(_)) && cli.global.verbose == 0 => "dbx=info",
        0 => "warn",
        1 => "dbx=info",
        _ => "dbx=debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dbx: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    // `serve` and `watch` stop cleanly on their own on Ctrl-C and SIGTERM.
    let handles_signals = matches!(cli.command, cli::Command::Serve(_) | cli::Command::Watch(_));
    let code = runtime.block_on(async {
        if handles_signals {
            return match commands::run(cli).await {
                Ok(code) => code,
                Err(e) => report(&e),
            };
        }
        tokio::select! {
            r = commands::run(cli) => match r {
                Ok(code) => code,
                Err(e) => report(&e),
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("dbx: interrupted");
                exit::INTERRUPTED
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(code)
}

/// Prints an error chain and picks its exit code. A broken pipe is success (`dbx ls | head`).
fn report(err: &anyhow::Error) -> u8 {
    let code = exit_code(err);
    if code == exit::OK {
        return code;
    }
    eprintln!("dbx: error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    code
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return exit::OK;
            }
        }
        let remote = cause.downcast_ref::<RemoteError>().or_else(|| {
            match cause.downcast_ref::<EngineError>() {
                Some(EngineError::Remote(r)) => Some(r),
                _ => None,
            }
        });
        if let Some(r) = remote {
            return match r {
                // Network errors and 5xx were retried already; what persists is still worth
                // a retry later.
                e if e.is_transient() => exit::UNAVAILABLE,
                RemoteError::Unauthorized(_) => exit::AUTH,
                RemoteError::NotFound(_) => exit::NOT_FOUND,
                _ => exit::ERROR,
            };
        }
    }
    exit::ERROR
}
