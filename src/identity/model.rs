//! Identity types, parsed at the edge.

use serde::Serialize;
use unicode_normalization::UnicodeNormalization;
use utoipa::ToSchema;

/// Longest username accepted (after normalisation).
pub const MAX_USERNAME: usize = 64;
/// Longest password accepted; longer ones are refused before any hashing.
pub const MAX_PASSWORD: usize = 1024;
/// Longest email accepted.
pub const MAX_EMAIL: usize = 254;

/// A username as stored and compared: trimmed, NFKC-normalised, lower-cased.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Normalises without judging (for counting failures of any typed name).
    pub fn normalise(raw: &str) -> String {
        raw.trim().nfkc().collect::<String>().to_lowercase()
    }

    /// Parses a username for a new account: 1–64 characters of letters, digits and
    /// `. _ - @` after normalisation.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let n = Self::normalise(raw);
        let len = n.chars().count();
        if len == 0 {
            return Err("must not be empty");
        }
        if len > MAX_USERNAME {
            return Err("must be at most 64 characters");
        }
        if !n
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
        {
            return Err("may hold only letters, digits and . _ - @");
        }
        Ok(Self(n))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks an email address the simple way: one `@`, something on each side, a dot in the
/// domain, no spaces or control characters, at most 254 characters. Returns it trimmed.
pub fn parse_email(raw: &str) -> Result<String, &'static str> {
    let e = raw.trim();
    if e.is_empty() || e.len() > MAX_EMAIL {
        return Err("must be an email address of at most 254 characters");
    }
    let Some((local, domain)) = e.split_once('@') else {
        return Err("must be an email address");
    };
    let ok = !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(e.to_owned())
    } else {
        Err("must be an email address")
    }
}

/// What login-history rows and audit events say about an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptReason {
    Success,
    BadPassword,
    UnknownUser,
    Locked,
    BadTotp,
    MfaRequired,
    Expired,
    Inactive,
    RateLimited,
    /// A passkey answer that did not verify (or a challenge unknown, used or expired).
    BadPasskey,
}

impl AttemptReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptReason::Success => "success",
            AttemptReason::BadPassword => "bad_password",
            AttemptReason::UnknownUser => "unknown_user",
            AttemptReason::Locked => "locked",
            AttemptReason::BadTotp => "bad_totp",
            AttemptReason::MfaRequired => "mfa_required",
            AttemptReason::Expired => "expired",
            AttemptReason::Inactive => "inactive",
            AttemptReason::RateLimited => "rate_limited",
            AttemptReason::BadPasskey => "bad_passkey",
        }
    }
}

/// A stored user.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: Option<String>,
    pub role: String,
    pub active: bool,
    pub password_hash: String,
    pub password_changed_at: String,
    pub totp_secret: Option<String>,
    pub totp_enabled: bool,
    pub totp_last_step: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
    /// An administrator typed the password: sign-in answers `password_expired` until
    /// the user changes it.
    pub must_change_password: bool,
    /// A patient account's patient record (set once, at the acceptance of a patient
    /// invitation; the role is then `patient`).
    pub patient_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_normalised() {
        assert_eq!(Username::parse("  Alice ").unwrap().as_str(), "alice");
        // NFKC: full-width letters fold to ASCII, so look-alikes collide.
        assert_eq!(Username::parse("ＡＬＩＣＥ").unwrap().as_str(), "alice");
        assert_eq!(
            Username::parse("dr.who@clinic").unwrap().as_str(),
            "dr.who@clinic"
        );
        assert!(Username::parse("").is_err());
        assert!(Username::parse("   ").is_err());
        assert!(Username::parse(&"a".repeat(65)).is_err());
        assert!(Username::parse(&"a".repeat(64)).is_ok());
        assert!(Username::parse("bob smith").is_err());
        assert!(Username::parse("bob<script>").is_err());
        assert!(Username::parse("new\nline").is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(parse_email(" jo@example.org ").unwrap(), "jo@example.org");
        for bad in [
            "",
            "jo",
            "jo@",
            "@example.org",
            "jo@example",
            "jo@@example.org",
            "jo @example.org",
            "jo@.org",
        ] {
            assert!(parse_email(bad).is_err(), "{bad}");
        }
    }
}
