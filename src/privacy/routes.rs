//! HTTP for restrictions: the patient's own (`/api/v1/me/restrictions`), the staff's
//! view of a patient's (`patients:read`), and the administrators' report (`audit:read`).

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::consent::{self, Stored};
use super::{Restriction, describe, is_label};
use crate::access::{Authorized, Permission, Principal, need};
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::json::JsonBody;
use crate::http::{ApiError, ErrorCode};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(my_restrictions, restrict))
        .routes(routes!(unrestrict))
        .routes(routes!(patient_restrictions))
        .routes(routes!(all_restrictions))
}

/// A restriction as the API shows it, with the FHIR Consent that records it.
#[derive(Serialize, ToSchema)]
pub struct RestrictionView {
    pub id: String,
    pub patient_id: String,
    /// The sensitivity code restricted (ETH, PSY, HIV, SEX, SDV); absent in the staff's
    /// view when it is kept from them (the category itself is sensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// What the category covers, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category_text: Option<String>,
    /// The roles that may still see it (empty: nobody but the patient).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Whether SMART apps may see it (for people of those roles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps: Option<bool>,
    /// Whether it keeps the category from the caller.
    pub applies_to_you: bool,
    pub created_at: String,
    /// The FHIR R4 Consent recording the decision (the patient's and auditors' views).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub consent: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct RestrictionList {
    pub items: Vec<RestrictionView>,
}

fn full(s: &Stored, applies_to_you: bool) -> RestrictionView {
    let r = &s.restriction;
    RestrictionView {
        id: r.id.clone(),
        patient_id: r.patient_id.clone(),
        category: Some(r.category.clone()),
        category_text: Some(describe(&r.category).to_owned()),
        roles: Some(r.roles.clone()),
        apps: Some(r.apps),
        applies_to_you,
        created_at: r.created_at.clone(),
        consent: Some(s.fhir()),
    }
}

fn audit_consent(audit: &Audit, action: Action, patient: &str, id: Option<&str>) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("Consent");
        a.resource_id = id.map(str::to_owned);
        a.patient_id = Some(patient.to_owned());
    });
}

/// The caller's own restrictions (patient accounts only).
#[utoipa::path(get, path = "/api/v1/me/restrictions", tag = "me", security(("bearer" = [])),
    responses((status = 200, body = RestrictionList), (status = 403, description = "forbidden: not a patient account")))]
pub async fn my_restrictions(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
) -> Result<Json<RestrictionList>, ApiError> {
    let me = crate::portal::own(&auth)?.to_owned();
    audit_consent(&audit, Action::Read, &me, None);
    let list = consent::of_patient(state.db(), state.patients(), &me, true).await?;
    Ok(Json(RestrictionList {
        items: list.iter().map(|s| full(s, false)).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRestriction {
    /// The sensitivity code to restrict: ETH, PSY, HIV, SEX or SDV.
    pub category: String,
    /// The roles that may still see it; none (the default): nobody but you.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Whether apps (SMART) may see it, for people of those roles (default: no).
    #[serde(default)]
    pub apps: bool,
}

/// Restricts who sees a sensitive category of the caller's record (patient accounts
/// only): to named roles, and to no app unless `apps`. Stored as a FHIR Consent;
/// enforced on every door from the next request. A second restriction of the same
/// category is refused (409): end the first one.
#[utoipa::path(post, path = "/api/v1/me/restrictions", tag = "me", security(("bearer" = [])),
    request_body = NewRestriction,
    responses((status = 201, body = RestrictionView), (status = 409, description = "conflict"), (status = 422, description = "validation_error")))]
pub async fn restrict(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    JsonBody(req): JsonBody<NewRestriction>,
) -> Result<Response, ApiError> {
    let me = crate::portal::own(&auth)?.to_owned();
    audit_consent(&audit, Action::Create, &me, None);
    let s = create_restriction(&state, &me, req).await?;
    audit.annotate(|a| a.resource_id = Some(s.restriction.id.clone()));
    Ok((StatusCode::CREATED, Json(full(&s, false))).into_response())
}

/// Checks and stores a patient's new restriction (the API and the portal page).
pub async fn create_restriction(
    state: &AppState,
    patient: &str,
    req: NewRestriction,
) -> Result<Stored, ApiError> {
    let category = req.category.trim().to_ascii_uppercase();
    if !is_label(&category) {
        return Err(ApiError::field(
            "category",
            "must be one of ETH, PSY, HIV, SEX, SDV",
        ));
    }
    let mut roles: Vec<String> = Vec::new();
    for r in req.roles {
        let r = r.trim().to_owned();
        if r == crate::identity::roles::PATIENT_ROLE
            || !crate::identity::store::role_exists(state.db(), &r).await?
        {
            return Err(ApiError::field(
                "roles",
                "must name staff roles of this server",
            ));
        }
        if !roles.contains(&r) {
            roles.push(r);
        }
    }
    let existing = consent::active(state.db(), state.patients(), patient).await?;
    if existing.iter().any(|x| x.category == category) {
        return Err(ApiError::new(ErrorCode::Conflict)
            .with_detail("This category is restricted already: end that restriction first."));
    }
    let now = crate::clock::timestamp(state.clock().now());
    let r = Restriction {
        id: uuid::Uuid::new_v4().to_string(),
        patient_id: patient.to_owned(),
        category,
        roles,
        apps: req.apps,
        created_at: now.clone(),
    };
    Ok(consent::create(state.db(), state.patients(), &r, &now).await?)
}

/// Ends one of the caller's restrictions (patient accounts only): its Consent becomes
/// inactive (kept, versioned).
#[utoipa::path(delete, path = "/api/v1/me/restrictions/{id}", tag = "me", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 204, description = "Ended"), (status = 404, description = "not_found")))]
pub async fn unrestrict(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let me = crate::portal::own(&auth)?.to_owned();
    audit_consent(&audit, Action::Update, &me, Some(&id));
    audit.context("change", ContextValue::Code("revoke"));
    let now = crate::clock::timestamp(state.clock().now());
    consent::revoke(state.db(), state.patients(), &me, &id, &now).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A patient's active restrictions as staff see them (`patients:read`, or break-glass):
/// how many, and which apply to the caller; the category only of those that do not keep
/// it from the caller (the category itself is sensitive).
#[utoipa::path(get, path = "/api/v1/patients/{id}/restrictions", tag = "patients", security(("bearer" = ["patients:read"])),
    params(("id" = String, Path)), responses((status = 200, body = RestrictionList)))]
pub async fn patient_restrictions(
    State(state): State<AppState>,
    audit: Audit,
    crate::records::routes::PatientReader(reader): crate::records::routes::PatientReader,
    Path(id): Path<String>,
) -> Result<Json<RestrictionList>, ApiError> {
    audit_consent(&audit, Action::Read, &id, None);
    reader.flag(&audit, "Consent", None, Some(&id));
    state.patients().get(&id).await?;
    let list = consent::of_patient(state.db(), state.patients(), &id, true).await?;
    let p = reader.principal();
    Ok(Json(RestrictionList {
        items: list.iter().map(|s| staff_view(s, p)).collect(),
    }))
}

fn staff_view(s: &Stored, p: &Principal) -> RestrictionView {
    let a = super::Audience::of(p, &s.restriction.patient_id, false);
    let applies = super::Screen::new(std::slice::from_ref(&s.restriction), &a).withholds();
    if p.has(Permission::AuditRead) || !applies {
        return full(s, applies);
    }
    RestrictionView {
        id: s.restriction.id.clone(),
        patient_id: s.restriction.patient_id.clone(),
        category: None,
        category_text: None,
        roles: None,
        apps: None,
        applies_to_you: true,
        created_at: s.restriction.created_at.clone(),
        consent: None,
    }
}

/// Every active restriction of every patient, with its Consent (`audit:read`): the
/// privacy officer's report.
#[utoipa::path(get, path = "/api/v1/restrictions", tag = "audit", security(("bearer" = ["audit:read"])),
    responses((status = 200, body = RestrictionList)))]
pub async fn all_restrictions(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
) -> Result<Json<RestrictionList>, ApiError> {
    let list = consent::all_active(state.db(), state.patients()).await?;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("Consent");
    });
    audit.name_patients(
        Action::Read,
        list.iter().map(|s| s.restriction.patient_id.as_str()),
    );
    audit.context("count", ContextValue::Int(list.len() as i64));
    Ok(Json(RestrictionList {
        items: list.iter().map(|s| full(s, false)).collect(),
    }))
}
