//! Durability of the SQLite audit batches, one step behind their commits.
//!
//! On SQLite in place (`store/local.rs`) the request leading a batch (`local.rs`)
//! commits it without waiting for the disk (`synchronous = NORMAL` on its connection)
//! and hands the batch here. This thread `fdatasync`s the write-ahead log and only then
//! answers the batch's requests, so no response leaves before its event is on disk: the
//! same guarantee as `synchronous = FULL`, which syncs the log inside every commit. The
//! difference is that the next leader commits the next batch while the disk works on
//! this one, and one sync covers every batch committed before it started. Measured on 2 cores, the writer spent
//! most of each batch waiting for its own fsync while a fifth of the machine was idle
//! (docs/performance.md, "Fourth session").
//!
//! Why it is enough: a commit in WAL mode is the frames appended to `<db>-wal` (written
//! with `pwrite` before the commit returns); a sync of that file started after the
//! commit returned makes them durable, header included. SQLite itself still syncs the
//! log before each checkpoint and the database after it. The log file is opened by path
//! and reopened when its inode changes (SQLite deletes it only when the last connection
//! closes; the writer's stays open).
//!
//! If the sync fails, the batches it covered fail closed (503) and the failure is logged;
//! nothing is answered as stored that the disk did not confirm.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc;

use super::model::AuditEvent;
use crate::store::StoreError;

/// A committed batch waiting for the sync that makes it durable, and what to do then.
struct Pending {
    chained: Vec<AuditEvent>,
    then: Box<dyn FnOnce(Result<Vec<AuditEvent>, StoreError>) + Send>,
}

/// Handle to the sync thread.
pub struct Syncer {
    tx: mpsc::SyncSender<Pending>,
}

/// Batches waiting at most: past that the writer waits for the disk (back-pressure).
const QUEUE: usize = 64;

impl Syncer {
    /// Starts the thread for the log of the SQLite file `db`. With `sync` false
    /// (`database.sqlite_synchronous = normal`) batches are answered without a sync, in
    /// order, as SQLite itself would.
    pub fn start(db: PathBuf, sync: bool) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Pending>(QUEUE);
        let mut wal = Wal::new(db);
        std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(p) = rx.try_recv() {
                        batch.push(p);
                    }
                    let synced = if sync { wal.sync() } else { Ok(()) };
                    for p in batch {
                        match &synced {
                            Ok(()) => (p.then)(Ok(p.chained)),
                            Err(e) => (p.then)(Err(StoreError::Config(format!(
                                "the audit log could not be synced to disk: {e}"
                            )))),
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Runs `then` once `chained` is on disk, on the sync thread (the caller waits only
    /// when the thread's queue is full). If the thread is gone nothing can be confirmed,
    /// and `then` gets an error: the batch fails closed.
    pub fn after(
        &self,
        chained: Vec<AuditEvent>,
        then: Box<dyn FnOnce(Result<Vec<AuditEvent>, StoreError>) + Send>,
    ) {
        if let Err(e) = self.tx.send(Pending { chained, then }) {
            (e.0.then)(Err(StoreError::Closed));
        }
    }
}

/// The write-ahead log file, opened by path.
struct Wal {
    path: PathBuf,
    file: Option<(File, u64, u64)>,
}

impl Wal {
    fn new(db: PathBuf) -> Self {
        let mut path = db.into_os_string();
        path.push("-wal");
        Self {
            path: PathBuf::from(path),
            file: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let now = std::fs::metadata(&self.path)?;
        let same = self
            .file
            .as_ref()
            .is_some_and(|(_, dev, ino)| *dev == now.dev() && *ino == now.ino());
        if !same {
            let f = File::open(&self.path)?;
            let m = f.metadata()?;
            self.file = Some((f, m.dev(), m.ino()));
        }
        match &self.file {
            Some((f, _, _)) => f.sync_data(),
            None => Err(std::io::Error::other("no write-ahead log")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_answered_in_order_after_a_sync_and_fail_without_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.sqlite");
        // No log yet: the sync fails, and the batch is refused rather than answered.
        let s = Syncer::start(db.clone(), true).unwrap();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        s.after(Vec::new(), Box::new(move |r| t.send(r.is_ok()).unwrap()));
        assert!(!rx.recv().unwrap());
        // With the log there: answered, in the order queued.
        std::fs::write(dir.path().join("a.sqlite-wal"), b"frames").unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..5 {
            let t = tx.clone();
            s.after(
                Vec::new(),
                Box::new(move |r| t.send(r.map(|_| i).ok()).unwrap()),
            );
        }
        let got: Vec<Option<i32>> = (0..5).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, [Some(0), Some(1), Some(2), Some(3), Some(4)]);
    }

    #[test]
    fn the_log_is_synced_by_path_and_reopened_when_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.sqlite");
        let mut wal = Wal::new(db);
        // No log: nothing can be confirmed.
        assert!(wal.sync().is_err());
        let log = dir.path().join("a.sqlite-wal");
        std::fs::write(&log, b"frames").unwrap();
        wal.sync().unwrap();
        let first = wal.file.as_ref().map(|(_, _, ino)| *ino).unwrap();
        // Replaced (SQLite deletes the log when the last connection closes): reopened.
        // The old file is kept under another name, so its inode cannot be reused.
        std::fs::rename(&log, dir.path().join("old-wal")).unwrap();
        std::fs::write(&log, b"frames again").unwrap();
        wal.sync().unwrap();
        let second = wal.file.as_ref().map(|(_, _, ino)| *ino).unwrap();
        assert_ne!(first, second);
        std::fs::remove_file(&log).unwrap();
        assert!(wal.sync().is_err());
    }
}
