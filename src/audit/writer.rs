//! The group-commit writer: one task appends the events of many requests in one
//! transaction, and each request waits for the commit that holds its events.
//!
//! A request sends its events with a reply channel into a bounded queue. The writer
//! takes what is queued (up to `audit.max_batch` events, waiting at most
//! `audit.batch_wait` for more), appends it in one transaction, and answers every
//! request in the batch. While one batch commits, the next one gathers, so the cost of
//! a commit is shared by all requests that arrive during it, without adding latency
//! when the server is idle.
//!
//! That task serves PostgreSQL and SQLite in memory. On a SQLite file the same batches
//! are led by the requests themselves (`local.rs`), behind the same [`Writer`] handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::local::LocalCommit;
use super::model::{AuditEvent, NewEvent};
use super::store;
use crate::clock::SharedClock;
use crate::crypto::SharedKeyring;
use crate::store::{Backend, Db};

/// Why events could not be stored.
#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("the audit store could not be written: {0}")]
    Store(String),
    #[error("the audit writer did not commit in time")]
    Timeout,
    #[error("the audit writer is not running")]
    Closed,
}

/// Writer settings, from `audit.*`.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    pub max_batch: usize,
    pub batch_wait: Duration,
    pub queue: usize,
    pub commit_timeout: Duration,
}

/// Counters for monitoring.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub failures: AtomicU64,
    pub last_batch: AtomicU64,
    /// Wall time spent storing batches, in microseconds.
    pub store_micros: AtomicU64,
    /// The largest batch so far.
    pub max_batch: AtomicU64,
    /// Batches that found the head moved (another process appended) since this
    /// writer's last commit: stored through the locked path (on SQLite, every batch
    /// reads the head under the write lock, and this only counts).
    pub head_moved: AtomicU64,
}

impl WriterStats {
    /// Batches, events, failures, store time (µs), largest batch and head-moved
    /// batches, read together.
    pub fn snapshot(&self) -> [u64; 6] {
        [
            self.batches.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.store_micros.load(Ordering::Relaxed),
            self.max_batch.load(Ordering::Relaxed),
            self.head_moved.load(Ordering::Relaxed),
        ]
    }
}

type Reply = oneshot::Sender<Result<(), AuditError>>;

/// One request's events and where to answer it.
pub(super) struct Job {
    pub(super) events: Vec<NewEvent>,
    pub(super) reply: Reply,
}

/// Where committed events are copied for log shipping.
pub trait Sink: Send + Sync {
    fn write(&self, events: &[AuditEvent]);
}

/// Handle to the writer: a task (PostgreSQL, SQLite in memory), or on a SQLite file the
/// requests themselves taking turns (`local.rs`).
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    local: Option<Arc<LocalCommit>>,
    stats: Arc<WriterStats>,
    commit_timeout: Duration,
    capacity: usize,
}

/// The label under which the chain head's MAC key is derived.
pub const HEAD_KEY_PURPOSE: &str = "custodian/audit/head/v1";

/// What a chain MAC signs: the moving head, or a retention checkpoint.
#[derive(Clone, Copy, Debug)]
pub enum Signed {
    Head,
    Checkpoint,
}

/// The MAC of a chain position (`seq`, `hash`) under key `version`.
pub fn chain_mac(
    keys: &SharedKeyring,
    version: u32,
    what: Signed,
    seq: i64,
    hash: &str,
) -> Option<String> {
    let key = keys.derive(version, HEAD_KEY_PURPOSE).ok()?;
    let label: &[u8] = match what {
        Signed::Head => b"custodian-audit-head",
        Signed::Checkpoint => b"custodian-audit-checkpoint",
    };
    let tag =
        crate::crypto::hmac_sha256(&key, &[label, seq.to_string().as_bytes(), hash.as_bytes()]);
    Some(crate::crypto::hex(&tag))
}

impl Writer {
    pub fn start(
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
        settings: WriterSettings,
        sink: Option<Arc<dyn Sink>>,
    ) -> Self {
        let capacity = settings.queue.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(WriterStats::default());
        let local = LocalCommit::new(
            db.clone(),
            keys.clone(),
            clock.clone(),
            &settings,
            sink.clone(),
            stats.clone(),
        )
        .map(Arc::new);
        let w = Self {
            tx,
            local: local.clone(),
            stats: stats.clone(),
            commit_timeout: settings.commit_timeout,
            capacity,
        };
        if local.is_some() {
            // No task: `rx` is dropped, and nothing is ever sent to `tx`.
            return w;
        }
        // On SQLite in memory the writer gets a thread of its own: through sqlx each
        // hand-off waited behind the request tasks on the shared runtime (a batch took
        // 4.6 ms there against 1.4 ms on its own thread, docs/performance.md).
        // PostgreSQL connections belong to the runtime's I/O driver, so there the writer
        // stays a task.
        let runtime = match db.backend() {
            Backend::Sqlite => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok(),
            Backend::Postgres => None,
        };
        let fut = run(rx, db, keys, clock, settings, sink, stats);
        match runtime {
            Some(rt) => {
                let spawned = std::thread::Builder::new()
                    .name("audit-writer".into())
                    .spawn(move || rt.block_on(fut));
                if let Err(e) = spawned {
                    // Fail closed: without a writer every audited request is refused.
                    tracing::error!(error = %e, "audit: the writer thread could not start");
                }
            }
            None => {
                tokio::spawn(fut);
            }
        }
        w
    }

    /// Appends `events` and waits until they are committed.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some(local) = &self.local {
            return self.within(local.append(events)).await;
        }
        let (reply, done) = oneshot::channel();
        let job = Job { events, reply };
        let wait = async {
            self.tx.send(job).await.map_err(|_| AuditError::Closed)?;
            done.await.map_err(|_| AuditError::Closed)?
        };
        self.within(wait).await
    }

    /// Waits until everything queued before this call is committed (jobs are handled in
    /// order): shutdown calls it before closing the database.
    pub async fn flush(&self) -> Result<(), AuditError> {
        if let Some(local) = &self.local {
            return self.within(local.flush()).await;
        }
        let (reply, done) = oneshot::channel();
        let job = Job {
            events: Vec::new(),
            reply,
        };
        let wait = async {
            self.tx.send(job).await.map_err(|_| AuditError::Closed)?;
            done.await.map_err(|_| AuditError::Closed)?
        };
        self.within(wait).await
    }

    /// `wait`, or a timeout error past `audit.commit_timeout`.
    async fn within(
        &self,
        wait: impl std::future::Future<Output = Result<(), AuditError>>,
    ) -> Result<(), AuditError> {
        tokio::time::timeout(self.commit_timeout, wait)
            .await
            .unwrap_or(Err(AuditError::Timeout))
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Jobs waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        if let Some(local) = &self.local {
            return local.queue_depth();
        }
        self.capacity - self.tx.capacity()
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    settings: WriterSettings,
    sink: Option<Arc<dyn Sink>>,
    stats: Arc<WriterStats>,
) {
    let max_batch = settings.max_batch.max(1);
    // Where this writer last left the chain: while it holds, a batch is one round trip
    // (`store::append_after`); when another process moved the head, the batch goes
    // through the locked path, and so do the next few, so that instances sharing one
    // database do not keep missing.
    let mut tail: Option<store::Tail> = None;
    let mut locked_batches = 0u32;
    while let Some(first) = rx.recv().await {
        let mut count = first.events.len();
        let mut jobs = vec![first];
        // Take what is already queued, then wait (bounded) for more.
        while count < max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    count += j.events.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        if count < max_batch && !settings.batch_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + settings.batch_wait;
            while count < max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(j)) => {
                        count += j.events.len();
                        jobs.push(j);
                    }
                    _ => break,
                }
            }
        }
        let mut events: Vec<NewEvent> = Vec::with_capacity(count);
        for j in &mut jobs {
            events.append(&mut j.events);
        }
        if events.is_empty() {
            // Only flush markers: answered once everything before them is committed.
            for j in jobs {
                let _ = j.reply.send(Ok(()));
            }
            continue;
        }
        let version = keys.current_version();
        let sign = |seq: i64, hash: &str| {
            (
                i64::from(version),
                chain_mac(&keys, version, Signed::Head, seq, hash).unwrap_or_default(),
            )
        };
        let now = crate::clock::timestamp(clock.now());
        let started = std::time::Instant::now();
        let fast = match (&tail, locked_batches) {
            (Some(t), 0) => Some(store::append_after(&db, t, &events, &sign, &now).await),
            _ => None,
        };
        let result = match fast {
            Some(Ok(store::Appended::Done(chained))) => Ok(chained),
            Some(Ok(store::Appended::Moved)) => {
                stats.head_moved.fetch_add(1, Ordering::Relaxed);
                locked_batches = 64;
                store::append(&db, &events, &sign, &now).await
            }
            Some(Err(e)) => Err(e),
            None => {
                locked_batches = locked_batches.saturating_sub(1);
                store::append(&db, &events, &sign, &now).await
            }
        };
        tail = match &result {
            Ok(chained) => store::Tail::after(chained),
            Err(_) => None,
        };
        finish(result, jobs, events.len(), started, &stats, sink.as_deref());
    }
}

/// Counts a stored (or failed) batch, copies it to the sink, and answers its requests.
pub(super) fn finish(
    result: Result<Vec<AuditEvent>, crate::store::StoreError>,
    jobs: Vec<Job>,
    events: usize,
    started: std::time::Instant,
    stats: &WriterStats,
    sink: Option<&dyn Sink>,
) {
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.store_micros.fetch_add(took, Ordering::Relaxed);
    match result {
        Ok(chained) => {
            stats
                .max_batch
                .fetch_max(chained.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .events
                .fetch_add(chained.len() as u64, Ordering::Relaxed);
            stats
                .last_batch
                .store(chained.len() as u64, Ordering::Relaxed);
            // The copy is written before the requests are answered, so an answered
            // request's event is already in the sink.
            if let Some(s) = sink {
                s.write(&chained);
            }
            for j in jobs {
                let _ = j.reply.send(Ok(()));
            }
        }
        Err(e) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, events, "audit: a batch could not be stored; its requests fail closed");
            let err = AuditError::Store(e.to_string());
            for j in jobs {
                let _ = j.reply.send(Err(err.clone()));
            }
        }
    }
}
