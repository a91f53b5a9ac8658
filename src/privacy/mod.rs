//! Sensitivity labels and patients' restrictions (HIPAA §164.522, 42 CFR Part 2 style),
//! enforced by the server on every door.
//!
//! - **Labels**: a record or a FHIR resource may carry sensitivity codes from a small
//!   list ([`SENSITIVE`], HL7 v3 ActCode). FHIR resources carry them in
//!   `meta.security`; `/api/v1` records in their sealed `labels` field. Shown with them,
//!   on output, the confidentiality code `R` (restricted).
//! - **Restrictions**: a patient limits who sees a labelled category: to named roles
//!   (none: nobody but the patient), and to no SMART app. Each is stored as the FHIR
//!   `Consent` recording it ([`consent`]), sealed with the patient's data key.
//! - **Enforcement**: every reader of a patient's clinical data asks a [`Screen`] —
//!   the patient's rules for this [`Audience`] — which items it withholds. A withheld
//!   item is not sent; the caller learns that something was withheld and how many
//!   (never the category), and break-glass opens it (audited, alerted).

pub mod consent;
pub mod routes;

use std::collections::BTreeSet;

use crate::access::Principal;

/// The code system of the sensitivity labels.
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// The code system of the confidentiality codes (`R` restricted, `V` very restricted).
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// The code system of `REDACTED` (a bundle something was withheld from).
pub const OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The sensitivity codes Custodian knows: (code, what it covers).
pub const SENSITIVE: [(&str, &str); 5] = [
    ("ETH", "substance use (alcohol and drugs)"),
    ("PSY", "behavioural and mental health"),
    ("HIV", "HIV/AIDS"),
    ("SEX", "sexual and reproductive health"),
    ("SDV", "sexual assault, abuse or domestic violence"),
];

/// Whether `code` is one of [`SENSITIVE`].
pub fn is_label(code: &str) -> bool {
    SENSITIVE.iter().any(|(c, _)| *c == code)
}

/// What a label covers, in words.
pub fn describe(code: &str) -> &'static str {
    SENSITIVE
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("another category", |(_, d)| *d)
}

/// Parses a list of labels: known codes only, each once, in the list's order.
pub fn parse_labels(raw: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for r in raw {
        let c = r.trim().to_ascii_uppercase();
        if !is_label(&c) {
            return Err(format!(
                "must hold only the sensitivity codes {}",
                SENSITIVE.map(|(c, _)| c).join(", ")
            ));
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The sensitivity labels among FHIR `meta.security` codings.
pub fn labels_in(security: &serde_json::Value) -> Vec<String> {
    security
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c.get("system").and_then(|s| s.as_str()) == Some(ACT_CODE))
        .filter_map(|c| c.get("code").and_then(|s| s.as_str()))
        .map(str::to_ascii_uppercase)
        .filter(|c| is_label(c))
        .collect()
}

/// Who is asking for a patient's data on this request.
#[derive(Clone, Debug)]
pub struct Audience {
    /// The person's role (an app acts for a person, with that person's role).
    pub role: String,
    /// Through a SMART app.
    pub app: bool,
    /// The patient themself: nothing of their own record is withheld from them.
    pub own: bool,
    /// A break-glass access: restrictions give way (flagged, audited, raised).
    pub break_glass: bool,
}

impl Audience {
    /// The audience of a principal's request about `patient`.
    pub fn of(p: &Principal, patient: &str, break_glass: bool) -> Self {
        Self {
            role: p.role.clone(),
            app: p.smart().is_some(),
            own: p.patient.as_deref() == Some(patient),
            break_glass,
        }
    }
}

/// One active restriction of a patient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restriction {
    /// The Consent's id.
    pub id: String,
    pub patient_id: String,
    /// The sensitivity code restricted.
    pub category: String,
    /// The roles that may still see it (empty: nobody but the patient).
    pub roles: Vec<String>,
    /// Whether SMART apps may see it (acting for someone of an allowed role).
    pub apps: bool,
    pub created_at: String,
}

impl Restriction {
    /// Whether this restriction keeps `category` from `a`.
    fn keeps_from(&self, a: &Audience) -> bool {
        !self.roles.contains(&a.role) || (a.app && !self.apps)
    }
}

/// A patient's active restrictions, as one request's reader applies them.
#[derive(Clone, Debug, Default)]
pub struct Screen {
    /// The categories withheld from this audience (empty: nothing is).
    withheld: BTreeSet<String>,
    /// The categories break-glass opened (what would otherwise be withheld).
    opened: BTreeSet<String>,
}

impl Screen {
    /// Nothing withheld (no restriction, or the patient themself).
    pub fn open() -> Self {
        Self::default()
    }

    /// The screen of `restrictions` for `a`.
    pub fn new(restrictions: &[Restriction], a: &Audience) -> Self {
        let mut s = Self::default();
        if a.own {
            return s;
        }
        for r in restrictions.iter().filter(|r| r.keeps_from(a)) {
            // "*": a stored Consent this server could not read (fails closed).
            let categories: Vec<String> = if r.category == "*" {
                SENSITIVE.iter().map(|(c, _)| (*c).to_owned()).collect()
            } else {
                vec![r.category.clone()]
            };
            let into = if a.break_glass {
                &mut s.opened
            } else {
                &mut s.withheld
            };
            into.extend(categories);
        }
        s
    }

    /// Whether an item with `labels` is withheld.
    pub fn hides<S: AsRef<str>>(&self, labels: &[S]) -> bool {
        !self.withheld.is_empty() && labels.iter().any(|l| self.withheld.contains(l.as_ref()))
    }

    /// Whether an item with `labels` is shown only because of break-glass.
    pub fn overridden<S: AsRef<str>>(&self, labels: &[S]) -> bool {
        !self.opened.is_empty() && labels.iter().any(|l| self.opened.contains(l.as_ref()))
    }

    /// Whether this screen withholds anything at all.
    pub fn withholds(&self) -> bool {
        !self.withheld.is_empty()
    }
}

/// The patient's restrictions as they apply to this request: one query (an indexed
/// lookup that finds nothing for most patients), then the patient's Consents opened.
pub async fn screen_for(
    state: &crate::app::AppState,
    p: &Principal,
    patient: &str,
    break_glass: bool,
) -> Result<Screen, crate::records::service::PhiError> {
    let rules = consent::active(state.db(), state.patients(), patient).await?;
    if rules.is_empty() {
        return Ok(Screen::open());
    }
    Ok(Screen::new(&rules, &Audience::of(p, patient, break_glass)))
}

/// The words every answer uses for withheld data: a count, never the category.
pub fn withheld_text(n: usize) -> String {
    if n == 1 {
        "1 item is withheld at the patient's request. In an emergency, break-glass opens it (audited).".into()
    } else {
        format!(
            "{n} items are withheld at the patient's request. In an emergency, break-glass opens them (audited)."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(category: &str, roles: &[&str], apps: bool) -> Restriction {
        Restriction {
            id: "c".into(),
            patient_id: "p".into(),
            category: category.into(),
            roles: roles.iter().map(|s| (*s).to_owned()).collect(),
            apps,
            created_at: String::new(),
        }
    }

    fn a(role: &str, app: bool, own: bool, bg: bool) -> Audience {
        Audience {
            role: role.into(),
            app,
            own,
            break_glass: bg,
        }
    }

    #[test]
    fn screens() {
        let rules = [r("PSY", &["doctor"], false), r("HIV", &[], true)];
        let nurse = Screen::new(&rules, &a("nurse", false, false, false));
        assert!(nurse.hides(&["PSY"]) && nurse.hides(&["HIV"]) && !nurse.hides(&["ETH"]));
        assert!(!nurse.hides::<&str>(&[]));
        let doctor = Screen::new(&rules, &a("doctor", false, false, false));
        assert!(!doctor.hides(&["PSY"]) && doctor.hides(&["HIV"]));
        let doctors_app = Screen::new(&rules, &a("doctor", true, false, false));
        assert!(doctors_app.hides(&["PSY"]), "no app may see PSY");
        let own = Screen::new(&rules, &a("patient", true, true, false));
        assert!(!own.hides(&["PSY", "HIV"]) && !own.withholds());
        let glass = Screen::new(&rules, &a("nurse", false, false, true));
        assert!(!glass.hides(&["PSY"]) && glass.overridden(&["PSY"]));
        assert!(!glass.overridden(&["ETH"]));
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_labels(&["psy".into(), "HIV".into(), "PSY".into()]).unwrap(),
            ["PSY", "HIV"]
        );
        assert!(parse_labels(&["XYZ".into()]).is_err());
        let sec = serde_json::json!([
            {"system": ACT_CODE, "code": "PSY"},
            {"system": "other", "code": "HIV"},
            {"system": ACT_CODE, "code": "NOPE"}
        ]);
        assert_eq!(labels_in(&sec), ["PSY"]);
    }
}
