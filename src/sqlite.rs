//! SQLite plumbing shared by the server's metadata store and the client's index: how a database
//! is opened (WAL; `synchronous=FULL` where an acknowledged commit must survive power loss) and
//! how its embedded migrations run (sqlx's migrator over SQL files compiled into the binary).

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

/// One migration compiled into the binary: version, description, SQL.
pub type EmbeddedMigration = (i64, &'static str, &'static str);

#[derive(Debug)]
struct Embedded(&'static [EmbeddedMigration]);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// How a database trades durability for speed.
#[derive(Clone, Copy, Debug)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is on disk when acknowledged (the server).
    Full,
    /// `synchronous=NORMAL`: always consistent, the last commits may be lost on power loss (the
    /// client index, which a later scan rebuilds from the files themselves).
    Normal,
}

/// Opens (creating if asked) the database at `path` and brings its schema up to date.
pub async fn open(
    path: &Path,
    create: bool,
    migrations: &'static [EmbeddedMigration],
    max_connections: u32,
    durability: Durability,
) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        })
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await?;
    let migrator = Migrator::new(Embedded(migrations)).await?;
    migrator.run(&pool).await?;
    Ok(pool)
}

/// Whether `e` is SQLite's SQLITE_FULL: the disk holding the database is full.
pub fn is_full(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "13")
}

/// One bound value of a multi-row insert ([`insert_rows`]).
pub enum Param {
    Int(i64),
    Text(String),
    Null,
}

/// Rows per statement of [`insert_rows`]: one hand-off to sqlx's worker thread for this many
/// rows, and (at up to 30 columns) under SQLite's limit of 32,766 bound parameters.
pub const ROWS_PER_INSERT: usize = 1000;

/// `{head} VALUES (…), (…), … {tail}` with every value bound, [`ROWS_PER_INSERT`] rows per
/// statement, in order; `head` is the `INSERT … INTO table (columns)` part, `tail` an optional
/// `ON CONFLICT …` clause. Twice as fast as one JSON array per statement taken apart by
/// `json_each` and `->>`, which re-parse each row's text once per column.
pub async fn insert_rows(
    tx: &mut sqlx::SqliteConnection,
    head: &str,
    tail: &str,
    rows: Vec<Vec<Param>>,
) -> Result<(), sqlx::Error> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(());
    };
    debug_assert!(width * ROWS_PER_INSERT <= 32_766);
    let one = format!("({})", vec!["?"; width].join(","));
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Param>> = rows.by_ref().take(ROWS_PER_INSERT).collect();
        let sql = format!(
            "{head} VALUES {} {tail}",
            vec![one.as_str(); chunk.len()].join(",")
        );
        // Not kept prepared: each row count is its own statement text.
        let mut q = sqlx::query(&sql).persistent(false);
        for value in chunk.into_iter().flatten() {
            q = match value {
                Param::Int(i) => q.bind(i),
                Param::Text(t) => q.bind(t),
                Param::Null => q.bind(None::<String>),
            };
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// One database's writers, one transaction (or lone statement) at a time, in the order they
/// asked. SQLite lets one connection write at a time; another that tries meanwhile is put to
/// sleep by its busy handler for 1, 2, 5, 10, 15, 20, 25… ms before it tries again, however
/// soon the lock is free. On a server whose upload requests and commits all write, recording
/// an upload of 16 blocks took 50 ms on average during a dataset push, 36 ms waiting here
/// instead: each writer starts as soon as the one before is done. Other processes (`dbx admin`) still meet
/// the busy handler.
#[derive(Clone, Debug, Default)]
pub struct Writer(std::sync::Arc<tokio::sync::Mutex<()>>);

impl Writer {
    /// Waits for this database's turn to write, then begins a transaction on `pool`.
    pub async fn begin(&self, pool: &SqlitePool) -> Result<WriteTx, sqlx::Error> {
        let turn = self.0.clone().lock_owned().await;
        let tx = pool.begin().await?;
        Ok(WriteTx { tx, _turn: turn })
    }

    /// Runs one writing statement on `pool` in this database's turn (outside a transaction,
    /// SQLite commits it on its own).
    pub async fn execute<'q>(
        &self,
        pool: &SqlitePool,
        query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error> {
        let _turn = self.0.lock().await;
        query.execute(pool).await
    }
}

/// A write transaction holding its database's turn (see [`Writer`]) until it ends: committed,
/// or rolled back when dropped.
pub struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}
