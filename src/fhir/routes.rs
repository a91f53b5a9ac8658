//! HTTP for FHIR at `/fhir`: the interactions, Bundles, the CapabilityStatement. Every
//! read names its patient in the audit trail before the answer leaves (the activity
//! middleware waits for the commit); a search names every patient it returns. Errors
//! are `ApiError`s like everywhere else; `outcome::middleware` turns them into
//! OperationOutcomes under `/fhir`.

use std::collections::BTreeSet;

use crate::http::path::Path;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::resources::{ResourceType, params_of};
use super::search::{self, Query};
use super::service::{Entry, Fhir, FhirError, Outcome, Resource, View, fhir_instant};
use crate::access::{Authorized, Permission, Principal, need};
use crate::app::AppState;
use crate::audit::middleware::{Annotation, Subjects, action_of};
use crate::audit::model::SafeId;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::{ApiError, ErrorCode};
use crate::oauth::scopes::{Ops, Permit};
use crate::privacy::Screen;
use crate::records::routes::PhiReader;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
const NDJSON: &str = "application/fhir+ndjson";

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        match e {
            FhirError::NotFound => {
                ApiError::new(ErrorCode::NotFound).with_detail("There is no such resource.")
            }
            FhirError::Gone => ApiError::new(ErrorCode::Gone),
            FhirError::Invalid(errors) => ApiError::validation(errors),
            FhirError::BadRequest(m) => ApiError::new(ErrorCode::BadRequest).with_detail(m),
            FhirError::Conflict(m) => ApiError::new(ErrorCode::Conflict).with_detail(m),
            FhirError::PreconditionFailed => ApiError::new(ErrorCode::PreconditionFailed),
            FhirError::Phi(e) => ApiError::from(e),
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir", post(transaction))
        .route("/fhir/{type}", get(search_get).post(create))
        .route("/fhir/{type}/_search", post(search_post))
        .route("/fhir/{type}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{type}/{id}/_history/{vid}", get(vread))
        .route("/fhir/{type}/{id}/{op}", get(operation))
}

/// Whether `_format` asks for JSON.
pub fn json_format(v: &str) -> bool {
    matches!(
        v,
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir"
    )
}

fn resource_type(s: &str) -> Result<ResourceType, ApiError> {
    ResourceType::parse(s).ok_or_else(|| {
        ApiError::new(ErrorCode::NotFound).with_detail(format!(
            "This server serves {}; not this type.",
            ResourceType::ALL.map(ResourceType::as_str).join(", ")
        ))
    })
}

fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The query of a read: only `_format` and `_anonymize`.
fn read_options(raw: Option<&str>) -> Result<bool, ApiError> {
    let mut anonymize = false;
    for (k, v) in pairs(raw) {
        match k.as_str() {
            "_format" if json_format(&v) => {}
            "_format" => return Err(not_acceptable()),
            "_anonymize" => anonymize = v == "true",
            _ => {
                return Err(ApiError::new(ErrorCode::BadRequest)
                    .with_detail(format!("the parameter {k} is not supported here")));
            }
        }
    }
    Ok(anonymize)
}

fn not_acceptable() -> ApiError {
    ApiError::new(ErrorCode::NotAcceptable)
}

/// The base URL of this FHIR server: `fhir.base_url`, else from the request's host.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(b) = &state.config().fhir.base_url {
        return b.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        })
        .unwrap_or("localhost");
    let scheme = if state.config().serves_tls() || state.config().server.behind_tls_proxy {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}/fhir")
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    fhir_text(status, body.to_string())
}

fn fhir_text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

fn with_version(mut r: Response, version: i64, last_updated: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    if let Some(t) = http_date(last_updated)
        && let Ok(v) = HeaderValue::from_str(&t)
    {
        r.headers_mut().insert(header::LAST_MODIFIED, v);
    }
    r
}

fn http_date(stored: &str) -> Option<String> {
    let t =
        time::OffsetDateTime::parse(stored, &time::format_description::well_known::Rfc3339).ok()?;
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).ok()
}

/// The body of a write: JSON (`application/fhir+json` or `application/json`), one object.
fn body_json(
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    if !matches!(
        ct.as_deref(),
        Some("application/fhir+json" | "application/json" | "application/json+fhir")
    ) {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType)
            .with_detail("Send the resource as application/fhir+json."));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(ErrorCode::BadRequest)
            .with_detail("The body must be one JSON object (a resource).")),
        Err(e) => Err(ApiError::new(ErrorCode::BadRequest).with_detail(format!(
            "The body is not JSON (line {}, column {}).",
            e.line(),
            e.column()
        ))),
    }
}

/// Takes `resourceType` and `id` out of a resource body; the type must be `t`.
pub fn split_resource(
    t: ResourceType,
    mut m: serde_json::Map<String, Value>,
    at: &str,
) -> Result<(Option<String>, Value), ApiError> {
    match m.remove("resourceType") {
        Some(Value::String(s)) if s == t.as_str() => {}
        _ => {
            return Err(ApiError::field(
                format!("{at}resourceType"),
                format!("must be {}", t.as_str()),
            ));
        }
    }
    let id = match m.remove("id") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::field(format!("{at}id"), "must be a string")),
    };
    Ok((id, Value::Object(m)))
}

/// Who may do what to a type on this request.
fn require(p: &Principal, permission: Permission) -> Result<(), ApiError> {
    if p.has(permission) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Forbidden).with_detail(format!(
            "This needs the {} permission.",
            permission.as_str()
        )))
    }
}

// ---- SMART apps: what a token's grant confines a request to ---------------------------

/// The confinement of a SMART app's request (none for a person's own credential).
struct AppLimit {
    /// `patient/` scopes: only this patient's compartment.
    patient: Option<String>,
    /// Granular scopes: only these categories.
    categories: Option<Vec<super::resources::Token>>,
}

fn outside_grant(detail: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::new(ErrorCode::Forbidden).with_detail(detail)
}

/// The confinement of this request: a SMART app's grant (see [`app_limit`]) and, for a
/// patient account, its own compartment, read only, whatever the credential. A patient
/// account has no permission: [`PhiReader::own`] lets it read only under this limit.
fn limit(p: &Principal, t: ResourceType, op: Ops) -> Result<Option<AppLimit>, ApiError> {
    let app = app_limit(p, t, op)?;
    let Some(me) = &p.patient else {
        return Ok(app);
    };
    if op != Ops::R && op != Ops::S {
        return Err(ApiError::new(ErrorCode::Forbidden).with_detail(
            "A patient account reads its own record; a correction is asked for as an amendment.",
        ));
    }
    let mut l = app.unwrap_or(AppLimit {
        patient: None,
        categories: None,
    });
    match &l.patient {
        Some(other) if other != me => {
            return Err(outside_grant(
                "A patient account reaches only its own record.",
            ));
        }
        _ => l.patient = Some(me.clone()),
    }
    Ok(Some(l))
}

/// Who reads PHI on this request: a patient account under its [`limit`] (the caller has
/// confined the request to the patient's own compartment), anyone else by permission or
/// break-glass.
fn reader(
    p: Principal,
    permission: Permission,
    headers: &HeaderMap,
    limit: &Option<AppLimit>,
) -> Result<PhiReader, ApiError> {
    match (&p.patient, limit) {
        (Some(me), Some(l)) if l.patient.as_deref() == Some(me.as_str()) => Ok(PhiReader::own(p)),
        (Some(_), _) => Err(ApiError::new(ErrorCode::Forbidden)),
        (None, _) => PhiReader::check(p, permission, headers),
    }
}

/// The patient's restrictions as they apply to this request (see `privacy`).
async fn screen(
    state: &AppState,
    p: &Principal,
    patient: &str,
    break_glass: bool,
) -> Result<Screen, ApiError> {
    Ok(crate::privacy::screen_for(state, p, patient, break_glass).await?)
}

/// The stored resource someone updates or deletes, read once: it must not be one
/// withheld from them (the answer would echo it, and a change would be blind); and an
/// update (`body`) keeps the labels it carries — labels stick, so a PUT that leaves
/// `meta.security` out does not declassify it for everyone the patient kept out (adding
/// a label is a PUT; a label set by mistake goes with the resource: delete it and write
/// it again).
async fn guard_stored(
    state: &AppState,
    p: &Principal,
    t: ResourceType,
    id: &str,
    body: Option<&mut Value>,
) -> Result<(), ApiError> {
    if t == ResourceType::Patient {
        return Ok(());
    }
    let old = match state.fhir().read(t, id).await {
        Ok(r) => r,
        Err(FhirError::NotFound | FhirError::Gone) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let labels = old.labels();
    // An unlabelled resource withholds nothing: no lookup of restrictions.
    if labels.is_empty() {
        return Ok(());
    }
    if screen(state, p, &old.patient_id, false)
        .await?
        .hides(&labels)
    {
        return Err(ApiError::new(ErrorCode::Withheld));
    }
    let Some(meta) = body
        .and_then(Value::as_object_mut)
        .map(|o| o.entry("meta").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    else {
        return Ok(());
    };
    if let Value::Array(list) = meta.entry("security").or_insert_with(|| json!([])) {
        let have = crate::privacy::labels_in(&Value::Array(list.clone()));
        for l in labels.iter().filter(|l| !have.contains(l)) {
            list.push(json!({"system": crate::privacy::ACT_CODE, "code": l}));
        }
    }
    Ok(())
}

/// The entry a searchset or export carries when the screen withheld `n` resources:
/// an OperationOutcome (`suppressed`) with the count, never the category.
fn withheld_entry(n: usize) -> Value {
    json!({
        "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "information",
                "code": "suppressed",
                "diagnostics": crate::privacy::withheld_text(n),
            }],
        },
        "search": {"mode": "outcome"},
    })
}

/// Marks a bundle something was withheld from (`meta.security` REDACTED).
fn mark_redacted(b: &mut Value) {
    b["meta"]["security"] = json!([{
        "system": crate::privacy::OBSERVATION_VALUE,
        "code": "REDACTED",
        "display": "redacted",
    }]);
}

/// What the app's scopes allow of interaction `op` on `t`; an error when nothing. The
/// role's permissions are checked as for everyone: the access is the intersection.
fn app_limit(p: &Principal, t: ResourceType, op: Ops) -> Result<Option<AppLimit>, ApiError> {
    let Some(app) = p.smart() else {
        return Ok(None);
    };
    match app.scopes.permit(t.as_str(), op) {
        Permit::Denied => Err(outside_grant(format!(
            "The app's grant does not allow to {} {}.",
            match op {
                o if o == Ops::C => "create",
                o if o == Ops::U => "update",
                o if o == Ops::D => "delete",
                o if o == Ops::S => "search",
                _ => "read",
            },
            t.as_str()
        ))),
        Permit::Allowed {
            patient_only,
            categories,
        } => {
            let patient = if patient_only {
                Some(app.patient.clone().ok_or_else(|| {
                    outside_grant("The app's grant has patient/ scopes but no launch patient.")
                })?)
            } else {
                None
            };
            Ok(Some(AppLimit {
                patient,
                categories: categories.map(|c| {
                    c.into_iter()
                        .map(|c| super::resources::Token {
                            system: c.system,
                            code: Some(c.code),
                        })
                        .collect()
                }),
            }))
        }
    }
}

impl AppLimit {
    /// A resource of patient `of` (for a Patient: its own id) is within the grant.
    fn patient_ok(&self, of: Option<&str>) -> Result<(), ApiError> {
        match &self.patient {
            Some(p) if of != Some(p.as_str()) => Err(outside_grant(
                "The app's grant reaches only its launch patient's data.",
            )),
            _ => Ok(()),
        }
    }

    fn resource_ok(&self, r: &Resource) -> Result<(), ApiError> {
        let of = if r.t == ResourceType::Patient {
            r.id.as_str()
        } else {
            r.patient_id.as_str()
        };
        self.patient_ok(Some(of))?;
        match &self.categories {
            Some(c) if !super::service::in_categories(r, c) => Err(outside_grant(
                "The app's grant reaches only some categories of this type.",
            )),
            _ => Ok(()),
        }
    }

    /// A search confined to the grant: the launch patient (`_id` for Patient), the
    /// granted categories (AND'ed with any the app asked for).
    fn confine(
        &self,
        t: ResourceType,
        mut pairs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let base = |k: &str| k.split(':').next().unwrap_or_default().to_owned();
        if let Some(p) = &self.patient {
            if t == ResourceType::Patient {
                let ids: Vec<&str> = pairs
                    .iter()
                    .filter(|(k, _)| base(k) == "_id")
                    .flat_map(|(_, v)| v.split(','))
                    .collect();
                if ids.iter().any(|i| i != p) {
                    return Err(outside_grant(
                        "The app's grant reaches only its launch patient.",
                    ));
                }
                if ids.is_empty() {
                    pairs.push(("_id".into(), p.clone()));
                }
            } else if !pairs.iter().any(|(k, _)| base(k) == "patient") {
                pairs.push(("patient".into(), p.clone()));
            }
        }
        if let Some(cats) = &self.categories {
            if !params_of(t).iter().any(|s| s.name == "category") {
                return Err(outside_grant(format!(
                    "The app's grant reaches only some categories, and {} has none.",
                    t.as_str()
                )));
            }
            let list: Vec<String> = cats
                .iter()
                .map(|c| match &c.system {
                    Some(s) => format!("{s}|{}", c.code.as_deref().unwrap_or_default()),
                    None => c.code.clone().unwrap_or_default(),
                })
                .collect();
            pairs.push(("category".into(), list.join(",")));
        }
        Ok(pairs)
    }

    /// A resource an app replaces must itself be within the grant (its patient, its
    /// category): an update is not a way around a category limit.
    async fn existing_ok(&self, fhir: &Fhir, t: ResourceType, id: &str) -> Result<(), ApiError> {
        match fhir.read(t, id).await {
            Ok(r) => self.resource_ok(&r),
            // Not there (an update-as-create) or deleted: the body's checks decide.
            Err(FhirError::NotFound | FhirError::Gone) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A resource an app writes: its subject must be the launch patient, its category
    /// one granted.
    fn body_ok(&self, t: ResourceType, id: Option<&str>, body: &Value) -> Result<(), ApiError> {
        if let Some(p) = &self.patient {
            let of = if t == ResourceType::Patient {
                id.map(str::to_owned)
            } else {
                body.pointer("/subject/reference")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("Patient/"))
                    .map(str::to_owned)
            };
            if of.as_deref() != Some(p.as_str()) {
                return Err(outside_grant(
                    "The app's grant reaches only its launch patient's data.",
                ));
            }
        }
        if let Some(cats) = &self.categories {
            let codings: Vec<(Option<&str>, &str)> = body
                .get("category")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|cc| cc.get("coding").and_then(Value::as_array))
                .flatten()
                .filter_map(|c| {
                    Some((
                        c.get("system").and_then(Value::as_str),
                        c.get("code").and_then(Value::as_str)?,
                    ))
                })
                .collect();
            let ok = codings.iter().any(|(sys, code)| {
                cats.iter().any(|c| {
                    c.code.as_deref() == Some(*code)
                        && c.system.as_deref().is_none_or(|s| Some(s) == *sys)
                })
            });
            if !ok {
                return Err(outside_grant(
                    "The app's grant reaches only some categories of this type.",
                ));
            }
        }
        Ok(())
    }
}

fn annotate(
    audit: &Audit,
    action: Action,
    t: ResourceType,
    id: Option<&str>,
    patient: Option<&str>,
) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some(t.as_str());
        a.resource_id = id.map(str::to_owned);
        a.patient_id = patient.map(str::to_owned);
    });
}

fn view<'a>(state: &'a AppState, sees_ssn: bool, anonymize: bool) -> View<'a> {
    View {
        sees_ssn,
        anonymize,
        today: state.clock().now().date(),
        fhir: state.fhir(),
    }
}

async fn metadata(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read_options(q.as_deref())?;
    Ok(fhir_json(
        StatusCode::OK,
        &capability_statement(&state, &base_url(&state, &headers)),
    ))
}

/// What this server implements, from the same tables the parser and the router use.
pub fn capability_statement(state: &AppState, base: &str) -> Value {
    let origin = crate::oauth::routes::origin_of(base);
    let resources: Vec<Value> = ResourceType::ALL
        .into_iter()
        .map(|t| {
            let interactions = ["create", "delete", "read", "search-type", "update", "vread"];
            let params: Vec<Value> = params_of(t)
                .iter()
                .map(|p| json!({"name": p.name, "type": p.kind.as_str(), "documentation": p.doc}))
                .collect();
            let mut r = json!({
                "type": t.as_str(),
                "supportedProfile": t.us_core_profiles(),
                "interaction": interactions.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": false,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            });
            if t == ResourceType::Patient {
                r["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "The patient's whole compartment as a Bundle, or NDJSON with _format=ndjson; audited as an export."
                }]);
            }
            r
        })
        .collect();
    let mut resources = resources;
    resources.push(json!({
        "type": "Consent",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "versioned",
        "readHistory": false,
        "documentation": "Patients' restrictions of sensitive categories (read only; made and ended by the patient through the API and portal). Readable by the patient and by holders of audit:read.",
        "searchParam": [{"name": "patient", "type": "reference", "documentation": "The patient whose Consents (active and ended) are listed; a patient account reads its own without it."}],
    }));
    json!({
        "resourceType": "CapabilityStatement",
        "id": "custodian",
        "url": format!("{base}/metadata"),
        "name": "Custodian",
        "title": "Custodian FHIR R4 server",
        "status": "active",
        "experimental": false,
        "date": crate::clock::rfc3339(state.clock().now()).get(..10).unwrap_or("2026-01-01"),
        "publisher": "Custodian",
        "description": "FHIR R4 over Custodian's own sealed records. It does not claim the whole US Core server statement: it serves Patient, Condition, Observation, MedicationRequest and Procedure only (see supportedProfile).",
        "kind": "instance",
        "software": {"name": "Custodian", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Custodian", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every read, search and export is audited before the answer; errors are OperationOutcomes.",
            "security": {
                "cors": true,
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR"
                    }],
                    "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
                }],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": format!("{origin}/oauth/authorize")},
                        {"url": "token", "valueUri": format!("{origin}/oauth/token")},
                        {"url": "introspect", "valueUri": format!("{origin}/oauth/introspect")},
                        {"url": "revoke", "valueUri": format!("{origin}/oauth/revoke")},
                        {"url": "manage", "valueUri": format!("{origin}/account/apps")}
                    ]
                }],
                "description": "SMART App Launch 2 (discovery at .well-known/smart-configuration): an app's access token reaches what its grant's scopes and its user's role both allow. Also bearer tokens of a Custodian account (a session or a personal API token). Permissions as for /api/v1: patients:read/write for Patient, records:read/write for the clinical types, phi:ssn for the SSN, breakglass with X-Break-Glass-Reason for one patient (never for an app)."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}],
        }],
    })
}

async fn read(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path((ty, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if ty == "Consent" {
        return consent_read(&state, &audit, &auth, &id).await;
    }
    read_version(
        &state,
        &audit,
        auth.0,
        &headers,
        &ty,
        &id,
        None,
        q.as_deref(),
    )
    .await
}

// ---- Consent: patients' restrictions, read only --------------------------------------

/// Who may read a patient's Consents: the patient themself (not through an app), and
/// holders of `audit:read` (the privacy officer). The categories are sensitive:
/// clinicians see how many restrictions apply to them through the API, not these.
fn consents_readable(p: &Principal, patient: &str) -> Result<(), ApiError> {
    if p.smart().is_some() {
        return Err(outside_grant("Apps do not read patients' Consents."));
    }
    if p.patient.as_deref() == Some(patient) || p.has(Permission::AuditRead) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Forbidden).with_detail(
            "A patient's Consents are read by the patient and by holders of audit:read.",
        ))
    }
}

/// `GET /fhir/Consent/{id}`.
async fn consent_read(
    state: &AppState,
    audit: &Audit,
    p: &Principal,
    id: &str,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("Consent");
        a.resource_id = Some(id.to_owned());
    });
    let patient = crate::privacy::consent::patient_of(state.db(), id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound))?;
    audit.annotate(|a| a.patient_id = Some(patient.clone()));
    consents_readable(p, &patient)?;
    let found = crate::privacy::consent::of_patient(state.db(), state.patients(), &patient, false)
        .await?
        .into_iter()
        .find(|s| s.restriction.id == id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound))?;
    Ok(with_version(
        fhir_json(StatusCode::OK, &found.fhir()),
        found.version,
        &found.updated_at,
    ))
}

/// `GET /fhir/Consent?patient=…`: a patient's Consents, active and ended.
async fn consent_search(
    state: &AppState,
    audit: &Audit,
    p: &Principal,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    annotate_consents(audit);
    let mut patient = p.patient.clone();
    for (k, v) in &pairs {
        match k.as_str() {
            "patient" => {
                patient = Some(
                    search::patient_reference(v)
                        .ok_or_else(|| {
                            ApiError::new(ErrorCode::BadRequest)
                                .with_detail("patient must be an id, Patient/<id> or a Patient URL")
                        })?
                        .to_owned(),
                );
            }
            "_format" if json_format(v) => {}
            "_format" => return Err(not_acceptable()),
            _ => {
                return Err(ApiError::new(ErrorCode::BadRequest).with_detail(format!(
                    "the search parameter {k} is not supported for Consent; supported: patient, _format"
                )));
            }
        }
    }
    let Some(patient) = patient else {
        return Err(ApiError::new(ErrorCode::BadRequest)
            .with_detail("a search of Consent needs patient=<id>"));
    };
    audit.annotate(|a| a.patient_id = Some(patient.clone()));
    consents_readable(p, &patient)?;
    let list =
        crate::privacy::consent::of_patient(state.db(), state.patients(), &patient, false).await?;
    audit.context("count", ContextValue::Int(list.len() as i64));
    let base = base_url(state, headers);
    let entries: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "fullUrl": format!("{base}/Consent/{}", s.restriction.id),
                "resource": s.fhir(),
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut qs = form_urlencoded::Serializer::new(String::new());
    qs.append_pair("patient", &patient);
    let links = vec![json!({"relation": "self", "url": format!("{base}/Consent?{}", qs.finish())})];
    Ok(fhir_json(
        StatusCode::OK,
        &bundle("searchset", Some(list.len()), links, entries, state),
    ))
}

fn annotate_consents(audit: &Audit) {
    audit.annotate(|a| {
        a.action = Some(Action::Search);
        a.resource_type = Some("Consent");
    });
}

async fn vread(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path((ty, id, vid)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let version: i64 = vid.parse().map_err(|_| {
        ApiError::new(ErrorCode::NotFound).with_detail("Versions are whole numbers.")
    })?;
    read_version(
        &state,
        &audit,
        auth.0,
        &headers,
        &ty,
        &id,
        Some(version),
        q.as_deref(),
    )
    .await
}

/// A read (`version` `None`) or a vread: the permission (or break-glass), the patient
/// named in the audit trail before the resource is opened, the view the caller may see.
#[allow(clippy::too_many_arguments)]
async fn read_version(
    state: &AppState,
    audit: &Audit,
    principal: Principal,
    headers: &HeaderMap,
    ty: &str,
    id: &str,
    version: Option<i64>,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let t = resource_type(ty)?;
    let anonymize = read_options(query)?;
    let limit = limit(&principal, t, Ops::R)?;
    let reader = reader(principal, t.read_permission(), headers, &limit)?;
    let fhir = state.fhir();
    let patient = fhir.patient_of(t, id).await?;
    annotate(audit, Action::Read, t, Some(id), patient.as_deref());
    if let Some(l) = &limit {
        l.patient_ok(if t == ResourceType::Patient {
            Some(id)
        } else {
            patient.as_deref()
        })?;
    }
    if let Some(v) = version {
        audit.context("version", ContextValue::Int(v));
    }
    reader.flag(audit, t.as_str(), Some(id), patient.as_deref());
    let r = match version {
        None => fhir.read(t, id).await?,
        Some(v) => fhir.vread(t, id, v).await?,
    };
    if let Some(l) = &limit {
        l.resource_ok(&r)?;
    }
    if t != ResourceType::Patient && (version.is_some() || !r.labels().is_empty()) {
        // A patient's restriction: the labels of this version and of the current one
        // (an older version from before the label is as sensitive).
        let mut labels = r.labels();
        // An old version of a resource deleted since: its last labels are gone with
        // it, so any restriction that applies to this reader withholds it (fail closed).
        let mut unknown = false;
        if version.is_some() {
            match fhir.read(t, id).await {
                Ok(now) => labels.extend(now.labels()),
                Err(FhirError::Gone) => unknown = true,
                Err(_) => {}
            }
        }
        let screen = screen(
            state,
            reader.principal(),
            &r.patient_id,
            reader.break_glass(),
        )
        .await?;
        if screen.hides(&labels) || (unknown && screen.withholds()) {
            audit.context("withheld", ContextValue::Int(1));
            return Err(ApiError::new(ErrorCode::Withheld));
        }
        if screen.overridden(&labels) {
            audit.context("restriction_overridden", ContextValue::Bool(true));
        }
    }
    let body = fhir.render_text(&r, view(state, reader.sees_ssn(), anonymize));
    // The de-identified view keeps no date finer than the year: no Last-Modified.
    let last_updated = if anonymize {
        ""
    } else {
        r.last_updated.as_str()
    };
    Ok(with_version(
        fhir_text(StatusCode::OK, body),
        r.version,
        last_updated,
    ))
}

async fn search_get(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path(ty): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if ty == "Consent" {
        return consent_search(&state, &audit, &auth, &headers, pairs(q.as_deref())).await;
    }
    let t = resource_type(&ty)?;
    search(&state, &audit, auth.0, &headers, t, pairs(q.as_deref())).await
}

async fn search_post(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path(ty): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = resource_type(&ty)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(str::trim);
    if !body.is_empty() && ct != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType)
            .with_detail("Send the search as application/x-www-form-urlencoded."));
    }
    let mut all = pairs(q.as_deref());
    all.extend(form_urlencoded::parse(&body).into_owned());
    search(&state, &audit, auth.0, &headers, t, all).await
}

async fn search(
    state: &AppState,
    audit: &Audit,
    principal: Principal,
    headers: &HeaderMap,
    t: ResourceType,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    annotate(audit, Action::Search, t, None, None);
    let limit = limit(&principal, t, Ops::S)?;
    // A de-identified search's links are one sealed `_page` token each.
    let pairs = match pairs.iter().find(|(k, _)| k == "_page") {
        None => pairs,
        Some((_, token)) => {
            if pairs.iter().any(|(k, _)| k != "_page" && k != "_format") {
                return Err(ApiError::new(ErrorCode::BadRequest)
                    .with_detail("_page stands for a whole search: send it alone"));
            }
            state.fhir().open_page(token).ok_or_else(|| {
                ApiError::new(ErrorCode::BadRequest)
                    .with_detail("_page is not a page of a search of this server")
            })?
        }
    };
    let pairs = match &limit {
        Some(l) => l.confine(t, pairs)?,
        None => pairs,
    };
    let q: Query = search::parse(t, &pairs)
        .map_err(|m| ApiError::new(ErrorCode::BadRequest).with_detail(m))?;
    if let Some(l) = &limit
        && t != ResourceType::Patient
    {
        if let Some(p) = &q.patient {
            audit.annotate(|a| a.patient_id = Some(p.clone()));
        }
        l.patient_ok(q.patient.as_deref())?;
    }
    // The patient a compartment search is about, named whatever the outcome (a refused
    // search too).
    if let Some(p) = &q.patient {
        audit.annotate(|a| a.patient_id = Some(p.clone()));
    }
    // A list of patients needs `patients:read` itself; a search inside one named
    // patient's compartment may also be a break-glass access to that patient.
    let (sees_ssn, reader) = if t == ResourceType::Patient {
        // A patient account's search was confined to its own id above.
        let own = principal.patient.is_some()
            && limit
                .as_ref()
                .is_some_and(|l| l.patient.is_some() && l.patient == principal.patient);
        if !own {
            require(&principal, Permission::PatientsRead)?;
        }
        (principal.has(Permission::PhiSsn), None)
    } else {
        let r = reader(principal, t.read_permission(), headers, &limit)?;
        (r.sees_ssn(), Some(r))
    };
    if let (Some(r), Some(p)) = (&reader, &q.patient) {
        r.flag(audit, t.as_str(), None, Some(p));
    }
    let fhir = state.fhir();
    let screen = match (&reader, &q.patient) {
        (Some(r), Some(p)) if t != ResourceType::Patient => {
            screen(state, r.principal(), p, r.break_glass()).await?
        }
        _ => Screen::open(),
    };
    let found = fhir.search(t, &q, sees_ssn, &screen).await?;
    let (total, page, next) = (found.total, found.page, found.next);
    if found.withheld > 0 {
        audit.context("withheld", ContextValue::Int(found.withheld as i64));
    }
    if page.iter().any(|r| screen.overridden(&r.labels())) {
        audit.context("restriction_overridden", ContextValue::Bool(true));
    }
    if let Some(l) = &limit {
        // The search was confined; this checks the answer too (fail closed).
        for r in &page {
            if l.resource_ok(r).is_err() {
                tracing::error!(
                    "a confined search answered a resource outside the app's grant; refused"
                );
                return Err(outside_grant("The answer left the app's grant; refused."));
            }
        }
    }
    audit.context("count", ContextValue::Int(page.len() as i64));
    if t == ResourceType::Patient {
        audit.name_patients(Action::Read, page.iter().map(|r| r.id.as_str()));
    }
    let base = base_url(state, headers);
    let v = view(state, sees_ssn, q.anonymize);
    let link = |cursor: Option<&str>| -> Result<String, ApiError> {
        let query = if q.anonymize {
            let token = fhir.seal_page(&q.canonical, cursor)?;
            form_urlencoded::Serializer::new(String::new())
                .append_pair("_page", &token)
                .finish()
        } else {
            let mut qs = form_urlencoded::Serializer::new(q.canonical.clone());
            if let Some(c) = cursor {
                qs.append_pair("_cursor", c);
            }
            qs.finish()
        };
        Ok(format!("{base}/{}?{query}", t.as_str()))
    };
    let mut links = vec![json!({"relation": "self", "url": link(q.cursor.as_deref())?})];
    if let Some(c) = next {
        links.push(json!({"relation": "next", "url": link(Some(&c))?}));
    }
    let mut entries: Vec<Value> = page.iter().map(|r| entry(fhir, &base, r, v)).collect();
    if found.withheld > 0 {
        entries.push(withheld_entry(found.withheld));
    }
    let mut b = bundle("searchset", Some(total), links, entries, state);
    if found.withheld > 0 {
        mark_redacted(&mut b);
    }
    Ok(fhir_json(StatusCode::OK, &b))
}

fn entry(fhir: &Fhir, base: &str, r: &Resource, v: View<'_>) -> Value {
    let resource = fhir.render(r, v);
    let id = resource["id"].as_str().unwrap_or_default().to_owned();
    json!({
        "fullUrl": format!("{base}/{}/{id}", r.t.as_str()),
        "resource": resource,
        "search": {"mode": "match"},
    })
}

fn bundle(
    kind: &str,
    total: Option<usize>,
    links: Vec<Value>,
    entries: Vec<Value>,
    state: &AppState,
) -> Value {
    let mut b = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": fhir_instant(&crate::clock::timestamp(state.clock().now()))},
        "type": kind,
    });
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    if !links.is_empty() {
        b["link"] = Value::Array(links);
    }
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

async fn create(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path(ty): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = resource_type(&ty)?;
    annotate(&audit, Action::Create, t, None, None);
    let limit = limit(&auth, t, Ops::C)?;
    require(&auth, t.write_permission())?;
    let m = body_json(&headers, &body)?;
    // A create assigns the id: one in the body is ignored (FHIR R4, 3.1.0.6).
    let (_, resource) = split_resource(t, m, &format!("{}.", t.as_str()))?;
    if let Some(l) = &limit {
        l.body_ok(t, None, &resource)?;
    }
    write_one(&state, &audit, &auth, &headers, t, None, resource).await
}

async fn update(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t = resource_type(&ty)?;
    let patient = state.fhir().patient_of(t, &id).await.ok().flatten();
    annotate(&audit, Action::Update, t, Some(&id), patient.as_deref());
    let limit = limit(&auth, t, Ops::U)?;
    require(&auth, t.write_permission())?;
    let m = body_json(&headers, &body)?;
    let (body_id, resource) = split_resource(t, m, &format!("{}.", t.as_str()))?;
    if body_id.as_deref() != Some(id.as_str()) {
        return Err(ApiError::field(
            format!("{}.id", t.as_str()),
            "must be the id in the URL",
        ));
    }
    if let Some(l) = &limit {
        if t != ResourceType::Patient && patient.is_some() {
            l.patient_ok(patient.as_deref())?;
        }
        l.body_ok(t, Some(&id), &resource)?;
        l.existing_ok(state.fhir(), t, &id).await?;
    }
    let mut resource = resource;
    guard_stored(&state, &auth, t, &id, Some(&mut resource)).await?;
    write_one(&state, &audit, &auth, &headers, t, Some(id), resource).await
}

async fn write_one(
    state: &AppState,
    audit: &Audit,
    auth: &Principal,
    headers: &HeaderMap,
    t: ResourceType,
    id: Option<String>,
    body: Value,
) -> Result<Response, ApiError> {
    let entry = Entry {
        t,
        id,
        full_url: None,
        if_match: crate::http::headers::if_match_version(headers)?,
        body,
    };
    let fhir = state.fhir();
    let sees_ssn = auth.has(Permission::PhiSsn);
    let out = fhir.write(vec![entry], sees_ssn).await?;
    let Some(o) = out.into_iter().next() else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a write answered no outcome"
        )));
    };
    annotate(
        audit,
        if o.created {
            Action::Create
        } else {
            Action::Update
        },
        t,
        Some(&o.id),
        Some(&o.patient_id),
    );
    let r = fhir.read(t, &o.id).await?;
    let body = fhir.render(&r, view(state, sees_ssn, false));
    let status = if o.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut res = with_version(fhir_json(status, &body), r.version, &r.last_updated);
    let location = format!(
        "{}/{}/{}/_history/{}",
        base_url(state, headers),
        t.as_str(),
        o.id,
        o.version
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

async fn delete(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    Path((ty, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let t = resource_type(&ty)?;
    let patient = state.fhir().patient_of(t, &id).await.ok().flatten();
    annotate(&audit, Action::Delete, t, Some(&id), patient.as_deref());
    if let Some(l) = limit(&auth, t, Ops::D)? {
        l.patient_ok(if t == ResourceType::Patient {
            Some(id.as_str())
        } else {
            patient.as_deref()
        })?;
        if l.categories.is_some() {
            return Err(outside_grant(
                "The app's grant reaches only some categories: it deletes nothing.",
            ));
        }
    }
    require(&auth, t.write_permission())?;
    guard_stored(&state, &auth, t, &id, None).await?;
    state.fhir().delete(t, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /fhir/Patient/{id}/$everything`: the patient's compartment, audited as an export.
async fn operation(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    Path((ty, id, op)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let t = resource_type(&ty)?;
    if t != ResourceType::Patient || op != "$everything" {
        return Err(ApiError::new(ErrorCode::NotFound)
            .with_detail("The only operation here is GET /fhir/Patient/{id}/$everything."));
    }
    annotate(&audit, Action::Export, t, Some(&id), Some(&id));
    // An app (and a patient account) exports only with read of every type, every
    // category, of this patient.
    if auth.smart().is_some() || auth.patient.is_some() {
        for each in ResourceType::ALL {
            if let Some(l) = limit(&auth, each, Ops::R)? {
                l.patient_ok(Some(&id))?;
                if l.categories.is_some() {
                    return Err(outside_grant(
                        "$everything needs a grant of every category.",
                    ));
                }
            }
        }
    }
    // An export: both read permissions, never break-glass; or a patient's own record
    // (confined to it just above).
    if auth.patient.as_deref() != Some(id.as_str()) {
        require(&auth, Permission::PatientsRead)?;
        require(&auth, Permission::RecordsRead)?;
    }
    let mut ndjson = false;
    let mut anonymize = false;
    for (k, v) in pairs(q.as_deref()) {
        match k.as_str() {
            "_format" if json_format(&v) => {}
            "_format"
                if matches!(
                    v.as_str(),
                    "ndjson" | "application/fhir+ndjson" | "application/ndjson"
                ) =>
            {
                ndjson = true
            }
            "_format" => return Err(not_acceptable()),
            "_anonymize" => anonymize = v == "true",
            _ => {
                return Err(ApiError::new(ErrorCode::BadRequest)
                    .with_detail(format!("the parameter {k} is not supported by $everything")));
            }
        }
    }
    let fhir = state.fhir();
    let mut all = fhir.everything(&id).await?;
    // An export never breaks the glass: what the patient restricted stays withheld.
    let screen = screen(&state, &auth, &id, false).await?;
    let before = all.len();
    all.retain(|r| !screen.hides(&r.labels()));
    let withheld = before - all.len();
    audit.context("count", ContextValue::Int(all.len() as i64));
    if withheld > 0 {
        audit.context("withheld", ContextValue::Int(withheld as i64));
    }
    let v = view(&state, auth.has(Permission::PhiSsn), anonymize);
    if ndjson {
        let mut text = String::new();
        for r in &all {
            text.push_str(&fhir.render(r, v).to_string());
            text.push('\n');
        }
        if withheld > 0 {
            text.push_str(&withheld_entry(withheld)["resource"].to_string());
            text.push('\n');
        }
        let mut res = (StatusCode::OK, text).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        return Ok(res);
    }
    let base = base_url(&state, &headers);
    let mut entries: Vec<Value> = all.iter().map(|r| entry(fhir, &base, r, v)).collect();
    if withheld > 0 {
        entries.push(withheld_entry(withheld));
    }
    // The de-identified export's self link names the patient by pseudonym, as its
    // entries do: the real id would lead back.
    let subject = if anonymize {
        fhir.pseudonym(&id)
    } else {
        id.clone()
    };
    let query = if anonymize { "?_anonymize=true" } else { "" };
    let links = vec![
        json!({"relation": "self", "url": format!("{base}/Patient/{subject}/$everything{query}")}),
    ];
    let mut b = bundle("searchset", Some(all.len()), links, entries, &state);
    if withheld > 0 {
        mark_redacted(&mut b);
    }
    Ok(fhir_json(StatusCode::OK, &b))
}

/// `POST /fhir` with a `transaction` Bundle: every entry or none.
async fn transaction(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("Bundle");
    });
    let m = body_json(&headers, &body)?;
    let entries = bundle_entries(Value::Object(m), true)?;
    for e in &entries {
        // An app names its transaction's entries by urn:uuid / urn:oid only: another
        // `fullUrl` (such as `Patient/<id>`) would let a reference that reads as the
        // launch patient resolve to someone else.
        if auth.smart().is_some()
            && e.full_url
                .as_deref()
                .is_some_and(|u| !(u.starts_with("urn:uuid:") || u.starts_with("urn:oid:")))
        {
            return Err(outside_grant(
                "An app's transaction names its entries by urn:uuid only.",
            ));
        }
        let op = if e.id.is_some() { Ops::U } else { Ops::C };
        if let Some(l) = limit(&auth, e.t, op)? {
            if let Some(id) = &e.id {
                l.existing_ok(state.fhir(), e.t, id).await?;
            }
            if let Some(id) = &e.id
                && e.t != ResourceType::Patient
                && let Some(p) = state.fhir().patient_of(e.t, id).await.ok().flatten()
            {
                l.patient_ok(Some(&p))?;
            }
            l.body_ok(e.t, e.id.as_deref(), &e.body)?;
        }
    }
    let needed: BTreeSet<Permission> = entries.iter().map(|e| e.t.write_permission()).collect();
    for p in needed {
        require(&auth, p)?;
    }
    let mut entries = entries;
    for e in &mut entries {
        if let Some(id) = &e.id {
            guard_stored(&state, &auth, e.t, id, Some(&mut e.body)).await?;
        }
    }
    let fhir = state.fhir();
    let out = fhir.write(entries, auth.has(Permission::PhiSsn)).await?;
    name_written(&audit, &out);
    let base = base_url(&state, &headers);
    let entries: Vec<Value> = out
        .iter()
        .map(|o| {
            json!({
                "fullUrl": format!("{base}/{}/{}", o.t.as_str(), o.id),
                "response": {
                    "status": if o.created { "201 Created" } else { "200 OK" },
                    "location": format!("{}/{}/_history/{}", o.t.as_str(), o.id, o.version),
                    "etag": format!("W/\"{}\"", o.version),
                    "lastModified": fhir_instant(&o.last_updated),
                }
            })
        })
        .collect();
    Ok(fhir_json(
        StatusCode::OK,
        &bundle("transaction-response", None, Vec::new(), entries, &state),
    ))
}

/// Names every patient a write touched in the request's event.
pub fn name_written(audit: &Audit, out: &[Outcome]) {
    let patients: BTreeSet<&str> = out.iter().map(|o| o.patient_id.as_str()).collect();
    audit.context("count", ContextValue::Int(out.len() as i64));
    audit.name_patients(Action::Update, patients);
}

/// The entries of a Bundle: a `transaction` (each with `request` POST or PUT), or, for
/// an import (`http == false`), a `collection` too (each entry updates by its id).
pub fn bundle_entries(v: Value, http: bool) -> Result<Vec<Entry>, ApiError> {
    let Value::Object(mut m) = v else {
        return Err(ApiError::new(ErrorCode::BadRequest).with_detail("A Bundle is a JSON object."));
    };
    if m.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::field("Bundle.resourceType", "must be Bundle"));
    }
    let kind = m
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let collection = kind == "collection";
    if !(kind == "transaction" || (!http && collection)) {
        return Err(ApiError::field(
            "Bundle.type",
            if http {
                "must be transaction (batch is not supported)"
            } else {
                "must be transaction or collection"
            },
        ));
    }
    let list = match m.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::field("Bundle.entry", "must be a list")),
    };
    if list.len() > super::service::MAX_ENTRIES {
        return Err(
            ApiError::new(ErrorCode::PayloadTooLarge).with_detail(format!(
                "At most {} entries in one Bundle.",
                super::service::MAX_ENTRIES
            )),
        );
    }
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, e) in list.into_iter().enumerate() {
        let at = format!("Bundle.entry[{i}]");
        let Value::Object(mut e) = e else {
            errors.push(crate::http::FieldError::new(at, "must be an object"));
            continue;
        };
        let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
        let Some(Value::Object(res)) = e.remove("resource") else {
            errors.push(crate::http::FieldError::new(
                format!("{at}.resource"),
                "is required",
            ));
            continue;
        };
        let Some(t) = res
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(ResourceType::parse)
        else {
            errors.push(crate::http::FieldError::new(
                format!("{at}.resource.resourceType"),
                "must be Patient, Condition, Observation, MedicationRequest or Procedure",
            ));
            continue;
        };
        let (body_id, body) = match split_resource(t, res, &format!("{at}.resource.")) {
            Ok(x) => x,
            Err(e) => {
                errors.extend(e.field_errors().iter().cloned());
                continue;
            }
        };
        let request = e.get("request");
        let method = request
            .and_then(|r| r.get("method"))
            .and_then(Value::as_str);
        let url = request
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let id = match (method, collection) {
            (_, true) | (None, false) if !http => body_id,
            (Some("POST"), _) => None,
            (Some("PUT"), _) => {
                let want = url
                    .strip_prefix(t.as_str())
                    .and_then(|r| r.strip_prefix('/'));
                if want.is_none() || want != body_id.as_deref() {
                    errors.push(crate::http::FieldError::new(
                        format!("{at}.request.url"),
                        "must be <type>/<id> of the resource",
                    ));
                    continue;
                }
                body_id
            }
            _ => {
                errors.push(crate::http::FieldError::new(
                    format!("{at}.request.method"),
                    "must be POST or PUT",
                ));
                continue;
            }
        };
        out.push(Entry {
            t,
            id,
            full_url,
            if_match: None,
            body,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// What a `/fhir` request refused before its handler was about.
pub struct FhirSubjects(pub Fhir);

impl Subjects for FhirSubjects {
    fn about<'a>(
        &'a self,
        method: &'a str,
        route: &'a str,
        path: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Annotation>> + Send + 'a>> {
        Box::pin(async move {
            if !route.starts_with("/fhir/{type}") {
                return None;
            }
            let mut segs = path.trim_start_matches("/fhir/").split('/');
            let t = ResourceType::parse(segs.next()?)?;
            let id = segs
                .next()
                .filter(|s| *s != "_search" && SafeId::new(s).is_some());
            let mut a = Annotation {
                action: Some(if id.is_none() && method == "GET" {
                    Action::Search
                } else {
                    action_of(method)
                }),
                resource_type: Some(t.as_str()),
                resource_id: id.map(str::to_owned),
                ..Annotation::default()
            };
            if let Some(id) = id {
                a.patient_id = self.0.patient_of(t, id).await.ok().flatten();
            }
            Some(a)
        })
    }
}
