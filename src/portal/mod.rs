//! Patients' own rights over their record (HIPAA §164.524 access, §164.528 accounting).
//!
//! A patient account (the `patient` role, linked to one patient record at the
//! acceptance of a patient invitation) holds no permission: every staff door refuses it.
//! It reaches its own record through a self-scope at each door — here (`/api/v1/me/…`,
//! the `/my` pages), the FHIR API's limit to its own compartment, and SMART grants of
//! `patient/` scopes for its own record only. Every access names the patient in the
//! audit trail before anything is disclosed, as every other read does.

pub mod amendments;
pub mod routes;

use serde_json::{Value, json};

use crate::access::Principal;
use crate::app::AppState;
use crate::audit::{Action, Audit};
use crate::fhir::service::{View, fhir_instant};
use crate::http::{ApiError, ErrorCode};

/// The caller's own patient record, or 403 for anyone who is not a patient account.
pub(crate) fn own(p: &Principal) -> Result<&str, ApiError> {
    if p.mfa_enrollment_pending {
        return Err(ApiError::new(ErrorCode::MfaEnrollmentRequired));
    }
    p.patient.as_deref().ok_or_else(|| {
        ApiError::new(ErrorCode::Forbidden)
            .with_detail("Only a patient account has a record of its own here.")
    })
}

/// Names the patient in the request's audit event (before anything is sent).
pub(crate) fn audit_own(audit: &Audit, action: Action, patient: &str) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("Patient");
        a.resource_id = Some(patient.to_owned());
        a.patient_id = Some(patient.to_owned());
    });
}

/// How the patient sees their record: everything, the SSN masked (a stolen password
/// should not hand over the number in full; the clinic gives it on request).
pub(crate) fn own_view(state: &AppState) -> View<'_> {
    View {
        sees_ssn: false,
        anonymize: false,
        today: state.clock().now().date(),
        fhir: state.fhir(),
    }
}

/// The whole record as a FHIR R4 Bundle of type `collection`: the Patient, then every
/// resource of their compartment (the `/api/v1` records as Conditions).
pub(crate) async fn record_bundle(
    state: &AppState,
    patient: &str,
    base: &str,
) -> Result<Value, ApiError> {
    let fhir = state.fhir();
    let all = fhir.everything(patient).await?;
    let v = own_view(state);
    let entries: Vec<Value> = all
        .iter()
        .map(|r| {
            let resource = fhir.render(r, v);
            let id = resource["id"].as_str().unwrap_or_default().to_owned();
            json!({
                "fullUrl": format!("{base}/{}/{id}", r.t.as_str()),
                "resource": resource,
            })
        })
        .collect();
    let now = fhir_instant(&crate::clock::timestamp(state.clock().now()));
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": now},
        "type": "collection",
        "timestamp": now,
        "entry": entries,
    }))
}

/// A patient invitation is accepted only with the patient's birth date as on their
/// record: the mailbox alone does not open a medical record (the address on file may be
/// shared, or may have been changed). A wrong date ends the link at once (no guessing);
/// the clinic sends a new one. Other invitations pass.
pub async fn check_patient_invitation(
    state: &AppState,
    token: &str,
    birth_date: Option<&str>,
) -> Result<(), ApiError> {
    let inv = state.accounts().invitation(token).await?;
    let Some(patient) = &inv.patient_id else {
        return Ok(());
    };
    let given = birth_date.map(str::trim).unwrap_or_default();
    if given.is_empty() {
        return Err(ApiError::field(
            "birth_date",
            "give your birth date (YYYY-MM-DD) as your clinic recorded it",
        ));
    }
    let on_record = match state.patients().get(patient).await {
        Ok(p) => p.fields.birth_date,
        // The record was erased since: the link leads nowhere.
        Err(crate::records::service::PhiError::NotFound) => {
            return Err(crate::accounts::AccountsError::InvalidLink.into());
        }
        Err(e) => return Err(e.into()),
    };
    if given != on_record {
        state.accounts().revoke_invitation(&inv.id).await?;
        tracing::warn!(target: "custodian::security", "security event: a patient invitation was answered with a wrong birth date; the link was ended");
        return Err(ApiError::new(ErrorCode::BadRequest).with_detail(
            "The birth date does not match your record. For your safety this link no longer works: ask your clinic for a new invitation.",
        ));
    }
    Ok(())
}
