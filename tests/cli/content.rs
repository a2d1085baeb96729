//! Ranged downloads (`files/content`, `dbx cat`) and resumable uploads.

use crate::harness::*;

#[tokio::test]
async fn ranges_return_exactly_the_requested_bytes() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let data = Rng::new(11).bytes(9 << 20);
    write_file(&dir.path().join("big.bin"), &data);
    dev.init(dir.path());
    dev.ok(dir.path(), &["push"]);
    let tok = api_token(&server, "alice").await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/files/content?path=big.bin", server.url);
    let n = data.len();

    let full = http.get(&url).bearer_auth(&tok).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let etag = full.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(full.bytes().await.unwrap().to_vec(), data);
    let listing = dev.json(dir.path(), &["ls"]);
    assert_eq!(
        etag,
        format!(
            "\"{}\"",
            listing["entries"][0]["content_hash"].as_str().unwrap()
        )
    );

    // first, middle (across block boundaries), last, open-ended and suffix ranges
    for (spec, lo, hi) in [
        ("0-99", 0, 99),
        ("1000000-3500000", 1_000_000, 3_500_000),
        (&format!("{}-{}", n - 10, n - 1)[..], n - 10, n - 1),
        (&format!("{}-", n - 5000)[..], n - 5000, n - 1),
        ("-777", n - 777, n - 1),
        (&format!("5-{}", n + 100)[..], 5, n - 1),
    ] {
        let resp = http
            .get(&url)
            .bearer_auth(&tok)
            .header("range", format!("bytes={spec}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206, "{spec}");
        assert_eq!(
            resp.headers()["content-range"].to_str().unwrap(),
            format!("bytes {lo}-{hi}/{n}"),
            "{spec}"
        );
        let got = resp.bytes().await.unwrap();
        assert_eq!(sha_hex(&got), sha_hex(&data[lo..=hi]), "{spec}");
    }
    let resp = http
        .get(&url)
        .bearer_auth(&tok)
        .header("range", format!("bytes={n}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(
        resp.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{n}")
    );

    // The same through the CLI.
    let out = dev.ok(dir.path(), &["cat", "big.bin", "--range", "100-199"]);
    assert_eq!(out.stdout, data[100..200]);
    let out = dev.ok(dir.path(), &["cat", "/big.bin"]);
    assert_eq!(sha_hex(&out.stdout), sha_hex(&data));
    let out = dev.run(dir.path(), &["cat", "big.bin", "--range", &format!("{n}-")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("past the end"), "{}", stderr(&out));
    let out = dev.run(dir.path(), &["cat", "nope.bin"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

/// Chunks as dbx cuts them (FastCDC 2020, 128 KiB / 512 KiB / 2 MiB).
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    fastcdc::v2020::FastCDC::new(data, 128 << 10, 512 << 10, 2 << 20)
        .map(|c| &data[c.offset..c.offset + c.length])
        .collect()
}

#[tokio::test]
async fn an_interrupted_upload_resumes_with_only_the_missing_blocks() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let data = Rng::new(12).bytes(24 << 20);
    write_file(&dir.path().join("video.bin"), &data);
    dev.init(dir.path());

    // What a push killed at ~80% leaves behind: the first 80% of the blocks, uncommitted.
    let parts = chunks(&data);
    assert!(parts.len() > 5);
    let cut = parts.len() * 4 / 5;
    let tok = api_token(&server, "alice").await;
    let http = reqwest::Client::new();
    for p in &parts[..cut] {
        let resp = http
            .put(format!("{}/api/v1/blocks/{}", server.url, sha_hex(p)))
            .bearer_auth(&tok)
            .body(p.to_vec())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    let remaining: usize = parts[cut..].iter().map(|p| p.len()).sum();
    let report = dev.json(dir.path(), &["push"]);
    assert_eq!(report["block_bytes_sent"].as_u64(), Some(remaining as u64));
    assert_eq!(
        report["blocks_uploaded"].as_u64(),
        Some((parts.len() - cut) as u64)
    );
    let out = dev.ok(dir.path(), &["cat", "video.bin"]);
    assert_eq!(sha_hex(&out.stdout), sha_hex(&data));
}

#[test]
fn a_push_killed_midway_resumes_without_resending_what_arrived() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let data = Rng::new(13).bytes(40 << 20);
    write_file(&dir.path().join("big.bin"), &data);
    dev.init(dir.path());
    let blocks_dir = server.data.path().join("blocks");
    let count_blocks = || {
        std::fs::read_dir(&blocks_dir)
            .unwrap()
            .filter_map(|d| d.ok())
            .filter(|d| d.file_name().len() == 2)
            .map(|d| std::fs::read_dir(d.path()).unwrap().count())
            .sum::<usize>()
    };
    let mut child = dev.cmd(dir.path()).arg("push").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count_blocks() < 3 && child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Uploads the server was processing when the client died still finish; let them.
    let mut arrived = count_blocks();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = count_blocks();
        if now == arrived {
            break;
        }
        arrived = now;
    }
    let report = dev.json(dir.path(), &["push"]);
    let total_blocks = chunks(&data).len() as u64;
    let sent = report["blocks_uploaded"].as_u64().unwrap();
    // Whatever reached the server before the kill is not sent again.
    assert!(
        sent + arrived as u64 <= total_blocks,
        "sent {sent} again after {arrived} of {total_blocks} had arrived"
    );
    let out = dev.ok(dir.path(), &["cat", "big.bin"]);
    assert_eq!(sha_hex(&out.stdout), sha_hex(&data));
}

/// Both ways of verifying a big download: as blocks arrive (CPUs with SHA extensions) and a
/// window at a time, read back (lockstep hashing, CPUs without them).
#[test]
fn an_interrupted_download_resumes_from_what_was_written() {
    for has in [true, false] {
        interrupted_download_resumes(has);
    }
}

fn interrupted_download_resumes(sha_extensions: bool) {
    let server = Server::start();
    let (dev_a, mut dev_b) = two_devices(&server);
    dev_b.sha_extensions = Some(sha_extensions);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let data = Rng::new(14).bytes(24 << 20);
    write_file(&a.join("movie.bin"), &data);
    dev_a.init(&a);
    dev_b.init(&b);
    dev_a.ok(&a, &["push"]);
    let listing = dev_a.json(&a, &["ls"]);
    let hash = listing["entries"][0]["content_hash"]
        .as_str()
        .unwrap()
        .to_string();

    // What a pull killed after 15 MiB leaves: the partial file, named after the content.
    let written = 15 << 20;
    write_file(
        &b.join(format!(".dbx-part-{}", &hash[..32])),
        &data[..written],
    );
    let report = dev_b.json(&b, &["pull"]);
    let reused = report["bytes_reused"].as_u64().unwrap();
    let received = report["block_bytes_received"].as_u64().unwrap();
    assert_eq!(reused + received, data.len() as u64, "{report}");
    // Every complete chunk of the partial file is kept (at most the last, cut-short one and
    // the chunk it belongs to are fetched again: < 2 × 2 MiB).
    assert!(reused as usize > written - (4 << 20), "{report}");
    assert!(
        (received as usize) < data.len() - written + (4 << 20),
        "{report}"
    );
    assert_eq!(
        sha_hex(&std::fs::read(b.join("movie.bin")).unwrap()),
        sha_hex(&data)
    );
    let parts: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".dbx-"))
        .collect();
    assert!(parts.is_empty(), "no partial or temp file is left");

    // A partial file nobody needs any more is cleaned up, and never synced.
    write_file(
        &b.join(".dbx-part-0123456789abcdef0123456789abcdef"),
        b"stale",
    );
    dev_b.ok(&b, &["sync"]);
    assert!(!b
        .join(".dbx-part-0123456789abcdef0123456789abcdef")
        .exists());
}

#[test]
fn a_pull_killed_midway_converges_on_rerun() {
    let server = Server::start();
    let (dev_a, dev_b) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let data = Rng::new(15).bytes(48 << 20);
    write_file(&a.join("big.bin"), &data);
    dev_a.init(&a);
    dev_b.init(&b);
    dev_a.ok(&a, &["push"]);
    let mut child = dev_b.cmd(&b).arg("pull").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let partial = || {
        std::fs::read_dir(&b)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(".dbx-part-")
                    && e.metadata().map(|m| m.len()).unwrap_or(0) > (2 << 20)
            })
    };
    while !partial() && child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!b.join("big.bin").exists() || std::fs::read(b.join("big.bin")).unwrap() == data);
    dev_b.ok(&b, &["pull"]);
    assert_eq!(
        sha_hex(&std::fs::read(b.join("big.bin")).unwrap()),
        sha_hex(&data)
    );
}

/// Edits of big files send only changed chunks. Without SHA extensions the others are not
/// even re-hashed (their ids come from the index, by fingerprint); with them every chunk is
/// hashed and no fingerprint kept. Either way, and whatever the path the fingerprints took
/// into the index (a push, or a download), the edited file must arrive byte for byte.
#[test]
fn edits_of_big_files_round_trip_on_every_path() {
    for sha_extensions in [false, true] {
        edits_of_big_files_round_trip(sha_extensions);
    }
}

fn edits_of_big_files_round_trip(sha_extensions: bool) {
    let server = Server::start();
    let (mut a, mut b) = two_devices(&server);
    a.sha_extensions = Some(sha_extensions);
    b.sha_extensions = Some(sha_extensions);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut rng = Rng::new(77);
    let mut data = rng.bytes(24 << 20);
    write_file(&da.path().join("video.bin"), &data);
    a.init(da.path());
    b.init(db.path());
    a.ok(da.path(), &["push"]);
    b.ok(db.path(), &["pull"]);

    // Edited where it was pushed from (fingerprints recorded by the push): an insert, an
    // overwrite in place (same size) and an append.
    type Edit = fn(&mut Vec<u8>);
    let edits: [Edit; 3] = [
        |d| d.insert(1000, b'X'),
        |d| d[13 << 20] ^= 0xff,
        |d| d.extend_from_slice(b"tail"),
    ];
    for (i, edit) in edits.iter().enumerate() {
        // On A for the first edits, then on B, whose fingerprints came from a download.
        let (dev, dir, other, odir) = if i < 2 {
            (&a, da.path(), &b, db.path())
        } else {
            (&b, db.path(), &a, da.path())
        };
        edit(&mut data);
        // Another mtime for sure, even within one clock tick.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_file(&dir.join("video.bin"), &data);
        let pushed = dev.json(dir, &["push"]);
        assert_eq!(
            pushed["files_uploaded"], 1,
            "edit {i}, SHA extensions {sha_extensions}"
        );
        let sent = pushed["block_bytes_sent"].as_u64().unwrap();
        assert!(
            sent > 0 && sent <= 2 * (2 << 20),
            "edit {i}, SHA extensions {sha_extensions}: {sent} bytes sent"
        );
        other.ok(odir, &["pull"]);
        let got = std::fs::read(odir.join("video.bin")).unwrap();
        assert_eq!(
            sha_hex(&got),
            sha_hex(&data),
            "edit {i}, SHA extensions {sha_extensions}"
        );
    }
    let listing = a.json(da.path(), &["ls"]);
    assert_eq!(listing["entries"][0]["size"], data.len());
}

/// A big file's blocks download many to a request, as many as its average block suggests fit
/// the server's limit; where bigger blocks cluster (a run of zeros makes blocks of the largest
/// size), the server refuses the request (413) and the client asks in halves.
#[test]
fn blocks_larger_than_the_average_download_in_smaller_requests() {
    let server = Server::start();
    let (a, b) = two_devices(&server);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut data = vec![0u8; 24 << 20];
    data.extend(Rng::new(91).bytes(16 << 20));
    write_file(&da.path().join("disk.img"), &data);
    a.init(da.path());
    b.init(db.path());
    a.ok(da.path(), &["push"]);
    let (report, log) = b.json_logged(db.path(), &["pull"]);
    assert!(log.contains("too large for one request; split"), "{log}");
    assert_eq!(report["files_downloaded"], 1, "{report}");
    let got = std::fs::read(db.path().join("disk.img")).unwrap();
    assert_eq!(sha_hex(&got), sha_hex(&data));
}

/// A push goes in chunks, each committed on its own: killed after some chunks committed, the
/// next push commits only the rest, and the server ends up with exactly the local tree.
#[tokio::test]
async fn a_push_killed_between_chunks_keeps_what_it_committed() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(31);
    let n = 3500; // four chunks of at most 1,000 files
    for i in 0..n {
        let size = 1 + rng.below(3000) as usize;
        write_file(
            &dir.path().join(format!("d{}/f{i}.txt", i % 13)),
            &rng.bytes(size),
        );
    }
    dev.init(dir.path());
    let tok = api_token(&server, "alice").await;
    let committed = || async {
        let list = api_get(&server, &tok, "files/list?path=&recursive=true").await;
        list["entries"]
            .as_array()
            .map_or(0, |e| e.iter().filter(|e| e["kind"] == "file").count())
    };
    let mut child = dev.cmd(dir.path()).arg("push").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while committed().await == 0 && child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    // A commit the server was processing when the client died may still land; let it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = committed().await;
    eprintln!("committed before the kill: {before} of {n}");
    assert!(before > 0, "the first chunk was committed before the kill");
    assert!(
        before % 1000 == 0 || before == n,
        "whole chunks only: {before}"
    );

    let report = dev.json(dir.path(), &["push"]);
    assert_eq!(
        report["files_uploaded"].as_u64().unwrap() as usize,
        n - before,
        "only what was not committed goes again"
    );
    assert_eq!(committed().await, n);
    let other = tempfile::tempdir().unwrap();
    dev.init(other.path());
    dev.ok(other.path(), &["pull"]);
    assert_same(&digest_tree(other.path()), &digest_tree(dir.path()));
}

/// A first push sends new files' blocks while the others are still being hashed, a big file's
/// as it is read, and commits the small ones whose blocks went; every block goes and is counted
/// once (as sent, not as deduplicated), every file is committed once and recorded (the next
/// push has nothing to do), and the files round-trip. A dry run sends none.
#[test]
fn new_files_blocks_go_while_the_rest_is_hashed_and_count_once() {
    let server = Server::start();
    let (dev, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let files = write_sent_while_hashing(&a, "f", &mut Rng::new(17));
    dev.init(&a);
    dev2.init(&b);

    let dry = dev.json(&a, &["push", "--dry-run"]);
    assert_eq!(dry["blocks_uploaded"], 0, "{dry}");
    assert!(
        stored_blocks(server.data.path()).is_empty(),
        "a dry run stores nothing on the server"
    );

    let (report, log) = dev.json_logged(&a, &["push"]);
    assert!(log.contains("sent while hashing"), "{log}");
    let big = files.last().unwrap();
    let as_hashed = format!("blocks={} bytes={}", chunks(big).len(), big.len());
    assert!(
        log.lines()
            .any(|l| l.contains("sent as hashed") && l.contains(&as_hashed)),
        "the big file's blocks all go as it is read ({as_hashed}): {log}"
    );
    let blocks: usize = files.iter().map(|f| chunks(f).len()).sum();
    assert_eq!(report["files_uploaded"], 13, "{report}");
    assert_eq!(report["blocks_uploaded"], blocks as u64, "{report}");
    assert_eq!(report["block_bytes_sent"], 78u64 << 20, "{report}");
    assert_eq!(report["bytes_deduplicated"], 0, "{report}");
    assert_eq!(stored_blocks(server.data.path()).len(), blocks);
    let early: usize = log
        .lines()
        .find_map(|l| l.split("committed while hashing files=").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("small files are committed while hashing: {log}"));
    assert!((1..13).contains(&early), "{early}: {log}");
    // Each file once in the journal: the upload took the early commits as its own.
    let history = dev.json(&a, &["history", "f00.bin"]);
    assert_eq!(
        history["entries"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );
    let again = dev.json(&a, &["push"]);
    assert_eq!(again["files_uploaded"], 0, "{again}");
    assert_eq!(again["blocks_uploaded"], 0, "{again}");

    dev2.ok(&b, &["pull"]);
    assert_same(&digest_tree(&b), &digest_tree(&a));
}

/// A file copied to a new name, the old one deleted, is moved on the server even when the same
/// push has enough new files to commit some while hashing: nothing is committed early when a
/// synced file is gone (the new name, committed as a new file, would stand where the move goes).
#[test]
fn a_move_is_not_committed_early_as_a_new_file() {
    let server = Server::start();
    let (dev, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let mut rng = Rng::new(23);
    write_file(&a.join("old.bin"), &rng.bytes(1 << 20));
    dev.init(&a);
    dev.ok(&a, &["push"]);
    // Another inode: found by its content, not by the index's stat.
    std::fs::copy(a.join("old.bin"), a.join("new.bin")).unwrap();
    std::fs::remove_file(a.join("old.bin")).unwrap();
    // Enough to commit some while hashing, were it allowed.
    write_sent_while_hashing(&a, "more", &mut rng);
    let (report, log) = dev.json_logged(&a, &["push"]);
    assert_eq!(report["files_moved"], 1, "{report}");
    assert_eq!(report["files_uploaded"], 13, "{report}");
    assert!(log.contains("sent while hashing"), "{log}");
    assert!(!log.contains("committed while hashing"), "{log}");
    dev2.init(&b);
    dev2.ok(&b, &["pull"]);
    assert_same(&digest_tree(&b), &digest_tree(&a));
}
