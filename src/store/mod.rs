//! Storage: one connection pool type for both backends.
//!
//! SQLite (the embedded default) and PostgreSQL are reached through `sqlx::AnyPool` with
//! runtime queries written once, `$1` placeholders and portable types (TEXT ids and
//! times, BIGINT counters and flags). SQLite gets a single-connection writer pool next
//! to its readers (WAL lets readers run beside the one writer); on PostgreSQL both
//! handles are the same pool. Why: `docs/architecture.md`.

pub mod local;
pub mod migrate;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

use crate::config::Secret;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub const fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Errors of the storage layer. Messages never carry row values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database is closed")]
    Closed,
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// Whether the database could not be reached at all (pool timeout, refused, closed).
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Sqlx(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => true,
            StoreError::Closed => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                C::DatabaseBusy | C::DatabaseLocked | C::CannotOpen | C::SystemIoFailure
            ),
            _ => false,
        }
    }
}

/// Pool settings, from `database.*`.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite: fsync at every commit (survives power loss) rather than only at
    /// checkpoints (survives a crash of the process).
    pub sqlite_synchronous_full: bool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            sqlite_synchronous_full: true,
        }
    }
}

/// The database handle every service uses.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    read: AnyPool,
    write: AnyPool,
    /// SQLite on a file: the in-place handle for the hot paths (`local.rs`).
    local: Option<Arc<local::Local>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

/// Creates the SQLite file (and its directory) readable by this user only: it holds
/// PHI, even if encrypted field by field. SQLite gives its `-wal` and `-shm` files the
/// same mode as the database file.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let fail = |what: &str, p: &Path, e: std::io::Error| {
        StoreError::Config(format!("cannot create {what} {}: {e}", p.display()))
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(parent)
            .map_err(|e| fail("the directory", parent, e))?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
        .map_err(|e| fail("the SQLite database", path, e))?;
    Ok(())
}

type PragmaFuture<'c> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// Run on every new SQLite connection (`synchronous = FULL`).
fn sqlite_pragmas_full(
    conn: &mut sqlx::AnyConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> PragmaFuture<'_> {
    Box::pin(async move {
        conn.execute(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;",
        )
        .await?;
        Ok(())
    })
}

/// Run on every new SQLite connection (`synchronous = NORMAL`).
fn sqlite_pragmas_normal(
    conn: &mut sqlx::AnyConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> PragmaFuture<'_> {
    Box::pin(async move {
        conn.execute(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL;",
        )
        .await?;
        Ok(())
    })
}

impl Db {
    /// Opens the database named by `url` (`sqlite://PATH`, `postgres://…`).
    pub async fn connect(url: &Secret, settings: &PoolSettings) -> Result<Self, StoreError> {
        install_default_drivers();
        let raw = url.expose();
        if let Some(path) = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"))
        {
            Self::connect_sqlite(path, settings).await
        } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            Self::connect_postgres(raw, settings).await
        } else {
            Err(StoreError::Config(
                "database.url must start with sqlite:// or postgres://".into(),
            ))
        }
    }

    async fn connect_sqlite(path: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let file = path.split('?').next().unwrap_or(path);
        let in_memory = file == ":memory:" || path.contains("mode=memory");
        if !in_memory {
            create_private_file(Path::new(file))?;
        }
        let url = if path.contains('?') {
            format!("sqlite://{path}")
        } else {
            format!("sqlite://{path}?mode=rwc")
        };
        let pragmas = if settings.sqlite_synchronous_full {
            sqlite_pragmas_full
        } else {
            sqlite_pragmas_normal
        };
        // One writer: SQLite serialises writes anyway, and a single connection turns
        // contention into queueing instead of SQLITE_BUSY.
        // No ping before each checkout (`test_before_acquire`): it was one more
        // round trip to the connection's thread per query, and a SQLite connection
        // does not go stale. On PostgreSQL a connection broken since its last use fails
        // its one query (the request fails closed, the connection is dropped) instead
        // of costing every query a round trip.
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .test_before_acquire(false)
            .after_connect(pragmas)
            .connect(&url)
            .await?;
        let read = AnyPoolOptions::new()
            .max_connections(settings.max_connections.clamp(1, 64))
            .acquire_timeout(settings.acquire_timeout)
            .test_before_acquire(false)
            .after_connect(pragmas)
            .connect(&url)
            .await?;
        let local = (!in_memory).then(|| {
            Arc::new(local::Local::new(
                Path::new(file),
                settings.sqlite_synchronous_full,
            ))
        });
        Ok(Self {
            inner: Arc::new(Inner {
                backend: Backend::Sqlite,
                read,
                write,
                local,
            }),
        })
    }

    async fn connect_postgres(url: &str, settings: &PoolSettings) -> Result<Self, StoreError> {
        let pool = AnyPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .test_before_acquire(false)
            .connect(url)
            .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                backend: Backend::Postgres,
                read: pool.clone(),
                write: pool,
                local: None,
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// SQLite on a file: queries in place, for the hot paths only (`local.rs`).
    pub fn local(&self) -> Option<&local::Local> {
        self.inner.local.as_deref()
    }

    /// SQLite on a file: copies the write-ahead log back into the database every
    /// 100 ms on a thread of its own, beside the writers, for a writer whose connection
    /// does not checkpoint inside its commits (the audit writer: a checkpoint there held
    /// every waiting request for a database fsync, p99 over 200 ms at 100,000
    /// patients). A `PASSIVE` checkpoint takes no write lock; under constant writes the
    /// log would then never start again from its beginning, so past
    /// [`local::RESTART_FRAMES`] a `RESTART` checkpoint follows: SQLite holds new
    /// writers (through their busy handlers) while it copies what came during the first
    /// pass, and the log starts again. Ends when the database is closed.
    pub fn start_checkpointer(&self) {
        let db = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let Some(local) = db.local() else { return };
                let mut conn: Option<rusqlite::Connection> = None;
                while local.check_open().is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                    if conn.is_none() {
                        conn = local.checkpointer().ok();
                    }
                    let Some(c) = &conn else { continue };
                    if let Err(e) = local.checkpoint(c) {
                        if local.check_open().is_ok() {
                            tracing::warn!(error = %e, "storage: a checkpoint failed; it is tried again");
                        }
                        conn = None;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "storage: the checkpoint thread could not start");
        }
    }

    /// The pool for reads.
    pub fn reader(&self) -> &AnyPool {
        &self.inner.read
    }

    /// The pool for writes (one connection on SQLite).
    pub fn writer(&self) -> &AnyPool {
        &self.inner.write
    }

    /// A round trip to the database, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.reader()).await?;
        Ok(())
    }

    /// Closes both pools, waiting for connections in use.
    pub async fn close(&self) {
        if let Some(l) = &self.inner.local {
            l.close();
        }
        self.inner.write.close().await;
        self.inner.read.close().await;
        if let Some(l) = &self.inner.local {
            l.flush_log();
        }
    }

    /// Names of the application's tables and their columns, sorted, for comparing the
    /// two ladders.
    pub async fn schema(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        use sqlx::Row;
        let rows = match self.backend() {
            Backend::Sqlite => {
                sqlx::query(
                    "SELECT m.name AS t, p.name AS c FROM sqlite_master m \
                     JOIN pragma_table_info(m.name) p \
                     WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' \
                     ORDER BY m.name, p.name",
                )
                .fetch_all(self.reader())
                .await?
            }
            Backend::Postgres => {
                sqlx::query(
                    "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns \
                     WHERE table_schema = current_schema() ORDER BY table_name, column_name",
                )
                .fetch_all(self.reader())
                .await?
            }
        };
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for row in rows {
            let t: String = row.try_get("t")?;
            let c: String = row.try_get("c")?;
            match out.last_mut() {
                Some((name, cols)) if *name == t => cols.push(c),
                _ => out.push((t, vec![c])),
            }
        }
        Ok(out)
    }
}

/// Records this installation's id and creation time once.
pub async fn ensure_installation(db: &Db, now: &str) -> Result<String, StoreError> {
    use sqlx::Row;
    let id = uuid::Uuid::new_v4().to_string();
    // `ON CONFLICT … DO NOTHING` is understood by both backends.
    let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
    sqlx::query(sql)
        .bind("installation_id")
        .bind(&id)
        .execute(db.writer())
        .await?;
    sqlx::query(sql)
        .bind("created_at")
        .bind(now)
        .execute(db.writer())
        .await?;
    let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
        .bind("installation_id")
        .fetch_one(db.reader())
        .await?;
    Ok(row.try_get("value")?)
}
