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

/// Walks `root`. An error reading a subfolder becomes a warning and marks the scan
/// [`Scan::incomplete`], so an unreadable folder is never taken for a deleted one.
pub fn scan(root: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(|e| !builtin_ignored(&e.file_name().to_string_lossy()))
        .build();
    for item in walker {
        let entry = match item {
            Ok(e) => e,
            Err(err) => {
                out.warnings.push(format!("skipped: {err}"));
                out.incomplete = true;
                continue;
            }
        };
        if entry.depth() == 0 {
            continue;
        }
        let rel = match entry.path().strip_prefix(root) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let Some(rel_str) = rel.to_str() else {
            out.warnings.push(format!(
                "skipped {}: the name is not valid UTF-8",
                rel.display()
            ));
            continue;
        };
        let path = match protocol::normalize_path(rel_str) {
            Ok(p) => p,
            Err(e) => {
                out.warnings.push(format!("skipped {rel_str}: {e}"));
                continue;
            }
        };
        let Some(ft) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name().to_string_lossy();
        if ft.is_file() && (name.starts_with(TEMP_PREFIX) || name.starts_with(PART_PREFIX)) {
            out.stale_temps.push(entry.path().to_path_buf());
            continue;
        }
        if ft.is_symlink() {
            out.warnings.push(format!(
                "skipped symlink {path}: dbx does not sync symlinks"
            ));
            continue;
        }
        if !ft.is_file() && !ft.is_dir() {
            out.warnings
                .push(format!("skipped {path}: not a regular file or folder"));
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                out.warnings.push(format!("skipped {path}: {e}"));
                out.incomplete = true;
                continue;
            }
        };
        out.tree.insert(path, LocalEntry::from_metadata(&meta));
    }
    Ok(out)
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
}
