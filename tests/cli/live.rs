//! Live sync: long polls wake on commits (and only then), `dbx watch` keeps folders converged,
//! and one process at a time acts on a folder.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

async fn head(server: &Server, tok: &str) -> i64 {
    let j = api_get(server, tok, "journal?cursor=9223372036854775807").await;
    j["cursor"].as_i64().unwrap()
}

async fn longpoll(url: String, tok: String, cursor: i64, timeout: u64) -> Value {
    json_answer(
        reqwest::Client::new()
            .get(format!(
                "{url}/api/v1/longpoll?cursor={cursor}&timeout={timeout}"
            ))
            .bearer_auth(tok),
    )
    .await
}

async fn mkdir(server: &Server, tok: &str, path: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/files/mkdir", server.url))
        .bearer_auth(tok)
        .json(&json!({ "path": path }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

#[tokio::test]
async fn longpoll_waits_for_a_commit_and_wakes_on_it() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    mkdir(&server, &tok, "first").await;
    let cursor = head(&server, &tok).await;
    let mut poll = tokio::spawn(longpoll(server.url.clone(), tok.clone(), cursor, 30));
    // Nothing changed: the poll is still held.
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), &mut poll).await {
        panic!("long poll returned with nothing to report: {r:?}");
    }
    mkdir(&server, &tok, "second").await;
    let answer = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the long poll must wake after a commit")
        .unwrap();
    assert_eq!(answer["changes"], true);
}

#[tokio::test]
async fn longpoll_times_out_without_changes_and_answers_stale_cursors_at_once() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    mkdir(&server, &tok, "a").await;
    let cursor = head(&server, &tok).await;
    let answer = longpoll(server.url.clone(), tok.clone(), cursor, 1).await;
    assert_eq!(answer["changes"], false);
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        longpoll(server.url.clone(), tok.clone(), 0, 60),
    )
    .await
    .expect("a cursor behind the head is answered at once");
    assert_eq!(answer["changes"], true);
}

/// A running `dbx --json watch` on `dir`, stopped with SIGTERM on drop.
struct Watcher {
    child: Child,
}

impl Watcher {
    fn start(client: &Client, dir: &Path) -> Watcher {
        let mut child = client
            .cmd(dir)
            .args(["--json", "watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Ready once it says it is watching (after its initial sync).
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "dbx watch did not start");
            let line = lines.next().expect("dbx watch exited").unwrap();
            if line.contains("\"watching\"") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Watcher { child }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (polling, with a generous ceiling) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_watching_folders_converge_and_stop_cleanly() {
    let server = Server::start();
    let (dev_a, dev_b) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    write_file(&a.join("start.txt"), b"before watching");
    dev_a.init(&a);
    dev_b.init(&b);
    let wa = Watcher::start(&dev_a, &a);
    let wb = Watcher::start(&dev_b, &b);
    eventually("the initial sync reaches B", || {
        b.join("start.txt").exists()
    });

    // Edits on both sides, one after the other and in a burst.
    write_file(&a.join("from-a/one.txt"), b"one");
    write_file(&b.join("from-b.txt"), b"two");
    let mut rng = Rng::new(5);
    for i in 0..20 {
        write_file(&a.join(format!("burst/{i}.bin")), &rng.bytes(1000 + i * 37));
    }
    std::fs::remove_file(b.join("start.txt")).unwrap();
    eventually("A and B converge", || {
        let (ta, tb) = (digest_tree(&a), digest_tree(&b));
        ta == tb && ta.len() == 24 && !ta.contains_key("start.txt")
    });

    // No lock is left behind: a one-shot sync works once the watchers are gone.
    assert!(wa.terminate().success(), "watch exits 0 on SIGTERM");
    assert!(wb.terminate().success());
    dev_a.ok(&a, &["sync"]);
    let leftovers = digest_tree(&a)
        .keys()
        .filter(|k| k.contains(".dbx-tmp-"))
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn a_second_process_on_the_same_folder_is_refused_with_the_holders_pid() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    dev.init(dir.path());
    let w = Watcher::start(&dev, dir.path());
    let out = dev.run(dir.path(), &["sync"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("pid {}", w.child.id())),
        "{}",
        stderr(&out)
    );
    // Reading is allowed meanwhile.
    dev.ok(dir.path(), &["status"]);
}

#[test]
fn watch_survives_the_server_going_away_and_coming_back() {
    let server = Server::start();
    let (dev_a, dev_b) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    dev_a.init(&a);
    dev_b.init(&b);
    let wa = Watcher::start(&dev_a, &a);

    // The server goes away; a change made meanwhile must arrive once it is back.
    let data = server.stop();
    write_file(
        &a.join("during-outage.txt"),
        b"written while the server was down",
    );
    std::thread::sleep(Duration::from_millis(300));
    let server = Server::start_on_addr(data, &folder_server_addr(&a));
    eventually("the change reaches the server after the outage", || {
        let out = dev_b.run(&b, &["sync"]);
        out.status.success() && b.join("during-outage.txt").exists()
    });
    assert_eq!(
        std::fs::read(b.join("during-outage.txt")).unwrap(),
        b"written while the server was down"
    );
    assert!(wa.terminate().success());
    drop(server);
}

/// The server address a folder syncs with (from its config).
fn folder_server_addr(dir: &Path) -> String {
    let cfg = std::fs::read_to_string(dir.join(".dbx/config.toml")).unwrap();
    let line = cfg.lines().find(|l| l.starts_with("server")).unwrap();
    line.split('"')
        .nth(1)
        .unwrap()
        .trim_start_matches("http://")
        .to_string()
}
