//! Test harness: a running server, isolated clients, deterministic random trees, tree digests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_dbx");
pub const PASSWORD: &str = "correct horse battery staple";

/// A `dbx serve` on 127.0.0.1:0 with its own data directory; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: TempDir,
}

impl Server {
    /// Starts a server with users `alice` and `bob` (password [`PASSWORD`]).
    pub fn start() -> Server {
        let data = tempfile::tempdir().unwrap();
        for user in ["alice", "bob"] {
            let out = run_with_stdin(
                Command::new(BIN)
                    .args(["admin", "user", "add", user, "--password-stdin", "--data"])
                    .arg(data.path()),
                &format!("{PASSWORD}\n"),
            );
            assert!(out.status.success(), "admin user add: {}", stderr(&out));
        }
        Self::start_on(data)
    }

    /// Starts a server on an existing data directory.
    pub fn start_on(data: TempDir) -> Server {
        Self::start_on_addr(data, "127.0.0.1:0")
    }

    /// Starts a server on an existing data directory, listening on `listen`.
    pub fn start_on_addr(data: TempDir, listen: &str) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--data"])
            .arg(data.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dbx serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("dbx serve exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url, data }
    }

    /// The server process's environment (Linux: `/proc/PID/environ`), as `NAME=value` items.
    pub fn environment(&self) -> Vec<String> {
        let raw = std::fs::read(format!("/proc/{}/environ", self.child.id())).unwrap();
        raw.split(|&b| b == 0)
            .map(|item| String::from_utf8_lossy(item).into_owned())
            .collect()
    }

    /// Stops the server, keeping its data directory.
    pub fn stop(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.data, data)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client machine: its own HOME and config directory (tokens in a 0600 file).
pub struct Client {
    pub home: TempDir,
    /// Whether dbx is told the CPU has SHA extensions (`DBX_SHA_EXTENSIONS`), which picks how
    /// a big download is verified; detected when `None`.
    pub sha_extensions: Option<bool>,
}

impl Client {
    pub fn new() -> Client {
        Client {
            home: tempfile::tempdir().unwrap(),
            sha_extensions: None,
        }
    }

    pub fn cmd(&self, dir: &Path) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("DBX_KEYRING", "file")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if let Some(has) = self.sha_extensions {
            c.env("DBX_SHA_EXTENSIONS", if has { "1" } else { "0" });
        }
        c
    }

    /// Runs `dbx ARGS` in `dir`.
    pub fn run(&self, dir: &Path, args: &[&str]) -> Output {
        self.cmd(dir).args(args).output().expect("run dbx")
    }

    /// Runs `dbx ARGS` in `dir` and asserts success.
    pub fn ok(&self, dir: &Path, args: &[&str]) -> Output {
        let out = self.run(dir, args);
        assert!(
            out.status.success(),
            "dbx {args:?} failed ({:?}):\n{}",
            out.status.code(),
            stderr(&out)
        );
        out
    }

    /// Runs `dbx --json ARGS` in `dir`, asserts success, parses stdout.
    pub fn json(&self, dir: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(dir, &all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout of dbx {args:?} is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `dbx --json ARGS` in `dir` with dbx's debug logs on, asserts success; returns the
    /// parsed report and the log (stderr).
    pub fn json_logged(&self, dir: &Path, args: &[&str]) -> (serde_json::Value, String) {
        let out = self
            .cmd(dir)
            .arg("--json")
            .args(args)
            .env("RUST_LOG", "dbx=debug")
            .output()
            .expect("run dbx");
        assert!(out.status.success(), "dbx {args:?}: {}", stderr(&out));
        (parse_json(&out), stderr(&out))
    }

    pub fn login(&self, server: &Server, user: &str) {
        let out = run_with_stdin(
            self.cmd(self.home.path()).args([
                "login",
                &server.url,
                "--user",
                user,
                "--password-stdin",
            ]),
            &format!("{PASSWORD}\n"),
        );
        assert!(out.status.success(), "login: {}", stderr(&out));
    }

    /// Makes `dir` a synced folder mirroring the server's `/`.
    pub fn init(&self, dir: &Path) {
        self.init_at(dir, "/");
    }

    /// Makes `dir` a synced folder mirroring the server folder `remote`.
    pub fn init_at(&self, dir: &Path, remote: &str) {
        self.ok(
            self.home.path(),
            &["init", dir.to_str().unwrap(), "--remote", remote],
        );
    }
}

/// Two devices (clients with their own HOME) logged in as alice.
pub fn two_devices(server: &Server) -> (Client, Client) {
    let (a, b) = (Client::new(), Client::new());
    a.login(server, "alice");
    b.login(server, "alice");
    (a, b)
}

pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dbx");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift64*), so trees are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Sets the mtime of every file below `root` a minute back: a file modified within the last
/// two seconds is read again by every run (it could change again unnoticed), so it is never
/// settled, nor sent as it is hashed.
pub fn age_files(root: &Path) {
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for e in walk(root) {
        if e.is_file() {
            let f = std::fs::File::options().write(true).open(&e).unwrap();
            f.set_modified(past).unwrap();
        }
    }
}

/// Writes 12 files of 4 MiB (small files, sent 16 MiB at a time) and one of 30 MiB (a big one,
/// sent as it is read), `{prefix}00.bin` to `{prefix}12.bin` below `root`, then ages everything
/// there: enough for a push to send blocks, and commit small files, while it is still hashing.
/// Returns their bytes, in that order.
pub fn write_sent_while_hashing(root: &Path, prefix: &str, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut files: Vec<Vec<u8>> = (0..12).map(|_| rng.bytes(4 << 20)).collect();
    files.push(rng.bytes(30 << 20));
    for (i, f) in files.iter().enumerate() {
        write_file(&root.join(format!("{prefix}{i:02}.bin")), f);
    }
    age_files(root);
    files
}

pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a tree holds: per relative path, `dir`, or the SHA-256 of the bytes and the exec bit.
pub fn digest_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in walk(root) {
        let rel = entry
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == ".dbx" || rel.starts_with(".dbx/") {
            continue;
        }
        // A live watcher may rename or remove entries (its temp files) while this walks: an
        // entry gone meanwhile is not part of the tree.
        let Ok(meta) = std::fs::symlink_metadata(&entry) else {
            continue;
        };
        let v = if meta.is_dir() {
            "dir".to_string()
        } else {
            let Ok(bytes) = std::fs::read(&entry) else {
                continue;
            };
            let exec = meta.permissions().mode() & 0o111 != 0;
            format!("{} x={exec}", hex::encode(Sha256::digest(&bytes)))
        };
        out.insert(rel, v);
    }
    out
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue; // removed while walking (see `digest_tree`)
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".dbx") {
                continue;
            }
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Asserts two digests are equal, printing only the paths that differ.
pub fn assert_same(actual: &BTreeMap<String, String>, expected: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => diffs.push(format!("missing: {k}")),
            Some(a) if a != v => diffs.push(format!("differs: {k}: {a} != {v}")),
            _ => {}
        }
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        diffs.push(format!("unexpected: {k}"));
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// A bearer token for `user`, straight from the API.
pub async fn api_token(server: &Server, user: &str) -> String {
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/api/v1/login", server.url))
        .json(&serde_json::json!({"user": user, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["token"].as_str().unwrap().to_string()
}

/// `GET /api/v1/{route}` as JSON, with a bearer token.
pub async fn api_get(server: &Server, tok: &str, route: &str) -> serde_json::Value {
    json_answer(
        reqwest::Client::new()
            .get(format!("{}/api/v1/{route}", server.url))
            .bearer_auth(tok),
    )
    .await
}

/// Sends a request and parses the answer as JSON.
pub async fn json_answer(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// `POST /api/v1/{route}` with a JSON body, answered as JSON, with a bearer token.
pub async fn api_post(
    server: &Server,
    tok: &str,
    route: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    json_answer(
        reqwest::Client::new()
            .post(format!("{}/api/v1/{route}", server.url))
            .bearer_auth(tok)
            .json(&body),
    )
    .await
}

/// Where the server's filesystem block store keeps a block: a file of its own, or a record of a
/// pack file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    pub file: PathBuf,
    pub offset: usize,
    pub len: usize,
}

impl StoredBlock {
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap()[self.offset..self.offset + self.len].to_vec()
    }

    /// Flips one bit of the block's byte `at`, on disk.
    pub fn corrupt(&self, at: usize) {
        let mut raw = std::fs::read(&self.file).unwrap();
        raw[self.offset + at] ^= 0x40;
        std::fs::write(&self.file, raw).unwrap();
    }
}

/// Every block on disk under `DATA/blocks`, by hash: the files `<2 hex>/<hash>` and the records
/// of the pack files `packs/*.pack`, read as the format says, without the store's index (a
/// record: `dbxP`, the hash in 64 hex digits, the length as u32 LE, the bytes). A block deleted
/// but still in a pack that was not rewritten is listed.
pub fn stored_blocks(data: &Path) -> BTreeMap<String, StoredBlock> {
    let mut out = BTreeMap::new();
    for dir in std::fs::read_dir(data.join("blocks")).unwrap() {
        let dir = dir.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() != 2 || !name.chars().all(|c| c.is_ascii_hexdigit()) || !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let file = f.unwrap().path();
            let hash = file.file_name().unwrap().to_string_lossy().into_owned();
            assert!(hash.starts_with(&name), "{} is misplaced", file.display());
            let len = std::fs::metadata(&file).unwrap().len() as usize;
            out.insert(
                hash,
                StoredBlock {
                    file,
                    offset: 0,
                    len,
                },
            );
        }
    }
    for f in std::fs::read_dir(data.join("blocks/packs")).unwrap() {
        let file = f.unwrap().path();
        let raw = std::fs::read(&file).unwrap();
        let mut at = 0;
        while at < raw.len() {
            assert_eq!(&raw[at..at + 4], b"dbxP", "{} at {at}", file.display());
            let hash = String::from_utf8(raw[at + 4..at + 68].to_vec()).unwrap();
            let len = u32::from_le_bytes(raw[at + 68..at + 72].try_into().unwrap()) as usize;
            let offset = at + 72;
            at = offset + len;
            assert!(at <= raw.len(), "{} is truncated", file.display());
            let file = file.clone();
            out.insert(hash, StoredBlock { file, offset, len });
        }
    }
    out
}

/// Lowercase hex SHA-256 (an implementation independent of dbx's).
pub fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Parses the stdout of a `--json` run (whatever its exit code).
pub fn parse_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
