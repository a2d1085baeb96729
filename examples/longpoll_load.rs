//! Load generator for `bench/longpoll-load.sh`: holds N idle long polls open on a dbx server,
//! then commits one change and measures how long until every poll has answered.
//!
//! Usage: longpoll_load URL TOKEN N [SERVER_PID]
//! Prints the server's RSS with all polls held (from /proc, when SERVER_PID is given) and the
//! wake-up latency of the first, median and last poll.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: longpoll_load URL TOKEN N [SERVER_PID]");
        std::process::exit(2);
    }
    let (url, token, n): (String, String, usize) =
        (args[1].clone(), args[2].clone(), args[3].parse()?);
    let pid = args.get(4).cloned();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()?;
    let head: Value = http
        .get(format!("{url}/api/v1/journal?cursor=9223372036854775807"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let cursor = head["cursor"].as_i64().unwrap_or(0);
    let rss_before = pid.as_deref().and_then(rss_kib);

    let sent = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, bool)>();
    for _ in 0..n {
        let (http, url, token, sent, done_tx) = (
            http.clone(),
            url.clone(),
            token.clone(),
            sent.clone(),
            done_tx.clone(),
        );
        tokio::spawn(async move {
            let req = http
                .get(format!("{url}/api/v1/longpoll?cursor={cursor}&timeout=60"))
                .bearer_auth(&token)
                .send();
            sent.fetch_add(1, Ordering::Relaxed);
            let changes = match req.await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .map(|v| v["changes"] == true)
                    .unwrap_or(false),
                Err(_) => false,
            };
            let _ = done_tx.send((Instant::now(), changes));
        });
    }
    drop(done_tx);
    // Let every connection reach the server and park.
    while sent.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_held = pid.as_deref().and_then(rss_kib);

    let start = Instant::now();
    let resp = http
        .post(format!("{url}/api/v1/files/mkdir"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"path": format!("wake-{}", std::process::id())}))
        .send()
        .await?;
    assert!(
        resp.status().is_success(),
        "commit failed: {}",
        resp.status()
    );
    let mut latencies = Vec::with_capacity(n);
    let mut woken = 0usize;
    while let Some((at, changes)) = done_rx.recv().await {
        latencies.push(at.saturating_duration_since(start));
        if changes {
            woken += 1;
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!("polls={n} woken_with_changes={woken}");
    if let (Some(b), Some(h)) = (rss_before, rss_held) {
        println!("server_rss_before_kib={b} server_rss_held_kib={h}");
    }
    println!(
        "wake_latency_ms first={:.1} p50={:.1} p99={:.1} last={:.1}",
        pct(0.0).as_secs_f64() * 1e3,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    Ok(())
}
