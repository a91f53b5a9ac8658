//! HTTP for patients' own rights: their record and its download, their accounting of
//! disclosures (`/api/v1/me/…`, patient accounts only), and the patient invitation staff
//! send from a record (`patients:write`).

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::amendments::{self, Amendment, NewAmendment};
use crate::access::{Authorized, need};
use crate::accounts::Invitation;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::ApiError;
use crate::http::json::{JsonBody, QueryParams};
use crate::http::params::Limit;
use crate::records::routes::{DisclosurePage, accounting_for};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(my_record))
        .routes(routes!(my_disclosures))
        .routes(routes!(invite_patient))
        .routes(routes!(my_amendments, request_amendment))
        .routes(routes!(disagree))
        .routes(routes!(amendments))
        .routes(routes!(amendment))
        .routes(routes!(accept_amendment))
        .routes(routes!(deny_amendment))
}

fn audit_amendment(audit: &Audit, action: Action, id: Option<&str>, patient: Option<&str>) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("amendment");
        a.resource_id = id.map(str::to_owned);
        a.patient_id = patient.map(str::to_owned);
    });
}

#[derive(Serialize, ToSchema)]
pub struct AmendmentList {
    pub items: Vec<Amendment>,
}

/// The caller's own amendment requests, newest first (patient accounts only).
#[utoipa::path(get, path = "/api/v1/me/amendments", tag = "me", security(("bearer" = [])),
    responses((status = 200, body = AmendmentList), (status = 403, description = "forbidden: not a patient account")))]
pub async fn my_amendments(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
) -> Result<Json<AmendmentList>, ApiError> {
    let me = super::own(&auth)?.to_owned();
    audit_amendment(&audit, Action::Read, None, Some(&me));
    let mut items = amendments::of_patient(&state, &me, false).await?;
    // The patient reads the decision and their statement; the replaced value is the
    // reviewers'.
    for a in &mut items {
        a.previous = None;
    }
    Ok(Json(AmendmentList { items }))
}

/// Asks for a correction of one element of the caller's record, with a reason
/// (HIPAA §164.526; patient accounts only). Decided within 60 days.
#[utoipa::path(post, path = "/api/v1/me/amendments", tag = "me", security(("bearer" = [])),
    request_body = NewAmendment,
    responses((status = 201, body = Amendment), (status = 422, description = "validation_error")))]
pub async fn request_amendment(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    JsonBody(req): JsonBody<NewAmendment>,
) -> Result<Response, ApiError> {
    let me = super::own(&auth)?.to_owned();
    audit_amendment(&audit, Action::Create, None, Some(&me));
    let a = amendments::request(&state, &me, &auth.user_id, req).await?;
    audit.annotate(|e| e.resource_id = Some(a.id.clone()));
    Ok((StatusCode::CREATED, Json(a)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// The statement of disagreement (at most 4,000 characters).
    pub statement: String,
}

/// Answers a denied request with a statement of disagreement, attached to the record
/// from then on (once; patient accounts only).
#[utoipa::path(post, path = "/api/v1/me/amendments/{id}/statement", tag = "me", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = Statement,
    responses((status = 200, body = Amendment), (status = 404, description = "not_found"), (status = 409, description = "conflict: not denied, or answered already")))]
pub async fn disagree(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<Statement>,
) -> Result<Json<Amendment>, ApiError> {
    let me = super::own(&auth)?.to_owned();
    audit_amendment(&audit, Action::Update, Some(&id), Some(&me));
    audit.context("change", ContextValue::Code("statement_of_disagreement"));
    let mut a = amendments::disagree(&state, &me, &id, &req.statement).await?;
    a.previous = None;
    Ok(Json(a))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AmendmentQuery {
    /// `pending` (the default), `overdue`, `accepted` or `denied`.
    status: Option<String>,
}

/// Amendment requests for review (`amendments:review`): by default the pending ones,
/// the oldest due first, each with its 60-day deadline and whether it is overdue.
#[utoipa::path(get, path = "/api/v1/amendments", tag = "amendments", security(("bearer" = ["amendments:review"])),
    params(AmendmentQuery), responses((status = 200, body = AmendmentList)))]
pub async fn amendments(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::AmendmentsReview>,
    QueryParams(q): QueryParams<AmendmentQuery>,
) -> Result<Json<AmendmentList>, ApiError> {
    let status = q.status.unwrap_or_else(|| "pending".into());
    if !matches!(
        status.as_str(),
        "pending" | "overdue" | "accepted" | "denied"
    ) {
        return Err(ApiError::field(
            "status",
            "must be pending, overdue, accepted or denied",
        ));
    }
    audit_amendment(&audit, Action::Read, None, None);
    // Overdue requests are raised now, whatever the sweeper's timing.
    if let Err(e) = amendments::sweep(&state).await {
        tracing::warn!(error = %e, "amendments: the overdue sweep could not run");
    }
    let mut items = amendments::list(&state, &status).await?;
    for a in &mut items {
        amendments::screen_text(&state, &auth, a).await?;
    }
    audit.name_patients(Action::Read, items.iter().map(|a| a.patient_id.as_str()));
    audit.context("count", ContextValue::Int(items.len() as i64));
    Ok(Json(AmendmentList { items }))
}

/// One amendment request (`amendments:review`).
#[utoipa::path(get, path = "/api/v1/amendments/{id}", tag = "amendments", security(("bearer" = ["amendments:review"])),
    params(("id" = String, Path)), responses((status = 200, body = Amendment), (status = 404, description = "not_found")))]
pub async fn amendment(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::AmendmentsReview>,
    Path(id): Path<String>,
) -> Result<Json<Amendment>, ApiError> {
    audit_amendment(&audit, Action::Read, Some(&id), None);
    let mut a = amendments::get(&state, &id).await?;
    audit.annotate(|e| e.patient_id = Some(a.patient_id.clone()));
    amendments::screen_text(&state, &auth, &mut a).await?;
    Ok(Json(a))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Acceptance {
    /// How the change was made (required for a `fhir` target, which the reviewer
    /// amends); at most 2,000 characters.
    #[serde(default)]
    pub note: Option<String>,
}

/// Accepts a request (`amendments:review`): a demographic or record field is set to
/// what the patient asked, as a new version; the previous value stays with the request.
#[utoipa::path(post, path = "/api/v1/amendments/{id}/accept", tag = "amendments", security(("bearer" = ["amendments:review"])),
    params(("id" = String, Path)), request_body = Acceptance,
    responses((status = 200, body = Amendment), (status = 409, description = "conflict: decided already"), (status = 422, description = "validation_error")))]
pub async fn accept_amendment(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::AmendmentsReview>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<Acceptance>,
) -> Result<Json<Amendment>, ApiError> {
    audit_amendment(&audit, Action::Update, Some(&id), None);
    audit.context("decision", ContextValue::Code("accept"));
    let a = amendments::get(&state, &id).await?;
    audit.annotate(|e| e.patient_id = Some(a.patient_id.clone()));
    // A record the patient's restrictions keep from the reviewer is not changed blind.
    if a.target.resource == "record"
        && let Some(rid) = &a.target.id
    {
        let r = state.patients().record(rid).await?;
        if crate::privacy::screen_for(&state, &auth, &a.patient_id, false)
            .await?
            .hides(&r.labels)
        {
            return Err(ApiError::new(crate::http::ErrorCode::Withheld));
        }
    }
    let mut done = amendments::accept(&state, &id, req.note, &auth.user_id).await?;
    amendments::screen_text(&state, &auth, &mut done).await?;
    Ok(Json(done))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Denial {
    /// Why, for the patient to read (10 to 2,000 characters).
    pub reason: String,
}

/// Denies a request with a written reason the patient reads (`amendments:review`).
#[utoipa::path(post, path = "/api/v1/amendments/{id}/deny", tag = "amendments", security(("bearer" = ["amendments:review"])),
    params(("id" = String, Path)), request_body = Denial,
    responses((status = 200, body = Amendment), (status = 409, description = "conflict: decided already"), (status = 422, description = "validation_error")))]
pub async fn deny_amendment(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::AmendmentsReview>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<Denial>,
) -> Result<Json<Amendment>, ApiError> {
    audit_amendment(&audit, Action::Update, Some(&id), None);
    audit.context("decision", ContextValue::Code("deny"));
    let a = amendments::get(&state, &id).await?;
    audit.annotate(|e| e.patient_id = Some(a.patient_id.clone()));
    let mut done = amendments::deny(&state, &id, &req.reason, &auth.user_id).await?;
    amendments::screen_text(&state, &auth, &mut done).await?;
    Ok(Json(done))
}

/// The media type of a FHIR JSON body.
const FHIR_JSON: &str = "application/fhir+json";

/// The caller's own health record as a FHIR R4 Bundle (`collection`): demographics,
/// conditions, observations, medications, procedures and records (HIPAA §164.524).
/// Patient accounts only; audited as an export of the patient.
#[utoipa::path(get, path = "/api/v1/me/record", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "A FHIR Bundle (application/fhir+json), as a download", content_type = "application/fhir+json", body = Object),
        (status = 403, description = "forbidden: not a patient account")))]
pub async fn my_record(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let me = super::own(&auth)?.to_owned();
    super::audit_own(&audit, Action::Export, &me);
    let base = crate::fhir::routes::base_url(&state, &headers);
    let bundle = super::record_bundle(&state, &me, &base).await?;
    audit.context(
        "count",
        ContextValue::Int(
            bundle["entry"]
                .as_array()
                .map_or(0, |e| i64::try_from(e.len()).unwrap_or(0)),
        ),
    );
    Ok(download(bundle.to_string()))
}

/// A FHIR JSON body offered as a file.
pub(crate) fn download(body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"health-record.json\""),
    );
    r
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MyDisclosuresQuery {
    #[param(inline)]
    limit: Option<Limit<500, 100>>,
    cursor: Option<String>,
}

/// The caller's own accounting of disclosures (HIPAA §164.528): who read, received or
/// changed their record over the last six years, when, why (the break-glass reason) and
/// through which app, newest first. Their own reads are left out; what their apps read
/// stays. Read from the tamper-evident audit trail: nobody can edit it. Patient accounts
/// only.
#[utoipa::path(get, path = "/api/v1/me/disclosures", tag = "me", security(("bearer" = [])),
    params(MyDisclosuresQuery),
    responses((status = 200, body = DisclosurePage), (status = 403, description = "forbidden: not a patient account")))]
pub async fn my_disclosures(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::Enrolled>,
    QueryParams(q): QueryParams<MyDisclosuresQuery>,
) -> Result<Json<DisclosurePage>, ApiError> {
    let me = super::own(&auth)?.to_owned();
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("disclosures");
        // The patient reading their own accounting discloses nothing to anyone else.
        a.context.insert("patient_id", ContextValue::id(&me));
    });
    let limit = q.limit.unwrap_or_default().get();
    Ok(Json(
        accounting_for(&state, &me, q.cursor.as_deref(), limit, Some(&auth.user_id)).await?,
    ))
}

/// Invites a patient to their own patient account (needs `patients:read` and
/// `patients:write`): a single-use link to the email address on the patient's record
/// (never another: whoever could name the address could take the account), valid
/// `accounts.invite_ttl`. Accepting it creates an account with the `patient` role
/// linked to this record, once the patient gives their birth date as on the record.
/// One account per record (409); a new invitation replaces a pending one.
#[utoipa::path(post, path = "/api/v1/patients/{id}/invitation", tag = "patients", security(("bearer" = ["patients:write"])),
    params(("id" = String, Path)),
    responses((status = 201, description = "Invited", body = Invitation),
        (status = 404, description = "not_found"),
        (status = 409, description = "conflict: the record has an account"),
        (status = 422, description = "validation_error: the record has no email address"),
        (status = 503, description = "no mail can be sent")))]
pub async fn invite_patient(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::PatientsWrite>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("invitation");
        a.patient_id = Some(id.clone());
    });
    if !auth.has(crate::access::Permission::PatientsRead) {
        return Err(ApiError::new(crate::http::ErrorCode::Forbidden)
            .with_detail("This needs the patients:read permission too."));
    }
    let patient = state.patients().get(&id).await?;
    let email = patient.fields.email.clone().ok_or_else(|| {
        ApiError::field(
            "email",
            "the patient's record has no email address: add theirs to the record first",
        )
    })?;
    let inv = state
        .accounts()
        .invite_patient(&id, &email, &auth.0)
        .await?;
    audit.annotate(|a| a.resource_id = Some(inv.id.clone()));
    Ok((StatusCode::CREATED, Json(inv)).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn not_a_patient_is_refused() {
        let p = crate::access::Principal {
            user_id: "u".into(),
            username: "u".into(),
            email: None,
            role: "doctor".into(),
            permissions: Default::default(),
            credential: crate::access::Credential::Session("s".into()),
            mfa_enabled: true,
            mfa_enrollment_pending: false,
            password_expires_at: None,
            patient: None,
        };
        assert!(super::super::own(&p).is_err());
        let me = crate::access::Principal {
            patient: Some("p1".into()),
            ..p
        };
        assert_eq!(super::super::own(&me).ok(), Some("p1"));
    }
}
