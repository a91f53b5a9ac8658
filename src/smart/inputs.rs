//! From a patient's FHIR R4 resources to the PRECISE-HBR inputs, with where each came from.
//!
//! Every resource is read on its own into a small typed model; one that does not fit
//! (missing fields, wrong types) is skipped with a note, never a crash. A value in an
//! unknown unit, or outside its physical range, is treated as missing with a note.
//! The code sets are in `codes.json` (with their sources and what was checked).

use std::collections::BTreeSet;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;
use time::Date;

use super::score::{self, ArcHbr, Inputs, Sex};

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const ICD10: &str = "http://hl7.org/fhir/sid/icd-10";
pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

// ---- code sets ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct ObservationSet {
    pub loinc: Vec<String>,
    pub label: String,
}

#[derive(Debug, Deserialize)]
pub struct ObservationSets {
    pub hemoglobin: ObservationSet,
    pub creatinine: ObservationSet,
    pub egfr: ObservationSet,
    pub wbc: ObservationSet,
    pub platelets: ObservationSet,
}

#[derive(Debug, Deserialize)]
pub struct ConditionSet {
    pub label: String,
    #[serde(default)]
    pub snomed: Vec<String>,
    #[serde(default)]
    pub exclude_snomed: Vec<String>,
    #[serde(default)]
    pub icd10_prefixes: Vec<String>,
    #[serde(default)]
    pub icd10_ranges: Vec<(String, String)>,
    #[serde(default)]
    pub ongoing_only: bool,
    #[serde(default)]
    pub within_days: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct ConditionSets {
    pub prior_bleeding: ConditionSet,
    pub bleeding_diathesis: ConditionSet,
    pub cirrhosis: ConditionSet,
    pub portal_hypertension: ConditionSet,
    pub active_cancer: ConditionSet,
    pub recent_trauma: ConditionSet,
}

#[derive(Debug, Deserialize)]
pub struct MedicationSet {
    pub label: String,
    pub rxnorm: Vec<String>,
    pub names: Vec<String>,
    #[serde(default)]
    pub exclude_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct MedicationSets {
    pub oral_anticoagulant: MedicationSet,
    pub nsaid: MedicationSet,
    pub corticosteroid: MedicationSet,
}

#[derive(Debug, Deserialize)]
pub struct ProcedureSet {
    pub label: String,
    pub snomed: Vec<String>,
    pub within_days: i64,
}

#[derive(Debug, Deserialize)]
pub struct ProcedureSets {
    pub major_surgery: ProcedureSet,
}

#[derive(Debug, Deserialize)]
pub struct Codes {
    pub observations: ObservationSets,
    pub conditions: ConditionSets,
    pub medications: MedicationSets,
    pub procedures: ProcedureSets,
}

static CODES: LazyLock<Result<Codes, String>> =
    LazyLock::new(|| serde_json::from_str(include_str!("codes.json")).map_err(|e| e.to_string()));

/// The code sets (built into the binary; a unit test proves they parse).
pub fn codes() -> Result<&'static Codes, String> {
    CODES.as_ref().map_err(Clone::clone)
}

impl ObservationSets {
    /// Every LOINC code the app asks for, for one Observation search.
    pub fn all(&self) -> Vec<&str> {
        [
            &self.hemoglobin,
            &self.creatinine,
            &self.egfr,
            &self.wbc,
            &self.platelets,
        ]
        .iter()
        .flat_map(|s| s.loinc.iter().map(String::as_str))
        .collect()
    }
}

// ---- typed models --------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Coding {
    pub system: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct CodeableConcept {
    #[serde(default)]
    pub coding: Vec<Coding>,
    pub text: Option<String>,
}

impl CodeableConcept {
    fn has(&self, system: &str, codes: &[String]) -> bool {
        self.coding.iter().any(|c| {
            c.system.as_deref() == Some(system)
                && c.code
                    .as_deref()
                    .is_some_and(|x| codes.iter().any(|k| k == x))
        })
    }

    fn codes_of<'a>(&'a self, systems: &'a [&str]) -> impl Iterator<Item = &'a str> + 'a {
        self.coding
            .iter()
            .filter(|c| c.system.as_deref().is_some_and(|s| systems.contains(&s)))
            .filter_map(|c| c.code.as_deref())
    }

    fn words(&self) -> String {
        let mut s = self.text.clone().unwrap_or_default();
        for c in &self.coding {
            if let Some(d) = &c.display {
                s.push(' ');
                s.push_str(d);
            }
        }
        s.to_lowercase()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Quantity {
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Period {
    pub start: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient {
    pub id: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub id: Option<String>,
    pub status: Option<String>,
    pub code: Option<CodeableConcept>,
    pub value_quantity: Option<Quantity>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub issued: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub id: Option<String>,
    pub clinical_status: Option<CodeableConcept>,
    pub verification_status: Option<CodeableConcept>,
    pub code: Option<CodeableConcept>,
    pub onset_date_time: Option<String>,
    pub recorded_date: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationRequest {
    pub id: Option<String>,
    pub status: Option<String>,
    pub medication_codeable_concept: Option<CodeableConcept>,
    pub authored_on: Option<String>,
}

/// A medication the patient reports or a clinician recorded as taken (R4).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationStatement {
    pub id: Option<String>,
    pub status: Option<String>,
    pub medication_codeable_concept: Option<CodeableConcept>,
    pub effective_date_time: Option<String>,
    pub effective_period: Option<Period>,
    pub date_asserted: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Procedure {
    pub id: Option<String>,
    pub status: Option<String>,
    pub code: Option<CodeableConcept>,
    pub performed_date_time: Option<String>,
    pub performed_period: Option<Period>,
}

// ---- what the page shows -------------------------------------------------------------------

/// Where an input came from: resource, date, value and unit as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub input: &'static str,
    pub resource: String,
    pub date: String,
    pub recorded: String,
    /// The value in the score's unit, when converted.
    pub used: Option<f64>,
}

/// The inputs found, where they came from, and what could not be used and why.
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    pub inputs: Inputs,
    pub sources: Vec<Source>,
    pub notes: Vec<String>,
}

/// The raw resources of one patient.
#[derive(Debug, Default)]
pub struct Bundle {
    pub patient: Value,
    pub observations: Vec<Value>,
    pub conditions: Vec<Value>,
    pub medications: Vec<Value>,
    /// MedicationStatements, or why they were not read (`Err` holds the note).
    pub statements: Option<Result<Vec<Value>, String>>,
    pub procedures: Vec<Value>,
    /// A search stopped at the page cap.
    pub truncated: Vec<&'static str>,
    /// Searches the FHIR server answered with something withheld (a patient's
    /// restriction).
    pub withheld: Vec<&'static str>,
}

impl Bundle {
    /// How many resources were read (the patient included), for the audit context.
    pub fn resource_count(&self) -> usize {
        let statements = match &self.statements {
            Some(Ok(found)) => found.len(),
            _ => 0,
        };
        1 + self.observations.len()
            + self.conditions.len()
            + self.medications.len()
            + statements
            + self.procedures.len()
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    v: &Value,
    kind: &str,
    notes: &mut Vec<String>,
) -> Option<T> {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => Some(t),
        Err(_) => {
            let id = v.get("id").and_then(Value::as_str).unwrap_or("?");
            notes.push(format!(
                "{kind}/{} could not be read (malformed) and was ignored.",
                short(id)
            ));
            None
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `YYYY-MM-DD…` (or `YYYY-MM`, `YYYY`, taking the first day) as a date.
pub fn fhir_date(s: &str) -> Option<Date> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let padded = match s.len() {
        4 => format!("{s}-01-01"),
        7 => format!("{s}-01"),
        _ => s.get(..10)?.to_owned(),
    };
    Date::parse(&padded, &fmt).ok()
}

fn age_on(birth: Date, today: Date) -> i64 {
    let mut years = i64::from(today.year() - birth.year());
    if (today.month() as u8, today.day()) < (birth.month() as u8, birth.day()) {
        years -= 1;
    }
    years
}

/// The factor from a recorded unit to the score's unit; None when the unit is unknown.
pub fn conversion(input: &str, unit: &str) -> Option<f64> {
    let u = unit.trim();
    let lower = u.to_lowercase().replace(['μ', 'µ'], "u");
    match input {
        "hemoglobin" => match lower.as_str() {
            "g/dl" => Some(1.0),
            "g/l" => Some(0.1),
            "mmol/l" => Some(1.611),
            _ => None,
        },
        "creatinine" => match lower.as_str() {
            "mg/dl" => Some(1.0),
            "umol/l" => Some(1.0 / 88.4),
            _ => None,
        },
        "egfr" => {
            let compact: String = lower.chars().filter(|c| !c.is_whitespace()).collect();
            matches!(
                compact.as_str(),
                "ml/min/{1.73_m2}" | "ml/min/1.73m2" | "ml/min/1.73m^2" | "ml/min/{1.73m2}"
            )
            .then_some(1.0)
        }
        "wbc" | "platelets" => match lower.as_str() {
            "10*9/l" | "10^9/l" | "10*3/ul" | "10^3/ul" | "k/ul" | "10*3/mm3" | "10^3/mm3" => {
                Some(1.0)
            }
            "/ul" | "/mm3" | "{cells}/ul" => Some(0.001),
            _ => None,
        },
        _ => None,
    }
}

fn physical(input: &str) -> (f64, f64) {
    match input {
        "hemoglobin" => score::HEMOGLOBIN.physical,
        "egfr" => score::EGFR.physical,
        "wbc" => score::WBC.physical,
        "platelets" => score::PLATELETS_PHYSICAL,
        "creatinine" => (0.01, score::CREATININE_PHYSICAL.1),
        _ => (f64::MIN, f64::MAX),
    }
}

/// Gathers the inputs. `today` is the calculation date (the clock's).
pub fn gather(b: &Bundle, today: Date) -> Result<Gathered, String> {
    let codes = codes()?;
    let mut g = Gathered::default();
    for kind in &b.truncated {
        g.notes.push(format!(
            "Only the first pages of {kind} were read (smart.max_pages); older entries were not considered."
        ));
    }
    for kind in &b.withheld {
        g.notes.push(format!(
            "Some {kind} data is withheld at the patient's request: the score may miss inputs. A clinician whose role may see it (or break-glass in the EHR) can check."
        ));
    }

    // Patient: age and sex.
    if let Some(p) = parse::<Patient>(&b.patient, "Patient", &mut g.notes) {
        let resource = format!("Patient/{}", short(p.id.as_deref().unwrap_or("?")));
        match p.birth_date.as_deref().map(|d| (d, fhir_date(d))) {
            Some((raw, Some(birth))) if birth <= today => {
                let age = age_on(birth, today);
                if raw.len() < 10 {
                    g.notes.push(
                        "The birth date is partial; the age may be off by up to a year.".into(),
                    );
                }
                #[allow(clippy::cast_precision_loss)]
                let age_f = age as f64;
                if (0.0..=120.0).contains(&age_f) {
                    g.inputs.age = Some(age_f);
                    g.sources.push(Source {
                        input: "age",
                        resource: resource.clone(),
                        date: raw.to_owned(),
                        recorded: format!("birthDate {raw}"),
                        used: Some(age_f),
                    });
                } else {
                    g.notes.push(
                        "The age from the birth date is not plausible; age is treated as unknown."
                            .into(),
                    );
                }
            }
            Some(_) => g
                .notes
                .push("The birth date could not be read; age is unknown.".into()),
            None => g
                .notes
                .push("The patient has no birth date; age is unknown.".into()),
        }
        g.inputs.sex = match p.gender.as_deref() {
            Some("male") => Some(Sex::Male),
            Some("female") => Some(Sex::Female),
            _ => None,
        };
    }

    // Observations: the newest final result of each input.
    let obs: Vec<Observation> = b
        .observations
        .iter()
        .filter_map(|v| parse(v, "Observation", &mut g.notes))
        .collect();
    let sets = &codes.observations;
    let mut creatinine = None;
    let mut platelets = None;
    for (input, set) in [
        ("hemoglobin", &sets.hemoglobin),
        ("egfr", &sets.egfr),
        ("wbc", &sets.wbc),
        ("creatinine", &sets.creatinine),
        ("platelets", &sets.platelets),
    ] {
        let newest = obs
            .iter()
            .filter(|o| matches!(o.status.as_deref(), Some("final" | "amended" | "corrected")))
            .filter(|o| o.code.as_ref().is_some_and(|c| c.has(LOINC, &set.loinc)))
            .max_by(|a, b| obs_date(a).cmp(obs_date(b)));
        let Some(o) = newest else { continue };
        let resource = format!("Observation/{}", short(o.id.as_deref().unwrap_or("?")));
        let date = obs_date(o).to_owned();
        let Some(q) = &o.value_quantity else {
            g.notes.push(format!(
                "{resource} ({}) has no numeric value; {input} is treated as unknown.",
                set.label
            ));
            continue;
        };
        let unit = q.code.as_deref().or(q.unit.as_deref()).unwrap_or("");
        let recorded = format!(
            "{} {}",
            q.value.map_or("?".into(), |v| v.to_string()),
            q.unit.as_deref().or(q.code.as_deref()).unwrap_or("")
        );
        let Some(value) = q.value else {
            g.notes.push(format!(
                "{resource} has no value; {input} is treated as unknown."
            ));
            continue;
        };
        let Some(factor) = conversion(input, unit)
            .or_else(|| q.unit.as_deref().and_then(|u| conversion(input, u)))
        else {
            g.notes.push(format!(
                "{resource}: the unit `{}` is not one the calculator knows for {input}; the value is treated as unknown.",
                short(unit)
            ));
            continue;
        };
        let used = value * factor;
        let (lo, hi) = physical(input);
        if !used.is_finite() || used < lo || used > hi {
            g.notes.push(format!(
                "{resource}: {recorded} is outside the possible range for {input}; the value is treated as unknown."
            ));
            continue;
        }
        g.sources.push(Source {
            input,
            resource,
            date,
            recorded,
            used: Some((used * 1000.0).round() / 1000.0),
        });
        match input {
            "hemoglobin" => g.inputs.hemoglobin = Some(used),
            "egfr" => g.inputs.egfr = Some(used),
            "wbc" => g.inputs.wbc = Some(used),
            "creatinine" => creatinine = Some(used),
            _ => platelets = Some(used),
        }
    }
    g.inputs.creatinine = creatinine;
    g.inputs.platelets = platelets;
    if g.inputs.egfr.is_none() && creatinine.is_some() {
        if g.inputs.sex.is_none() {
            g.notes.push("There is no eGFR and the patient's sex is not male or female: the eGFR cannot be derived from creatinine.".into());
        } else if g.inputs.age.is_some() {
            g.notes.push(
                "There is no eGFR result: it is derived from creatinine (CKD-EPI 2021).".into(),
            );
        }
    }

    // Conditions.
    let conds: Vec<Condition> = b
        .conditions
        .iter()
        .filter_map(|v| parse(v, "Condition", &mut g.notes))
        .collect();
    let cs = &codes.conditions;
    let hit = |set: &ConditionSet, name: &'static str, sources: &mut Vec<Source>| -> bool {
        let mut any = false;
        for c in &conds {
            if condition_matches(c, set, today) {
                any = true;
                sources.push(Source {
                    input: name,
                    resource: format!("Condition/{}", short(c.id.as_deref().unwrap_or("?"))),
                    date: c
                        .onset_date_time
                        .clone()
                        .or_else(|| c.recorded_date.clone())
                        .unwrap_or_default(),
                    recorded: c.code.as_ref().map(describe).unwrap_or_default(),
                    used: None,
                });
            }
        }
        any
    };
    g.inputs.prior_bleeding = hit(&cs.prior_bleeding, "prior_bleeding", &mut g.sources);
    if hit(&cs.bleeding_diathesis, "bleeding_diathesis", &mut g.sources) {
        g.inputs.arc_hbr.insert(ArcHbr::BleedingDiathesis);
    }
    let mut liver = Vec::new();
    let cirrhosis = hit(&cs.cirrhosis, "cirrhosis_portal_hypertension", &mut liver);
    let portal = hit(
        &cs.portal_hypertension,
        "cirrhosis_portal_hypertension",
        &mut liver,
    );
    if cirrhosis && portal {
        g.inputs.arc_hbr.insert(ArcHbr::CirrhosisPortalHypertension);
        g.sources.extend(liver);
    } else if cirrhosis {
        g.notes.push("Cirrhosis is recorded without portal hypertension or varices: it does not count as an ARC-HBR element.".into());
    }
    if hit(&cs.active_cancer, "active_cancer", &mut g.sources) {
        g.inputs.arc_hbr.insert(ArcHbr::ActiveCancer);
    }
    let trauma = hit(&cs.recent_trauma, "recent_surgery_trauma", &mut g.sources);

    // Medications: active requests and active statements.
    struct Med<'a> {
        resource: String,
        date: String,
        concept: Option<&'a CodeableConcept>,
    }
    let requests: Vec<MedicationRequest> = b
        .medications
        .iter()
        .filter_map(|v| parse(v, "MedicationRequest", &mut g.notes))
        .collect();
    let statements: Vec<MedicationStatement> = match &b.statements {
        Some(Ok(found)) => found
            .iter()
            .filter_map(|v| parse(v, "MedicationStatement", &mut g.notes))
            .collect(),
        Some(Err(note)) => {
            g.notes.push(note.clone());
            Vec::new()
        }
        None => Vec::new(),
    };
    let active = |status: &Option<String>| status.as_deref() == Some("active");
    let meds = requests
        .iter()
        .filter(|m| active(&m.status))
        .map(|m| Med {
            resource: format!(
                "MedicationRequest/{}",
                short(m.id.as_deref().unwrap_or("?"))
            ),
            date: m.authored_on.clone().unwrap_or_default(),
            concept: m.medication_codeable_concept.as_ref(),
        })
        .chain(statements.iter().filter(|m| active(&m.status)).map(|m| {
            Med {
                resource: format!(
                    "MedicationStatement/{}",
                    short(m.id.as_deref().unwrap_or("?"))
                ),
                date: m
                    .effective_date_time
                    .as_deref()
                    .or(m.effective_period.as_ref().and_then(|p| p.start.as_deref()))
                    .or(m.date_asserted.as_deref())
                    .unwrap_or_default()
                    .to_owned(),
                concept: m.medication_codeable_concept.as_ref(),
            }
        }));
    let ms = &codes.medications;
    for m in meds {
        let Some(cc) = m.concept else {
            g.notes.push(format!(
                "{} names its medication by reference only; it was not considered.",
                m.resource
            ));
            continue;
        };
        let src = |input: &'static str| Source {
            input,
            resource: m.resource.clone(),
            date: m.date.clone(),
            recorded: describe(cc),
            used: None,
        };
        if medication_matches(cc, &ms.oral_anticoagulant) {
            g.inputs.oral_anticoagulation = true;
            g.sources.push(src("oral_anticoagulation"));
        }
        if medication_matches(cc, &ms.nsaid) || medication_matches(cc, &ms.corticosteroid) {
            g.inputs.arc_hbr.insert(ArcHbr::NsaidSteroid);
            g.sources.push(src("nsaid_steroid"));
        }
    }

    // Procedures: major surgery within the window.
    let procs: Vec<Procedure> = b
        .procedures
        .iter()
        .filter_map(|v| parse(v, "Procedure", &mut g.notes))
        .collect();
    let ps = &codes.procedures.major_surgery;
    let mut surgery = false;
    for p in &procs {
        if !matches!(p.status.as_deref(), Some("completed" | "in-progress")) {
            continue;
        }
        let date = p
            .performed_date_time
            .as_deref()
            .or(p.performed_period.as_ref().and_then(|x| x.start.as_deref()));
        let recent = date
            .and_then(fhir_date)
            .is_some_and(|d| d <= today && (today - d).whole_days() <= ps.within_days);
        if recent && p.code.as_ref().is_some_and(|c| c.has(SNOMED, &ps.snomed)) {
            surgery = true;
            g.sources.push(Source {
                input: "recent_surgery_trauma",
                resource: format!("Procedure/{}", short(p.id.as_deref().unwrap_or("?"))),
                date: date.unwrap_or_default().to_owned(),
                recorded: p.code.as_ref().map(describe).unwrap_or_default(),
                used: None,
            });
        }
    }
    if surgery || trauma {
        g.inputs.arc_hbr.insert(ArcHbr::RecentSurgeryTrauma);
    }
    if platelets.is_some_and(|p| p < score::PLATELETS_THRESHOLD) {
        g.inputs.arc_hbr.insert(ArcHbr::Thrombocytopenia);
    }
    Ok(g)
}

fn obs_date(o: &Observation) -> &str {
    o.effective_date_time
        .as_deref()
        .or(o.effective_period.as_ref().and_then(|p| p.start.as_deref()))
        .or(o.issued.as_deref())
        .unwrap_or("")
}

fn describe(cc: &CodeableConcept) -> String {
    let text = cc
        .text
        .clone()
        .or_else(|| cc.coding.iter().find_map(|c| c.display.clone()));
    let code = cc
        .coding
        .first()
        .map(|c| c.code.clone().unwrap_or_default())
        .unwrap_or_default();
    short(&match text {
        Some(t) if !code.is_empty() => format!("{t} ({code})"),
        Some(t) => t,
        None => code,
    })
}

fn status_code(cc: Option<&CodeableConcept>) -> Option<&str> {
    cc.and_then(|c| c.coding.iter().find_map(|x| x.code.as_deref()))
}

fn icd_matches(code: &str, set: &ConditionSet) -> bool {
    let code = code.trim().to_uppercase();
    set.icd10_prefixes
        .iter()
        .any(|p| code.starts_with(p.as_str()))
        || code.get(..3).is_some_and(|head| {
            set.icd10_ranges
                .iter()
                .any(|(lo, hi)| head >= lo.as_str() && head <= hi.as_str())
        })
}

fn condition_matches(c: &Condition, set: &ConditionSet, today: Date) -> bool {
    if matches!(
        status_code(c.verification_status.as_ref()),
        Some("entered-in-error" | "refuted")
    ) {
        return false;
    }
    if set.ongoing_only
        && !matches!(
            status_code(c.clinical_status.as_ref()),
            Some("active" | "recurrence" | "relapse")
        )
    {
        return false;
    }
    if let Some(days) = set.within_days {
        let when = c
            .onset_date_time
            .as_deref()
            .or(c.recorded_date.as_deref())
            .and_then(fhir_date);
        if !when.is_some_and(|d| d <= today && (today - d).whole_days() <= days) {
            return false;
        }
    }
    let Some(cc) = &c.code else { return false };
    if cc.has(SNOMED, &set.exclude_snomed) {
        return false;
    }
    cc.has(SNOMED, &set.snomed) || cc.codes_of(&[ICD10CM, ICD10]).any(|x| icd_matches(x, set))
}

fn medication_matches(cc: &CodeableConcept, set: &MedicationSet) -> bool {
    let words = cc.words();
    if set.exclude_names.iter().any(|n| words.contains(n.as_str())) {
        return false;
    }
    if cc.has(RXNORM, &set.rxnorm) {
        return true;
    }
    set.names.iter().any(|n| {
        words
            .split(|c: char| !c.is_alphanumeric())
            .any(|w| w == n.as_str())
    })
}

/// The set of input names that were found (for the page and the audit context).
pub fn found_inputs(g: &Gathered) -> BTreeSet<&'static str> {
    g.sources.iter().map(|s| s.input).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn today() -> Date {
        time::macros::date!(2026 - 11 - 23)
    }

    fn obs(id: &str, loinc: &str, value: Value, unit: &str, date: &str, status: &str) -> Value {
        json!({"resourceType":"Observation","id":id,"status":status,
            "code":{"coding":[{"system":LOINC,"code":loinc}]},
            "valueQuantity":{"value":value,"unit":unit,"system":"http://unitsofmeasure.org","code":unit},
            "effectiveDateTime":date})
    }

    #[test]
    fn the_code_sets_parse() {
        let c = codes().unwrap();
        assert!(c.observations.all().contains(&"718-7"));
        assert!(
            c.medications
                .oral_anticoagulant
                .rxnorm
                .contains(&"11289".to_owned())
        );
    }

    #[test]
    fn units_convert_or_are_refused() {
        assert_eq!(conversion("hemoglobin", "g/L"), Some(0.1));
        assert_eq!(conversion("hemoglobin", "mmol/L"), Some(1.611));
        assert_eq!(conversion("creatinine", "umol/L"), Some(1.0 / 88.4));
        assert_eq!(conversion("creatinine", "µmol/L"), Some(1.0 / 88.4));
        assert_eq!(conversion("wbc", "10*3/uL"), Some(1.0));
        assert_eq!(conversion("platelets", "/uL"), Some(0.001));
        assert_eq!(conversion("egfr", "mL/min/{1.73_m2}"), Some(1.0));
        assert_eq!(conversion("hemoglobin", "furlongs"), None);
        assert_eq!(conversion("wbc", "g/dL"), None);
    }

    #[test]
    fn newest_final_result_wins_and_units_are_converted() {
        let b = Bundle {
            patient: json!({"resourceType":"Patient","id":"p1","birthDate":"1950-12-01","gender":"male"}),
            observations: vec![
                obs("o1", "718-7", json!(11.0), "g/dL", "2026-01-01", "final"),
                obs("o2", "718-7", json!(130), "g/L", "2026-10-01", "final"),
                obs(
                    "o3",
                    "718-7",
                    json!(5.0),
                    "g/dL",
                    "2026-11-01",
                    "preliminary",
                ),
                obs("o4", "6690-2", json!(7500), "/uL", "2026-10-01", "amended"),
                obs(
                    "o5",
                    "2160-0",
                    json!(106.08),
                    "umol/L",
                    "2026-10-01",
                    "final",
                ),
            ],
            ..Bundle::default()
        };
        let g = gather(&b, today()).unwrap();
        assert_eq!(g.inputs.age, Some(75.0)); // birthday not yet reached this year
        assert_eq!(g.inputs.hemoglobin, Some(13.0));
        assert_eq!(g.inputs.wbc, Some(7.5));
        assert!((g.inputs.creatinine.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(g.inputs.egfr, None);
        let hb = g.sources.iter().find(|s| s.input == "hemoglobin").unwrap();
        assert_eq!(hb.resource, "Observation/o2");
        assert_eq!(hb.recorded, "130 g/L");
        let r = score::compute(&g.inputs);
        assert!(r.complete, "{r:?}");
    }

    #[test]
    fn bad_values_are_missing_with_a_note() {
        let b = Bundle {
            patient: json!({"resourceType":"Patient","id":"p1","birthDate":12345}),
            observations: vec![
                obs("o1", "718-7", json!(13), "furlongs", "2026-10-01", "final"),
                obs("o2", "6690-2", json!(9000), "10*9/L", "2026-10-01", "final"),
                obs(
                    "o3",
                    "33914-3",
                    json!("sixty"),
                    "mL/min/{1.73_m2}",
                    "2026-10-01",
                    "final",
                ),
                json!({"resourceType":"Observation","id":"o4","status":"final","code":{"coding":[{"system":LOINC,"code":"777-3"}]}}),
            ],
            ..Bundle::default()
        };
        let g = gather(&b, today()).unwrap();
        assert_eq!(g.inputs.age, None);
        assert_eq!(g.inputs.hemoglobin, None);
        assert_eq!(g.inputs.wbc, None);
        assert_eq!(g.inputs.egfr, None);
        let notes = g.notes.join("\n");
        assert!(notes.contains("Patient/p1 could not be read"), "{notes}");
        assert!(notes.contains("furlongs"), "{notes}");
        assert!(notes.contains("outside the possible range"), "{notes}");
        assert!(
            notes.contains("Observation/o3 could not be read"),
            "{notes}"
        );
        assert!(notes.contains("no numeric value"), "{notes}");
        let r = score::compute(&g.inputs);
        assert!(!r.complete);
    }

    #[test]
    fn conditions_medications_and_procedures() {
        let b = Bundle {
            patient: json!({"resourceType":"Patient","id":"p1","birthDate":"1960-01-01","gender":"female"}),
            conditions: vec![
                json!({"resourceType":"Condition","id":"c1","code":{"coding":[{"system":SNOMED,"code":"74474003"}]},"onsetDateTime":"2019-05-01"}),
                json!({"resourceType":"Condition","id":"c2","clinicalStatus":{"coding":[{"code":"active"}]},"code":{"coding":[{"system":ICD10CM,"code":"C18.9"}]}}),
                json!({"resourceType":"Condition","id":"c3","clinicalStatus":{"coding":[{"code":"active"}]},"code":{"coding":[{"system":ICD10CM,"code":"C44.91"}]}}),
                json!({"resourceType":"Condition","id":"c4","clinicalStatus":{"coding":[{"code":"active"}]},"code":{"coding":[{"system":SNOMED,"code":"19943007"}]}}),
            ],
            medications: vec![
                json!({"resourceType":"MedicationRequest","id":"m1","status":"active","medicationCodeableConcept":{"coding":[{"system":RXNORM,"code":"1364430","display":"apixaban"}]}}),
                json!({"resourceType":"MedicationRequest","id":"m2","status":"active","medicationCodeableConcept":{"text":"Aspirin 81 mg"}}),
                json!({"resourceType":"MedicationRequest","id":"m3","status":"stopped","medicationCodeableConcept":{"text":"ibuprofen 400 mg"}}),
            ],
            procedures: vec![
                json!({"resourceType":"Procedure","id":"s1","status":"completed","code":{"coding":[{"system":SNOMED,"code":"232717009"}]},"performedDateTime":"2026-09-01"}),
            ],
            ..Bundle::default()
        };
        let g = gather(&b, today()).unwrap();
        assert!(g.inputs.prior_bleeding);
        assert!(g.inputs.oral_anticoagulation);
        assert!(g.inputs.arc_hbr.contains(&ArcHbr::ActiveCancer));
        // Aspirin is not an NSAID here; a stopped ibuprofen does not count.
        assert!(!g.inputs.arc_hbr.contains(&ArcHbr::NsaidSteroid));
        // Cirrhosis alone is not the element.
        assert!(
            !g.inputs
                .arc_hbr
                .contains(&ArcHbr::CirrhosisPortalHypertension)
        );
        // Surgery 83 days ago is outside the 30-day window.
        assert!(!g.inputs.arc_hbr.contains(&ArcHbr::RecentSurgeryTrauma));
        let mut b2 = b;
        b2.procedures = vec![
            json!({"resourceType":"Procedure","id":"s2","status":"completed","code":{"coding":[{"system":SNOMED,"code":"232717009"}]},"performedDateTime":"2026-11-10"}),
        ];
        b2.medications = vec![
            json!({"resourceType":"MedicationRequest","id":"m4","status":"active","medicationCodeableConcept":{"text":"Prednisone 10 mg tablet"}}),
        ];
        let g = gather(&b2, today()).unwrap();
        assert!(g.inputs.arc_hbr.contains(&ArcHbr::RecentSurgeryTrauma));
        assert!(g.inputs.arc_hbr.contains(&ArcHbr::NsaidSteroid));
        assert!(!g.inputs.oral_anticoagulation);
    }

    #[test]
    fn withheld_data_is_said() {
        let b = Bundle {
            patient: json!({"resourceType":"Patient","id":"p1","birthDate":"1960-01-01","gender":"female"}),
            withheld: vec!["Observation"],
            ..Bundle::default()
        };
        let g = gather(&b, today()).unwrap();
        assert!(
            g.notes
                .iter()
                .any(|n| n.contains("Observation data is withheld at the patient's request")),
            "{:?}",
            g.notes
        );
    }

    #[test]
    fn medication_statements_count_when_active() {
        let base = || Bundle {
            patient: json!({"resourceType":"Patient","id":"p1","birthDate":"1960-01-01","gender":"female"}),
            ..Bundle::default()
        };
        let mut b = base();
        b.statements = Some(Ok(vec![
            json!({"resourceType":"MedicationStatement","id":"st1","status":"active","medicationCodeableConcept":{"text":"Warfarin 5 mg tablet"},"effectivePeriod":{"start":"2026-06-01"}}),
            json!({"resourceType":"MedicationStatement","id":"st2","status":"completed","medicationCodeableConcept":{"text":"naproxen 500 mg"}}),
            json!({"resourceType":"MedicationStatement","id":"st3","status":"active","medicationReference":{"reference":"Medication/x"}}),
        ]));
        assert_eq!(b.resource_count(), 4, "the patient and three statements");
        let g = gather(&b, today()).unwrap();
        assert!(g.inputs.oral_anticoagulation);
        // A completed course of an NSAID does not count.
        assert!(!g.inputs.arc_hbr.contains(&ArcHbr::NsaidSteroid));
        let src = g
            .sources
            .iter()
            .find(|s| s.input == "oral_anticoagulation")
            .unwrap();
        assert_eq!(src.resource, "MedicationStatement/st1");
        assert_eq!(src.date, "2026-06-01");
        assert!(
            g.notes
                .iter()
                .any(|n| n.contains("MedicationStatement/st3"))
        );
        // Not read: the reason is one of the notes, and nothing counts.
        let mut b = base();
        b.statements = Some(Err("MedicationStatement was not read.".into()));
        let g = gather(&b, today()).unwrap();
        assert!(!g.inputs.oral_anticoagulation);
        assert!(
            g.notes
                .iter()
                .any(|n| n == "MedicationStatement was not read.")
        );
    }
}
