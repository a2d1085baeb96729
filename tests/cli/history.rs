//! History, restore and rewind, garbage collection and fsck: every version is listed with who
//! made it, any revision comes back byte for byte (deleted files too), a folder rewinds to a
//! moment exactly, GC frees exactly the blocks nothing retained references, and fsck finds
//! missing and corrupt blocks without touching anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::harness::*;

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key:?} in {v}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Journal times (and GC's reference stamps) have 1-second resolution: sleeping just over a
/// second puts a strict boundary between what came before and what comes after.
fn tick() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// A Unix time as RFC 3339 in UTC (`2026-11-26T10:00:00Z`).
fn rfc3339(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// Logs `client` in as `user` with `DBX_DEVICE=device`, the name history records.
fn login_device(client: &Client, server: &Server, user: &str, device: &str) {
    let out = run_with_stdin(
        client
            .cmd(client.home.path())
            .env("DBX_DEVICE", device)
            .args(["login", &server.url, "--user", user, "--password-stdin"]),
        &format!("{PASSWORD}\n"),
    );
    assert!(out.status.success(), "login as {device}: {}", stderr(&out));
}

/// The entries of `dbx --json history ARGS`, newest first.
fn history(client: &Client, dir: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["history"];
    all.extend_from_slice(args);
    let v = client.json(dir, &all);
    v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {v}"))
        .clone()
}

/// The server's entries below `/` (from `dbx --json ls -R`), by path.
fn server_entries(client: &Client, dir: &Path) -> BTreeMap<String, Value> {
    let listing = client.json(dir, &["ls", "-R", "/"]);
    listing["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {listing}"))
        .iter()
        .map(|e| (s(e, "path").to_string(), e.clone()))
        .collect()
}

/// Runs `dbx --json admin ARGS --data DATA` and returns (exit code, stdout JSON, stderr).
fn admin(client: &Client, data: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = client
        .cmd(client.home.path())
        .arg("--json")
        .arg("admin")
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run dbx admin");
    (
        out.status.code().unwrap_or(-1),
        parse_json(&out),
        stderr(&out),
    )
}

/// The hashes of every block on disk.
fn block_files(data: &Path) -> BTreeSet<String> {
    stored_blocks(data).into_keys().collect()
}

/// A server and two devices of alice, "laptop" and "desktop", both mirroring `/`.
struct Devices {
    _server: Server,
    laptop: Client,
    desktop: Client,
    l: PathBuf,
    d: PathBuf,
    _work: tempfile::TempDir,
}

impl Devices {
    fn new() -> Devices {
        let server = Server::start();
        let laptop = Client::new();
        let desktop = Client::new();
        login_device(&laptop, &server, "alice", "laptop");
        login_device(&desktop, &server, "alice", "desktop");
        let work = tempfile::tempdir().unwrap();
        let l = work.path().join("laptop");
        let d = work.path().join("desktop");
        std::fs::create_dir_all(&l).unwrap();
        std::fs::create_dir_all(&d).unwrap();
        laptop.init(&l);
        desktop.init(&d);
        Devices {
            _server: server,
            laptop,
            desktop,
            l,
            d,
            _work: work,
        }
    }

    /// Device `i % 2`: laptop for even turns, desktop for odd ones.
    fn turn(&self, i: usize) -> (&Client, &Path, &'static str) {
        if i.is_multiple_of(2) {
            (&self.laptop, &self.l, "laptop")
        } else {
            (&self.desktop, &self.d, "desktop")
        }
    }
}

/// One version of `report.txt` as written, with what the server recorded for it.
struct Version {
    bytes: Vec<u8>,
    device: &'static str,
    rev: u64,
    content_hash: String,
}

/// Laptop and desktop take turns writing five versions of `report.txt` (distinct sizes), each
/// syncing before its edit and after it. Oldest first.
fn five_versions(p: &Devices) -> Vec<Version> {
    let mut rng = Rng::new(77);
    let mut versions: Vec<Version> = Vec::new();
    for i in 0..5 {
        let (client, dir, device) = p.turn(i);
        let before = client.json(dir, &["sync"]);
        if i > 0 {
            assert_eq!(
                std::fs::read(dir.join("report.txt")).unwrap(),
                versions.last().unwrap().bytes,
                "{device} has version {i} before editing: {before}"
            );
        }
        let mut bytes = format!("report, version {}, by {device}\n", i + 1).into_bytes();
        bytes.extend(rng.bytes(1000 + 613 * i));
        write_file(&dir.join("report.txt"), &bytes);
        let up = client.json(dir, &["sync"]);
        assert_eq!(n(&up, "files_uploaded"), 1, "version {}: {up}", i + 1);
        let entry = server_entries(client, dir)
            .remove("/report.txt")
            .expect("report.txt on the server");
        assert_eq!(n(&entry, "size"), bytes.len() as u64, "{entry}");
        versions.push(Version {
            bytes,
            device,
            rev: n(&entry, "rev"),
            content_hash: s(&entry, "content_hash").to_string(),
        });
    }
    let sizes: BTreeSet<usize> = versions.iter().map(|v| v.bytes.len()).collect();
    assert_eq!(sizes.len(), 5, "the versions have distinct sizes");
    versions
}

#[test]
fn history_shows_every_version_with_authors() {
    let p = Devices::new();
    let started = now_secs();
    let versions = five_versions(&p);
    let finished = now_secs();
    p.laptop.json(&p.l, &["sync"]);
    p.desktop.json(&p.d, &["sync"]);

    for (client, dir, side) in [(&p.laptop, &p.l, "laptop"), (&p.desktop, &p.d, "desktop")] {
        for arg in ["report.txt", "/report.txt"] {
            let entries = history(client, dir, &[arg]);
            assert_eq!(
                entries.len(),
                5,
                "history {arg} on {side} lists exactly the five versions: {entries:#?}"
            );
            let mut last_time = i64::MAX;
            for (k, e) in entries.iter().enumerate() {
                let v = &versions[4 - k];
                let what = format!("entry {k} of history {arg} on {side}: {e}");
                assert_eq!(n(e, "rev"), v.rev, "newest first: {what}");
                assert_eq!(e["op"], if k == 4 { "add" } else { "modify" }, "{what}");
                assert_eq!(e["kind"], "file", "{what}");
                assert_eq!(e["path"], "/report.txt", "{what}");
                assert_eq!(e["old_path"], Value::Null, "{what}");
                assert_eq!(n(e, "size"), v.bytes.len() as u64, "{what}");
                assert_eq!(e["content_hash"], v.content_hash.as_str(), "{what}");
                assert_eq!(e["user"], "alice", "{what}");
                assert_eq!(e["device"], v.device, "{what}");
                let t = e["time"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("no time: {what}"));
                assert!(
                    (started..=finished).contains(&t),
                    "time {t} not within the test's {started}..={finished}: {what}"
                );
                assert!(t <= last_time, "times go back as revisions do: {what}");
                last_time = t;
            }
        }
    }

    // --limit keeps the newest.
    let two = history(&p.desktop, &p.d, &["report.txt", "--limit", "2"]);
    let revs: Vec<u64> = two.iter().map(|e| n(e, "rev")).collect();
    assert_eq!(revs, vec![versions[4].rev, versions[3].rev], "{two:#?}");

    // The folder's journal holds the same five changes, newest first.
    let all = history(&p.laptop, &p.l, &["--all"]);
    let revs: Vec<u64> = all
        .iter()
        .filter(|e| e["path"] == "/report.txt")
        .map(|e| n(e, "rev"))
        .collect();
    let expected: Vec<u64> = versions.iter().rev().map(|v| v.rev).collect();
    assert_eq!(revs, expected, "history --all: {all:#?}");

    // The human listing names user@device.
    let out = p.laptop.ok(&p.l, &["history", "report.txt"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("alice@laptop").count(),
        3,
        "three versions by the laptop:\n{text}"
    );
    assert_eq!(
        text.matches("alice@desktop").count(),
        2,
        "two versions by the desktop:\n{text}"
    );
}

#[test]
fn restore_each_revision_byte_for_byte() {
    let p = Devices::new();
    let versions = five_versions(&p);
    p.laptop.json(&p.l, &["sync"]);

    // Each restore brings back a version other than the current one.
    let order = [2usize, 0, 3, 1, 4];
    let mut restore_revs = Vec::new();
    let mut last_rev = versions[4].rev;
    for &i in &order {
        let v = &versions[i];
        let rev = v.rev.to_string();
        let out = p
            .laptop
            .json(&p.l, &["restore", "report.txt", "--rev", &rev]);
        assert_eq!(n(&out, "restored_rev"), v.rev, "{out}");
        assert_eq!(out["path"], "/report.txt", "{out}");
        let new_rev = n(&out, "rev");
        assert!(new_rev > last_rev, "a restore is a new revision: {out}");
        last_rev = new_rev;
        restore_revs.push(new_rev);

        let synced = p.laptop.json(&p.l, &["sync"]);
        assert_eq!(n(&synced, "files_downloaded"), 1, "{synced}");
        assert_eq!(n(&synced, "files_uploaded"), 0, "{synced}");
        assert!(
            std::fs::read(p.l.join("report.txt")).unwrap() == v.bytes,
            "after restoring revision {} (version {}), report.txt holds exactly its bytes",
            v.rev,
            i + 1
        );
        let current = server_entries(&p.laptop, &p.l)
            .remove("/report.txt")
            .unwrap();
        assert_eq!(
            current["content_hash"],
            v.content_hash.as_str(),
            "{current}"
        );
        assert_eq!(n(&current, "rev"), new_rev, "{current}");
    }

    let entries = history(&p.desktop, &p.d, &["report.txt"]);
    assert_eq!(
        entries.len(),
        10,
        "five writes, five restores: {entries:#?}"
    );
    for (k, &i) in order.iter().rev().enumerate() {
        let e = &entries[k];
        let v = &versions[i];
        assert_eq!(e["op"], "restore", "{e}");
        assert_eq!(n(e, "rev"), restore_revs[order.len() - 1 - k], "{e}");
        assert_eq!(n(e, "size"), v.bytes.len() as u64, "{e}");
        assert_eq!(e["content_hash"], v.content_hash.as_str(), "{e}");
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["device"], "laptop", "the restoring device: {e}");
        assert_eq!(e["path"], "/report.txt", "{e}");
    }
    for (k, e) in entries[5..].iter().enumerate() {
        assert_eq!(n(e, "rev"), versions[4 - k].rev, "{e}");
        assert_ne!(e["op"], "restore", "{e}");
    }

    // The other device follows.
    p.desktop.json(&p.d, &["sync"]);
    assert!(std::fs::read(p.d.join("report.txt")).unwrap() == versions[4].bytes);
    assert_same(&digest_tree(&p.d), &digest_tree(&p.l));
}

#[test]
fn deleted_file_can_be_restored() {
    let p = Devices::new();
    let mut rng = Rng::new(3);
    let v1 = rng.bytes(5_000);
    let v2 = rng.bytes(7_321);
    write_file(&p.l.join("notes/plan.txt"), &v1);
    write_file(&p.l.join("notes/keep.txt"), b"stays\n");
    p.laptop.json(&p.l, &["sync"]);
    p.desktop.json(&p.d, &["sync"]);
    std::fs::write(p.d.join("notes/plan.txt"), &v2).unwrap();
    p.desktop.json(&p.d, &["sync"]);
    p.laptop.json(&p.l, &["sync"]);
    assert!(std::fs::read(p.l.join("notes/plan.txt")).unwrap() == v2);

    std::fs::remove_file(p.l.join("notes/plan.txt")).unwrap();
    let del = p.laptop.json(&p.l, &["sync"]);
    assert_eq!(n(&del, "files_deleted"), 1, "{del}");
    let gone = p.desktop.json(&p.d, &["sync"]);
    assert_eq!(n(&gone, "files_deleted"), 1, "{gone}");
    assert!(!p.d.join("notes/plan.txt").exists());
    assert!(!server_entries(&p.laptop, &p.l).contains_key("/notes/plan.txt"));

    // History of a file that exists nowhere any more, by its local path.
    let entries = history(&p.laptop, &p.l, &["notes/plan.txt"]);
    let ops: Vec<&str> = entries.iter().map(|e| s(e, "op")).collect();
    assert_eq!(ops, ["delete", "modify", "add"], "{entries:#?}");
    assert_eq!(entries[0]["device"], "laptop", "{}", entries[0]);
    assert_eq!(entries[0]["content_hash"], Value::Null, "{}", entries[0]);
    assert_eq!(entries[1]["device"], "desktop", "{}", entries[1]);
    assert_eq!(n(&entries[1], "size"), v2.len() as u64, "{}", entries[1]);
    assert_eq!(n(&entries[2], "size"), v1.len() as u64, "{}", entries[2]);

    // The delete itself is not a version to restore.
    let delete_rev = n(&entries[0], "rev").to_string();
    let out = p
        .laptop
        .run(&p.l, &["restore", "notes/plan.txt", "--rev", &delete_rev]);
    assert!(
        !out.status.success(),
        "restoring a delete revision must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!server_entries(&p.laptop, &p.l).contains_key("/notes/plan.txt"));

    let last = n(&entries[1], "rev").to_string();
    let out = p
        .laptop
        .json(&p.l, &["restore", "notes/plan.txt", "--rev", &last]);
    assert_eq!(out["path"], "/notes/plan.txt", "{out}");

    let back = p.desktop.json(&p.d, &["sync"]);
    assert_eq!(n(&back, "files_downloaded"), 1, "{back}");
    assert!(
        std::fs::read(p.d.join("notes/plan.txt")).unwrap() == v2,
        "the restored file is byte-identical to its last version"
    );
    p.laptop.json(&p.l, &["sync"]);
    assert!(std::fs::read(p.l.join("notes/plan.txt")).unwrap() == v2);
    assert_same(&digest_tree(&p.l), &digest_tree(&p.d));

    let entries = history(&p.desktop, &p.d, &["/notes/plan.txt"]);
    assert_eq!(entries.len(), 4, "{entries:#?}");
    assert_eq!(entries[0]["op"], "restore", "{}", entries[0]);
    assert_eq!(entries[0]["content_hash"], entries[2]["content_hash"]);
}

#[test]
fn rewind_folder_to_a_moment() {
    let p = Devices::new();
    let (dev, a) = (&p.laptop, &p.l);
    let mut rng = Rng::new(11);
    let name = |i: usize| match i % 3 {
        0 => format!("proj/f{i:02}.txt"),
        1 => format!("proj/src/f{i:02}.rs"),
        _ => format!("proj/docs/f{i:02}.md"),
    };
    for i in 0..50 {
        let path = a.join(name(i));
        let size = 100 + rng.below(4000) as usize;
        write_file(&path, &rng.bytes(size));
        if i % 7 == 0 {
            set_mode(&path, 0o755);
        }
    }
    write_file(&a.join("outside.txt"), b"outside, before\n");
    let first = dev.json(a, &["sync"]);
    assert_eq!(n(&first, "files_uploaded"), 51, "{first}");
    p.desktop.json(&p.d, &["sync"]);

    tick();
    let t = now_secs();
    let at_t = digest_tree(&a.join("proj"));
    let server_at_t = server_entries(dev, a);
    tick();

    // After T: 10 modified, 10 deleted, 10 added, a new subfolder; and a change outside proj/.
    for i in 0..10 {
        std::fs::write(a.join(name(i)), rng.bytes(5000 + i)).unwrap();
    }
    for i in 10..20 {
        std::fs::remove_file(a.join(name(i))).unwrap();
    }
    let added: Vec<String> = (0..10)
        .map(|i| {
            let rel = if i % 2 == 0 {
                format!("proj/new{i}.txt")
            } else {
                format!("proj/src/new{i}.rs")
            };
            write_file(&a.join(&rel), &rng.bytes(300 + i));
            format!("/{rel}")
        })
        .collect();
    write_file(&a.join("proj/extra/inner.txt"), b"inside the new folder\n");
    std::fs::create_dir_all(a.join("proj/extra/deeper")).unwrap();
    write_file(&a.join("outside.txt"), b"outside, after T (kept)\n");
    let changed = dev.json(a, &["sync"]);
    assert_eq!(n(&changed, "files_uploaded"), 22, "{changed}");
    assert_eq!(n(&changed, "files_deleted"), 10, "{changed}");
    p.desktop.json(&p.d, &["sync"]);

    let at = rfc3339(t);
    let before = dev.json(a, &["ls", "-R", "/"]);
    let dry = dev.json(a, &["restore", "proj", "--at", &at, "--dry-run"]);
    assert_eq!(
        dev.json(a, &["ls", "-R", "/"]),
        before,
        "a dry run changes nothing on the server"
    );
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["at"].as_i64(), Some(t), "{dry}");

    let plan = dry["plan"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan in {dry}"));
    let deletes: BTreeSet<&str> = plan
        .iter()
        .filter(|st| st["action"] == "delete")
        .map(|st| s(st, "path"))
        .collect();
    let restores: BTreeMap<String, u64> = plan
        .iter()
        .filter(|st| st["action"] == "restore")
        .map(|st| (s(st, "path").to_string(), n(st, "rev")))
        .collect();
    let others: Vec<&Value> = plan
        .iter()
        .filter(|st| st["action"] != "delete" && st["action"] != "restore")
        .collect();
    assert!(others.is_empty(), "only deletes and restores: {others:?}");
    for path in &added {
        assert!(deletes.contains(path.as_str()), "{path} is deleted: {dry}");
    }
    assert!(
        deletes.contains("/proj/extra")
            || (deletes.contains("/proj/extra/inner.txt")
                && deletes.contains("/proj/extra/deeper")),
        "the new subfolder goes: {dry}"
    );
    for path in &deletes {
        assert!(
            added.iter().any(|p| p == path)
                || *path == "/proj/extra"
                || path.starts_with("/proj/extra/"),
            "{path} existed at T and must not be deleted: {dry}"
        );
    }
    let expected_restores: BTreeMap<String, u64> = (0..20)
        .map(|i| {
            let path = format!("/{}", name(i));
            let rev = n(&server_at_t[&path], "rev");
            (path, rev)
        })
        .collect();
    assert_eq!(
        restores, expected_restores,
        "the 10 modified and 10 deleted files, each to its revision at T"
    );

    let real = dev.json(a, &["restore", "proj", "--at", &at]);
    assert_eq!(real["dry_run"], false, "{real}");
    assert_eq!(
        real["plan"], dry["plan"],
        "the real run follows the dry run"
    );

    // The server's proj/ is as it was at T (content and modes), outside.txt untouched.
    let now = server_entries(dev, a);
    let content = |m: &BTreeMap<String, Value>| -> BTreeMap<String, Value> {
        m.iter()
            .filter(|(p, _)| p.starts_with("/proj/"))
            .map(|(p, e)| {
                let v = json!([e["kind"], e["size"], e["content_hash"], e["executable"]]);
                (p.clone(), v)
            })
            .collect()
    };
    assert_eq!(content(&now), content(&server_at_t));
    assert_ne!(
        now["/outside.txt"]["content_hash"], server_at_t["/outside.txt"]["content_hash"],
        "rewinding proj/ leaves files outside it alone"
    );

    let synced = dev.json(a, &["sync"]);
    assert_eq!(n(&synced, "files_uploaded"), 0, "{synced}");
    assert_same(&digest_tree(&a.join("proj")), &at_t);
    assert_eq!(
        std::fs::read(a.join("outside.txt")).unwrap(),
        b"outside, after T (kept)\n"
    );
    p.desktop.json(&p.d, &["sync"]);
    assert_same(&digest_tree(&p.d.join("proj")), &at_t);
}

#[test]
fn gc_frees_exactly_unreferenced_blocks() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    dev.init(&a);
    let data = server.data.path();

    // Each file is below the minimum chunk size (128 KiB), so it is one block: its SHA-256.
    let mut rng = Rng::new(21);
    let name = |i: usize| format!("data/file{i}.bin");
    let originals: Vec<Vec<u8>> = (0..8).map(|i| rng.bytes(60_000 + i * 9_001)).collect();
    for (i, bytes) in originals.iter().enumerate() {
        write_file(&a.join(name(i)), bytes);
    }
    dev.json(&a, &["sync"]);
    let uploaded = block_files(data);
    let original_hashes: BTreeSet<String> = originals.iter().map(|b| sha_hex(b)).collect();
    assert_eq!(
        uploaded, original_hashes,
        "one block per (sub-128 KiB) file, named by its SHA-256"
    );
    // The blocks' last reference must be in an earlier second than the collection's start.
    tick();

    // Delete 0..3, overwrite 3..6 (new blocks), keep 6..8.
    for i in 0..3 {
        std::fs::remove_file(a.join(name(i))).unwrap();
    }
    let mut current: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 3..6 {
        let bytes = rng.bytes(120_000 + i * 1_234);
        std::fs::write(a.join(name(i)), &bytes).unwrap();
        current.insert(name(i), bytes);
    }
    for (i, bytes) in originals.iter().enumerate().skip(6) {
        current.insert(name(i), bytes.clone());
    }
    let r = dev.json(&a, &["sync"]);
    assert_eq!(n(&r, "files_deleted"), 3, "{r}");
    assert_eq!(n(&r, "files_uploaded"), 3, "{r}");
    let before = block_files(data);
    assert_eq!(before.len(), 11, "8 originals + 3 new versions");
    let doomed: BTreeSet<String> = originals[..6].iter().map(|b| sha_hex(b)).collect();
    let doomed_bytes: u64 = originals[..6].iter().map(|b| b.len() as u64).sum();
    let old_rev_of_3 = history(&dev, &a, &[name(3).as_str()])
        .last()
        .map(|e| n(e, "rev"))
        .unwrap();

    // Default retention (180 days) keeps every version.
    for extra in [&[][..], &["--grace", "0"][..]] {
        let mut args = vec!["gc", "--dry-run"];
        args.extend_from_slice(extra);
        let (code, report, err) = admin(&dev, data, &args);
        assert_eq!(code, 0, "{err}");
        assert_eq!(report["dry_run"], true, "{report}");
        assert_eq!(n(&report, "blocks_freed"), 0, "gc {args:?}: {report}");
        assert_eq!(n(&report, "bytes_freed"), 0, "gc {args:?}: {report}");
    }
    let gc0 = ["gc", "--retention", "0", "--grace", "0"];
    let mut dry = gc0.to_vec();
    dry.push("--dry-run");
    let (code, report, err) = admin(&dev, data, &dry);
    assert_eq!(code, 0, "{err}");
    assert_eq!(n(&report, "blocks_freed"), 6, "dry run: {report}");
    assert_eq!(n(&report, "bytes_freed"), doomed_bytes, "dry run: {report}");
    assert_eq!(block_files(data), before, "a dry run deletes nothing");

    let (code, report, err) = admin(&dev, data, &gc0);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["dry_run"], false, "{report}");
    assert_eq!(
        n(&report, "blocks_freed"),
        6,
        "the blocks of the 3 deleted and 3 overwritten versions: {report}"
    );
    assert_eq!(n(&report, "bytes_freed"), doomed_bytes, "{report}");
    let after = block_files(data);
    let expected: BTreeSet<String> = before.difference(&doomed).cloned().collect();
    assert_eq!(
        after, expected,
        "exactly the unreferenced blocks are gone, from the disk too (their pack rewritten)"
    );
    let reclaimed = n(&report["compaction"], "bytes_reclaimed");
    assert!(reclaimed >= doomed_bytes, "{report}");

    // Every live file still pulls byte for byte on a fresh device.
    let fresh = Client::new();
    fresh.login(&server, "alice");
    let b = work.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    fresh.init(&b);
    let pulled = fresh.json(&b, &["sync"]);
    assert_eq!(n(&pulled, "files_downloaded"), 5, "{pulled}");
    for (path, bytes) in &current {
        assert!(
            std::fs::read(b.join(path)).unwrap() == *bytes,
            "{path} pulls byte-identical after gc"
        );
    }
    assert_same(&digest_tree(&b), &digest_tree(&a));

    // A collected version cannot be restored (and nothing changes trying).
    let rev = old_rev_of_3.to_string();
    let out = dev.run(&a, &["restore", &name(3), "--rev", &rev]);
    assert!(
        !out.status.success(),
        "restoring a collected version must fail cleanly"
    );
    let r = dev.json(&a, &["sync"]);
    assert_eq!(n(&r, "files_downloaded"), 0, "{r}");

    // fsck (the server's 180-day retention) does not count what gc collected with a shorter
    // one as damage.
    let (code, report, err) = admin(&dev, data, &["fsck", "--read-data"]);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(report["damage"], json!([]), "{report}");

    let (code, report, err) = admin(&dev, data, &gc0);
    assert_eq!(code, 0, "{err}");
    assert_eq!(n(&report, "blocks_freed"), 0, "second gc: {report}");
    assert_eq!(n(&report, "bytes_freed"), 0, "second gc: {report}");
    assert_eq!(block_files(data), after);
}

#[test]
fn fsck_detects_damage_and_passes_clean() {
    let server = Server::start();
    let dev = Client::new();
    dev.login(&server, "alice");
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    dev.init(&a);
    let data = server.data.path();

    // Four one-block files (f2 pushed alone, so its pack holds only it), then a second version
    // of f0: five retained versions, five blocks.
    let mut rng = Rng::new(31);
    let files: Vec<Vec<u8>> = (0..4).map(|i| rng.bytes(50_000 + i * 1_000)).collect();
    for (i, bytes) in files.iter().enumerate() {
        if i != 2 {
            write_file(&a.join(format!("f{i}.bin")), bytes);
        }
    }
    dev.json(&a, &["sync"]);
    write_file(&a.join("f2.bin"), &files[2]);
    dev.json(&a, &["sync"]);
    let f0_old_rev = n(&server_entries(&dev, &a)["/f0.bin"], "rev");
    let f0_new = rng.bytes(60_000);
    std::fs::write(a.join("f0.bin"), &f0_new).unwrap();
    dev.json(&a, &["sync"]);
    let entries = server_entries(&dev, &a);
    let f2_rev = n(&entries["/f2.bin"], "rev");
    assert_eq!(block_files(data).len(), 5);

    let (code, report, err) = admin(&dev, data, &["fsck", "--read-data"]);
    assert_eq!(code, 0, "a clean store passes: {report} {err}");
    assert_eq!(report["read_data"], true, "{report}");
    assert_eq!(report["damage"], json!([]), "{report}");
    assert_eq!(n(&report, "versions_checked"), 5, "{report}");
    assert_eq!(n(&report, "blocks_checked"), 5, "{report}");
    assert!(!err.contains("damaged"), "{err}");

    // Flip one byte of the block of f0's first version (a retained old version).
    let h0 = sha_hex(&files[0]);
    let p0 = stored_blocks(data)[&h0].clone();
    p0.corrupt(12_345);
    let corrupted = p0.bytes();
    assert_ne!(corrupted, files[0]);

    let (code, report, err) = admin(&dev, data, &["fsck", "--read-data"]);
    assert_eq!(code, 1, "corruption is damage: {report} {err}");
    assert_eq!(
        report["damage"],
        json!([{"path": "/f0.bin", "rev": f0_old_rev, "block": h0, "health": "corrupt"}]),
        "{report}"
    );
    let line = format!("damaged: /f0.bin (revision {f0_old_rev}): block {h0} is Corrupt");
    assert!(err.contains(&line), "stderr names it ({line}): {err}");

    let (code, report, err) = admin(&dev, data, &["fsck"]);
    assert_eq!(code, 0, "existence only: {report} {err}");
    assert_eq!(report["read_data"], false, "{report}");
    assert_eq!(report["damage"], json!([]), "{report}");

    // Delete the block of f2 (the file that holds it holds nothing else).
    let h2 = sha_hex(&files[2]);
    let p2 = stored_blocks(data)[&h2].file.clone();
    std::fs::remove_file(&p2).unwrap();
    let missing = json!({"path": "/f2.bin", "rev": f2_rev, "block": h2, "health": "missing"});
    let (code, report, err) = admin(&dev, data, &["fsck"]);
    assert_eq!(code, 1, "a missing block is damage: {report} {err}");
    assert_eq!(report["damage"], json!([missing]), "{report}");
    let line = format!("damaged: /f2.bin (revision {f2_rev}): block {h2} is Missing");
    assert!(err.contains(&line), "stderr names it ({line}): {err}");

    let (code, report, err) = admin(&dev, data, &["fsck", "--read-data"]);
    assert_eq!(code, 1, "{report} {err}");
    let damage = report["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 2, "{report}");
    assert!(damage.contains(&missing), "{report}");
    assert!(
        damage
            .iter()
            .any(|d| d["block"] == h0.as_str() && d["health"] == "corrupt"),
        "{report}"
    );

    // fsck changed nothing: the corrupt block is still in place, as corrupted.
    assert!(
        p0.bytes() == corrupted,
        "the corrupted block is left as it was"
    );
    assert!(!p2.exists());
    assert_eq!(block_files(data).len(), 4);
    assert!(
        !data.join("blocks/quarantine").join(&h0).exists(),
        "fsck does not quarantine"
    );
}

#[test]
fn rewind_across_a_file_folder_swap() {
    let p = Devices::new();
    let (dev, a) = (&p.laptop, &p.l);
    write_file(&a.join("w/notes"), b"notes is a file at T\n");
    write_file(&a.join("w/dir/x.txt"), b"x, in the folder dir at T\n");
    write_file(&a.join("w/keep.txt"), b"unchanged\n");
    dev.json(a, &["sync"]);
    tick();
    let t = now_secs();
    let at_t = digest_tree(&a.join("w"));
    let server_at_t = server_entries(dev, a);
    tick();

    // After T the file becomes a folder and the folder a file.
    std::fs::remove_file(a.join("w/notes")).unwrap();
    write_file(&a.join("w/notes/inner.txt"), b"notes is a folder now\n");
    std::fs::remove_dir_all(a.join("w/dir")).unwrap();
    write_file(&a.join("w/dir"), b"dir is a file now\n");
    dev.json(a, &["sync"]);
    assert_eq!(server_entries(dev, a)["/w/dir"]["kind"], "file");

    let out = dev.run(a, &["--json", "restore", "w", "--at", &rfc3339(t)]);
    assert!(
        out.status.success(),
        "rewinding across a file/folder swap must succeed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let kinds = |m: &BTreeMap<String, Value>| -> BTreeMap<String, Value> {
        m.iter()
            .filter(|(p, _)| p.starts_with("/w/"))
            .map(|(p, e)| (p.clone(), json!([e["kind"], e["content_hash"]])))
            .collect()
    };
    assert_eq!(kinds(&server_entries(dev, a)), kinds(&server_at_t));
    dev.json(a, &["sync"]);
    assert_same(&digest_tree(&a.join("w")), &at_t);
}
