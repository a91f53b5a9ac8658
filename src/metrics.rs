//! `GET /metrics`: Prometheus text for the operators.
//!
//! Requests by route pattern, method and status with a latency histogram; the audit
//! writer's queue, batches and failures; audited actions (sign-in failures, lockouts,
//! break-glass, …); rate-limit decisions; key versions; security events. Labels are
//! route *patterns* (`/api/v1/patients/{id}`), never concrete paths, users or
//! addresses, so nothing identifying reaches a metric.
//!
//! Every label takes its values from a fixed set, whatever a client sends: routes are
//! the router's patterns or `(unmatched)`, methods are [`crate::http::method_label`]
//! (an invented method is `_OTHER`), statuses are the codes this server's own handlers answer,
//! and actions, rules and modes are enums of the code. So the number of series is
//! bounded by the code, not by the traffic.
//!
//! Who may read it: whoever sends the scrape token (`monitoring.metrics_token_file`)
//! as `Authorization: Bearer …` (Prometheus' `authorization` scrape setting), or a user
//! with `audit:read`; in dev also any address in `monitoring.metrics_allow` (default
//! loopback) without a credential. Staging and prod always need a credential: behind a
//! reverse proxy on the same machine every client arrives from loopback. Anyone else
//! gets 404, as if there were nothing there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::access::Permission;
use crate::app::AppState;
use crate::config::Environment;
use crate::http::client_ip::ClientIp;
use crate::http::{ApiError, ErrorCode};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default, Clone)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Request counters of one process, and the scrape token that may read them.
#[derive(Default)]
pub struct Metrics {
    /// (route, method, status) → series.
    requests: Mutex<BTreeMap<SeriesKey, Series>>,
    /// SHA-256 of the scrape token (compared in constant time), when one is configured.
    scrape_token: Option<[u8; 32]>,
}

/// The labels of one request series: route pattern, bounded method, status.
type SeriesKey = (String, &'static str, u16);

impl Metrics {
    /// Counters for a process whose scrapers present `scrape_token`.
    pub fn new(scrape_token: Option<&crate::config::Secret>) -> Self {
        Self {
            requests: Mutex::default(),
            scrape_token: scrape_token.map(|t| digest(t.expose())),
        }
    }

    /// Whether `bearer` is the configured scrape token.
    fn is_scrape_token(&self, bearer: &str) -> bool {
        self.scrape_token
            .is_some_and(|want| crate::crypto::constant_time_eq(&want, &digest(bearer)))
    }

    fn observe(&self, route: String, method: &'static str, status: u16, seconds: f64) {
        let mut map = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = map.entry((route, method, status)).or_default();
        s.count += 1;
        s.sum += seconds;
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le
                && let Some(b) = s.buckets.get_mut(i)
            {
                *b += 1;
            }
        }
    }

    fn snapshot(&self) -> BTreeMap<SeriesKey, Series> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Counts every routed request (after routing, so the label is the pattern).
pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(unmatched)".to_owned(), |p| p.as_str().to_owned());
    let method = crate::http::method_label(req.method());
    let res = next.run(req).await;
    state.metrics().observe(
        route,
        method,
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    res
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Prometheus label value escaping.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(4096);
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };

    let requests = state.metrics().snapshot();
    head(
        &mut out,
        "custodian_http_requests_total",
        "counter",
        "Requests answered, by route pattern, method and status.",
    );
    for ((route, method, status), s) in &requests {
        let _ = writeln!(
            out,
            "custodian_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {}",
            label(route),
            s.count
        );
    }
    head(
        &mut out,
        "custodian_http_request_duration_seconds",
        "histogram",
        "Time from routing to response, by route pattern and method.",
    );
    let mut by_route: BTreeMap<(&str, &str), Series> = BTreeMap::new();
    for ((route, method, _), s) in &requests {
        let agg = by_route.entry((route, method)).or_default();
        agg.count += s.count;
        agg.sum += s.sum;
        for (a, b) in agg.buckets.iter_mut().zip(s.buckets.iter()) {
            *a += b;
        }
    }
    for ((route, method), s) in &by_route {
        let l = format!("route=\"{}\",method=\"{method}\"", label(route));
        for (le, n) in BUCKETS.iter().zip(s.buckets.iter()) {
            let _ = writeln!(
                out,
                "custodian_http_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "custodian_http_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            s.count
        );
        let _ = writeln!(
            out,
            "custodian_http_request_duration_seconds_sum{{{l}}} {}",
            s.sum
        );
        let _ = writeln!(
            out,
            "custodian_http_request_duration_seconds_count{{{l}}} {}",
            s.count
        );
    }

    // The audit writer.
    if let Some(w) = state.audit().writer() {
        let [batches, events, failures, micros, largest, moved] = w.stats().snapshot();
        let last = w.stats().last_batch.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, String); 8] = [
            (
                "custodian_audit_queue_depth",
                "gauge",
                "Requests whose events wait for an audit batch.",
                w.queue_depth().to_string(),
            ),
            (
                "custodian_audit_batches_total",
                "counter",
                "Audit batches committed.",
                batches.to_string(),
            ),
            (
                "custodian_audit_events_total",
                "counter",
                "Audit events committed.",
                events.to_string(),
            ),
            (
                "custodian_audit_failures_total",
                "counter",
                "Audit batches that could not be stored (their requests failed closed).",
                failures.to_string(),
            ),
            (
                "custodian_audit_store_seconds_total",
                "counter",
                "Time spent storing audit batches.",
                format!("{}", micros as f64 / 1e6),
            ),
            (
                "custodian_audit_batch_size_largest",
                "gauge",
                "Largest audit batch so far.",
                largest.to_string(),
            ),
            (
                "custodian_audit_batch_size_last",
                "gauge",
                "Size of the last audit batch.",
                last.to_string(),
            ),
            (
                "custodian_audit_head_moved_total",
                "counter",
                "Batches that found another process had appended first.",
                moved.to_string(),
            ),
        ];
        for (name, kind, help, value) in rows {
            head(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
    head(
        &mut out,
        "custodian_audit_actions_total",
        "counter",
        "Audited actions recorded by this process, by action.",
    );
    let counts = state.audit().action_counts();
    for (action, n) in &counts {
        let _ = writeln!(
            out,
            "custodian_audit_actions_total{{action=\"{action}\"}} {n}"
        );
    }
    let count = |a: &str| counts.iter().find(|(x, _)| *x == a).map_or(0, |(_, n)| *n);
    for (name, help, action) in [
        (
            "custodian_login_failures_total",
            "Failed sign-ins.",
            "login_failed",
        ),
        (
            "custodian_lockouts_total",
            "Accounts locked after failed sign-ins.",
            "account_locked",
        ),
        (
            "custodian_break_glass_total",
            "Break-glass accesses.",
            "break_glass",
        ),
    ] {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", count(action));
    }

    // Rate limits.
    let limiter = state.limiter();
    let stats = limiter.stats();
    for (name, help, value) in [
        (
            "custodian_rate_limit_allowed_total",
            "Requests the rate limiter let through.",
            stats.allowed.load(Ordering::Relaxed),
        ),
        (
            "custodian_rate_limit_rejections_total",
            "Requests refused with 429 by the rate limiter.",
            stats.refused.load(Ordering::Relaxed),
        ),
        (
            "custodian_rate_limit_redis_failures_total",
            "Rate-limit checks Redis failed (answered locally).",
            stats.redis_failures.load(Ordering::Relaxed),
        ),
    ] {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    head(
        &mut out,
        "custodian_rate_limit_mode",
        "gauge",
        "Where rate limits are counted (1 for the current mode).",
    );
    let mode = limiter.mode();
    for m in [
        crate::ratelimit::Mode::Off,
        crate::ratelimit::Mode::Local,
        crate::ratelimit::Mode::Shared,
        crate::ratelimit::Mode::Degraded,
    ] {
        let _ = writeln!(
            out,
            "custodian_rate_limit_mode{{mode=\"{}\"}} {}",
            m.as_str(),
            u8::from(m == mode)
        );
    }

    // Keys.
    head(
        &mut out,
        "custodian_key_version_current",
        "gauge",
        "The key version new data is encrypted under.",
    );
    let _ = writeln!(
        out,
        "custodian_key_version_current {}",
        state.keys().current_version()
    );
    head(
        &mut out,
        "custodian_key_versions",
        "gauge",
        "Key versions in the keyring (older ones still decrypt).",
    );
    let _ = writeln!(
        out,
        "custodian_key_versions {}",
        state.keys().version_count()
    );

    head(
        &mut out,
        "custodian_error_reports_dropped_total",
        "counter",
        "Error reports dropped (queue full or Sentry not answering).",
    );
    let _ = writeln!(
        out,
        "custodian_error_reports_dropped_total {}",
        crate::reporting::DROPPED.load(Ordering::Relaxed)
    );

    // Security events.
    head(
        &mut out,
        "custodian_security_events_total",
        "counter",
        "Security events raised by this process, by rule.",
    );
    for (rule, n) in state.security().counts() {
        let _ = writeln!(
            out,
            "custodian_security_events_total{{rule=\"{rule}\"}} {n}"
        );
    }
    out
}

/// `GET /metrics`.
pub async fn handler(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let open = state.config().env == Environment::Dev
        && req
            .extensions()
            .get::<ClientIp>()
            .is_some_and(|ClientIp(ip)| state.config().monitoring.metrics_allow.contains(ip));
    let scraper = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| state.metrics().is_scrape_token(t.trim()));
    if !open && !scraper {
        let (mut parts, _) = req.into_parts();
        let allowed = crate::identity::extract::pre_authenticate(&mut parts, &state)
            .await
            .is_some_and(|p| p.has(Permission::AuditRead));
        if !allowed {
            return Err(ApiError::new(ErrorCode::NotFound));
        }
    }
    let mut res = render(&state).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(res)
}
