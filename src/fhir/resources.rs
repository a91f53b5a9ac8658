//! The clinical resources Custodian stores — Condition, Observation, MedicationRequest,
//! Procedure — with their checks, their search parameters and their de-identified form.
//! Patient is not stored as a document: it is the patients table (`patient.rs`).

use serde::{Deserialize, Serialize};

use super::dates::DateRange;
use super::types::*;
use crate::access::Permission;

/// The resource types served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Patient,
    Condition,
    Observation,
    MedicationRequest,
    Procedure,
}

impl ResourceType {
    pub const ALL: [ResourceType; 5] = [
        Self::Patient,
        Self::Condition,
        Self::Observation,
        Self::MedicationRequest,
        Self::Procedure,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "Patient",
            Self::Condition => "Condition",
            Self::Observation => "Observation",
            Self::MedicationRequest => "MedicationRequest",
            Self::Procedure => "Procedure",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
    /// Reading it: `patients:read` for Patient, `records:read` for the clinical types.
    pub const fn read_permission(self) -> Permission {
        match self {
            Self::Patient => Permission::PatientsRead,
            _ => Permission::RecordsRead,
        }
    }
    pub const fn write_permission(self) -> Permission {
        match self {
            Self::Patient => Permission::PatientsWrite,
            _ => Permission::RecordsWrite,
        }
    }
    /// The US Core profile its answers conform to.
    pub const fn us_core_profiles(self) -> &'static [&'static str] {
        match self {
            Self::Patient => &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"],
            Self::Condition => &[
                "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns",
                "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-encounter-diagnosis",
            ],
            Self::Observation => {
                &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]
            }
            Self::MedicationRequest => {
                &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest"]
            }
            Self::Procedure => {
                &["http://hl7.org/fhir/us/core/StructureDefinition/us-core-procedure"]
            }
        }
    }
}

/// How a search parameter's values are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    Date,
    Reference,
    String,
}

impl ParamKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Date => "date",
            Self::Reference => "reference",
            Self::String => "string",
        }
    }
}

/// One search parameter: what the CapabilityStatement lists and the parser accepts.
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub doc: &'static str,
}

const fn p(name: &'static str, kind: ParamKind, doc: &'static str) -> ParamSpec {
    ParamSpec { name, kind, doc }
}

use ParamKind::{Date as D, Reference as R, String as S, Token as T};

pub const PATIENT_PARAMS: &[ParamSpec] = &[
    p("_id", T, "The patient's id (comma: any of them)."),
    p(
        "identifier",
        T,
        "The MRN (`system|value` or the value); the SSN only with `phi:ssn`.",
    ),
    p(
        "name",
        S,
        "Each word begins a word of a given or family name (3 letters or more; shorter words match whole words), any case or accent form. No infix or fuzzy match.",
    ),
    p(
        "family",
        S,
        "Each word begins a word of the family name (3 letters or more; shorter words match whole words), any case or accent form.",
    ),
    p(
        "given",
        S,
        "Each word begins a word of a given name (3 letters or more; shorter words match whole words), any case or accent form.",
    ),
    p(
        "birthdate",
        D,
        "Birth date: alone, an exact day; with name, identifier or _id, any prefix.",
    ),
    p(
        "gender",
        T,
        "Administrative gender; only with name, family, given, identifier or _id.",
    ),
];
pub const CONDITION_PARAMS: &[ParamSpec] = &[
    p(
        "patient",
        R,
        "The patient (required): `ID` or `Patient/ID`.",
    ),
    p(
        "category",
        T,
        "problem-list-item, encounter-diagnosis, health-concern.",
    ),
    p(
        "clinical-status",
        T,
        "active, recurrence, relapse, inactive, remission, resolved.",
    ),
    p("code", T, "ICD-10-CM or SNOMED CT code."),
    p("onset-date", D, "onsetDateTime."),
    p("recorded-date", D, "recordedDate."),
];
pub const OBSERVATION_PARAMS: &[ParamSpec] = &[
    p(
        "patient",
        R,
        "The patient (required): `ID` or `Patient/ID`.",
    ),
    p("category", T, "laboratory, vital-signs, social-history, …"),
    p("code", T, "LOINC code."),
    p("date", D, "effectiveDateTime (or effectivePeriod)."),
    p("status", T, "registered, preliminary, final, amended, …"),
];
pub const MEDICATION_REQUEST_PARAMS: &[ParamSpec] = &[
    p(
        "patient",
        R,
        "The patient (required): `ID` or `Patient/ID`.",
    ),
    p("intent", T, "proposal, plan, order, original-order, …"),
    p("status", T, "active, on-hold, cancelled, completed, …"),
    p("code", T, "RxNorm code of medicationCodeableConcept."),
    p("authoredon", D, "authoredOn."),
];
pub const PROCEDURE_PARAMS: &[ParamSpec] = &[
    p(
        "patient",
        R,
        "The patient (required): `ID` or `Patient/ID`.",
    ),
    p("date", D, "performedDateTime (or performedPeriod)."),
    p("code", T, "The procedure's code."),
    p("status", T, "preparation, in-progress, completed, …"),
];

pub fn params_of(t: ResourceType) -> &'static [ParamSpec] {
    match t {
        ResourceType::Patient => PATIENT_PARAMS,
        ResourceType::Condition => CONDITION_PARAMS,
        ResourceType::Observation => OBSERVATION_PARAMS,
        ResourceType::MedicationRequest => MEDICATION_REQUEST_PARAMS,
        ResourceType::Procedure => PROCEDURE_PARAMS,
    }
}

// ---- the resources -------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clinical_status: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_status: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_site: Vec<CodeableConcept>,
    #[serde(default)]
    pub subject: Reference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset_date_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abatement_date_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_date: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservationComponent {
    pub code: CodeableConcept,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_quantity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_codeable_concept: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_absent_reason: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interpretation: Vec<CodeableConcept>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Observation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    #[serde(default)]
    pub code: CodeableConcept,
    #[serde(default)]
    pub subject: Reference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_date_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_quantity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_codeable_concept: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_boolean: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_integer: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_absent_reason: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interpretation: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_site: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_range: Vec<Range>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub component: Vec<ObservationComponent>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dosage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MedicationRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<CodeableConcept>,
    #[serde(default)]
    pub intent: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_boolean: Option<bool>,
    #[serde(default)]
    pub medication_codeable_concept: CodeableConcept,
    #[serde(default)]
    pub subject: Reference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authored_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<Reference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reason_code: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dosage_instruction: Vec<Dosage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Procedure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<CodeableConcept>,
    #[serde(default)]
    pub code: CodeableConcept,
    #[serde(default)]
    pub subject: Reference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performed_date_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performed_period: Option<Period>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reason_code: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_site: Vec<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
}

/// A stored clinical resource (its id and version live beside it, not inside). The
/// variants differ in size, and resources are held a page at a time: not boxed.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Clinical {
    Condition(Condition),
    Observation(Observation),
    MedicationRequest(MedicationRequest),
    Procedure(Procedure),
}

const OBS_STATUS: &[&str] = &[
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const OBS_CATEGORY: &[&str] = &[
    "social-history",
    "vital-signs",
    "imaging",
    "laboratory",
    "procedure",
    "survey",
    "exam",
    "therapy",
    "activity",
];
const MR_STATUS: &[&str] = &[
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "entered-in-error",
    "stopped",
    "draft",
    "unknown",
];
const MR_INTENT: &[&str] = &[
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];
const PROC_STATUS: &[&str] = &[
    "preparation",
    "in-progress",
    "not-done",
    "on-hold",
    "stopped",
    "completed",
    "entered-in-error",
    "unknown",
];
const COND_CLINICAL: &[&str] = &[
    "active",
    "recurrence",
    "relapse",
    "inactive",
    "remission",
    "resolved",
];
const COND_VERIFICATION: &[&str] = &[
    "unconfirmed",
    "provisional",
    "differential",
    "confirmed",
    "refuted",
    "entered-in-error",
];
const COND_CATEGORY: &[&str] = &["problem-list-item", "encounter-diagnosis", "health-concern"];

/// The systems of the `code`-typed elements, for `system|code` searches on them.
const OBS_STATUS_SYSTEM: &str = "http://hl7.org/fhir/observation-status";
const MR_STATUS_SYSTEM: &str = "http://hl7.org/fhir/CodeSystem/medicationrequest-status";
const MR_INTENT_SYSTEM: &str = "http://hl7.org/fhir/CodeSystem/medicationrequest-intent";
const EVENT_STATUS_SYSTEM: &str = "http://hl7.org/fhir/event-status";

fn concepts(f: &mut Findings, at: &str, list: &[CodeableConcept]) {
    for (i, c) in list.iter().enumerate() {
        check_concept(f, &format!("{at}[{i}]"), c);
    }
}

fn notes(f: &mut Findings, at: &str, list: &[Annotation]) {
    for (i, a) in list.iter().enumerate() {
        check_annotation(f, &format!("{at}[{i}]"), a);
    }
}

fn meta(f: &mut Findings, at: &str, m: &Option<Meta>) {
    let Some(m) = m else { return };
    for (i, p) in m.profile.iter().enumerate() {
        if !p.contains(':') || p.chars().any(char::is_whitespace) {
            f.add(format!("{at}.profile[{i}]"), "must be a canonical URL");
        }
    }
    for (i, c) in m.security.iter().enumerate() {
        check_coding(f, &format!("{at}.security[{i}]"), c);
    }
    for (i, c) in m.tag.iter().enumerate() {
        check_coding(f, &format!("{at}.tag[{i}]"), c);
    }
}

/// One value of a token search: `system|code`, `|code` (no system), `system|`, `code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub system: Option<String>,
    pub code: Option<String>,
}

impl Token {
    pub fn parse(v: &str) -> Self {
        match v.split_once('|') {
            None => Self {
                system: None,
                code: Some(v.to_owned()),
            },
            Some((s, c)) => Self {
                system: Some(s.to_owned()),
                code: (!c.is_empty()).then(|| c.to_owned()),
            },
        }
    }

    /// Against a concept: one coding with this system (or none for `|code`) and code.
    pub fn matches_concept(&self, cc: &CodeableConcept) -> bool {
        cc.coding.iter().any(|c| {
            let system_ok = match self.system.as_deref() {
                None => true,
                Some("") => c.system.is_none(),
                Some(s) => c.system.as_deref() == Some(s),
            };
            system_ok
                && self
                    .code
                    .as_deref()
                    .is_none_or(|k| c.code.as_deref() == Some(k))
        })
    }

    /// Against a `code` element whose system is implied.
    pub fn matches_code(&self, implied_system: &str, v: &str) -> bool {
        let system_ok = match self.system.as_deref() {
            None | Some("") => true,
            Some(s) => s == implied_system,
        };
        system_ok && self.code.as_deref().is_none_or(|k| k == v)
    }
}

fn range_of(dt: Option<&str>, period: Option<&Period>) -> Option<DateRange> {
    if let Some(d) = dt {
        return DateRange::parse_datetime(d);
    }
    let p = period?;
    let start = p.start.as_deref().and_then(DateRange::parse_datetime);
    let end = p.end.as_deref().and_then(DateRange::parse_datetime);
    match (start, end) {
        (Some(s), Some(e)) => Some(DateRange {
            start: s.start,
            end: e.end,
        }),
        (Some(s), None) => Some(DateRange {
            start: s.start,
            end: i128::MAX,
        }),
        (None, Some(e)) => Some(DateRange {
            start: i128::MIN,
            end: e.end,
        }),
        (None, None) => None,
    }
}

/// A year-only date (Safe Harbor keeps the year of dates about a person).
fn year(v: &mut Option<String>) {
    if let Some(s) = v {
        *s = s.get(..4).unwrap_or("").to_owned();
    }
}

fn redact(v: &mut Option<String>) {
    if v.is_some() {
        *v = Some("REDACTED".into());
    }
}

fn redact_concept(c: &mut CodeableConcept) {
    redact(&mut c.text);
}

fn redact_notes(n: &mut [Annotation]) {
    for a in n {
        a.text = "REDACTED".into();
        year(&mut a.time);
        a.author_string = None;
    }
}

fn year_period(p: &mut Option<Period>) {
    if let Some(p) = p {
        year(&mut p.start);
        year(&mut p.end);
    }
}

impl Clinical {
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Self::Condition(_) => ResourceType::Condition,
            Self::Observation(_) => ResourceType::Observation,
            Self::MedicationRequest(_) => ResourceType::MedicationRequest,
            Self::Procedure(_) => ResourceType::Procedure,
        }
    }

    /// Parses the body of a resource of type `t` (without `resourceType` and `id`).
    pub fn from_value(
        t: ResourceType,
        v: serde_json::Value,
    ) -> Result<Self, serde_path_to_error::Error<serde_json::Error>> {
        fn de<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
        ) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
            serde_path_to_error::deserialize(v)
        }
        Ok(match t {
            ResourceType::Observation => Self::Observation(de(v)?),
            ResourceType::MedicationRequest => Self::MedicationRequest(de(v)?),
            ResourceType::Procedure => Self::Procedure(de(v)?),
            _ => Self::Condition(de(v)?),
        })
    }

    /// Parses a stored document (written by this server: no path needed for errors).
    pub fn from_json(t: ResourceType, s: &str) -> Result<Self, serde_json::Error> {
        Ok(match t {
            ResourceType::Observation => Self::Observation(serde_json::from_str(s)?),
            ResourceType::MedicationRequest => Self::MedicationRequest(serde_json::from_str(s)?),
            ResourceType::Procedure => Self::Procedure(serde_json::from_str(s)?),
            _ => Self::Condition(serde_json::from_str(s)?),
        })
    }

    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Self::Condition(r) => serde_json::to_value(r),
            Self::Observation(r) => serde_json::to_value(r),
            Self::MedicationRequest(r) => serde_json::to_value(r),
            Self::Procedure(r) => serde_json::to_value(r),
        };
        v.unwrap_or(serde_json::Value::Null)
    }

    pub fn subject(&self) -> &Reference {
        match self {
            Self::Condition(r) => &r.subject,
            Self::Observation(r) => &r.subject,
            Self::MedicationRequest(r) => &r.subject,
            Self::Procedure(r) => &r.subject,
        }
    }

    pub fn subject_mut(&mut self) -> &mut Reference {
        match self {
            Self::Condition(r) => &mut r.subject,
            Self::Observation(r) => &mut r.subject,
            Self::MedicationRequest(r) => &mut r.subject,
            Self::Procedure(r) => &mut r.subject,
        }
    }

    pub fn meta(&self) -> Option<&Meta> {
        match self {
            Self::Condition(r) => r.meta.as_ref(),
            Self::Observation(r) => r.meta.as_ref(),
            Self::MedicationRequest(r) => r.meta.as_ref(),
            Self::Procedure(r) => r.meta.as_ref(),
        }
    }

    pub fn meta_mut(&mut self) -> &mut Option<Meta> {
        match self {
            Self::Condition(r) => &mut r.meta,
            Self::Observation(r) => &mut r.meta,
            Self::MedicationRequest(r) => &mut r.meta,
            Self::Procedure(r) => &mut r.meta,
        }
    }

    /// Everything the types cannot say. `at` is the resource type.
    pub fn check(&self, f: &mut Findings) {
        let at = self.resource_type().as_str();
        let subject = self.subject();
        if subject.reference.is_none() {
            f.add(format!("{at}.subject"), "is required: Patient/<id>");
        }
        if let Some(d) = &subject.display {
            check_text(f, &format!("{at}.subject.display"), d, 200);
        }
        match self {
            Self::Condition(c) => {
                meta(f, "Condition.meta", &c.meta);
                if let Some(s) = &c.clinical_status {
                    check_bound(
                        f,
                        "Condition.clinicalStatus",
                        s,
                        &[CONDITION_CLINICAL],
                        COND_CLINICAL,
                    );
                }
                if let Some(s) = &c.verification_status {
                    check_bound(
                        f,
                        "Condition.verificationStatus",
                        s,
                        &[CONDITION_VER_STATUS],
                        COND_VERIFICATION,
                    );
                }
                if c.category.is_empty() {
                    f.add(
                        "Condition.category",
                        "is required: problem-list-item, encounter-diagnosis or health-concern",
                    );
                }
                for (i, cat) in c.category.iter().enumerate() {
                    check_extensible(
                        f,
                        &format!("Condition.category[{i}]"),
                        cat,
                        &[CONDITION_CATEGORY, US_CORE_CONDITION_CATEGORY],
                        COND_CATEGORY,
                    );
                }
                match &c.code {
                    None => f.add("Condition.code", "is required"),
                    Some(code) => check_concept(f, "Condition.code", code),
                }
                if let Some(s) = &c.severity {
                    check_concept(f, "Condition.severity", s);
                }
                concepts(f, "Condition.bodySite", &c.body_site);
                for (name, v) in [
                    ("onsetDateTime", &c.onset_date_time),
                    ("abatementDateTime", &c.abatement_date_time),
                    ("recordedDate", &c.recorded_date),
                ] {
                    if let Some(v) = v {
                        check_datetime(f, &format!("Condition.{name}"), v);
                    }
                }
                notes(f, "Condition.note", &c.note);
            }
            Self::Observation(o) => {
                meta(f, "Observation.meta", &o.meta);
                check_code(f, "Observation.status", &o.status, OBS_STATUS);
                for (i, cat) in o.category.iter().enumerate() {
                    check_extensible(
                        f,
                        &format!("Observation.category[{i}]"),
                        cat,
                        &[OBSERVATION_CATEGORY],
                        OBS_CATEGORY,
                    );
                }
                check_concept(f, "Observation.code", &o.code);
                if let Some(v) = &o.effective_date_time {
                    check_datetime(f, "Observation.effectiveDateTime", v);
                }
                if let Some(p) = &o.effective_period {
                    check_period(f, "Observation.effectivePeriod", p);
                }
                if o.effective_date_time.is_some() && o.effective_period.is_some() {
                    f.add(
                        "Observation.effective[x]",
                        "only one of effectiveDateTime and effectivePeriod",
                    );
                }
                if let Some(v) = &o.issued
                    && !(v.contains('T') && DateRange::parse_datetime(v).is_some())
                {
                    f.add("Observation.issued", "must be a FHIR instant");
                }
                let values = [
                    o.value_quantity.is_some(),
                    o.value_codeable_concept.is_some(),
                    o.value_string.is_some(),
                    o.value_boolean.is_some(),
                    o.value_integer.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if values > 1 {
                    f.add("Observation.value[x]", "only one value[x]");
                }
                if values > 0 && o.data_absent_reason.is_some() {
                    f.add(
                        "Observation.dataAbsentReason",
                        "only when there is no value[x]",
                    );
                }
                if let Some(q) = &o.value_quantity {
                    check_quantity(f, "Observation.valueQuantity", q);
                }
                if let Some(c) = &o.value_codeable_concept {
                    check_concept(f, "Observation.valueCodeableConcept", c);
                }
                if let Some(s) = &o.value_string {
                    check_text(f, "Observation.valueString", s, 2000);
                }
                if let Some(c) = &o.data_absent_reason {
                    check_concept(f, "Observation.dataAbsentReason", c);
                }
                concepts(f, "Observation.interpretation", &o.interpretation);
                notes(f, "Observation.note", &o.note);
                if let Some(c) = &o.body_site {
                    check_concept(f, "Observation.bodySite", c);
                }
                if let Some(c) = &o.method {
                    check_concept(f, "Observation.method", c);
                }
                for (i, r) in o.reference_range.iter().enumerate() {
                    let at = format!("Observation.referenceRange[{i}]");
                    if let Some(q) = &r.low {
                        check_quantity(f, &format!("{at}.low"), q);
                    }
                    if let Some(q) = &r.high {
                        check_quantity(f, &format!("{at}.high"), q);
                    }
                    if let Some(t) = &r.text {
                        check_text(f, &format!("{at}.text"), t, 500);
                    }
                    if r.low.is_none() && r.high.is_none() && r.text.is_none() {
                        f.add(at, "needs low, high or text");
                    }
                }
                for (i, c) in o.component.iter().enumerate() {
                    let at = format!("Observation.component[{i}]");
                    check_concept(f, &format!("{at}.code"), &c.code);
                    if let Some(q) = &c.value_quantity {
                        check_quantity(f, &format!("{at}.valueQuantity"), q);
                    }
                    if let Some(v) = &c.value_codeable_concept {
                        check_concept(f, &format!("{at}.valueCodeableConcept"), v);
                    }
                    if let Some(s) = &c.value_string {
                        check_text(f, &format!("{at}.valueString"), s, 2000);
                    }
                    if let Some(v) = &c.data_absent_reason {
                        check_concept(f, &format!("{at}.dataAbsentReason"), v);
                    }
                    concepts(f, &format!("{at}.interpretation"), &c.interpretation);
                }
            }
            Self::MedicationRequest(m) => {
                meta(f, "MedicationRequest.meta", &m.meta);
                check_code(f, "MedicationRequest.status", &m.status, MR_STATUS);
                check_code(f, "MedicationRequest.intent", &m.intent, MR_INTENT);
                if let Some(c) = &m.status_reason {
                    check_concept(f, "MedicationRequest.statusReason", c);
                }
                concepts(f, "MedicationRequest.category", &m.category);
                check_concept(
                    f,
                    "MedicationRequest.medicationCodeableConcept",
                    &m.medication_codeable_concept,
                );
                if let Some(a) = &m.authored_on {
                    check_datetime(f, "MedicationRequest.authoredOn", a);
                }
                if let Some(r) = &m.requester {
                    if r.reference.is_some() {
                        f.add(
                            "MedicationRequest.requester.reference",
                            "Custodian holds no Practitioner resources: give requester.display",
                        );
                    }
                    match &r.display {
                        Some(d) => check_text(f, "MedicationRequest.requester.display", d, 200),
                        None => f.add("MedicationRequest.requester.display", "is required"),
                    }
                }
                concepts(f, "MedicationRequest.reasonCode", &m.reason_code);
                for (i, d) in m.dosage_instruction.iter().enumerate() {
                    if let Some(t) = &d.text {
                        check_text(
                            f,
                            &format!("MedicationRequest.dosageInstruction[{i}].text"),
                            t,
                            1000,
                        );
                    }
                }
                notes(f, "MedicationRequest.note", &m.note);
            }
            Self::Procedure(p) => {
                meta(f, "Procedure.meta", &p.meta);
                check_code(f, "Procedure.status", &p.status, PROC_STATUS);
                if let Some(c) = &p.status_reason {
                    check_concept(f, "Procedure.statusReason", c);
                }
                if let Some(c) = &p.category {
                    check_concept(f, "Procedure.category", c);
                }
                check_concept(f, "Procedure.code", &p.code);
                if let Some(v) = &p.performed_date_time {
                    check_datetime(f, "Procedure.performedDateTime", v);
                }
                if let Some(v) = &p.performed_period {
                    check_period(f, "Procedure.performedPeriod", v);
                }
                if p.performed_date_time.is_some() && p.performed_period.is_some() {
                    f.add(
                        "Procedure.performed[x]",
                        "only one of performedDateTime and performedPeriod",
                    );
                }
                concepts(f, "Procedure.reasonCode", &p.reason_code);
                concepts(f, "Procedure.bodySite", &p.body_site);
                if let Some(c) = &p.outcome {
                    check_concept(f, "Procedure.outcome", c);
                }
                notes(f, "Procedure.note", &p.note);
            }
        }
    }

    /// The clinical time, for ordering (most recent first) and for the date parameter.
    pub fn when(&self) -> Option<DateRange> {
        match self {
            Self::Condition(c) => c
                .onset_date_time
                .as_deref()
                .or(c.recorded_date.as_deref())
                .and_then(DateRange::parse_datetime),
            Self::Observation(o) => range_of(
                o.effective_date_time.as_deref().or(o.issued.as_deref()),
                o.effective_period.as_ref(),
            ),
            Self::MedicationRequest(m) => {
                m.authored_on.as_deref().and_then(DateRange::parse_datetime)
            }
            Self::Procedure(p) => range_of(
                p.performed_date_time.as_deref(),
                p.performed_period.as_ref(),
            ),
        }
    }

    /// The date a date parameter compares (`None`: the resource has none, and matches
    /// no date search).
    pub fn date_of(&self, param: &str) -> Option<DateRange> {
        match (self, param) {
            (Self::Condition(c), "onset-date") => c
                .onset_date_time
                .as_deref()
                .and_then(DateRange::parse_datetime),
            (Self::Condition(c), "recorded-date") => c
                .recorded_date
                .as_deref()
                .and_then(DateRange::parse_datetime),
            (Self::Observation(o), "date") => range_of(
                o.effective_date_time.as_deref(),
                o.effective_period.as_ref(),
            ),
            (Self::MedicationRequest(m), "authoredon") => {
                m.authored_on.as_deref().and_then(DateRange::parse_datetime)
            }
            (Self::Procedure(p), "date") => range_of(
                p.performed_date_time.as_deref(),
                p.performed_period.as_ref(),
            ),
            _ => None,
        }
    }

    /// Whether a token parameter matches one of `values` (they are OR'ed).
    pub fn token_matches(&self, param: &str, values: &[Token]) -> bool {
        let any_concept = |ccs: &[&CodeableConcept]| {
            values
                .iter()
                .any(|t| ccs.iter().any(|c| t.matches_concept(c)))
        };
        let any_code = |system: &str, v: &str| values.iter().any(|t| t.matches_code(system, v));
        match (self, param) {
            (Self::Condition(c), "category") => any_concept(&c.category.iter().collect::<Vec<_>>()),
            (Self::Condition(c), "clinical-status") => {
                any_concept(&c.clinical_status.iter().collect::<Vec<_>>())
            }
            (Self::Condition(c), "code") => any_concept(&c.code.iter().collect::<Vec<_>>()),
            (Self::Observation(o), "category") => {
                any_concept(&o.category.iter().collect::<Vec<_>>())
            }
            (Self::Observation(o), "code") => any_concept(&[&o.code]),
            (Self::Observation(o), "status") => any_code(OBS_STATUS_SYSTEM, &o.status),
            (Self::MedicationRequest(m), "intent") => any_code(MR_INTENT_SYSTEM, &m.intent),
            (Self::MedicationRequest(m), "status") => any_code(MR_STATUS_SYSTEM, &m.status),
            (Self::MedicationRequest(m), "code") => any_concept(&[&m.medication_codeable_concept]),
            (Self::Procedure(p), "code") => any_concept(&[&p.code]),
            (Self::Procedure(p), "status") => any_code(EVENT_STATUS_SYSTEM, &p.status),
            _ => false,
        }
    }

    /// The de-identified form (HIPAA Safe Harbor): dates about the person reduced to
    /// their year, every free text replaced by `REDACTED`, display names of people
    /// removed; codes and values kept. The caller replaces the ids.
    pub fn deidentify(&mut self) {
        self.subject_mut().display = None;
        match self {
            Self::Condition(c) => {
                for cc in c
                    .clinical_status
                    .iter_mut()
                    .chain(c.verification_status.iter_mut())
                    .chain(c.category.iter_mut())
                    .chain(c.severity.iter_mut())
                    .chain(c.code.iter_mut())
                    .chain(c.body_site.iter_mut())
                {
                    redact_concept(cc);
                }
                year(&mut c.onset_date_time);
                year(&mut c.abatement_date_time);
                year(&mut c.recorded_date);
                redact_notes(&mut c.note);
            }
            Self::Observation(o) => {
                redact_concept(&mut o.code);
                for cc in o.category.iter_mut().chain(o.interpretation.iter_mut()) {
                    redact_concept(cc);
                }
                year(&mut o.effective_date_time);
                year_period(&mut o.effective_period);
                year(&mut o.issued);
                redact(&mut o.value_string);
                if let Some(c) = &mut o.value_codeable_concept {
                    redact_concept(c);
                }
                redact_notes(&mut o.note);
                for r in &mut o.reference_range {
                    redact(&mut r.text);
                }
                for c in &mut o.component {
                    redact_concept(&mut c.code);
                    redact(&mut c.value_string);
                }
            }
            Self::MedicationRequest(m) => {
                redact_concept(&mut m.medication_codeable_concept);
                for cc in m.reason_code.iter_mut() {
                    redact_concept(cc);
                }
                year(&mut m.authored_on);
                m.requester = None;
                for d in &mut m.dosage_instruction {
                    redact(&mut d.text);
                }
                redact_notes(&mut m.note);
            }
            Self::Procedure(p) => {
                redact_concept(&mut p.code);
                for cc in p.reason_code.iter_mut() {
                    redact_concept(cc);
                }
                year(&mut p.performed_date_time);
                year_period(&mut p.performed_period);
                redact_notes(&mut p.note);
            }
        }
    }
}
