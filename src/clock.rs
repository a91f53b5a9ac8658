//! Time is passed in. Expiry, lockout, TOTP and timeouts read a [`Clock`], so tests
//! move time instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place the system time is read.
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that stands still until moved; for tests.
#[derive(Clone, Debug)]
pub struct ManualClock {
    nanos: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        let nanos = i64::try_from(start.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        Self {
            nanos: Arc::new(AtomicI64::new(nanos)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: std::time::Duration) {
        let add = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.nanos.fetch_add(add, Ordering::SeqCst);
    }

    /// Seconds since the Unix epoch.
    pub fn now_unix(&self) -> i64 {
        self.now().unix_timestamp()
    }

    pub fn set(&self, to: OffsetDateTime) {
        let nanos = i64::try_from(to.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        self.nanos.store(nanos, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.nanos.load(Ordering::SeqCst)))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// The clock handed to every service.
pub type SharedClock = Arc<dyn Clock>;

/// RFC 3339 text of a time, as the API writes it (UTC, `Z`).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A fixed-width RFC 3339 UTC timestamp with microseconds
/// (`2026-01-01T00:01:30.000000Z`): text order is time order, so stored times compare
/// correctly in SQL on both backends.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses an RFC 3339 time (any offset) into the stored fixed-width form.
pub fn parse_rfc3339(s: &str) -> Option<String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = time::macros::datetime!(2026-01-01 00:00 UTC);
        let c = ManualClock::new(start);
        assert_eq!(c.now(), start);
        c.advance(std::time::Duration::from_secs(90));
        assert_eq!(c.now(), time::macros::datetime!(2026-01-01 00:01:30 UTC));
        assert_eq!(rfc3339(c.now()), "2026-01-01T00:01:30Z");
        assert_eq!(timestamp(c.now()), "2026-01-01T00:01:30.000000Z");
        assert_eq!(
            parse_rfc3339("2026-01-01T02:01:30.5+02:00").as_deref(),
            Some("2026-01-01T00:01:30.500000Z")
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
