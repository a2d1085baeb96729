//! `dbx serve`.

use anyhow::{Context, Result};
use serde_json::json;

use super::shutdown_signal;
use crate::cli::ServeArgs;
use crate::output::Printer;
use crate::server;

pub async fn run(args: ServeArgs, printer: Printer) -> Result<u8> {
    let app = server::open_default(&args.data)
        .await
        .with_context(|| format!("cannot start on data directory {}", args.data.display()))?;
    if let Some(days) = args.retention {
        app.store
            .set_setting("retention_days", &days.to_string())
            .await?;
    }
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
    server::serve(app, listener, async {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await?;
    tracing::info!("stopped");
    Ok(crate::exit::OK)
}
