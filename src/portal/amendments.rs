//! Amendment requests (HIPAA §164.526): a patient asks for a correction of one element
//! of their record with a reason; a reviewer (`amendments:review`) accepts it — the
//! change is applied to the element and versioned — or denies it with a written reason
//! the patient reads, and may answer with a statement of disagreement that is then
//! attached to the record. Each step is audited; a request undecided 60 days after it
//! was made is raised as a security event.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::clock::timestamp;
use crate::http::{ApiError, ErrorCode, FieldError};
use crate::phi::envelope;
use crate::records::model::{PatientPatch, RecordPatch};
use crate::records::service::PhiError;
use crate::store::StoreError;

/// Days a covered entity has to act on a request (§164.526(b)(2)).
pub const DEADLINE_DAYS: i64 = 60;
const TABLE: &str = "amendments";

/// The demographics a patient may ask to correct.
pub const PATIENT_FIELDS: [&str; 7] = [
    "given_name",
    "family_name",
    "birth_date",
    "sex",
    "email",
    "phone",
    "address",
];
/// The fields of a visit record a patient may ask to correct.
pub const RECORD_FIELDS: [&str; 3] = ["diagnosis", "treatment", "notes"];

/// What a request is about.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `patient` (a demographic field), `record` (a field of a visit record) or `fhir`
    /// (any resource of the record, by reference; the reviewer applies the change).
    pub resource: String,
    /// The record's id (`record`), or the reference `Type/id` (`fhir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The field (`patient`: given_name, family_name, birth_date, sex, email, phone,
    /// address; `record`: diagnosis, treatment, notes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The sealed part of a request.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct Sealed {
    requested: String,
    reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    statement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    statement_at: Option<String>,
}

/// An amendment request as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Amendment {
    pub id: String,
    pub patient_id: String,
    pub target: Target,
    /// The correction asked for (the new value, or what is wrong).
    pub requested: String,
    /// Why, in the patient's words.
    pub reason: String,
    /// `pending`, `accepted` or `denied`.
    pub status: String,
    pub created_at: String,
    /// 60 days after the request.
    pub due_at: String,
    /// Pending past its due date.
    pub overdue: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// The reviewer's reason for a denial, or note on an acceptance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The value the acceptance replaced (to reviewers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The patient's statement of disagreement with a denial, attached to the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_at: Option<String>,
}

fn store(e: sqlx::Error) -> PhiError {
    PhiError::Store(StoreError::from(e))
}

fn malformed() -> PhiError {
    PhiError::Envelope(envelope::EnvelopeError::from(
        crate::crypto::CryptoError::Malformed,
    ))
}

const COLUMNS: &str =
    "id, patient_id, target, target_id, field, body, status, due_at, decided_at, created_at";

fn open_row(
    key: &envelope::DataKey,
    r: &sqlx::any::AnyRow,
    now: &str,
) -> Result<Amendment, PhiError> {
    let get = |c: &str| r.try_get::<String, _>(c).map_err(store);
    let opt = |c: &str| r.try_get::<Option<String>, _>(c).map_err(store);
    let id = get("id")?;
    let body = get("body")?;
    let text = envelope::open_field(key, TABLE, "body", &id, &body)?;
    let s: Sealed = serde_json::from_str(&text).map_err(|_| malformed())?;
    let status = get("status")?;
    let due_at = get("due_at")?;
    Ok(Amendment {
        patient_id: get("patient_id")?,
        target: Target {
            resource: get("target")?,
            id: opt("target_id")?,
            field: opt("field")?,
        },
        requested: s.requested,
        reason: s.reason,
        overdue: status == "pending" && due_at.as_str() < now,
        status,
        created_at: get("created_at")?,
        due_at,
        decided_at: opt("decided_at")?,
        decision: s.decision,
        previous: s.previous,
        statement: s.statement,
        statement_at: s.statement_at,
        id,
    })
}

fn now(state: &AppState) -> String {
    timestamp(state.clock().now())
}

/// The requests of one patient, newest first (`pending_only`: those undecided).
pub async fn of_patient(
    state: &AppState,
    patient: &str,
    pending_only: bool,
) -> Result<Vec<Amendment>, PhiError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM amendments WHERE patient_id = $1 AND ($2 = 0 OR status = 'pending') \
         ORDER BY created_at DESC, id LIMIT 1000"
    )))
    .bind(patient)
    .bind(i64::from(pending_only))
    .fetch_all(state.db().reader())
    .await
    .map_err(store)?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let key = state.patients().patient_key(patient).await?;
    let now = now(state);
    rows.iter().map(|r| open_row(&key, r, &now)).collect()
}

/// One request.
pub async fn get(state: &AppState, id: &str) -> Result<Amendment, PhiError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM amendments WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(state.db().reader())
    .await
    .map_err(store)?
    .ok_or(PhiError::NotFound)?;
    let patient: String = row.try_get("patient_id").map_err(store)?;
    let key = state.patients().patient_key(&patient).await?;
    open_row(&key, &row, &now(state))
}

/// The requests with `status` (or the overdue ones), oldest due first, for reviewers.
pub async fn list(state: &AppState, status: &str) -> Result<Vec<Amendment>, PhiError> {
    let now = now(state);
    let (sql_status, overdue_only) = match status {
        "overdue" => ("pending", true),
        s => (s, false),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM amendments WHERE status = $1 AND ($2 = 0 OR due_at < $3) \
         ORDER BY due_at, id LIMIT 500"
    )))
    .bind(sql_status)
    .bind(i64::from(overdue_only))
    .bind(&now)
    .fetch_all(state.db().reader())
    .await
    .map_err(store)?;
    let mut out = Vec::new();
    for r in &rows {
        let patient: String = r.try_get("patient_id").map_err(store)?;
        let key = match state.patients().patient_key(&patient).await {
            Ok(k) => k,
            // An erased patient's requests went with their key.
            Err(PhiError::NotFound | PhiError::Envelope(envelope::EnvelopeError::Shredded)) => {
                continue;
            }
            Err(e) => return Err(e),
        };
        out.push(open_row(&key, r, &now)?);
    }
    Ok(out)
}

async fn write_sealed(
    state: &AppState,
    a: &Amendment,
    sealed: &Sealed,
) -> Result<String, PhiError> {
    let key = state.patients().patient_key(&a.patient_id).await?;
    let text = serde_json::to_string(sealed).map_err(|_| malformed())?;
    Ok(envelope::seal_field(&key, TABLE, "body", &a.id, &text)?)
}

fn text_field(
    errors: &mut Vec<FieldError>,
    name: &'static str,
    v: &str,
    min: usize,
    max: usize,
) -> String {
    let t = v.trim();
    let n = t.chars().count();
    if n < min || n > max {
        errors.push(FieldError::new(
            name,
            if min > 1 {
                format!("must be {min} to {max} characters")
            } else {
                format!("must be 1 to {max} characters")
            },
        ));
    }
    t.to_owned()
}

/// What a patient sends.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAmendment {
    pub target: Target,
    /// The correction: the right value, or what is wrong (at most 2,000 characters).
    pub requested: String,
    /// Why (at most 2,000 characters).
    pub reason: String,
}

/// Files a patient's request about their own record; the target must be theirs.
pub async fn request(
    state: &AppState,
    patient: &str,
    user_id: &str,
    req: NewAmendment,
) -> Result<Amendment, ApiError> {
    let mut errors = Vec::new();
    let requested = text_field(&mut errors, "requested", &req.requested, 1, 2000);
    let reason = text_field(&mut errors, "reason", &req.reason, 1, 2000);
    let t = req.target;
    match t.resource.as_str() {
        "patient" => {
            if !t
                .field
                .as_deref()
                .is_some_and(|f| PATIENT_FIELDS.contains(&f))
            {
                errors.push(FieldError::new(
                    "target.field",
                    format!("must be one of {}", PATIENT_FIELDS.join(", ")),
                ));
            }
        }
        "record" => {
            if !t
                .field
                .as_deref()
                .is_some_and(|f| RECORD_FIELDS.contains(&f))
            {
                errors.push(FieldError::new(
                    "target.field",
                    format!("must be one of {}", RECORD_FIELDS.join(", ")),
                ));
            }
            // The record must be the patient's own (not found otherwise: no oracle).
            let own = match t.id.as_deref() {
                Some(id) => state
                    .patients()
                    .record_patient(id)
                    .await
                    .is_ok_and(|p| p == patient),
                None => false,
            };
            if !own {
                errors.push(FieldError::new("target.id", "must be one of your records"));
            }
        }
        "fhir" => {
            let own = match t.id.as_deref().and_then(|r| r.split_once('/')) {
                Some((ty, id)) => match crate::fhir::resources::ResourceType::parse(ty) {
                    Some(rt) => state
                        .fhir()
                        .patient_of(rt, id)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|p| p == patient),
                    None => false,
                },
                None => false,
            };
            if !own {
                errors.push(FieldError::new(
                    "target.id",
                    "must be a reference Type/id to a resource of your record",
                ));
            }
        }
        _ => errors.push(FieldError::new(
            "target.resource",
            "must be patient, record or fhir",
        )),
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let now_t = state.clock().now();
    let now = timestamp(now_t);
    let a = Amendment {
        id: uuid::Uuid::new_v4().to_string(),
        patient_id: patient.to_owned(),
        target: Target {
            field: if t.resource == "fhir" { None } else { t.field },
            ..t
        },
        requested,
        reason,
        status: "pending".into(),
        created_at: now.clone(),
        due_at: timestamp(now_t + time::Duration::days(DEADLINE_DAYS)),
        overdue: false,
        decided_at: None,
        decision: None,
        previous: None,
        statement: None,
        statement_at: None,
    };
    let sealed = Sealed {
        requested: a.requested.clone(),
        reason: a.reason.clone(),
        ..Sealed::default()
    };
    let body = write_sealed(state, &a, &sealed).await?;
    sqlx::query(
        "INSERT INTO amendments (id, patient_id, requested_by, target, target_id, field, body, status, due_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9, $9)",
    )
    .bind(&a.id)
    .bind(&a.patient_id)
    .bind(user_id)
    .bind(&a.target.resource)
    .bind(&a.target.id)
    .bind(&a.target.field)
    .bind(&body)
    .bind(&a.due_at)
    .bind(&now)
    .execute(state.db().writer())
    .await
    .map_err(store)?;
    Ok(a)
}

/// Moves a pending request to `status` with the new sealed part; false when it was
/// decided meanwhile.
async fn decide(
    state: &AppState,
    a: &Amendment,
    status: &str,
    sealed: &Sealed,
    by: &str,
) -> Result<bool, PhiError> {
    let body = write_sealed(state, a, sealed).await?;
    let now = now(state);
    let n = sqlx::query(
        "UPDATE amendments SET status = $1, body = $2, decided_at = $3, decided_by = $4, updated_at = $3 \
         WHERE id = $5 AND status = 'pending'",
    )
    .bind(status)
    .bind(&body)
    .bind(&now)
    .bind(by)
    .bind(&a.id)
    .execute(state.db().writer())
    .await
    .map_err(store)?
    .rows_affected();
    Ok(n == 1)
}

fn sealed_of(a: &Amendment) -> Sealed {
    Sealed {
        requested: a.requested.clone(),
        reason: a.reason.clone(),
        previous: a.previous.clone(),
        decision: a.decision.clone(),
        statement: a.statement.clone(),
        statement_at: a.statement_at.clone(),
    }
}

fn not_pending() -> ApiError {
    ApiError::new(ErrorCode::Conflict).with_detail("This request was decided already.")
}

/// Accepts a request: a demographic or record field is changed to what was asked
/// (a new version of it; the previous value kept with the request); a FHIR resource is
/// changed by the reviewer, who says how in `note` (required then).
pub async fn accept(
    state: &AppState,
    id: &str,
    note: Option<String>,
    by: &str,
) -> Result<Amendment, ApiError> {
    let mut a = get(state, id).await?;
    if a.status != "pending" {
        return Err(not_pending());
    }
    let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if note.as_ref().is_some_and(|n| n.chars().count() > 2000) {
        return Err(ApiError::field("note", "must be at most 2000 characters"));
    }
    let field = a.target.field.clone().unwrap_or_default();
    let value = a.requested.clone();
    let previous = match a.target.resource.as_str() {
        "patient" => {
            let p = state.patients().get(&a.patient_id).await?;
            let f = &p.fields;
            let old = match field.as_str() {
                "given_name" => Some(f.given_name.clone()),
                "family_name" => Some(f.family_name.clone()),
                "birth_date" => Some(f.birth_date.clone()),
                "sex" => f.sex.clone(),
                "email" => f.email.clone(),
                "phone" => f.phone.clone(),
                _ => f.address.clone(),
            };
            let mut patch = PatientPatch::default();
            match field.as_str() {
                "given_name" => patch.given_name = Some(value),
                "family_name" => patch.family_name = Some(value),
                "birth_date" => patch.birth_date = Some(value),
                "sex" => patch.sex = Some(Some(value)),
                "email" => patch.email = Some(Some(value)),
                "phone" => patch.phone = Some(Some(value)),
                _ => patch.address = Some(Some(value)),
            }
            // The requested value goes through the same checks as any edit: a 422
            // here means it cannot be applied as asked (deny it, or ask the patient).
            state
                .patients()
                .update(&a.patient_id, patch, Some(p.version))
                .await?;
            old
        }
        "record" => {
            let rid = a.target.id.clone().unwrap_or_default();
            let r = state.patients().record(&rid).await?;
            let old = match field.as_str() {
                "diagnosis" => Some(r.diagnosis.clone()),
                "treatment" => r.treatment.clone(),
                _ => r.notes.clone(),
            };
            let mut patch = RecordPatch {
                diagnosis: None,
                treatment: None,
                notes: None,
                recorded_at: None,
                labels: None,
            };
            match field.as_str() {
                "diagnosis" => patch.diagnosis = Some(value),
                "treatment" => patch.treatment = Some(Some(value)),
                _ => patch.notes = Some(Some(value)),
            }
            state
                .patients()
                .update_record(&rid, patch, Some(r.version))
                .await?;
            old
        }
        _ => {
            if note.is_none() {
                return Err(ApiError::field(
                    "note",
                    "say how the resource was changed (a FHIR resource is amended by the reviewer)",
                ));
            }
            None
        }
    };
    a.previous = previous;
    a.decision = note;
    if !decide(state, &a, "accepted", &sealed_of(&a), by).await? {
        return Err(not_pending());
    }
    get(state, id).await.map_err(ApiError::from)
}

/// Denies a request with the written reason the patient will read (§164.526(d)).
pub async fn deny(
    state: &AppState,
    id: &str,
    reason: &str,
    by: &str,
) -> Result<Amendment, ApiError> {
    let mut a = get(state, id).await?;
    if a.status != "pending" {
        return Err(not_pending());
    }
    let mut errors = Vec::new();
    let reason = text_field(&mut errors, "reason", reason, 10, 2000);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    a.decision = Some(reason);
    if !decide(state, &a, "denied", &sealed_of(&a), by).await? {
        return Err(not_pending());
    }
    get(state, id).await.map_err(ApiError::from)
}

/// The patient's statement of disagreement with a denial: once, then attached to the
/// record (the chart and the patient's pages show it with the request).
pub async fn disagree(
    state: &AppState,
    patient: &str,
    id: &str,
    statement: &str,
) -> Result<Amendment, ApiError> {
    let mut a = get(state, id).await?;
    if a.patient_id != patient {
        return Err(ApiError::new(ErrorCode::NotFound));
    }
    if a.status != "denied" || a.statement.is_some() {
        return Err(ApiError::new(ErrorCode::Conflict)
            .with_detail("A statement of disagreement answers a denied request, once."));
    }
    let mut errors = Vec::new();
    let statement = text_field(&mut errors, "statement", statement, 1, 4000);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let now = now(state);
    a.statement = Some(statement);
    a.statement_at = Some(now.clone());
    let body = write_sealed(state, &a, &sealed_of(&a)).await?;
    let n = sqlx::query(
        "UPDATE amendments SET body = $1, updated_at = $2 WHERE id = $3 AND status = 'denied'",
    )
    .bind(&body)
    .bind(&now)
    .bind(&a.id)
    .execute(state.db().writer())
    .await
    .map_err(store)?
    .rows_affected();
    if n != 1 {
        return Err(ApiError::new(ErrorCode::Conflict));
    }
    Ok(a)
}

/// Raises a security event, once each, for requests undecided past their due date.
/// Answers how many it raised. Every process may run it: a row is claimed by setting
/// `overdue_raised_at` first.
pub async fn sweep(state: &AppState) -> Result<usize, StoreError> {
    let now = now(state);
    let due: Vec<(String, String)> = sqlx::query(
        "SELECT id, patient_id FROM amendments WHERE status = 'pending' AND due_at < $1 \
         AND overdue_raised_at IS NULL ORDER BY due_at LIMIT 500",
    )
    .bind(&now)
    .fetch_all(state.db().reader())
    .await?
    .iter()
    .map(|r| Ok((r.try_get("id")?, r.try_get("patient_id")?)))
    .collect::<Result<_, sqlx::Error>>()?;
    let mut raised = 0;
    for (id, _patient) in due {
        let n = sqlx::query(
            "UPDATE amendments SET overdue_raised_at = $1 WHERE id = $2 AND overdue_raised_at IS NULL AND status = 'pending'",
        )
        .bind(&now)
        .bind(&id)
        .execute(state.db().writer())
        .await?
        .rows_affected();
        if n == 1 {
            state.security().raise(
                crate::security::Rule::AmendmentOverdue,
                &id,
                &format!("an amendment request is undecided past its {DEADLINE_DAYS}-day deadline"),
            );
            raised += 1;
        }
    }
    Ok(raised)
}

/// Runs [`sweep`] every `every` (started with the server).
pub fn spawn_sweeper(state: AppState, every: std::time::Duration) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = sweep(&state).await {
                tracing::warn!(error = %e, "amendments: the overdue sweep could not run; retrying");
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// The FHIR-free summary a page shows of a target.
pub fn describe(t: &Target) -> String {
    match t.resource.as_str() {
        "patient" => format!(
            "Demographics: {}",
            t.field.as_deref().unwrap_or("").replace('_', " ")
        ),
        "record" => format!("Visit record: {}", t.field.as_deref().unwrap_or("")),
        _ => t.id.clone().unwrap_or_default(),
    }
}

/// What a reader sees of a request about an item withheld from them.
pub const WITHHELD_TEXT: &str = "(withheld at the patient's request)";

/// Hides the words of a request about a record or resource the patient's restrictions
/// keep from `p` (what was asked, why, the replaced value, the decision, the statement
/// would each tell what the item says). The request itself — its target, dates and
/// status — stays, so it is still decided in time.
pub async fn screen_text(
    state: &AppState,
    p: &crate::access::Principal,
    a: &mut Amendment,
) -> Result<(), PhiError> {
    let labels = match (a.target.resource.as_str(), a.target.id.as_deref()) {
        ("record", Some(id)) => match state.patients().record(id).await {
            Ok(r) => r.labels,
            Err(PhiError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        },
        ("fhir", Some(reference)) => {
            let Some((ty, id)) = reference.split_once('/') else {
                return Ok(());
            };
            let Some(t) = crate::fhir::resources::ResourceType::parse(ty) else {
                return Ok(());
            };
            match state.fhir().read(t, id).await {
                Ok(r) => r.labels(),
                Err(crate::fhir::service::FhirError::Phi(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
        _ => return Ok(()),
    };
    if labels.is_empty() {
        return Ok(());
    }
    let screen = crate::privacy::screen_for(state, p, &a.patient_id, false).await?;
    if screen.hides(&labels) {
        let w = || WITHHELD_TEXT.to_owned();
        a.requested = w();
        a.reason = w();
        a.previous = a.previous.as_ref().map(|_| w());
        a.decision = a.decision.as_ref().map(|_| w());
        a.statement = a.statement.as_ref().map(|_| w());
    }
    Ok(())
}
