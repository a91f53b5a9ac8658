//! HTTP for patients and records. Each read names the patient in the audit trail before
//! the response leaves (the activity middleware waits for the commit); SSNs are masked
//! without `phi:ssn`; `?anonymize=true` gives the de-identified view; break-glass lets a
//! user with `breakglass` read one named patient and their records with a stated reason
//! (never a list or a search of patients), each such access flagged and raised.

use crate::http::path::Path;
use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{
    NewPatient, NewRecord, PatientPatch, PatientView, RecordPatch, RecordView, mask_ssn, ssn_shaped,
};
use super::service::{Patient, Patients, PhiError, Record};
use crate::access::{Authorized, Permission, Principal, need};
use crate::app::AppState;
use crate::audit::middleware::{Annotation, Subjects, action_of, path_param};
use crate::audit::model::SafeId;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::json::{JsonBody, QueryParams};
use crate::http::params::{Limit, Text};
use crate::http::{ApiError, ErrorCode};

impl From<PhiError> for ApiError {
    fn from(e: PhiError) -> Self {
        match e {
            PhiError::NotFound => ApiError::new(ErrorCode::NotFound),
            PhiError::Invalid(errors) => ApiError::validation(errors),
            PhiError::Conflict(m) => ApiError::new(ErrorCode::Conflict).with_detail(m),
            PhiError::PreconditionFailed => ApiError::new(ErrorCode::PreconditionFailed),
            PhiError::Store(e) => ApiError::from(e),
            PhiError::Envelope(e) => {
                // Never wrong data: a generic 500, and a security event in the log.
                tracing::error!(target: "custodian::security", error = %e, "security event: a sealed PHI value did not open");
                ApiError::internal(anyhow::anyhow!("decryption failed"))
            }
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_patients, create_patient))
        .routes(routes!(get_patient, patch_patient, delete_patient))
        .routes(routes!(list_records, create_record))
        .routes(routes!(get_record, patch_record, delete_record))
        .routes(routes!(disclosures))
}

/// Minimum length of a break-glass reason.
const MIN_REASON: usize = 10;

/// Who may read one patient's PHI on this request, and how: with the read permission, or
/// by break-glass (`breakglass` + `X-Break-Glass-Reason`). Only the routes that name one
/// patient take it: a list or a search of patients needs `patients:read` itself.
pub struct PhiReader {
    principal: Principal,
    break_glass: Option<String>,
}

impl PhiReader {
    pub fn check(
        p: Principal,
        permission: Permission,
        headers: &HeaderMap,
    ) -> Result<Self, ApiError> {
        let reason = headers
            .get("x-break-glass-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|r| !r.is_empty());
        if p.has(permission) {
            // With the permission, break-glass still opens what the patient restricted
            // (for a holder of `breakglass`, never an app): flagged like any other.
            let glass = match reason {
                Some(r) if p.has(Permission::BreakGlass) && p.smart().is_none() => {
                    if r.chars().count() < MIN_REASON {
                        return Err(ApiError::field(
                            "X-Break-Glass-Reason",
                            "must state the reason in at least 10 characters",
                        ));
                    }
                    Some(r.chars().take(500).collect())
                }
                _ => None,
            };
            return Ok(Self {
                principal: p,
                break_glass: glass,
            });
        }
        match reason {
            // Break-glass is a person's decision in an emergency, never an app's.
            Some(r) if p.has(Permission::BreakGlass) && p.smart().is_none() => {
                if r.chars().count() < MIN_REASON {
                    return Err(ApiError::field(
                        "X-Break-Glass-Reason",
                        "must state the reason in at least 10 characters",
                    ));
                }
                Ok(Self {
                    principal: p,
                    break_glass: Some(r.chars().take(500).collect()),
                })
            }
            _ => Err(ApiError::new(ErrorCode::Forbidden)),
        }
    }

    /// A patient account reading its own record: the callers confine the request to
    /// that record first (the FHIR limit, the `/api/v1/me` routes). No break-glass, no
    /// full SSN.
    pub fn own(p: Principal) -> Self {
        Self {
            principal: p,
            break_glass: None,
        }
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Whether this is a break-glass access (restrictions give way, flagged).
    pub fn break_glass(&self) -> bool {
        self.break_glass.is_some()
    }

    pub fn sees_ssn(&self) -> bool {
        self.principal.has(Permission::PhiSsn)
    }

    /// When this is a break-glass access: marks the request's events as break-glass, adds
    /// the `break_glass` event naming the patient (which the security rules raise), and
    /// logs it. Every route a break-glass reader can reach calls this once.
    pub fn flag(
        &self,
        audit: &Audit,
        resource_type: &'static str,
        resource_id: Option<&str>,
        patient_id: Option<&str>,
    ) {
        if let Some(reason) = &self.break_glass {
            audit.annotate(|a| {
                a.break_glass = true;
                a.reason = Some(reason.clone());
            });
            audit.touch_patient(Action::BreakGlass, resource_type, resource_id, patient_id);
            tracing::warn!(target: "custodian::security", user_id = %self.principal.user_id, "security event: break-glass access to PHI");
        }
    }
}

/// Reading patients: `patients:read`, or break-glass.
pub struct PatientReader(pub PhiReader);
/// Reading records: `records:read`, or break-glass.
pub struct RecordReader(PhiReader);

impl FromRequestParts<AppState> for PatientReader {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let auth = Authorized::<need::Enrolled>::from_request_parts(parts, state).await?;
        PhiReader::check(auth.0, Permission::PatientsRead, &parts.headers).map(PatientReader)
    }
}

impl FromRequestParts<AppState> for RecordReader {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let auth = Authorized::<need::Enrolled>::from_request_parts(parts, state).await?;
        PhiReader::check(auth.0, Permission::RecordsRead, &parts.headers).map(RecordReader)
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ViewQuery {
    /// The de-identified view (HIPAA Safe Harbor): no identifier, ids replaced by
    /// pseudonyms.
    #[serde(default)]
    anonymize: Option<bool>,
}

/// A patient as this caller may see them. The de-identified view follows Safe Harbor
/// (§164.514(b)(2)) for every field a patient has: names redacted; SSN, email, phone,
/// address, MRN and the record's own dates removed; the birth date reduced to its year,
/// or `90+` over 89; the id replaced by a pseudonym.
pub(crate) fn patient_view(
    state: &AppState,
    p: &Patient,
    sees_ssn: bool,
    anonymize: bool,
) -> PatientView {
    let f = &p.fields;
    if anonymize {
        let today = state.clock().now().date();
        let birth = super::model::parse_date(&f.birth_date);
        let age = birth.map(|b| super::model::age_on(b, today));
        return PatientView {
            id: state.patients().pseudonym(&p.id),
            mrn: None,
            given_name: "REDACTED".into(),
            family_name: "REDACTED".into(),
            birth_date: match (age, birth) {
                (Some(a), _) if a > 89 => "90+".into(),
                (_, Some(b)) => b.year().to_string(),
                _ => "REDACTED".into(),
            },
            sex: f.sex.clone(),
            ssn: None,
            email: None,
            phone: None,
            address: None,
            created_at: None,
            updated_at: None,
        };
    }
    PatientView {
        id: p.id.clone(),
        mrn: Some(f.mrn.clone()),
        given_name: f.given_name.clone(),
        family_name: f.family_name.clone(),
        birth_date: f.birth_date.clone(),
        sex: f.sex.clone(),
        ssn: f
            .ssn
            .as_deref()
            .map(|s| if sees_ssn { s.to_owned() } else { mask_ssn(s) }),
        email: f.email.clone(),
        phone: f.phone.clone(),
        address: f.address.clone(),
        created_at: Some(p.created_at.clone()),
        updated_at: Some(p.updated_at.clone()),
    }
}

pub(crate) fn record_view(state: &AppState, r: &Record, anonymize: bool) -> RecordView {
    if anonymize {
        return RecordView {
            id: state.patients().pseudonym(&r.id),
            patient_id: state.patients().pseudonym(&r.patient_id),
            diagnosis: "REDACTED".into(),
            treatment: r.treatment.as_ref().map(|_| "REDACTED".into()),
            notes: r.notes.as_ref().map(|_| "REDACTED".into()),
            recorded_at: r.recorded_at.get(..4).unwrap_or("").to_owned(),
            created_at: None,
            updated_at: None,
            labels: r.labels.clone(),
        };
    }
    RecordView {
        id: r.id.clone(),
        patient_id: r.patient_id.clone(),
        diagnosis: r.diagnosis.clone(),
        treatment: r.treatment.clone(),
        notes: r.notes.clone(),
        recorded_at: r.recorded_at.clone(),
        created_at: Some(r.created_at.clone()),
        updated_at: Some(r.updated_at.clone()),
        labels: r.labels.clone(),
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"v{version}\"")).unwrap_or(HeaderValue::from_static("\"v0\""))
}

fn with_etag(status: StatusCode, version: i64, body: impl Serialize) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(header::ETAG, etag(version));
    r
}

/// Says what the request is about: the action, the resource (`id` the resource's own id;
/// none for a list or a resource not made yet) and the patient.
fn touch(
    audit: &Audit,
    action: Action,
    resource: &'static str,
    id: Option<&str>,
    patient_id: &str,
) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some(resource);
        a.resource_id = id.map(str::to_owned);
        a.patient_id = Some(patient_id.to_owned());
    });
}

/// What a request to these routes was about when it was refused before its handler ran
/// (no token, no permission, a bad body): the same action, resource and patient the
/// handler would have recorded, so that a refused read still names its patient. A
/// record's patient is looked up; ids that are not well-formed are not recorded.
pub struct PhiSubjects(pub Patients);

impl Subjects for PhiSubjects {
    fn about<'a>(
        &'a self,
        method: &'a str,
        route: &'a str,
        path: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Annotation>> + Send + 'a>> {
        Box::pin(async move {
            let id = path_param(route, path, "id")
                .filter(|id| SafeId::new(id).is_some())
                .map(str::to_owned);
            let mut a = Annotation {
                action: Some(action_of(method)),
                ..Annotation::default()
            };
            match route {
                "/api/v1/patients" => {
                    if method == "GET" {
                        a.action = Some(Action::Search);
                    }
                    a.resource_type = Some("patient");
                }
                "/api/v1/patients/{id}" => {
                    a.resource_type = Some("patient");
                    a.resource_id.clone_from(&id);
                    a.patient_id = id;
                }
                "/api/v1/patients/{id}/records" => {
                    a.resource_type = Some("record");
                    a.patient_id = id;
                }
                "/api/v1/records/{id}" => {
                    a.resource_type = Some("record");
                    if let Some(id) = &id {
                        a.patient_id = self.0.record_patient(id).await.ok();
                    }
                    a.resource_id = id;
                }
                "/api/v1/patients/{id}/disclosures" => {
                    a.resource_type = Some("disclosures");
                    if let Some(id) = &id {
                        a.context.insert("patient_id", ContextValue::id(id));
                    }
                }
                _ => return None,
            }
            Some(a)
        })
    }
}

/// What a de-identified cursor of the patient list pages.
const PATIENT_PAGES: &str = "patients";

/// Where a page starts. An identified page's cursor is the last id of the page before;
/// a de-identified page's is sealed ([`super::Patients::deid_cursor`]), and it continues
/// only from such a cursor of the same `scope`, never from a real id.
fn page_after(
    state: &AppState,
    cursor: Option<&str>,
    anonymize: bool,
    scope: &str,
) -> Result<String, ApiError> {
    match cursor {
        None => Ok(String::new()),
        Some(c) if !anonymize => Ok(c.to_owned()),
        Some(c) => state.patients().open_deid_cursor(scope, c).ok_or_else(|| {
            ApiError::field(
                "cursor",
                "is not the cursor of a previous de-identified page",
            )
        }),
    }
}

/// The cursor after `last` (the last row of a page that has more): the id itself, or,
/// for a de-identified page, the id sealed so that the answer carries no real id.
fn next_cursor(
    state: &AppState,
    last: Option<&str>,
    anonymize: bool,
    scope: &str,
) -> Result<Option<String>, ApiError> {
    Ok(match last {
        None => None,
        Some(id) if !anonymize => Some(id.to_owned()),
        Some(id) => Some(state.patients().deid_cursor(scope, id)?),
    })
}

#[derive(Serialize, ToSchema)]
pub struct PatientPage {
    items: Vec<PatientView>,
    next_cursor: Option<String>,
    /// With `q` only: more than 100 patients matched, so this is the one page of the
    /// answer (the best ranked) and there is no next. Narrow the search (more of the
    /// name, the birth date).
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PatientQuery {
    /// What a person would type: an MRN, an SSN (needs `phi:ssn`: without it an
    /// SSN-shaped word is a 403 `forbidden`), a birth date (`1961-07-04`, `07/04/1961`,
    /// `4 Jul 1961`, …), or names in either order (`Jane Doe`, `Doe, Jane`), each word
    /// whole or its first 3 letters or more, with a birth date if wished. Every name
    /// word and date must match. By relevance then name, through at most 100 matches
    /// (more: one page, `truncated`).
    #[param(inline)]
    q: Option<Text<200>>,
    #[param(inline)]
    limit: Option<Limit<100, 20>>,
    cursor: Option<String>,
    #[serde(default)]
    anonymize: Option<bool>,
}

/// Search patients (`patients:read`; break-glass does not open a list or a search). The
/// search's one audit event names every patient returned (`patient_ids` in its context);
/// the patient filter of the audit events and the accounting of disclosures find it under
/// each of them.
#[utoipa::path(get, path = "/api/v1/patients", tag = "patients", security(("bearer" = ["patients:read"])),
    params(PatientQuery), responses((status = 200, body = PatientPage),
        (status = 403, description = "forbidden: no `patients:read`, or an SSN as `q` without `phi:ssn`"),
        (status = 422, description = "validation_error")))]
pub async fn list_patients(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::PatientsRead>,
    QueryParams(q): QueryParams<PatientQuery>,
) -> Result<Json<PatientPage>, ApiError> {
    let limit = q.limit.unwrap_or_default().get();
    audit.annotate(|a| {
        a.action = Some(Action::Search);
        a.resource_type = Some("patient");
    });
    // Without `phi:ssn` an SSN is no search key: whether a search by it finds someone
    // would tell whose SSN it is. Refused on its shape alone, before any lookup.
    let by_ssn = auth.has(Permission::PhiSsn);
    if !by_ssn
        && q.q.as_ref().is_some_and(|t| {
            t.as_str()
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(ssn_shaped)
        })
    {
        return Err(ApiError::new(ErrorCode::Forbidden)
            .with_detail("Searching by SSN needs the phi:ssn permission."));
    }
    let anonymize = q.anonymize.unwrap_or(false);
    let text = q.q.as_ref().map(|t| t.as_str().trim()).unwrap_or("");
    let (found, next_cursor, truncated) = if text.is_empty() {
        // Every patient, by id.
        let after = page_after(&state, q.cursor.as_deref(), anonymize, PATIENT_PAGES)?;
        let mut found = state.patients().list(&after, i64::from(limit) + 1).await?;
        let more = found.len() > limit as usize;
        found.truncate(limit as usize);
        let last = found.last().filter(|_| more).map(|p| p.id.as_str());
        let next = next_cursor(&state, last, anonymize, PATIENT_PAGES)?;
        (found, next, None)
    } else {
        // A ranked search: its cursor is the next page's place in the ranking, sealed to
        // this very search (and caller's view), so it carries no id.
        let scope = format!("search|{anonymize}|{by_ssn}|{text}");
        let offset = match q.cursor.as_deref() {
            None => 0,
            Some(c) => state
                .patients()
                .open_deid_cursor(&scope, c)
                .and_then(|o| o.parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::field(
                        "cursor",
                        "is not the cursor of a previous page of this search",
                    )
                })?,
        };
        let found = state
            .patients()
            .find(text, by_ssn, anonymize, offset, limit as usize)
            .await?;
        let next = found
            .next_offset
            .map(|o| state.patients().deid_cursor(&scope, &o.to_string()))
            .transpose()?;
        (found.patients, next, Some(found.truncated))
    };
    audit.context("count", ContextValue::Int(found.len() as i64));
    audit.name_patients(Action::Read, found.iter().map(|p| p.id.as_str()));
    Ok(Json(PatientPage {
        next_cursor,
        truncated,
        items: found
            .iter()
            .map(|p| patient_view(&state, p, by_ssn, anonymize))
            .collect(),
    }))
}

/// Register a patient (`patients:write`).
#[utoipa::path(post, path = "/api/v1/patients", tag = "patients", security(("bearer" = ["patients:write"])),
    request_body = NewPatient,
    responses((status = 201, body = PatientView), (status = 409, description = "MRN taken"), (status = 422, description = "validation_error")))]
pub async fn create_patient(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::PatientsWrite>,
    JsonBody(input): JsonBody<NewPatient>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("patient");
    });
    let p = state.patients().create(input).await?;
    touch(&audit, Action::Create, "patient", Some(&p.id), &p.id);
    Ok(with_etag(
        StatusCode::CREATED,
        p.version,
        patient_view(&state, &p, auth.has(Permission::PhiSsn), false),
    ))
}

/// One patient (`patients:read`, or break-glass with `X-Break-Glass-Reason`).
#[utoipa::path(get, path = "/api/v1/patients/{id}", tag = "patients", security(("bearer" = ["patients:read"])),
    params(("id" = String, Path), ViewQuery,
        ("X-Break-Glass-Reason" = Option<String>, Header, description = "Emergency access: the reason (at least 10 characters); needs `breakglass`")),
    responses((status = 200, body = PatientView), (status = 404, description = "not_found")))]
pub async fn get_patient(
    State(state): State<AppState>,
    audit: Audit,
    PatientReader(reader): PatientReader,
    Path(id): Path<String>,
    QueryParams(v): QueryParams<ViewQuery>,
) -> Result<Response, ApiError> {
    touch(&audit, Action::Read, "patient", Some(&id), &id);
    reader.flag(&audit, "patient", Some(&id), Some(&id));
    let p = state.patients().get(&id).await?;
    Ok(with_etag(
        StatusCode::OK,
        p.version,
        patient_view(&state, &p, reader.sees_ssn(), v.anonymize.unwrap_or(false)),
    ))
}

/// Change a patient (`patients:write`); `If-Match` with the `ETag` read → 412 when changed since.
#[utoipa::path(patch, path = "/api/v1/patients/{id}", tag = "patients", security(("bearer" = ["patients:write"])),
    params(("id" = String, Path)), request_body = PatientPatch,
    responses((status = 200, body = PatientView), (status = 412, description = "precondition_failed"), (status = 422, description = "validation_error")))]
pub async fn patch_patient(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::PatientsWrite>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<PatientPatch>,
) -> Result<Response, ApiError> {
    touch(&audit, Action::Update, "patient", Some(&id), &id);
    let p = state
        .patients()
        .update(
            &id,
            patch,
            crate::http::headers::if_match_version(&headers)?,
        )
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        p.version,
        patient_view(&state, &p, auth.has(Permission::PhiSsn), false),
    ))
}

/// Delete a patient (`patients:write`): soft delete; the data stays sealed for retention.
#[utoipa::path(delete, path = "/api/v1/patients/{id}", tag = "patients", security(("bearer" = ["patients:write"])),
    params(("id" = String, Path)), responses((status = 204, description = "Deleted"), (status = 404, description = "not_found")))]
pub async fn delete_patient(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::PatientsWrite>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    touch(&audit, Action::Delete, "patient", Some(&id), &id);
    state.patients().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct RecordPage {
    items: Vec<RecordView>,
    next_cursor: Option<String>,
    /// How many of the patient's records are withheld at the patient's request (absent
    /// when none): they are in no page, and no count says what they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    withheld: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecordQuery {
    #[param(inline)]
    limit: Option<Limit<200, 50>>,
    cursor: Option<String>,
    #[serde(default)]
    anonymize: Option<bool>,
}

/// A patient's records (`records:read`, or break-glass).
#[utoipa::path(get, path = "/api/v1/patients/{id}/records", tag = "records", security(("bearer" = ["records:read"])),
    params(("id" = String, Path), RecordQuery), responses((status = 200, body = RecordPage)))]
pub async fn list_records(
    State(state): State<AppState>,
    audit: Audit,
    RecordReader(reader): RecordReader,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<RecordQuery>,
) -> Result<Json<RecordPage>, ApiError> {
    let limit = q.limit.unwrap_or_default().get();
    // A list: the patient's id is `patient_id`; no one record is the resource.
    touch(&audit, Action::Read, "record", None, &id);
    reader.flag(&audit, "record", None, Some(&id));
    let anonymize = q.anonymize.unwrap_or(false);
    // A de-identified cursor pages one patient's records only.
    let scope = format!("records/{id}");
    let after = page_after(&state, q.cursor.as_deref(), anonymize, &scope)?;
    let screen =
        crate::privacy::screen_for(&state, reader.principal(), &id, reader.break_glass()).await?;
    let (mut rows, withheld) = if screen.withholds() {
        // Withheld records are taken out before paging: full pages, and a count over
        // the patient's records whatever the page.
        let all = state.patients().records(&id, "", 100_000).await?;
        let before = all.len();
        let visible: Vec<Record> = all
            .into_iter()
            .filter(|r| !screen.hides(&r.labels))
            .collect();
        let withheld = before - visible.len();
        let rows: Vec<Record> = visible
            .into_iter()
            .filter(|r| r.id.as_str() > after.as_str())
            .take(limit as usize + 1)
            .collect();
        (rows, Some(withheld).filter(|n| *n > 0))
    } else {
        let rows = state
            .patients()
            .records(&id, &after, i64::from(limit) + 1)
            .await?;
        (rows, None)
    };
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    audit.context("count", ContextValue::Int(rows.len() as i64));
    if let Some(n) = withheld {
        audit.context("withheld", ContextValue::Int(n as i64));
    }
    if rows.iter().any(|r| screen.overridden(&r.labels)) {
        audit.context("restriction_overridden", ContextValue::Bool(true));
    }
    let last = rows.last().filter(|_| more).map(|r| r.id.as_str());
    Ok(Json(RecordPage {
        withheld,
        next_cursor: next_cursor(&state, last, anonymize, &scope)?,
        items: rows
            .iter()
            .map(|r| record_view(&state, r, anonymize))
            .collect(),
    }))
}

/// Add a record to a patient (`records:write`).
#[utoipa::path(post, path = "/api/v1/patients/{id}/records", tag = "records", security(("bearer" = ["records:write"])),
    params(("id" = String, Path)), request_body = NewRecord,
    responses((status = 201, body = RecordView), (status = 404, description = "not_found"), (status = 422, description = "validation_error")))]
pub async fn create_record(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::RecordsWrite>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<NewRecord>,
) -> Result<Response, ApiError> {
    // The record has no id until it is made (then it is the resource).
    touch(&audit, Action::Create, "record", None, &id);
    let r = state.patients().add_record(&id, input).await?;
    audit.annotate(|a| a.resource_id = Some(r.id.clone()));
    Ok(with_etag(
        StatusCode::CREATED,
        r.version,
        record_view(&state, &r, false),
    ))
}

/// One record (`records:read`, or break-glass).
#[utoipa::path(get, path = "/api/v1/records/{id}", tag = "records", security(("bearer" = ["records:read"])),
    params(("id" = String, Path), ViewQuery), responses((status = 200, body = RecordView), (status = 404, description = "not_found")))]
pub async fn get_record(
    State(state): State<AppState>,
    audit: Audit,
    RecordReader(reader): RecordReader,
    Path(id): Path<String>,
    QueryParams(v): QueryParams<ViewQuery>,
) -> Result<Response, ApiError> {
    let patient = state.patients().record_patient(&id).await;
    reader.flag(&audit, "record", Some(&id), patient.as_deref().ok());
    let patient = patient?;
    touch(&audit, Action::Read, "record", Some(&id), &patient);
    let r = state.patients().record(&id).await?;
    let screen =
        crate::privacy::screen_for(&state, reader.principal(), &patient, reader.break_glass())
            .await?;
    if screen.hides(&r.labels) {
        audit.context("withheld", ContextValue::Int(1));
        return Err(ApiError::new(ErrorCode::Withheld));
    }
    if screen.overridden(&r.labels) {
        audit.context("restriction_overridden", ContextValue::Bool(true));
    }
    Ok(with_etag(
        StatusCode::OK,
        r.version,
        record_view(&state, &r, v.anonymize.unwrap_or(false)),
    ))
}

/// Change a record (`records:write`); `If-Match` → 412 when changed since.
#[utoipa::path(patch, path = "/api/v1/records/{id}", tag = "records", security(("bearer" = ["records:write"])),
    params(("id" = String, Path)), request_body = RecordPatch,
    responses((status = 200, body = RecordView), (status = 412, description = "precondition_failed")))]
pub async fn patch_record(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::RecordsWrite>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<RecordPatch>,
) -> Result<Response, ApiError> {
    let patient = state.patients().record_patient(&id).await?;
    touch(&audit, Action::Update, "record", Some(&id), &patient);
    let before = record_not_withheld(&state, &auth, &id, &patient).await?;
    let r = state
        .patients()
        .update_record(
            &id,
            patch,
            crate::http::headers::if_match_version(&headers)?,
        )
        .await?;
    // Taking a label off opens the record to everyone the patient kept out: said.
    let removed = before.iter().filter(|l| !r.labels.contains(l)).count();
    if removed > 0 {
        audit.context("labels_removed", ContextValue::Int(removed as i64));
    }
    Ok(with_etag(
        StatusCode::OK,
        r.version,
        record_view(&state, &r, false),
    ))
}

/// Delete a record (`records:write`; soft delete).
#[utoipa::path(delete, path = "/api/v1/records/{id}", tag = "records", security(("bearer" = ["records:write"])),
    params(("id" = String, Path)), responses((status = 204, description = "Deleted")))]
pub async fn delete_record(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::RecordsWrite>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let patient = state.patients().record_patient(&id).await?;
    touch(&audit, Action::Delete, "record", Some(&id), &patient);
    record_not_withheld(&state, &auth, &id, &patient).await?;
    state.patients().delete_record(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A record someone changes or deletes must not be one withheld from them. Answers
/// its labels.
async fn record_not_withheld(
    state: &AppState,
    p: &Principal,
    id: &str,
    patient: &str,
) -> Result<Vec<String>, ApiError> {
    let r = state.patients().record(id).await?;
    if crate::privacy::screen_for(state, p, patient, false)
        .await?
        .hides(&r.labels)
    {
        return Err(ApiError::new(ErrorCode::Withheld));
    }
    Ok(r.labels)
}

#[derive(Serialize, ToSchema)]
pub struct Disclosure {
    pub(crate) at: String,
    pub(crate) actor_id: Option<String>,
    pub(crate) actor: Option<String>,
    pub(crate) action: String,
    pub(crate) resource_type: Option<String>,
    pub(crate) resource_id: Option<String>,
    /// The break-glass reason, or what was done.
    pub(crate) purpose: String,
    pub(crate) break_glass: bool,
    pub(crate) request_id: Option<String>,
    /// The SMART app (client id) that received the data, when an app made the request.
    pub(crate) app: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DisclosurePage {
    pub(crate) items: Vec<Disclosure>,
    pub(crate) next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DisclosureQuery {
    #[param(inline)]
    limit: Option<Limit<500, 100>>,
    cursor: Option<String>,
}

/// The accounting of disclosures of a patient (HIPAA §164.528): who read or exported
/// their data, when and why, over the last six years (`audit:read`).
#[utoipa::path(get, path = "/api/v1/patients/{id}/disclosures", tag = "patients", security(("bearer" = ["audit:read"])),
    params(("id" = String, Path), DisclosureQuery), responses((status = 200, body = DisclosurePage)))]
pub async fn disclosures(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<DisclosureQuery>,
) -> Result<Json<DisclosurePage>, ApiError> {
    let limit = q.limit.unwrap_or_default().get();
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("disclosures");
        // Reading the accounting is not itself a disclosure of the patient's data.
        a.context.insert("patient_id", ContextValue::id(&id));
    });
    Ok(Json(
        accounting(&state, &id, q.cursor.as_deref(), limit).await?,
    ))
}

/// The accounting of disclosures of a patient: the audited accesses that disclosed their
/// data over the last six years, newest first, a page at a time (the API and the chart).
pub(crate) async fn accounting(
    state: &AppState,
    id: &str,
    cursor: Option<&str>,
    limit: u32,
) -> Result<DisclosurePage, ApiError> {
    accounting_for(state, id, cursor, limit, None).await
}

/// [`accounting`], leaving out what user `exclude_own` did without an app (the
/// patient's own view of it: their own reads are not disclosures).
pub(crate) async fn accounting_for(
    state: &AppState,
    id: &str,
    cursor: Option<&str>,
    limit: u32,
    exclude_own: Option<&str>,
) -> Result<DisclosurePage, ApiError> {
    let six_years = time::Duration::days(6 * 365 + 2);
    let filter = crate::audit::store::Filter {
        patient_id: Some(id.to_owned()),
        since: Some(crate::clock::timestamp(state.clock().now() - six_years)),
        before_seq: cursor.and_then(crate::audit::service::decode_cursor),
        // What was disclosed: a refused, failed or erroring request disclosed nothing,
        // and a grant or a token names its patient but discloses nothing (the app's
        // reads do, and are listed with the app). Filtered in the query: a page is full.
        disclosed_only: true,
        exclude_own: exclude_own.map(str::to_owned),
        ..Default::default()
    };
    let page = state.audit().page(&filter, limit).await?;
    let items = page
        .items
        .into_iter()
        .map(|e| Disclosure {
            app: serde_json::from_str::<serde_json::Value>(&e.context)
                .ok()
                .and_then(|c| {
                    c.get("client_id")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                }),
            purpose: e.reason.clone().unwrap_or_else(|| e.action.clone()),
            at: e.at,
            actor_id: e.actor_id,
            actor: e.actor,
            action: e.action,
            resource_type: e.resource_type,
            resource_id: e.resource_id,
            break_glass: e.break_glass,
            request_id: e.request_id,
        })
        .collect();
    Ok(DisclosurePage {
        items,
        next_cursor: page.next_cursor,
    })
}
