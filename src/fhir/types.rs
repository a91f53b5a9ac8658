//! The FHIR R4 data types Custodian stores, hand-written (no Rust FHIR library covers
//! R4 4.0.1 and is well kept): each refuses elements it does not know, so that nothing
//! a client sends is silently dropped, and each is checked after parsing ([`Findings`])
//! for what the types cannot say: required values, code systems, dates, quantities.

use serde::{Deserialize, Serialize};

/// What is wrong with a resource: FHIRPath-style expressions and messages that never
/// repeat the value.
#[derive(Debug, Default)]
pub struct Findings(pub Vec<(String, String)>);

impl Findings {
    pub fn add(&mut self, expression: impl Into<String>, message: impl Into<String>) {
        self.0.push((expression.into(), message.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
pub const US_CORE_CONDITION_CATEGORY: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/condition-category";
pub const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub const CONDITION_VER_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Coding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_selected: Option<bool>,
}

impl Coding {
    pub fn new(system: &str, code: &str, display: &str) -> Self {
        Self {
            system: Some(system.into()),
            code: Some(code.into()),
            display: (!display.is_empty()).then(|| display.into()),
            ..Self::default()
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeableConcept {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coding: Vec<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl CodeableConcept {
    pub fn coded(system: &str, code: &str, display: &str) -> Self {
        Self {
            coding: vec![Coding::new(system, code, display)],
            text: None,
        }
    }
    pub fn text(text: &str) -> Self {
        Self {
            coding: Vec::new(),
            text: Some(text.into()),
        }
    }
    /// Whether one coding has this code (and this system, when given).
    pub fn has(&self, system: Option<&str>, code: Option<&str>) -> bool {
        self.coding.iter().any(|c| {
            system.is_none_or(|s| c.system.as_deref() == Some(s))
                && code.is_none_or(|k| c.code.as_deref() == Some(k))
        })
    }
    /// The code of the first coding in `system`.
    pub fn code_in(&self, system: &str) -> Option<&str> {
        self.coding
            .iter()
            .find(|c| c.system.as_deref() == Some(system))
            .and_then(|c| c.code.as_deref())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quantity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Period {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Annotation {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_string: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Range {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// `meta` as a client may send it: `versionId` and `lastUpdated` are the server's and
/// replaced; profiles, security labels and tags are kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security: Vec<Coding>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag: Vec<Coding>,
}

// ---- checks ------------------------------------------------------------------------

/// A FHIR `code`: no leading or trailing whitespace, no runs of it, not empty.
pub fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.trim() == s
        && !s.contains("  ")
        && !s.chars().any(|c| c.is_control())
}

/// A short human text: 1 to `max` characters, no control characters but newlines.
pub fn check_text(f: &mut Findings, at: &str, s: &str, max: usize) {
    if s.trim().is_empty()
        || s.chars().count() > max
        || s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        f.add(at, format!("must be 1 to {max} characters of text"));
    }
}

/// The LOINC check digit (mod 10 over the digits before the dash).
pub fn loinc_valid(code: &str) -> bool {
    let Some((body, check)) = code.split_once('-') else {
        return false;
    };
    if body.is_empty()
        || body.len() > 7
        || check.len() != 1
        || !body.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let Some(check) = check.bytes().next().filter(u8::is_ascii_digit) else {
        return false;
    };
    // From the right, every other digit (starting with the rightmost) is doubled; the
    // digits of every product are summed with the other digits.
    let mut sum = 0u32;
    for (i, b) in body.bytes().rev().enumerate() {
        let d = u32::from(b - b'0');
        if i % 2 == 0 {
            let x = d * 2;
            sum += x / 10 + x % 10;
        } else {
            sum += d;
        }
    }
    (10 - sum % 10) % 10 == u32::from(check - b'0')
}

/// ICD-10-CM code shape: a letter, two characters, optionally a dot and up to four more.
pub fn icd10cm_valid(code: &str) -> bool {
    let b = code.as_bytes();
    if b.len() < 3 || !b[0].is_ascii_uppercase() || !b[1].is_ascii_digit() {
        return false;
    }
    if !(b[2].is_ascii_digit() || b[2].is_ascii_uppercase()) {
        return false;
    }
    match code.get(3..) {
        None | Some("") => true,
        Some(rest) => rest.strip_prefix('.').is_some_and(|r| {
            (1..=4).contains(&r.len())
                && r.bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        }),
    }
}

/// SNOMED CT concept ids: 6 to 18 digits, no leading zero, a valid Verhoeff check digit.
pub fn snomed_valid(code: &str) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    if !(6..=18).contains(&code.len())
        || code.starts_with('0')
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let mut c = 0usize;
    for (i, b) in code.bytes().rev().enumerate() {
        let digit = usize::from(b - b'0');
        let p = P[i % 8][digit];
        c = usize::from(D[c][usize::from(p)]);
    }
    c == 0
}

/// A UCUM expression's characters (the grammar's terminal set; the unit itself is not
/// looked up): printable ASCII without spaces, balanced brackets, at most 64 long.
pub fn ucum_shaped(code: &str) -> bool {
    if code.is_empty() || code.len() > 64 {
        return false;
    }
    let mut depth = 0i32;
    for c in code.chars() {
        if !c.is_ascii_graphic() || c == '"' {
            return false;
        }
        match c {
            '[' | '(' | '{' => depth += 1,
            ']' | ')' | '}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Checks a coding: a URI system, a code, and the code's shape in the systems whose
/// shape is known.
pub fn check_coding(f: &mut Findings, at: &str, c: &Coding) {
    let Some(code) = c.code.as_deref() else {
        f.add(format!("{at}.code"), "is required");
        return;
    };
    if !is_code(code) {
        f.add(
            format!("{at}.code"),
            "must be a code (no surrounding spaces)",
        );
        return;
    }
    let Some(system) = c.system.as_deref() else {
        f.add(format!("{at}.system"), "is required");
        return;
    };
    if !system.contains(':') || system.chars().any(char::is_whitespace) || system.len() > 512 {
        f.add(format!("{at}.system"), "must be an absolute URI");
        return;
    }
    let ok = match system {
        LOINC => loinc_valid(code),
        ICD10CM => icd10cm_valid(code),
        SNOMED => snomed_valid(code),
        RXNORM => (1..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit()),
        UCUM => ucum_shaped(code),
        _ => true,
    };
    if !ok {
        f.add(
            format!("{at}.code"),
            format!("is not a valid code of {system}"),
        );
    }
    if let Some(d) = &c.display {
        check_text(f, &format!("{at}.display"), d, 1000);
    }
}

pub fn check_concept(f: &mut Findings, at: &str, cc: &CodeableConcept) {
    if cc.coding.is_empty() && cc.text.is_none() {
        f.add(at, "needs a coding or a text");
    }
    for (i, c) in cc.coding.iter().enumerate() {
        check_coding(f, &format!("{at}.coding[{i}]"), c);
    }
    if let Some(t) = &cc.text {
        check_text(f, &format!("{at}.text"), t, 2000);
    }
}

/// A concept bound to a required code system and value set: one coding of `system` with
/// a code in `codes`.
pub fn check_bound(
    f: &mut Findings,
    at: &str,
    cc: &CodeableConcept,
    systems: &[&str],
    codes: &[&str],
) {
    check_concept(f, at, cc);
    let found = cc.coding.iter().any(|c| {
        c.system.as_deref().is_some_and(|s| systems.contains(&s))
            && c.code.as_deref().is_some_and(|k| codes.contains(&k))
    });
    if !found {
        f.add(
            at,
            format!(
                "must have a coding of {} with one of: {}",
                systems.join(" or "),
                codes.join(", ")
            ),
        );
    }
}

/// An extensible binding: codings of `system` must have a code in `codes` (other
/// systems are allowed).
pub fn check_extensible(
    f: &mut Findings,
    at: &str,
    cc: &CodeableConcept,
    systems: &[&str],
    codes: &[&str],
) {
    check_concept(f, at, cc);
    for (i, c) in cc.coding.iter().enumerate() {
        if c.system.as_deref().is_some_and(|s| systems.contains(&s))
            && c.code.as_deref().is_some_and(|k| !codes.contains(&k))
        {
            f.add(
                format!("{at}.coding[{i}].code"),
                format!("must be one of: {}", codes.join(", ")),
            );
        }
    }
}

pub fn check_code(f: &mut Findings, at: &str, v: &str, codes: &[&str]) {
    if !codes.contains(&v) {
        f.add(at, format!("must be one of: {}", codes.join(", ")));
    }
}

pub fn check_quantity(f: &mut Findings, at: &str, q: &Quantity) {
    match &q.value {
        None => f.add(format!("{at}.value"), "is required"),
        Some(n) if n.as_f64().is_none_or(|x| !x.is_finite()) => {
            f.add(format!("{at}.value"), "must be a finite decimal")
        }
        Some(_) => {}
    }
    if let Some(c) = &q.comparator {
        check_code(f, &format!("{at}.comparator"), c, &["<", "<=", ">=", ">"]);
    }
    if let Some(u) = &q.unit {
        check_text(f, &format!("{at}.unit"), u, 100);
    }
    match (q.system.as_deref(), q.code.as_deref()) {
        (Some(UCUM), Some(code)) if !ucum_shaped(code) => {
            f.add(format!("{at}.code"), "is not a UCUM expression")
        }
        (Some(_), None) => f.add(format!("{at}.code"), "is required with a system"),
        (None, Some(_)) => f.add(format!("{at}.system"), "is required with a code"),
        (Some(s), Some(_)) if !s.contains(':') => {
            f.add(format!("{at}.system"), "must be an absolute URI")
        }
        _ => {}
    }
}

pub fn check_annotation(f: &mut Findings, at: &str, a: &Annotation) {
    check_text(f, &format!("{at}.text"), &a.text, 10_000);
    if let Some(t) = &a.time
        && super::dates::DateRange::parse_datetime(t).is_none()
    {
        f.add(format!("{at}.time"), "must be a FHIR dateTime");
    }
    if let Some(s) = &a.author_string {
        check_text(f, &format!("{at}.authorString"), s, 200);
    }
}

pub fn check_datetime(f: &mut Findings, at: &str, v: &str) {
    if super::dates::DateRange::parse_datetime(v).is_none() {
        f.add(
            at,
            "must be a FHIR dateTime (YYYY, YYYY-MM, YYYY-MM-DD, or a time with its zone)",
        );
    }
}

pub fn check_period(f: &mut Findings, at: &str, p: &Period) {
    if let Some(s) = &p.start {
        check_datetime(f, &format!("{at}.start"), s);
    }
    if let Some(e) = &p.end {
        check_datetime(f, &format!("{at}.end"), e);
    }
    if p.start.is_none() && p.end.is_none() {
        f.add(at, "needs a start or an end");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_shapes() {
        for ok in [
            "718-7", "2160-0", "6690-2", "777-3", "33914-3", "62238-1", "98979-8",
        ] {
            assert!(loinc_valid(ok), "{ok}");
        }
        for bad in ["718-8", "7187", "-7", "718-", "a18-7", "12345678-9"] {
            assert!(!loinc_valid(bad), "{bad}");
        }
        for ok in ["I10", "E11.9", "K92.2", "D69.6", "Z79.01", "C18"] {
            assert!(icd10cm_valid(ok), "{ok}");
        }
        for bad in ["i10", "10", "E11.", "E11.12345", "E1", "E11-9"] {
            assert!(!icd10cm_valid(bad), "{bad}");
        }
        for ok in ["38341003", "44054006", "73211009", "22298006"] {
            assert!(snomed_valid(ok), "{ok}");
        }
        for bad in ["38341004", "0123456", "12345", "3834100a"] {
            assert!(!snomed_valid(bad), "{bad}");
        }
        for ok in [
            "g/dL",
            "mL/min/{1.73_m2}",
            "10*3/uL",
            "mg/dL",
            "%",
            "[in_i]",
        ] {
            assert!(ucum_shaped(ok), "{ok}");
        }
        for bad in ["", "g dL", "mg/(dL", "x]"] {
            assert!(!ucum_shaped(bad), "{bad}");
        }
        assert!(is_code("final") && !is_code(" final") && !is_code(""));
    }
}
