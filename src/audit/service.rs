//! The audit trail's rules: recording (durable before the response), verification,
//! queries, export and the retention purge. No HTTP here.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use super::model::{Action, AuditEvent, GENESIS, NewEvent, Outcome};
use super::store::{self, Checkpoint, Filter};
use super::writer::{AuditError, Signed, Sink, Writer, WriterSettings, chain_mac};
use crate::clock::SharedClock;
use crate::config::AuditConfig;
use crate::crypto::SharedKeyring;
use crate::store::{Db, StoreError};

/// The audit trail of a running process.
#[derive(Clone)]
pub struct AuditLog {
    writer: Option<Writer>,
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    counts: Arc<[std::sync::atomic::AtomicU64; Action::ALL.len()]>,
    observer: Arc<std::sync::OnceLock<crate::security::Security>>,
    subjects: Arc<std::sync::OnceLock<Arc<dyn super::middleware::Subjects>>>,
}

impl AuditLog {
    /// Starts the writer (unless `audit.enabled` is false) and the optional sink.
    pub fn start(
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
        cfg: &AuditConfig,
    ) -> anyhow::Result<Self> {
        let sink: Option<Arc<dyn Sink>> = match cfg.sink.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("stdout") => Some(Arc::new(JsonLines::Stdout)),
            Some(path) => Some(Arc::new(JsonLines::file(Path::new(path))?)),
        };
        let writer = cfg.enabled.then(|| {
            Writer::start(
                db.clone(),
                keys.clone(),
                clock.clone(),
                WriterSettings {
                    max_batch: cfg.max_batch as usize,
                    batch_wait: cfg.batch_wait.std(),
                    queue: cfg.queue as usize,
                    commit_timeout: cfg.commit_timeout.std(),
                },
                sink,
            )
        });
        Ok(Self {
            writer,
            db,
            keys,
            clock,
            counts: Arc::new(std::array::from_fn(|_| {
                std::sync::atomic::AtomicU64::new(0)
            })),
            observer: Arc::new(std::sync::OnceLock::new()),
            subjects: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Stores `events` durably; returns when they are committed.
    pub async fn record(&self, events: Vec<NewEvent>) -> Result<(), AuditError> {
        let actions: Vec<Action> = events.iter().map(|e| e.action).collect();
        // Only what a security rule looks at is copied for the rules.
        let observed = self.observer.get().and_then(|o| {
            let relevant: Vec<NewEvent> = events
                .iter()
                .filter(|e| crate::security::Security::looks_at(e))
                .cloned()
                .collect();
            (!relevant.is_empty()).then_some((o, relevant))
        });
        let result = match &self.writer {
            Some(w) => w.append(events).await,
            None => Ok(()),
        };
        if result.is_ok() {
            if let Some((o, events)) = observed {
                o.observe(&events);
            }
            for a in actions {
                if let Some(i) = Action::ALL.iter().position(|x| *x == a) {
                    self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        result
    }

    /// Hands every committed batch to the security rules (set once, at start-up).
    pub fn observe_with(&self, security: crate::security::Security) {
        let _ = self.observer.set(security);
    }

    /// Says what requests refused before their handler were about (set once, at start-up).
    pub fn describe_with(&self, subjects: Arc<dyn super::middleware::Subjects>) {
        let _ = self.subjects.set(subjects);
    }

    pub fn subjects(&self) -> Option<&dyn super::middleware::Subjects> {
        self.subjects.get().map(|s| &**s)
    }

    /// Events recorded so far in this process, by action (for `/metrics`).
    pub fn action_counts(&self) -> Vec<(&'static str, u64)> {
        Action::ALL
            .iter()
            .zip(self.counts.iter())
            .map(|(a, c)| (a.as_str(), c.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    /// The fixed-width timestamp of now.
    pub fn now(&self) -> String {
        crate::clock::timestamp(self.clock.now())
    }

    /// A new event stamped now.
    pub fn event(&self, action: Action, outcome: Outcome) -> NewEvent {
        NewEvent::new(action, outcome, self.now())
    }

    /// Waits until every event handed to the writer so far is committed.
    pub async fn flush(&self) -> Result<(), AuditError> {
        match &self.writer {
            Some(w) => w.flush().await,
            None => Ok(()),
        }
    }

    pub fn writer(&self) -> Option<&Writer> {
        self.writer.as_ref()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Walks the whole chain from its anchor and checks the signed head.
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        verify(&self.db, &self.keys).await
    }

    /// Events matching `filter`, newest first, with a cursor for the next page.
    pub async fn page(&self, filter: &Filter, limit: u32) -> Result<Page, StoreError> {
        let limit = i64::from(limit.clamp(1, MAX_PAGE));
        let mut items = store::query(&self.db, filter, limit + 1, false).await?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|e| encode_cursor(e.seq))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    /// Every event matching `filter`, oldest first, in pages, handed to `out`.
    pub async fn export(
        &self,
        filter: &Filter,
        mut out: impl FnMut(&AuditEvent) -> std::io::Result<()>,
    ) -> Result<u64, ExportError> {
        let mut f = filter.clone();
        let mut n = 0;
        loop {
            let batch = store::query(&self.db, &f, 1000, true).await?;
            let Some(last) = batch.last() else { break };
            f.after_seq = Some(last.seq);
            for e in &batch {
                out(e)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes events older than `retention`, leaving a signed checkpoint so that the
    /// rest of the chain still verifies. Returns the number removed.
    pub async fn purge(&self, retention: Duration) -> Result<PurgeReport, ExportError> {
        let cutoff = self.clock.now() - retention;
        let cutoff = crate::clock::timestamp(cutoff);
        let Some(up_to) = store::last_seq_before(&self.db, &cutoff).await? else {
            return Ok(PurgeReport {
                purged: 0,
                up_to_seq: None,
            });
        };
        // The chain must be intact before anything is removed.
        let report = self.verify().await?;
        if !report.ok {
            return Err(ExportError::Refused(format!(
                "the audit chain does not verify ({}); nothing was purged",
                report.reason.unwrap_or_default()
            )));
        }
        let Some(last) = store::by_seq(&self.db, up_to).await? else {
            return Ok(PurgeReport {
                purged: 0,
                up_to_seq: None,
            });
        };
        let previous = store::latest_checkpoint(&self.db).await?;
        let (previous_seq, previous_purged) = previous.map_or((0, 0), |c| (c.seq, c.purged));
        let version = self.keys.current_version();
        let cp = Checkpoint {
            seq: last.seq,
            hash: last.hash.clone(),
            purged: previous_purged + (up_to - previous_seq),
            at: self.now(),
            key_version: i64::from(version),
            mac: checkpoint_mac(&self.keys, version, last.seq, &last.hash).unwrap_or_default(),
        };
        let purged = store::purge(&self.db, up_to, &cp).await?;
        Ok(PurgeReport {
            purged,
            up_to_seq: Some(up_to),
        })
    }
}

fn checkpoint_mac(keys: &SharedKeyring, version: u32, seq: i64, hash: &str) -> Option<String> {
    chain_mac(keys, version, Signed::Checkpoint, seq, hash)
}

/// The largest page the query returns.
pub const MAX_PAGE: u32 = 500;

#[derive(Debug, Serialize, ToSchema)]
pub struct Page {
    pub items: Vec<AuditEvent>,
    pub next_cursor: Option<String>,
}

pub fn encode_cursor(seq: i64) -> String {
    format!("s{seq}")
}

pub fn decode_cursor(c: &str) -> Option<i64> {
    c.strip_prefix('s')?.parse().ok().filter(|s: &i64| *s > 0)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Serialize)]
pub struct PurgeReport {
    pub purged: u64,
    pub up_to_seq: Option<i64>,
}

/// The result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    /// Events checked.
    pub events: i64,
    /// Hash of the newest event (the head), when the chain is intact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The first event that does not verify (`head` when the signed head itself is wrong).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl VerifyReport {
    fn bad(events: i64, first_bad: &str, reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            events,
            head: None,
            first_bad: Some(first_bad.to_owned()),
            reason: Some(reason.into()),
        }
    }
}

/// The patients an event names: its `patient_id` and its context's `patient_ids`.
fn named_patients(e: &AuditEvent) -> Vec<String> {
    let mut out: Vec<String> = e.patient_id.iter().cloned().collect();
    if e.context.contains("\"patient_ids\"")
        && let Ok(serde_json::Value::Object(c)) = serde_json::from_str(&e.context)
        && let Some(serde_json::Value::Array(ids)) = c.get("patient_ids")
    {
        out.extend(ids.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    out.sort();
    out.dedup();
    out
}

/// The first event of `page` whose named patients differ from the index rows
/// (`(seq, patient_id)`, ordered) over the page's range; an index row for a seq that
/// is not in the page is blamed on the page's first event.
fn index_mismatch(page: &[AuditEvent], indexed: &[(i64, String)]) -> Option<String> {
    let mut rows = indexed.iter().peekable();
    for e in page {
        // Rows before this event's seq belong to no event of the page.
        if rows.peek().is_some_and(|(s, _)| *s < e.seq) {
            return page.first().map(|f| f.id.clone());
        }
        let mut got = Vec::new();
        while let Some((_, p)) = rows.next_if(|(s, _)| *s == e.seq) {
            got.push(p.clone());
        }
        // In byte order, whatever the database's collation.
        got.sort();
        if got != named_patients(e) {
            return Some(e.id.clone());
        }
    }
    rows.peek().and_then(|_| page.last().map(|l| l.id.clone()))
}

/// How many times verification follows events appended while it ran.
const VERIFY_CATCH_UP: u32 = 100;

/// Verifies the chain: every link, every hash, the sequence, the signed head, and the
/// patient index (`audit_event_patients`) against the patients the events name.
pub async fn verify(db: &Db, keys: &SharedKeyring) -> Result<VerifyReport, StoreError> {
    let (mut expected_seq, mut prev) = match store::latest_checkpoint(db).await? {
        Some(cp) => {
            let ok = u32::try_from(cp.key_version)
                .ok()
                .and_then(|v| checkpoint_mac(keys, v, cp.seq, &cp.hash))
                .is_some_and(|m| crate::crypto::constant_time_eq(m.as_bytes(), cp.mac.as_bytes()));
            if !ok {
                return Ok(VerifyReport::bad(
                    0,
                    "checkpoint",
                    "the retention checkpoint's signature does not verify",
                ));
            }
            (cp.seq + 1, cp.hash)
        }
        None => (1, GENESIS.to_owned()),
    };
    let mut checked = 0i64;
    // Index rows are compared page by page, from the lowest seq there can be.
    let mut indexed_from = i64::MIN;
    // The head is read after the walk. Appends move the head in the transaction that
    // inserts their events, so a head behind the last event seen means events were added
    // without it; a head ahead of it means requests appended while this ran: the walk
    // goes on to them (a bounded number of times), so a live server verifies clean.
    let mut rounds = 0;
    let (head, last_seq) = loop {
        loop {
            let page = store::page_ascending(db, expected_seq - 1, 1000).await?;
            if page.is_empty() {
                break;
            }
            for e in &page {
                if e.seq != expected_seq {
                    return Ok(VerifyReport::bad(
                        checked,
                        &e.id,
                        format!(
                            "events {expected_seq}..{} are missing before this one",
                            e.seq - 1
                        ),
                    ));
                }
                if e.prev_hash != prev {
                    return Ok(VerifyReport::bad(
                        checked,
                        &e.id,
                        "its link to the previous event is broken",
                    ));
                }
                if e.compute_hash() != e.hash {
                    return Ok(VerifyReport::bad(
                        checked,
                        &e.id,
                        "its content does not match its hash (edited)",
                    ));
                }
                prev.clone_from(&e.hash);
                expected_seq += 1;
                checked += 1;
            }
            let upto = expected_seq - 1;
            let indexed = store::patients_named(db, indexed_from, upto).await?;
            if let Some(bad) = index_mismatch(&page, &indexed) {
                return Ok(VerifyReport::bad(
                    checked,
                    &bad,
                    "the patients it names do not match the patient index (an index row removed or added)",
                ));
            }
            indexed_from = upto;
        }
        let last_seq = expected_seq - 1;
        let Some(head) = store::head(db).await? else {
            return Ok(VerifyReport::bad(
                checked,
                "head",
                "the chain head is missing",
            ));
        };
        if head.seq > last_seq && rounds < VERIFY_CATCH_UP {
            rounds += 1;
            continue;
        }
        break (head, last_seq);
    };
    // Index rows past the chain's end that name no event. (An event appended since the
    // last page is inserted with its rows in one transaction: never counted here.)
    let orphans = store::index_orphans(db, indexed_from).await?;
    if head.seq == 0 && last_seq == 0 && head.mac.is_empty() && !orphans {
        return Ok(VerifyReport {
            ok: true,
            events: 0,
            head: Some(prev),
            first_bad: None,
            reason: None,
        });
    }
    let signed = u32::try_from(head.key_version)
        .ok()
        .and_then(|v| chain_mac(keys, v, Signed::Head, head.seq, &head.hash))
        .is_some_and(|m| crate::crypto::constant_time_eq(m.as_bytes(), head.mac.as_bytes()));
    if !signed {
        return Ok(VerifyReport::bad(
            checked,
            "head",
            "the chain head's signature does not verify",
        ));
    }
    if head.seq != last_seq || head.hash != prev {
        return Ok(VerifyReport::bad(
            checked,
            "head",
            format!(
                "the signed head is at event {} but the chain ends at {last_seq} (events removed or added)",
                head.seq
            ),
        ));
    }
    if orphans {
        return Ok(VerifyReport::bad(
            checked,
            "index",
            "the patient index names events that do not exist",
        ));
    }
    Ok(VerifyReport {
        ok: true,
        events: checked,
        head: Some(prev),
        first_bad: None,
        reason: None,
    })
}

/// Copies committed events as JSON lines, for shipping to a log system.
enum JsonLines {
    Stdout,
    File(Mutex<std::fs::File>),
}

impl JsonLines {
    fn file(path: &Path) -> anyhow::Result<Self> {
        let mut o = std::fs::OpenOptions::new();
        o.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let f = o
            .open(path)
            .map_err(|e| anyhow::anyhow!("audit.sink: cannot open {}: {e}", path.display()))?;
        Ok(Self::File(Mutex::new(f)))
    }
}

impl Sink for JsonLines {
    fn write(&self, events: &[AuditEvent]) {
        let mut buf = Vec::with_capacity(events.len() * 512);
        for e in events {
            let line = serde_json::json!({ "audit": e });
            if serde_json::to_writer(&mut buf, &line).is_ok() {
                buf.push(b'\n');
            }
        }
        let result = match self {
            JsonLines::Stdout => std::io::stdout().lock().write_all(&buf),
            JsonLines::File(f) => match f.lock() {
                Ok(mut f) => f.write_all(&buf),
                Err(_) => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "audit sink: write failed (the events are stored; only the copy is missing)");
        }
    }
}
