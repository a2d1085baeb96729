//! Bad input gets a clear error, the documented exit code, and changes nothing.

use serde_json::{json, Value};

use crate::harness::*;

async fn journal_len(server: &Server, tok: &str) -> usize {
    let j = api_get(server, tok, "journal?cursor=0").await;
    j["entries"].as_array().unwrap().len()
}

#[tokio::test]
async fn block_with_wrong_hash_is_refused_and_not_stored() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    let http = reqwest::Client::new();
    let claimed = sha_hex(b"what the client claims");
    let resp = http
        .put(format!("{}/api/v1/blocks/{claimed}", server.url))
        .bearer_auth(&tok)
        .body(b"other bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "hash_mismatch");
    assert!(!server
        .data
        .path()
        .join("blocks")
        .join(&claimed[..2])
        .join(&claimed)
        .exists());
    let missing = api_post(
        &server,
        &tok,
        "blocks/missing",
        json!({"hashes": [claimed]}),
    )
    .await;
    assert_eq!(missing["missing"], json!([claimed]));
}

#[tokio::test]
async fn commit_with_unknown_block_is_refused_and_journals_nothing() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    let never = sha_hex(b"never uploaded");
    let content_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(hex::decode(&never).unwrap()))
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/files/commit", server.url))
        .bearer_auth(&tok)
        .json(&json!({"path": "a.txt", "blocks": [never], "size": 14,
                      "content_hash": content_hash, "mtime": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_blocks");
    assert_eq!(body["error"]["missing"], json!([never]));
    assert!(body["error"]["message"].as_str().unwrap().contains(&never));
    assert_eq!(journal_len(&server, &tok).await, 0);
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    let http = reqwest::Client::new();
    let empty = sha_hex(b"");
    for bad in [
        "../escape",
        "a/../../etc/passwd",
        "a/./b",
        "nul\u{0}byte",
        "back\\slash",
    ] {
        let resp = http
            .post(format!("{}/api/v1/files/commit", server.url))
            .bearer_auth(&tok)
            .json(&json!({"path": bad, "blocks": [], "size": 0,
                          "content_hash": empty, "mtime": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_path", "{bad:?}");
        let resp = http
            .post(format!("{}/api/v1/files/delete", server.url))
            .bearer_auth(&tok)
            .json(&json!({"path": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad:?}");
    }
    assert_eq!(journal_len(&server, &tok).await, 0);
}

#[tokio::test]
async fn one_user_cannot_read_or_probe_another_users_blocks() {
    let server = Server::start();
    let alice = api_token(&server, "alice").await;
    let bob = api_token(&server, "bob").await;
    let http = reqwest::Client::new();
    let bytes = b"alice's secret".to_vec();
    let hash = sha_hex(&bytes);
    let put = http
        .put(format!("{}/api/v1/blocks/{hash}", server.url))
        .bearer_auth(&alice)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let get = http
        .get(format!("{}/api/v1/blocks/{hash}", server.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 404);
    let missing: Value = http
        .post(format!("{}/api/v1/blocks/missing", server.url))
        .bearer_auth(&bob)
        .json(&json!({"hashes": [hash]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        missing["missing"],
        json!([hash]),
        "bob must not learn alice has it"
    );
    let get = http
        .get(format!("{}/api/v1/blocks/{hash}", server.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.bytes().await.unwrap().to_vec(), bytes);
}

#[test]
fn wrong_token_exits_3_and_says_to_log_in() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    dev.init(dir.path());
    let out = dev
        .cmd(dir.path())
        .env("DBX_TOKEN", "dbx_wrong")
        .args(["push"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("dbx login"), "{}", stderr(&out));
}

#[test]
fn wrong_password_exits_3() {
    let server = Server::start();
    let dev = Client::new();
    let out = run_with_stdin(
        dev.cmd(dev.home.path()).args([
            "login",
            &server.url,
            "--user",
            "alice",
            "--password-stdin",
        ]),
        "wrong\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = run_with_stdin(
        dev.cmd(dev.home.path()).args([
            "login",
            &server.url,
            "--user",
            "nobody",
            "--password-stdin",
        ]),
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn server_not_running_exits_5() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    dev.init(dir.path());
    drop(server);
    let out = dev.run(dir.path(), &["push"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach the server"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn not_logged_in_exits_3_and_outside_a_folder_says_init() {
    let dev = Client::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dev.run(dir.path(), &["init"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("dbx login"));
    let out = dev.run(dir.path(), &["push"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("dbx init"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    let dev = Client::new();
    let out = dev.run(dev.home.path(), &["push", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Every block file the server holds.
fn block_files(server: &Server) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(server.data.path().join("blocks")).unwrap() {
        let d = d.unwrap().path();
        if d.file_name().unwrap().len() == 2 {
            for f in std::fs::read_dir(&d).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn a_block_corrupted_on_the_server_is_never_written_locally() {
    let server = Server::start();
    let (dev1, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    write_file(&a.join("precious.bin"), &Rng::new(3).bytes(300_000));
    dev1.init(&a);
    dev2.init(&b);
    dev1.ok(&a, &["push"]);
    let blocks = block_files(&server);
    assert_eq!(blocks.len(), 1);
    let mut raw = std::fs::read(&blocks[0]).unwrap();
    raw[1000] ^= 0x40;
    std::fs::write(&blocks[0], raw).unwrap();

    let out = dev2.run(&b, &["pull"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert!(!b.join("precious.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".dbx")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        server
            .data
            .path()
            .join("blocks/quarantine")
            .read_dir()
            .unwrap()
            .count()
            == 1,
        "the bad block is quarantined"
    );
}

/// A big file's blocks are verified as they come, or written and verified a window at a time:
/// a damaged one is found before anything is put in place, and asked for again, verified at
/// the source, which quarantines it; lost, not busy, so the exit code is 1, not 5 (try again
/// later).
#[test]
fn a_big_file_with_a_block_corrupted_on_the_server_is_never_put_in_place() {
    for has in [true, false] {
        big_file_with_a_corrupted_block(has);
    }
}

/// With SHA extensions or not (see `DBX_SHA_EXTENSIONS`): blocks verified as they arrive, or
/// a window at a time.
fn big_file_with_a_corrupted_block(sha_extensions: bool) {
    let server = Server::start();
    let (dev1, mut dev2) = two_devices(&server);
    dev2.sha_extensions = Some(sha_extensions);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    let content = Rng::new(8).bytes(6 << 20);
    write_file(&a.join("big.bin"), &content);
    dev1.init(&a);
    dev2.init(&b);
    dev1.ok(&a, &["push"]);
    let blocks = stored_blocks(server.data.path());
    assert!(blocks.len() > 3, "{} blocks", blocks.len());
    // One in the middle of the file.
    let middle = blocks
        .values()
        .find(|blk| {
            let bytes = blk.bytes();
            let at = content.windows(bytes.len()).position(|w| w == &bytes[..]);
            at.is_some_and(|at| at > 0 && at + bytes.len() < content.len())
        })
        .expect("a block inside the file");
    middle.corrupt(100);

    let out = dev2.run(&b, &["pull"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert!(!b.join("big.bin").exists());
    let quarantined = server.data.path().join("blocks/quarantine");
    assert_eq!(quarantined.read_dir().unwrap().count(), 1);
}

#[test]
fn stale_temp_files_are_cleaned_and_never_uploaded() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("sub/.dbx-tmp-killed"), b"half a download");
    write_file(&dir.path().join("real.txt"), b"real");
    dev.init(dir.path());
    dev.ok(dir.path(), &["push"]);
    assert!(!dir.path().join("sub/.dbx-tmp-killed").exists());
    let listing = dev.json(dir.path(), &["ls", "-R"]);
    let paths: Vec<_> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths, vec!["/real.txt", "/sub"]);
}

#[test]
fn a_persistently_failing_block_store_exits_5_and_commits_nothing() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("first.txt"), b"stored fine");
    dev.init(dir.path());
    dev.ok(dir.path(), &["push"]);
    // The server can no longer write blocks: every upload answers 500, retried, then given up.
    // Also while a big new file is sent as it is read: that sending stops, the hashing goes on.
    std::fs::remove_dir_all(server.data.path().join("blocks").join("tmp")).unwrap();
    write_file(&dir.path().join("second.bin"), &Rng::new(9).bytes(200_000));
    write_file(&dir.path().join("third.bin"), &Rng::new(10).bytes(24 << 20));
    age_files(dir.path());
    let out = dev.run(dir.path(), &["push"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("block store"), "{}", stderr(&out));
    let listing = dev.json(dir.path(), &["ls"]);
    let paths: Vec<_> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["/first.txt"], "nothing half-committed");
}

/// `blocks/fetch` refuses more than a batch's worth of bytes, from the metadata, before
/// reading any; a batch within the limit comes back whole.
#[tokio::test]
async fn an_oversized_block_fetch_is_refused() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("big.bin"), &Rng::new(5).bytes(40 << 20));
    dev.init(dir.path());
    dev.ok(dir.path(), &["push"]);
    let tok = api_token(&server, "alice").await;
    let list = api_get(&server, &tok, "files/list?path=&recursive=true").await;
    let blocks: Vec<String> = serde_json::from_value(list["entries"][0]["blocks"].clone()).unwrap();
    let fetch = |hashes: &[String]| {
        reqwest::Client::new()
            .post(format!("{}/api/v1/blocks/fetch", server.url))
            .bearer_auth(&tok)
            .json(&json!({ "hashes": hashes }))
            .send()
    };
    let resp = fetch(&blocks).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large");
    let resp = fetch(&blocks[..2]).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().len() > 2 * (128 << 10));
}

/// `blocks/batch` (streamed and decoded as it arrives): a batch is stored whole only when
/// every block hashes to its id; a wrong id, a cut-short body or an oversized one is refused
/// with nothing stored.
#[tokio::test]
async fn block_batches_are_all_or_nothing() {
    let server = Server::start();
    let tok = api_token(&server, "alice").await;
    let frame = |blocks: &[(&str, &[u8])]| {
        let mut body = Vec::new();
        for (hash, bytes) in blocks {
            body.extend_from_slice(hash.as_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            body.extend_from_slice(bytes);
        }
        body
    };
    let post = |body: Vec<u8>| {
        reqwest::Client::new()
            .post(format!("{}/api/v1/blocks/batch", server.url))
            .bearer_auth(&tok)
            .body(body)
            .send()
    };
    let missing = |hashes: Vec<String>| {
        let body = json!({ "hashes": hashes });
        let (server, tok) = (&server, &tok);
        async move {
            let v = api_post(server, tok, "blocks/missing", body).await;
            v["missing"].as_array().unwrap().len()
        }
    };
    let blocks: Vec<Vec<u8>> = (0..20)
        .map(|i| Rng::new(i).bytes(1000 + 700 * i as usize))
        .collect();
    let ids: Vec<String> = blocks.iter().map(|b| sha_hex(b)).collect();
    let mut framed: Vec<(&str, &[u8])> = ids
        .iter()
        .map(String::as_str)
        .zip(blocks.iter().map(Vec::as_slice))
        .collect();

    // One wrong id among twenty: refused, none stored.
    let wrong = sha_hex(b"not these bytes");
    framed[13].0 = &wrong;
    let resp = post(frame(&framed)).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "hash_mismatch", "{body}");
    assert_eq!(missing(ids.clone()).await, 20);

    // Cut short inside a block: refused, none stored.
    framed[13].0 = &ids[13];
    let whole = frame(&framed);
    let resp = post(whole[..whole.len() - 10].to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(missing(ids.clone()).await, 20);

    // Over the batch limit: refused before it is all read.
    let big = vec![0u8; 4 << 20];
    let big_id = sha_hex(&big);
    let oversized: Vec<(&str, &[u8])> = (0..5).map(|_| (big_id.as_str(), &big[..])).collect();
    let resp = post(frame(&oversized)).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(missing(vec![big_id]).await, 1);

    // The same batch, right: all twenty stored.
    let resp = post(whole).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["stored"], 20, "{body}");
    assert_eq!(missing(ids).await, 0);
}

/// A small disk of its own (a tmpfs), unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    /// `None` where this process may not mount (not root).
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk(dir))
    }

    fn grow(&self, mib: u32) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.0.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A pull that fills the disk says so (not "database or disk is full" from the index), puts
/// no partial file in place, and the next pull, with room, resumes from what was written.
#[test]
fn a_pull_onto_a_full_disk_says_so_and_the_next_one_resumes() {
    let Some(disk) = SmallDisk::mount(10) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let server = Server::start();
    let (dev1, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let mut rng = Rng::new(31);
    write_file(&a.join("big.bin"), &rng.bytes(16 << 20));
    for i in 0..4 {
        write_file(&a.join(format!("small{i}.txt")), &rng.bytes(64 << 10));
    }
    dev1.init(&a);
    dev1.ok(&a, &["push"]);
    let b = disk.0.path().join("b");
    dev2.init(&b);

    let out = dev2.run(&b, &["pull"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let told = stderr(&out);
    assert!(
        told.starts_with("dbx: error: no space left for ") && told.contains("free some space"),
        "{told}"
    );
    assert!(
        !b.join("big.bin").exists(),
        "a partial file is never put in place"
    );

    disk.grow(64);
    let report = dev2.json(&b, &["pull"]);
    assert!(report["bytes_reused"].as_u64().unwrap() > 0, "{report}");
    assert_same(&digest_tree(&b), &digest_tree(&a));
}
