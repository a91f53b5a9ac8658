//! Patients and records: what clients send (checked here), and what they get back
//! (masked or de-identified as their permissions and the request say).

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::http::FieldError;

/// `Some(None)` for an explicit null, `None` for an absent field.
fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPatient {
    pub given_name: String,
    pub family_name: String,
    /// `YYYY-MM-DD`
    pub birth_date: String,
    /// `female`, `male`, `other` or `unknown`
    #[serde(default)]
    pub sex: Option<String>,
    /// `ddd-dd-dddd`
    #[serde(default)]
    pub ssn: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    /// Assigned when absent.
    #[serde(default)]
    pub mrn: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PatientPatch {
    #[serde(default)]
    pub given_name: Option<String>,
    #[serde(default)]
    pub family_name: Option<String>,
    #[serde(default)]
    pub birth_date: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub sex: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub ssn: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub phone: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub address: Option<Option<String>>,
    #[serde(default)]
    pub mrn: Option<String>,
}

/// A patient's fields in the clear, checked.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PatientFields {
    pub mrn: String,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: String,
    pub sex: Option<String>,
    pub ssn: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
}

/// Collects every field error, so a client sees them all at once. Messages never
/// repeat the value.
#[derive(Default)]
pub struct Checks(pub Vec<FieldError>);

impl Checks {
    fn err(&mut self, field: &str, message: &str) {
        self.0.push(FieldError::new(field, message));
    }

    pub fn name(&mut self, field: &str, v: &str) -> String {
        let t = v.trim();
        if t.is_empty() || t.chars().count() > 100 || t.chars().any(char::is_control) {
            self.err(field, "must be 1 to 100 characters");
        }
        t.to_owned()
    }

    pub fn birth_date(&mut self, v: &str, today: time::Date) -> String {
        let t = v.trim();
        match parse_date(t) {
            Some(d) if d <= today && d.year() >= 1880 => {}
            Some(_) => self.err("birth_date", "must be a past date after 1880"),
            None => self.err("birth_date", "must be a date YYYY-MM-DD"),
        }
        t.to_owned()
    }

    pub fn sex(&mut self, v: &str) -> String {
        let t = v.trim().to_ascii_lowercase();
        if !matches!(t.as_str(), "female" | "male" | "other" | "unknown") {
            self.err("sex", "must be female, male, other or unknown");
        }
        t
    }

    pub fn ssn(&mut self, v: &str) -> String {
        let t = v.trim();
        if !valid_ssn(t) {
            self.err(
                "ssn",
                "must be ddd-dd-dddd (area not 000, 666 or 900-999; group not 00; serial not 0000)",
            );
        }
        t.to_owned()
    }

    pub fn email(&mut self, v: &str) -> String {
        match crate::identity::model::parse_email(v) {
            Ok(e) => e,
            Err(m) => {
                self.err("email", m);
                String::new()
            }
        }
    }

    pub fn phone(&mut self, v: &str) -> String {
        let t = v.trim();
        let digits = t.chars().filter(char::is_ascii_digit).count();
        if !(3..=32).contains(&t.len())
            || digits < 3
            || !t
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '+' | '(' | ')' | '-' | '.' | ' '))
        {
            self.err(
                "phone",
                "must be 3 to 32 characters of digits, spaces and + ( ) - .",
            );
        }
        t.to_owned()
    }

    pub fn address(&mut self, v: &str) -> String {
        let t = v.trim();
        if t.is_empty() || t.chars().count() > 500 || t.chars().any(|c| c.is_control() && c != '\n')
        {
            self.err("address", "must be 1 to 500 characters");
        }
        t.to_owned()
    }

    pub fn mrn(&mut self, v: &str) -> String {
        let t = v.trim().to_ascii_uppercase();
        if !(1..=32).contains(&t.len()) || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            self.err("mrn", "must be 1 to 32 letters, digits and -");
        }
        t
    }

    pub fn text(&mut self, field: &str, v: &str, max: usize) -> String {
        let t = v.trim();
        if t.is_empty() || t.chars().count() > max {
            self.err(
                field,
                if max > 2000 {
                    "must be 1 to 10000 characters"
                } else {
                    "must be 1 to 2000 characters"
                },
            );
        }
        t.to_owned()
    }

    pub fn done(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// A date as stored: `YYYY-MM-DD`.
pub fn format_date(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

pub fn parse_date(s: &str) -> Option<time::Date> {
    let f = time::macros::format_description!("[year]-[month]-[day]");
    (s.len() == 10)
        .then(|| time::Date::parse(s, &f).ok())
        .flatten()
}

/// A person's age in whole years on `today`.
pub fn age_on(birth: time::Date, today: time::Date) -> i32 {
    let mut a = today.year() - birth.year();
    if (today.month() as u8, today.day()) < (birth.month() as u8, birth.day()) {
        a -= 1;
    }
    a
}

/// Whether `s` has the shape of an SSN, `ddd-dd-dddd`, issued or not.
pub fn ssn_shaped(s: &str) -> bool {
    s.len() == 11
        && s.bytes().enumerate().all(|(i, b)| {
            if i == 3 || i == 6 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// `ddd-dd-dddd`, excluding the numbers the SSA never issues.
pub fn valid_ssn(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 11 || b.get(3) != Some(&b'-') || b.get(6) != Some(&b'-') {
        return false;
    }
    let (area, group, serial) = (&s[0..3], &s[4..6], &s[7..11]);
    let digits = |x: &str| x.bytes().all(|c| c.is_ascii_digit());
    if !(digits(area) && digits(group) && digits(serial)) {
        return false;
    }
    let a: u32 = area.parse().unwrap_or(0);
    a != 0 && a != 666 && a < 900 && group != "00" && serial != "0000"
}

/// The SSN as people without `phi:ssn` see it: `XXX-XX-6789`.
pub fn mask_ssn(ssn: &str) -> String {
    format!("XXX-XX-{}", ssn.get(7..).unwrap_or("XXXX"))
}

/// Normalisations for the blind indexes.
pub fn norm_name(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.trim()
        .nfkc()
        .collect::<String>()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A patient as the API shows it.
#[derive(Serialize, ToSchema, Debug)]
pub struct PatientView {
    /// The patient id (in the de-identified view, a stable pseudonym).
    pub id: String,
    pub mrn: Option<String>,
    pub given_name: String,
    pub family_name: String,
    /// `YYYY-MM-DD`; the year only (or `90+`) in the de-identified view.
    pub birth_date: String,
    pub sex: Option<String>,
    /// Masked `XXX-XX-6789` without `phi:ssn`; null in the de-identified view.
    pub ssn: Option<String>,
    /// Null in the de-identified view (as are `mrn`, `phone`, `address` and the dates).
    pub email: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRecord {
    pub diagnosis: String,
    #[serde(default)]
    pub treatment: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
    /// RFC 3339; now when absent.
    #[serde(default)]
    pub recorded_at: Option<String>,
    /// Sensitivity labels: `ETH`, `PSY`, `HIV`, `SEX`, `SDV` (a patient may restrict who
    /// sees each).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordPatch {
    #[serde(default)]
    pub diagnosis: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub treatment: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub notes: Option<Option<String>>,
    #[serde(default)]
    pub recorded_at: Option<String>,
    /// Replaces the sensitivity labels (`[]` removes them).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct RecordView {
    pub id: String,
    pub patient_id: String,
    pub diagnosis: String,
    pub treatment: Option<String>,
    pub notes: Option<String>,
    pub recorded_at: String,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Sensitivity labels (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssn_rules() {
        assert!(valid_ssn("123-45-6789"));
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123456789",
            "12a-45-6789",
            "123-45-67890",
        ] {
            assert!(!valid_ssn(bad), "{bad}");
        }
        assert!(ssn_shaped("666-12-3456") && ssn_shaped("000-00-0000"));
        assert!(
            !ssn_shaped("123456789") && !ssn_shaped("12a-45-6789") && !ssn_shaped("1234-5-6789")
        );
        assert_eq!(mask_ssn("123-45-6789"), "XXX-XX-6789");
        assert_eq!(norm_name("  Ｍary   ANN "), "mary ann");
    }

    #[test]
    fn dates_and_checks_collect_every_error() {
        let today = time::macros::date!(2026 - 11 - 23);
        let mut c = Checks::default();
        c.birth_date("2027-01-01", today);
        c.birth_date("1961-02-30", today);
        c.sex("robot");
        c.phone("call me");
        c.name("given_name", "");
        assert_eq!(c.0.len(), 5);
        assert!(
            c.0.iter()
                .all(|e| !e.message.contains("robot") && !e.message.contains("call me"))
        );
        let mut ok = Checks::default();
        ok.birth_date("1961-07-04", today);
        ok.phone("+1 (555) 010-2030");
        assert!(ok.done().is_ok());
    }
}
