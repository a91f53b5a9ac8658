//! The migration ladders: one per backend, the same versions in both.
//!
//! Each step runs in its own transaction and is recorded in `schema_migrations` with a
//! checksum of its text, so an edited step or a database newer than this binary is
//! refused rather than half-understood. Concurrent starts are serialised (an advisory
//! lock on PostgreSQL, the single writer on SQLite).

use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Row};

use super::{Backend, Db, StoreError};
use crate::clock::Clock;

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

macro_rules! migration {
    ($version:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $file,
            sqlite: include_str!(concat!("../../migrations/sqlite/", $file, ".sql")),
            postgres: include_str!(concat!("../../migrations/postgres/", $file, ".sql")),
        }
    };
}

/// Every migration, in order. Add a step here and as a file in both folders.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_meta"),
    migration!(2, "0002_audit"),
    migration!(3, "0003_identity"),
    migration!(4, "0004_phi"),
    migration!(5, "0005_security"),
    migration!(6, "0006_search_paging"),
    migration!(7, "0007_smart"),
    migration!(8, "0008_accounts"),
    migration!(9, "0009_audit_indexes"),
    migration!(10, "0010_audit_patients"),
    migration!(11, "0011_audit_client_request_id"),
    migration!(12, "0012_fhir"),
    migration!(13, "0013_name_terms"),
    migration!(14, "0014_must_change_password"),
    migration!(15, "0015_oauth"),
    migration!(16, "0016_passkeys"),
    migration!(17, "0017_patient_accounts"),
    migration!(18, "0018_privacy"),
];

impl Migration {
    fn sql(&self, backend: Backend) -> &'static str {
        match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
        }
    }

    fn checksum(&self, backend: Backend) -> String {
        let digest = Sha256::digest(self.sql(backend).as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Key of the PostgreSQL advisory lock held while migrating.
const LOCK_KEY: i64 = 0x6375_7374_6f64_6961; // "custodia"

/// What `migrate` did.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<i64>,
    pub current: i64,
}

/// Brings the schema up to date.
pub async fn migrate(db: &Db, clock: &dyn Clock) -> Result<Report, StoreError> {
    let now = crate::clock::rfc3339(clock.now());
    let backend = db.backend();
    let mut conn = db.writer().acquire().await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    let result = migrate_locked(&mut conn, backend, &now).await;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    result
}

async fn migrate_locked(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    now: &str,
) -> Result<Report, StoreError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY NOT NULL,
            name TEXT NOT NULL,
            checksum TEXT NOT NULL,
            applied_at TEXT NOT NULL
        )",
    )
    .execute(&mut *conn)
    .await?;

    let known_max = MIGRATIONS.last().map_or(0, |m| m.version);
    let newest: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations")
        .fetch_one(&mut *conn)
        .await?
        .try_get("v")?;
    if let Some(v) = newest.filter(|v| *v > known_max) {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {v}, newer than this binary knows ({known_max}); run a newer custodian"
        )));
    }

    let mut report = Report::default();
    for m in MIGRATIONS {
        // Each step re-checks inside its own write transaction, so two processes
        // starting at once apply it once (SQLite: BEGIN IMMEDIATE takes the write lock
        // before the check; PostgreSQL: the advisory lock is already held).
        let mut tx = match backend {
            Backend::Sqlite => sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
            Backend::Postgres => sqlx::Connection::begin(&mut *conn).await?,
        };
        let existing: Option<String> =
            sqlx::query("SELECT checksum FROM schema_migrations WHERE version = $1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("checksum"))
                .transpose()?;
        if let Some(sum) = existing {
            tx.rollback().await?;
            if sum != m.checksum(backend) {
                return Err(StoreError::Schema(format!(
                    "migration {} ({}) was changed after it was applied; restore its original text",
                    m.version, m.name
                )));
            }
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(m.sql(backend)))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                StoreError::Schema(format!("migration {} ({}) failed: {e}", m.version, m.name))
            })?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(m.checksum(backend))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        report.applied.push(m.version);
    }
    report.current = known_max;
    Ok(report)
}

/// The schema's state, read without changing anything (for `custodian check`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Steps of this binary not applied yet.
    pub pending: Vec<i64>,
    /// Applied steps whose text differs from this binary's.
    pub changed: Vec<i64>,
    /// Applied steps this binary does not know (the database is newer).
    pub unknown: Vec<i64>,
}

pub async fn status(db: &Db) -> Result<Status, StoreError> {
    let backend = db.backend();
    let table_exists = match backend {
        Backend::Sqlite => sqlx::query(
            "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
        ),
        Backend::Postgres => sqlx::query(
            "SELECT 1 AS x FROM information_schema.tables WHERE table_schema = current_schema() \
             AND table_name = 'schema_migrations'",
        ),
    }
    .fetch_optional(db.reader())
    .await?
    .is_some();
    let applied: Vec<(i64, String)> = if table_exists {
        sqlx::query("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .fetch_all(db.reader())
            .await?
            .iter()
            .map(|r| Ok((r.try_get("version")?, r.try_get("checksum")?)))
            .collect::<Result<_, sqlx::Error>>()?
    } else {
        Vec::new()
    };
    let mut st = Status::default();
    for m in MIGRATIONS {
        match applied.iter().find(|(v, _)| *v == m.version) {
            None => st.pending.push(m.version),
            Some((_, sum)) if *sum != m.checksum(backend) => st.changed.push(m.version),
            Some(_) => {}
        }
    }
    st.unknown = applied
        .iter()
        .map(|(v, _)| *v)
        .filter(|v| !MIGRATIONS.iter().any(|m| m.version == *v))
        .collect();
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both folders hold exactly the steps of `MIGRATIONS`, with the same versions.
    #[test]
    fn both_ladders_have_the_same_versions() {
        for folder in ["sqlite", "postgres"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(folder);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".sql"))
                .map(|n| n.trim_end_matches(".sql").to_owned())
                .collect();
            files.sort();
            let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_owned()).collect();
            assert_eq!(files, listed, "migrations/{folder} differs from MIGRATIONS");
        }
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(
                m.version,
                i as i64 + 1,
                "versions are 1, 2, 3, … without gaps"
            );
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{} is named by its version",
                m.name
            );
        }
    }
}
