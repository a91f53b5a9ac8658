//! Patients' restrictions, stored as the FHIR `Consent` resources that record them
//! (sealed with the patient's data key; the row says only whose and whether active).
//!
//! The Consent of a restriction of category `PSY` to the role `doctor`, no app:
//!
//! ```json
//! {"resourceType": "Consent", "status": "active",
//!  "scope": {"coding": [{"system": ".../consentscope", "code": "patient-privacy"}]},
//!  "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
//!  "patient": {"reference": "Patient/<id>"}, "dateTime": "…",
//!  "policyRule": {"coding": [{"system": ".../consentpolicycodes", "code": "hipaa-restrictions"}]},
//!  "provision": {"type": "deny", "securityLabel": [{"system": ".../v3-ActCode", "code": "PSY"}],
//!    "provision": [{"type": "permit", "actor": [{"role": …, "reference": {"identifier":
//!      {"system": "https://custodian.dev/fhir/CodeSystem/role", "value": "doctor"}}}]}]}}
//! ```
//!
//! A restriction that lets apps see the category (for allowed roles) adds the actor
//! `https://custodian.dev/fhir/CodeSystem/audience|smart-app` to the permit.

use serde_json::{Value, json};
use sqlx::Row;

use super::{ACT_CODE, Restriction};
use crate::fhir::service::fhir_instant;
use crate::phi::envelope;
use crate::records::service::{Patients, PhiError};
use crate::store::Db;

const TABLE: &str = "consents";
const ROLE_SYSTEM: &str = "https://custodian.dev/fhir/CodeSystem/role";
const AUDIENCE_SYSTEM: &str = "https://custodian.dev/fhir/CodeSystem/audience";
const APP: &str = "smart-app";

/// The FHIR Consent of a restriction.
pub fn to_fhir(r: &Restriction, active: bool, version: i64, updated: &str) -> Value {
    let actor = |system: &str, value: &str| {
        json!({
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]},
            "reference": {"identifier": {"system": system, "value": value}, "display": value},
        })
    };
    let mut actors: Vec<Value> = r.roles.iter().map(|x| actor(ROLE_SYSTEM, x)).collect();
    if r.apps {
        actors.push(actor(AUDIENCE_SYSTEM, APP));
    }
    let mut provision = json!({
        "type": "deny",
        "securityLabel": [{"system": ACT_CODE, "code": r.category}],
    });
    if !actors.is_empty() {
        provision["provision"] = json!([{"type": "permit", "actor": actors}]);
    }
    json!({
        "resourceType": "Consent",
        "id": r.id,
        "meta": {"versionId": version.to_string(), "lastUpdated": fhir_instant(updated)},
        "status": if active { "active" } else { "inactive" },
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"reference": format!("Patient/{}", r.patient_id)},
        "dateTime": fhir_instant(&r.created_at),
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentpolicycodes", "code": "hipaa-restrictions", "display": "HIPAA Restrictions"}]},
        "provision": provision,
    })
}

/// The restriction a stored Consent records; None when it is not one of ours.
pub fn from_fhir(v: &Value, patient_id: &str, created_at: &str) -> Option<Restriction> {
    let provision = v.get("provision")?;
    let category = provision
        .get("securityLabel")?
        .as_array()?
        .iter()
        .find(|c| c.get("system").and_then(Value::as_str) == Some(ACT_CODE))?
        .get("code")?
        .as_str()?
        .to_owned();
    let mut roles = Vec::new();
    let mut apps = false;
    for p in provision
        .get("provision")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for a in p
            .get("actor")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = a.pointer("/reference/identifier")?;
            let value = id.get("value")?.as_str()?.to_owned();
            match id.get("system").and_then(Value::as_str) {
                Some(ROLE_SYSTEM) => roles.push(value),
                Some(AUDIENCE_SYSTEM) if value == APP => apps = true,
                _ => return None,
            }
        }
    }
    Some(Restriction {
        id: v.get("id")?.as_str()?.to_owned(),
        patient_id: patient_id.to_owned(),
        category,
        roles,
        apps,
        created_at: created_at.to_owned(),
    })
}

/// One stored Consent row, opened.
pub struct Stored {
    pub restriction: Restriction,
    pub active: bool,
    pub version: i64,
    pub updated_at: String,
}

impl Stored {
    pub fn fhir(&self) -> Value {
        to_fhir(
            &self.restriction,
            self.active,
            self.version,
            &self.updated_at,
        )
    }
}

fn open(key: &envelope::DataKey, r: &sqlx::any::AnyRow) -> Result<Stored, PhiError> {
    let id: String = r.try_get("id").map_err(crate::store::StoreError::from)?;
    let patient_id: String = r
        .try_get("patient_id")
        .map_err(crate::store::StoreError::from)?;
    let body: String = r.try_get("body").map_err(crate::store::StoreError::from)?;
    let status: String = r
        .try_get("status")
        .map_err(crate::store::StoreError::from)?;
    let version: i64 = r
        .try_get("version")
        .map_err(crate::store::StoreError::from)?;
    let created_at: String = r
        .try_get("created_at")
        .map_err(crate::store::StoreError::from)?;
    let updated_at: String = r
        .try_get("updated_at")
        .map_err(crate::store::StoreError::from)?;
    let text = envelope::open_field(key, TABLE, "body", &id, &body)?;
    let v: Value = serde_json::from_str(&text).map_err(|_| {
        PhiError::Envelope(envelope::EnvelopeError::from(
            crate::crypto::CryptoError::Malformed,
        ))
    })?;
    // A stored Consent we cannot read as a restriction fails closed: it withholds
    // every sensitive category from everyone but the patient.
    let restriction = from_fhir(&v, &patient_id, &created_at).unwrap_or_else(|| {
        tracing::error!(target: "custodian::security", "security event: a stored Consent is not a restriction this server reads; every sensitive category is withheld");
        Restriction {
            id: id.clone(),
            patient_id: patient_id.clone(),
            category: "*".into(),
            roles: Vec::new(),
            apps: false,
            created_at: created_at.clone(),
        }
    });
    Ok(Stored {
        restriction,
        active: status == "active",
        version,
        updated_at,
    })
}

/// The Consents of a patient (active ones only when `active_only`), oldest first.
pub async fn of_patient(
    db: &Db,
    patients: &Patients,
    patient_id: &str,
    active_only: bool,
) -> Result<Vec<Stored>, PhiError> {
    // The patient's wrapped data key comes with the Consents (one round trip: every
    // read of a restricted patient's data runs this).
    let rows = sqlx::query(
        "SELECT c.id, c.patient_id, c.status, c.body, c.version, c.created_at, c.updated_at, \
         p.data_key AS data_key FROM consents c JOIN patients p ON p.id = c.patient_id \
         WHERE c.patient_id = $1 AND ($2 = 0 OR c.status = 'active') ORDER BY c.created_at, c.id",
    )
    .bind(patient_id)
    .bind(i64::from(active_only))
    .fetch_all(db.reader())
    .await
    .map_err(crate::store::StoreError::from)?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let wrapped: Option<String> = first
        .try_get("data_key")
        .map_err(crate::store::StoreError::from)?;
    let key = patients.unwrap_key(patient_id, wrapped.as_deref())?;
    rows.iter().map(|r| open(&key, r)).collect()
}

/// Opened Consents by (id, version): a version is never rewritten (a change is a new
/// version), so an entry stays true; every lookup still asks the database which
/// versions are active, so a new or ended restriction holds from the next request, on
/// every server. Bounded: cleared when full.
static OPENED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<(String, i64), Restriction>>,
> = std::sync::LazyLock::new(Default::default);
const OPENED_MAX: usize = 10_000;

/// The patient a Consent is about (None: no such Consent).
pub async fn patient_of(db: &Db, id: &str) -> Result<Option<String>, PhiError> {
    Ok(sqlx::query("SELECT patient_id FROM consents WHERE id = $1")
        .bind(id)
        .fetch_optional(db.reader())
        .await
        .map_err(crate::store::StoreError::from)?
        .map(|r| r.try_get::<String, _>("patient_id"))
        .transpose()
        .map_err(crate::store::StoreError::from)?)
}

/// A patient's active restrictions (what every reader of their data applies): one
/// indexed query for the active ids and versions (nothing for most patients); the
/// Consents are opened only when this server has not opened that version yet.
pub async fn active(
    db: &Db,
    patients: &Patients,
    patient_id: &str,
) -> Result<Vec<Restriction>, PhiError> {
    let heads: Vec<(String, i64)> = sqlx::query(
        "SELECT id, version FROM consents WHERE patient_id = $1 AND status = 'active' \
         ORDER BY created_at, id",
    )
    .bind(patient_id)
    .fetch_all(db.reader())
    .await
    .map_err(crate::store::StoreError::from)?
    .iter()
    .map(|r| Ok((r.try_get("id")?, r.try_get("version")?)))
    .collect::<Result<_, sqlx::Error>>()
    .map_err(crate::store::StoreError::from)?;
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    {
        let cache = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        let hit: Option<Vec<Restriction>> = heads.iter().map(|h| cache.get(h).cloned()).collect();
        if let Some(list) = hit {
            return Ok(list);
        }
    }
    let opened: Vec<Stored> = of_patient(db, patients, patient_id, true)
        .await?
        .into_iter()
        .filter(|s| s.active)
        .collect();
    let mut cache = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() + opened.len() > OPENED_MAX {
        cache.clear();
    }
    for s in &opened {
        cache.insert((s.restriction.id.clone(), s.version), s.restriction.clone());
    }
    Ok(opened.into_iter().map(|s| s.restriction).collect())
}

/// Every active restriction of every patient (the administrators' report).
pub async fn all_active(db: &Db, patients: &Patients) -> Result<Vec<Stored>, PhiError> {
    let ids: Vec<String> = sqlx::query(
        "SELECT DISTINCT patient_id FROM consents WHERE status = 'active' ORDER BY patient_id LIMIT 10000",
    )
    .fetch_all(db.reader())
    .await
    .map_err(crate::store::StoreError::from)?
    .iter()
    .map(|r| r.try_get::<String, _>("patient_id"))
    .collect::<Result<_, _>>()
    .map_err(crate::store::StoreError::from)?;
    let mut out = Vec::new();
    for id in ids {
        match of_patient(db, patients, &id, true).await {
            Ok(list) => out.extend(list),
            // An erased patient's restrictions went with their key.
            Err(PhiError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Stores a new restriction as its Consent; returns it.
pub async fn create(
    db: &Db,
    patients: &Patients,
    r: &Restriction,
    now: &str,
) -> Result<Stored, PhiError> {
    let key = patients.patient_key(&r.patient_id).await?;
    let body = to_fhir(r, true, 1, now).to_string();
    let sealed = envelope::seal_field(&key, TABLE, "body", &r.id, &body)?;
    sqlx::query(
        "INSERT INTO consents (id, patient_id, status, body, version, created_at, updated_at) \
         VALUES ($1, $2, 'active', $3, 1, $4, $4)",
    )
    .bind(&r.id)
    .bind(&r.patient_id)
    .bind(&sealed)
    .bind(now)
    .execute(db.writer())
    .await
    .map_err(crate::store::StoreError::from)?;
    Ok(Stored {
        restriction: r.clone(),
        active: true,
        version: 1,
        updated_at: now.to_owned(),
    })
}

/// Ends a patient's restriction: the Consent becomes `inactive` (a new version, kept).
pub async fn revoke(
    db: &Db,
    patients: &Patients,
    patient_id: &str,
    id: &str,
    now: &str,
) -> Result<(), PhiError> {
    let Some(s) = of_patient(db, patients, patient_id, true)
        .await?
        .into_iter()
        .find(|s| s.restriction.id == id && s.active)
    else {
        return Err(PhiError::NotFound);
    };
    let key = patients.patient_key(patient_id).await?;
    let version = s.version + 1;
    let body = to_fhir(&s.restriction, false, version, now).to_string();
    let sealed = envelope::seal_field(&key, TABLE, "body", id, &body)?;
    let n = sqlx::query(
        "UPDATE consents SET status = 'inactive', body = $1, version = $2, updated_at = $3 \
         WHERE id = $4 AND patient_id = $5 AND status = 'active' AND version = $6",
    )
    .bind(&sealed)
    .bind(version)
    .bind(now)
    .bind(id)
    .bind(patient_id)
    .bind(s.version)
    .execute(db.writer())
    .await
    .map_err(crate::store::StoreError::from)?
    .rows_affected();
    if n == 1 {
        Ok(())
    } else {
        Err(PhiError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consent_reads_back_as_its_restriction() {
        for (roles, apps) in [(vec![], false), (vec!["doctor".to_owned()], true)] {
            let r = Restriction {
                id: "c1".into(),
                patient_id: "p1".into(),
                category: "PSY".into(),
                roles,
                apps,
                created_at: "2026-12-06T10:00:00.000000Z".into(),
            };
            let v = to_fhir(&r, true, 1, &r.created_at);
            assert_eq!(v["resourceType"], "Consent");
            assert_eq!(v["provision"]["type"], "deny");
            assert_eq!(from_fhir(&v, "p1", &r.created_at).as_ref(), Some(&r));
        }
        assert!(from_fhir(&json!({"id": "x"}), "p", "").is_none());
    }
}
