//! Two-way sync between devices: conflicts keep both versions, edits beat deletes, renames move
//! instead of re-sending, offline devices catch up from the journal, the delete guard holds, a
//! replaced server is refilled, and a run killed at any point converges on the next one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::harness::*;

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key:?} in {v}"))
}

/// A server, and two devices logged in as alice with folders `a` and `b` both mirroring `/`.
struct Pair {
    server: Server,
    dev_a: Client,
    dev_b: Client,
    a: PathBuf,
    b: PathBuf,
    work: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let server = Server::start();
        let (dev_a, dev_b) = two_devices(&server);
        let work = tempfile::tempdir().unwrap();
        let a = work.path().join("a");
        let b = work.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        dev_a.init(&a);
        dev_b.init(&b);
        Pair {
            server,
            dev_a,
            dev_b,
            a,
            b,
            work,
        }
    }

    fn sync_a(&self) -> Value {
        self.dev_a.json(&self.a, &["sync"])
    }

    fn sync_b(&self) -> Value {
        self.dev_b.json(&self.b, &["sync"])
    }
}

/// Every path in `root` (relative, `.dbx/` excluded) whose file name satisfies `pred`.
fn files_named(root: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    digest_tree(root)
        .into_iter()
        .filter(|(p, v)| v != "dir" && pred(p.rsplit('/').next().unwrap_or(p.as_str())))
        .map(|(p, _)| p)
        .collect()
}

fn conflicted_copies(root: &Path) -> Vec<String> {
    files_named(root, |name| name.contains("conflicted copy"))
}

fn temp_files(root: &Path) -> Vec<String> {
    files_named(root, |name| name.starts_with(".dbx-tmp-"))
}

/// `stem (HOST's conflicted copy YYYY-MM-DD).ext` for today (UTC).
fn conflict_copy_name(stem: &str, ext: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!("{stem} ({host}'s conflicted copy {y:04}-{m:02}-{d:02}).{ext}")
}

/// The server's files below the folder's remote root: path -> size (from `dbx --json ls -R`).
fn server_files(listing: &Value) -> BTreeMap<String, u64> {
    listing["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {listing}"))
        .iter()
        .filter(|e| e["kind"] == "file")
        .map(|e| (e["path"].as_str().unwrap().to_string(), n(e, "size")))
        .collect()
}

/// The local files of `root` as server paths with sizes, to compare with [`server_files`].
fn local_files(root: &Path) -> BTreeMap<String, u64> {
    digest_tree(root)
        .into_iter()
        .filter(|(_, v)| v != "dir")
        .map(|(p, _)| {
            let size = std::fs::metadata(root.join(&p)).unwrap().len();
            (format!("/{p}"), size)
        })
        .collect()
}

/// The plan of a report without `record` actions, as (action, path).
fn plan_of(report: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = report["plan"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan in {report}"))
        .iter()
        .filter(|a| a["action"] != "record")
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_string(),
                a["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn conflict_keeps_both_versions() {
    let p = Pair::new();
    write_file(&p.a.join("docs/notes.txt"), b"the original notes\n");
    p.sync_a();
    p.sync_b();
    assert_eq!(
        std::fs::read(p.b.join("docs/notes.txt")).unwrap(),
        b"the original notes\n"
    );

    // Different sizes, so each side's stat changes whatever the mtime granularity.
    let a_bytes = b"A rewrote the notes completely, at some length\n".to_vec();
    let b_bytes = b"B's short edit\n".to_vec();
    std::fs::write(p.a.join("docs/notes.txt"), &a_bytes).unwrap();
    std::fs::write(p.b.join("docs/notes.txt"), &b_bytes).unwrap();

    let first = p.sync_a();
    assert_eq!(n(&first, "files_uploaded"), 1, "{first}");
    assert!(first["conflict_copies"].as_array().unwrap().is_empty());

    let out = p.dev_b.run(&p.b, &["--json", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let second = parse_json(&out);
    assert_eq!(second["conflicts"], serde_json::json!([]), "{second}");
    let copy = format!("docs/{}", conflict_copy_name("notes", "txt"));
    assert!(
        second["plan"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "conflict_copy"
                && a["path"] == "docs/notes.txt"
                && a["copy"] == copy.as_str()),
        "{second}"
    );
    assert_eq!(
        second["conflict_copies"],
        serde_json::json!([{"path": "docs/notes.txt", "copy": copy}]),
        "{second}"
    );
    assert_eq!(
        conflicted_copies(&p.b),
        vec![copy.clone()],
        "exactly one conflicted copy on B"
    );
    assert_eq!(std::fs::read(p.b.join(&copy)).unwrap(), b_bytes);
    assert_eq!(
        std::fs::read(p.b.join("docs/notes.txt")).unwrap(),
        a_bytes,
        "the server's version keeps the name"
    );

    let third = p.sync_a();
    assert_eq!(n(&third, "files_downloaded"), 1, "{third}");
    assert_eq!(std::fs::read(p.a.join(&copy)).unwrap(), b_bytes);
    assert_eq!(std::fs::read(p.a.join("docs/notes.txt")).unwrap(), a_bytes);
    assert_eq!(conflicted_copies(&p.a), vec![copy]);
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));

    // Settled: nothing more to do on either side.
    for (dev, dir) in [(&p.dev_a, &p.a), (&p.dev_b, &p.b)] {
        let status = dev.json(dir, &["status"]);
        assert!(plan_of(&status).is_empty(), "{status}");
    }
}

#[test]
fn identical_edits_make_no_conflict() {
    let p = Pair::new();
    write_file(&p.a.join("shared.txt"), b"v1\n");
    p.sync_a();
    p.sync_b();

    // The same new file on both devices, and the same edit to a synced file.
    for dir in [&p.a, &p.b] {
        write_file(
            &dir.join("new/same.txt"),
            b"both devices wrote exactly this\n",
        );
        std::fs::write(dir.join("shared.txt"), b"version two, same on both\n").unwrap();
    }
    let first = p.sync_a();
    assert_eq!(n(&first, "files_uploaded"), 2, "{first}");
    let second = p.sync_b();
    assert_eq!(second["conflict_copies"], serde_json::json!([]), "{second}");
    assert_eq!(second["conflicts"], serde_json::json!([]), "{second}");
    assert_eq!(n(&second, "files_uploaded"), 0, "{second}");
    assert_eq!(n(&second, "files_downloaded"), 0, "{second}");
    assert_eq!(n(&second, "block_bytes_received"), 0, "{second}");
    let third = p.sync_a();
    assert_eq!(third["conflict_copies"], serde_json::json!([]), "{third}");
    assert!(conflicted_copies(&p.a).is_empty());
    assert!(conflicted_copies(&p.b).is_empty());
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.a));
}

#[test]
fn edit_beats_delete() {
    let p = Pair::new();
    write_file(&p.a.join("first.txt"), b"first, original\n");
    write_file(&p.a.join("second.txt"), b"second, original\n");
    for d in ["one", "two"] {
        write_file(&p.a.join(format!("{d}/x.txt")), b"x, original\n");
        write_file(&p.a.join(format!("{d}/y.txt")), b"y, original\n");
    }
    p.sync_a();
    p.sync_b();

    // The edit is synced first, then the delete.
    std::fs::remove_file(p.a.join("first.txt")).unwrap();
    std::fs::write(p.b.join("first.txt"), b"first, edited on B (longer)\n").unwrap();
    p.sync_b();
    let a_run = p.sync_a();
    assert_eq!(n(&a_run, "files_deleted"), 0, "{a_run}");
    assert_eq!(
        std::fs::read(p.a.join("first.txt")).unwrap(),
        b"first, edited on B (longer)\n",
        "the edited file comes back on A"
    );
    p.sync_b();
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));

    // The delete is synced first, then the edit.
    std::fs::remove_file(p.a.join("second.txt")).unwrap();
    let a_run = p.sync_a();
    assert_eq!(n(&a_run, "files_deleted"), 1, "{a_run}");
    std::fs::write(p.b.join("second.txt"), b"second, edited on B (longer)\n").unwrap();
    let b_run = p.sync_b();
    assert_eq!(n(&b_run, "files_deleted"), 0, "{b_run}");
    assert_eq!(n(&b_run, "files_uploaded"), 1, "{b_run}");
    assert_eq!(
        std::fs::read(p.b.join("second.txt")).unwrap(),
        b"second, edited on B (longer)\n"
    );
    p.sync_a();
    assert_eq!(
        std::fs::read(p.a.join("second.txt")).unwrap(),
        b"second, edited on B (longer)\n",
        "the edited file survives everywhere"
    );
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));

    // A whole folder deleted on A while B edits a file in it, in either order: the edited file
    // survives (and so does its folder), the unedited one goes.
    std::fs::remove_dir_all(p.a.join("one")).unwrap();
    std::fs::write(p.b.join("one/x.txt"), b"x, edited on B in one/\n").unwrap();
    p.sync_b();
    p.sync_a();
    std::fs::remove_dir_all(p.a.join("two")).unwrap();
    p.sync_a();
    std::fs::write(p.b.join("two/x.txt"), b"x, edited on B in two/\n").unwrap();
    p.sync_b();
    p.sync_a();
    for d in ["one", "two"] {
        for (dir, side) in [(&p.a, "A"), (&p.b, "B")] {
            assert_eq!(
                std::fs::read(dir.join(format!("{d}/x.txt"))).ok(),
                Some(format!("x, edited on B in {d}/\n").into_bytes()),
                "{d}/x.txt on {side}"
            );
            assert!(
                !dir.join(format!("{d}/y.txt")).exists(),
                "{d}/y.txt on {side}"
            );
        }
    }
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.a));
}

#[test]
fn folder_rename_sends_no_block_bytes() {
    let p = Pair::new();
    let mut rng = Rng::new(4);
    write_file(&p.a.join("photos/big.raw"), &rng.bytes(20 << 20));
    for i in 0..4 {
        let size = 1000 + i * 37;
        write_file(&p.a.join(format!("photos/small{i}.jpg")), &rng.bytes(size));
    }
    write_file(&p.a.join("photos/2024/trip.jpg"), &rng.bytes(3000));
    write_file(&p.a.join("elsewhere.txt"), b"not in photos\n");
    let first = p.sync_a();
    assert!(n(&first, "block_bytes_sent") >= 20 << 20, "{first}");
    p.sync_b();
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));

    std::fs::rename(p.a.join("photos"), p.a.join("pictures")).unwrap();
    let moved = p.sync_a();
    assert_eq!(n(&moved, "block_bytes_sent"), 0, "{moved}");
    assert_eq!(n(&moved, "files_uploaded"), 0, "{moved}");
    assert_eq!(n(&moved, "files_deleted"), 0, "{moved}");
    assert_eq!(
        n(&moved, "files_moved"),
        1,
        "a folder moved with its contents is one server move: {moved}"
    );
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.a));

    let followed = p.sync_b();
    assert_eq!(n(&followed, "block_bytes_received"), 0, "{followed}");
    assert_eq!(n(&followed, "files_downloaded"), 0, "{followed}");
    assert!(n(&followed, "files_moved") >= 1, "{followed}");
    assert!(!p.b.join("photos").exists(), "the old folder is gone on B");
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));

    // Both sides settled: a further sync does nothing.
    for (dev, dir) in [(&p.dev_a, &p.a), (&p.dev_b, &p.b)] {
        let again = dev.json(dir, &["sync"]);
        assert!(plan_of(&again).is_empty(), "{again}");
        assert_eq!(n(&again, "block_bytes_sent"), 0, "{again}");
    }
}

#[test]
fn offline_device_catches_up() {
    let p = Pair::new();
    let mut rng = Rng::new(5);
    // What B has before it goes offline: some of it is later edited, some deleted.
    for i in 0..30 {
        write_file(
            &p.a.join(format!("old/o{i:02}.txt")),
            &rng.bytes(100 + i * 3),
        );
    }
    p.sync_a();
    p.sync_b();
    let head = |dev: &Client, dir: &Path| n(&dev.json(dir, &["ls", "-R"]), "cursor");
    let b_cursor = head(&p.dev_b, &p.b);

    // Many journal rows while B is away, one sync of A per batch.
    let name = |i: usize| format!("set/f{}/n{i:03}.dat", i % 5);
    for i in 0..260 {
        write_file(&p.a.join(name(i)), &rng.bytes(50 + i % 40));
    }
    let r = p.sync_a();
    assert_eq!(n(&r, "files_uploaded"), 260, "{r}");
    for i in (0..240).step_by(2) {
        std::fs::write(p.a.join(name(i)), rng.bytes(200 + i % 40)).unwrap();
    }
    for i in 0..10 {
        std::fs::write(p.a.join(format!("old/o{i:02}.txt")), rng.bytes(500)).unwrap();
    }
    let r = p.sync_a();
    assert_eq!(n(&r, "files_uploaded"), 130, "{r}");
    for i in (1..260).step_by(2) {
        std::fs::remove_file(p.a.join(name(i))).unwrap();
    }
    for i in 20..30 {
        std::fs::remove_file(p.a.join(format!("old/o{i:02}.txt"))).unwrap();
    }
    let r = p.sync_a();
    assert_eq!(n(&r, "files_deleted"), 140, "{r}");
    // A file deleted and then created again under the same name, and a folder moved.
    write_file(&p.a.join(name(1)), b"born again\n");
    std::fs::rename(p.a.join("set/f4"), p.a.join("set/f4-moved")).unwrap();
    p.sync_a();
    // The whole set moved around and back: one journal row per file and folder each time.
    for (from, to) in [
        ("set", "set2"),
        ("set2", "set3"),
        ("set3", "set4"),
        ("set4", "set"),
    ] {
        std::fs::rename(p.a.join(from), p.a.join(to)).unwrap();
        let r = p.sync_a();
        assert_eq!(n(&r, "block_bytes_sent"), 0, "{r}");
    }
    // More rows than one journal page (1000) since B last looked.
    let rows = head(&p.dev_a, &p.a) - b_cursor;
    assert!(rows > 1000, "only {rows} journal rows");

    let out = p.dev_b.run(&p.b, &["--json", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let caught_up = parse_json(&out);
    assert_eq!(n(&caught_up, "files_uploaded"), 0, "{caught_up}");
    assert!(
        caught_up["conflict_copies"].as_array().unwrap().is_empty(),
        "{caught_up}"
    );
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
    let listing = p.dev_b.json(&p.b, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.b));
}

#[test]
fn delete_guard_stops_mass_delete() {
    let p = Pair::new();
    let mut rng = Rng::new(6);
    for i in 0..150 {
        write_file(
            &p.a.join(format!("d{}/f{i:03}.txt", i % 3)),
            &rng.bytes(10 + i),
        );
    }
    p.sync_a();
    p.sync_b();
    assert_eq!(local_files(&p.b).len(), 150);
    for i in 0..150 {
        std::fs::remove_file(p.a.join(format!("d{}/f{i:03}.txt", i % 3))).unwrap();
    }

    // The dry run lists the deletes, warns, and succeeds.
    let out = p.dev_a.run(&p.a, &["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = parse_json(&out);
    let deletes = plan_of(&status)
        .iter()
        .filter(|(a, _)| a == "delete_remote")
        .count();
    assert_eq!(deletes, 150, "{status}");
    assert!(
        status["warnings"].to_string().contains("--max-delete"),
        "{status}"
    );
    let out = p.dev_a.run(&p.a, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("delete_remote"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The real run stops before deleting anything.
    let out = p.dev_a.run(&p.a, &["sync"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-delete"), "{}", stderr(&out));
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing).len(), 150, "the server keeps all");
    let b_run = p.sync_b();
    assert_eq!(n(&b_run, "files_deleted"), 0, "{b_run}");
    assert_eq!(local_files(&p.b).len(), 150);

    // Allowed explicitly: the deletes go through, and B follows.
    let done = p.dev_a.json(&p.a, &["sync", "--max-delete", "200"]);
    assert_eq!(n(&done, "files_deleted"), 150, "{done}");
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert!(server_files(&listing).is_empty(), "{listing}");

    // On B the same guard applies to deleting its own 150 local files (the documented
    // `--max-delete` rule counts local deletes too); with the flag they go. B has new files
    // too, enough that some would be committed while hashing, were anything allowed to
    // change before the guard stops the run.
    write_sent_while_hashing(&p.b, "new/f", &mut rng);
    let out = p.dev_b.run(&p.b, &["sync"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        local_files(&p.b).len(),
        163,
        "a guarded run deletes nothing"
    );
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert!(server_files(&listing).is_empty(), "nor commits: {listing}");
    let followed = p.dev_b.json(&p.b, &["sync", "--max-delete", "200"]);
    assert_eq!(n(&followed, "files_deleted"), 150, "{followed}");
    assert_eq!(n(&followed, "files_uploaded"), 13, "{followed}");
    assert_eq!(local_files(&p.b).len(), 13);
    p.sync_a();
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
}

#[test]
fn server_replaced_reuploads_instead_of_deleting() {
    let p = Pair::new();
    let mut rng = Rng::new(7);
    for i in 0..30 {
        write_file(
            &p.a.join(format!("k{}/f{i:02}.bin", i % 4)),
            &rng.bytes(i * 500),
        );
    }
    p.sync_a();
    let before = digest_tree(&p.a);
    let Pair {
        server,
        dev_a,
        a,
        work,
        ..
    } = p;
    drop(server.stop());

    let fresh = Server::start();
    dev_a.login(&fresh, "alice");
    let run = |args: &[&str]| {
        dev_a
            .cmd(&a)
            .env("DBX_SERVER", &fresh.url)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let out = run(&["--json", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = parse_json(&out);
    assert_eq!(n(&report, "files_deleted"), 0, "{report}");
    assert_eq!(n(&report, "files_uploaded"), 30, "{report}");
    assert!(
        report["warnings"]
            .to_string()
            .contains("nothing is deleted"),
        "the replaced server is reported: {report}"
    );
    assert_same(&digest_tree(&a), &before);
    let out = run(&["--json", "ls", "-R"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server_files(&parse_json(&out)), local_files(&a));

    // And the new server's copy is byte for byte the folder.
    let dev_c = Client::new();
    dev_c.login(&fresh, "alice");
    let c = work.path().join("c");
    dev_c.init(&c);
    dev_c.ok(&c, &["pull"]);
    assert_same(&digest_tree(&c), &before);
    // A further sync against the new server is a no-op.
    let out = run(&["--json", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        plan_of(&parse_json(&out)).is_empty(),
        "{}",
        parse_json(&out)
    );
}

/// Whether the server's block store holds at least one block.
fn has_block(data: &Path) -> bool {
    let Ok(dirs) = std::fs::read_dir(data.join("blocks")) else {
        return false;
    };
    dirs.flatten()
        .filter(|d| d.file_name() != "tmp" && d.file_name() != "quarantine")
        .any(|d| std::fs::read_dir(d.path()).is_ok_and(|mut files| files.next().is_some()))
}

/// Whether `root` holds any file outside `.dbx/` (a download has begun). Tolerates files
/// vanishing under it (a running download renames its temp files).
fn has_any_file(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name() != ".dbx"
            && e.file_type()
                .is_ok_and(|t| t.is_file() || (t.is_dir() && has_any_file(&e.path())))
    })
}

/// Spawns `dbx ARGS` in `dir`, waits (bounded) until `started` says the work has begun or the
/// process exits, then SIGKILLs it. Returns whether it was killed before finishing.
fn kill_when(dev: &Client, dir: &Path, args: &[&str], started: impl Fn() -> bool) -> bool {
    let mut child = dev
        .cmd(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if started() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    status.code().is_none()
}

#[test]
fn crash_mid_sync_converges() {
    let p = Pair::new();
    let mut rng = Rng::new(8);
    for i in 0..400 {
        write_file(
            &p.a.join(format!("s{}/f{i:03}.txt", i % 8)),
            &rng.bytes(200 + i),
        );
    }
    write_file(&p.a.join("big/eight.bin"), &rng.bytes(8 << 20));
    let data = p.server.data.path().to_path_buf();

    let killed = kill_when(&p.dev_a, &p.a, &["sync"], || has_block(&data));
    eprintln!("upload killed mid-run: {killed}");
    let out = p.dev_a.run(&p.a, &["--json", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.a));
    let b_run = p.sync_b();
    assert_eq!(n(&b_run, "files_downloaded"), 401, "{b_run}");
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
    assert!(temp_files(&p.a).is_empty(), "{:?}", temp_files(&p.a));
    assert!(temp_files(&p.b).is_empty(), "{:?}", temp_files(&p.b));

    // A pull killed mid-download, on a third device.
    let dev_c = Client::new();
    dev_c.login(&p.server, "alice");
    let c = p.work.path().join("c");
    dev_c.init(&c);
    let killed = kill_when(&dev_c, &c, &["pull"], || has_any_file(&c));
    eprintln!("download killed mid-run: {killed}");
    let out = dev_c.run(&c, &["--json", "pull"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(temp_files(&c).is_empty(), "{:?}", temp_files(&c));
    assert_same(&digest_tree(&c), &digest_tree(&p.a));
    // The interrupted device is in step: nothing left to do.
    let status = dev_c.json(&c, &["status"]);
    assert!(plan_of(&status).is_empty(), "{status}");
}

/// Runs `dbx ARGS` in `dir` with debug logs and SIGKILLs it once it logs index rows written
/// during the run (or when it ends first). Returns the most rows it said it had written, and
/// whether it ended by itself.
fn kill_after_rows_written(dev: &Client, dir: &Path, args: &[&str], log: &Path) -> (usize, bool) {
    let mut child = dev
        .cmd(dir)
        .args(args)
        .env("RUST_LOG", "dbx=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let marker = "index rows written during the run";
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(log).unwrap();
    let written = text
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.rsplit("rows=").next()?.trim().parse().ok())
        .max()
        .unwrap_or_else(|| panic!("no index rows written during dbx {args:?}:\n{text}"));
    eprintln!("dbx {args:?} killed after {written} rows written (ended first: {finished})");
    (written, finished)
}

/// A push and a pull write the index rows of what they have done while they run (a pull once a
/// filesystem sync has made its files' renames durable): killed halfway, they keep them, and
/// the next run neither sends, fetches nor reads those files again.
#[test]
fn killed_runs_keep_what_they_recorded() {
    let p = Pair::new();
    let mut rng = Rng::new(21);
    let files = 6000;
    for i in 0..files {
        write_file(&p.a.join(format!("f{i:04}.bin")), &rng.bytes(16 << 10));
    }
    // Old mtimes: rows recorded for recent files would be read again by every run anyway.
    age_files(&p.a);

    // Kills `dbx DIRECTION` once it has written rows, then runs it again; returns its report.
    // What the next run would do after the kill: nothing for the recorded files (a file done
    // but not recorded yet is read and recorded; the rest transferred).
    let kill_and_resume = |dev: &Client, dir: &Path, direction: &str, done: &str| {
        let log = p.work.path().join(format!("{direction}.log"));
        let (written, _) = kill_after_rows_written(dev, dir, &[direction], &log);
        assert!(written >= 1000, "{written}");
        let status = dev.json(dir, &["status"]);
        let planned = status["plan"].as_array().unwrap().len();
        assert!(
            planned <= files - written,
            "{direction}: {planned} actions planned after {written} of {files} files were recorded"
        );
        let (report, log) = dev.json_logged(dir, &[direction]);
        assert!(n(&report, done) as usize <= files - written, "{report}");
        log
    };
    kill_and_resume(&p.dev_a, &p.a, "push", "files_uploaded");
    let log = kill_and_resume(&p.dev_b, &p.b, "pull", "files_downloaded");
    assert!(!log.contains("ERROR"), "{log}");
    assert_same(&digest_tree(&p.b), &digest_tree(&p.a));
    assert!(temp_files(&p.b).is_empty(), "{:?}", temp_files(&p.b));
    let listing = p.dev_a.json(&p.a, &["ls", "-R"]);
    assert_eq!(server_files(&listing), local_files(&p.a));
    for (dev, dir) in [(&p.dev_a, &p.a), (&p.dev_b, &p.b)] {
        let status = dev.json(dir, &["status"]);
        assert!(plan_of(&status).is_empty(), "{status}");
    }
}

#[test]
fn status_lists_pending_changes() {
    let p = Pair::new();
    write_file(&p.a.join("keep.txt"), b"unchanged\n");
    write_file(&p.a.join("edit.txt"), b"before\n");
    write_file(&p.a.join("gone.txt"), b"to be deleted\n");
    p.sync_a();
    let listing_before = p.dev_a.json(&p.a, &["ls", "-R"]);

    write_file(&p.a.join("added.txt"), b"brand new\n");
    std::fs::write(p.a.join("edit.txt"), b"after, and longer\n").unwrap();
    std::fs::remove_file(p.a.join("gone.txt")).unwrap();
    let tree = digest_tree(&p.a);

    let status = p.dev_a.json(&p.a, &["status"]);
    assert_eq!(status["dry_run"], true, "{status}");
    let expected: Vec<(String, String)> = [
        ("delete_remote", "gone.txt"),
        ("upload", "added.txt"),
        ("upload", "edit.txt"),
    ]
    .iter()
    .map(|(action, path)| (action.to_string(), path.to_string()))
    .collect();
    assert_eq!(plan_of(&status), expected, "{status}");

    let text = p.dev_a.ok(&p.a, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    for (action, path) in &expected {
        assert!(
            text.lines()
                .any(|l| l.contains(action.as_str()) && l.ends_with(path.as_str())),
            "{text}"
        );
    }

    // Nothing changed: the same plan again, the same server listing, the same folder.
    let again = p.dev_a.json(&p.a, &["status"]);
    assert_eq!(plan_of(&again), expected, "{again}");
    assert_eq!(p.dev_a.json(&p.a, &["ls", "-R"]), listing_before);
    assert_same(&digest_tree(&p.a), &tree);
    // B sees the server as it was: none of the pending changes.
    let b_status = p.dev_b.json(&p.b, &["status"]);
    let downloads: Vec<(String, String)> = ["edit.txt", "gone.txt", "keep.txt"]
        .iter()
        .map(|path| ("download".to_string(), path.to_string()))
        .collect();
    assert_eq!(plan_of(&b_status), downloads, "{b_status}");

    let done = p.sync_a();
    assert_eq!(n(&done, "files_uploaded"), 2, "{done}");
    assert_eq!(n(&done, "files_deleted"), 1, "{done}");
    let text = p.dev_a.ok(&p.a, &["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("Up to date."),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

/// Runs `dbx --json sync` on device A with debug logs; returns the report and whether the
/// run stopped early (nothing changed since a run that left nothing to do).
fn sync_a_logged(p: &Pair) -> (Value, bool) {
    let (report, log) = p.dev_a.json_logged(&p.a, &["sync"]);
    let settled = log.contains("settled: nothing changed since the last run");
    (report, settled)
}

#[test]
fn an_unchanged_folder_stops_early_and_any_change_is_still_seen() {
    let p = Pair::new();
    write_file(&p.a.join("docs/deep/one.txt"), b"one\n");
    write_file(&p.a.join("docs/two.txt"), b"two\n");
    write_file(&p.a.join("top.txt"), b"top\n");
    age_files(&p.a);
    let (first, settled) = sync_a_logged(&p);
    assert!(!settled);
    assert_eq!(n(&first, "files_uploaded"), 3, "{first}");

    // Nothing changed: the run stops early, and its report says nothing was done.
    let (again, settled) = sync_a_logged(&p);
    assert!(settled, "{again}");
    assert_eq!(plan_of(&again), Vec::<(String, String)>::new(), "{again}");
    assert_eq!(
        n(&again, "files_uploaded") + n(&again, "files_downloaded"),
        0
    );

    // A local edit, a new empty folder and an exec bit: each seen, then settled again.
    std::fs::write(p.a.join("docs/two.txt"), b"two, edited\n").unwrap();
    std::fs::create_dir(p.a.join("empty")).unwrap();
    set_mode(&p.a.join("top.txt"), 0o755);
    age_files(&p.a);
    let (edit, settled) = sync_a_logged(&p);
    assert!(!settled);
    assert_eq!(n(&edit, "files_uploaded"), 2, "{edit}");
    assert_eq!(n(&edit, "folders_created"), 1, "{edit}");
    // The folder's journal row is read back once (mkdir does not report its rows), then the
    // folder is settled again.
    let (_, _) = sync_a_logged(&p);
    assert!(sync_a_logged(&p).1);

    // A change on the server (from B) is seen through the journal.
    p.sync_b();
    write_file(&p.b.join("docs/from_b.txt"), b"from b\n");
    std::fs::remove_file(p.b.join("docs/deep/one.txt")).unwrap();
    age_files(&p.b);
    p.sync_b();
    let (pulled, settled) = sync_a_logged(&p);
    assert!(!settled);
    assert_eq!(n(&pulled, "files_downloaded"), 1, "{pulled}");
    assert_eq!(n(&pulled, "files_deleted"), 1, "{pulled}");
    // The downloaded file has B's mtime (a minute back): recorded as is, settled at once.
    assert!(sync_a_logged(&p).1);
    assert_same(&digest_tree(&p.a), &digest_tree(&p.b));

    // A local delete.
    std::fs::remove_dir_all(p.a.join("docs")).unwrap();
    let (deleted, settled) = sync_a_logged(&p);
    assert!(!settled);
    assert!(n(&deleted, "files_deleted") >= 2, "{deleted}");
    p.sync_b();
    assert!(!p.b.join("docs").exists());
}
