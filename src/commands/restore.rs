//! `dbx restore PATH --rev REV` (one file) and `dbx restore DIR --at TIME` (rewind a folder).
//! Restoring never rewrites history: every change is a new journal entry, so a restore can be
//! undone like any other change. The local folder gets the result on its next sync.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use super::{fail, open_folder, server_path};
use crate::cli::{GlobalArgs, RestoreArgs};
use crate::engine::remote::{Remote, RemoteError};
use crate::exit;
use crate::output::Printer;
use crate::protocol::{EntryKind, JournalEntry, JournalOp};
use crate::timefmt::{datetime_utc, now_secs, parse_time};

#[derive(Debug, Serialize)]
struct Step {
    action: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rev: Option<i64>,
}

pub async fn run(args: RestoreArgs, g: &GlobalArgs, printer: Printer) -> Result<u8> {
    let (folder, remote) = open_folder(g)?;
    let path = server_path(&folder, g, &args.path)?;
    if let Some(rev) = args.rev {
        if args.dry_run {
            printer.line(format!("restore /{path} to revision {rev}"));
            printer.json(&json!({"dry_run": true, "plan": [{"action": "restore", "path": format!("/{path}"), "rev": rev}]}));
            return Ok(exit::OK);
        }
        let resp = remote.restore(&path, rev).await?;
        printer.line(format!(
            "Restored /{path} to revision {rev} (now revision {}); `dbx sync` brings it here",
            resp.rev
        ));
        printer.json(&json!({"path": format!("/{path}"), "restored_rev": rev, "rev": resp.rev}));
        return Ok(exit::OK);
    }
    let at = args.at.as_deref().unwrap_or_default();
    let when = parse_time(at, now_secs()).map_err(|e| fail(exit::USAGE, e))?;
    let plan = rewind_plan(&remote, &path, when).await?;
    for s in &plan {
        printer.line(match s.rev {
            Some(rev) => format!("{:<8} {} (revision {rev})", s.action, s.path),
            None => format!("{:<8} {}", s.action, s.path),
        });
    }
    if plan.is_empty() {
        printer.line(format!(
            "/{path} is already as it was at {} UTC",
            datetime_utc(when)
        ));
    }
    if !args.dry_run {
        for s in &plan {
            let p = &s.path[1..];
            match s.action {
                "delete" => match remote.delete(p, None).await {
                    Ok(_) | Err(RemoteError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                },
                "mkdir" => {
                    remote.mkdir(p).await?;
                }
                _ => {
                    remote.restore(p, s.rev.unwrap_or_default()).await?;
                }
            }
        }
        if !plan.is_empty() {
            printer.line(format!(
                "Rewound /{path} to {} UTC; deleted files stay in `dbx history`",
                datetime_utc(when)
            ));
        }
    }
    printer.json(&json!({"dry_run": args.dry_run, "at": when, "plan": plan}));
    Ok(exit::OK)
}

fn inside(dir: &str, p: &str) -> bool {
    dir.is_empty() || p == dir || p.starts_with(&format!("{dir}/"))
}

/// What rewinding `dir` to `when` takes: replay the journal up to `when`, compare with now.
async fn rewind_plan(remote: &Remote, dir: &str, when: i64) -> Result<Vec<Step>> {
    let mut then: BTreeMap<String, JournalEntry> = BTreeMap::new();
    let mut cursor = 0;
    'pages: loop {
        let page = remote.journal(cursor, 1000).await?;
        for e in page.entries {
            if e.time > when {
                break 'pages;
            }
            if let Some(old) = &e.old_path {
                then.remove(old);
            }
            if e.op == JournalOp::Delete {
                then.remove(&e.path);
            } else {
                then.insert(e.path.clone(), e);
            }
        }
        cursor = page.cursor;
        if !page.has_more {
            break;
        }
    }
    then.retain(|p, _| inside(dir, p) && p != dir);
    let now: BTreeMap<String, crate::protocol::Entry> = match remote.list(dir, true).await {
        Ok(l) => l.entries.into_iter().map(|e| (e.path.clone(), e)).collect(),
        Err(RemoteError::NotFound(_)) => BTreeMap::new(),
        Err(e) => return Err(e.into()),
    };
    let mut plan = Vec::new();
    // What did not exist then goes (a folder with everything below it, once).
    let mut deleted_dirs: Vec<String> = Vec::new();
    for (p, e) in &now {
        // What existed then as the same kind stays (and is restored below if it changed);
        // what did not, or was a file where a folder is now (or the reverse), goes first.
        let same_kind = then.get(p).is_some_and(|t| t.kind == e.kind);
        if same_kind || deleted_dirs.iter().any(|d| p.starts_with(&format!("{d}/"))) {
            continue;
        }
        if e.kind == EntryKind::Dir {
            deleted_dirs.push(p.clone());
        }
        plan.push(Step {
            action: "delete",
            path: format!("/{p}"),
            rev: None,
        });
    }
    for (p, e) in &then {
        // Anything of another kind at this path was deleted above.
        let current = now.get(p).filter(|c| c.kind == e.kind);
        match e.kind {
            EntryKind::Dir => {
                if current.is_none_or(|c| c.kind != EntryKind::Dir) {
                    plan.push(Step {
                        action: "mkdir",
                        path: format!("/{p}"),
                        rev: None,
                    });
                }
            }
            EntryKind::File => {
                let same = current.is_some_and(|c| {
                    c.kind == EntryKind::File
                        && c.content_hash == e.content_hash
                        && c.executable == e.executable
                });
                if !same {
                    plan.push(Step {
                        action: "restore",
                        path: format!("/{p}"),
                        rev: Some(e.id),
                    });
                }
            }
        }
    }
    Ok(plan)
}
