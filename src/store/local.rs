//! SQLite in place: the hot paths' queries run on the calling thread through
//! `rusqlite`, next to the `sqlx` pools that serve everything else.
//!
//! Why: `sqlx`'s SQLite driver gives each connection a thread of its own and hands
//! every query to it and back. On a 2-core machine a profile of an authenticated read
//! put half the server's CPU in those threads and a third of all samples in context
//! switches; SQLite itself was under 2 % (docs/performance.md, "Fourth session"). A
//! point read by key takes a few microseconds when it runs where it is called.
//!
//! What runs here, and only this:
//! - short reads by an index (a token, a patient by id, one page of a blind-index
//!   search), on the request's own runtime thread: in WAL mode a reader never waits for
//!   the writer, so these do not block;
//! - the audit writer's append, on the audit writer's own thread, through a connection
//!   of its own (see `audit::store::append_local`). It holds the pool's one writer
//!   connection meanwhile, unused, so that writes within the process queue in the
//!   pool's order instead of racing for SQLite's lock.
//!
//! Connections are the same file with the same pragmas as the pools'; readers are
//! `query_only`. An in-memory database has no file to share, so it has no local handle
//! and every query goes through `sqlx`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// Readers kept open between uses; more are opened when that many are busy at once.
const IDLE_READERS: usize = 16;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;
/// How long a writer waits for another connection's write lock before it fails.
const BUSY_LIMIT: Duration = Duration::from_secs(5);

/// The in-place handle to one SQLite file.
pub struct Local {
    path: PathBuf,
    synchronous_full: bool,
    readers: Mutex<Vec<Connection>>,
    /// Set by [`Local::close`] (with the pools): nothing is read or written after.
    closed: AtomicBool,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").finish_non_exhaustive()
    }
}

/// A row's columns by name, read the same way from `sqlx` and from `rusqlite` rows, so
/// that a table's decoder is written once for both paths.
pub trait Cols {
    fn col<T>(&self, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql;

    /// Column `name`, expected at position `i` of the SELECT: read there when the name
    /// matches (one comparison), else looked up by name. A lookup by name compares it
    /// with every column before it, which for a 21-column patient row was a tenth of a
    /// search's CPU (docs/performance.md).
    fn col_at<T>(&self, i: usize, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql;
}

impl Cols for sqlx::any::AnyRow {
    fn col<T>(&self, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql,
    {
        Ok(sqlx::Row::try_get(self, name)?)
    }

    fn col_at<T>(&self, i: usize, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql,
    {
        use sqlx::Column;
        match sqlx::Row::columns(self).get(i) {
            Some(c) if c.name() == name => Ok(sqlx::Row::try_get(self, i)?),
            _ => self.col(name),
        }
    }
}

impl Cols for rusqlite::Row<'_> {
    fn col<T>(&self, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql,
    {
        Ok(self.get(name)?)
    }

    fn col_at<T>(&self, i: usize, name: &str) -> Result<T, StoreError>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + rusqlite::types::FromSql,
    {
        if self.as_ref().column_name(i).is_ok_and(|n| n == name) {
            Ok(self.get(i)?)
        } else {
            self.col(name)
        }
    }
}

/// A retry of the SQLite busy handler: short sleeps instead of SQLite's default 1, 2,
/// 5, 10 … ms steps, so that a batch behind another process's short write waits about
/// as long as that write.
fn busy(attempt: i32) -> bool {
    let step = Duration::from_micros(100);
    let attempts = u32::try_from(attempt).unwrap_or(u32::MAX);
    if step.saturating_mul(attempts) >= BUSY_LIMIT {
        return false;
    }
    std::thread::sleep(step);
    true
}

impl Local {
    pub(super) fn new(path: &Path, synchronous_full: bool) -> Self {
        Self {
            path: path.to_owned(),
            synchronous_full,
            readers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Refuses every later read and write (a writer's open connection included) and
    /// closes the idle readers.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut r) = self.readers.lock() {
            r.clear();
        }
    }

    /// After the pools are closed: copies the whole write-ahead log into the database
    /// file and empties it (`TRUNCATE`), so that a server stopped cleanly leaves all its
    /// data in the one file, as it did when the pools' last connection removed the log
    /// (the audit writer's own connection may outlive the pools). Best effort: a log
    /// left behind is still read, and replayed, at the next start.
    ///
    /// The checkpoint thread may be in the middle of its own round when the pools close
    /// (it stops at its next look at [`Local::check_open`]); SQLite then answers the
    /// `TRUNCATE` with "busy" in its result row rather than with an error, so the round
    /// is tried again, for up to two seconds, until it reports the log emptied.
    pub(super) fn flush_log(&self) {
        let attempt = || -> Result<bool, StoreError> {
            let c = self.open(false, true)?;
            let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            Ok(busy == 0)
        };
        let mut last = None;
        for _ in 0..100 {
            match attempt() {
                Ok(true) => return,
                Ok(false) => last = None,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match last {
            Some(e) => {
                tracing::warn!(error = %e, "storage: the write-ahead log was not emptied at close");
            }
            None => tracing::warn!(
                "storage: the write-ahead log was not emptied at close: another connection held it"
            ),
        }
    }

    /// Fails once the database is closed: checked before every read and every batch.
    pub fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether commits must reach the disk before they are confirmed
    /// (`database.sqlite_synchronous = full`, the default).
    pub fn synchronous_full(&self) -> bool {
        self.synchronous_full
    }

    fn open(&self, query_only: bool, sync_in_commit: bool) -> Result<Connection, StoreError> {
        // No CREATE: the file was created (mode 0600) and migrated through the pools.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.busy_handler(Some(busy))?;
        conn.execute_batch(if self.synchronous_full && sync_in_commit {
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;"
        } else {
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;"
        })?;
        if query_only {
            conn.execute_batch("PRAGMA query_only = ON;")?;
        }
        if !sync_in_commit {
            // The audit writer: checkpoints run beside it (`Local::checkpoint`).
            conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?;
        }
        Ok(conn)
    }

    /// Runs `f` on a reader connection, on this thread. For short indexed reads only.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_open()?;
        let idle = self.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match idle {
            Some(c) => c,
            None => self.open(true, true)?,
        };
        let out = f(&conn);
        // A connection left inside a transaction by a failed read is dropped, not reused.
        if conn.is_autocommit()
            && let Ok(mut r) = self.readers.lock()
            && r.len() < IDLE_READERS
        {
            r.push(conn);
        }
        out
    }

    /// A connection that writes, for the one owner at a time (the audit batch leader).
    /// Without `sync_in_commit` its commits do not wait for the disk
    /// (`synchronous = NORMAL`), and the caller makes them durable (`audit/syncer.rs`).
    pub fn writer(&self, sync_in_commit: bool) -> Result<Connection, StoreError> {
        self.check_open()?;
        self.open(false, sync_in_commit)
    }
}

/// Write-ahead log frames past which the checkpoint thread holds the writers for the
/// short catch-up that lets the log start again from its beginning (16 MiB of 4 KiB
/// pages).
pub const RESTART_FRAMES: i64 = 4096;

impl Local {
    /// One round of the checkpoint thread (`Db::start_checkpointer`): a `PASSIVE`
    /// checkpoint (no write lock), then, when the log holds more than
    /// [`RESTART_FRAMES`], a `RESTART` one that waits for the writer of the moment,
    /// holds new ones while it copies the rest, and lets the log start again.
    pub fn checkpoint(&self, conn: &Connection) -> Result<(), StoreError> {
        self.check_open()?;
        let run = |mode: &str| -> Result<i64, StoreError> {
            let sql = format!("PRAGMA wal_checkpoint({mode})");
            Ok(conn.query_row(&sql, [], |r| r.get::<_, i64>(1))?)
        };
        if run("PASSIVE")? > RESTART_FRAMES {
            run("RESTART")?;
        }
        Ok(())
    }

    /// A connection for [`Local::checkpoint`].
    pub fn checkpointer(&self) -> Result<Connection, StoreError> {
        self.check_open()?;
        self.open(false, true)
    }
}

/// Runs `sql` with `$n` parameters bound by name (`$1` is `params[0]`), whatever order
/// they appear in, and decodes each row with `row`.
pub fn query<T>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    row: impl Fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    for (i, p) in params.iter().enumerate() {
        if let Some(index) = stmt.parameter_index(&format!("${}", i + 1))? {
            stmt.raw_bind_parameter(index, p)?;
        }
    }
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(row(r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_read_by_position_fall_back_to_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (a TEXT, b BIGINT); INSERT INTO t VALUES ('x', 1);")
            .unwrap();
        drop(c);
        let local = Local::new(&path, true);
        let got = local
            .read(|c| {
                query(c, "SELECT a, b FROM t", &[], |r| {
                    // Right position; wrong position (found by name); unknown name.
                    let a: String = r.col_at(0, "a")?;
                    let b: i64 = r.col_at(0, "b")?;
                    let missing = r.col_at::<String>(1, "c").is_err();
                    Ok((a, b, missing))
                })
            })
            .unwrap();
        assert_eq!(got, vec![("x".to_owned(), 1, true)]);
    }

    #[test]
    fn parameters_bind_by_name_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE t (a TEXT, b BIGINT); INSERT INTO t VALUES ('x', 1), ('y', 2), ('z', 3);",
        )
        .unwrap();
        drop(c);
        let local = Local::new(&path, true);
        let got = local
            .read(|c| {
                query(
                    c,
                    "SELECT a FROM t WHERE b > $2 AND a <> $1 ORDER BY a",
                    &[&"z", &1_i64],
                    |r| r.col::<String>("a"),
                )
            })
            .unwrap();
        assert_eq!(got, vec!["y".to_owned()]);
        // Readers refuse to write.
        let err = local.read(|c| Ok(c.execute("DELETE FROM t", [])?));
        assert!(err.is_err());
        // The writer may.
        let w = local.writer(true).unwrap();
        assert_eq!(w.execute("DELETE FROM t WHERE b = 1", []).unwrap(), 1);
        // Closed: nothing more, and the error reads as "unavailable" (503, not 500).
        local.close();
        let err = local.read(|_| Ok(())).unwrap_err();
        assert!(err.is_unavailable());
        assert!(local.writer(true).is_err());
    }
}
