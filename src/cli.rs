//! The one definition of the command-line surface (clap derive). Completions and the man page
//! are generated from it (`completions/`, `man/`); a test fails when the checked-in copies drift.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    error (including conflicts left for you to resolve, and a full disk)
  2    usage error
  3    not logged in, bad token or permission denied
  4    not found
  5    server unreachable or temporarily unavailable (worth a retry)
  130  interrupted

Environment:
  DBX_SERVER    server URL, overriding the folder's and the default login's
  DBX_TOKEN     bearer token, overriding the stored one
  DBX_KEYRING   `file`: keep tokens in a 0600 file, not in the OS keyring
  DBX_DEVICE    the device name `dbx login` gives the server (default: the host name)
  DBX_SHA_EXTENSIONS
                `0` or `1`: hash and verify as on a CPU without or with SHA-NI (default:
                detected; the same results, only the speed differs)
  DBX_DIRECT_IO `0`: no direct I/O (O_DIRECT) for pulled big files and the server's block
                files, all through the page cache (default: direct where the filesystem
                allows it)
  NO_COLOR      disables colours";

#[derive(Debug, Parser)]
#[command(
    name = "dbx",
    version,
    about = "File storage and sync: the client and the server in one binary",
    long_about = "dbx keeps folders in sync through a dbx server (`dbx serve`), storing files as \
                  content-defined, deduplicated blocks with a journal of every change.",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Print one JSON document on stdout (JSON lines for streams)
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more detail (repeat for debug logs)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Act on the synced folder holding DIR instead of the current directory
    #[arg(short = 'C', long = "dir", global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: block store, metadata and journal
    ///
    /// On Linux with glibc the server runs with `MALLOC_ARENA_MAX=2` (fewer malloc arenas keep
    /// less freed memory) unless `MALLOC_ARENA_MAX` is set.
    Serve(ServeArgs),
    /// Administer a server's users (acts on the data directory directly)
    Admin(AdminArgs),
    /// Log in to a server and store the token
    Login(LoginArgs),
    /// Forget a stored login
    Logout(LogoutArgs),
    /// Make a folder a synced folder
    Init(InitArgs),
    /// Send local changes to the server (new, modified and deleted files)
    Push(TransferArgs),
    /// Bring server changes into the local folder
    Pull(TransferArgs),
    /// Sync both ways: local changes up, server changes down; conflicts become conflicted copies
    Sync(TransferArgs),
    /// Show what `dbx sync` would do, changing nothing
    Status,
    /// Sync continuously: on local changes and on changes from other devices
    Watch(WatchArgs),
    /// Print a file from the server (all of it, or a byte range), streamed
    Cat(CatArgs),
    /// Every revision of a file (or, with --all, the recent changes in a folder)
    History(HistoryArgs),
    /// Bring back a revision of a file, or rewind a folder to a moment
    Restore(RestoreArgs),
    /// List files on the server
    Ls(LsArgs),
    /// Print a shell completion script (e.g. `dbx completions bash > /etc/bash_completion.d/dbx`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port and prints it)
    #[arg(long, default_value = "127.0.0.1:8750", env = "DBX_LISTEN")]
    pub listen: String,
    /// Data directory: SQLite `meta.db` and `blocks/`
    #[arg(long, default_value = "./dbx-data", env = "DBX_DATA")]
    pub data: PathBuf,
    /// Keep every version of every file this many days (`dbx admin gc` frees older ones)
    #[arg(long, value_name = "DAYS")]
    pub retention: Option<f64>,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server's data directory
    #[arg(long, default_value = "./dbx-data", env = "DBX_DATA", global = true)]
    pub data: PathBuf,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manage users
    #[command(subcommand)]
    User(UserCommand),
    /// Delete blocks no retained version references (safe while the server runs)
    ///
    /// Small blocks live in pack files (one per upload batch); their space comes back when a
    /// pack at least a quarter dead is rewritten without them, which gc does last, leaving
    /// alone packs written within the grace period.
    Gc {
        /// Report what would be freed, delete nothing
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Versions are kept this many days (default: the server's `--retention`, else 180)
        #[arg(long, value_name = "DAYS")]
        retention: Option<f64>,
        /// Uploaded blocks not yet committed are kept this many hours
        #[arg(long, value_name = "HOURS", default_value_t = 24.0)]
        grace: f64,
    },
    /// Check that every block of every retained version exists (and, with --read-data, is
    /// intact); changes nothing
    Fsck {
        /// Read and hash every block, not only check it exists
        #[arg(long)]
        read_data: bool,
        /// Versions are kept this many days (default: the server's `--retention`, else 180)
        #[arg(long, value_name = "DAYS")]
        retention: Option<f64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user (with its own root folder)
    Add {
        name: String,
        /// Read the password from standard input instead of prompting
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users
    List,
    /// Set a user's password
    Passwd {
        name: String,
        /// Read the password from standard input instead of prompting
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a user and revoke its tokens
    Disable { name: String },
    /// Enable a disabled user
    Enable { name: String },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Server URL, e.g. http://127.0.0.1:8750
    pub url: String,
    /// User name
    #[arg(long, short)]
    pub user: String,
    /// Read the password from standard input instead of prompting
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Server URL (default: the default login's)
    pub url: Option<String>,
    /// User name (default: the default login's)
    #[arg(long, short)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The folder to sync (created if missing; default: the current directory)
    pub dir: Option<PathBuf>,
    /// The server folder to mirror
    #[arg(long, default_value = "/")]
    pub remote: String,
    /// Server URL (default: the default login's)
    #[arg(long)]
    pub server: Option<String>,
    /// User (default: the default login's)
    #[arg(long, short)]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Show what would change, change nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Stop before deleting more than N files (default: stop before deleting more than 100
    /// files that are also more than half of the folder)
    #[arg(long, value_name = "N")]
    pub max_delete: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    /// A file: local path in the synced folder, or server path starting with `/`
    pub path: String,
    /// Only bytes START to END (inclusive, from 0), as `START-END`, `START-` or `-LAST_N`
    #[arg(long, value_name = "START-END")]
    pub range: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// A file (local path, or server path starting with `/`); with --all, a folder
    pub path: Option<String>,
    /// Show the journal of the folder (default: the synced folder) instead of one file
    #[arg(long)]
    pub all: bool,
    /// Show at most N entries
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["rev", "at"])))]
pub struct RestoreArgs {
    /// A file (with --rev) or folder (with --at): local path, or server path starting with `/`
    pub path: String,
    /// The revision to bring back (see `dbx history`)
    #[arg(long)]
    pub rev: Option<i64>,
    /// Rewind everything below PATH to this moment: RFC 3339 (2026-11-26T10:00:00Z) or
    /// "2 hours ago"
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Print the plan, change nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The synced folder (default: the one holding the current directory)
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Server path (default: the synced folder's remote root, or `/`)
    pub path: Option<String>,
    /// List everything below, not only direct children
    #[arg(long, short = 'R')]
    pub recursive: bool,
}

/// The generated files kept in the repository: completions for bash, zsh and fish, and the man
/// pages (one per command), as (path relative to the crate root, contents).
#[cfg(test)]
pub fn generated_files() -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    for (shell, name) in [
        (clap_complete::Shell::Bash, "dbx.bash"),
        (clap_complete::Shell::Zsh, "_dbx"),
        (clap_complete::Shell::Fish, "dbx.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "dbx", &mut buf);
        out.push((PathBuf::from("completions").join(name), buf));
    }
    let dir = tempfile::tempdir()?;
    clap_mangen::generate_to(Cli::command(), dir.path())?;
    let mut pages: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    for p in pages {
        let name = p.file_name().expect("a page has a name").to_owned();
        out.push((PathBuf::from("man").join(name), std::fs::read(&p)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Completions and man pages are generated from this file; the checked-in copies must match.
    /// Regenerate with `DBX_BLESS=1 cargo test generated_files`.
    #[test]
    fn generated_files_are_up_to_date() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let bless = std::env::var_os("DBX_BLESS").is_some();
        let mut stale = Vec::new();
        for (rel, contents) in generated_files().unwrap() {
            let path = root.join(&rel);
            if std::fs::read(&path).ok().as_deref() != Some(&contents[..]) {
                if bless {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &contents).unwrap();
                } else {
                    stale.push(rel.display().to_string());
                }
            }
        }
        assert!(
            stale.is_empty(),
            "out of date: {stale:?}; run `DBX_BLESS=1 cargo test generated_files` and commit"
        );
    }
}
