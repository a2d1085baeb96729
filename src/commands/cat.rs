//! `dbx cat`: stream a file (or a byte range of it) from the server to stdout.

use std::io::Write;

use anyhow::Result;
use futures::StreamExt;

use super::{fail, open_folder, server_path};
use crate::cli::{CatArgs, GlobalArgs};
use crate::exit;

pub async fn run(args: CatArgs, g: &GlobalArgs) -> Result<u8> {
    if let Some(r) = &args.range {
        let ok = r.split_once('-').is_some_and(|(a, b)| {
            (a.is_empty() || a.parse::<u64>().is_ok())
                && (b.is_empty() || b.parse::<u64>().is_ok())
                && !(a.is_empty() && b.is_empty())
        });
        if !ok {
            return Err(fail(
                exit::USAGE,
                format!("--range {r}: expected START-END, START- or -LAST_N (bytes)"),
            ));
        }
    }
    let (folder, remote) = open_folder(g)?;
    let path = server_path(&folder, g, &args.path)?;
    let resp = remote.content(&path, args.range.as_deref()).await?;
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("download interrupted: {e}"))?;
        out.write_all(&chunk)?;
    }
    out.flush()?;
    Ok(exit::OK)
}
