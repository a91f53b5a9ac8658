//! HTTP for the SMART app and the PRECISE-HBR score: the JSON API, the launch and
//! callback, the app page (with what-if overrides) and the plain calculator page.

use std::collections::BTreeSet;

use crate::http::json::QueryParams as Query;
use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::inputs::{self, Gathered};
use super::score::{self, ArcHbr, Inputs, ScoreResult, Sex};
use super::{Smart, SmartError};
use crate::access::{Authorized, Permission, need};
use crate::app::AppState;
use crate::audit::model::SafeId;
use crate::audit::{Action, Actor, Audit, ContextValue, Outcome};
use crate::config::Environment;
use crate::http::headers::{CSP, CspOverride};
use crate::http::json::JsonBody;
use crate::http::{ApiError, FieldError};
use crate::web::pages::{Layout, render_status};
use crate::web::session::{
    self, Fields, WebForm, WebUser, cookie, csrf_ok, csrf_token, set_embedded_cookie,
};

pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(score_api))
}

pub fn web_router() -> Router<AppState> {
    Router::new()
        .route("/smart/launch", get(launch))
        .route("/smart/callback", get(callback))
        .route("/smart/app", get(app).post(app_what_if))
        .route(
            "/smart/calculator",
            get(calculator_form).post(calculator_submit),
        )
}

fn context_cookie(env: Environment) -> &'static str {
    if env == Environment::Dev {
        "custodian_smart"
    } else {
        "__Host-custodian_smart"
    }
}

fn launch_cookie(env: Environment) -> &'static str {
    if env == Environment::Dev {
        "custodian_smart_launch"
    } else {
        "__Host-custodian_smart_launch"
    }
}

/// Lets the configured EHR origins frame this response (`frame-ancestors`), instead of
/// `'none'`; `X-Frame-Options` is then left out. Without origins nothing changes.
pub fn allow_framing(state: &AppState, r: &mut Response) {
    let origins = &state.config().smart.frame_ancestors;
    if origins.is_empty() {
        return;
    }
    let list = origins
        .iter()
        .map(|o| o.trim_end_matches('/'))
        .filter(|o| {
            o.chars()
                .all(|c| c.is_ascii_alphanumeric() || ":/.-[]".contains(c))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let csp = CSP.replace("frame-ancestors 'none'", &format!("frame-ancestors {list}"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        r.extensions_mut().insert(CspOverride(v));
    }
}

// ---- the JSON API ----------------------------------------------------------------------------

/// The inputs of `POST /api/v1/precise-hbr/score`. Units: hemoglobin g/dL, egfr
/// mL/min/1.73 m², wbc and platelets 10⁹/L, creatinine mg/dL. A null or absent number is
/// unknown.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub age: Option<f64>,
    pub hemoglobin: Option<f64>,
    pub egfr: Option<f64>,
    pub wbc: Option<f64>,
    /// Used with `age` and `sex` (CKD-EPI 2021) when `egfr` is absent.
    pub creatinine: Option<f64>,
    pub sex: Option<Sex>,
    /// Below 100 counts as the thrombocytopenia ARC-HBR element.
    pub platelets: Option<f64>,
    pub prior_bleeding: Option<bool>,
    pub oral_anticoagulation: Option<bool>,
    /// Any of `thrombocytopenia`, `bleeding_diathesis`, `cirrhosis_portal_hypertension`,
    /// `active_cancer`, `recent_surgery_trauma`, `nsaid_steroid`.
    #[serde(default)]
    pub arc_hbr: Vec<String>,
}

fn to_inputs(r: &ScoreRequest) -> Result<Inputs, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut arc = BTreeSet::new();
    for (i, a) in r.arc_hbr.iter().enumerate() {
        match ArcHbr::parse(a) {
            Some(x) => {
                arc.insert(x);
            }
            None => errors.push(FieldError::new(
                format!("arc_hbr[{i}]"),
                "is not an ARC-HBR element this score counts",
            )),
        }
    }
    let inputs = Inputs {
        age: r.age,
        hemoglobin: r.hemoglobin,
        egfr: r.egfr,
        wbc: r.wbc,
        creatinine: r.creatinine,
        sex: r.sex,
        platelets: r.platelets,
        prior_bleeding: r.prior_bleeding.unwrap_or(false),
        oral_anticoagulation: r.oral_anticoagulation.unwrap_or(false),
        arc_hbr: arc,
    };
    if let Err(out) = score::validate(&inputs) {
        errors.extend(out.into_iter().map(|e| FieldError::new(e.field, e.message)));
    }
    if errors.is_empty() {
        Ok(inputs)
    } else {
        Err(errors)
    }
}

fn audit_calculation(audit: &Audit, r: &ScoreResult) {
    audit.annotate(|a| {
        a.action = Some(Action::Calculate);
        a.resource_type = Some("precise_hbr");
        a.context.insert("complete", ContextValue::Bool(r.complete));
        a.context
            .insert("missing", ContextValue::Int(r.missing.len() as i64));
    });
}

/// Computes the PRECISE-HBR score (needs `records:read`). The calculation is audited
/// without its values.
#[utoipa::path(post, path = "/api/v1/precise-hbr/score", tag = "precise-hbr", security(("bearer" = ["records:read"])),
    request_body = ScoreRequest,
    responses((status = 200, description = "The score", body = ScoreResult),
        (status = 403, description = "forbidden"),
        (status = 422, description = "validation_error: an input out of its physical range or an unknown ARC-HBR element")))]
pub async fn score_api(
    audit: Audit,
    _auth: Authorized<need::RecordsRead>,
    JsonBody(req): JsonBody<ScoreRequest>,
) -> Result<axum::Json<ScoreResult>, ApiError> {
    let inputs = to_inputs(&req).map_err(ApiError::validation)?;
    let r = score::compute(&inputs);
    audit_calculation(&audit, &r);
    Ok(axum::Json(r))
}

// ---- pages -----------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "smart_message.html")]
struct SmartMessage {
    layout: Layout,
    heading: &'static str,
    text: String,
    code: &'static str,
    relaunch: bool,
}

struct Failure {
    status: StatusCode,
    code: &'static str,
    heading: &'static str,
    relaunch: bool,
}

fn failure(e: &SmartError) -> Option<Failure> {
    let f = |status, code, heading, relaunch| {
        Some(Failure {
            status,
            code,
            heading,
            relaunch,
        })
    };
    match e {
        SmartError::Disabled => f(
            StatusCode::NOT_FOUND,
            "smart_disabled",
            "The SMART app is off",
            false,
        ),
        SmartError::IssuerNotAllowed => f(
            StatusCode::BAD_REQUEST,
            "issuer_not_allowed",
            "This EHR is not allowed",
            false,
        ),
        SmartError::LaunchInvalid => f(
            StatusCode::BAD_REQUEST,
            "launch_invalid",
            "This launch cannot be completed",
            true,
        ),
        SmartError::Denied(_) => f(
            StatusCode::BAD_REQUEST,
            "launch_denied",
            "The EHR did not authorize the app",
            true,
        ),
        SmartError::TokenRefused(_) => f(
            StatusCode::BAD_REQUEST,
            "token_refused",
            "The EHR refused the sign-in",
            true,
        ),
        SmartError::NoPatient => f(
            StatusCode::BAD_REQUEST,
            "no_patient",
            "No patient was selected",
            true,
        ),
        SmartError::Relaunch => f(
            StatusCode::UNAUTHORIZED,
            "smart_relaunch_required",
            "Launch the app again",
            true,
        ),
        SmartError::SessionEnded => f(
            StatusCode::UNAUTHORIZED,
            "session_ended",
            "Your session has ended",
            true,
        ),
        SmartError::Forbidden => f(StatusCode::FORBIDDEN, "forbidden", "Not allowed", false),
        SmartError::FhirUnavailable(_) => f(
            StatusCode::SERVICE_UNAVAILABLE,
            "fhir_unavailable",
            "The EHR's FHIR server is unavailable",
            false,
        ),
        SmartError::FhirForbidden => f(
            StatusCode::FORBIDDEN,
            "fhir_forbidden",
            "The EHR refused access to this data",
            false,
        ),
        SmartError::FhirNotFound => f(
            StatusCode::NOT_FOUND,
            "not_found",
            "The patient was not found",
            false,
        ),
        SmartError::FhirBadResponse(_) => f(
            StatusCode::BAD_GATEWAY,
            "fhir_bad_response",
            "The EHR's answer could not be used",
            false,
        ),
        SmartError::Store(_) | SmartError::Crypto | SmartError::Internal(_) => None,
    }
}

fn smart_error(
    state: &AppState,
    audit: &Audit,
    user: Option<&WebUser>,
    e: &SmartError,
) -> Response {
    let Some(f) = failure(e) else {
        return ApiError::internal(anyhow::anyhow!("SMART: {e}")).into_response();
    };
    tracing::warn!(code = f.code, error = %e, "SMART app step failed");
    audit.annotate(|a| {
        if a.resource_type.is_none() {
            a.resource_type = Some("smart_launch");
        }
        a.outcome = Some(if f.status == StatusCode::FORBIDDEN {
            Outcome::Denied
        } else {
            Outcome::Failure
        });
        a.context.insert("reason", ContextValue::Code(f.code));
    });
    let layout = match user {
        Some(u) => Layout::of(state, u, None),
        None => Layout::anonymous(None),
    };
    let mut r = render_status(
        f.status,
        &SmartMessage {
            layout,
            heading: f.heading,
            text: e.to_string(),
            code: f.code,
            relaunch: f.relaunch,
        },
    );
    allow_framing(state, &mut r);
    if matches!(e, SmartError::Forbidden) {
        // The user's role lacks `records:read`: recorded as `permission_denied`.
        r.extensions_mut()
            .insert(crate::http::error::PermissionRefused);
    }
    r
}

fn smart(state: &AppState) -> &Smart {
    state.smart()
}

#[derive(Deserialize)]
pub struct LaunchQuery {
    iss: Option<String>,
    launch: Option<String>,
}

/// The redirect URI: configured, or (dev only) this server as the browser reached it.
fn redirect_uri(state: &AppState, headers: &HeaderMap) -> Option<String> {
    if let Some(u) = &state.config().smart.redirect_uri {
        return Some(u.clone());
    }
    if state.config().env != Environment::Dev {
        return None;
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plain = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".:-[]".contains(c));
    let scheme = if state.config().serves_tls() {
        "https"
    } else {
        "http"
    };
    plain.then(|| format!("{scheme}://{host}/smart/callback"))
}

/// `GET /smart/launch?iss=&launch=`: starts a SMART App Launch (EHR launch with
/// `launch`, standalone without).
pub async fn launch(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    Query(q): Query<LaunchQuery>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("smart_launch"));
    let iss = q.iss.unwrap_or_default();
    // The allow-list first: nothing leaves this server for an unknown `iss`.
    if let Err(e) = smart(&state).allowed(&iss) {
        return smart_error(&state, &audit, None, &e);
    }
    let launch = q.launch.filter(|l| !l.is_empty() && l.len() <= 1024);
    let Some(user) = session::signed_in_user(&state, &headers, Some(&audit)).await else {
        let mut back = url::form_urlencoded::Serializer::new(String::new());
        back.append_pair("iss", &iss);
        if let Some(l) = &launch {
            back.append_pair("launch", l);
        }
        let next = format!("/smart/launch?{}", back.finish());
        let mut to = url::form_urlencoded::Serializer::new(String::new());
        to.append_pair("next", &next);
        return Redirect::to(&format!("/login?{}", to.finish())).into_response();
    };
    if let Some(r) = user.refuse(Permission::RecordsRead) {
        return r;
    }
    let Some(redirect) = redirect_uri(&state, &headers) else {
        return ApiError::internal(anyhow::anyhow!(
            "smart.redirect_uri is not set (required outside dev)"
        ))
        .into_response();
    };
    match smart(&state)
        .start(&user.principal, &iss, launch.as_deref(), &redirect)
        .await
    {
        Ok(started) => {
            audit.annotate(|a| {
                a.action = Some(Action::Access);
                a.context.insert(
                    "kind",
                    ContextValue::Code(if launch.is_some() {
                        "ehr"
                    } else {
                        "standalone"
                    }),
                );
            });
            let mut r = Redirect::to(started.authorize_url.as_str()).into_response();
            r.headers_mut().append(
                header::SET_COOKIE,
                set_embedded_cookie(
                    launch_cookie(state.config().env),
                    Some(started.binding.expose()),
                ),
            );
            r
        }
        Err(e) => smart_error(&state, &audit, Some(&user), &e),
    }
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /smart/callback?code=&state=`: completes the launch.
pub async fn callback(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("smart_launch"));
    let env = state.config().env;
    let clear_launch = set_embedded_cookie(launch_cookie(env), None);
    let mut r = match (q.state.as_deref(), q.code.as_deref(), q.error.as_deref()) {
        (Some(st), _, Some(err)) => {
            // Spend the state so it cannot be replayed, then say what the EHR said.
            let _ =
                super::store::take_launch(state.db(), &crate::crypto::sha256_hex(st.as_bytes()))
                    .await;
            let code =
                if err.len() <= 40 && err.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    err.to_owned()
                } else {
                    "unknown".into()
                };
            smart_error(&state, &audit, None, &SmartError::Denied(code))
        }
        (Some(st), Some(code), None) if st.len() <= 256 && code.len() <= 4096 => {
            let binding = cookie(&headers, launch_cookie(env));
            match smart(&state).complete(st, code, binding).await {
                Ok((cookie_value, principal, patient)) => {
                    audit.set_actor(Actor::user(&principal.user_id, &principal.username));
                    audit.annotate(|a| {
                        a.action = Some(Action::Login);
                        a.resource_type = Some("smart_launch");
                        a.resource_id = SafeId::new(&patient).map(|_| patient.clone());
                    });
                    let mut r = Redirect::to("/smart/app").into_response();
                    r.headers_mut().append(
                        header::SET_COOKIE,
                        set_embedded_cookie(context_cookie(env), Some(cookie_value.expose())),
                    );
                    r
                }
                Err(e) => smart_error(&state, &audit, None, &e),
            }
        }
        _ => smart_error(&state, &audit, None, &SmartError::LaunchInvalid),
    };
    r.headers_mut().append(header::SET_COOKIE, clear_launch);
    r
}

// ---- the score page ---------------------------------------------------------------------------

struct Row {
    label: &'static str,
    value: String,
    points: String,
    source: String,
    overridden: bool,
}

struct PatientHeader {
    name: String,
    birth_date: String,
    gender: String,
    fhir_id: String,
    server: String,
}

struct FormValues {
    age: String,
    hemoglobin: String,
    egfr: String,
    wbc: String,
    platelets: String,
    creatinine: String,
    sex: String,
    prior_bleeding: bool,
    oral_anticoagulation: bool,
    arc: Vec<(&'static str, &'static str, bool)>,
}

#[derive(Template)]
#[template(path = "precise_hbr.html")]
struct ScorePage {
    layout: Layout,
    action: &'static str,
    patient: Option<PatientHeader>,
    computed: bool,
    score: i64,
    complete: bool,
    category: String,
    category_class: &'static str,
    risk_text: String,
    rows: Vec<Row>,
    missing: Vec<&'static str>,
    notes: Vec<String>,
    errors: Vec<String>,
    overrides: Vec<&'static str>,
    form: FormValues,
}

fn fmt_num(v: Option<f64>) -> String {
    v.map(|x| {
        let r = (x * 100.0).round() / 100.0;
        format!("{r}")
    })
    .unwrap_or_default()
}

fn form_values(i: &Inputs) -> FormValues {
    FormValues {
        age: fmt_num(i.age),
        hemoglobin: fmt_num(i.hemoglobin),
        egfr: fmt_num(i.egfr),
        wbc: fmt_num(i.wbc),
        platelets: fmt_num(i.platelets),
        creatinine: fmt_num(i.creatinine),
        sex: match i.sex {
            Some(Sex::Male) => "male".into(),
            Some(Sex::Female) => "female".into(),
            None => String::new(),
        },
        prior_bleeding: i.prior_bleeding,
        oral_anticoagulation: i.oral_anticoagulation,
        arc: ArcHbr::ALL
            .iter()
            .filter(|a| **a != ArcHbr::Thrombocytopenia)
            .map(|a| (a.as_str(), a.label(), i.arc_hbr.contains(a)))
            .collect(),
    }
}

fn label(name: &str) -> &'static str {
    match name {
        "age" => "Age (years)",
        "hemoglobin" => "Hemoglobin (g/dL)",
        "egfr" => "eGFR (mL/min/1.73 m²)",
        "wbc" => "White blood cells (10⁹/L)",
        "prior_bleeding" => "Previous bleeding",
        "oral_anticoagulation" => "Long-term oral anticoagulation",
        "arc_hbr" => "≥ 1 additional ARC-HBR element",
        _ => "Other",
    }
}

/// Which source lines explain a component.
fn source_names(component: &str) -> &'static [&'static str] {
    match component {
        "age" => &["age"],
        "hemoglobin" => &["hemoglobin"],
        "egfr" => &["egfr", "creatinine"],
        "wbc" => &["wbc"],
        "prior_bleeding" => &["prior_bleeding"],
        "oral_anticoagulation" => &["oral_anticoagulation"],
        "arc_hbr" => &[
            "platelets",
            "bleeding_diathesis",
            "cirrhosis_portal_hypertension",
            "active_cancer",
            "recent_surgery_trauma",
            "nsaid_steroid",
        ],
        _ => &[],
    }
}

fn page(
    layout: Layout,
    action: &'static str,
    patient: Option<PatientHeader>,
    inputs: &Inputs,
    gathered: Option<&Gathered>,
    overrides: Vec<&'static str>,
) -> ScorePage {
    let r = score::compute(inputs);
    let rows = r
        .components
        .iter()
        .map(|c| {
            let names = source_names(c.name);
            let overridden = overrides.iter().any(|o| names.contains(o) || *o == c.name);
            let source = if overridden {
                "What-if override (entered here)".to_owned()
            } else if let Some(g) = gathered {
                let lines: Vec<String> = g
                    .sources
                    .iter()
                    .filter(|s| names.contains(&s.input))
                    .map(|s| {
                        let date = if s.date.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", s.date)
                        };
                        format!("{}{date}: {}", s.resource, s.recorded)
                    })
                    .collect();
                if lines.is_empty() {
                    if c.value.is_null() {
                        "Not found".to_owned()
                    } else {
                        "None found".to_owned()
                    }
                } else {
                    lines.join("; ")
                }
            } else {
                "Entered here".to_owned()
            };
            let value = match &c.value {
                Value::Null => "unknown".to_owned(),
                Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
                v => {
                    let base = fmt_num(v.as_f64());
                    match c.derived {
                        Some(d) => format!("{base} ({d})"),
                        None => base,
                    }
                }
            };
            Row {
                label: label(c.name),
                value,
                points: format!("{}", (c.points * 100.0).round() / 100.0),
                source,
                overridden,
            }
        })
        .collect();
    let (category, class) = match r.category {
        Some(c) => (
            c.label().to_owned(),
            match c {
                score::Category::NotHbr => "risk-low",
                score::Category::Hbr => "risk-high",
                score::Category::VeryHbr => "risk-very-high",
            },
        ),
        None => ("Incomplete".to_owned(), "risk-incomplete"),
    };
    ScorePage {
        layout,
        action,
        patient,
        computed: true,
        score: r.score,
        complete: r.complete,
        category,
        category_class: class,
        risk_text: r.risk_text,
        rows,
        missing: r.missing,
        notes: gathered.map(|g| g.notes.clone()).unwrap_or_default(),
        errors: Vec::new(),
        overrides,
        form: form_values(inputs),
    }
}

fn header_of(patient: &Value, a: &super::Active) -> PatientHeader {
    let name = patient
        .get("name")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
        .map(|n| {
            n.get("text").and_then(Value::as_str).map_or_else(
                || {
                    let given: Vec<&str> = n
                        .get("given")
                        .and_then(Value::as_array)
                        .map(|g| g.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let family = n.get("family").and_then(Value::as_str).unwrap_or("");
                    format!("{} {family}", given.join(" ")).trim().to_owned()
                },
                str::to_owned,
            )
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(no name recorded)".into());
    let text = |k: &str| {
        patient
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .chars()
            .take(64)
            .collect::<String>()
    };
    PatientHeader {
        name: name.chars().take(200).collect(),
        birth_date: text("birthDate"),
        gender: text("gender"),
        fhir_id: a.context.patient.clone(),
        server: a.context.iss.clone(),
    }
}

/// Loads the context, the FHIR data and the gathered inputs; audits the read.
async fn load(
    state: &AppState,
    audit: &Audit,
    headers: &HeaderMap,
) -> Result<(super::Active, WebUser, PatientHeader, Gathered), Response> {
    let env = state.config().env;
    let active = match smart(state)
        .active(cookie(headers, context_cookie(env)))
        .await
    {
        Ok(a) => a,
        Err(e) => return Err(smart_error(state, audit, None, &e)),
    };
    let p = &active.principal;
    audit.set_actor(Actor::user(&p.user_id, &p.username));
    let csrf = p
        .session_id()
        .map(|s| csrf_token(state, s))
        .unwrap_or_default();
    let user = WebUser {
        principal: active.principal.clone(),
        csrf,
    };
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("fhir_patient");
        a.resource_id =
            SafeId::new(&active.context.patient).map(|_| active.context.patient.clone());
    });
    let bundle = match smart(state).fetch(&active).await {
        Ok(b) => b,
        Err(e) => return Err(smart_error(state, audit, Some(&user), &e)),
    };
    let header = header_of(&bundle.patient, &active);
    let today = state.clock().now().date();
    let gathered = match inputs::gather(&bundle, today) {
        Ok(g) => g,
        Err(e) => {
            return Err(ApiError::internal(anyhow::anyhow!("code sets: {e}")).into_response());
        }
    };
    audit.context(
        "resources",
        ContextValue::Int(bundle.resource_count() as i64),
    );
    Ok((active, user, header, gathered))
}

fn framed(state: &AppState, mut r: Response) -> Response {
    allow_framing(state, &mut r);
    r
}

/// `GET /smart/app`: the patient's PRECISE-HBR score from their FHIR data.
pub async fn app(State(state): State<AppState>, audit: Audit, headers: HeaderMap) -> Response {
    let (_, user, header, gathered) = match load(&state, &audit, &headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let p = page(
        Layout::of(&state, &user, None),
        "/smart/app",
        Some(header),
        &gathered.inputs,
        Some(&gathered),
        Vec::new(),
    );
    audit.context("complete", ContextValue::Bool(p.complete));
    framed(&state, render_status(StatusCode::OK, &p))
}

/// Parses the what-if / calculator form. `base` gives the values compared against to find
/// the overrides (the FHIR values), or None for the plain calculator.
fn parse_form(
    f: &Fields,
    base: Option<&Inputs>,
) -> Result<(Inputs, Vec<&'static str>), Vec<String>> {
    let mut errors = Vec::new();
    let mut num = |name: &'static str| -> Option<f64> {
        let t = f.text(name);
        if t.is_empty() {
            return None;
        }
        match t.replace(',', ".").parse::<f64>() {
            Ok(v) if v.is_finite() => Some(v),
            _ => {
                errors.push(format!(
                    "{}: `{}` is not a number.",
                    label_of(name),
                    t.chars().take(20).collect::<String>()
                ));
                None
            }
        }
    };
    let mut i = Inputs {
        age: num("age"),
        hemoglobin: num("hemoglobin"),
        egfr: num("egfr"),
        wbc: num("wbc"),
        platelets: num("platelets"),
        creatinine: num("creatinine"),
        sex: match f.text("sex").as_str() {
            "male" => Some(Sex::Male),
            "female" => Some(Sex::Female),
            _ => None,
        },
        prior_bleeding: f.get("prior_bleeding").is_some(),
        oral_anticoagulation: f.get("oral_anticoagulation").is_some(),
        arc_hbr: f
            .all("arc_hbr")
            .iter()
            .filter_map(|a| ArcHbr::parse(a))
            .collect(),
    };
    if let Err(out) = score::validate(&i) {
        errors.extend(
            out.into_iter()
                .map(|e| format!("{}: {}.", label_of(e.field), e.message)),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut overrides = Vec::new();
    if let Some(b) = base {
        let differs = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(a), Some(b)) => (a - b).abs() > 0.005,
            (None, None) => false,
            _ => true,
        };
        for (name, x, y) in [
            ("age", i.age, b.age),
            ("hemoglobin", i.hemoglobin, b.hemoglobin),
            ("egfr", i.egfr, b.egfr),
            ("wbc", i.wbc, b.wbc),
            ("platelets", i.platelets, b.platelets),
            ("creatinine", i.creatinine, b.creatinine),
        ] {
            if differs(x, y) {
                overrides.push(name);
            }
        }
        if i.prior_bleeding != b.prior_bleeding {
            overrides.push("prior_bleeding");
        }
        if i.oral_anticoagulation != b.oral_anticoagulation {
            overrides.push("oral_anticoagulation");
        }
        // Thrombocytopenia follows the platelet value; the other elements are boxes.
        let boxes = |s: &BTreeSet<ArcHbr>| -> BTreeSet<ArcHbr> {
            s.iter()
                .copied()
                .filter(|a| *a != ArcHbr::Thrombocytopenia)
                .collect()
        };
        for a in boxes(&i.arc_hbr).symmetric_difference(&boxes(&b.arc_hbr)) {
            overrides.push(a.as_str());
        }
        if b.sex != i.sex {
            overrides.push("sex");
        }
    }
    if i.platelets.is_some_and(|p| p < score::PLATELETS_THRESHOLD) {
        i.arc_hbr.insert(ArcHbr::Thrombocytopenia);
    }
    Ok((i, overrides))
}

fn label_of(name: &str) -> &'static str {
    match name {
        "platelets" => "Platelets (10⁹/L)",
        "creatinine" => "Creatinine (mg/dL)",
        other => label(other),
    }
}

fn audit_overrides(audit: &Audit, overrides: &[&'static str]) {
    if overrides.is_empty() {
        return;
    }
    audit.context(
        "overrides",
        ContextValue::Ids(overrides.iter().filter_map(|o| SafeId::new(o)).collect()),
    );
}

/// `POST /smart/app`: the what-if form, recomputed here and audited (which inputs were
/// overridden, never their values).
pub async fn app_what_if(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (_, user, header, gathered) = match load(&state, &audit, &headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let fields = Fields::parse(&body);
    if !csrf_ok(&user.csrf, fields.get("csrf").unwrap_or("")) {
        audit.annotate(|a| {
            a.action = Some(Action::PermissionDenied);
            a.outcome = Some(Outcome::Denied);
            a.context.insert("reason", ContextValue::Code("csrf"));
        });
        return framed(
            &state,
            (
                StatusCode::FORBIDDEN,
                "This form expired or did not come from this site. Reload the page and try again.",
            )
                .into_response(),
        );
    }
    audit.annotate(|a| a.action = Some(Action::Calculate));
    match parse_form(&fields, Some(&gathered.inputs)) {
        Ok((inputs, overrides)) => {
            audit_overrides(&audit, &overrides);
            let p = page(
                Layout::of(&state, &user, None),
                "/smart/app",
                Some(header),
                &inputs,
                Some(&gathered),
                overrides,
            );
            framed(&state, render_status(StatusCode::OK, &p))
        }
        Err(errors) => {
            let mut p = page(
                Layout::of(&state, &user, None),
                "/smart/app",
                Some(header),
                &gathered.inputs,
                Some(&gathered),
                Vec::new(),
            );
            p.errors = errors;
            framed(&state, render_status(StatusCode::UNPROCESSABLE_ENTITY, &p))
        }
    }
}

/// `GET /smart/calculator`: the plain calculator (no EHR), from the admin pages.
pub async fn calculator_form(
    State(state): State<AppState>,
    audit: Audit,
    user: WebUser,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("page"));
    if let Some(r) = user.refuse(Permission::RecordsRead) {
        return r;
    }
    let mut p = page(
        Layout::of(&state, &user, None),
        "/smart/calculator",
        None,
        &Inputs::default(),
        None,
        Vec::new(),
    );
    p.computed = false;
    render_status(StatusCode::OK, &p)
}

/// `POST /smart/calculator`: computes from the form.
pub async fn calculator_submit(
    State(state): State<AppState>,
    audit: Audit,
    form: WebForm,
) -> Response {
    let user = form.user;
    if let Some(r) = user.refuse(Permission::RecordsRead) {
        return r;
    }
    match parse_form(&form.fields, None) {
        Ok((inputs, _)) => {
            let p = page(
                Layout::of(&state, &user, None),
                "/smart/calculator",
                None,
                &inputs,
                None,
                Vec::new(),
            );
            audit.annotate(|a| {
                a.action = Some(Action::Calculate);
                a.resource_type = Some("precise_hbr");
                a.context.insert("complete", ContextValue::Bool(p.complete));
            });
            render_status(StatusCode::OK, &p)
        }
        Err(errors) => {
            let mut p = page(
                Layout::of(&state, &user, None),
                "/smart/calculator",
                None,
                &Inputs::default(),
                None,
                Vec::new(),
            );
            p.computed = false;
            p.errors = errors;
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
        }
    }
}
