//! `custodian fhir import FILE`: a Bundle (transaction or collection) or NDJSON, every
//! resource validated by the same rules as the API, all written in one transaction or
//! none, idempotent on resource ids (content equal to what is stored makes no new
//! version). Errors name the element (`Bundle.entry[3].resource.status`, or
//! `line 4: Observation.status` for NDJSON), never its value.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::resources::ResourceType;
use super::service::{Entry, Fhir, FhirError, MAX_ENTRIES};
use crate::audit::model::SafeId;

pub enum ImportError {
    /// Resources that do not validate: one line per element.
    Invalid(Vec<String>),
    /// Anything else (a conflict, the database).
    Failed(String),
}

pub struct Summary {
    pub written: usize,
    pub patient_ids: Vec<SafeId>,
    /// `{"created": {type: n}, "updated": …, "unchanged": …}`.
    pub report: Value,
}

fn lines_of(e: &crate::http::ApiError) -> Vec<String> {
    e.field_errors()
        .iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect()
}

/// The entries of the file, and for NDJSON the line of each.
fn parse(text: &str) -> Result<(Vec<Entry>, Option<Vec<usize>>), ImportError> {
    let whole = text
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<Value>(text).ok())
        .flatten()
        .filter(|v| v.get("resourceType").and_then(Value::as_str) == Some("Bundle"));
    if let Some(bundle) = whole {
        let n = bundle
            .get("entry")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if n > MAX_ENTRIES {
            return Err(ImportError::Failed(format!(
                "the Bundle has {n} entries; at most {MAX_ENTRIES} in one import: split it"
            )));
        }
        return super::routes::bundle_entries(bundle, false)
            .map(|e| (e, None))
            .map_err(|e| {
                let l = lines_of(&e);
                if l.is_empty() {
                    ImportError::Failed("the file is not a Bundle this server can import".into())
                } else {
                    ImportError::Invalid(l)
                }
            });
    }
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if entries.len() + errors.len() >= MAX_ENTRIES {
            return Err(ImportError::Failed(format!(
                "more than {MAX_ENTRIES} resources in one import: split the file"
            )));
        }
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) else {
            errors.push(format!(
                "line {n}: not a JSON object (NDJSON holds one resource per line)"
            ));
            continue;
        };
        let Some(t) = m
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(ResourceType::parse)
        else {
            errors.push(format!(
                "line {n}: resourceType: must be Patient, Condition, Observation, MedicationRequest or Procedure"
            ));
            continue;
        };
        match super::routes::split_resource(t, m, &format!("{}.", t.as_str())) {
            Ok((Some(id), body)) => {
                entries.push(Entry {
                    t,
                    id: Some(id),
                    full_url: None,
                    if_match: None,
                    body,
                });
                lines.push(n);
            }
            Ok((None, _)) => errors.push(format!(
                "line {n}: {}.id: is required (an NDJSON import updates each resource by its id)",
                t.as_str()
            )),
            Err(e) => errors.extend(lines_of(&e).into_iter().map(|l| format!("line {n}: {l}"))),
        }
    }
    if !errors.is_empty() {
        return Err(ImportError::Invalid(errors));
    }
    Ok((entries, Some(lines)))
}

/// Where an error of entry `i` points, in the file's own terms.
fn locate(field: &str, entries: &[Entry], lines: Option<&[usize]>) -> String {
    let Some(lines) = lines else {
        return field.to_owned();
    };
    if let Some(rest) = field.strip_prefix("Bundle.entry[")
        && let Some((i, tail)) = rest.split_once("].resource")
        && let Ok(i) = i.parse::<usize>()
        && let (Some(n), Some(e)) = (lines.get(i), entries.get(i))
    {
        return format!("line {n}: {}{tail}", e.t.as_str());
    }
    match lines.first() {
        Some(n) if lines.len() == 1 => format!("line {n}: {field}"),
        _ => field.to_owned(),
    }
}

pub async fn import(fhir: &Fhir, text: &str) -> Result<Summary, ImportError> {
    let (entries, lines) = parse(text)?;
    let kinds: Vec<ResourceType> = entries.iter().map(|e| e.t).collect();
    let located: Vec<(ResourceType, Option<usize>)> = kinds
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, lines.as_ref().and_then(|l| l.get(i).copied())))
        .collect();
    let shadow: Vec<Entry> = located
        .iter()
        .map(|(t, _)| Entry {
            t: *t,
            id: None,
            full_url: None,
            if_match: None,
            body: Value::Null,
        })
        .collect();
    let out = fhir.write(entries, true).await.map_err(|e| match e {
        FhirError::Invalid(errors) => ImportError::Invalid(
            errors
                .iter()
                .map(|f| {
                    format!(
                        "{}: {}",
                        locate(&f.field, &shadow, lines.as_deref()),
                        f.message
                    )
                })
                .collect(),
        ),
        FhirError::Conflict(m) | FhirError::BadRequest(m) => ImportError::Failed(m),
        FhirError::PreconditionFailed => {
            ImportError::Failed("a resource changed while it was imported".into())
        }
        FhirError::NotFound | FhirError::Gone => {
            ImportError::Failed("a resource named is not here".into())
        }
        FhirError::Phi(e) => ImportError::Failed(e.to_string()),
    })?;
    let mut report: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut patients = BTreeSet::new();
    for o in &out {
        let kind = if o.created {
            "created"
        } else if o.changed {
            "updated"
        } else {
            "unchanged"
        };
        *report
            .entry(kind)
            .or_default()
            .entry(o.t.as_str())
            .or_default() += 1;
        if o.changed {
            patients.insert(o.patient_id.clone());
        }
    }
    for k in ["created", "updated", "unchanged"] {
        report.entry(k).or_default();
    }
    Ok(Summary {
        written: out.iter().filter(|o| o.changed).count(),
        patient_ids: patients.iter().filter_map(|p| SafeId::new(p)).collect(),
        report: json!(report),
    })
}
