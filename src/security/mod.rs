//! Security events: rules over the audit stream.
//!
//! Every batch of audit events, once committed, passes through [`Security::observe`].
//! The rules (thresholds in `security.*`):
//! - `failed_logins_account`: N failed sign-ins for one account within the window;
//! - `failed_logins_address`: N failed sign-ins from one address within the window;
//! - `account_locked`: an account was locked;
//! - `break_glass`: someone used break-glass access;
//! - `many_patients`: one user read more than N distinct patients within an hour;
//! - `audit_chain_broken`: an audit verification found the chain broken.
//!
//! A raised event is stored (`security_events`), logged at WARN (rule and subject
//! only), reported to Sentry when configured, counted for `/metrics`, and listed at
//! `GET /api/v1/security/events` and on the admin page. One subject raises one event
//! per rule and window, not one per attempt.
//!
//! Counting is per instance, in memory: behind a load balancer each instance sees its
//! share of the attempts (lockout itself is enforced in the database, for all).

pub mod routes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::model::{Action, NewEvent, Outcome};
use crate::clock::SharedClock;
use crate::config::SecurityConfig;
use crate::store::{Db, StoreError};

/// The rules, by the name they are stored and labelled under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    FailedLoginsAccount,
    FailedLoginsAddress,
    AccountLocked,
    BreakGlass,
    ManyPatients,
    AuditChainBroken,
    /// A patient's amendment request undecided past its 60-day deadline.
    AmendmentOverdue,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::FailedLoginsAccount,
        Rule::FailedLoginsAddress,
        Rule::AccountLocked,
        Rule::BreakGlass,
        Rule::ManyPatients,
        Rule::AuditChainBroken,
        Rule::AmendmentOverdue,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::FailedLoginsAccount => "failed_logins_account",
            Rule::FailedLoginsAddress => "failed_logins_address",
            Rule::AccountLocked => "account_locked",
            Rule::BreakGlass => "break_glass",
            Rule::ManyPatients => "many_patients",
            Rule::AuditChainBroken => "audit_chain_broken",
            Rule::AmendmentOverdue => "amendment_overdue",
        }
    }

    pub const fn severity(self) -> &'static str {
        match self {
            Rule::FailedLoginsAccount | Rule::FailedLoginsAddress => "warning",
            Rule::AccountLocked
            | Rule::BreakGlass
            | Rule::ManyPatients
            | Rule::AmendmentOverdue => "high",
            Rule::AuditChainBroken => "critical",
        }
    }
}

/// A stored security event.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct SecurityEvent {
    pub id: String,
    /// RFC 3339.
    pub at: String,
    /// The rule that raised it (`failed_logins_account`, `break_glass`, …).
    pub rule: String,
    /// `warning`, `high` or `critical`.
    pub severity: String,
    /// Whom it is about: a user id or username, or an address.
    pub subject: String,
    /// What tripped the rule: counts and thresholds, never PHI.
    pub detail: String,
}

impl SecurityEvent {
    pub fn new(rule: Rule, subject: &str, detail: &str, at: String) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            at,
            rule: rule.as_str().to_owned(),
            severity: rule.severity().to_owned(),
            subject: subject.to_owned(),
            detail: detail.to_owned(),
        }
    }
}

#[derive(Default)]
struct RuleState {
    failures_by_account: HashMap<String, VecDeque<i64>>,
    failures_by_address: HashMap<String, VecDeque<i64>>,
    /// user → (hour, distinct patients read in it).
    patients_by_user: HashMap<String, (i64, HashSet<String>)>,
    /// (rule, subject) → when it last raised.
    raised: HashMap<(Rule, String), i64>,
}

/// Above this many tracked subjects, entries outside their window are dropped.
const SWEEP_AT: usize = 10_000;

impl RuleState {
    fn sweep(&mut self, now: i64, window: i64) {
        let total = self.failures_by_account.len()
            + self.failures_by_address.len()
            + self.patients_by_user.len()
            + self.raised.len();
        if total < SWEEP_AT {
            return;
        }
        for map in [&mut self.failures_by_account, &mut self.failures_by_address] {
            map.retain(|_, q| q.back().is_some_and(|t| now - t < window));
        }
        self.patients_by_user
            .retain(|_, (hour, _)| *hour == now / 3600);
        self.raised.retain(|_, t| now - *t < window.max(3600));
    }
}

/// The security event service of one process.
#[derive(Clone)]
pub struct Security {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    clock: SharedClock,
    cfg: SecurityConfig,
    state: Mutex<RuleState>,
    counts: [AtomicU64; Rule::ALL.len()],
}

/// Counts `at` into `q` (a window of timestamps) and says whether it reached `limit`.
fn count_in_window(q: &mut VecDeque<i64>, at: i64, window: i64, limit: u32) -> bool {
    q.push_back(at);
    while q.front().is_some_and(|t| at - t >= window) {
        q.pop_front();
    }
    // Only the last `limit` matter.
    while q.len() > limit as usize {
        q.pop_front();
    }
    limit > 0 && q.len() >= limit as usize
}

impl Security {
    pub fn new(db: Db, clock: SharedClock, cfg: SecurityConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                clock,
                cfg,
                state: Mutex::new(RuleState::default()),
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        }
    }

    /// Events raised by this process, by rule.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        Rule::ALL
            .iter()
            .zip(self.inner.counts.iter())
            .map(|(r, c)| (r.as_str(), c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether any rule looks at this event.
    pub fn looks_at(e: &NewEvent) -> bool {
        match e.action {
            Action::LoginFailed | Action::AccountLocked | Action::BreakGlass => true,
            // A read that disclosed the patient (a refused or failed one names the
            // patient too, but read nothing).
            Action::Read => e.patient_id.is_some() && e.outcome == Outcome::Success,
            _ => false,
        }
    }

    /// Runs the rules over committed audit events; raises what they find.
    pub fn observe(&self, events: &[NewEvent]) {
        if !events.iter().any(Self::looks_at) {
            return;
        }
        let now = self.inner.clock.now().unix_timestamp();
        let window = i64::try_from(self.inner.cfg.window.std().as_secs())
            .unwrap_or(i64::MAX)
            .max(1);
        let cfg = &self.inner.cfg;
        let mut raise: Vec<(Rule, String, String)> = Vec::new();
        {
            let mut st = self
                .inner
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.sweep(now, window);
            for e in events {
                let who = e
                    .actor_id
                    .clone()
                    .or_else(|| e.actor.clone())
                    .unwrap_or_else(|| "unknown".to_owned());
                match e.action {
                    Action::LoginFailed | Action::AccountLocked => {
                        let account = st.failures_by_account.entry(who.clone()).or_default();
                        if count_in_window(account, now, window, cfg.failed_logins_per_account) {
                            raise.push((
                                Rule::FailedLoginsAccount,
                                who.clone(),
                                format!(
                                    "{} failed sign-ins within {}",
                                    cfg.failed_logins_per_account, cfg.window
                                ),
                            ));
                        }
                        if let Some(ip) = &e.ip {
                            let q = st.failures_by_address.entry(ip.clone()).or_default();
                            if count_in_window(q, now, window, cfg.failed_logins_per_address) {
                                raise.push((
                                    Rule::FailedLoginsAddress,
                                    ip.clone(),
                                    format!(
                                        "{} failed sign-ins from one address within {}",
                                        cfg.failed_logins_per_address, cfg.window
                                    ),
                                ));
                            }
                        }
                        if e.action == Action::AccountLocked {
                            raise.push((
                                Rule::AccountLocked,
                                who.clone(),
                                "the account is locked after failed sign-ins".to_owned(),
                            ));
                        }
                    }
                    Action::BreakGlass => raise.push((
                        Rule::BreakGlass,
                        who.clone(),
                        format!(
                            "break-glass access, {} {}",
                            e.method.as_deref().unwrap_or(""),
                            e.path.as_deref().unwrap_or("")
                        ),
                    )),
                    Action::Read
                        if cfg.distinct_patients_per_hour > 0 && e.outcome == Outcome::Success =>
                    {
                        if let Some(p) = &e.patient_id {
                            let hour = now / 3600;
                            let entry = st
                                .patients_by_user
                                .entry(who.clone())
                                .or_insert_with(|| (hour, HashSet::new()));
                            if entry.0 != hour {
                                *entry = (hour, HashSet::new());
                            }
                            entry.1.insert(p.clone());
                            if entry.1.len() > cfg.distinct_patients_per_hour as usize {
                                raise.push((
                                    Rule::ManyPatients,
                                    who.clone(),
                                    format!(
                                        "more than {} distinct patients read within an hour",
                                        cfg.distinct_patients_per_hour
                                    ),
                                ));
                            }
                        }
                    }
                    _ => {}
                }
            }
            // One event per rule and subject per window (break-glass: every use).
            raise.retain(|(rule, subject, _)| {
                if *rule == Rule::BreakGlass {
                    return true;
                }
                let key = (*rule, subject.clone());
                let span = if *rule == Rule::ManyPatients {
                    3600
                } else {
                    window
                };
                match st.raised.get(&key) {
                    Some(t) if now - t < span => false,
                    _ => {
                        st.raised.insert(key, now);
                        true
                    }
                }
            });
        }
        for (rule, subject, detail) in raise {
            self.raise(rule, &subject, &detail);
        }
    }

    /// Raises one event: counted, logged, reported, stored (in the background).
    pub fn raise(&self, rule: Rule, subject: &str, detail: &str) {
        if let Some(i) = Rule::ALL.iter().position(|r| *r == rule)
            && let Some(c) = self.inner.counts.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(
            rule = rule.as_str(),
            severity = rule.severity(),
            subject,
            "security event: {detail}"
        );
        crate::telemetry::report_security_event(rule.as_str(), rule.severity(), detail);
        let event = SecurityEvent::new(
            rule,
            subject,
            detail,
            crate::clock::timestamp(self.inner.clock.now()),
        );
        let db = self.inner.db.clone();
        let store = async move {
            if let Err(e) = insert(&db, &event).await {
                tracing::error!(error = %e, rule = %event.rule, "security event could not be stored");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(store);
            }
            Err(_) => tracing::error!("security event raised outside the runtime; not stored"),
        }
    }

    /// The newest events first.
    pub async fn list(&self, limit: u32) -> Result<Vec<SecurityEvent>, StoreError> {
        list(&self.inner.db, limit).await
    }

    /// The events matching `f`, newest first, `limit` at a time, with the cursor of the
    /// next page.
    pub async fn search(&self, f: &Filter, limit: u32) -> Result<SecurityPage, StoreError> {
        let limit = limit.clamp(1, 500);
        let mut items = search(&self.inner.db, f, i64::from(limit) + 1).await?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|e| encode_cursor(&e.at, &e.id))
        } else {
            None
        };
        Ok(SecurityPage { items, next_cursor })
    }
}

/// Which security events to list (every field optional; all of them must match).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// A rule's name (`failed_logins_account`, …).
    pub rule: Option<String>,
    /// `warning`, `high` or `critical`.
    pub severity: Option<String>,
    /// The exact subject (a user id or username, or an address).
    pub subject: Option<String>,
    /// Stored timestamps: at or after `since`, before `until`.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Older than this event (a cursor: its time and id).
    pub before: Option<(String, String)>,
}

/// A page of security events.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SecurityPage {
    pub items: Vec<SecurityEvent>,
    /// Pass it back as `cursor` for the next (older) page; null on the last.
    pub next_cursor: Option<String>,
}

/// The severities, from the least to the most urgent.
pub const SEVERITIES: [&str; 3] = ["warning", "high", "critical"];

/// The cursor after an event: its time and id.
pub fn encode_cursor(at: &str, id: &str) -> String {
    format!("{at}~{id}")
}

/// A cursor back into the time and id it came from (None when it is not one).
pub fn decode_cursor(c: &str) -> Option<(String, String)> {
    let (at, id) = c.split_once('~')?;
    let at = crate::clock::parse_rfc3339(at)?;
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then(|| (at, id.to_owned()))
}

/// The events matching `f`, newest first, at most `limit`.
pub async fn search(db: &Db, f: &Filter, limit: i64) -> Result<Vec<SecurityEvent>, StoreError> {
    let mut sql = String::from(
        "SELECT id, at, rule, severity, subject, detail FROM security_events WHERE 1 = 1",
    );
    let mut binds: Vec<String> = Vec::new();
    let mut add = |clause: &str, value: &str| {
        binds.push(value.to_owned());
        sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
    };
    if let Some(r) = &f.rule {
        add(" AND rule = ?", r);
    }
    if let Some(s) = &f.severity {
        add(" AND severity = ?", s);
    }
    if let Some(s) = &f.subject {
        add(" AND subject = ?", s);
    }
    if let Some(s) = &f.since {
        add(" AND at >= ?", s);
    }
    if let Some(u) = &f.until {
        add(" AND at < ?", u);
    }
    if let Some((at, id)) = &f.before {
        add(" AND (at < ?", at);
        add(" OR (at = ?", at);
        add(" AND id < ?))", id);
    }
    let n = binds.len() + 1;
    sql.push_str(&format!(" ORDER BY at DESC, id DESC LIMIT ${n}"));
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for b in binds {
        q = q.bind(b);
    }
    let rows = q.bind(limit).fetch_all(db.reader()).await?;
    rows.iter()
        .map(|r| {
            Ok(SecurityEvent {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                rule: r.try_get("rule")?,
                severity: r.try_get("severity")?,
                subject: r.try_get("subject")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The CSV columns of an export of security events (their JSON field names).
pub const CSV_COLUMNS: [&str; 6] = ["id", "at", "rule", "severity", "subject", "detail"];

/// One event as a CSV line (cells quoted and defused like the audit export's).
pub fn csv_line(e: &SecurityEvent) -> String {
    let cells = [&e.id, &e.at, &e.rule, &e.severity, &e.subject, &e.detail];
    let line: Vec<String> = cells
        .iter()
        .map(|c| crate::audit::export::csv_cell(c))
        .collect();
    line.join(",")
}

pub async fn insert(db: &Db, e: &SecurityEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO security_events (id, at, rule, severity, subject, detail) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(e.id.clone())
    .bind(e.at.clone())
    .bind(e.rule.clone())
    .bind(e.severity.clone())
    .bind(e.subject.clone())
    .bind(e.detail.clone())
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn list(db: &Db, limit: u32) -> Result<Vec<SecurityEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, at, rule, severity, subject, detail FROM security_events ORDER BY at DESC, id DESC LIMIT $1",
    )
    .bind(i64::from(limit.clamp(1, 500)))
    .fetch_all(db.reader())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SecurityEvent {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                rule: r.try_get("rule")?,
                severity: r.try_get("severity")?,
                subject: r.try_get("subject")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let id = uuid::Uuid::now_v7().to_string();
        let at = "2026-01-31T10:00:00.123456Z";
        let (a, i) = decode_cursor(&encode_cursor(at, &id)).unwrap();
        assert_eq!(i, id);
        assert_eq!(crate::clock::parse_rfc3339(at).as_deref(), Some(a.as_str()));
        for bad in [
            "",
            "~",
            "x~y",
            "2026-01-31T10:00:00Z~",
            "2026-01-31T10:00:00Z~a'b",
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_window_counts_only_recent_attempts() {
        let mut q = VecDeque::new();
        assert!(!count_in_window(&mut q, 0, 60, 3));
        assert!(!count_in_window(&mut q, 10, 60, 3));
        assert!(count_in_window(&mut q, 20, 60, 3));
        // 70 s later the first two are out of the window.
        assert!(!count_in_window(&mut q, 75, 60, 3));
        assert!(
            !count_in_window(&mut q, 0, 60, 0),
            "0 switches the rule off"
        );
    }
}
