//! The planner: a pure function of three trees (local, last synced, remote) and a direction,
//! yielding the actions that bring the sides together. No I/O; output order is deterministic:
//! moves, then deletes (deepest first), conflict copies, folder creations (shallowest first),
//! then transfers and index updates, each group in path order.
//!
//! Rules that always hold:
//! - nothing is deleted unless it is unchanged since the last sync: an edit beats a delete, the
//!   edited file comes back;
//! - a folder is deleted only when nothing inside it survives (unsynced files inside a folder
//!   deleted elsewhere survive, and so does the folder);
//! - identical content on both sides is never a conflict and never a transfer;
//! - two-way (`Both`): when both sides changed a file differently, the server's version keeps
//!   the name and the local bytes are kept as `name (HOST's conflicted copy YYYY-MM-DD).ext`,
//!   which is then synced like any file. Nothing anybody wrote is lost;
//! - one-way (`Push`, `Pull`): such a file is left untouched on both sides and reported;
//! - a file that disappeared on one side while a file with the same content appeared there
//!   (matched one to one) is a move: renamed on the other side, no bytes transferred. A folder
//!   moved locally with its contents becomes one server move.
//!
//! Names are compared as exact bytes: `a` and `A`, or an NFC and an NFD spelling of `é`, are
//! different names, as they are on Linux filesystems; a case-only rename is an ordinary move.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// Both ways, resolving conflicts with conflicted copies.
    Both,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Rename on the server (a folder with everything below it), if `from` is still at `rev`.
    MoveRemote {
        from: String,
        to: String,
        rev: i64,
    },
    /// Rename locally.
    MoveLocal {
        from: String,
        to: String,
    },
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
    /// Keep the local bytes of `path` as `copy` (renamed locally, then uploaded as a new file);
    /// the server's version of `path` is downloaded by a separate `Download`.
    ConflictCopy {
        path: String,
        copy: String,
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
    /// One-way only: both sides changed differently; left alone and reported.
    Conflict {
        path: String,
        reason: String,
    },
}

impl Action {
    /// The path the action is about (for a move: the destination).
    pub fn path(&self) -> &str {
        match self {
            Action::MoveRemote { to, .. } | Action::MoveLocal { to, .. } => to,
            Action::DeleteRemote { path, .. }
            | Action::DeleteLocal { path, .. }
            | Action::MkdirRemote { path }
            | Action::MkdirLocal { path }
            | Action::ConflictCopy { path, .. }
            | Action::Upload { path, .. }
            | Action::Download { path }
            | Action::Record { path }
            | Action::Forget { path }
            | Action::Conflict { path, .. } => path,
        }
    }

    fn phase(&self) -> u8 {
        match self {
            Action::MoveRemote { .. } | Action::MoveLocal { .. } => 0,
            Action::DeleteRemote { .. } | Action::DeleteLocal { .. } => 1,
            Action::ConflictCopy { .. } => 2,
            Action::MkdirRemote { .. } | Action::MkdirLocal { .. } => 3,
            _ => 4,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
}

impl Plan {
    /// How many files the plan deletes, locally or on the server (a server folder delete counts
    /// every file below it in `remote`).
    pub fn files_deleted(&self, remote: &RemoteTree) -> usize {
        self.actions
            .iter()
            .map(|a| match a {
                Action::DeleteLocal {
                    kind: EntryKind::File,
                    ..
                } => 1,
                Action::DeleteRemote { path, .. } => match remote.get(path) {
                    Some(e) if e.kind == EntryKind::Dir => {
                        let (lo, hi) = (format!("{path}/"), format!("{path}0"));
                        remote
                            .range(lo..hi)
                            .filter(|(_, e)| e.kind == EntryKind::File)
                            .count()
                    }
                    _ => 1,
                },
                _ => 0,
            })
            .sum()
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// False when the local scan was incomplete: then nothing is deleted on the server.
    pub allow_remote_delete: bool,
    /// What conflicted copies are called: `HOST's conflicted copy YYYY-MM-DD`.
    pub conflict_label: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_remote_delete: true,
            conflict_label: "conflicted copy".into(),
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

fn subtree<'a, V>(
    tree: &'a BTreeMap<String, V>,
    dir: &str,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    tree.range(format!("{dir}/")..format!("{dir}0"))
}

/// `name (LABEL).ext`, or with ` 2`, ` 3`… added inside the parentheses until `taken` says no.
pub fn conflict_name(path: &str, label: &str, taken: impl Fn(&str) -> bool) -> String {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, Some(e)),
        _ => (name, None),
    };
    for i in 1.. {
        let tag = if i == 1 {
            label.to_string()
        } else {
            format!("{label} {i}")
        };
        let file = match ext {
            Some(e) => format!("{stem} ({tag}).{e}"),
            None => format!("{stem} ({tag})"),
        };
        let candidate = match dir {
            Some(d) => format!("{d}/{file}"),
            None => file,
        };
        if !taken(&candidate) {
            return candidate;
        }
    }
    unreachable!("an unbounded loop returns")
}

/// One-to-one pairs of (gone, appeared) paths by content hash; ambiguous hashes pair nothing.
fn pair_by_hash(gone: Vec<(String, String)>, new: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut g: HashMap<String, Vec<String>> = HashMap::new();
    for (h, p) in gone {
        g.entry(h).or_default().push(p);
    }
    let mut n: HashMap<String, Vec<String>> = HashMap::new();
    for (h, p) in new {
        n.entry(h).or_default().push(p);
    }
    let mut pairs: Vec<(String, String)> = g
        .into_iter()
        .filter_map(
            |(h, mut from)| match (from.len(), n.get(&h).map(Vec::len)) {
                (1, Some(1)) => Some((from.pop()?, n[&h][0].clone())),
                _ => None,
            },
        )
        .collect();
    pairs.sort();
    pairs
}

/// Moves: files that vanished on one side while the same content appeared on that side.
fn detect_moves(
    local: &LocalStates,
    synced: &SyncedTree,
    remote: &RemoteTree,
    direction: Direction,
    handled: &mut BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let file_hash = |kind: EntryKind, h: &Option<String>| match (kind, h) {
        (EntryKind::File, Some(h)) => Some(h.clone()),
        _ => None,
    };
    if direction != Direction::Pull {
        // Gone locally but unchanged on the server; appeared locally and new to the server.
        let gone: Vec<_> = synced
            .iter()
            .filter(|(p, s)| {
                !local.contains_key(*p) && remote.get(*p).is_some_and(|r| remote_unchanged(r, s))
            })
            .filter_map(|(p, s)| Some((file_hash(s.kind, &s.content_hash)?, p.clone())))
            .collect();
        let new: Vec<_> = local
            .iter()
            .filter(|(p, _)| !synced.contains_key(*p) && !remote.contains_key(*p))
            .filter_map(|(p, l)| Some((file_hash(l.kind, &l.content_hash)?, p.clone())))
            .collect();
        let pairs = pair_by_hash(gone, new);
        let mut file_moves: BTreeMap<String, String> = pairs.into_iter().collect();
        // A folder that vanished whose every file moved under one new folder, with the same
        // relative names, is one folder move.
        let gone_dirs: Vec<String> = synced
            .iter()
            .filter(|(p, s)| {
                s.kind == EntryKind::Dir
                    && !local.contains_key(*p)
                    && remote.get(*p).is_some_and(|r| r.kind == EntryKind::Dir)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for d in gone_dirs {
            if handled.iter().any(|h| d.starts_with(&format!("{h}/"))) {
                continue;
            }
            let mut target: Option<String> = None;
            let ok = subtree(synced, &d).all(|(p, s)| {
                let rel = &p[d.len()..];
                match s.kind {
                    EntryKind::File => match file_moves.get(p) {
                        Some(to) if to.ends_with(rel) => {
                            let base = &to[..to.len() - rel.len()];
                            match &target {
                                None => {
                                    target = Some(base.to_string());
                                    true
                                }
                                Some(t) => t == base,
                            }
                        }
                        _ => false,
                    },
                    EntryKind::Dir => true,
                }
            });
            let Some(to) = target else { continue };
            let remote_all_synced = subtree(remote, &d)
                .all(|(p, r)| synced.get(p).is_some_and(|s| remote_unchanged(r, s)));
            let dirs_there = subtree(synced, &d).all(|(p, s)| {
                s.kind == EntryKind::File
                    || local
                        .get(&format!("{to}{}", &p[d.len()..]))
                        .is_some_and(|l| l.kind == EntryKind::Dir)
            });
            let fresh_target = local.get(&to).is_some_and(|l| l.kind == EntryKind::Dir)
                && !synced.contains_key(&to)
                && !remote.contains_key(&to);
            if ok && remote_all_synced && dirs_there && fresh_target {
                let rev = remote[&d].rev;
                handled.insert(d.clone());
                handled.insert(to.clone());
                for (p, _) in subtree(synced, &d) {
                    handled.insert(p.clone());
                    handled.insert(format!("{to}{}", &p[d.len()..]));
                    file_moves.remove(p);
                }
                actions.push(Action::MoveRemote { from: d, to, rev });
            }
        }
        for (from, to) in file_moves {
            let rev = remote[&from].rev;
            handled.insert(from.clone());
            handled.insert(to.clone());
            actions.push(Action::MoveRemote { from, to, rev });
        }
    }
    if direction != Direction::Push {
        // Gone on the server but unchanged locally; appeared on the server and new here.
        let gone: Vec<_> = synced
            .iter()
            .filter(|(p, s)| {
                !handled.contains(*p)
                    && !remote.contains_key(*p)
                    && local.get(*p).is_some_and(|l| same_local_synced(l, s))
            })
            .filter_map(|(p, s)| Some((file_hash(s.kind, &s.content_hash)?, p.clone())))
            .collect();
        let new: Vec<_> = remote
            .iter()
            .filter(|(p, _)| {
                !handled.contains(*p) && !synced.contains_key(*p) && !local.contains_key(*p)
            })
            .filter_map(|(p, r)| Some((file_hash(r.kind, &r.content_hash)?, p.clone())))
            .collect();
        for (from, to) in pair_by_hash(gone, new) {
            // The moved file keeps its executable bit; only move when it matches the remote's.
            if local[&from].executable != remote[&to].executable {
                continue;
            }
            handled.insert(from.clone());
            handled.insert(to.clone());
            actions.push(Action::MoveLocal { from, to });
        }
    }
    actions
}

/// Plans one run. See the module docs for the rules.
/// Every path of the three trees once, in order, with what each holds for it: a merge of their
/// sorted keys, with no set to build and no lookups (this loop runs over every file on every
/// sync, most often to find nothing to do).
fn merged<'a>(
    local: &'a LocalStates,
    synced: &'a SyncedTree,
    remote: &'a RemoteTree,
) -> impl Iterator<
    Item = (
        &'a String,
        Option<&'a LocalState>,
        Option<&'a SyncedEntry>,
        Option<&'a Entry>,
    ),
> {
    let (mut l, mut s, mut r) = (
        local.iter().peekable(),
        synced.iter().peekable(),
        remote.iter().peekable(),
    );
    std::iter::from_fn(move || {
        let next = [
            l.peek().map(|e| e.0),
            s.peek().map(|e| e.0),
            r.peek().map(|e| e.0),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some((
            next,
            l.next_if(|e| e.0 == next).map(|e| e.1),
            s.next_if(|e| e.0 == next).map(|e| e.1),
            r.next_if(|e| e.0 == next).map(|e| e.1),
        ))
    })
}

pub fn plan(
    local: &LocalStates,
    synced: &SyncedTree,
    remote: &RemoteTree,
    direction: Direction,
    opts: &Options,
) -> Plan {
    let mut handled = BTreeSet::new();
    let mut actions = detect_moves(local, synced, remote, direction, &mut handled);
    let mut copies: BTreeSet<String> = BTreeSet::new();
    for (path, l, s, r) in merged(local, synced, remote) {
        if handled.contains(path) {
            continue;
        }
        let p = path.clone();
        let one_way_conflict = |reason: &str| Action::Conflict {
            path: path.clone(),
            reason: reason.to_string(),
        };
        // Two-way conflicts keep both sides: a local file is kept under a conflicted-copy name
        // and the server's version takes the name; a local folder where the server has a file
        // keeps the name and the server's file is moved aside on the server.
        let mut resolve = |actions: &mut Vec<Action>, l: &LocalState, r: &Entry| {
            let copy = conflict_name(path, &opts.conflict_label, |c| {
                local.contains_key(c)
                    || synced.contains_key(c)
                    || remote.contains_key(c)
                    || copies.contains(c)
            });
            copies.insert(copy.clone());
            if l.kind == EntryKind::File {
                actions.push(Action::ConflictCopy {
                    path: path.clone(),
                    copy,
                });
                actions.push(create_local(path.clone(), r));
            } else {
                actions.push(Action::MoveRemote {
                    from: path.clone(),
                    to: copy,
                    rev: r.rev,
                });
                actions.push(Action::MkdirRemote { path: path.clone() });
            }
        };
        let push = direction != Direction::Pull;
        let pull = direction != Direction::Push;
        match (l, s, r) {
            (None, None, _) if !pull => {}
            (_, None, None) if !push => {}
            (None, None, None) => {}
            (Some(l), None, None) => actions.push(create_remote(p, l, None)),
            (None, None, Some(r)) => actions.push(create_local(p, r)),
            (Some(l), None, Some(r)) => {
                if same_local_remote(l, r) {
                    actions.push(Action::Record { path: p });
                } else if direction == Direction::Both {
                    resolve(&mut actions, l, r);
                } else {
                    actions.push(one_way_conflict(if direction == Direction::Pull {
                        "a different local file is in the way"
                    } else {
                        "exists on the server with other content"
                    }));
                }
            }
            (Some(l), Some(s), None) => {
                // Deleted on the server: an unchanged copy goes too; an edited one wins over
                // the delete and goes back up.
                if same_local_synced(l, s) {
                    if pull {
                        actions.push(Action::DeleteLocal {
                            path: p,
                            kind: l.kind,
                        });
                    }
                } else if push {
                    actions.push(create_remote(p, l, None));
                }
            }
            (None, Some(s), Some(r)) => {
                if remote_unchanged(r, s) {
                    if push && opts.allow_remote_delete {
                        actions.push(Action::DeleteRemote {
                            path: p,
                            rev: r.rev,
                        });
                    }
                } else if pull {
                    actions.push(create_local(p, r));
                }
            }
            (None, Some(_), None) => actions.push(Action::Forget { path: p }),
            (Some(l), Some(s), Some(r)) => {
                let local_changed = !same_local_synced(l, s);
                let remote_changed = !remote_unchanged(r, s);
                match (local_changed, remote_changed) {
                    (false, false) => {}
                    (true, false) if push => {
                        if l.kind != r.kind {
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
                    (false, true) if pull => {
                        if l.kind != r.kind {
                            actions.push(Action::DeleteLocal {
                                path: p.clone(),
                                kind: l.kind,
                            });
                            actions.push(create_local(p, r));
                        } else if r.kind == EntryKind::File {
                            actions.push(Action::Download { path: p });
                        }
                    }
                    (true, true) => {
                        if same_local_remote(l, r) {
                            actions.push(Action::Record { path: p });
                        } else if direction == Direction::Both {
                            resolve(&mut actions, l, r);
                        } else {
                            actions
                                .push(one_way_conflict("changed both locally and on the server"));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    prune_folder_deletes(&mut actions, local, remote);
    actions.sort_by(|a, b| {
        let key = |x: &Action| {
            let d = depth(x.path());
            let d = match x.phase() {
                1 => usize::MAX - d,
                3 => d,
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

/// A folder is deleted only when everything below it on that side goes too (deleted or moved
/// away); then a server folder delete covers what is below it (one request for a subtree).
fn prune_folder_deletes(actions: &mut Vec<Action>, local: &LocalStates, remote: &RemoteTree) {
    let mut gone_remote = BTreeSet::new();
    let mut gone_local = BTreeSet::new();
    for a in actions.iter() {
        match a {
            Action::DeleteRemote { path, .. } => {
                gone_remote.insert(path.clone());
            }
            Action::MoveRemote { from, .. } => {
                gone_remote.insert(from.clone());
                for (p, _) in subtree(remote, from) {
                    gone_remote.insert(p.clone());
                }
            }
            Action::DeleteLocal { path, .. } => {
                gone_local.insert(path.clone());
            }
            Action::MoveLocal { from, .. } => {
                gone_local.insert(from.clone());
            }
            _ => {}
        }
    }
    let remote_dir = |p: &str| remote.get(p).is_some_and(|e| e.kind == EntryKind::Dir);
    let kept_remote: BTreeSet<String> = gone_remote
        .iter()
        .filter(|p| remote_dir(p) && subtree(remote, p).all(|(q, _)| gone_remote.contains(q)))
        .cloned()
        .collect();
    let kept_local: BTreeSet<String> = gone_local
        .iter()
        .filter(|p| {
            local.get(*p).is_some_and(|e| e.kind == EntryKind::Dir)
                && subtree(local, p).all(|(q, _)| gone_local.contains(q))
        })
        .cloned()
        .collect();
    let covered = |path: &str| {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            if kept_remote.contains(parent) {
                return true;
            }
            p = parent;
        }
        false
    };
    let mut out = Vec::with_capacity(actions.len());
    for a in actions.drain(..) {
        match &a {
            Action::DeleteRemote { path, .. }
                if remote_dir(path) && !kept_remote.contains(path) =>
            {
                continue
            }
            Action::DeleteLocal {
                path,
                kind: EntryKind::Dir,
            } if !kept_local.contains(path) => continue,
            // Server folder deletes are recursive, so what lies below is covered.
            Action::DeleteRemote { path, .. } if covered(path) => {
                out.push(Action::Forget { path: path.clone() });
                continue;
            }
            _ => {}
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
            block_lens: vec![],
            block_fps: vec![],
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
        plan(&lt, &st, &rt, d, &Options::default()).actions
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
    fn merged_visits_every_path_once_in_order() {
        let f = file("h");
        let local: LocalStates = ["a", "c", "d/x"].map(|p| (p.to_string(), f.clone())).into();
        let synced: SyncedTree = ["b", "c"].map(|p| (p.to_string(), synced(&f, 1))).into();
        let remote: RemoteTree = ["a", "d", "d/x", "e"]
            .map(|p| (p.to_string(), remote(p, &f, 1)))
            .into();
        let seen: Vec<(&str, bool, bool, bool)> = merged(&local, &synced, &remote)
            .map(|(p, l, s, r)| (p.as_str(), l.is_some(), s.is_some(), r.is_some()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", true, false, true),
                ("b", false, true, false),
                ("c", true, true, false),
                ("d", false, false, true),
                ("d/x", true, false, true),
                ("e", false, false, true),
            ]
        );
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
            &Options {
                allow_remote_delete: false,
                ..Options::default()
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
        plan(&lt, &st, &rt, d, &Options::default()).actions
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

    #[test]
    fn two_way_table() {
        use Direction::Both;
        let a = file("a");
        let b = file("b");
        let c = file("c");
        let s = Some((a.clone(), 3));
        let r = Some((b.clone(), 5));
        let copy = |actions: &[Action]| {
            assert_eq!(
                actions,
                &[
                    Action::ConflictCopy {
                        path: "f".into(),
                        copy: "f (conflicted copy)".into()
                    },
                    down()
                ]
            )
        };
        let none: Vec<Action> = vec![];
        assert_eq!(run(Some(a.clone()), s.clone(), s.clone(), Both), none);
        assert_eq!(
            run(Some(c.clone()), s.clone(), s.clone(), Both),
            vec![up(Some(3))]
        );
        assert_eq!(
            run(Some(a.clone()), s.clone(), r.clone(), Both),
            vec![down()]
        );
        assert_eq!(
            run(Some(b.clone()), s.clone(), r.clone(), Both),
            vec![rec()]
        );
        copy(&run(Some(c.clone()), s.clone(), r.clone(), Both));
        copy(&run(Some(a.clone()), None, r.clone(), Both));
        assert_eq!(run(Some(a.clone()), None, None, Both), vec![up(None)]);
        assert_eq!(run(None, None, r.clone(), Both), vec![down()]);
        // edit beats delete, both ways
        assert_eq!(run(Some(c.clone()), s.clone(), None, Both), vec![up(None)]);
        assert_eq!(run(None, s.clone(), r.clone(), Both), vec![down()]);
        // unchanged on one side, deleted on the other: the delete goes through
        assert_eq!(
            run(Some(a.clone()), s.clone(), None, Both),
            vec![Action::DeleteLocal {
                path: "f".into(),
                kind: EntryKind::File
            }]
        );
        assert_eq!(
            run(None, s.clone(), s.clone(), Both),
            vec![Action::DeleteRemote {
                path: "f".into(),
                rev: 3
            }]
        );
        assert_eq!(run(None, s.clone(), None, Both), vec![forget()]);
    }

    #[test]
    fn conflict_names() {
        let none = |_: &str| false;
        assert_eq!(conflict_name("d/report.pdf", "L", none), "d/report (L).pdf");
        assert_eq!(conflict_name(".bashrc", "L", none), ".bashrc (L)");
        assert_eq!(conflict_name("a.tar.gz", "L", none), "a.tar (L).gz");
        assert_eq!(
            conflict_name("x.txt", "L", |c| c == "x (L).txt"),
            "x (L 2).txt"
        );
    }

    #[test]
    fn local_rename_is_a_server_move() {
        let a = file("a");
        let synced_ = [("old.txt", a.clone())];
        let local = [("new.txt", a.clone())];
        for d in [Direction::Push, Direction::Both] {
            assert_eq!(
                tree_case(&local, &synced_, &synced_, d),
                vec![Action::MoveRemote {
                    from: "old.txt".into(),
                    to: "new.txt".into(),
                    rev: 1
                }]
            );
        }
    }

    #[test]
    fn remote_rename_is_a_local_move() {
        let a = file("a");
        let synced_ = [("old.txt", a.clone())];
        let remote_ = [("new.txt", a.clone())];
        for d in [Direction::Pull, Direction::Both] {
            assert_eq!(
                tree_case(&synced_, &synced_, &remote_, d),
                vec![Action::MoveLocal {
                    from: "old.txt".into(),
                    to: "new.txt".into()
                }]
            );
        }
    }

    #[test]
    fn ambiguous_content_is_not_a_move() {
        let a = file("a");
        let synced_ = [("x1", a.clone()), ("x2", a.clone())];
        let local = [("y1", a.clone()), ("y2", a.clone())];
        let acts = tree_case(&local, &synced_, &synced_, Direction::Push);
        assert!(acts.iter().all(|a| !matches!(a, Action::MoveRemote { .. })));
    }

    #[test]
    fn folder_rename_is_one_server_move() {
        let (x, z) = (file("x"), file("z"));
        let synced_ = [
            ("d", dir()),
            ("d/x", x.clone()),
            ("d/y", dir()),
            ("d/y/z", z.clone()),
        ];
        let local = [
            ("e", dir()),
            ("e/x", x.clone()),
            ("e/y", dir()),
            ("e/y/z", z.clone()),
        ];
        let acts = tree_case(&local, &synced_, &synced_, Direction::Both);
        assert_eq!(
            acts,
            vec![Action::MoveRemote {
                from: "d".into(),
                to: "e".into(),
                rev: 1
            }]
        );
    }

    #[test]
    fn deletes_are_counted_for_the_guard() {
        let a = file("a");
        let all = [
            ("d", dir()),
            ("d/x", a.clone()),
            ("d/y", file("y")),
            ("z", file("z")),
        ];
        let rt: RemoteTree = all
            .iter()
            .map(|(p, l)| (p.to_string(), remote(p, l, 1)))
            .collect();
        let st: SyncedTree = all
            .iter()
            .map(|(p, l)| (p.to_string(), synced(l, 1)))
            .collect();
        let p = plan(
            &LocalStates::new(),
            &st,
            &rt,
            Direction::Both,
            &Options::default(),
        );
        assert_eq!(p.files_deleted(&rt), 3);
    }

    /// Every combination of {unchanged, modified, deleted, moved} locally × on the server for a
    /// synced file `f` (content "a", revision 1), two-way. Moves go to `h` locally and `g` on the
    /// server. Each row: the local and remote change, then the actions, as (kind, path) pairs.
    #[test]
    fn two_way_change_matrix() {
        #[derive(Clone, Copy, Debug)]
        enum C {
            Unchanged,
            Modified,
            Deleted,
            Moved,
        }
        use C::*;
        let side = |c: C, moved_to: &str, new_hash: &str| -> Vec<(String, LocalState)> {
            match c {
                Unchanged => vec![("f".into(), file("a"))],
                Modified => vec![("f".into(), file(new_hash))],
                Deleted => vec![],
                Moved => vec![(moved_to.into(), file("a"))],
            }
        };
        type Row<'a> = (C, C, &'a [(&'a str, &'a str)]);
        let rows: &[Row] = &[
            (Unchanged, Unchanged, &[]),
            (Unchanged, Modified, &[("download", "f")]),
            (Unchanged, Deleted, &[("delete_local", "f")]),
            (Unchanged, Moved, &[("move_local", "g")]),
            (Modified, Unchanged, &[("upload", "f")]),
            (
                Modified,
                Modified,
                &[("conflict_copy", "f"), ("download", "f")],
            ),
            (Modified, Deleted, &[("upload", "f")]),
            (Modified, Moved, &[("upload", "f"), ("download", "g")]),
            (Deleted, Unchanged, &[("delete_remote", "f")]),
            (Deleted, Modified, &[("download", "f")]),
            (Deleted, Deleted, &[("forget", "f")]),
            (Deleted, Moved, &[("forget", "f"), ("download", "g")]),
            (Moved, Unchanged, &[("move_remote", "h")]),
            (Moved, Modified, &[("download", "f"), ("upload", "h")]),
            (Moved, Deleted, &[("forget", "f"), ("upload", "h")]),
            (
                Moved,
                Moved,
                &[("forget", "f"), ("download", "g"), ("upload", "h")],
            ),
        ];
        for (lc, rc, expected) in rows {
            let local: LocalStates = side(*lc, "h", "b").into_iter().collect();
            let remote: RemoteTree = side(*rc, "g", "c")
                .into_iter()
                .map(|(p, l)| {
                    let rev = if matches!(rc, Unchanged) { 1 } else { 2 };
                    (p.clone(), super::tests::remote(&p, &l, rev))
                })
                .collect();
            let mut synced_ = SyncedTree::new();
            synced_.insert("f".into(), synced(&file("a"), 1));
            let acts = plan(
                &local,
                &synced_,
                &remote,
                Direction::Both,
                &Options::default(),
            )
            .actions;
            let got: Vec<(&str, &str)> = acts
                .iter()
                .map(|a| {
                    let kind = match a {
                        Action::MoveRemote { .. } => "move_remote",
                        Action::MoveLocal { .. } => "move_local",
                        Action::DeleteRemote { .. } => "delete_remote",
                        Action::DeleteLocal { .. } => "delete_local",
                        Action::MkdirRemote { .. } => "mkdir_remote",
                        Action::MkdirLocal { .. } => "mkdir_local",
                        Action::ConflictCopy { .. } => "conflict_copy",
                        Action::Upload { .. } => "upload",
                        Action::Download { .. } => "download",
                        Action::Record { .. } => "record",
                        Action::Forget { .. } => "forget",
                        Action::Conflict { .. } => "conflict",
                    };
                    (kind, a.path())
                })
                .collect();
            assert_eq!(&got[..], *expected, "local {lc:?} × remote {rc:?}");
        }
    }

    /// Folders: deleted on one side while the other side added a file inside: the file and
    /// the folder survive; deleted on one side and untouched on the other: gone everywhere.
    #[test]
    fn two_way_folder_matrix() {
        let a = file("a");
        let synced_ = [("d", dir()), ("d/x", a.clone())];
        // deleted locally, a file added inside on the server
        let remote_ = [("d", dir()), ("d/x", a.clone()), ("d/new", file("n"))];
        let acts = tree_case(&[], &synced_, &remote_, Direction::Both);
        assert_eq!(
            acts,
            vec![
                Action::DeleteRemote {
                    path: "d/x".into(),
                    rev: 1
                },
                Action::Download {
                    path: "d/new".into()
                }
            ]
        );
        // deleted on the server, a file added inside locally
        let local = [("d", dir()), ("d/x", a.clone()), ("d/mine", file("m"))];
        let acts = tree_case(&local, &synced_, &[], Direction::Both);
        assert_eq!(
            acts,
            vec![
                Action::DeleteLocal {
                    path: "d/x".into(),
                    kind: EntryKind::File
                },
                Action::Upload {
                    path: "d/mine".into(),
                    parent_rev: None
                }
            ]
        );
        // deleted on one side, untouched on the other
        let acts = tree_case(&[], &synced_, &synced_, Direction::Both);
        assert_eq!(
            acts,
            vec![
                Action::DeleteRemote {
                    path: "d".into(),
                    rev: 1
                },
                Action::Forget { path: "d/x".into() }
            ]
        );
        let acts = tree_case(&synced_, &synced_, &[], Direction::Both);
        assert_eq!(
            acts,
            vec![
                Action::DeleteLocal {
                    path: "d/x".into(),
                    kind: EntryKind::File
                },
                Action::DeleteLocal {
                    path: "d".into(),
                    kind: EntryKind::Dir
                }
            ]
        );
        // a local folder where the server now has a file: the server's file is moved aside
        let local = [("p", dir())];
        let remote_ = [("p", file("r"))];
        let acts = tree_case(&local, &[], &remote_, Direction::Both);
        assert_eq!(
            acts,
            vec![
                Action::MoveRemote {
                    from: "p".into(),
                    to: "p (conflicted copy)".into(),
                    rev: 1
                },
                Action::MkdirRemote { path: "p".into() }
            ]
        );
    }
}
