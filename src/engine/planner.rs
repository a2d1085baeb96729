//! The planner: a pure function of three trees (local, last synced, remote) and a direction,
//! yielding the actions that bring one side up to date. No I/O; output order is deterministic:
//! deletes (deepest first), then folder creations (shallowest first), then transfers and index
//! updates in path order.
//!
//! Rules that always hold:
//! - nothing is ever deleted unless it is unchanged since the last sync (a delete never destroys
//!   an edit: edit beats delete, the file comes back);
//! - a folder is deleted only when nothing inside it survives;
//! - nothing is overwritten that changed on the side being written: that is a conflict, left
//!   untouched and reported (two-way conflict resolution builds on this);
//! - identical content on both sides is never a conflict and never a transfer.

use std::collections::{BTreeMap, BTreeSet};

use super::index::{SyncedEntry, SyncedTree};
use crate::protocol::{Entry, EntryKind};

/// The local side of one path, after hashing what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalState {
    pub kind: EntryKind,
    pub content_hash: Option<String>,
    pub executable: bool,
}

pub type LocalStates = BTreeMap<String, LocalState>;
/// The remote tree, keyed by path relative to the synced folder.
pub type RemoteTree = BTreeMap<String, Entry>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local changes go to the server.
    Push,
    /// Server changes come to the local folder.
    Pull,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Delete on the server (a folder with everything below it), if still at `rev`.
    DeleteRemote {
        path: String,
        rev: i64,
    },
    /// Delete locally (a folder only once empty).
    DeleteLocal {
        path: String,
        kind: EntryKind,
    },
    MkdirRemote {
        path: String,
    },
    MkdirLocal {
        path: String,
    },
    /// Upload a local file; `parent_rev` is the server revision it replaces.
    Upload {
        path: String,
        parent_rev: Option<i64>,
    },
    Download {
        path: String,
    },
    /// Both sides agree: record the local stat and the remote revision.
    Record {
        path: String,
    },
    /// Gone on both sides: drop from the index.
    Forget {
        path: String,
    },
    /// Both sides changed differently: leave both alone and report.
    Conflict {
        path: String,
        reason: String,
    },
}

impl Action {
    pub fn path(&self) -> &str {
        match self {
            Action::DeleteRemote { path, .. }
            | Action::DeleteLocal { path, .. }
            | Action::MkdirRemote { path }
            | Action::MkdirLocal { path }
            | Action::Upload { path, .. }
            | Action::Download { path }
            | Action::Record { path }
            | Action::Forget { path }
            | Action::Conflict { path, .. } => path,
        }
    }

    fn phase(&self) -> u8 {
        match self {
            Action::DeleteRemote { .. } | Action::DeleteLocal { .. } => 0,
            Action::MkdirRemote { .. } | Action::MkdirLocal { .. } => 1,
            _ => 2,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// False when the local scan was incomplete: then nothing is deleted on the server.
    pub allow_remote_delete: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_remote_delete: true,
        }
    }
}

fn same_local_synced(l: &LocalState, s: &SyncedEntry) -> bool {
    l.kind == s.kind
        && (l.kind == EntryKind::Dir
            || (l.content_hash == s.content_hash && l.executable == s.executable))
}

fn same_local_remote(l: &LocalState, r: &Entry) -> bool {
    l.kind == r.kind
        && (l.kind == EntryKind::Dir
            || (l.content_hash == r.content_hash && l.executable == r.executable))
}

fn remote_unchanged(r: &Entry, s: &SyncedEntry) -> bool {
    r.kind == s.kind
        && (r.rev == s.rev
            || r.kind == EntryKind::Dir
            || (r.content_hash == s.content_hash && r.executable == s.executable))
}

fn depth(path: &str) -> usize {
    path.matches('/').count()
}

/// Whether every entry strictly below `dir` in `tree` is in `doomed`.
fn all_below_doomed<V>(tree: &BTreeMap<String, V>, dir: &str, doomed: &BTreeSet<String>) -> bool {
    let lo = format!("{dir}/");
    let hi = format!("{dir}0");
    tree.range(lo..hi).all(|(p, _)| doomed.contains(p))
}

/// Plans one direction of a sync. See the module docs for the rules.
pub fn plan(
    local: &LocalStates,
    synced: &SyncedTree,
    remote: &RemoteTree,
    direction: Direction,
    opts: Options,
) -> Plan {
    let paths: BTreeSet<&String> = local
        .keys()
        .chain(synced.keys())
        .chain(remote.keys())
        .collect();
    let mut actions = Vec::new();
    for path in paths {
        let l = local.get(path);
        let s = synced.get(path);
        let r = remote.get(path);
        let p = path.clone();
        let conflict = |reason: &str| Action::Conflict {
            path: path.clone(),
            reason: reason.to_string(),
        };
        match direction {
            Direction::Push => match (l, s, r) {
                (Some(l), None, None) => actions.push(create_remote(p, l, None)),
                (Some(l), None, Some(r)) => {
                    if same_local_remote(l, r) {
                        actions.push(Action::Record { path: p });
                    } else {
                        actions.push(conflict("exists on the server with other content"));
                    }
                }
                (Some(l), Some(s), None) => {
                    // Deleted on the server: an unchanged copy stays for `pull` to remove; an
                    // edited one wins over the delete and goes back up.
                    if !same_local_synced(l, s) {
                        actions.push(create_remote(p, l, None));
                    }
                }
                (Some(l), Some(s), Some(r)) => {
                    if same_local_synced(l, s) {
                        continue;
                    }
                    if same_local_remote(l, r) {
                        actions.push(Action::Record { path: p });
                    } else if !remote_unchanged(r, s) {
                        actions.push(conflict("changed both locally and on the server"));
                    } else if l.kind != r.kind {
                        actions.push(Action::DeleteRemote {
                            path: p.clone(),
                            rev: r.rev,
                        });
                        actions.push(create_remote(p, l, None));
                    } else if l.kind == EntryKind::File {
                        actions.push(Action::Upload {
                            path: p,
                            parent_rev: Some(r.rev),
                        });
                    }
                }
                (None, Some(s), Some(r)) => {
                    if remote_unchanged(r, s) && opts.allow_remote_delete {
                        actions.push(Action::DeleteRemote {
                            path: p,
                            rev: r.rev,
                        });
                    }
                }
                (None, Some(_), None) => actions.push(Action::Forget { path: p }),
                (None, None, _) => {}
            },
            Direction::Pull => match (r, s, l) {
                (Some(r), None, None) => actions.push(create_local(p, r)),
                (Some(r), None, Some(l)) => {
                    if same_local_remote(l, r) {
                        actions.push(Action::Record { path: p });
                    } else {
                        actions.push(conflict("a different local file is in the way"));
                    }
                }
                (Some(r), Some(s), None) => {
                    if !remote_unchanged(r, s) {
                        actions.push(create_local(p, r));
                    }
                }
                (Some(r), Some(s), Some(l)) => {
                    if remote_unchanged(r, s) {
                        continue;
                    }
                    if same_local_remote(l, r) {
                        actions.push(Action::Record { path: p });
                    } else if !same_local_synced(l, s) {
                        actions.push(conflict("changed both locally and on the server"));
                    } else if l.kind != r.kind {
                        actions.push(Action::DeleteLocal {
                            path: p.clone(),
                            kind: l.kind,
                        });
                        actions.push(create_local(p, r));
                    } else if r.kind == EntryKind::File {
                        actions.push(Action::Download { path: p });
                    }
                }
                (None, Some(s), Some(l)) => {
                    if same_local_synced(l, s) {
                        actions.push(Action::DeleteLocal {
                            path: p,
                            kind: l.kind,
                        });
                    }
                }
                (None, Some(_), None) => actions.push(Action::Forget { path: p }),
                (None, None, _) => {}
            },
        }
    }
    prune_folder_deletes(&mut actions, local, remote, direction);
    actions.sort_by(|a, b| {
        let key = |x: &Action| {
            let d = depth(x.path());
            let d = match x.phase() {
                0 => usize::MAX - d,
                1 => d,
                _ => 0,
            };
            (x.phase(), d)
        };
        key(a)
            .cmp(&key(b))
            .then_with(|| a.path().cmp(b.path()))
            .then_with(|| a.cmp(b))
    });
    Plan { actions }
}

fn create_remote(path: String, l: &LocalState, parent_rev: Option<i64>) -> Action {
    match l.kind {
        EntryKind::Dir => Action::MkdirRemote { path },
        EntryKind::File => Action::Upload { path, parent_rev },
    }
}

fn create_local(path: String, r: &Entry) -> Action {
    match r.kind {
        EntryKind::Dir => Action::MkdirLocal { path },
        EntryKind::File => Action::Download { path },
    }
}

/// A folder is deleted only when everything below it on that side is being deleted too; then
/// the deletes below it are folded into the folder's (one request for a whole subtree).
fn prune_folder_deletes(
    actions: &mut Vec<Action>,
    local: &LocalStates,
    remote: &RemoteTree,
    direction: Direction,
) {
    let doomed: BTreeSet<String> = actions
        .iter()
        .filter(|a| matches!(a, Action::DeleteRemote { .. } | Action::DeleteLocal { .. }))
        .map(|a| a.path().to_string())
        .collect();
    let kept_dirs: BTreeSet<String> = doomed
        .iter()
        .filter(|p| match direction {
            Direction::Push => {
                remote.get(*p).is_some_and(|e| e.kind == EntryKind::Dir)
                    && all_below_doomed(remote, p, &doomed)
            }
            Direction::Pull => {
                local.get(*p).is_some_and(|e| e.kind == EntryKind::Dir)
                    && all_below_doomed(local, p, &doomed)
            }
        })
        .cloned()
        .collect();
    let is_dir_delete = |a: &Action| match (a, direction) {
        (Action::DeleteRemote { path, .. }, Direction::Push) => {
            remote.get(path).is_some_and(|e| e.kind == EntryKind::Dir)
        }
        (Action::DeleteLocal { kind, .. }, Direction::Pull) => *kind == EntryKind::Dir,
        _ => false,
    };
    let covered = |path: &str| {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            if kept_dirs.contains(parent) {
                return true;
            }
            p = parent;
        }
        false
    };
    let mut out = Vec::with_capacity(actions.len());
    for a in actions.drain(..) {
        if is_dir_delete(&a) && !kept_dirs.contains(a.path()) {
            continue;
        }
        // Remote folder deletes are recursive on the server, so what lies below is covered.
        // Local folder deletes only remove empty folders, so their files are still deleted.
        if direction == Direction::Push
            && matches!(a, Action::DeleteRemote { .. })
            && covered(a.path())
        {
            out.push(Action::Forget {
                path: a.path().to_string(),
            });
            continue;
        }
        out.push(a);
    }
    *actions = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(hash: &str) -> LocalState {
        LocalState {
            kind: EntryKind::File,
            content_hash: Some(hash.into()),
            executable: false,
        }
    }
    fn dir() -> LocalState {
        LocalState {
            kind: EntryKind::Dir,
            content_hash: None,
            executable: false,
        }
    }
    fn synced(l: &LocalState, rev: i64) -> SyncedEntry {
        SyncedEntry {
            ns: 1,
            kind: l.kind,
            size: 0,
            mtime_ns: 0,
            inode: 0,
            executable: l.executable,
            content_hash: l.content_hash.clone(),
            blocks: vec![],
            rev,
        }
    }
    fn remote(path: &str, l: &LocalState, rev: i64) -> Entry {
        Entry {
            path: path.into(),
            kind: l.kind,
            rev,
            size: 0,
            content_hash: l.content_hash.clone(),
            mtime: 0,
            executable: l.executable,
            blocks: vec![],
        }
    }

    /// One row: the three sides of path "f" (None = absent), the expected actions per direction.
    /// Each side is (state, rev); the synced rev equals the remote rev when remote is unchanged.
    type Side = Option<(LocalState, i64)>;

    fn run(l: Option<LocalState>, s: Side, r: Side, d: Direction) -> Vec<Action> {
        let mut lt = LocalStates::new();
        let mut st = SyncedTree::new();
        let mut rt = RemoteTree::new();
        if let Some(l) = l {
            lt.insert("f".into(), l);
        }
        if let Some((s, rev)) = s {
            st.insert("f".into(), synced(&s, rev));
        }
        if let Some((r, rev)) = r {
            rt.insert("f".into(), remote("f", &r, rev));
        }
        plan(&lt, &st, &rt, d, Options::default()).actions
    }

    fn up(parent_rev: Option<i64>) -> Action {
        Action::Upload {
            path: "f".into(),
            parent_rev,
        }
    }
    fn down() -> Action {
        Action::Download { path: "f".into() }
    }
    fn rec() -> Action {
        Action::Record { path: "f".into() }
    }
    fn forget() -> Action {
        Action::Forget { path: "f".into() }
    }
    fn is_conflict(a: &[Action]) -> bool {
        a.len() == 1 && matches!(a[0], Action::Conflict { .. })
    }

    #[test]
    fn file_table() {
        use Direction::*;
        let a = file("a");
        let b = file("b");
        let c = file("c");
        // (local, synced, remote) -> (push, pull); "C" = conflict.
        let none: Vec<Action> = vec![];
        // absent everywhere but synced: forget
        assert_eq!(run(None, Some((a.clone(), 1)), None, Push), vec![forget()]);
        assert_eq!(run(None, Some((a.clone(), 1)), None, Pull), vec![forget()]);
        // new locally
        assert_eq!(run(Some(a.clone()), None, None, Push), vec![up(None)]);
        assert_eq!(run(Some(a.clone()), None, None, Pull), none);
        // new remotely
        assert_eq!(run(None, None, Some((a.clone(), 3)), Push), none);
        assert_eq!(run(None, None, Some((a.clone(), 3)), Pull), vec![down()]);
        // new on both sides, same content: no conflict, no transfer
        assert_eq!(
            run(Some(a.clone()), None, Some((a.clone(), 3)), Push),
            vec![rec()]
        );
        assert_eq!(
            run(Some(a.clone()), None, Some((a.clone(), 3)), Pull),
            vec![rec()]
        );
        // new on both sides, different content: conflict both ways
        assert!(is_conflict(&run(
            Some(a.clone()),
            None,
            Some((b.clone(), 3)),
            Push
        )));
        assert!(is_conflict(&run(
            Some(a.clone()),
            None,
            Some((b.clone(), 3)),
            Pull
        )));
        // unchanged everywhere
        let s = Some((a.clone(), 3));
        assert_eq!(run(Some(a.clone()), s.clone(), s.clone(), Push), none);
        assert_eq!(run(Some(a.clone()), s.clone(), s.clone(), Pull), none);
        // modified locally
        assert_eq!(
            run(Some(b.clone()), s.clone(), s.clone(), Push),
            vec![up(Some(3))]
        );
        assert_eq!(run(Some(b.clone()), s.clone(), s.clone(), Pull), none);
        // modified remotely
        let r = Some((b.clone(), 5));
        assert_eq!(run(Some(a.clone()), s.clone(), r.clone(), Push), none);
        assert_eq!(
            run(Some(a.clone()), s.clone(), r.clone(), Pull),
            vec![down()]
        );
        // modified on both sides, same new content
        assert_eq!(
            run(Some(b.clone()), s.clone(), r.clone(), Push),
            vec![rec()]
        );
        assert_eq!(
            run(Some(b.clone()), s.clone(), r.clone(), Pull),
            vec![rec()]
        );
        // modified on both sides differently
        assert!(is_conflict(&run(
            Some(c.clone()),
            s.clone(),
            r.clone(),
            Push
        )));
        assert!(is_conflict(&run(
            Some(c.clone()),
            s.clone(),
            r.clone(),
            Pull
        )));
        // deleted locally, unchanged remotely
        let del_remote = vec![Action::DeleteRemote {
            path: "f".into(),
            rev: 3,
        }];
        assert_eq!(run(None, s.clone(), s.clone(), Push), del_remote);
        assert_eq!(run(None, s.clone(), s.clone(), Pull), none);
        // deleted locally, modified remotely: the edit wins
        assert_eq!(run(None, s.clone(), r.clone(), Push), none);
        assert_eq!(run(None, s.clone(), r.clone(), Pull), vec![down()]);
        // deleted remotely, unchanged locally
        let del_local = vec![Action::DeleteLocal {
            path: "f".into(),
            kind: EntryKind::File,
        }];
        assert_eq!(run(Some(a.clone()), s.clone(), None, Push), none);
        assert_eq!(run(Some(a.clone()), s.clone(), None, Pull), del_local);
        // deleted remotely, modified locally: the edit wins
        assert_eq!(run(Some(b.clone()), s.clone(), None, Push), vec![up(None)]);
        assert_eq!(run(Some(b.clone()), s.clone(), None, Pull), none);
        // executable bit alone is a change
        let ax = LocalState {
            executable: true,
            ..a.clone()
        };
        assert_eq!(run(Some(ax), s.clone(), s.clone(), Push), vec![up(Some(3))]);
    }

    #[test]
    fn remote_delete_is_withheld_when_the_scan_was_incomplete() {
        let a = file("a");
        let mut st = SyncedTree::new();
        st.insert("f".into(), synced(&a, 3));
        let mut rt = RemoteTree::new();
        rt.insert("f".into(), remote("f", &a, 3));
        let p = plan(
            &LocalStates::new(),
            &st,
            &rt,
            Direction::Push,
            Options {
                allow_remote_delete: false,
            },
        );
        assert!(p.actions.is_empty());
    }

    fn tree_case(
        local: &[(&str, LocalState)],
        synced_: &[(&str, LocalState)],
        remote_: &[(&str, LocalState)],
        d: Direction,
    ) -> Vec<Action> {
        let lt = local
            .iter()
            .map(|(p, l)| (p.to_string(), l.clone()))
            .collect();
        let st = synced_
            .iter()
            .map(|(p, l)| (p.to_string(), synced(l, 1)))
            .collect();
        let rt = remote_
            .iter()
            .map(|(p, l)| (p.to_string(), remote(p, l, 1)))
            .collect();
        plan(&lt, &st, &rt, d, Options::default()).actions
    }

    #[test]
    fn folder_deleted_locally_is_one_remote_delete() {
        let a = file("a");
        let all = [
            ("d", dir()),
            ("d/e", dir()),
            ("d/e/x", a.clone()),
            ("d/y", a.clone()),
        ];
        let acts = tree_case(&[], &all, &all, Direction::Push);
        assert_eq!(
            acts,
            vec![
                Action::DeleteRemote {
                    path: "d".into(),
                    rev: 1
                },
                Action::Forget { path: "d/e".into() },
                Action::Forget {
                    path: "d/e/x".into()
                },
                Action::Forget { path: "d/y".into() },
            ]
        );
    }

    #[test]
    fn folder_with_new_remote_file_is_not_deleted() {
        let a = file("a");
        let synced_ = [("d", dir()), ("d/x", a.clone())];
        let remote_ = [("d", dir()), ("d/x", a.clone()), ("d/new", file("n"))];
        let acts = tree_case(&[], &synced_, &remote_, Direction::Push);
        assert_eq!(
            acts,
            vec![Action::DeleteRemote {
                path: "d/x".into(),
                rev: 1
            }]
        );
    }

    #[test]
    fn folder_deleted_remotely_keeps_unsynced_local_files() {
        let a = file("a");
        let synced_ = [("d", dir()), ("d/x", a.clone())];
        let local = [("d", dir()), ("d/x", a.clone()), ("d/mine", file("m"))];
        let acts = tree_case(&local, &synced_, &[], Direction::Pull);
        assert_eq!(
            acts,
            vec![Action::DeleteLocal {
                path: "d/x".into(),
                kind: EntryKind::File
            }]
        );
    }

    #[test]
    fn creations_come_parents_first_and_deletes_children_first() {
        let a = file("a");
        let remote_ = [
            ("z", dir()),
            ("z/y", dir()),
            ("z/y/f", a.clone()),
            ("b", a.clone()),
        ];
        let acts = tree_case(&[], &[], &remote_, Direction::Pull);
        let order: Vec<_> = acts.iter().map(|a| a.path().to_string()).collect();
        assert_eq!(order, vec!["z", "z/y", "b", "z/y/f"]);
        let local = [("z", dir()), ("z/y", dir()), ("z/y/f", a.clone())];
        let acts = tree_case(&local, &local, &[], Direction::Pull);
        let order: Vec<_> = acts.iter().map(|a| a.path().to_string()).collect();
        assert_eq!(order, vec!["z/y/f", "z/y", "z"]);
    }
}
