//! The core path: push a tree, pull it elsewhere, byte for byte; no-op and dedup cost nothing.

use std::path::Path;

use crate::harness::*;

/// A tree with ≥ 200 files, one of 20 MiB, nested and empty folders, empty files, Unicode and
/// spaces in names, executable files.
fn make_tree(root: &Path, rng: &mut Rng) {
    for i in 0..210 {
        let dir = format!("d{}/e{}", i % 7, i % 3);
        let size = match i % 10 {
            0 => 0,
            1 => rng.below(300_000) as usize + 1_000_000,
            _ => rng.below(20_000) as usize,
        };
        write_file(&root.join(format!("{dir}/f{i:03}.bin")), &rng.bytes(size));
    }
    write_file(&root.join("big/twenty.bin"), &rng.bytes(20 << 20));
    write_file(&root.join("héllo wörld/ünïcödé 名前.txt"), b"unicode\n");
    write_file(&root.join("with space/a file.txt"), b"spaces\n");
    write_file(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n");
    set_mode(&root.join("bin/run.sh"), 0o755);
    std::fs::create_dir_all(root.join("empty/nested/deeper")).unwrap();
    write_file(&root.join("empty-file"), b"");
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key:?} in {v}"))
}

#[test]
fn push_pull_round_trip_dedup_and_deletes() {
    let server = Server::start();
    let (dev1, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    let mut rng = Rng::new(1);
    make_tree(&a, &mut rng);
    std::os::unix::fs::symlink("bin/run.sh", a.join("link-to-run")).unwrap();
    dev1.init_at(&a, "/main");
    dev2.init_at(&b, "/main");

    let out = dev1.run(&a, &["--json", "push"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("symlink link-to-run"),
        "symlinks are skipped with a warning: {}",
        stderr(&out)
    );
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total_files = digest_tree(&a).values().filter(|v| *v != "dir").count() as u64 - 1; // the symlink is not synced
    assert_eq!(n(&first, "files_uploaded"), total_files);
    assert!(n(&first, "block_bytes_sent") >= 20 << 20);
    assert!(n(&first, "blocks_uploaded") > 0);

    let pulled = dev2.json(&b, &["pull"]);
    assert_eq!(n(&pulled, "files_downloaded"), total_files);
    let mut expected = digest_tree(&a);
    expected.remove("link-to-run");
    assert_eq!(
        digest_tree(&b),
        expected,
        "B must equal A byte for byte, modes included"
    );

    // Unchanged: nothing is read again, nothing sent.
    let again = dev1.json(&a, &["push"]);
    assert_eq!(n(&again, "block_bytes_sent"), 0);
    assert_eq!(n(&again, "files_uploaded"), 0);
    let again = dev2.json(&b, &["pull"]);
    assert_eq!(n(&again, "files_downloaded"), 0);

    // The same files under other names, in another folder of the same account: all dedup.
    let c = work.path().join("c");
    for (i, (rel, v)) in expected.iter().enumerate() {
        if v != "dir" {
            std::fs::create_dir_all(&c).unwrap();
            std::fs::copy(a.join(rel), c.join(format!("copy-{i}"))).unwrap();
        }
    }
    dev1.init_at(&c, "/copies");
    let dedup = dev1.json(&c, &["push"]);
    assert_eq!(n(&dedup, "files_uploaded"), total_files);
    assert_eq!(n(&dedup, "block_bytes_sent"), 0, "{dedup}");
    assert!(n(&dedup, "bytes_deduplicated") >= 20 << 20);

    // Delete and modify a few files in A; B follows exactly.
    std::fs::remove_file(a.join("d0/e0/f000.bin")).unwrap();
    std::fs::remove_dir_all(a.join("d1")).unwrap();
    std::fs::write(a.join("d2/e2/f002.bin"), rng.bytes(5000)).unwrap();
    let big = std::fs::read(a.join("big/twenty.bin")).unwrap();
    let mut edited = big[..1000].to_vec();
    edited.push(b'X');
    edited.extend_from_slice(&big[1000..]);
    std::fs::write(a.join("big/twenty.bin"), &edited).unwrap();
    set_mode(&a.join("with space/a file.txt"), 0o755);
    let pushed = dev1.json(&a, &["push"]);
    assert!(n(&pushed, "files_deleted") >= 2);
    assert!(
        n(&pushed, "block_bytes_sent") < 10 << 20,
        "a one-byte insert must not resend the 20 MiB file: {pushed}"
    );
    dev2.json(&b, &["pull"]);
    let mut expected = digest_tree(&a);
    expected.remove("link-to-run");
    assert_same(&digest_tree(&b), &expected);
    assert!(!b.join("d1").exists());
}

#[test]
fn dry_run_changes_nothing() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    write_file(&a.join("x.txt"), b"hello");
    dev.init(&a);
    let plan = dev.json(&a, &["push", "--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["plan"][0]["action"], "upload");
    assert_eq!(plan["plan"][0]["path"], "x.txt");
    let listing = dev.json(&a, &["ls"]);
    assert_eq!(listing["entries"].as_array().unwrap().len(), 0);
    dev.json(&a, &["push"]);
    let listing = dev.json(&a, &["ls"]);
    assert_eq!(listing["entries"][0]["path"], "/x.txt");
}

#[test]
fn pull_never_overwrites_an_unsynced_local_file() {
    let server = Server::start();
    let (dev1, dev2) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    write_file(&a.join("notes.txt"), b"from a");
    write_file(&b.join("notes.txt"), b"mine, not synced yet");
    dev1.init(&a);
    dev2.init(&b);
    dev1.ok(&a, &["push"]);
    let out = dev2.run(&b, &["pull"]);
    assert_eq!(out.status.code(), Some(1), "a conflict is reported");
    assert!(stderr(&out).contains("notes.txt"));
    assert_eq!(
        std::fs::read(b.join("notes.txt")).unwrap(),
        b"mine, not synced yet"
    );
}

#[test]
fn data_survives_a_server_restart() {
    let server = Server::start();
    let dev1 = Client::new();
    dev1.login(&server, "alice");
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let mut rng = Rng::new(7);
    for i in 0..20 {
        write_file(&a.join(format!("f{i}")), &rng.bytes(i * 1000));
    }
    dev1.init(&a);
    dev1.ok(&a, &["push"]);
    let data = server.stop();
    let server = Server::start_on(data);
    let dev2 = Client::new();
    dev2.login(&server, "alice");
    let b = work.path().join("b");
    dev2.init(&b);
    dev2.ok(&b, &["pull"]);
    assert_same(&digest_tree(&b), &digest_tree(&a));
}

/// The documented name rule: names are exact bytes. A case-only rename is an ordinary move;
/// NFC and NFD spellings of the same visible name are two different files everywhere.
#[test]
fn names_are_exact_bytes_case_renames_and_unicode_forms() {
    let server = Server::start();
    let (dev_a, dev_b) = two_devices(&server);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    write_file(&a.join("Readme.md"), b"read me");
    let (nfc, nfd) = ("caf\u{e9}.txt", "cafe\u{301}.txt");
    write_file(&a.join(nfc), b"composed");
    write_file(&a.join(nfd), b"decomposed");
    dev_a.init(&a);
    dev_b.init(&b);
    dev_a.ok(&a, &["sync"]);
    dev_b.ok(&b, &["sync"]);
    assert_eq!(std::fs::read(b.join(nfc)).unwrap(), b"composed");
    assert_eq!(std::fs::read(b.join(nfd)).unwrap(), b"decomposed");

    std::fs::rename(a.join("Readme.md"), a.join("README.md")).unwrap();
    let up = dev_a.json(&a, &["sync"]);
    assert_eq!(n(&up, "files_moved"), 1, "{up}");
    assert_eq!(n(&up, "block_bytes_sent"), 0, "{up}");
    let down = dev_b.json(&b, &["sync"]);
    assert_eq!(n(&down, "files_moved"), 1, "{down}");
    assert_eq!(n(&down, "files_downloaded"), 0, "{down}");
    assert!(!b.join("Readme.md").exists());
    assert_eq!(std::fs::read(b.join("README.md")).unwrap(), b"read me");
    assert_same(&digest_tree(&b), &digest_tree(&a));
}

/// The server runs with two malloc arenas (glibc keeps freed memory per arena, and its threads
/// would otherwise use up to 8 per core; see `limit_malloc_arenas`), unless told otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_server_limits_its_malloc_arenas() {
    let server = Server::start();
    let env = server.environment();
    assert!(env.iter().any(|v| v == "MALLOC_ARENA_MAX=2"), "{env:?}");
    // Still the server that answers, after running itself again.
    let dev = Client::new();
    dev.login(&server, "alice");
}
