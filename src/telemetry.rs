//! Logging set-up: human-readable text in dev, JSON lines in staging and prod, every
//! line scrubbed of what looks like PHI or a secret before it is written.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Where log lines go: the server logs to standard output (the container convention);
/// the other commands log to standard error, so that their output stays clean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Installs the global subscriber. A second call (tests) is a no-op. With `sentry`,
/// ERROR lines also become error reports and lower ones their breadcrumbs (see
/// `crate::reporting`, which scrubs both).
pub fn init(cfg: &LoggingConfig, target: LogTarget, sentry: bool) {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = match target {
        LogTarget::Stdout => std::io::IsTerminal::is_terminal(&std::io::stdout()),
        LogTarget::Stderr => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let writer =
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
            // Every line passes the scrubber on its way out (crate::scrub).
            match target {
                LogTarget::Stdout => Box::new(crate::scrub::ScrubWriter::new(std::io::stdout())),
                LogTarget::Stderr => Box::new(crate::scrub::ScrubWriter::new(std::io::stderr())),
            }
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match cfg.format {
        LogFormat::Text => registry
            .with(fmt.compact())
            .with(reports(sentry))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .with(reports(sentry))
            .try_init(),
    };
}

/// A panic must not print its message (it could hold data): log where it happened,
/// and let the request answer 500 through the catch-panic layer.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(
            || "unknown".to_owned(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        let request_id = crate::http::request_id::current_request_id().unwrap_or_default();
        tracing::error!(%location, %request_id, "panic (message withheld)");
    }));
}

/// The layers that turn log lines into error reports: ERROR lines become events, WARN
/// and INFO lines breadcrumbs of the next event.
fn reports<S>(on: bool) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{LevelFilter, filter_fn};
    on.then(|| {
        BreadcrumbLayer::new()
            .with_filter(filter_fn(|m| {
                matches!(*m.level(), tracing::Level::WARN | tracing::Level::INFO)
            }))
            .and_then(ErrorLayer::new().with_filter(LevelFilter::ERROR))
    })
}

/// Sends a security event to the error reporter when one is configured.
pub fn report_security_event(rule: &str, severity: &str, detail: &str) {
    crate::reporting::security_event(rule, severity, detail);
}
