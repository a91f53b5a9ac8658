//! Group commit on SQLite in place, led by the requests themselves.
//!
//! On a SQLite file (`store/local.rs`) there is no writer thread: a request that has
//! events queues them, and the first request that finds no batch being appended becomes
//! the leader. The leader takes what is queued (up to `audit.max_batch` events), appends
//! it in one transaction through the connection it holds while leading, and hands the
//! batch to the sync thread (`syncer.rs`), which syncs the write-ahead log and answers
//! every request in the batch. The others wait for their answer or for their turn to
//! lead, whichever comes first; the next leader appends while the sync runs. So a batch
//! costs one hand-off between threads instead of two: on 2 cores, waking a writer thread
//! and then the sync thread for every batch cost more CPU than the append itself
//! (docs/performance.md, "Sixth session").
//!
//! Durability is that of `synchronous = FULL`: the connection commits without waiting
//! for the disk (`synchronous = NORMAL`), and no request is answered before the sync
//! thread has synced the log after the commit (see `syncer.rs`). If the append or the
//! sync fails, the batch fails closed (its requests get an error, PHI requests a 503) and
//! the failure is logged; a connection that failed is opened anew for the next batch.
//! If the sync thread could not start, every batch fails closed.
//!
//! The leader's append is blocking (about 0.1 ms for a batch of ten) and runs on the
//! request's runtime thread, like the other in-place SQLite queries; meanwhile the other
//! runtime threads serve requests and queue their events. Nothing in the leader's batch
//! awaits once the batch is taken, so a request cancelled (its client gone, or its
//! commit timeout) cannot drop a batch half done: its batch is either not taken yet,
//! and the next leader takes it, or stored and handed to the sync thread.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::model::{AuditEvent, NewEvent};
use super::store;
use super::syncer::Syncer;
use super::writer::{
    AuditError, Job, Signed, Sink, WriterSettings, WriterStats, chain_mac, finish,
};
use crate::clock::SharedClock;
use crate::crypto::SharedKeyring;
use crate::store::{Db, StoreError};

/// What the leader holds between batches.
struct Lead {
    conn: Option<rusqlite::Connection>,
    /// Where this process last left the chain (another process appending is counted).
    tail: Option<store::Tail>,
}

/// The SQLite in-place group commit.
pub struct LocalCommit {
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    max_batch: usize,
    batch_wait: std::time::Duration,
    capacity: usize,
    sink: Option<Arc<dyn Sink>>,
    stats: Arc<WriterStats>,
    queued: Mutex<VecDeque<Job>>,
    lead: tokio::sync::Mutex<Lead>,
    /// Syncs the log and answers the batches, one step behind their commits.
    syncer: Option<Syncer>,
}

impl LocalCommit {
    /// For the SQLite file of `db` (which must have one); starts the checkpoint thread,
    /// since the leader's connection does not checkpoint inside its commits.
    pub fn new(
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
        settings: &WriterSettings,
        sink: Option<Arc<dyn Sink>>,
        stats: Arc<WriterStats>,
    ) -> Option<Self> {
        let local = db.local()?;
        let syncer = Syncer::start(local.path().to_owned(), local.synchronous_full())
            .map_err(|e| {
                tracing::error!(error = %e, "audit: the sync thread could not start; audited requests fail closed");
            })
            .ok();
        db.start_checkpointer();
        Some(Self {
            db,
            keys,
            clock,
            max_batch: settings.max_batch.max(1),
            batch_wait: settings.batch_wait,
            capacity: settings.queue.max(1),
            sink,
            stats,
            queued: Mutex::new(VecDeque::new()),
            lead: tokio::sync::Mutex::new(Lead {
                conn: None,
                tail: None,
            }),
            syncer,
        })
    }

    /// Requests waiting for a batch.
    pub fn queue_depth(&self) -> usize {
        self.queued.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Queues `events` and returns once they are stored and on disk (or failed).
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<(), AuditError> {
        // Back-pressure: while the queue is full, help empty it.
        while self.queue_depth() >= self.capacity {
            let mut lead = self.lead.lock().await;
            self.lead_one(&mut lead).await;
        }
        let (reply, mut done) = oneshot::channel();
        self.queued
            .lock()
            .map_err(|_| AuditError::Closed)?
            .push_back(Job { events, reply });
        loop {
            tokio::select! {
                biased;
                r = &mut done => return r.unwrap_or(Err(AuditError::Closed)),
                mut lead = self.lead.lock() => {
                    match done.try_recv() {
                        Ok(r) => return r,
                        Err(oneshot::error::TryRecvError::Closed) => return Err(AuditError::Closed),
                        Err(oneshot::error::TryRecvError::Empty) => {}
                    }
                    self.lead_one(&mut lead).await;
                }
            }
        }
    }

    /// Stores everything queued so far and waits until it is on disk (shutdown calls
    /// it before closing the database).
    pub async fn flush(&self) -> Result<(), AuditError> {
        {
            let mut lead = self.lead.lock().await;
            while self.queue_depth() > 0 {
                self.lead_one(&mut lead).await;
            }
        }
        let Some(syncer) = &self.syncer else {
            return Err(AuditError::Closed);
        };
        // Batches are answered in order: this marker's answer comes after theirs.
        let (tx, rx) = oneshot::channel();
        syncer.after(
            Vec::new(),
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()).map_err(|e| AuditError::Store(e.to_string())));
            }),
        );
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// One batch: the write gate, then what is queued, stored, synced and answered.
    async fn lead_one(&self, lead: &mut Lead) {
        // `audit.batch_wait` (default 0) holds the batch open for more.
        if !self.batch_wait.is_zero() && self.queued_events() < self.max_batch {
            tokio::time::sleep(self.batch_wait).await;
        }
        // The pool's one writer connection is held, unused, while the batch is appended:
        // the pool queues writers in order, so a burst of audit batches cannot starve
        // the other writes (which, left to SQLite's busy handler, sleep in steps of up
        // to 100 ms and lost every race: sign-ins timed out under a login flood).
        let gate = self.db.writer().acquire().await;
        // From here on nothing awaits: the batch taken is stored and answered.
        let jobs = self.take();
        if jobs.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let mut events: Vec<NewEvent> = Vec::new();
        let mut jobs = jobs;
        for j in &mut jobs {
            events.append(&mut j.events);
        }
        let n = events.len();
        let result = match gate {
            Err(e) => Err(StoreError::from(e)),
            Ok(gate) => {
                let r = self.store(lead, &events);
                drop(gate);
                r
            }
        };
        lead.tail = match &result {
            Ok(chained) => store::Tail::after(chained),
            Err(_) => None,
        };
        match result {
            Ok(chained) => {
                // The sync thread answers once the log is on disk; the next leader
                // appends meanwhile. Without the thread nothing can be confirmed: the
                // batch fails closed.
                let (stats, sink) = (self.stats.clone(), self.sink.clone());
                let then = move |r| finish(r, jobs, n, started, &stats, sink.as_deref());
                match &self.syncer {
                    Some(s) => s.after(chained, Box::new(then)),
                    None => then(Err(StoreError::Closed)),
                }
            }
            Err(e) => finish(Err(e), jobs, n, started, &self.stats, self.sink.as_deref()),
        }
    }

    /// Events queued.
    fn queued_events(&self) -> usize {
        self.queued
            .lock()
            .map(|q| q.iter().map(|j| j.events.len()).sum())
            .unwrap_or(0)
    }

    /// Takes queued jobs up to `max_batch` events (at least one job).
    fn take(&self) -> Vec<Job> {
        let Ok(mut q) = self.queued.lock() else {
            return Vec::new();
        };
        let mut jobs = Vec::new();
        let mut count = 0;
        while let Some(j) = q.front() {
            if !jobs.is_empty() && count + j.events.len() > self.max_batch {
                break;
            }
            count += j.events.len();
            if let Some(j) = q.pop_front() {
                jobs.push(j);
            }
        }
        jobs
    }

    /// Appends `events` in one transaction through the leader's connection.
    fn store(&self, lead: &mut Lead, events: &[NewEvent]) -> Result<Vec<AuditEvent>, StoreError> {
        let local = self.db.local().ok_or(StoreError::Closed)?;
        local.check_open()?;
        let mut conn = match lead.conn.take() {
            Some(c) => c,
            None => local.writer(false)?,
        };
        let version = self.keys.current_version();
        let sign = |seq: i64, hash: &str| {
            (
                i64::from(version),
                chain_mac(&self.keys, version, Signed::Head, seq, hash).unwrap_or_default(),
            )
        };
        let now = crate::clock::timestamp(self.clock.now());
        let (chained, moved) =
            store::append_local(&mut conn, lead.tail.as_ref(), events, &sign, &now)?;
        // A connection that failed is dropped, and opened anew for the next batch.
        lead.conn = Some(conn);
        if moved {
            self.stats.head_moved.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chained)
    }
}
