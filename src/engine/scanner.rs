//! The local tree: a walk of the synced folder that yields files and folders with their stat
//! (size, mtime, inode, executable bit), honouring `.dbxignore` (gitignore syntax) and the
//! built-in exclusions. It reads no file contents.
//!
//! What is skipped, and reported as a warning rather than silently: symlinks (dbx syncs bytes,
//! not links), special files, and names that are not UTF-8 or that the server could not accept.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::protocol::{self, EntryKind};

/// The folder that holds a synced folder's own state.
pub const STATE_DIR: &str = ".dbx";
/// Per-folder ignore rules, gitignore syntax.
pub const IGNORE_FILE: &str = ".dbxignore";
/// Prefix of dbx's own temp files (downloads in flight); never synced.
pub const TEMP_PREFIX: &str = ".dbx-tmp-";
/// Prefix of partly downloaded big files, kept so a killed download resumes; never synced.
pub const PART_PREFIX: &str = ".dbx-part-";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEntry {
    pub kind: EntryKind,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub inode: u64,
    pub executable: bool,
}

impl LocalEntry {
    pub fn from_metadata(meta: &std::fs::Metadata) -> LocalEntry {
        LocalEntry {
            kind: if meta.is_dir() {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            size: if meta.is_dir() { 0 } else { meta.len() },
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            inode: meta.ino(),
            executable: !meta.is_dir() && meta.permissions().mode() & 0o111 != 0,
        }
    }

    pub fn mtime_ms(&self) -> i64 {
        self.mtime_ns.div_euclid(1_000_000)
    }
}

/// The local tree, by normalised path relative to the folder root.
pub type LocalTree = BTreeMap<String, LocalEntry>;

#[derive(Debug, Default)]
pub struct Scan {
    pub tree: LocalTree,
    pub warnings: Vec<String>,
    /// Some folder or file could not be read: what is missing from `tree` may still exist, so
    /// nothing may be deleted on the strength of this scan.
    pub incomplete: bool,
    /// dbx's own temp files left by a run that was killed (downloads in flight).
    pub stale_temps: Vec<std::path::PathBuf>,
}

fn builtin_ignored(name: &str) -> bool {
    name == STATE_DIR
}

/// What the walk found at one path.
enum Found {
    Entry(String, LocalEntry),
    /// A warning, and whether it makes the scan incomplete (something unreadable).
    Warning(String, bool),
    StaleTemp(std::path::PathBuf),
}

/// Walks `root`. An error reading a subfolder becomes a warning and marks the scan
/// [`Scan::incomplete`], so an unreadable folder is never taken for a deleted one. The walk
/// runs on several threads (up to the cores, at most 4): it is system calls, one directory
/// read or `stat` at a time each; the tree and the warnings come out sorted whatever the
/// threads' order.
pub fn scan(root: &Path) -> std::io::Result<Scan> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(|e| !builtin_ignored(&e.file_name().to_string_lossy()))
        .threads(threads)
        .build_parallel();
    let (found, results) = std::sync::mpsc::channel::<Vec<Found>>();
    walker.run(|| {
        // Each thread's finds go in batches, sent when the thread's walk ends.
        let mut batch = Batch {
            found: Vec::new(),
            to: found.clone(),
        };
        Box::new(move |item| {
            if let Some(f) = examine(root, item) {
                batch.found.push(f);
            }
            ignore::WalkState::Continue
        })
    });
    drop(found);
    let mut out = Scan::default();
    let mut entries = Vec::new();
    for f in results.into_iter().flatten() {
        match f {
            Found::Entry(path, entry) => entries.push((path, entry)),
            Found::Warning(w, incomplete) => {
                out.warnings.push(w);
                out.incomplete |= incomplete;
            }
            Found::StaleTemp(p) => out.stale_temps.push(p),
        }
    }
    // The same report whatever order the threads found things in.
    out.warnings.sort();
    out.stale_temps.sort();
    out.tree = entries.into_iter().collect();
    Ok(out)
}

/// A walking thread's finds, sent to the scan when the thread is done with them.
struct Batch {
    found: Vec<Found>,
    to: std::sync::mpsc::Sender<Vec<Found>>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = self.to.send(std::mem::take(&mut self.found));
    }
}

/// What one item of the walk is: an entry, something skipped (with a warning), a stale temp
/// file, or nothing to report (the root itself, a folder's unreadable name).
fn examine(root: &Path, item: Result<ignore::DirEntry, ignore::Error>) -> Option<Found> {
    let entry = match item {
        Ok(e) => e,
        Err(err) => return Some(Found::Warning(format!("skipped: {err}"), true)),
    };
    if entry.depth() == 0 {
        return None;
    }
    let rel = entry.path().strip_prefix(root).ok()?;
    let Some(rel_str) = rel.to_str() else {
        return Some(Found::Warning(
            format!("skipped {}: the name is not valid UTF-8", rel.display()),
            false,
        ));
    };
    let path = match protocol::normalize_path(rel_str) {
        Ok(p) => p,
        Err(e) => return Some(Found::Warning(format!("skipped {rel_str}: {e}"), false)),
    };
    let ft = entry.file_type()?;
    let name = entry.file_name().to_string_lossy();
    if ft.is_file() && (name.starts_with(TEMP_PREFIX) || name.starts_with(PART_PREFIX)) {
        return Some(Found::StaleTemp(entry.path().to_path_buf()));
    }
    if ft.is_symlink() {
        return Some(Found::Warning(
            format!("skipped symlink {path}: dbx does not sync symlinks"),
            false,
        ));
    }
    if !ft.is_file() && !ft.is_dir() {
        return Some(Found::Warning(
            format!("skipped {path}: not a regular file or folder"),
            false,
        ));
    }
    Some(match entry.metadata() {
        Ok(meta) => Found::Entry(path, LocalEntry::from_metadata(&meta)),
        Err(e) => Found::Warning(format!("skipped {path}: {e}"), true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn scan_honours_ignores_and_skips_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join(".dbx")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join(".dbx/index.db"), b"x").unwrap();
        fs::write(root.join("a/b/keep.txt"), b"hello").unwrap();
        fs::write(root.join("a/drop.log"), b"x").unwrap();
        fs::write(root.join(".dbx-tmp-123"), b"x").unwrap();
        fs::write(root.join(".dbxignore"), b"*.log\n").unwrap();
        fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a", root.join("link")).unwrap();

        let scan = scan(root).unwrap();
        let paths: Vec<_> = scan.tree.keys().cloned().collect();
        assert_eq!(
            paths,
            vec![".dbxignore", "a", "a/b", "a/b/keep.txt", "empty", "run.sh"]
        );
        assert!(scan.tree["run.sh"].executable);
        assert!(!scan.tree["a/b/keep.txt"].executable);
        assert_eq!(scan.tree["a/b/keep.txt"].size, 5);
        assert_eq!(scan.tree["a"].kind, EntryKind::Dir);
        assert!(scan.warnings.iter().any(|w| w.contains("symlink link")));
        assert_eq!(scan.stale_temps, vec![root.join(".dbx-tmp-123")]);
    }

    /// Walked by several threads, a tree of many folders comes out whole and the same each
    /// time: every file and folder with its own size, nested ignore files honoured in their
    /// own subtree only, every skipped link reported, in a stable order.
    #[test]
    fn a_parallel_walk_finds_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut expected = std::collections::BTreeMap::new();
        for d in 0..12 {
            for e in 0..5 {
                let folder = format!("d{d:02}/e{e}");
                fs::create_dir_all(root.join(&folder)).unwrap();
                expected.insert(format!("d{d:02}"), 0);
                expected.insert(folder.clone(), 0);
                for f in 0..8 {
                    let path = format!("{folder}/f{f}.txt");
                    fs::write(root.join(&path), vec![b'x'; d * 100 + e * 10 + f]).unwrap();
                    expected.insert(path, (d * 100 + e * 10 + f) as u64);
                }
                // Ignored here, and only here (`d00/skip.bin` below is kept).
                fs::write(root.join(&folder).join("skip.bin"), b"x").unwrap();
                std::os::unix::fs::symlink("f0.txt", root.join(&folder).join("link")).unwrap();
            }
            fs::write(root.join(format!("d{d:02}/.dbxignore")), b"e*/skip.bin\n").unwrap();
            expected.insert(format!("d{d:02}/.dbxignore"), 12);
        }
        fs::write(root.join("d00/skip.bin"), b"kept").unwrap();
        expected.insert("d00/skip.bin".into(), 4);
        let first = scan(root).unwrap();
        let found: std::collections::BTreeMap<String, u64> = first
            .tree
            .iter()
            .map(|(p, e)| (p.clone(), e.size))
            .collect();
        assert_eq!(found, expected);
        assert_eq!(first.warnings.len(), 60);
        assert!(first.warnings.is_sorted());
        assert!(!first.incomplete);
        let again = scan(root).unwrap();
        assert_eq!(again.tree, first.tree);
        assert_eq!(again.warnings, first.warnings);
    }
}
