//! The FHIR rules: reading, versioning, writing (one resource or a whole transaction,
//! all or nothing), searching a patient's compartment, `$everything`. No HTTP here.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::dates::DateRange;
use super::patient;
use super::resources::{Clinical, ResourceType, Token};
use super::search::{Query, Sort};
use super::store::{self, PatientWrite, ResourceRow, Write};
use super::types::{self, Findings};
use crate::clock::{SharedClock, timestamp};
use crate::crypto::{self, SharedKeyring};
use crate::http::FieldError;
use crate::phi::envelope::{self, DataKey};
use crate::records::model::{NewPatient, PatientPatch};
use crate::records::service::{Patient, PhiError, PreparedPatient, Record};
use crate::records::{Patients, store as patients_store};
use crate::store::{Db, StoreError};

/// The prefix of the ids of `/api/v1` records served as Conditions.
pub const RECORD_PREFIX: &str = "record-";
const CURSOR: &str = "custodian/fhir/cursor/v1";
const PAGE: &str = "custodian/fhir/page/v1";
/// Most entries in one transaction or import.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("not found")]
    NotFound,
    #[error("deleted")]
    Gone,
    #[error("invalid resource")]
    Invalid(Vec<FieldError>),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("the resource changed since it was read")]
    PreconditionFailed,
    #[error(transparent)]
    Phi(#[from] PhiError),
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> Self {
        Self::Phi(PhiError::Store(e))
    }
}

impl From<envelope::EnvelopeError> for FhirError {
    fn from(e: envelope::EnvelopeError) -> Self {
        Self::Phi(PhiError::Envelope(e))
    }
}

fn invalid(f: Findings) -> FhirError {
    FhirError::Invalid(
        f.0.into_iter()
            .map(|(at, m)| FieldError::new(at, m))
            .collect(),
    )
}

/// The FHIRPath-style expression of a serde error in a resource of type `t`.
pub fn expression(t: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let mut at = if path == "." || path.is_empty() {
        t.to_owned()
    } else {
        format!("{t}.{path}")
    };
    // An unknown element: name it (serde names it in the message, the path is its parent).
    let msg = e.inner().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((name, _)) = rest.split_once('`')
        && !at.ends_with(&format!(".{name}"))
    {
        at = format!("{at}.{name}");
    }
    // The path holds the client's own keys: bounded, as /api/v1 bounds its field paths.
    at.chars().take(128).collect()
}

/// The message of a serde error, without the value it quotes.
pub fn serde_message(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let msg = e.inner().to_string();
    if msg.starts_with("unknown field") {
        "is not an element Custodian stores for this resource".into()
    } else if msg.starts_with("invalid type") {
        let expected = msg
            .split("expected ")
            .nth(1)
            .and_then(|x| x.split(" at line").next())
            .unwrap_or("another type");
        format!("has the wrong type: expected {expected}")
    } else if msg.starts_with("missing field") {
        "is required".into()
    } else {
        "is not valid here".into()
    }
}

/// A resource as read: its type, id, version, time and content.
#[derive(Debug)]
pub struct Resource {
    pub t: ResourceType,
    pub id: String,
    pub patient_id: String,
    pub version: i64,
    pub last_updated: String,
    pub body: Body,
}

/// A search's answer.
pub struct Found {
    /// How many match (what the caller may see).
    pub total: usize,
    pub page: Vec<Resource>,
    /// The cursor of the next page.
    pub next: Option<String>,
    /// How many resources of the compartment a restriction withheld.
    pub withheld: usize,
}

impl Resource {
    /// Its sensitivity labels (`privacy::SENSITIVE` codes): a clinical resource's in
    /// `meta.security`, a record's own. A Patient has none.
    pub fn labels(&self) -> Vec<String> {
        match &self.body {
            Body::Patient(_) => Vec::new(),
            Body::Record(r) => r.labels.clone(),
            Body::Clinical(c) => c
                .meta()
                .map(|m| {
                    m.security
                        .iter()
                        .filter(|c| c.system.as_deref() == Some(crate::privacy::ACT_CODE))
                        // Any case counts (fail closed): `psy` is withheld as `PSY`.
                        .filter_map(|c| c.code.as_deref().map(str::to_ascii_uppercase))
                        .filter(|c| crate::privacy::is_label(c))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Body {
    Patient(Patient),
    Clinical(Clinical),
    Record(Record),
}

/// How a caller sees a resource.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub sees_ssn: bool,
    pub anonymize: bool,
    pub today: time::Date,
    pub fhir: &'a Fhir,
}

/// One entry of a transaction or an import.
pub struct Entry {
    pub t: ResourceType,
    /// `Some` for an update (PUT, or an import of a resource with its id).
    pub id: Option<String>,
    pub full_url: Option<String>,
    pub if_match: Option<i64>,
    pub body: Value,
}

/// What a write did to one entry.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub t: ResourceType,
    pub id: String,
    pub patient_id: String,
    pub version: i64,
    pub last_updated: String,
    /// 201 (created), 200 (updated) or 200 with no new version (unchanged).
    pub created: bool,
    pub changed: bool,
}

#[derive(Clone)]
pub struct Fhir {
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    patients: Patients,
    mrn_system: String,
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn aad_of(t: ResourceType, id: &str, version: i64) -> (String, String) {
    (t.as_str().to_owned(), format!("{id}/_history/{version}"))
}

impl Fhir {
    pub fn new(
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
        patients: Patients,
        mrn_system: String,
    ) -> Self {
        Self {
            db,
            keys,
            clock,
            patients,
            mrn_system,
        }
    }

    pub fn mrn_system(&self) -> &str {
        &self.mrn_system
    }

    pub fn patients(&self) -> &Patients {
        &self.patients
    }

    fn now(&self) -> String {
        timestamp(self.clock.now())
    }

    pub fn today(&self) -> time::Date {
        self.clock.now().date()
    }

    fn seal(
        &self,
        key: &DataKey,
        t: ResourceType,
        id: &str,
        version: i64,
        c: &Clinical,
    ) -> Result<String, FhirError> {
        let json = zeroize::Zeroizing::new(c.to_value().to_string());
        let (column, row) = aad_of(t, id, version);
        Ok(envelope::seal_field(key, "fhir", &column, &row, &json)?)
    }

    fn open(
        &self,
        key: &DataKey,
        t: ResourceType,
        id: &str,
        version: i64,
        sealed: &str,
    ) -> Result<Clinical, FhirError> {
        let (column, row) = aad_of(t, id, version);
        let json = envelope::open_field(key, "fhir", &column, &row, sealed)?;
        let v: Value = serde_json::from_str(&json).map_err(|_| {
            FhirError::from(envelope::EnvelopeError::from(
                crypto::CryptoError::Malformed,
            ))
        })?;
        Clinical::from_value(t, v)
            .map_err(|_| envelope::EnvelopeError::from(crypto::CryptoError::Malformed).into())
    }

    fn open_row(
        &self,
        key: &DataKey,
        t: ResourceType,
        r: &ResourceRow,
    ) -> Result<Resource, FhirError> {
        let c = self.open(key, t, &r.id, r.version, &r.body)?;
        Ok(Resource {
            t,
            id: r.id.clone(),
            patient_id: r.patient_id.clone(),
            version: r.version,
            last_updated: r.updated_at.clone(),
            body: Body::Clinical(c),
        })
    }

    fn record_resource(r: Record) -> Resource {
        Resource {
            t: ResourceType::Condition,
            id: format!("{RECORD_PREFIX}{}", r.id),
            patient_id: r.patient_id.clone(),
            version: r.version,
            last_updated: r.updated_at.clone(),
            body: Body::Record(r),
        }
    }

    /// The patient a resource belongs to, without opening it (to name it in the audit
    /// trail before the read); `None` when there is no such resource.
    pub async fn patient_of(&self, t: ResourceType, id: &str) -> Result<Option<String>, FhirError> {
        match t {
            ResourceType::Patient => Ok(Some(id.to_owned())),
            ResourceType::Condition if id.starts_with(RECORD_PREFIX) => {
                match self
                    .patients
                    .record_patient(&id[RECORD_PREFIX.len()..])
                    .await
                {
                    Ok(p) => Ok(Some(p)),
                    Err(PhiError::NotFound) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(store::by_id(&self.db, t.as_str(), id)
                .await?
                .map(|r| r.patient_id)),
        }
    }

    pub async fn read(&self, t: ResourceType, id: &str) -> Result<Resource, FhirError> {
        if !valid_id(id) {
            return Err(FhirError::NotFound);
        }
        match t {
            ResourceType::Patient => match self.patients.get(id).await {
                Ok(p) => Ok(Resource {
                    t,
                    id: p.id.clone(),
                    patient_id: p.id.clone(),
                    version: p.version,
                    last_updated: p.updated_at.clone(),
                    body: Body::Patient(p),
                }),
                Err(PhiError::NotFound) => {
                    match patients_store::patient_exists(&self.db, id).await? {
                        Some(true) => Err(FhirError::Gone),
                        _ => Err(FhirError::NotFound),
                    }
                }
                Err(e) => Err(e.into()),
            },
            ResourceType::Condition if id.starts_with(RECORD_PREFIX) => {
                let r = self
                    .patients
                    .record(&id[RECORD_PREFIX.len()..])
                    .await
                    .map_err(|e| match e {
                        PhiError::NotFound => FhirError::NotFound,
                        e => e.into(),
                    })?;
                Ok(Self::record_resource(r))
            }
            _ => {
                let row = store::by_id(&self.db, t.as_str(), id)
                    .await?
                    .ok_or(FhirError::NotFound)?;
                if row.deleted_at.is_some() {
                    return Err(FhirError::Gone);
                }
                let key = self.patients.patient_key(&row.patient_id).await?;
                self.open_row(&key, t, &row)
            }
        }
    }

    /// One version. Versions of patients are kept from the FHIR release on, and of
    /// `/api/v1` records only the current one.
    pub async fn vread(
        &self,
        t: ResourceType,
        id: &str,
        version: i64,
    ) -> Result<Resource, FhirError> {
        if !valid_id(id) {
            return Err(FhirError::NotFound);
        }
        match t {
            ResourceType::Patient => {
                if let Ok(p) = self.patients.get(id).await
                    && p.version == version
                {
                    return self.read(t, id).await;
                }
                let (fields, at) = self
                    .patients
                    .version(id, version)
                    .await?
                    .ok_or(FhirError::NotFound)?;
                let fields = fields.ok_or(FhirError::Gone)?;
                Ok(Resource {
                    t,
                    id: id.to_owned(),
                    patient_id: id.to_owned(),
                    version,
                    last_updated: at.clone(),
                    body: Body::Patient(Patient {
                        id: id.to_owned(),
                        fields,
                        version,
                        created_at: String::new(),
                        updated_at: at,
                    }),
                })
            }
            ResourceType::Condition if id.starts_with(RECORD_PREFIX) => {
                let r = self.read(t, id).await?;
                if r.version == version {
                    Ok(r)
                } else {
                    Err(FhirError::NotFound)
                }
            }
            _ => {
                let (patient_id, body, at) = store::version(&self.db, t.as_str(), id, version)
                    .await?
                    .ok_or(FhirError::NotFound)?;
                let body = body.ok_or(FhirError::Gone)?;
                let key = self.patients.patient_key(&patient_id).await?;
                let c = self.open(&key, t, id, version, &body)?;
                Ok(Resource {
                    t,
                    id: id.to_owned(),
                    patient_id,
                    version,
                    last_updated: at,
                    body: Body::Clinical(c),
                })
            }
        }
    }

    // ---- rendering -----------------------------------------------------------------

    /// A stable pseudonym of an id, for the de-identified view.
    pub fn pseudonym(&self, id: &str) -> String {
        self.patients.pseudonym(id)
    }

    /// The resource as JSON text for this view; an identified Patient (the hot read) is
    /// serialised straight from its fields.
    pub fn render_text(&self, r: &Resource, view: View<'_>) -> String {
        match &r.body {
            Body::Patient(p) if !view.anonymize => {
                let at = fhir_instant(&r.last_updated);
                serde_json::to_string(&patient::patient_out(
                    p,
                    &self.mrn_system,
                    view.sees_ssn,
                    Some((r.version, &at)),
                ))
                .unwrap_or_default()
            }
            _ => self.render(r, view).to_string(),
        }
    }

    /// The resource as JSON for this view.
    pub fn render(&self, r: &Resource, view: View<'_>) -> Value {
        let mut out = match &r.body {
            Body::Patient(p) if view.anonymize => {
                patient::deidentified(p, &self.pseudonym(&p.id), view.today)
            }
            Body::Patient(p) => patient::to_fhir(p, &self.mrn_system, view.sees_ssn),
            Body::Clinical(c) => {
                let mut v = if view.anonymize {
                    let mut c = c.clone();
                    c.deidentify();
                    c.to_value()
                } else {
                    c.to_value()
                };
                v["resourceType"] = json!(r.t.as_str());
                v["id"] = json!(r.id);
                v
            }
            Body::Record(rec) => record_condition(rec, view.anonymize),
        };
        if view.anonymize {
            out["id"] = json!(self.pseudonym(&r.id));
            if r.t != ResourceType::Patient {
                out["subject"] =
                    json!({"reference": format!("Patient/{}", self.pseudonym(&r.patient_id))});
            }
        }
        let meta = out
            .as_object_mut()
            .map(|o| o.entry("meta").or_insert_with(|| json!({})));
        if let Some(Value::Object(m)) = meta {
            m.insert("versionId".into(), json!(r.version.to_string()));
            if view.anonymize {
                m.remove("lastUpdated");
                m.insert(
                    "security".into(),
                    json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED", "display": "pseudonymized"}]),
                );
            } else {
                m.insert("lastUpdated".into(), json!(fhir_instant(&r.last_updated)));
            }
            // A labelled resource says so: its sensitivity codes (a record's are not in
            // its body) and the confidentiality code R (restricted).
            let labels = r.labels();
            if !labels.is_empty() {
                let sec = m.entry("security").or_insert_with(|| json!([]));
                if let Value::Array(list) = sec {
                    for l in &labels {
                        let has = list.iter().any(|c| {
                            c["system"] == crate::privacy::ACT_CODE && c["code"] == l.as_str()
                        });
                        if !has {
                            list.push(json!({"system": crate::privacy::ACT_CODE, "code": l}));
                        }
                    }
                    if !list
                        .iter()
                        .any(|c| c["system"] == crate::privacy::CONFIDENTIALITY)
                    {
                        list.push(json!({"system": crate::privacy::CONFIDENTIALITY, "code": "R", "display": "restricted"}));
                    }
                }
            }
        }
        out
    }

    // ---- writing -------------------------------------------------------------------

    /// Applies the entries all together or not at all.
    pub async fn write(
        &self,
        entries: Vec<Entry>,
        sees_ssn: bool,
    ) -> Result<Vec<Outcome>, FhirError> {
        if entries.len() > MAX_ENTRIES {
            return Err(FhirError::BadRequest(format!(
                "at most {MAX_ENTRIES} entries in one transaction or import"
            )));
        }
        let now = self.now();
        let mut findings = Findings::default();
        let many = entries.len() > 1;
        let at = |i: usize, t: ResourceType| {
            if many {
                format!("Bundle.entry[{i}].resource")
            } else {
                t.as_str().to_owned()
            }
        };
        // Ids first, so that references between entries (`urn:uuid:…`) resolve.
        let mut ids: Vec<String> = Vec::with_capacity(entries.len());
        let mut names: HashMap<String, String> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (i, e) in entries.iter().enumerate() {
            let id = match &e.id {
                Some(id) if valid_id(id) => id.clone(),
                Some(_) => {
                    findings.add(
                        format!("{}.id", at(i, e.t)),
                        "must be 1 to 64 of A-Z a-z 0-9 - .",
                    );
                    String::new()
                }
                None => uuid::Uuid::new_v4().to_string(),
            };
            if e.t == ResourceType::Condition && id.starts_with(RECORD_PREFIX) {
                findings.add(
                    format!("{}.id", at(i, e.t)),
                    "is a /api/v1 record's Condition: change it through /api/v1/records",
                );
            }
            if !id.is_empty() && !seen.insert((e.t, id.clone())) {
                findings.add(format!("{}.id", at(i, e.t)), "appears twice in the bundle");
            }
            if let Some(u) = &e.full_url {
                names.insert(u.clone(), format!("{}/{id}", e.t.as_str()));
            }
            ids.push(id);
        }
        if !findings.is_empty() {
            return Err(invalid(findings));
        }
        // Patients.
        let mut prepared: HashMap<String, PreparedPatient> = HashMap::new();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; entries.len()];
        let mut patient_writes = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.t != ResourceType::Patient {
                continue;
            }
            let id = &ids[i];
            let input = match patient::from_fhir(e.body.clone(), &self.mrn_system) {
                Ok(p) => p,
                Err(f) => {
                    for (x, m) in f.0 {
                        findings.add(x.replacen("Patient", &at(i, e.t), 1), m);
                    }
                    continue;
                }
            };
            let exists = patients_store::patient_exists(&self.db, id).await?;
            let result = match exists {
                Some(true) => Err(PhiError::Conflict(
                    "the patient was deleted; its id is not reused",
                )),
                Some(false) => {
                    let current = self.patients.get(id).await?;
                    let unchanged = same_patient(&current, &input, sees_ssn);
                    if unchanged && e.if_match.is_none_or(|v| v == current.version) {
                        outcomes[i] = Some(Outcome {
                            t: e.t,
                            id: id.clone(),
                            patient_id: id.clone(),
                            version: current.version,
                            last_updated: current.updated_at.clone(),
                            created: false,
                            changed: false,
                        });
                        continue;
                    }
                    self.patients
                        .prepare_update(id, full_patch(input, sees_ssn), e.if_match)
                        .await
                }
                None if e.if_match.is_some() => Err(PhiError::PreconditionFailed),
                None => self.patients.prepare_create(Some(id), input),
            };
            match result {
                Ok(p) => {
                    outcomes[i] = Some(Outcome {
                        t: e.t,
                        id: id.clone(),
                        patient_id: id.clone(),
                        version: p.row.version,
                        last_updated: p.row.updated_at.clone(),
                        created: p.expected.is_none(),
                        changed: true,
                    });
                    prepared.insert(id.clone(), p);
                }
                Err(PhiError::Invalid(errors)) => {
                    for fe in errors {
                        findings.add(
                            patient::element_of(&fe.field).replacen("Patient", &at(i, e.t), 1),
                            fe.message,
                        );
                    }
                }
                Err(PhiError::PreconditionFailed) => return Err(FhirError::PreconditionFailed),
                Err(PhiError::Conflict(m)) => return Err(FhirError::Conflict(m.into())),
                Err(e) => return Err(e.into()),
            }
        }
        // Clinical resources.
        let mut keys: HashMap<String, DataKey> = HashMap::new();
        let mut writes = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.t == ResourceType::Patient {
                continue;
            }
            let here = at(i, e.t);
            let mut c = match Clinical::from_value(e.t, e.body.clone()) {
                Ok(c) => c,
                Err(err) => {
                    findings.add(expression(&here, &err), serde_message(&err));
                    continue;
                }
            };
            let mut own = Findings::default();
            c.check(&mut own);
            for (x, m) in own.0 {
                findings.add(x.replacen(e.t.as_str(), &here, 1), m);
            }
            // The subject: an entry of this bundle, or a live patient.
            let reference = c.subject().reference.clone().unwrap_or_default();
            let resolved = names.get(&reference).cloned().unwrap_or(reference);
            let Some(pid) = resolved
                .strip_prefix("Patient/")
                .filter(|p| valid_id(p))
                .map(str::to_owned)
            else {
                findings.add(
                    format!("{here}.subject.reference"),
                    "must be Patient/<id> (or the fullUrl of a Patient entry)",
                );
                continue;
            };
            c.subject_mut().reference = Some(format!("Patient/{pid}"));
            if let Some(m) = c.meta_mut() {
                m.version_id = None;
                m.last_updated = None;
            }
            if !prepared.contains_key(&pid) && !keys.contains_key(&pid) {
                match self.patients.patient_key(&pid).await {
                    Ok(k) => {
                        keys.insert(pid.clone(), k);
                    }
                    Err(PhiError::NotFound) => {
                        findings.add(format!("{here}.subject.reference"), "names no patient here");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let id = ids[i].clone();
            let existing = store::by_id(&self.db, e.t.as_str(), &id).await?;
            let (version, expected, created_at, created) = match &existing {
                Some(row) => {
                    if row.patient_id != pid {
                        findings.add(
                            format!("{here}.subject"),
                            "cannot move a resource to another patient",
                        );
                        continue;
                    }
                    if e.if_match.is_some_and(|v| v != row.version) {
                        return Err(FhirError::PreconditionFailed);
                    }
                    (
                        row.version + 1,
                        Some(row.version),
                        row.created_at.clone(),
                        row.deleted_at.is_some(),
                    )
                }
                None if e.if_match.is_some() => return Err(FhirError::PreconditionFailed),
                None => (1, None, now.clone(), true),
            };
            let key = match prepared.get(&pid) {
                Some(p) => self.patients.prepared_key(p),
                None => match keys.get(&pid) {
                    Some(k) => k,
                    None => continue,
                },
            };
            if let Some(row) = &existing
                && row.deleted_at.is_none()
                && self
                    .open(key, e.t, &row.id, row.version, &row.body)
                    .ok()
                    .as_ref()
                    == Some(&c)
            {
                outcomes[i] = Some(Outcome {
                    t: e.t,
                    id,
                    patient_id: pid,
                    version: row.version,
                    last_updated: row.updated_at.clone(),
                    created: false,
                    changed: false,
                });
                continue;
            }
            let body = self.seal(key, e.t, &id, version, &c)?;
            outcomes[i] = Some(Outcome {
                t: e.t,
                id: id.clone(),
                patient_id: pid.clone(),
                version,
                last_updated: now.clone(),
                created,
                changed: true,
            });
            writes.push(Write {
                row: ResourceRow {
                    resource_type: e.t.as_str().to_owned(),
                    id,
                    patient_id: pid,
                    version,
                    body,
                    created_at,
                    updated_at: now.clone(),
                    deleted_at: None,
                },
                expected,
            });
        }
        if !findings.is_empty() {
            return Err(invalid(findings));
        }
        for p in prepared.into_values() {
            patient_writes.push(PatientWrite {
                row: p.row,
                expected: p.expected,
                fields: Some(p.sealed_fields),
            });
        }
        if !store::apply(&self.db, &writes, &patient_writes).await? {
            return Err(FhirError::Conflict(
                "a resource changed while this was written, or an id or MRN is taken: nothing was written; try again".into(),
            ));
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Deletes (softly) one resource; its versions stay.
    pub async fn delete(&self, t: ResourceType, id: &str) -> Result<String, FhirError> {
        if !valid_id(id) {
            return Err(FhirError::NotFound);
        }
        match t {
            ResourceType::Patient => {
                self.patients.delete(id).await.map_err(|e| match e {
                    PhiError::NotFound => FhirError::NotFound,
                    e => e.into(),
                })?;
                Ok(id.to_owned())
            }
            ResourceType::Condition if id.starts_with(RECORD_PREFIX) => Err(FhirError::BadRequest(
                "this Condition is a /api/v1 record: delete it through /api/v1/records".into(),
            )),
            _ => {
                let row = store::by_id(&self.db, t.as_str(), id)
                    .await?
                    .ok_or(FhirError::NotFound)?;
                if row.deleted_at.is_some() {
                    return Ok(row.patient_id);
                }
                let now = self.now();
                let w = Write {
                    row: ResourceRow {
                        version: row.version + 1,
                        updated_at: now.clone(),
                        deleted_at: Some(now),
                        ..row.clone()
                    },
                    expected: Some(row.version),
                };
                if !store::apply(&self.db, &[w], &[]).await? {
                    return Err(FhirError::Conflict(
                        "the resource changed while it was deleted; try again".into(),
                    ));
                }
                Ok(row.patient_id)
            }
        }
    }

    // ---- searching -----------------------------------------------------------------

    /// The resources of one type in a patient's compartment (with `/api/v1` records as
    /// Conditions), opened.
    pub async fn compartment(
        &self,
        t: ResourceType,
        patient_id: &str,
    ) -> Result<Vec<Resource>, FhirError> {
        let key = match self.patients.patient_key(patient_id).await {
            Ok(k) => k,
            Err(PhiError::NotFound) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let rows = store::compartment(&self.db, patient_id, t.as_str()).await?;
        let mut out = rows
            .iter()
            .map(|r| self.open_row(&key, t, r))
            .collect::<Result<Vec<_>, _>>()?;
        if t == ResourceType::Condition {
            let records = self.patients.records(patient_id, "", 100_000).await?;
            out.extend(records.into_iter().map(Self::record_resource));
        }
        Ok(out)
    }

    /// A search: every match (for `total`) and the page after the cursor. What `screen`
    /// withholds is taken out before anything is counted or paged: `total` and the
    /// pages are of what the caller may see, and `withheld` counts what the screen took
    /// out of the whole compartment of this type (whatever the criteria: a count by
    /// criteria would tell what a withheld resource is).
    pub async fn search(
        &self,
        t: ResourceType,
        q: &Query,
        sees_ssn: bool,
        screen: &crate::privacy::Screen,
    ) -> Result<Found, FhirError> {
        let from_tags = q
            .name_only()
            .is_some_and(|(probe, value)| self.patients.pages_from_tags(probe, value));
        if t == ResourceType::Patient && (q.unfiltered() || from_tags) {
            let (total, page, next) = self.list_patients(q).await?;
            return Ok(Found {
                total,
                page,
                next,
                withheld: 0,
            });
        }
        let mut withheld = 0;
        let mut found = if t == ResourceType::Patient {
            self.search_patients(q, sees_ssn).await?
        } else {
            let pid = q.patient.as_deref().unwrap_or_default();
            let mut all = self.compartment(t, pid).await?;
            if screen.withholds() {
                let before = all.len();
                all.retain(|r| !screen.hides(&r.labels()));
                withheld = before - all.len();
            }
            all.retain(|r| matches(r, q));
            all
        };
        let sort = |r: &Resource| -> (i128, String) {
            match (&r.body, q.sort) {
                (Body::Patient(_), _) | (_, Sort::Id) => (0, r.id.clone()),
                (Body::Clinical(c), Sort::Recent) => {
                    (-c.when().map_or(i128::MIN + 1, |d| d.start), r.id.clone())
                }
                (Body::Record(rec), Sort::Recent) => (
                    -DateRange::parse_datetime(&rec.recorded_at).map_or(i128::MIN + 1, |d| d.start),
                    r.id.clone(),
                ),
            }
        };
        found.sort_by_cached_key(|r| sort(r));
        let total = found.len();
        let after = match &q.cursor {
            None => None,
            Some(c) => Some(self.open_cursor(&q.canonical, c).ok_or_else(|| {
                FhirError::BadRequest("_cursor is not the cursor of a page of this search".into())
            })?),
        };
        let start = match &after {
            None => 0,
            Some((k, id)) => found.partition_point(|r| {
                let s = sort(r);
                (s.0, s.1.as_str()) <= (*k, id.as_str())
            }),
        };
        let page: Vec<Resource> = found.into_iter().skip(start).collect();
        let more = page.len() > q.count;
        let mut page = page;
        page.truncate(q.count);
        let next = match page.last() {
            Some(last) if more => {
                let (k, id) = sort(last);
                Some(self.seal_cursor(&q.canonical, k, &id)?)
            }
            _ => None,
        };
        Ok(Found {
            total,
            page,
            next,
            withheld,
        })
    }

    /// A whole search (its criteria and where the page starts) sealed into one opaque
    /// token: the links of a de-identified search, which must not carry the real
    /// patient id the client searched by.
    pub fn seal_page(&self, canonical: &str, cursor: Option<&str>) -> Result<String, FhirError> {
        let text = format!("{canonical}\n{}", cursor.unwrap_or(""));
        crypto::seal(&self.keys, PAGE, b"fhir-page", text.as_bytes())
            .map_err(|e| envelope::EnvelopeError::from(e).into())
    }

    /// The query pairs a [`Fhir::seal_page`] token stands for.
    pub fn open_page(&self, token: &str) -> Option<Vec<(String, String)>> {
        let raw = crypto::open(&self.keys, PAGE, b"fhir-page", token).ok()?;
        let text = std::str::from_utf8(&raw).ok()?;
        let (canonical, cursor) = text.split_once('\n')?;
        let mut pairs: Vec<(String, String)> = form_urlencoded::parse(canonical.as_bytes())
            .into_owned()
            .collect();
        if !cursor.is_empty() {
            pairs.push(("_cursor".into(), cursor.to_owned()));
        }
        Some(pairs)
    }

    /// Every patient, or those of one name (whose blind index answers it exactly), a
    /// page at a time in id order, straight from the table: nothing to filter in memory,
    /// no patient opened but the page's.
    async fn list_patients(
        &self,
        q: &Query,
    ) -> Result<(usize, Vec<Resource>, Option<String>), FhirError> {
        let after = match &q.cursor {
            None => String::new(),
            Some(c) => self
                .open_cursor(&q.canonical, c)
                .map(|(_, id)| id)
                .ok_or_else(|| {
                    FhirError::BadRequest(
                        "_cursor is not the cursor of a page of this search".into(),
                    )
                })?,
        };
        let limit = i64::try_from(q.count).unwrap_or(20) + 1;
        let (total, mut page) = match q.name_only() {
            None => (
                self.patients.count().await?,
                self.patients.list(&after, limit).await?,
            ),
            Some((probe, value)) => {
                self.patients
                    .search_index_page(probe, value, &after, limit)
                    .await?
            }
        };
        let total = usize::try_from(total).unwrap_or(0);
        let more = page.len() > q.count;
        page.truncate(q.count);
        let next = match page.last() {
            Some(p) if more => Some(self.seal_cursor(&q.canonical, 0, &p.id)?),
            _ => None,
        };
        let page = page
            .into_iter()
            .map(|p| Resource {
                t: ResourceType::Patient,
                id: p.id.clone(),
                patient_id: p.id.clone(),
                version: p.version,
                last_updated: p.updated_at.clone(),
                body: Body::Patient(p),
            })
            .collect();
        Ok((total, page, next))
    }

    fn seal_cursor(&self, scope: &str, k: i128, id: &str) -> Result<String, FhirError> {
        crypto::seal(
            &self.keys,
            CURSOR,
            scope.as_bytes(),
            format!("{k}|{id}").as_bytes(),
        )
        .map_err(|e| envelope::EnvelopeError::from(e).into())
    }

    fn open_cursor(&self, scope: &str, c: &str) -> Option<(i128, String)> {
        let raw = crypto::open(&self.keys, CURSOR, scope.as_bytes(), c).ok()?;
        let s = std::str::from_utf8(&raw).ok()?;
        let (k, id) = s.split_once('|')?;
        Some((k.parse().ok()?, id.to_owned()))
    }

    async fn search_patients(&self, q: &Query, sees_ssn: bool) -> Result<Vec<Resource>, FhirError> {
        // The candidates, from one blind index (or the ids); then every criterion in memory.
        let candidates: Vec<Patient> = if let Some(ids) = &q.ids {
            let mut out = Vec::new();
            for id in ids {
                match self.patients.get(id).await {
                    Ok(p) => out.push(p),
                    Err(PhiError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            out
        } else if let Some(probe) = q.probe() {
            self.patients
                .search_index(probe.0, &probe.1, sees_ssn)
                .await?
        } else {
            // Criteria without an index (a birthdate range, a gender) are refused by
            // the parser unless an indexed one is given; reached only for those.
            return Err(FhirError::BadRequest(
                "combine this search with _id, identifier, name, family, given or an exact birthdate".into(),
            ));
        };
        Ok(candidates
            .into_iter()
            .filter(|p| patient_matches(p, q, &self.mrn_system, sees_ssn))
            .map(|p| Resource {
                t: ResourceType::Patient,
                id: p.id.clone(),
                patient_id: p.id.clone(),
                version: p.version,
                last_updated: p.updated_at.clone(),
                body: Body::Patient(p),
            })
            .collect())
    }

    /// A patient's whole compartment: the Patient, then each type's resources.
    pub async fn everything(&self, patient_id: &str) -> Result<Vec<Resource>, FhirError> {
        let mut out = vec![self.read(ResourceType::Patient, patient_id).await?];
        for t in ResourceType::ALL.into_iter().skip(1) {
            let mut list = self.compartment(t, patient_id).await?;
            list.sort_by(|a, b| a.id.cmp(&b.id));
            out.extend(list);
        }
        Ok(out)
    }
}

/// A FHIR instant from a stored time (`…000000Z` → `…000Z`).
pub fn fhir_instant(t: &str) -> String {
    match (t.get(..23), t.len()) {
        (Some(head), 27) if t.ends_with('Z') => format!("{head}Z"),
        _ => t.to_owned(),
    }
}

/// An `/api/v1` record as a Condition: the diagnosis as the code's text, the category
/// `encounter-diagnosis`, the treatment and notes as notes, `recorded_at` as
/// `recordedDate`. It has no coded value or clinical status (the record has none).
fn record_condition(r: &Record, anonymize: bool) -> Value {
    let text = |s: &str| {
        if anonymize {
            "REDACTED".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut notes = Vec::new();
    if let Some(t) = &r.treatment {
        notes.push(json!({"text": format!("Treatment: {}", text(t))}));
    }
    if let Some(n) = &r.notes {
        notes.push(json!({"text": text(n)}));
    }
    let recorded = if anonymize {
        r.recorded_at.get(..4).unwrap_or("").to_owned()
    } else {
        fhir_instant(&r.recorded_at)
    };
    let mut v = json!({
        "resourceType": "Condition",
        "id": format!("{RECORD_PREFIX}{}", r.id),
        "meta": {"tag": [{"system": "https://custodian.dev/fhir/CodeSystem/origin", "code": "api-v1-record", "display": "An /api/v1 medical record"}]},
        "category": [{"coding": [{"system": types::CONDITION_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
        "code": {"text": text(&r.diagnosis)},
        "subject": {"reference": format!("Patient/{}", r.patient_id)},
        "recordedDate": recorded,
    });
    if !notes.is_empty() {
        v["note"] = Value::Array(notes);
    }
    v
}

/// Whether a resource has one of these categories (granular SMART scopes): what a
/// `category` search with these values would match.
pub fn in_categories(r: &Resource, cats: &[Token]) -> bool {
    let Ok(mut q) = super::search::parse(
        ResourceType::Condition,
        &[("patient".to_owned(), "x".to_owned())],
    ) else {
        return false;
    };
    q.tokens = vec![("category", cats.to_vec())];
    !matches!(r.body, Body::Patient(_)) && matches(r, &q)
}

fn matches(r: &Resource, q: &Query) -> bool {
    match &r.body {
        Body::Clinical(c) => {
            q.tokens
                .iter()
                .all(|(name, values)| c.token_matches(name, values))
                && q.dates
                    .iter()
                    .all(|(name, prefix, v)| c.date_of(name).is_some_and(|d| prefix.matches(*v, d)))
        }
        Body::Record(rec) => {
            // A record is an encounter-diagnosis with a text code, no status, recorded at
            // its time: only those criteria can match it.
            let cat =
                types::CodeableConcept::coded(types::CONDITION_CATEGORY, "encounter-diagnosis", "");
            q.tokens.iter().all(|(name, values)| {
                *name == "category" && values.iter().any(|t: &Token| t.matches_concept(&cat))
            }) && q.dates.iter().all(|(name, prefix, v)| {
                *name == "recorded-date"
                    && DateRange::parse_datetime(&rec.recorded_at)
                        .is_some_and(|d| prefix.matches(*v, d))
            })
        }
        Body::Patient(_) => false,
    }
}

fn patient_matches(p: &Patient, q: &Query, mrn_system: &str, sees_ssn: bool) -> bool {
    let f = &p.fields;
    // FHIR string search: every word of the value begins a word of the name (from 3
    // letters; shorter words match whole), case and accents aside.
    q.strings.iter().all(|(name, v)| {
        use crate::records::search::{self, Part};
        let parts: &[Part] = match *name {
            "name" => search::BOTH,
            "family" => &[Part::Family],
            "given" => &[Part::Given],
            _ => return false,
        };
        let words = search::tokens(v);
        !words.is_empty() && search::name_matches(&words, &f.given_name, &f.family_name, parts)
    }) && q.tokens.iter().all(|(name, values)| match *name {
        "identifier" => values.iter().any(|t| {
            let mrn = t
                .code
                .as_deref()
                .is_some_and(|c| c.eq_ignore_ascii_case(&f.mrn))
                && t.system.as_deref().is_none_or(|s| s == mrn_system);
            let ssn = sees_ssn
                && f.ssn
                    .as_deref()
                    .is_some_and(|s| t.code.as_deref() == Some(s))
                && t.system.as_deref().is_none_or(|s| s == patient::SSN_SYSTEM);
            mrn || ssn
        }),
        "gender" => values
            .iter()
            .any(|t| t.code.as_deref() == Some(f.sex.as_deref().unwrap_or("unknown"))),
        _ => true,
    }) && q.dates.iter().all(|(_, prefix, v)| {
        DateRange::parse_date(&f.birth_date).is_some_and(|d| prefix.matches(*v, d))
    }) && q.ids.as_ref().is_none_or(|ids| ids.contains(&p.id))
}

/// Whether a Patient sent for an existing patient changes nothing.
fn same_patient(current: &Patient, input: &NewPatient, sees_ssn: bool) -> bool {
    let f = &current.fields;
    let t = |s: &Option<String>| s.as_deref().map(str::trim).map(str::to_owned);
    f.given_name == input.given_name.trim()
        && f.family_name == input.family_name.trim()
        && f.birth_date == input.birth_date.trim()
        && f.sex == input.sex.as_deref().map(|s| s.trim().to_ascii_lowercase())
        // Without `phi:ssn` an SSN sent never counts as unchanged: whether the write
        // made a new version would tell whether the guess was right.
        && (if sees_ssn { f.ssn == t(&input.ssn) } else { input.ssn.is_none() })
        && f.email == t(&input.email)
        && f.phone == t(&input.phone)
        && f.address == t(&input.address)
        && input
            .mrn
            .as_deref()
            .is_none_or(|m| m.trim().eq_ignore_ascii_case(&f.mrn))
}

/// A whole Patient as a patch that replaces every field (the MRN is kept when none is
/// sent; the SSN too, for a caller who cannot see it).
fn full_patch(p: NewPatient, sees_ssn: bool) -> PatientPatch {
    PatientPatch {
        given_name: Some(p.given_name),
        family_name: Some(p.family_name),
        birth_date: Some(p.birth_date),
        sex: Some(p.sex),
        ssn: if sees_ssn || p.ssn.is_some() {
            Some(p.ssn)
        } else {
            None
        },
        email: Some(p.email),
        phone: Some(p.phone),
        address: Some(p.address),
        mrn: p.mrn,
    }
}
