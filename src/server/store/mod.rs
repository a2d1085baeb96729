//! `MetaStore`: users, tokens, namespaces, the live tree and the journal.
//!
//! Invariants every implementation keeps:
//! - a commit is one transaction: it checks that every referenced block is recorded (and block
//!   rows are written only after the bytes are durable, see `blobs`), the parent revision, and
//!   the path's ancestors, then appends journal rows and updates the tree, or changes nothing;
//! - journal ids increase per namespace with no gaps; a file's `rev` is the id of the journal row
//!   that last changed it;
//! - passwords and tokens are stored only as hashes.

pub mod sqlite;

use std::collections::HashSet;
use std::future::Future;

use crate::protocol::{CommitRequest, Committed, Entry, JournalEntry};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict {
        message: String,
        current_rev: Option<i64>,
    },
    #[error("{0}")]
    PathConflict(String),
    #[error("{} referenced block(s) are not on the server", .0.len())]
    MissingBlocks(Vec<String>),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub disabled: bool,
    pub root_ns: i64,
    pub quota_bytes: Option<i64>,
    pub created_at: i64,
}

/// Who is making a change, recorded in the journal.
#[derive(Clone, Debug)]
pub struct Actor {
    pub user_id: i64,
    pub device: Option<String>,
}

pub trait MetaStore: Send + Sync + 'static {
    /// A random id made when the metadata was created; clients notice a restore or a rebuild.
    fn epoch(&self) -> impl Future<Output = StoreResult<String>> + Send;

    /// The id of the namespace's newest journal row (0 when empty).
    fn head(&self, ns: i64) -> impl Future<Output = StoreResult<i64>> + Send;

    fn user_count(&self) -> impl Future<Output = StoreResult<i64>> + Send;
    /// Creates a user and its root namespace.
    fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        quota_bytes: Option<i64>,
    ) -> impl Future<Output = StoreResult<User>> + Send;
    fn list_users(&self) -> impl Future<Output = StoreResult<Vec<User>>> + Send;
    /// The user and its password hash.
    fn user_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = StoreResult<Option<(User, String)>>> + Send;
    fn set_password(
        &self,
        name: &str,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Disables or enables a user; disabling also revokes every token it holds.
    fn set_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    fn create_token(
        &self,
        user_id: i64,
        token_hash: &str,
        device: Option<&str>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn user_by_token(
        &self,
        token_hash: &str,
    ) -> impl Future<Output = StoreResult<Option<(User, Option<String>)>>> + Send;

    /// Of `hashes`, those the user may already read (referenced by a file in one of its
    /// namespaces, or uploaded by the user itself), with their sizes.
    fn readable_blocks(
        &self,
        user: &User,
        hashes: &[String],
    ) -> impl Future<Output = StoreResult<std::collections::HashMap<String, u64>>> + Send;
    /// Of `hashes`, those whose bytes the server holds (whoever uploaded them).
    fn existing_blocks(
        &self,
        hashes: &[String],
    ) -> impl Future<Output = StoreResult<HashSet<String>>> + Send;
    /// The sizes of these blocks (those the server holds).
    fn block_sizes(
        &self,
        hashes: &[String],
    ) -> impl Future<Output = StoreResult<std::collections::HashMap<String, u64>>> + Send;
    /// Records, in one transaction, that the blob store durably holds these blocks (call only
    /// after the bytes are durable) and that `user_id` proved possession of them.
    fn record_blocks(
        &self,
        blocks: &[(String, u64)],
        user_id: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Commits a file: see the module invariants. Returns the new revision and cursor.
    fn commit_file(
        &self,
        ns: i64,
        actor: &Actor,
        req: &CommitRequest,
    ) -> impl Future<Output = StoreResult<(i64, i64)>> + Send;
    /// Commits several files in one transaction (one durable write), each on its own: one
    /// refused commit does not affect the others.
    fn commit_files(
        &self,
        ns: i64,
        actor: &Actor,
        reqs: &[CommitRequest],
    ) -> impl Future<Output = StoreResult<Vec<StoreResult<Committed>>>> + Send;
    /// Creates a folder (and any missing ancestors). Idempotent.
    fn mkdir(
        &self,
        ns: i64,
        actor: &Actor,
        path: &str,
    ) -> impl Future<Output = StoreResult<(i64, i64)>> + Send;
    /// Deletes a file, or a folder and everything below it. Returns (cursor, entries deleted).
    fn delete(
        &self,
        ns: i64,
        actor: &Actor,
        path: &str,
        parent_rev: Option<i64>,
    ) -> impl Future<Output = StoreResult<(i64, u64)>> + Send;
    /// Moves a file, or a folder and everything below it, to `to` (which must not exist).
    /// One MOVE journal row per entry moved. Returns the moved entry's new revision and cursor.
    fn move_path(
        &self,
        ns: i64,
        actor: &Actor,
        from: &str,
        to: &str,
        parent_rev: Option<i64>,
    ) -> impl Future<Output = StoreResult<(i64, i64)>> + Send;
    /// Makes a past version (journal row `rev` of `path`) the current content: a new RESTORE
    /// row; history is never rewritten.
    fn restore(
        &self,
        ns: i64,
        actor: &Actor,
        path: &str,
        rev: i64,
    ) -> impl Future<Output = StoreResult<(i64, i64)>> + Send;
    /// Journal rows that touched `path` (as its path, or moving it away), newest first.
    fn history(
        &self,
        ns: i64,
        path: &str,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<JournalEntry>>> + Send;
    /// Blocks no retained version references, older than the grace period and not uploaded
    /// within it: candidates for garbage collection, with their sizes.
    fn gc_candidates(
        &self,
        now: i64,
        retention_secs: i64,
        grace_secs: i64,
    ) -> impl Future<Output = StoreResult<Vec<(String, u64)>>> + Send;
    /// Deletes a candidate's row unless a commit referenced it since `gc_started` or it was
    /// uploaded after `grace_cutoff`; true when deleted (then its bytes may go).
    fn forget_block(
        &self,
        hash: &str,
        gc_started: i64,
        grace_cutoff: i64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Every retained file version: (path, revision, blocks).
    fn retained_versions(
        &self,
        now: i64,
        retention_secs: i64,
    ) -> impl Future<Output = StoreResult<Vec<(String, i64, Vec<String>)>>> + Send;
    /// Entries below `path` (the whole subtree when `recursive`), with block lists, and the cursor
    /// they are consistent with.
    fn list(
        &self,
        ns: i64,
        path: &str,
        recursive: bool,
    ) -> impl Future<Output = StoreResult<(Vec<Entry>, i64)>> + Send;
    fn meta(&self, ns: i64, path: &str) -> impl Future<Output = StoreResult<Option<Entry>>> + Send;
    /// Journal rows after `cursor`, at most `limit`; returns (rows, new cursor, has_more).
    fn journal(
        &self,
        ns: i64,
        cursor: i64,
        limit: u32,
    ) -> impl Future<Output = StoreResult<(Vec<JournalEntry>, i64, bool)>> + Send;
}
