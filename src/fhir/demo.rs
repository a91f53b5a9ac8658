//! Coded synthetic data for `custodian demo seed`: for every synthetic patient, labs
//! (LOINC, UCUM units, dates over the last two years), conditions (ICD-10-CM) and
//! medications (RxNorm), written through the same checked path as the API, one
//! transaction per patient. Every fifth patient has no labs and every seventh no
//! conditions or medications, so that the PRECISE-HBR app meets missing inputs too.
//! Never real data.

use serde_json::{Value, json};

use super::resources::ResourceType;
use super::service::{Entry, Fhir, FhirError};
use crate::records::demo::Rng;

/// (LOINC, UCUM unit, low, high) of the labs PRECISE-HBR reads.
const LABS: [(&str, &str, f64, f64); 5] = [
    ("718-7", "g/dL", 9.0, 17.0),
    ("33914-3", "mL/min/{1.73_m2}", 20.0, 120.0),
    ("2160-0", "mg/dL", 0.5, 3.0),
    ("6690-2", "10*3/uL", 3.0, 12.0),
    ("777-3", "10*3/uL", 90.0, 400.0),
];
const CONDITIONS: [(&str, &str); 6] = [
    ("I10", "Essential (primary) hypertension"),
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("I48.91", "Unspecified atrial fibrillation"),
    ("N18.30", "Chronic kidney disease, stage 3 unspecified"),
    ("D50.9", "Iron deficiency anemia, unspecified"),
    ("K92.2", "Gastrointestinal hemorrhage, unspecified"),
];
const MEDICATIONS: [(&str, &str); 5] = [
    ("29046", "lisinopril"),
    ("6809", "metformin"),
    ("1364430", "apixaban"),
    ("11289", "warfarin"),
    ("1191", "aspirin"),
];

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> Option<T> {
    xs.get(rng.below(xs.len() as u64) as usize).copied()
}

fn day(today: time::Date, back: i64) -> String {
    let d = today - time::Duration::days(back);
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The coded resources of the `n`-th synthetic patient `pid`.
fn coded(rng: &mut Rng, n: usize, pid: &str, today: time::Date) -> Vec<Entry> {
    let subject = json!({"reference": format!("Patient/{pid}")});
    let mut out: Vec<(ResourceType, Value)> = Vec::new();
    if n % 5 != 4 {
        for (code, unit, lo, hi) in LABS {
            for _ in 0..(2 + rng.below(2)) {
                let x = lo + (hi - lo) * (rng.below(1000) as f64 / 1000.0);
                out.push((ResourceType::Observation, json!({
                    "status": "final",
                    "category": [{"coding": [{"system": super::types::OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
                    "code": {"coding": [{"system": super::types::LOINC, "code": code}]},
                    "subject": subject,
                    "effectiveDateTime": day(today, 1 + rng.below(730) as i64),
                    "valueQuantity": {"value": (x * 10.0).round() / 10.0, "unit": unit, "system": super::types::UCUM, "code": unit},
                })));
            }
        }
    }
    if n % 7 != 6 {
        for _ in 0..(1 + rng.below(2)) {
            let Some((code, display)) = pick(rng, &CONDITIONS) else {
                continue;
            };
            out.push((ResourceType::Condition, json!({
                "clinicalStatus": {"coding": [{"system": super::types::CONDITION_CLINICAL, "code": "active"}]},
                "category": [{"coding": [{"system": super::types::CONDITION_CATEGORY, "code": "problem-list-item"}]}],
                "code": {"coding": [{"system": super::types::ICD10CM, "code": code, "display": display}]},
                "subject": subject,
                "onsetDateTime": day(today, 30 + rng.below(3000) as i64),
            })));
        }
        for _ in 0..(1 + rng.below(2)) {
            let Some((code, name)) = pick(rng, &MEDICATIONS) else {
                continue;
            };
            out.push((ResourceType::MedicationRequest, json!({
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {"coding": [{"system": super::types::RXNORM, "code": code, "display": name}]},
                "subject": subject,
                "authoredOn": day(today, 1 + rng.below(365) as i64),
            })));
        }
    }
    out.into_iter()
        .map(|(t, body)| Entry {
            t,
            id: None,
            full_url: None,
            if_match: None,
            body,
        })
        .collect()
}

/// Seeds `count` synthetic patients with their records, and (`clinical`) their coded
/// data. Returns (patients, records, coded resources).
pub async fn seed(fhir: &Fhir, count: u32, clinical: bool) -> Result<(u32, u32, u32), FhirError> {
    let (ids, records) = crate::records::demo::seed(fhir.patients(), count).await?;
    if !clinical {
        return Ok((u32::try_from(ids.len()).unwrap_or(u32::MAX), records, 0));
    }
    let mut rng = Rng::new();
    let today = fhir.today();
    let mut made = 0u32;
    for (n, pid) in ids.iter().enumerate() {
        let entries = coded(&mut rng, n, pid, today);
        made += u32::try_from(entries.len()).unwrap_or(0);
        if !entries.is_empty() {
            fhir.write(entries, true).await?;
        }
    }
    Ok((u32::try_from(ids.len()).unwrap_or(u32::MAX), records, made))
}
