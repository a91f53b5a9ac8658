//! The pages of patients' requests: a patient's restrictions and amendment requests
//! (`/my/restrictions`, `/my/amendments`), the reviewers' amendment pages
//! (`/amendments`, `amendments:review`), and the privacy report (`/admin/privacy`,
//! `audit:read`). Each calls the same services as the API.

use crate::http::path::Path;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::pages::{Layout, display_time, forbidden, notice, render};
use super::portal::own;
use super::session::{WebForm, WebUser};
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::ApiError;
use crate::portal::amendments::{self, Amendment, NewAmendment, Target};
use crate::privacy::routes::NewRestriction;

#[derive(Deserialize)]
pub struct OkQuery {
    #[serde(default)]
    ok: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// [`own`], naming the patient in the request's event (`action` on `resource_type`).
fn mine(
    u: &WebUser,
    audit: &Audit,
    action: Action,
    resource_type: &'static str,
    id: Option<&str>,
) -> Result<String, Box<Response>> {
    let me = own(u)?;
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some(resource_type);
        a.resource_id = id.map(str::to_owned);
        a.patient_id = Some(me.clone());
    });
    Ok(me)
}

fn error_page(e: ApiError) -> Response {
    e.into_response()
}

// ---- the patient's restrictions ----------------------------------------------------------

struct RestrictionRow {
    id: String,
    category: String,
    words: String,
    roles: String,
    apps: bool,
    since: String,
}

#[derive(askama::Template)]
#[template(path = "my_restrictions.html")]
struct MyRestrictions {
    layout: Layout,
    rows: Vec<RestrictionRow>,
    sensitive: &'static [(&'static str, &'static str)],
    roles: Vec<String>,
    error: Option<String>,
}

async fn my_restrictions_page(
    state: &AppState,
    u: &WebUser,
    me: &str,
    ok: Option<&str>,
    error: Option<String>,
) -> Response {
    let list =
        match crate::privacy::consent::of_patient(state.db(), state.patients(), me, true).await {
            Ok(l) => l,
            Err(e) => return error_page(e.into()),
        };
    let roles = crate::identity::store::roles(state.db())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .filter(|n| n != crate::identity::roles::PATIENT_ROLE)
        .collect();
    render(&MyRestrictions {
        layout: Layout::of(state, u, notice(ok)),
        rows: list
            .iter()
            .map(|s| {
                let r = &s.restriction;
                RestrictionRow {
                    id: r.id.clone(),
                    category: r.category.clone(),
                    words: crate::privacy::describe(&r.category).to_owned(),
                    roles: if r.roles.is_empty() {
                        "nobody but you".into()
                    } else {
                        r.roles.join(", ")
                    },
                    apps: r.apps,
                    since: display_time(&r.created_at),
                }
            })
            .collect(),
        sensitive: &crate::privacy::SENSITIVE,
        roles,
        error,
    })
}

/// `GET /my/restrictions`.
pub async fn my_restrictions(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<OkQuery>,
) -> Response {
    let me = match mine(&u, &audit, Action::Read, "Consent", None) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    my_restrictions_page(&state, &u, &me, q.ok.as_deref(), None).await
}

/// `POST /my/restrictions`: a new restriction.
pub async fn restrict(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    let me = match mine(u, &audit, Action::Create, "Consent", None) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let req = NewRestriction {
        category: form.fields.text("category"),
        roles: form.fields.all("role"),
        apps: form.fields.text("apps") == "yes",
    };
    match crate::privacy::routes::create_restriction(&state, &me, req).await {
        Ok(s) => {
            audit.annotate(|a| a.resource_id = Some(s.restriction.id.clone()));
            Redirect::to("/my/restrictions?ok=saved").into_response()
        }
        Err(e) => {
            let text = e.detail_text();
            my_restrictions_page(&state, u, &me, None, Some(text)).await
        }
    }
}

/// `POST /my/restrictions/{id}/end`.
pub async fn unrestrict(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    let me = match mine(u, &audit, Action::Update, "Consent", Some(&id)) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    audit.context("change", ContextValue::Code("revoke"));
    let now = crate::clock::timestamp(state.clock().now());
    match crate::privacy::consent::revoke(state.db(), state.patients(), &me, &id, &now).await {
        Ok(()) => Redirect::to("/my/restrictions?ok=deleted").into_response(),
        Err(e) => error_page(e.into()),
    }
}

// ---- the patient's amendment requests ----------------------------------------------------

struct AmendmentView {
    a: Amendment,
    what: String,
    created: String,
    due: String,
}

fn view(a: Amendment) -> AmendmentView {
    AmendmentView {
        what: amendments::describe(&a.target),
        created: display_time(&a.created_at),
        due: display_time(&a.due_at),
        a,
    }
}

#[derive(askama::Template)]
#[template(path = "my_amendments.html")]
struct MyAmendments {
    layout: Layout,
    items: Vec<AmendmentView>,
    /// The choices of what to correct: (value, label).
    targets: Vec<(String, String)>,
    error: Option<String>,
}

async fn my_amendments_page(
    state: &AppState,
    u: &WebUser,
    me: &str,
    ok: Option<&str>,
    error: Option<String>,
) -> Response {
    let items = match amendments::of_patient(state, me, false).await {
        Ok(l) => l,
        Err(e) => return error_page(e.into()),
    };
    let mut targets: Vec<(String, String)> = amendments::PATIENT_FIELDS
        .iter()
        .map(|f| {
            (
                format!("patient:{f}"),
                format!("My details: {}", f.replace('_', " ")),
            )
        })
        .collect();
    if let Ok(records) = state.patients().records(me, "", 200).await {
        for r in records {
            let short: String = r.diagnosis.chars().take(60).collect();
            for f in amendments::RECORD_FIELDS {
                targets.push((
                    format!("record:{}:{f}", r.id),
                    format!("Visit record “{short}”: {f}"),
                ));
            }
        }
    }
    render(&MyAmendments {
        layout: Layout::of(state, u, notice(ok)),
        items: items
            .into_iter()
            .map(|mut a| {
                a.previous = None;
                view(a)
            })
            .collect(),
        targets,
        error,
    })
}

/// `GET /my/amendments`.
pub async fn my_amendments(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<OkQuery>,
) -> Response {
    let me = match mine(&u, &audit, Action::Read, "amendment", None) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    my_amendments_page(&state, &u, &me, q.ok.as_deref(), None).await
}

/// `POST /my/amendments`: a new request.
pub async fn request(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    let me = match mine(u, &audit, Action::Create, "amendment", None) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let target = form.fields.text("target");
    let mut parts = target.splitn(3, ':');
    let t = match (parts.next(), parts.next(), parts.next()) {
        (Some("patient"), Some(f), None) => Target {
            resource: "patient".into(),
            id: None,
            field: Some(f.to_owned()),
        },
        (Some("record"), Some(id), Some(f)) => Target {
            resource: "record".into(),
            id: Some(id.to_owned()),
            field: Some(f.to_owned()),
        },
        _ => Target {
            resource: String::new(),
            id: None,
            field: None,
        },
    };
    let req = NewAmendment {
        target: t,
        requested: form.fields.text("requested"),
        reason: form.fields.text("reason"),
    };
    match amendments::request(&state, &me, &u.principal.user_id, req).await {
        Ok(a) => {
            audit.annotate(|e| e.resource_id = Some(a.id.clone()));
            Redirect::to("/my/amendments?ok=created").into_response()
        }
        Err(e) => {
            let text = e.detail_text();
            my_amendments_page(&state, u, &me, None, Some(text)).await
        }
    }
}

/// `POST /my/amendments/{id}/statement`: a statement of disagreement.
pub async fn statement(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    let me = match mine(u, &audit, Action::Update, "amendment", Some(&id)) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    audit.context("change", ContextValue::Code("statement_of_disagreement"));
    match amendments::disagree(&state, &me, &id, &form.fields.text("statement")).await {
        Ok(_) => Redirect::to("/my/amendments?ok=saved").into_response(),
        Err(e) => {
            let text = e.detail_text();
            my_amendments_page(&state, u, &me, None, Some(text)).await
        }
    }
}

// ---- the reviewers' pages ----------------------------------------------------------------

struct ReviewRow {
    v: AmendmentView,
    patient: String,
}

#[derive(askama::Template)]
#[template(path = "amendments.html")]
struct ReviewList {
    layout: Layout,
    status: String,
    rows: Vec<ReviewRow>,
}

async fn patient_name(state: &AppState, id: &str) -> String {
    match state.patients().get(id).await {
        Ok(p) => format!("{}, {}", p.fields.family_name, p.fields.given_name),
        Err(_) => id.to_owned(),
    }
}

/// `GET /amendments`: requests for review.
pub async fn review_list(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<OkQuery>,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("amendment");
    });
    if let Some(r) = u.refuse(Permission::AmendmentsReview) {
        return r;
    }
    let status = match q.status.as_deref() {
        Some(s @ ("overdue" | "accepted" | "denied")) => s.to_owned(),
        _ => "pending".to_owned(),
    };
    if let Err(e) = amendments::sweep(&state).await {
        tracing::warn!(error = %e, "amendments: the overdue sweep could not run");
    }
    let list = match amendments::list(&state, &status).await {
        Ok(l) => l,
        Err(e) => return error_page(e.into()),
    };
    audit.name_patients(Action::Read, list.iter().map(|a| a.patient_id.as_str()));
    let mut rows = Vec::new();
    for mut a in list {
        if let Err(e) = amendments::screen_text(&state, &u.principal, &mut a).await {
            return error_page(e.into());
        }
        rows.push(ReviewRow {
            patient: patient_name(&state, &a.patient_id).await,
            v: view(a),
        });
    }
    render(&ReviewList {
        layout: Layout::of(&state, &u, notice(q.ok.as_deref())),
        status,
        rows,
    })
}

#[derive(askama::Template)]
#[template(path = "amendment.html")]
struct ReviewPage {
    layout: Layout,
    v: AmendmentView,
    patient: String,
    error: Option<String>,
}

async fn review_page(
    state: &AppState,
    audit: &Audit,
    u: &WebUser,
    id: &str,
    error: Option<String>,
) -> Response {
    let mut a = match amendments::get(state, id).await {
        Ok(a) => a,
        Err(crate::records::service::PhiError::NotFound) => {
            return super::pages::not_found(u);
        }
        Err(e) => return error_page(e.into()),
    };
    audit.annotate(|e| e.patient_id = Some(a.patient_id.clone()));
    if let Err(e) = amendments::screen_text(state, &u.principal, &mut a).await {
        return error_page(e.into());
    }
    render(&ReviewPage {
        layout: Layout::of(state, u, None),
        patient: patient_name(state, &a.patient_id).await,
        v: view(a),
        error,
    })
}

/// `GET /amendments/{id}`: one request, with the accept and deny forms.
pub async fn review(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Path(id): Path<String>,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("amendment");
        a.resource_id = Some(id.clone());
    });
    if let Some(r) = u.refuse(Permission::AmendmentsReview) {
        return r;
    }
    review_page(&state, &audit, &u, &id, None).await
}

/// `POST /amendments/{id}/decide`: accept (with a note) or deny (with a reason).
pub async fn decide(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    let accept = form.fields.text("decision") == "accept";
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("amendment");
        a.resource_id = Some(id.clone());
        a.context.insert(
            "decision",
            ContextValue::Code(if accept { "accept" } else { "deny" }),
        );
    });
    if let Some(r) = u.refuse(Permission::AmendmentsReview) {
        return r;
    }
    let current = match amendments::get(&state, &id).await {
        Ok(a) => a,
        Err(e) => return error_page(e.into()),
    };
    audit.annotate(|e| e.patient_id = Some(current.patient_id.clone()));
    let done = if accept {
        let withheld = match (&current.target.resource[..], &current.target.id) {
            ("record", Some(rid)) => match state.patients().record(rid).await {
                Ok(r) => {
                    crate::privacy::screen_for(&state, &u.principal, &current.patient_id, false)
                        .await
                        .map(|s| s.hides(&r.labels))
                        .unwrap_or(true)
                }
                Err(_) => false,
            },
            _ => false,
        };
        if withheld {
            return forbidden(u);
        }
        let note = Some(form.fields.text("note"));
        amendments::accept(&state, &id, note, &u.principal.user_id).await
    } else {
        amendments::deny(
            &state,
            &id,
            &form.fields.text("reason"),
            &u.principal.user_id,
        )
        .await
    };
    match done {
        Ok(_) => Redirect::to("/amendments?ok=saved").into_response(),
        Err(e) => review_page(&state, &audit, u, &id, Some(e.detail_text())).await,
    }
}

// ---- the privacy report ------------------------------------------------------------------

struct ReportRow {
    patient_id: String,
    patient: String,
    category: String,
    words: String,
    roles: String,
    apps: bool,
    since: String,
}

#[derive(askama::Template)]
#[template(path = "privacy_report.html")]
struct Report {
    layout: Layout,
    restrictions: Vec<ReportRow>,
    overdue: Vec<ReviewRow>,
}

/// `GET /admin/privacy`: every active restriction and every overdue amendment request
/// (`audit:read`).
pub async fn report(State(state): State<AppState>, audit: Audit, u: WebUser) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("Consent");
    });
    if let Some(r) = u.refuse(Permission::AuditRead) {
        return r;
    }
    if let Err(e) = amendments::sweep(&state).await {
        tracing::warn!(error = %e, "amendments: the overdue sweep could not run");
    }
    let (list, overdue) = match (
        crate::privacy::consent::all_active(state.db(), state.patients()).await,
        amendments::list(&state, "overdue").await,
    ) {
        (Ok(l), Ok(o)) => (l, o),
        (Err(e), _) | (_, Err(e)) => return error_page(e.into()),
    };
    audit.name_patients(
        Action::Read,
        list.iter()
            .map(|s| s.restriction.patient_id.as_str())
            .chain(overdue.iter().map(|a| a.patient_id.as_str())),
    );
    let mut restrictions = Vec::new();
    for s in &list {
        let r = &s.restriction;
        restrictions.push(ReportRow {
            patient_id: r.patient_id.clone(),
            patient: patient_name(&state, &r.patient_id).await,
            category: r.category.clone(),
            words: crate::privacy::describe(&r.category).to_owned(),
            roles: if r.roles.is_empty() {
                "nobody".into()
            } else {
                r.roles.join(", ")
            },
            apps: r.apps,
            since: display_time(&r.created_at),
        });
    }
    let mut rows = Vec::new();
    for mut a in overdue {
        if let Err(e) = amendments::screen_text(&state, &u.principal, &mut a).await {
            return error_page(e.into());
        }
        rows.push(ReviewRow {
            patient: patient_name(&state, &a.patient_id).await,
            v: view(a),
        });
    }
    render(&Report {
        layout: Layout::of(&state, &u, None),
        restrictions,
        overdue: rows,
    })
}
