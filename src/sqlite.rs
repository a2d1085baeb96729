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
use sqlx::SqlitePool;

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
