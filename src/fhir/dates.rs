//! FHIR dates as ranges: `2024` is the whole year, `2024-03-05` the day,
//! `2024-03-05T10:00:00Z` the second (with its fractions). A date search compares the
//! search value's range with the resource's, as FHIR R4 defines each prefix. Dates
//! without a zone are read as UTC.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A half-open interval of instants, in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateRange {
    pub start: i128,
    pub end: i128,
}

fn nanos(d: Date) -> i128 {
    PrimitiveDateTime::new(d, Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp_nanos()
}

impl DateRange {
    /// A FHIR `date`: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    pub fn parse_date(s: &str) -> Option<Self> {
        let year = |y: &str| -> Option<i32> {
            (y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()))
                .then(|| y.parse().ok())
                .flatten()
                .filter(|y| *y >= 1)
        };
        let two = |m: &str| -> Option<u8> {
            (m.len() == 2 && m.bytes().all(|b| b.is_ascii_digit()))
                .then(|| m.parse().ok())
                .flatten()
        };
        let parts: Vec<&str> = s.split('-').collect();
        match parts.as_slice() {
            [y] => {
                let y = year(y)?;
                let a = Date::from_calendar_date(y, Month::January, 1).ok()?;
                let b = Date::from_calendar_date(y + 1, Month::January, 1).ok()?;
                Some(Self {
                    start: nanos(a),
                    end: nanos(b),
                })
            }
            [y, m] => {
                let y = year(y)?;
                let m = Month::try_from(two(m)?).ok()?;
                let a = Date::from_calendar_date(y, m, 1).ok()?;
                let (ny, nm) = if m == Month::December {
                    (y + 1, Month::January)
                } else {
                    (y, m.next())
                };
                let b = Date::from_calendar_date(ny, nm, 1).ok()?;
                Some(Self {
                    start: nanos(a),
                    end: nanos(b),
                })
            }
            [y, m, d] => {
                let a = Date::from_calendar_date(year(y)?, Month::try_from(two(m)?).ok()?, two(d)?)
                    .ok()?;
                let b = a.next_day()?;
                Some(Self {
                    start: nanos(a),
                    end: nanos(b),
                })
            }
            _ => None,
        }
    }

    /// A FHIR `dateTime` (a `date`, or a time to the second, optionally with fractions,
    /// with its zone) or `instant`.
    pub fn parse_datetime(s: &str) -> Option<Self> {
        if !s.contains('T') {
            return Self::parse_date(s);
        }
        let t = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        // FHIR needs the seconds: `2024-03-05T10:00Z` is not a dateTime.
        let (_, clock) = s.split_once('T')?;
        if clock.get(5..6) != Some(":") || t.year() < 1 {
            return None;
        }
        let start = t.unix_timestamp_nanos();
        // The precision given: a second, or its fraction's last digit.
        let frac = clock
            .get(8..)
            .and_then(|r| r.strip_prefix('.'))
            .map_or(0, |r| r.bytes().take_while(u8::is_ascii_digit).count());
        let step = 10i128.pow(9u32.saturating_sub(frac.min(9) as u32));
        Some(Self {
            start,
            end: start + step,
        })
    }

    /// An instant from the server's clock (a point one nanosecond wide).
    pub fn at(t: OffsetDateTime) -> Self {
        let start = t.to_offset(UtcOffset::UTC).unix_timestamp_nanos();
        Self {
            start,
            end: start + 1,
        }
    }
}

/// The comparison prefixes of a date search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Sa,
    Eb,
}

impl Prefix {
    pub const NAMES: &'static str = "eq, ne, gt, ge, lt, le, sa, eb";

    /// Splits `ge2024-01-01` into its prefix and value (`eq` when none).
    pub fn split(v: &str) -> Option<(Self, &str)> {
        let p = match v.get(..2) {
            Some("eq") => Self::Eq,
            Some("ne") => Self::Ne,
            Some("gt") => Self::Gt,
            Some("ge") => Self::Ge,
            Some("lt") => Self::Lt,
            Some("le") => Self::Le,
            Some("sa") => Self::Sa,
            Some("eb") => Self::Eb,
            Some(x) if x.bytes().all(|b| b.is_ascii_alphabetic()) => return None,
            _ => return Some((Self::Eq, v)),
        };
        Some((p, &v[2..]))
    }

    /// Whether a resource's range `r` satisfies this prefix against the search range `v`
    /// (FHIR R4, 3.1.1.5.6).
    pub fn matches(self, v: DateRange, r: DateRange) -> bool {
        let contained = r.start >= v.start && r.end <= v.end;
        match self {
            Self::Eq => contained,
            Self::Ne => !contained,
            Self::Gt => r.end > v.end,
            Self::Lt => r.start < v.start,
            Self::Ge => r.end > v.end || contained,
            Self::Le => r.start < v.start || contained,
            Self::Sa => r.start >= v.end,
            Self::Eb => r.end <= v.start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_makes_the_range() {
        let y = DateRange::parse_date("2024").unwrap();
        let d = DateRange::parse_date("2024-02-29").unwrap();
        assert!(y.start <= d.start && d.end <= y.end);
        assert_eq!(d.end - d.start, 86_400 * 1_000_000_000);
        assert!(DateRange::parse_date("2023-02-29").is_none());
        assert!(DateRange::parse_date("2024-13").is_none());
        assert!(DateRange::parse_date("24-01-01").is_none());
        let t = DateRange::parse_datetime("2024-02-29T10:00:00+02:00").unwrap();
        assert_eq!(t.end - t.start, 1_000_000_000);
        assert!(d.start <= t.start && t.end <= d.end);
        assert!(DateRange::parse_datetime("2024-02-29T10:00Z").is_none());
        assert!(DateRange::parse_datetime("2024-02-29T10:00:00").is_none());
        let f = DateRange::parse_datetime("2024-02-29T10:00:00.25Z").unwrap();
        assert_eq!(f.end - f.start, 10_000_000);
    }

    #[test]
    fn prefixes_follow_the_spec() {
        let day = |s| DateRange::parse_date(s).unwrap();
        let march = day("2024-03");
        assert!(Prefix::Eq.matches(march, day("2024-03-05")));
        assert!(!Prefix::Eq.matches(march, day("2024-04-01")));
        assert!(Prefix::Gt.matches(march, day("2024-04-01")));
        assert!(!Prefix::Gt.matches(march, day("2024-03-31")));
        assert!(Prefix::Ge.matches(march, day("2024-03-31")));
        assert!(Prefix::Lt.matches(march, day("2024-02-29")));
        assert!(!Prefix::Lt.matches(march, day("2024-03-01")));
        assert!(Prefix::Le.matches(march, day("2024-03-01")));
        assert!(Prefix::Ne.matches(march, day("2024-04-01")));
        assert!(Prefix::Sa.matches(march, day("2024-04-01")));
        assert!(Prefix::Eb.matches(march, day("2024-02-01")));
        assert_eq!(Prefix::split("ge2024"), Some((Prefix::Ge, "2024")));
        assert_eq!(Prefix::split("2024"), Some((Prefix::Eq, "2024")));
        assert_eq!(Prefix::split("ap2024"), None);
    }
}
