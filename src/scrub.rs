//! The second line of defence: whatever looks like PHI or a secret is replaced before
//! a log line or an error report leaves the process.
//!
//! The first line is that no code logs PHI (the canary tests of the PHI capability).
//! This one catches what slips through, such as a driver's error text quoting a
//! value: SSNs, phone numbers, e-mail addresses, dates (ISO dates and datetimes,
//! `03/14/1962`, `14.03.1962`, `March 14, 1962`, `14 Mar 1962`), MRN-like numbers (six
//! digits or more, or anything after `MRN`), bearer tokens, this project's token
//! prefixes (`cst_`, `cat_`), JWTs, long hex or base64 strings (keys, hashes), and the
//! whole value of any field whose name says it holds PHI or a secret.
//!
//! Every match becomes `[redacted:<kind>]`, so a reader still sees that something was
//! there and what it looked like, never what it was.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// Field names whose values are dropped whole, wherever they appear (log fields, JSON
/// keys, `key=value` text). Compared in lower case, with `-` read as `_`.
pub const SENSITIVE_FIELDS: &[&str] = &[
    "name",
    "full_name",
    "given_name",
    "family_name",
    "first_name",
    "last_name",
    "patient_name",
    "dob",
    "birth_date",
    "date_of_birth",
    "birthdate",
    "ssn",
    "mrn",
    "address",
    "street",
    "phone",
    "telephone",
    "email",
    "diagnosis",
    "notes",
    "password",
    "current_password",
    "new_password",
    "passwd",
    "secret",
    "token",
    "access_token",
    "refresh_token",
    "api_key",
    "authorization",
    "cookie",
    "set_cookie",
    "totp_code",
    "otp",
    "dsn",
];

/// Whether a field of this name is dropped whole.
pub fn is_sensitive_field(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase().replace('-', "_");
    SENSITIVE_FIELDS.contains(&n.as_str())
}

struct Rule {
    kind: &'static str,
    re: Regex,
}

const MONTHS: &str = "(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)";

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let rules: Vec<(&'static str, String)> = vec![
        // Secrets first: a token must not be half-eaten by the number rules.
        ("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*".into()),
        ("bearer", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+".into()),
        ("token", r"\b(?:cst|cat)_[A-Za-z0-9_-]+".into()),
        ("secret", r"(?i)\b(?:redis|rediss|postgres|postgresql|https?)://[^\s:/@]+:[^\s@/]+@".into()),
        ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+".into()),
        // Dates, with an optional time: 1962-03-14, 1962-03-14T08:30:00Z, 19620314.
        (
            "date",
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b".into(),
        ),
        // 03/14/1962, 3/14/62, 3-14-1962, 14.03.1962 (dots only with a four-digit
        // year, so that version numbers such as 0.4.19 stay).
        ("date", r"\b\d{1,2}/\d{1,2}/(?:\d{4}|\d{2})\b".into()),
        ("date", r"\b\d{1,2}-\d{1,2}-(?:\d{4}|\d{2})\b".into()),
        ("date", r"\b\d{1,2}\.\d{1,2}\.\d{4}\b".into()),
        ("date", format!(r"(?i)\b{MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b")),
        ("date", format!(r"(?i)\b\d{{1,2}}(?:st|nd|rd|th)?\s+{MONTHS}\.?,?\s+\d{{4}}\b")),
        ("ssn", r"\b\d{3}-\d{2}-\d{4}\b".into()),
        (
            "phone",
            r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b".into(),
        ),
        ("phone", r"\+\d{8,15}\b".into()),
        ("mrn", r"(?i)\bmrn[\s:#=]*[A-Za-z0-9-]+".into()),
        ("key", r"\b[0-9a-fA-F]{32,}\b".into()),
        ("key", r"[A-Za-z0-9+/_-]{40,}={0,2}".into()),
        ("number", r"\b\d{6,}\b".into()),
    ];
    rules
        .into_iter()
        .filter_map(|(kind, pattern)| Regex::new(&pattern).ok().map(|re| Rule { kind, re }))
        .collect()
});

/// `key=value` or `"key": "value"` pairs in text whose key is sensitive.
static PAIRS: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let names = SENSITIVE_FIELDS.join("|");
    Regex::new(&format!(
        r#"(?i)(?P<k>\b(?:{names})\b"?\s*[=:]\s*)(?P<v>"(?:[^"\\]|\\.)*"|[^\s,;}}\]]+)"#
    ))
    .ok()
});

/// The text with everything that looks like PHI or a secret replaced.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out: Cow<'_, str> = Cow::Borrowed(text);
    if let Some(pairs) = PAIRS.as_ref()
        && pairs.is_match(&out)
    {
        out = Cow::Owned(pairs.replace_all(&out, "${k}[redacted:field]").into_owned());
    }
    for rule in RULES.iter() {
        if rule.re.is_match(&out) {
            let replacement = format!("[redacted:{}]", rule.kind);
            out = Cow::Owned(
                rule.re
                    .replace_all(&out, regex::NoExpand(&replacement))
                    .into_owned(),
            );
        }
    }
    out
}

/// Scrubs a JSON value in place: sensitive keys lose their value, strings are scrubbed.
/// Keys in `keep` (e.g. a log line's own `timestamp`), at any depth, are left as they
/// are: they are the format's bookkeeping, written by code, not data.
pub fn scrub_json(value: &mut serde_json::Value, keep: &[&str]) {
    match value {
        serde_json::Value::String(s) => {
            if let Cow::Owned(clean) = scrub(s) {
                *s = clean;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| scrub_json(v, keep)),
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if keep.contains(&k.as_str()) {
                    continue;
                }
                if is_sensitive_field(k) && !v.is_null() {
                    *v = serde_json::Value::String("[redacted:field]".into());
                } else {
                    scrub_json(v, keep);
                }
            }
        }
        _ => {}
    }
}

/// Scrubs one formatted log line. JSON lines are scrubbed value by value (their
/// `timestamp`, `level` and `target` kept); text lines keep their leading timestamp.
pub fn scrub_log_line(line: &str) -> Cow<'_, str> {
    let trimmed = line.trim_end_matches('\n');
    if trimmed.starts_with('{')
        && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(trimmed)
    {
        scrub_json(&mut v, &["timestamp", "level", "target"]);
        let mut s = v.to_string();
        if line.ends_with('\n') {
            s.push('\n');
        }
        return Cow::Owned(s);
    }
    // Text: "<timestamp> <rest>", the timestamp written by the formatter itself.
    match line.split_once(' ') {
        Some((head, rest))
            if head.len() >= 20 && head.as_bytes().first().is_some_and(u8::is_ascii_digit) =>
        {
            match scrub(rest) {
                Cow::Borrowed(_) => Cow::Borrowed(line),
                Cow::Owned(r) => Cow::Owned(format!("{head} {r}")),
            }
        }
        _ => scrub(line),
    }
}

/// A log writer that scrubs every line before it reaches the real writer.
pub struct ScrubWriter<W: std::io::Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: std::io::Write> ScrubWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    fn emit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        let clean = scrub_log_line(&text);
        self.inner.write_all(clean.as_bytes())
    }
}

impl<W: std::io::Write> std::io::Write for ScrubWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let rest = self.buf.split_off(i + 1);
            self.emit()?;
            self.buf = rest;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

impl<W: std::io::Write> Drop for ScrubWriter<W> {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text that must lose the quoted part (between « and »), by kind.
    const POSITIVE: &[(&str, &str)] = &[
        ("ssn «123-45-6789» on file", "ssn"),
        ("call «(555) 123-4567» now", "phone"),
        ("call «555-123-4567»", "phone"),
        ("call «555.123.4567»", "phone"),
        ("intl «+15551234567»", "phone"),
        ("mail «jane.doe+x@example.org» bounced", "email"),
        ("born «1962-03-14»", "date"),
        ("at «1962-03-14T08:30:00Z»", "date"),
        ("at «1962-03-14T08:30:00.123+02:00»", "date"),
        ("at «1962-03-14 08:30»", "date"),
        ("dob «03/14/1962»", "date"),
        ("dob «14.03.1962»", "date"),
        ("dob «3-14-62»", "date"),
        ("dob «March 14, 1962»", "date"),
        ("dob «14 Mar 1962»", "date"),
        ("dob «14th March 1962»", "date"),
        ("patient «000123456789»", "number"),
        ("«MRN: A-99812»", "field"),
        ("record «MRN#A99812»", "mrn"),
        ("header «Bearer abc.def-123»", "bearer"),
        ("token «cst_Zm9vYmFyYmF6cXV4cXV1eA»", "token"),
        ("token «cat_Zm9vYmFyYmF6cXV4cXV1eA»", "token"),
        (
            "jwt «eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.c2lnbmF0dXJl»",
            "jwt",
        ),
        (
            "key «9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08»",
            "key",
        ),
        (
            "b64 «q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJ+/»",
            "key",
        ),
        ("url «redis://user:hunter2@»cache:6379", "secret"),
    ];

    /// Text that must come out unchanged.
    const NEGATIVE: &[&str] = &[
        "Name or service not known",
        "failed to lookup address information: Name or service not known",
        "listening on http://127.0.0.1:5005",
        "database migrated applied=[1, 2, 3, 4] version=4",
        "audit writer totals batches=1497 events=21716",
        "status=404 method=GET path=/api/v1/patients/{id}",
        "request took 12ms",
        "connection refused (os error 111)",
        "retry after 30s",
        "HTTP/1.1 200 OK",
        "regex-automata 0.4.19 and sqlx 0.9.0",
        "unknown key: rate_limit.nope",
        "error code: rate_limited",
        "key version 3 is current",
        "rate limit: Redis failed; each instance limits on its own",
    ];

    #[test]
    fn positives_are_redacted() {
        for (text, kind) in POSITIVE {
            let (before, rest) = text.split_once('«').unwrap();
            let (secret, after) = rest.split_once('»').unwrap();
            let input = format!("{before}{secret}{after}");
            let out = scrub(&input);
            assert!(!out.contains(secret), "{input:?} -> {out:?}");
            assert!(out.contains("[redacted:"), "{input:?} -> {out:?}");
            assert!(
                out.contains(&format!("[redacted:{kind}]")),
                "{input:?} -> {out:?} (expected kind {kind})"
            );
        }
    }

    #[test]
    fn negatives_are_untouched() {
        for text in NEGATIVE {
            assert_eq!(scrub(text), *text);
        }
    }

    #[test]
    fn sensitive_pairs_lose_their_value() {
        let out =
            scrub(r#"patient_name="Jane Q Public" status=200 password=hunter2 totp_code=123456"#);
        assert!(!out.contains("Jane"), "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("status=200"), "{out}");
        let out = scrub(r#"{"name": "Jane Public", "ok": true}"#);
        assert!(!out.contains("Jane"), "{out}");
    }

    #[test]
    fn json_lines_keep_their_own_timestamp() {
        let line = r#"{"timestamp":"2026-11-23T06:03:12.881148Z","level":"ERROR","target":"x","message":"bad row for 123-45-6789","given_name":"Jane","fields":{"dob":"1962-03-14"}}"#;
        let out = scrub_log_line(line);
        assert!(out.contains("2026-11-23T06:03:12.881148Z"), "{out}");
        assert!(
            !out.contains("123-45-6789") && !out.contains("Jane") && !out.contains("1962"),
            "{out}"
        );
        let text =
            "2026-11-23T06:03:12.881148Z ERROR custodian: lookup of jane@example.org failed\n";
        let out = scrub_log_line(text);
        assert!(
            out.starts_with("2026-11-23T06:03:12.881148Z ERROR"),
            "{out}"
        );
        assert!(!out.contains("jane@"), "{out}");
    }

    #[test]
    fn the_writer_scrubs_line_by_line() {
        use std::io::Write;
        let mut sink = Vec::new();
        {
            let mut w = ScrubWriter::new(&mut sink);
            w.write_all(b"first 123-45-").unwrap();
            w.write_all(b"6789 line\nsecond cst_abcdef\n").unwrap();
        }
        let out = String::from_utf8(sink).unwrap();
        assert_eq!(out, "first [redacted:ssn] line\nsecond [redacted:token]\n");
    }
}
