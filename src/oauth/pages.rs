//! The pages of the authorization server: `/oauth/authorize` (sign-in with the
//! Custodian account, the patient picker of a standalone launch, the consent page), the
//! EHR launch from a chart, each person's "Connected apps" and the administrators'
//! apps page. Server-rendered like every page here, under the same CSP.

use askama::Template;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use url::Url;

use super::scopes::Scopes;
use super::store::ClientRow;
use super::{Approved, NewApp, OAuthError};
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue, Outcome};
use crate::crypto;
use crate::http::path::Path;
use crate::web::pages::{Layout, render, render_status};
use crate::web::session::{WebForm, WebUser, signed_in_user};

const CONSENT_PURPOSE: &str = "custodian/oauth/consent/v1";
/// How long a consent page may be left open.
const CONSENT_SECONDS: i64 = 600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/oauth/authorize", get(authorize_get).post(authorize_post))
        .route("/oauth/consent", post(consent))
        .route("/patients/{id}/launch", post(launch))
        .route("/account/apps", get(my_apps))
        .route("/account/apps/{id}/revoke", post(revoke_mine))
        .route("/admin/apps", get(admin_apps).post(register))
        .route("/admin/apps/{id}/delete", post(delete_app))
        .route("/admin/apps/{id}/revoke-grants", post(revoke_app_grants))
        .route("/admin/grants/{id}/revoke", post(revoke_any))
}

/// A page that moves on by itself.
#[derive(Template)]
#[template(path = "oauth_continue.html")]
struct Continue {
    layout: Layout,
    next: String,
}

#[derive(Template)]
#[template(path = "oauth_message.html")]
struct MessagePage {
    layout: Layout,
    heading: &'static str,
    text: String,
}

fn message(status: StatusCode, heading: &'static str, text: impl Into<String>) -> Response {
    render_status(
        status,
        &MessagePage {
            layout: Layout::anonymous(None),
            heading,
            text: text.into(),
        },
    )
}

fn audit_authorization(audit: &Audit, client_id: Option<&str>) {
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("oauth_authorization");
        if let Some(c) = client_id {
            a.context.insert("client_id", ContextValue::id(c));
        }
    });
}

fn denied(audit: &Audit, code: &'static str) {
    audit.annotate(|a| {
        a.outcome = Some(Outcome::Denied);
        a.context.insert("error", ContextValue::Code(code));
    });
}

/// Back to the app with an RFC 6749 §4.1.2.1 error (only once its redirect URI is known
/// to be registered).
fn to_app_error(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Response {
    let Ok(mut u) = Url::parse(redirect_uri) else {
        return message(StatusCode::BAD_REQUEST, "Sign-in refused", description);
    };
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("error", error);
        q.append_pair("error_description", description);
        if let Some(s) = state {
            q.append_pair("state", s);
        }
    }
    Redirect::to(u.as_str()).into_response()
}

/// The parameters of an authorization request; a parameter sent twice is refused.
fn params(
    pairs: Vec<(String, String)>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut m = std::collections::BTreeMap::new();
    for (k, v) in pairs {
        if m.insert(k.clone(), v).is_some() {
            return Err(k);
        }
    }
    Ok(m)
}

/// Whether `aud` names this server's FHIR base.
pub fn is_own_base(state: &AppState, headers: &HeaderMap, aud: &str) -> bool {
    let aud = aud.trim().trim_end_matches('/');
    if aud.is_empty() {
        return false;
    }
    aud == crate::fhir::routes::base_url(state, headers)
        || state
            .own_fhir_bases()
            .iter()
            .any(|b| b.trim_end_matches('/') == aud)
}

async fn authorize_get(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> = q
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    authorize(&state, &audit, &headers, pairs).await
}

async fn authorize_post(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    authorize(&state, &audit, &headers, pairs).await
}

struct PickRow {
    id: String,
    name: String,
    birth_date: String,
    mrn: String,
}

struct ScopeRow {
    value: String,
    words: String,
    role_allows: bool,
}

#[derive(Template)]
#[template(path = "oauth_consent.html")]
struct ConsentPage {
    layout: Layout,
    app: String,
    request: String,
    scopes: Vec<ScopeRow>,
    offline: bool,
    need_patient: bool,
    patient_name: Option<String>,
    picker_q: String,
    picker_fields: Vec<(String, String)>,
    picks: Vec<PickRow>,
    can_pick: bool,
}

/// Whether a resource scope is usable at all under the person's role (the effective
/// access is the intersection of both, decided on every request).
fn role_allows(u: &WebUser, r: &super::scopes::ResourceScope) -> bool {
    if u.principal.patient.is_some() {
        // A patient account reads its own record, and writes nothing through apps.
        return r.level == super::scopes::Level::Patient
            && !r.ops.contains(super::scopes::Ops::C)
            && !r.ops.contains(super::scopes::Ops::U)
            && !r.ops.contains(super::scopes::Ops::D);
    }
    let types: Vec<crate::fhir::resources::ResourceType> = match &r.resource {
        None => crate::fhir::resources::ResourceType::ALL.to_vec(),
        Some(t) => crate::fhir::resources::ResourceType::parse(t)
            .into_iter()
            .collect(),
    };
    let reads = r.ops.contains(super::scopes::Ops::R) || r.ops.contains(super::scopes::Ops::S);
    let writes = r.ops.contains(super::scopes::Ops::C)
        || r.ops.contains(super::scopes::Ops::U)
        || r.ops.contains(super::scopes::Ops::D);
    types
        .iter()
        .any(|t| (!reads || u.can(t.read_permission())) && (!writes || u.can(t.write_permission())))
}

async fn authorize(
    state: &AppState,
    audit: &Audit,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Response {
    audit_authorization(audit, None);
    let kept: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "picker_q" && k != "_same_site")
        .cloned()
        .collect();
    let raw_query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept.iter())
        .finish();
    let p = match params(pairs) {
        Ok(p) => p,
        Err(k) => {
            denied(audit, "invalid_request");
            return message(
                StatusCode::BAD_REQUEST,
                "Sign-in refused",
                format!("The app sent the parameter {k} twice. Tell the app's maker."),
            );
        }
    };
    let get = |k: &str| p.get(k).map(String::as_str);
    let client_id = get("client_id").unwrap_or_default();
    // The client it claims to be, recorded whatever the outcome.
    audit_authorization(audit, Some(client_id));
    // An unknown app or redirect URI gets a page, never a redirect (no open redirect).
    let (app, redirect_uri) = match state
        .oauth()
        .app_and_redirect(client_id, get("redirect_uri"))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            denied(audit, e.code());
            let text = match e {
                OAuthError::InvalidClient => {
                    "This app is not registered with this server (unknown client_id). Ask an administrator to register it."
                }
                OAuthError::Store(_) => "The server could not answer. Try again in a moment.",
                _ => {
                    "The app asked to send you back to an address that is not registered for it. Nothing was shared."
                }
            };
            return message(StatusCode::BAD_REQUEST, "Sign-in refused", text);
        }
    };
    audit_authorization(audit, Some(&app.id));
    let st = get("state");
    let fail = |code: &'static str, text: &str| {
        denied(audit, code);
        to_app_error(&redirect_uri, code, text, st)
    };
    if get("response_type") != Some("code") {
        return fail("unsupported_response_type", "response_type must be code");
    }
    if get("code_challenge_method") != Some("S256") {
        return fail(
            "invalid_request",
            "PKCE is required: code_challenge_method must be S256",
        );
    }
    let challenge = get("code_challenge").unwrap_or_default();
    if !(43..=128).contains(&challenge.len())
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return fail(
            "invalid_request",
            "code_challenge must be the base64url SHA-256 of the verifier",
        );
    }
    if !is_own_base(state, headers, get("aud").unwrap_or_default()) {
        return fail("invalid_request", "aud must be this server's FHIR base URL");
    }
    let (asked, _) = Scopes::parse(get("scope").unwrap_or_default());
    let (allowed, _) = Scopes::parse(&app.scopes);
    let offered = asked.within(&allowed);
    if offered.resources.is_empty() {
        return fail(
            "invalid_scope",
            "none of the scopes asked for is one this app may have",
        );
    }
    // Sign in with the Custodian account (password, second factor, the same lockout
    // and audit as every sign-in), then come back here.
    let Some(user) = signed_in_user(state, headers, Some(audit)).await else {
        // An app sends the browser here from its own site, and the session cookie is
        // SameSite=Strict: not sent on that navigation. One page of our own that moves
        // on by itself makes the next request same-site, so a person already signed
        // in is not asked to sign in again. Only once (`_same_site`).
        if !p.contains_key("_same_site") {
            return render(&Continue {
                layout: Layout::anonymous(None),
                next: format!("/oauth/authorize?{raw_query}&_same_site=1"),
            });
        }
        let next = format!("/oauth/authorize?{raw_query}");
        let mut to = form_urlencoded::Serializer::new(String::new());
        to.append_pair("next", &next);
        return Redirect::to(&format!("/login?{}", to.finish())).into_response();
    };
    if user.principal.mfa_enrollment_pending {
        return fail(
            "access_denied",
            "the account must set up its second factor first",
        );
    }
    let Some(session_id) = user.principal.session_id().map(str::to_owned) else {
        return fail("access_denied", "sign in again");
    };
    // A patient account grants apps its own record only: `patient/` scopes, its own
    // patient as the launch patient, no picker.
    let mut offered = offered;
    if user.principal.patient.is_some() {
        offered
            .resources
            .retain(|r| r.level == super::scopes::Level::Patient);
        if offered.resources.is_empty() {
            return fail(
                "invalid_scope",
                "a patient account allows apps patient/ scopes (its own record) only",
            );
        }
    }
    let (launch_patient, ehr_launch) = match get("launch") {
        None if user.principal.patient.is_some() => (user.principal.patient.clone(), false),
        None => (None, false),
        Some(l) => match state
            .oauth()
            .spend_launch(l, &app.id, &user.principal.user_id)
            .await
        {
            Ok(patient) => (Some(patient), true),
            Err(e) => return fail("invalid_request", e.description()),
        },
    };
    let approved = Approved {
        client_id: app.id.clone(),
        redirect_uri: redirect_uri.clone(),
        redirect_given: get("redirect_uri").is_some(),
        state: st.map(str::to_owned),
        challenge: challenge.to_owned(),
        scope: offered.to_string(),
        launch_patient: launch_patient.clone(),
        ehr_launch,
    };
    let until = state.clock().now().unix_timestamp() + CONSENT_SECONDS;
    let sealed = match serde_json::to_vec(&(until, &approved))
        .ok()
        .and_then(|json| {
            crypto::seal(state.keys(), CONSENT_PURPOSE, session_id.as_bytes(), &json).ok()
        }) {
        Some(s) => s,
        None => return fail("server_error", "the server could not answer"),
    };
    let need_patient = offered.has_patient_level() && launch_patient.is_none();
    let mut page = ConsentPage {
        layout: Layout::of(state, &user, None),
        app: app.name.clone(),
        request: sealed,
        scopes: offered
            .resources
            .iter()
            .map(|r| ScopeRow {
                value: r.to_string(),
                words: r.describe(),
                role_allows: role_allows(&user, r),
            })
            .collect(),
        offline: offered.offline_access,
        need_patient,
        patient_name: None,
        picker_q: String::new(),
        picker_fields: kept,
        picks: Vec::new(),
        can_pick: user.can(Permission::PatientsRead),
    };
    if let Some(pid) = &launch_patient {
        audit.annotate(|a| a.patient_id = Some(pid.clone()));
        if let Ok(pt) = state.patients().get(pid).await {
            page.patient_name = Some(format!(
                "{}, {} (born {})",
                pt.fields.family_name, pt.fields.given_name, pt.fields.birth_date
            ));
            audit.name_patients(Action::Read, [pid.as_str()]);
        }
    }
    if need_patient && page.can_pick {
        // The picker: what this person may find, through the same search as /patients.
        let q: String = p
            .get("picker_q")
            .map(|s| s.trim().chars().take(200).collect())
            .unwrap_or_default();
        if !q.is_empty() {
            let by_ssn = user.can(Permission::PhiSsn);
            if let Ok(found) = state.patients().find(&q, by_ssn, false, 0, 25).await {
                audit.name_patients(Action::Read, found.patients.iter().map(|p| p.id.as_str()));
                page.picks = found
                    .patients
                    .iter()
                    .map(|p| PickRow {
                        id: p.id.clone(),
                        name: format!("{}, {}", p.fields.family_name, p.fields.given_name),
                        birth_date: p.fields.birth_date.clone(),
                        mrn: p.fields.mrn.clone(),
                    })
                    .collect();
            }
        }
        page.picker_q = q;
    }
    let mut r = render(&page);
    // The consent form posts here, and the answer is a redirect to the app: browsers
    // hold a redirect that follows a form post to `form-action`, so the app's origin
    // is added to it on this page (and only it).
    if let Ok(u) = Url::parse(&redirect_uri) {
        let origin = u.origin().ascii_serialization();
        let csp = crate::http::headers::CSP.replace(
            "form-action 'self'",
            &format!("form-action 'self' {origin}"),
        );
        if origin != "null"
            && let Ok(v) = axum::http::HeaderValue::from_str(&csp)
        {
            r.extensions_mut()
                .insert(crate::http::headers::CspOverride(v));
        }
    }
    r
}

/// `POST /oauth/consent`: the person's decision.
async fn consent(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    audit_authorization(&audit, None);
    let user = &form.user;
    let Some(session_id) = user.principal.session_id() else {
        return message(StatusCode::FORBIDDEN, "Sign-in refused", "Sign in again.");
    };
    let opened = crypto::open(
        state.keys(),
        CONSENT_PURPOSE,
        session_id.as_bytes(),
        &form.fields.text("request"),
    )
    .ok()
    .and_then(|raw| serde_json::from_slice::<(i64, Approved)>(&raw).ok());
    let Some((until, a)) = opened else {
        denied(&audit, "invalid_request");
        return message(
            StatusCode::BAD_REQUEST,
            "This consent page is not valid",
            "It expired, or was opened in another session. Start again from the app.",
        );
    };
    audit_authorization(&audit, Some(&a.client_id));
    let st = a.state.as_deref();
    if state.clock().now().unix_timestamp() > until {
        denied(&audit, "access_denied");
        return to_app_error(
            &a.redirect_uri,
            "access_denied",
            "the consent page expired",
            st,
        );
    }
    if form.fields.text("decision") != "allow" {
        audit.annotate(|e| {
            e.outcome = Some(Outcome::Denied);
            e.context.insert("decision", ContextValue::Code("deny"));
        });
        return to_app_error(
            &a.redirect_uri,
            "access_denied",
            "the person did not allow it",
            st,
        );
    }
    let (offered, _) = Scopes::parse(&a.scope);
    let ticked: Vec<String> = form.fields.all("scope");
    let mut granted = Scopes {
        resources: offered
            .resources
            .iter()
            .filter(|r| ticked.iter().any(|t| *t == r.to_string()))
            .cloned()
            .collect(),
        launch: offered.launch,
        launch_patient: offered.launch_patient,
        offline_access: offered.offline_access && form.fields.text("offline") == "yes",
        online_access: offered.online_access,
    };
    if granted.resources.is_empty() {
        audit.annotate(|e| {
            e.outcome = Some(Outcome::Denied);
            e.context
                .insert("decision", ContextValue::Code("nothing_ticked"));
        });
        return to_app_error(
            &a.redirect_uri,
            "access_denied",
            "the person allowed nothing",
            st,
        );
    }
    // Offline access not allowed: the app still refreshes while the person is signed in.
    if offered.offline_access && !granted.offline_access && offered.online_access {
        granted.online_access = true;
    }
    let mut patient = a.launch_patient.clone();
    if let Some(me) = &user.principal.patient {
        // Checked again at the decision: the request was sealed for this session, but a
        // patient's grant is only ever for their own record, at patient level.
        let only_own = patient.as_deref() == Some(me.as_str())
            && granted
                .resources
                .iter()
                .all(|r| r.level == super::scopes::Level::Patient);
        if !only_own {
            denied(&audit, "access_denied");
            return to_app_error(
                &a.redirect_uri,
                "access_denied",
                "a patient account allows apps its own record only",
                st,
            );
        }
    }
    if granted.has_patient_level() && patient.is_none() {
        let chosen = form.fields.text("patient");
        let readable = user.can(Permission::PatientsRead)
            && crate::audit::model::SafeId::new(&chosen).is_some()
            && state.patients().get(&chosen).await.is_ok();
        if !readable {
            denied(&audit, "invalid_request");
            return message(
                StatusCode::BAD_REQUEST,
                "Choose a patient",
                "This app works on one patient's record: go back, search, and choose the patient.",
            );
        }
        patient = Some(chosen);
    }
    let ups = match state
        .oauth()
        .grant_and_code(
            &a,
            &user.principal.user_id,
            session_id,
            &granted,
            patient.as_deref(),
        )
        .await
    {
        Ok(x) => x,
        Err(e) => {
            audit.annotate(|e| e.outcome = Some(Outcome::Error));
            tracing::error!(error = %e, "a grant could not be stored");
            return to_app_error(
                &a.redirect_uri,
                "server_error",
                "the server could not answer",
                st,
            );
        }
    };
    let (grant, code) = ups;
    audit.annotate(|e| {
        e.action = Some(Action::Create);
        e.resource_type = Some("oauth_grant");
        e.resource_id = Some(grant.id.clone());
        e.patient_id = grant.patient_id.clone();
        e.context.insert("decision", ContextValue::Code("allow"));
        e.context.insert(
            "scopes",
            ContextValue::Int(i64::try_from(granted.resources.len()).unwrap_or(0)),
        );
        e.context.insert(
            "unticked",
            ContextValue::Int(
                i64::try_from(offered.resources.len() - granted.resources.len()).unwrap_or(0),
            ),
        );
    });
    let Ok(mut u) = Url::parse(&a.redirect_uri) else {
        return message(
            StatusCode::BAD_REQUEST,
            "Sign-in refused",
            "The app's address is not valid.",
        );
    };
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("code", code.expose());
        if let Some(s) = st {
            q.append_pair("state", s);
        }
    }
    Redirect::to(u.as_str()).into_response()
}

/// The apps a chart may launch: those with a launch URL.
pub async fn launchable(state: &AppState) -> Vec<(String, String)> {
    state
        .oauth()
        .apps()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.launch_url.is_some())
        .map(|a| (a.id, a.name))
        .collect()
}

/// `POST /patients/{id}/launch`: an EHR launch of an app for this patient.
async fn launch(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("smart_launch");
        a.patient_id = Some(id.clone());
    });
    if let Some(r) = u.refuse(Permission::PatientsRead) {
        return r;
    }
    let client_id = form.fields.text("client_id");
    audit.context("client_id", ContextValue::id(&client_id));
    let app = match state.oauth().app(&client_id).await {
        Ok(a) if a.launch_url.is_some() => a,
        _ => return crate::web::pages::not_found(u),
    };
    if state.patients().get(&id).await.is_err() {
        return crate::web::pages::not_found(u);
    }
    let Some(session_id) = u.principal.session_id() else {
        return crate::web::pages::not_found(u);
    };
    let launch = match state
        .oauth()
        .new_launch(&app.id, &u.principal.user_id, session_id, &id)
        .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "a launch could not be stored");
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Launch failed",
                "Try again.",
            );
        }
    };
    let iss = crate::fhir::routes::base_url(&state, &headers);
    let target = app.launch_url.unwrap_or_default();
    let sep = if target.contains('?') { '&' } else { '?' };
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("iss", &iss)
        .append_pair("launch", launch.expose())
        .finish();
    Redirect::to(&format!("{target}{sep}{query}")).into_response()
}

// ---- connected apps --------------------------------------------------------------------

struct GrantRowView {
    id: String,
    app: String,
    username: String,
    patient: String,
    /// The patient's name, when the page may show it.
    patient_name: String,
    allows: Vec<String>,
    offline: bool,
    created_at: String,
    last_used_at: String,
}

fn grant_rows(list: Vec<super::store::GrantRow>) -> Vec<GrantRowView> {
    list.into_iter()
        .map(|g| {
            let (s, _) = Scopes::parse(&g.scopes);
            GrantRowView {
                allows: s.resources.iter().map(|r| r.describe()).collect(),
                offline: s.offline_access,
                id: g.id,
                app: g.client_name,
                username: g.username,
                patient: g.patient_id.unwrap_or_default(),
                patient_name: String::new(),
                created_at: g.created_at,
                last_used_at: g.last_used_at.unwrap_or_else(|| "never".into()),
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "my_apps.html")]
struct MyAppsPage {
    layout: Layout,
    grants: Vec<GrantRowView>,
}

async fn my_apps(State(state): State<AppState>, audit: Audit, u: WebUser) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("oauth_grant");
    });
    let grants = state
        .oauth()
        .grants(Some(&u.principal.user_id), None)
        .await
        .unwrap_or_default();
    let mut rows = grant_rows(grants);
    // The patients by name for whoever may read them (named in the audit trail).
    if u.can(Permission::PatientsRead) {
        let mut shown = Vec::new();
        for r in rows.iter_mut().filter(|r| !r.patient.is_empty()) {
            if let Ok(p) = state.patients().get(&r.patient).await {
                r.patient_name = format!("{}, {}", p.fields.family_name, p.fields.given_name);
                shown.push(r.patient.clone());
            }
        }
        audit.name_patients(Action::Read, shown.iter().map(String::as_str));
    }
    render(&MyAppsPage {
        layout: Layout::of(&state, &u, None),
        grants: rows,
    })
}

async fn revoke_mine(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("oauth_grant");
        a.resource_id = Some(id.clone());
    });
    match state
        .oauth()
        .revoke_grant(&id, Some(&form.user.principal.user_id))
        .await
    {
        Ok(()) => Redirect::to("/account/apps").into_response(),
        Err(_) => crate::web::pages::not_found(&form.user),
    }
}

// ---- the administrators' apps page -----------------------------------------------------

struct AppRowView {
    id: String,
    name: String,
    kind: &'static str,
    redirect_uris: String,
    launch_url: String,
    scopes: String,
    builtin: bool,
}

#[derive(Template)]
#[template(path = "apps.html")]
struct AppsPage {
    layout: Layout,
    apps: Vec<AppRowView>,
    grants: Vec<GrantRowView>,
    errors: Vec<String>,
    secret: Option<(String, String)>,
    form_name: String,
    form_uris: String,
    form_launch: String,
    form_scopes: String,
    form_confidential: bool,
}

fn app_row(a: ClientRow) -> AppRowView {
    AppRowView {
        kind: if a.confidential {
            "confidential"
        } else {
            "public"
        },
        redirect_uris: a.redirect_uris.join("\n"),
        launch_url: a.launch_url.unwrap_or_default(),
        id: a.id,
        name: a.name,
        scopes: a.scopes,
        builtin: a.builtin,
    }
}

async fn apps_page(state: &AppState, u: &WebUser, notice: Option<String>) -> AppsPage {
    let apps = state.oauth().apps().await.unwrap_or_default();
    let grants = state.oauth().grants(None, None).await.unwrap_or_default();
    AppsPage {
        layout: Layout::of(state, u, notice),
        apps: apps.into_iter().map(app_row).collect(),
        grants: grant_rows(grants),
        errors: Vec::new(),
        secret: None,
        form_name: String::new(),
        form_uris: String::new(),
        form_launch: String::new(),
        form_scopes: crate::config::DEFAULT_SMART_SCOPES
            .split_whitespace()
            .filter(|s| !matches!(*s, "openid" | "fhirUser"))
            .collect::<Vec<_>>()
            .join(" "),
        form_confidential: false,
    }
}

async fn admin_apps(State(state): State<AppState>, audit: Audit, u: WebUser) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("oauth_client");
    });
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    render(&apps_page(&state, &u, None).await)
}

async fn register(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("oauth_client");
    });
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    let f = &form.fields;
    let app = NewApp {
        name: f.text("name"),
        confidential: f.text("client_type") == "confidential",
        redirect_uris: f
            .text("redirect_uris")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        launch_url: Some(f.text("launch_url")),
        scopes: f.text("scopes"),
    };
    match state.oauth().register(&u.principal.user_id, &app).await {
        Ok((row, secret)) => {
            audit.annotate(|a| a.resource_id = Some(row.id.clone()));
            let mut page = apps_page(&state, u, Some(format!("{} is registered.", row.name))).await;
            page.secret = Some((
                row.id.clone(),
                secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
            ));
            let mut r = render(&page);
            r.headers_mut().insert(
                axum::http::header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(OAuthError::Invalid(errors)) => {
            audit.annotate(|a| a.outcome = Some(Outcome::Failure));
            let mut page = apps_page(&state, u, None).await;
            page.errors = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            page.form_name = app.name;
            page.form_uris = app.redirect_uris.join("\n");
            page.form_launch = app.launch_url.unwrap_or_default();
            page.form_scopes = app.scopes;
            page.form_confidential = app.confidential;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &page)
        }
        Err(e) => crate::http::ApiError::from(e).into_response(),
    }
}

/// An administrator's change on the apps page: `users:manage` (checked before the change
/// runs: a future does nothing until awaited), then back to the page.
async fn admin_change<T>(
    form: &WebForm,
    change: impl std::future::Future<Output = Result<T, OAuthError>>,
) -> Response {
    if let Some(r) = form.user.refuse(Permission::UsersManage) {
        return r;
    }
    match change.await {
        Ok(_) => Redirect::to("/admin/apps").into_response(),
        Err(_) => crate::web::pages::not_found(&form.user),
    }
}

async fn delete_app(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("oauth_client");
        a.resource_id = Some(id.clone());
    });
    admin_change(&form, state.oauth().delete(&id)).await
}

async fn revoke_app_grants(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("oauth_grant");
        a.context.insert("client_id", ContextValue::id(&id));
    });
    admin_change(&form, state.oauth().revoke_app(&id)).await
}

async fn revoke_any(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("oauth_grant");
        a.resource_id = Some(id.clone());
    });
    admin_change(&form, state.oauth().revoke_grant(&id, None)).await
}
