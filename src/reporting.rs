//! Error reports to Sentry, when `monitoring.sentry_dsn` is set.
//!
//! - ERROR log lines become Sentry events, WARN and INFO lines breadcrumbs (the
//!   `sentry-tracing` layer); security events are sent as events of their own.
//! - `before_send` and `before_breadcrumb` pass everything through [`crate::scrub`]
//!   and drop what a report never needs: request bodies, cookies, query strings, every
//!   header outside [`ALLOWED_HEADERS`], the user, and free-form `extra` data. The
//!   scrubber keeps the fields Sentry itself needs (ids, timestamps, levels, SDK).
//! - Sampling: `monitoring.sentry_sample_rate` for errors (default 1.0) and
//!   `monitoring.sentry_traces_sample_rate` for performance traces (default 0: off).
//! - Transport: our own, small, over the rustls stack the server already uses (the
//!   crate's default transport would bring a second HTTP and TLS stack). Envelopes
//!   queue (at most [`QUEUE`]) for one background thread; when the queue is full they
//!   are dropped and counted, never blocking a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use sentry::protocol::{Breadcrumb, Envelope, Event};
use sentry::types::Dsn;

use crate::config::Secret;

/// Request headers a report may keep.
pub const ALLOWED_HEADERS: &[&str] = &["user-agent", "content-type", "accept", "x-request-id"];
/// Envelopes waiting to be sent before new ones are dropped.
const QUEUE: usize = 64;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Envelopes dropped because the queue was full or sending failed.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Fields of an event or breadcrumb that are Sentry's own bookkeeping, not content.
const KEEP: &[&str] = &[
    "event_id",
    "timestamp",
    "start_timestamp",
    "level",
    "platform",
    "release",
    "environment",
    "sdk",
    "type",
    "category",
    "logger",
    "server_name",
    "transaction",
    "trace_id",
    "span_id",
];

/// An event, scrubbed and trimmed for sending; `None` drops it.
pub fn clean_event(event: Event<'static>) -> Option<Event<'static>> {
    let mut v = serde_json::to_value(&event).ok()?;
    if let Some(map) = v.as_object_mut() {
        map.remove("user");
        map.remove("extra");
        if let Some(req) = map.get_mut("request").and_then(|r| r.as_object_mut()) {
            for k in ["data", "cookies", "query_string", "env", "url"] {
                req.remove(k);
            }
            if let Some(headers) = req.get_mut("headers").and_then(|h| h.as_object_mut()) {
                headers.retain(|k, _| ALLOWED_HEADERS.contains(&k.to_ascii_lowercase().as_str()));
            }
        }
    }
    crate::scrub::scrub_json(&mut v, KEEP);
    serde_json::from_value(v).ok()
}

/// A breadcrumb, scrubbed; `None` drops it.
pub fn clean_breadcrumb(b: Breadcrumb) -> Option<Breadcrumb> {
    let mut v = serde_json::to_value(&b).ok()?;
    crate::scrub::scrub_json(&mut v, KEEP);
    serde_json::from_value(v).ok()
}

/// Sends a security event as a Sentry event of its own (no-op without a client).
pub fn security_event(rule: &str, severity: &str, detail: &str) {
    let level = match severity {
        "critical" => sentry::Level::Error,
        _ => sentry::Level::Warning,
    };
    sentry::with_scope(
        |scope| {
            scope.set_tag("security_rule", rule);
            scope.set_tag("severity", severity);
        },
        || sentry::capture_message(&format!("security event {rule}: {detail}"), level),
    );
}

/// What `init` needs from the configuration.
pub struct Settings<'a> {
    pub dsn: &'a Secret,
    pub environment: String,
    pub sample_rate: f32,
    pub traces_sample_rate: f32,
}

/// Starts the client; keep the guard for the life of the process (dropping it
/// flushes). The error names the problem, never the DSN.
pub fn init(s: &Settings<'_>) -> Result<sentry::ClientInitGuard, String> {
    let dsn: Dsn = s
        .dsn
        .expose()
        .parse()
        .map_err(|_| "monitoring.sentry_dsn is not a valid Sentry DSN".to_owned())?;
    let transport = Arc::new(HttpTransport::start(dsn.clone())?);
    let factory =
        move |_: &sentry::ClientOptions| -> Arc<dyn sentry::Transport> { transport.clone() };
    let mut options = sentry::ClientOptions::new()
        .release(env!("CARGO_PKG_VERSION"))
        .environment(s.environment.clone())
        .sample_rate(s.sample_rate.clamp(0.0, 1.0))
        .traces_sample_rate(s.traces_sample_rate.clamp(0.0, 1.0))
        .send_default_pii(false)
        .attach_stacktrace(false)
        .max_breadcrumbs(50)
        .before_send(clean_event)
        .before_breadcrumb(clean_breadcrumb)
        .transport(factory);
    options.dsn = Some(dsn);
    Ok(sentry::init(options))
}

/// Posts envelopes to the DSN's envelope endpoint from one background thread.
struct HttpTransport {
    tx: SyncSender<Job>,
}

enum Job {
    Send(Vec<u8>),
    Flush(std::sync::mpsc::Sender<()>),
}

impl HttpTransport {
    fn start(dsn: Dsn) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("error reporting: cannot start its runtime: {e}"))?;
        std::thread::Builder::new()
            .name("sentry-transport".into())
            .spawn(move || rt.block_on(sender(dsn, rx)))
            .map_err(|e| format!("error reporting: cannot start its thread: {e}"))?;
        Ok(Self { tx })
    }
}

impl sentry::Transport for HttpTransport {
    fn send_envelope(&self, envelope: Envelope) {
        let mut body = Vec::new();
        if envelope.to_writer(&mut body).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Job::Send(body))
        {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = std::sync::mpsc::channel();
        if self.tx.send(Job::Flush(done)).is_err() {
            return false;
        }
        wait.recv_timeout(timeout).is_ok()
    }
}

async fn sender(dsn: Dsn, rx: Receiver<Job>) {
    let auth = dsn
        .to_auth(Some(concat!("custodian/", env!("CARGO_PKG_VERSION"))))
        .to_string();
    let url = dsn.envelope_api_url();
    // The TLS set-up is made once, not per report.
    let tls = (url.scheme() == "https").then(tls_connector).flatten();
    // `recv` blocks this thread, which only sends reports.
    while let Ok(job) = rx.recv() {
        match job {
            Job::Flush(done) => {
                let _ = done.send(());
            }
            Job::Send(body) => {
                let sent =
                    tokio::time::timeout(SEND_TIMEOUT, post(&url, &auth, tls.as_ref(), &body))
                        .await;
                if !matches!(sent, Ok(Ok(s)) if (200..300).contains(&s)) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A TLS client over the webpki roots, with the ring provider the server uses.
fn tls_connector() -> Option<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One HTTP/1.1 POST (over `tls` for https); returns the status code.
async fn post(
    url: &url::Url,
    auth: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
    body: &[u8],
) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
    let host = url.host_str().ok_or_else(|| bad("no host"))?.to_owned();
    let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
    let mut path = url.path().to_owned();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: custodian\r\nContent-Type: application/x-sentry-envelope\r\nX-Sentry-Auth: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let mut response = Vec::new();
    if url.scheme() == "https" {
        let connector = tls.ok_or_else(|| bad("TLS set-up failed"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| bad("bad host name"))?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        tls.flush().await?;
        let _ = tls.read_to_end(&mut response).await;
    } else {
        let mut tcp = tcp;
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body).await?;
        tcp.flush().await?;
        let _ = tcp.read_to_end(&mut response).await;
    }
    let status_line = response.split(|b| *b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(status_line);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentry::protocol::{Exception, Request, Value};

    #[test]
    fn events_lose_secrets_phi_and_request_details() {
        let mut event = Event {
            message: Some("lookup failed for jane@example.org with cst_Zm9vYmFy".into()),
            ..Default::default()
        };
        event.exception.values.push(Exception {
            ty: "Error".into(),
            value: Some("row 123-45-6789 bad".into()),
            ..Default::default()
        });
        event.extra.insert("ssn".into(), Value::from("123-45-6789"));
        event.user = Some(sentry::User {
            email: Some("jane@example.org".into()),
            ..Default::default()
        });
        let mut req = Request {
            data: Some("{\"given_name\":\"Jane\"}".into()),
            query_string: Some("name=Jane".into()),
            cookies: Some("custodian_session=cst_abc".into()),
            ..Default::default()
        };
        req.headers
            .insert("Authorization".into(), "Bearer cat_secret".into());
        req.headers.insert("User-Agent".into(), "curl/8".into());
        event.request = Some(req);
        let clean = clean_event(event).unwrap();
        let text = serde_json::to_string(&clean).unwrap();
        for canary in [
            "jane@",
            "cst_Zm9",
            "123-45-6789",
            "Jane",
            "cat_secret",
            "cst_abc",
        ] {
            assert!(!text.contains(canary), "{canary} in {text}");
        }
        assert!(text.contains("curl/8"), "allowed headers stay: {text}");
    }

    #[test]
    fn breadcrumbs_are_scrubbed() {
        let b = Breadcrumb {
            message: Some("sent to +15551234567".into()),
            ..Default::default()
        };
        let clean = clean_breadcrumb(b).unwrap();
        assert!(!clean.message.unwrap().contains("5551234567"));
    }
}
