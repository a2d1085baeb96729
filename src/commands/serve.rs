//! `dbx serve`.

use anyhow::{Context, Result};
use serde_json::json;

use crate::cli::ServeArgs;
use crate::output::Printer;
use crate::server;

pub async fn run(args: ServeArgs, printer: Printer) -> Result<u8> {
    let app = server::open_default(&args.data)
        .await
        .with_context(|| format!("cannot start on data directory {}", args.data.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    if let Some(password) = server::bootstrap_admin(&app.store).await? {
        printer.line(format!(
            "Created user `admin` with password {password}\n\
             It is shown only this once. Log in with:\n  \
             dbx login {url} --user admin"
        ));
        printer
            .json_line(&json!({"event": "admin_created", "user": "admin", "password": password}));
    }
    printer.line(format!(
        "dbx serve: listening on {url} (data in {})",
        args.data.display()
    ));
    printer.json_line(&json!({"event": "listening", "url": url, "data": args.data}));
    tracing::info!(%addr, "listening");
    server::serve(app, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(crate::exit::OK)
}

/// Resolves on Ctrl-C or SIGTERM: in-flight requests then finish before the server stops.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
