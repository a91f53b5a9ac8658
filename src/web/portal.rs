//! The patient portal (`/my`): a patient account's own record, its download as a FHIR
//! Bundle or a printable page, and its accounting of disclosures. Only a patient account
//! (one linked to a record) sees these pages; everyone else gets the 403 page.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::clinic::{Coded, Disclosed, RecordRow};
use super::pages::{Layout, display_time, forbidden, render};
use super::session::WebUser;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::ApiError;
use crate::records::model::{PatientView, mask_ssn};
use crate::records::routes::{accounting_for, patient_view};

/// The patient's record as the pages show it.
struct OwnRecord {
    p: PatientView,
    conditions: Vec<Coded>,
    labs: Vec<Coded>,
    medications: Vec<Coded>,
    procedures: Vec<Coded>,
    records: Vec<RecordRow>,
}

async fn own_record(state: &AppState, id: &str) -> Result<OwnRecord, ApiError> {
    let patient = state.patients().get(id).await?;
    let mut p = patient_view(state, &patient, false, false);
    p.ssn = patient.fields.ssn.as_deref().map(mask_ssn);
    let lists = super::clinic::clinical_lists(
        state,
        id,
        crate::portal::own_view(state),
        500,
        &crate::privacy::Screen::open(),
    )
    .await?;
    let out = OwnRecord {
        p,
        conditions: lists.conditions,
        labs: lists.labs,
        medications: lists.medications,
        procedures: lists.procedures,
        records: lists.records,
    };
    Ok(out)
}

/// The patient account's own record id; for anyone else, the answer to give (the 403
/// page, or the second-factor set-up while enrolment is pending). Every patient page
/// starts with it.
pub(super) fn own(u: &WebUser) -> Result<String, Box<Response>> {
    match (&u.principal.patient, u.principal.mfa_enrollment_pending) {
        (Some(p), false) => Ok(p.clone()),
        (Some(_), true) => Err(Box::new(axum::response::IntoResponse::into_response(
            axum::response::Redirect::to("/admin#totp"),
        ))),
        (None, _) => Err(Box::new(forbidden(u))),
    }
}

#[derive(askama::Template)]
#[template(path = "my.html")]
struct MyPage {
    layout: Layout,
    r: OwnRecord,
    disclosures: Vec<Disclosed>,
    more_disclosures: bool,
    fhir_base: String,
}

/// `GET /my`: the portal's front page, the whole record and the latest disclosures.
pub async fn home(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    headers: HeaderMap,
) -> Response {
    let me = match own(&u) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    crate::portal::audit_own(&audit, Action::Read, &me);
    let r = match own_record(&state, &me).await {
        Ok(r) => r,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    let list = accounting_for(&state, &me, None, 20, Some(&u.principal.user_id))
        .await
        .map(|p| {
            (
                p.items.into_iter().map(super::clinic::disclosed).collect(),
                p.next_cursor.is_some(),
            )
        });
    let (disclosures, more_disclosures) = match list {
        Ok(x) => x,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    render(&MyPage {
        layout: Layout::of(&state, &u, None),
        r,
        disclosures,
        more_disclosures,
        fhir_base: crate::fhir::routes::base_url(&state, &headers),
    })
}

#[derive(askama::Template)]
#[template(path = "my_print.html")]
struct PrintPage {
    r: OwnRecord,
    printed_at: String,
}

/// `GET /my/record/print`: the record as one printable page (the browser prints it or
/// saves it as a PDF). Audited as an export.
pub async fn print(State(state): State<AppState>, audit: Audit, u: WebUser) -> Response {
    let me = match own(&u) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    crate::portal::audit_own(&audit, Action::Export, &me);
    audit.context("format", ContextValue::Code("html"));
    match own_record(&state, &me).await {
        Ok(r) => render(&PrintPage {
            r,
            printed_at: display_time(&crate::clock::timestamp(state.clock().now())),
        }),
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

/// `GET /my/record.json`: the record as a FHIR Bundle file. Audited as an export.
pub async fn download(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    headers: HeaderMap,
) -> Response {
    let me = match own(&u) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    crate::portal::audit_own(&audit, Action::Export, &me);
    audit.context("format", ContextValue::Code("fhir_json"));
    let base = crate::fhir::routes::base_url(&state, &headers);
    match crate::portal::record_bundle(&state, &me, &base).await {
        Ok(b) => crate::portal::routes::download(b.to_string()),
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

#[derive(Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(askama::Template)]
#[template(path = "my_disclosures.html")]
struct DisclosuresPage {
    layout: Layout,
    disclosures: Vec<Disclosed>,
    next: Option<String>,
}

/// `GET /my/disclosures`: the whole accounting, 100 a page.
pub async fn disclosures(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<PageQuery>,
) -> Response {
    let me = match own(&u) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("disclosures");
        a.context.insert("patient_id", ContextValue::id(&me));
    });
    match accounting_for(
        &state,
        &me,
        q.cursor.as_deref(),
        100,
        Some(&u.principal.user_id),
    )
    .await
    {
        Ok(p) => render(&DisclosuresPage {
            layout: Layout::of(&state, &u, None),
            disclosures: p.items.into_iter().map(super::clinic::disclosed).collect(),
            next: p.next_cursor,
        }),
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}
