//! HTTP for patients' own rights: their record and its download, their accounting of
//! disclosures (`/api/v1/me/…`, patient accounts only), and the patient invitation staff
//! send from a record (`patients:write`).

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientInvitation {
    /// Where to send the link; the address on the patient's record when absent.
    #[serde(default)]
    pub email: Option<String>,
}

/// Invites a patient to their own patient account (needs `patients:write`): a
/// single-use link, valid `accounts.invite_ttl`, creates an account with the `patient`
/// role linked to this record. One account per record (409); a new invitation replaces
/// a pending one.
#[utoipa::path(post, path = "/api/v1/patients/{id}/invitation", tag = "patients", security(("bearer" = ["patients:write"])),
    params(("id" = String, Path)), request_body = PatientInvitation,
    responses((status = 201, description = "Invited", body = Invitation),
        (status = 404, description = "not_found"),
        (status = 409, description = "conflict: the record has an account"),
        (status = 422, description = "validation_error: no email address"),
        (status = 503, description = "no mail can be sent")))]
pub async fn invite_patient(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::PatientsWrite>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PatientInvitation>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("invitation");
        a.patient_id = Some(id.clone());
    });
    let patient = state.patients().get(&id).await?;
    let email = match req.email.filter(|e| !e.trim().is_empty()) {
        Some(e) => e,
        None => patient.fields.email.clone().ok_or_else(|| {
            ApiError::field(
                "email",
                "the patient's record has no email address: give one",
            )
        })?,
    };
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
