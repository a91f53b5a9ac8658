//! Storage: the migration ladders and their guards.

use custodian::clock::SystemClock;
use custodian::config::Secret;
use custodian::store::migrate::{MIGRATIONS, migrate};
use custodian::store::{Db, PoolSettings};

use crate::both_backends;
use crate::support::{Backend, TestDb, postgres_url};

fn settings() -> PoolSettings {
    PoolSettings {
        max_connections: 4,
        acquire_timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    }
}

async fn open(db: &TestDb) -> Db {
    Db::connect(&Secret::new(db.url.clone()), &settings())
        .await
        .unwrap()
}

async fn migrations_apply_once(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = open(&t).await;
    let first = migrate(&db, &SystemClock).await.unwrap();
    assert_eq!(first.applied.len(), MIGRATIONS.len());
    let second = migrate(&db, &SystemClock).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.current, MIGRATIONS.len() as i64);
}
both_backends!(migrations_apply_once);

async fn concurrent_starts_migrate_once(backend: Backend) {
    let t = TestDb::new(backend).await;
    let (a, b) = (open(&t).await, open(&t).await);
    let (ra, rb) = tokio::join!(migrate(&a, &SystemClock), migrate(&b, &SystemClock));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.applied.len() + rb.applied.len(), MIGRATIONS.len());
}
both_backends!(concurrent_starts_migrate_once);

async fn a_newer_database_is_refused(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = open(&t).await;
    migrate(&db, &SystemClock).await.unwrap();
    sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (999, 'future', 'x', 'now')")
        .execute(db.writer())
        .await
        .unwrap();
    let e = migrate(&db, &SystemClock).await.unwrap_err().to_string();
    assert!(e.contains("999") && e.contains("newer"), "{e}");
}
both_backends!(a_newer_database_is_refused);

async fn an_edited_migration_is_refused(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = open(&t).await;
    migrate(&db, &SystemClock).await.unwrap();
    sqlx::query("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        .execute(db.writer())
        .await
        .unwrap();
    let e = migrate(&db, &SystemClock).await.unwrap_err().to_string();
    assert!(e.contains("changed after it was applied"), "{e}");
}
both_backends!(an_edited_migration_is_refused);

async fn sqlite_runs_in_wal_mode_with_foreign_keys(backend: Backend) {
    if backend != Backend::Sqlite {
        return;
    }
    use sqlx::Row;
    let t = TestDb::new(backend).await;
    let db = open(&t).await;
    for pool in [db.reader(), db.writer()] {
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        let fk: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(fk, 1);
        let busy: i64 = sqlx::query("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert!(busy >= 1000);
    }
    // The file holds PHI: this user only, and so are SQLite's companion files.
    use std::os::unix::fs::PermissionsExt;
    for f in ["test.sqlite", "test.sqlite-wal", "test.sqlite-shm"] {
        let mode = std::fs::metadata(t.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
    }
}
both_backends!(sqlite_runs_in_wal_mode_with_foreign_keys);

/// Both ladders produce the same tables with the same columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ladders_produce_the_same_schema() {
    if postgres_url().is_none() {
        return;
    }
    let (ts, tp) = (
        TestDb::new(Backend::Sqlite).await,
        TestDb::new(Backend::Postgres).await,
    );
    let (s, p) = (open(&ts).await, open(&tp).await);
    migrate(&s, &SystemClock).await.unwrap();
    migrate(&p, &SystemClock).await.unwrap();
    let (a, b) = (s.schema().await.unwrap(), p.schema().await.unwrap());
    assert!(!a.is_empty());
    assert_eq!(
        a, b,
        "migrations/sqlite and migrations/postgres have drifted apart"
    );
}

async fn the_installation_id_survives_restarts(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = open(&t).await;
    migrate(&db, &SystemClock).await.unwrap();
    let a = custodian::store::ensure_installation(&db, "2026-01-01T00:00:00Z")
        .await
        .unwrap();
    db.close().await;
    let db = open(&t).await;
    let b = custodian::store::ensure_installation(&db, "2026-02-01T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(a, b);
}
both_backends!(the_installation_id_survives_restarts);

/// SQLite in place: with the audit writer's connection not checkpointing in its
/// commits, the checkpoint thread copies the write-ahead log back into the database
/// file. 2000 rows go into the log through such a connection; the database file then
/// grows by them without any other writer (polled, up to 20 s: this waits for a
/// background effect, it does not time it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_thread_copies_the_log_back() {
    let t = TestDb::new(Backend::Sqlite).await;
    let db = open(&t).await;
    migrate(&db, &SystemClock).await.unwrap();
    let local = db.local().expect("SQLite on a file has an in-place handle");
    let file = t.url.trim_start_matches("sqlite://").to_owned();
    let size = || std::fs::metadata(&file).unwrap().len();
    let mut w = local.writer(false).unwrap();
    let tx = w.transaction().unwrap();
    for i in 0..2000 {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)",
            (format!("k{i}"), "x".repeat(500)),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let before = size();
    db.start_checkpointer();
    let mut after = before;
    for _ in 0..200 {
        after = size();
        if after > before + 500_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        after > before + 500_000,
        "the log was not copied back: {before} -> {after} bytes"
    );
    // A clean close leaves everything in the database file, even with the writer's
    // connection still open: the log is empty.
    db.close().await;
    let wal = std::fs::metadata(format!("{file}-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "the write-ahead log was left with {wal} bytes");
    drop(w);
}
