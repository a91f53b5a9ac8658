//! The clinician's workspace: the patient list with its search, the chart, records
//! written from the chart, the audited SSN reveal, the de-identified view and
//! break-glass. Server-rendered like the admin pages; every request is one audit event
//! naming the patients it shows.
//!
//! Who sees what, by permission (the same rules as `/api/v1` and `/fhir`):
//! - `patients:read`: the list, the search, a chart's demographics;
//! - `records:read`: a chart's records and coded data (conditions, labs, medications,
//!   procedures);
//! - `records:write`: adding and editing records (a concurrent change is shown, never
//!   overwritten: every save names the version it was read at);
//! - `phi:ssn`: the SSN, masked until a click that is itself audited;
//! - `audit:read`: the chart's accounting of disclosures;
//! - `breakglass`: a reason form on the chart of **that one patient** (never the list or
//!   the search); the access lasts [`BREAK_GLASS_MINUTES`] minutes in this session, under
//!   a banner, every page of it flagged in the audit trail and raised.

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::pages::{Layout, forbidden, render, render_status};
use super::session::{WebForm, WebUser, cookie, secure_attribute};
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::crypto;
use crate::fhir::resources::ResourceType;
use crate::fhir::service::View;
use crate::http::json::QueryParams as Query;
use crate::http::path::Path;
use crate::http::{ApiError, ErrorCode};
use crate::records::model::{NewRecord, PatientView, RecordPatch, RecordView, ssn_shaped};
use crate::records::routes::{accounting, patient_view, record_view};
use crate::records::service::{MAX_MATCHES, Patient, PhiError, Record};

/// How long a break-glass access from the chart lasts.
pub const BREAK_GLASS_MINUTES: i64 = 30;
/// The shortest reason (as for the API's `X-Break-Glass-Reason`).
const MIN_REASON: usize = 10;
const BREAK_GLASS_PURPOSE: &str = "custodian/web/breakglass/v1";
/// Patients a page of the list shows.
const PAGE: usize = 25;

fn breakglass_cookie_name(state: &AppState) -> &'static str {
    if state.config().dev_over_plain_http() {
        "custodian_bg"
    } else {
        "__Secure-custodian_bg"
    }
}

// ---- the patient list ------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: Option<usize>,
}

struct Row {
    id: String,
    name: String,
    birth_date: String,
    sex: String,
    mrn: String,
}

#[derive(Template)]
#[template(path = "patients.html")]
struct ListPage {
    layout: Layout,
    q: String,
    rows: Vec<Row>,
    searched: bool,
    truncated: bool,
    short_terms: bool,
    max: usize,
    page: usize,
    prev: Option<usize>,
    next: Option<usize>,
    error: Option<String>,
}

/// `GET /patients`: the search box and its answer (`patients:read`).
pub async fn list(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<ListQuery>,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Search);
        a.resource_type = Some("patient");
    });
    if let Some(r) = u.refuse(Permission::PatientsRead) {
        return r;
    }
    let text: String = q.q.trim().chars().take(200).collect();
    let page = q.page.unwrap_or(0).min(MAX_MATCHES / PAGE);
    let mut out = ListPage {
        layout: Layout::of(&state, &u, None),
        q: text.clone(),
        rows: Vec::new(),
        searched: !text.is_empty(),
        truncated: false,
        short_terms: false,
        max: MAX_MATCHES,
        page,
        prev: page.checked_sub(1),
        next: None,
        error: None,
    };
    if text.is_empty() {
        // No list of everyone: a search is how a person is found.
        audit.annotate(|a| {
            a.action = Some(Action::Read);
            a.resource_type = Some("page");
        });
        return render(&out);
    }
    let by_ssn = u.can(Permission::PhiSsn);
    if !by_ssn
        && text
            .split(|c: char| c.is_whitespace() || c == ',')
            .any(ssn_shaped)
    {
        out.error = Some("Searching by SSN needs the phi:ssn permission.".into());
        out.searched = false;
        let mut r = render_status(StatusCode::FORBIDDEN, &out);
        r.extensions_mut()
            .insert(crate::http::error::PermissionRefused);
        return r;
    }
    let found = match state
        .patients()
        .find(&text, by_ssn, false, page * PAGE, PAGE)
        .await
    {
        Ok(f) => f,
        Err(e) => return ApiError::from(e).into_response(),
    };
    audit.context("count", ContextValue::Int(found.patients.len() as i64));
    audit.name_patients(Action::Read, found.patients.iter().map(|p| p.id.as_str()));
    out.truncated = found.truncated;
    out.short_terms = found.short_terms;
    out.next = found.next_offset.map(|_| page + 1);
    out.rows = found
        .patients
        .iter()
        .map(|p| Row {
            id: p.id.clone(),
            name: format!("{}, {}", p.fields.family_name, p.fields.given_name),
            birth_date: p.fields.birth_date.clone(),
            sex: p.fields.sex.clone().unwrap_or_default(),
            mrn: p.fields.mrn.clone(),
        })
        .collect();
    render(&out)
}

// ---- break-glass -----------------------------------------------------------------------

/// A break-glass access of this session to this patient, while it lasts: its reason.
fn break_glass(state: &AppState, u: &WebUser, headers: &HeaderMap, id: &str) -> Option<String> {
    if !u.can(Permission::BreakGlass) {
        return None;
    }
    let session = u.principal.session_id()?;
    let sealed = cookie(headers, breakglass_cookie_name(state))?;
    let raw = crypto::open(
        state.keys(),
        BREAK_GLASS_PURPOSE,
        format!("{session}|{id}").as_bytes(),
        sealed,
    )
    .ok()?;
    let text = String::from_utf8(raw.to_vec()).ok()?;
    let (until, reason) = text.split_once('|')?;
    let until: i64 = until.parse().ok()?;
    (state.clock().now().unix_timestamp() < until).then(|| reason.to_owned())
}

/// The cookie carrying a break-glass access: sealed to the session and the patient, sent
/// only with that patient's pages, ending with the access.
fn break_glass_cookie(state: &AppState, id: &str, value: Option<&str>) -> HeaderValue {
    let name = breakglass_cookie_name(state);
    let secure = secure_attribute(state.config());
    let text = match value {
        Some(v) => format!(
            "{name}={v}; HttpOnly;{secure} SameSite=Strict; Path=/patients/{id}; Max-Age={}",
            BREAK_GLASS_MINUTES * 60
        ),
        None => {
            format!("{name}=; HttpOnly;{secure} SameSite=Strict; Path=/patients/{id}; Max-Age=0")
        }
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// `POST /patients/{id}/breakglass`: emergency access to this one patient, with a reason.
pub async fn break_glass_start(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::BreakGlass);
        a.resource_type = Some("patient");
        a.resource_id = Some(id.clone());
        a.patient_id = Some(id.clone());
    });
    if let Some(r) = u.refuse(Permission::BreakGlass) {
        return r;
    }
    let reason: String = form.fields.text("reason").chars().take(500).collect();
    if reason.chars().count() < MIN_REASON {
        return chart_response(
            &state,
            &audit,
            u,
            &id,
            ChartOptions {
                reason_error: Some("State the reason in at least 10 characters.".into()),
                ..ChartOptions::default()
            },
            None,
        )
        .await;
    }
    let Some(session) = u.principal.session_id() else {
        return forbidden(u);
    };
    let until = state.clock().now().unix_timestamp() + BREAK_GLASS_MINUTES * 60;
    let sealed = match crypto::seal(
        state.keys(),
        BREAK_GLASS_PURPOSE,
        format!("{session}|{id}").as_bytes(),
        format!("{until}|{reason}").as_bytes(),
    ) {
        Ok(s) => s,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    audit.annotate(|a| {
        a.break_glass = true;
        a.reason = Some(reason.clone());
    });
    tracing::warn!(target: "custodian::security", user_id = %u.principal.user_id, "security event: break-glass access to PHI begun from a chart");
    let mut r = Redirect::to(&format!("/patients/{id}")).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        break_glass_cookie(&state, &id, Some(&sealed)),
    );
    r
}

/// `POST /patients/{id}/breakglass/end`: ends the emergency access now.
pub async fn break_glass_end(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    _form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("break_glass");
        a.patient_id = Some(id.clone());
    });
    let mut r = Redirect::to("/patients").into_response();
    r.headers_mut()
        .append(header::SET_COOKIE, break_glass_cookie(&state, &id, None));
    r
}

// ---- the chart -------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ChartQuery {
    #[serde(default)]
    view: Option<String>,
}

pub(crate) struct Coded {
    pub(crate) name: String,
    pub(crate) code: String,
    pub(crate) detail: String,
    pub(crate) status: String,
    pub(crate) date: String,
}

pub(crate) struct Disclosed {
    pub(crate) at: String,
    pub(crate) who: String,
    pub(crate) action: String,
    pub(crate) purpose: String,
    pub(crate) break_glass: bool,
}

/// One entry of an accounting of disclosures as the pages list it (the chart and the
/// patient's own pages).
pub(crate) fn disclosed(d: crate::records::routes::Disclosure) -> Disclosed {
    Disclosed {
        at: super::pages::display_time(&d.at),
        who: match d.app {
            Some(app) => format!("{} through the app {app}", d.actor.unwrap_or_default()),
            None => d.actor.unwrap_or_default(),
        },
        action: d.action,
        purpose: d.purpose,
        break_glass: d.break_glass,
    }
}

pub(crate) struct RecordRow {
    pub(crate) view: RecordView,
    /// When it was recorded, as people read it (the year alone when de-identified).
    pub(crate) recorded: String,
    pub(crate) version: i64,
}

#[derive(Template)]
#[template(path = "chart.html")]
struct ChartPage {
    layout: Layout,
    id: String,
    /// Nothing of the patient may be shown: the break-glass form only.
    locked: bool,
    may_break_glass: bool,
    reason_error: Option<String>,
    break_glass: Option<String>,
    break_glass_minutes: i64,
    deidentified: bool,
    p: Option<PatientView>,
    ssn_revealed: bool,
    can_reveal: bool,
    clinical: bool,
    conditions: Vec<Coded>,
    labs: Vec<Coded>,
    medications: Vec<Coded>,
    procedures: Vec<Coded>,
    records: Vec<RecordRow>,
    can_write: bool,
    record_error: Vec<String>,
    disclosures: Option<Vec<Disclosed>>,
    disclosures_missing: bool,
    /// Registered apps this person may launch for this patient: (client id, name).
    apps: Vec<(String, String)>,
    /// Items the patient's restrictions withhold from this reader.
    withheld: usize,
    /// Break-glass is showing items a restriction would withhold.
    restriction_overridden: bool,
    /// Active restrictions of the patient (how many), and pending amendment requests.
    restrictions: usize,
    amendments: Vec<AmendmentRow>,
    /// Denied amendment requests the patient answered: attached to the record.
    statements: Vec<StatementRow>,
    sensitive: &'static [(&'static str, &'static str)],
}

/// A statement of disagreement, with what it answers.
pub(crate) struct StatementRow {
    pub(crate) what: String,
    pub(crate) requested: String,
    pub(crate) denial: String,
    pub(crate) statement: String,
}

/// A pending amendment request as the chart lists it.
pub(crate) struct AmendmentRow {
    pub(crate) id: String,
    pub(crate) what: String,
    pub(crate) due: String,
    pub(crate) overdue: bool,
}

#[derive(Default)]
struct ChartOptions {
    deidentified: bool,
    reveal_ssn: bool,
    reason_error: Option<String>,
    record_error: Vec<String>,
}

/// The first coding's display, the text, or the code itself.
fn concept(v: &Value) -> (String, String) {
    let coding = &v["coding"][0];
    let code = coding["code"].as_str().unwrap_or("").to_owned();
    let name = coding["display"]
        .as_str()
        .or_else(|| v["text"].as_str())
        .map(str::to_owned)
        .or_else(|| known_lab(&code).map(str::to_owned))
        .unwrap_or_else(|| code.clone());
    (name, code)
}

/// Names of the laboratory codes Custodian's own data uses (LOINC), for results stored
/// without a display.
fn known_lab(code: &str) -> Option<&'static str> {
    Some(match code {
        "718-7" => "Hemoglobin",
        "33914-3" => "eGFR (MDRD)",
        "2160-0" => "Creatinine",
        "6690-2" => "Leukocytes (WBC)",
        "777-3" => "Platelets",
        "8867-4" => "Heart rate",
        "8480-6" => "Systolic blood pressure",
        "8462-4" => "Diastolic blood pressure",
        _ => return None,
    })
}

/// A UCUM unit as people read it (`10*3/uL` → `10³/µL`).
fn unit_text(unit: &str) -> String {
    unit.replace("{1.73_m2}", "1.73 m²")
        .replace("10*3", "10³")
        .replace("10*6", "10⁶")
        .replace("10*9", "10⁹")
        .replace("10*12", "10¹²")
        .replace("uL", "µL")
        .replace("ug", "µg")
        .replace("umol", "µmol")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn status(v: &Value, field: &str) -> String {
    match &v[field] {
        Value::String(s) => s.clone(),
        c => c["coding"][0]["code"].as_str().unwrap_or("").to_owned(),
    }
}

fn coded(t: ResourceType, v: &Value) -> Coded {
    match t {
        ResourceType::Observation => {
            let (name, code) = concept(&v["code"]);
            let q = &v["valueQuantity"];
            let detail = if q.is_object() {
                format!("{} {}", text(&q["value"]), unit_text(&text(&q["unit"])))
                    .trim()
                    .to_owned()
            } else {
                text(&v["valueString"])
            };
            Coded {
                name,
                code,
                detail,
                status: status(v, "status"),
                date: text(&v["effectiveDateTime"]),
            }
        }
        ResourceType::Condition => {
            let (name, code) = concept(&v["code"]);
            Coded {
                name,
                code,
                detail: String::new(),
                status: status(v, "clinicalStatus"),
                date: [&v["onsetDateTime"], &v["recordedDate"]]
                    .into_iter()
                    .map(text)
                    .find(|s| !s.is_empty())
                    .unwrap_or_default(),
            }
        }
        ResourceType::MedicationRequest => {
            let (name, code) = concept(&v["medicationCodeableConcept"]);
            Coded {
                name,
                code,
                detail: text(&v["dosageInstruction"][0]["text"]),
                status: status(v, "status"),
                date: text(&v["authoredOn"]),
            }
        }
        _ => {
            let (name, code) = concept(&v["code"]);
            Coded {
                name,
                code,
                detail: String::new(),
                status: status(v, "status"),
                date: [&v["performedDateTime"], &v["performedPeriod"]["start"]]
                    .into_iter()
                    .map(text)
                    .find(|s| !s.is_empty())
                    .unwrap_or_default(),
            }
        }
    }
}

/// A patient's clinical data as the pages list it, each list newest first.
pub(crate) struct ClinicalLists {
    pub(crate) conditions: Vec<Coded>,
    pub(crate) labs: Vec<Coded>,
    pub(crate) medications: Vec<Coded>,
    pub(crate) procedures: Vec<Coded>,
    pub(crate) records: Vec<RecordRow>,
    /// How many items the patient's restrictions withheld from this reader.
    pub(crate) withheld: usize,
    /// Whether break-glass showed something a restriction would withhold.
    pub(crate) overridden: bool,
}

/// The clinical lists of patient `id` in view `v` (the chart and the patient portal),
/// with at most `max_records` visit records; what `screen` withholds is left out and
/// counted.
pub(crate) async fn clinical_lists(
    state: &AppState,
    id: &str,
    v: View<'_>,
    max_records: i64,
    screen: &crate::privacy::Screen,
) -> Result<ClinicalLists, PhiError> {
    let fhir = v.fhir;
    let mut out = ClinicalLists {
        conditions: Vec::new(),
        labs: Vec::new(),
        medications: Vec::new(),
        procedures: Vec::new(),
        records: Vec::new(),
        withheld: 0,
        overridden: false,
    };
    for t in [
        ResourceType::Condition,
        ResourceType::Observation,
        ResourceType::MedicationRequest,
        ResourceType::Procedure,
    ] {
        let list = match fhir.compartment(t, id).await {
            Ok(l) => l,
            Err(crate::fhir::service::FhirError::Phi(e)) => return Err(e),
            Err(_) => Vec::new(),
        };
        // The /api/v1 records appear as Conditions in FHIR: listed apart here.
        let list: Vec<_> = list
            .into_iter()
            .filter(|r| !r.id.starts_with(crate::fhir::service::RECORD_PREFIX))
            .collect();
        let before = list.len();
        out.overridden |= list.iter().any(|r| screen.overridden(&r.labels()));
        let list: Vec<_> = list
            .into_iter()
            .filter(|r| !screen.hides(&r.labels()))
            .collect();
        out.withheld += before - list.len();
        let mut items: Vec<Coded> = list.iter().map(|r| coded(t, &fhir.render(r, v))).collect();
        items.sort_by(|a, b| b.date.cmp(&a.date).then_with(|| a.name.cmp(&b.name)));
        match t {
            ResourceType::Condition => out.conditions = items,
            ResourceType::Observation => out.labs = items,
            ResourceType::MedicationRequest => out.medications = items,
            _ => out.procedures = items,
        }
    }
    let records = state.patients().records(id, "", max_records).await?;
    let before = records.len();
    out.overridden |= records.iter().any(|r| screen.overridden(&r.labels));
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| !screen.hides(&r.labels))
        .collect();
    out.withheld += before - records.len();
    out.records = records
        .iter()
        .map(|r: &Record| {
            let view = record_view(state, r, v.anonymize);
            RecordRow {
                recorded: super::pages::display_time(&view.recorded_at),
                view,
                version: r.version,
            }
        })
        .collect();
    out.records
        .sort_by(|a, b| b.view.recorded_at.cmp(&a.view.recorded_at));
    Ok(out)
}

/// What a record withheld from the reader is, inside the pages.
const WITHHELD: &str = "withheld at the patient's request";

/// Most labs a chart lists (most recent first).
const RECENT_LABS: usize = 30;

/// A chart as this user may see it, or the page that says why not.
async fn chart_response(
    state: &AppState,
    audit: &Audit,
    u: &WebUser,
    id: &str,
    opts: ChartOptions,
    headers: Option<&HeaderMap>,
) -> Response {
    audit.annotate(|a| {
        if a.action.is_none() {
            a.action = Some(Action::Read);
        }
        a.resource_type = Some("patient");
        a.resource_id = Some(id.to_owned());
        a.patient_id = Some(id.to_owned());
    });
    let bg = headers.and_then(|h| break_glass(state, u, h, id));
    let reads_patient = u.can(Permission::PatientsRead) || bg.is_some();
    let reads_records = u.can(Permission::RecordsRead) || bg.is_some();
    let mut page = ChartPage {
        layout: Layout::of(state, u, None),
        id: id.to_owned(),
        locked: !reads_patient,
        may_break_glass: u.can(Permission::BreakGlass) && bg.is_none(),
        reason_error: opts.reason_error,
        break_glass: bg.clone(),
        break_glass_minutes: BREAK_GLASS_MINUTES,
        deidentified: opts.deidentified,
        p: None,
        ssn_revealed: false,
        can_reveal: false,
        clinical: reads_records,
        conditions: Vec::new(),
        labs: Vec::new(),
        medications: Vec::new(),
        procedures: Vec::new(),
        records: Vec::new(),
        can_write: u.can(Permission::RecordsWrite) && !opts.deidentified,
        record_error: opts.record_error,
        disclosures: None,
        disclosures_missing: false,
        apps: Vec::new(),
        withheld: 0,
        restriction_overridden: false,
        restrictions: 0,
        amendments: Vec::new(),
        statements: Vec::new(),
        sensitive: &crate::privacy::SENSITIVE,
    };
    if page.locked {
        if !u.can(Permission::BreakGlass) {
            return forbidden(u);
        }
        // The break-glass form, and nothing of the patient (not even whether it exists).
        let mut r = render_status(StatusCode::FORBIDDEN, &page);
        r.extensions_mut()
            .insert(crate::http::error::PermissionRefused);
        return r;
    }
    if let Some(reason) = &bg {
        audit.annotate(|a| {
            a.break_glass = true;
            a.reason = Some(reason.clone());
        });
        audit.touch_patient(Action::BreakGlass, "patient", Some(id), Some(id));
        tracing::warn!(target: "custodian::security", user_id = %u.principal.user_id, "security event: break-glass access to PHI");
    }
    if opts.deidentified {
        audit.context("view", ContextValue::Code("deidentified"));
    }
    match chart_data(state, u, id, &mut page, opts.reveal_ssn).await {
        Ok(()) => render(&page),
        Err(PhiError::NotFound) => {
            audit.annotate(|a| a.outcome = Some(crate::audit::Outcome::Failure));
            super::pages::not_found(u)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn chart_data(
    state: &AppState,
    u: &WebUser,
    id: &str,
    page: &mut ChartPage,
    reveal_ssn: bool,
) -> Result<(), PhiError> {
    let anonymize = page.deidentified;
    let sees_ssn = u.can(Permission::PhiSsn);
    let patient: Patient = state.patients().get(id).await?;
    if !anonymize && u.can(Permission::PatientsRead) && page.break_glass.is_none() {
        page.apps = crate::oauth::pages::launchable(state).await;
    }
    let mut view = patient_view(state, &patient, sees_ssn && reveal_ssn, anonymize);
    if !anonymize && sees_ssn && !reveal_ssn {
        // Masked until the audited click.
        view.ssn = patient
            .fields
            .ssn
            .as_deref()
            .map(crate::records::model::mask_ssn);
    }
    page.ssn_revealed = sees_ssn && reveal_ssn && !anonymize && patient.fields.ssn.is_some();
    page.can_reveal = sees_ssn && !anonymize && !reveal_ssn && patient.fields.ssn.is_some();
    page.p = Some(view);
    if page.clinical {
        let v = View {
            sees_ssn,
            anonymize,
            today: state.clock().now().date(),
            fhir: state.fhir(),
        };
        let screen =
            crate::privacy::screen_for(state, &u.principal, id, page.break_glass.is_some()).await?;
        let mut lists = clinical_lists(state, id, v, 200, &screen).await?;
        page.withheld = lists.withheld;
        page.restriction_overridden = lists.overridden;
        // The patient's requests are free text of theirs: not in the de-identified view.
        if !anonymize {
            page.restrictions = crate::privacy::consent::active(state.db(), state.patients(), id)
                .await?
                .len();
            for mut a in crate::portal::amendments::of_patient(state, id, false).await? {
                crate::portal::amendments::screen_text(state, &u.principal, &mut a).await?;
                let what = crate::portal::amendments::describe(&a.target);
                if a.status == "pending" {
                    page.amendments.push(AmendmentRow {
                        id: a.id,
                        what,
                        due: super::pages::display_time(&a.due_at),
                        overdue: a.overdue,
                    });
                } else if let Some(statement) = a.statement {
                    page.statements.push(StatementRow {
                        what,
                        requested: a.requested,
                        denial: a.decision.unwrap_or_default(),
                        statement,
                    });
                }
            }
        }
        lists.labs.truncate(RECENT_LABS);
        page.conditions = lists.conditions;
        page.labs = lists.labs;
        page.medications = lists.medications;
        page.procedures = lists.procedures;
        page.records = lists.records;
    }
    if u.can(Permission::AuditRead) && !anonymize {
        let list = match accounting(state, id, None, 50).await {
            Ok(l) => l,
            Err(e) => {
                // The chart stands without it; the page says the list is missing.
                tracing::error!(error = %e.code().as_str(), "the accounting of disclosures could not be read for a chart");
                page.disclosures_missing = true;
                return Ok(());
            }
        };
        page.disclosures = Some(list.items.into_iter().map(disclosed).collect());
    }
    Ok(())
}

/// `GET /patients/{id}`: the chart (`?view=deidentified` for the de-identified view).
pub async fn chart(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ChartQuery>,
) -> Response {
    let mut r = chart_response(
        &state,
        &audit,
        &u,
        &id,
        ChartOptions {
            deidentified: q.view.as_deref() == Some("deidentified"),
            ..ChartOptions::default()
        },
        Some(&headers),
    )
    .await;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /patients/{id}/ssn`: the chart with the SSN shown (`phi:ssn`); the click is its
/// own audit event.
pub async fn reveal_ssn(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("patient");
        a.resource_id = Some(id.clone());
        a.patient_id = Some(id.clone());
    });
    audit.context("field", ContextValue::Code("ssn"));
    if let Some(r) = u.refuse(Permission::PhiSsn) {
        return r;
    }
    let mut r = chart_response(
        &state,
        &audit,
        u,
        &id,
        ChartOptions {
            reveal_ssn: true,
            ..ChartOptions::default()
        },
        Some(&headers),
    )
    .await;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

// ---- records -----------------------------------------------------------------------------

fn field_errors(e: &PhiError) -> Vec<String> {
    match e {
        PhiError::Invalid(errors) => errors
            .iter()
            .map(|f| format!("{}: {}", f.field.replace('_', " "), f.message))
            .collect(),
        _ => vec!["The record could not be saved.".into()],
    }
}

fn optional(form: &WebForm, name: &str) -> Option<String> {
    Some(form.fields.text(name)).filter(|s| !s.is_empty())
}

/// A `recorded_at` from the form's date (`YYYY-MM-DD`), as the API takes it.
fn recorded_at(form: &WebForm) -> Option<String> {
    optional(form, "recorded_on").map(|d| {
        if d.len() == 10 {
            format!("{d}T00:00:00Z")
        } else {
            d
        }
    })
}

/// `POST /patients/{id}/records`: adds a record (`records:write`).
pub async fn add_record(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("record");
        a.patient_id = Some(id.clone());
    });
    if let Some(r) = u.refuse(Permission::RecordsWrite) {
        return r;
    }
    let input = NewRecord {
        diagnosis: form.fields.text("diagnosis"),
        treatment: optional(&form, "treatment"),
        notes: optional(&form, "notes"),
        recorded_at: recorded_at(&form),
        labels: Some(form.fields.all("label")),
    };
    match state.patients().add_record(&id, input).await {
        Ok(r) => {
            audit.annotate(|a| a.resource_id = Some(r.id.clone()));
            Redirect::to(&format!("/patients/{id}#records")).into_response()
        }
        Err(e @ PhiError::Invalid(_)) => {
            audit.annotate(|a| a.outcome = Some(crate::audit::Outcome::Failure));
            let errors = field_errors(&e);
            chart_response(
                &state,
                &audit,
                u,
                &id,
                ChartOptions {
                    record_error: errors,
                    ..ChartOptions::default()
                },
                Some(&headers),
            )
            .await
        }
        Err(PhiError::NotFound) => super::pages::not_found(u),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Template)]
#[template(path = "record_edit.html")]
struct EditPage {
    layout: Layout,
    patient_id: String,
    patient_name: String,
    record_id: String,
    version: i64,
    diagnosis: String,
    treatment: String,
    notes: String,
    recorded_on: String,
    errors: Vec<String>,
    /// Someone saved the record since this form was opened: what they saved.
    theirs: Option<RecordView>,
    /// The sensitivity labels: (code, words, set).
    labels: Vec<(&'static str, &'static str, bool)>,
}

/// The record `rid` of patient `id`, or NotFound when it belongs to another; Conflict
/// when the patient's restrictions withhold it from `u` (the pages answer 403).
async fn record_of(state: &AppState, u: &WebUser, id: &str, rid: &str) -> Result<Record, PhiError> {
    let r = state.patients().record(rid).await?;
    if r.patient_id != id {
        return Err(PhiError::NotFound);
    }
    if crate::privacy::screen_for(state, &u.principal, id, false)
        .await?
        .hides(&r.labels)
    {
        return Err(PhiError::Conflict(WITHHELD));
    }
    Ok(r)
}

fn edit_page(state: &AppState, u: &WebUser, p: &Patient, r: &Record) -> EditPage {
    EditPage {
        layout: Layout::of(state, u, None),
        patient_id: p.id.clone(),
        patient_name: format!("{} {}", p.fields.given_name, p.fields.family_name),
        record_id: r.id.clone(),
        version: r.version,
        diagnosis: r.diagnosis.clone(),
        treatment: r.treatment.clone().unwrap_or_default(),
        notes: r.notes.clone().unwrap_or_default(),
        recorded_on: r.recorded_at.get(..10).unwrap_or("").to_owned(),
        errors: Vec::new(),
        theirs: None,
        labels: crate::privacy::SENSITIVE
            .iter()
            .map(|(c, w)| (*c, *w, r.labels.iter().any(|l| l == c)))
            .collect(),
    }
}

/// `GET /patients/{id}/records/{rid}/edit`: a record's form (`records:write`).
pub async fn edit_record(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Path((id, rid)): Path<(String, String)>,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("record");
        a.resource_id = Some(rid.clone());
        a.patient_id = Some(id.clone());
    });
    for p in [Permission::RecordsWrite, Permission::RecordsRead] {
        if let Some(r) = u.refuse(p) {
            return r;
        }
    }
    let loaded = async {
        let r = record_of(&state, &u, &id, &rid).await?;
        let p = state.patients().get(&id).await?;
        Ok::<_, PhiError>((p, r))
    }
    .await;
    match loaded {
        Ok((p, r)) => render(&edit_page(&state, &u, &p, &r)),
        Err(PhiError::NotFound) => super::pages::not_found(&u),
        Err(PhiError::Conflict(_)) => forbidden(&u),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /patients/{id}/records/{rid}`: saves a record if nobody changed it since the
/// form was read; otherwise shows what they saved beside what was typed, and saves
/// nothing.
pub async fn save_record(
    State(state): State<AppState>,
    audit: Audit,
    Path((id, rid)): Path<(String, String)>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("record");
        a.resource_id = Some(rid.clone());
        a.patient_id = Some(id.clone());
    });
    // Writing needs reading too: a conflict shows what is stored.
    for p in [Permission::RecordsWrite, Permission::RecordsRead] {
        if let Some(r) = u.refuse(p) {
            return r;
        }
    }
    let Ok(version) = form.fields.text("version").parse::<i64>() else {
        return ApiError::new(ErrorCode::BadRequest)
            .with_detail("The form has no version: reload the record and try again.")
            .into_response();
    };
    let current = async {
        let r = record_of(&state, u, &id, &rid).await?;
        let p = state.patients().get(&id).await?;
        Ok::<_, PhiError>((p, r))
    }
    .await;
    let (p, current) = match current {
        Ok(x) => x,
        Err(PhiError::NotFound) => return super::pages::not_found(u),
        Err(PhiError::Conflict(_)) => return forbidden(u),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let typed = |name: &str| form.fields.text(name);
    let patch = RecordPatch {
        diagnosis: Some(typed("diagnosis")),
        treatment: Some(optional(&form, "treatment")),
        notes: Some(optional(&form, "notes")),
        recorded_at: recorded_at(&form),
        labels: Some(form.fields.all("label")),
    };
    let mut page = edit_page(&state, u, &p, &current);
    page.diagnosis = typed("diagnosis");
    page.treatment = typed("treatment");
    page.notes = typed("notes");
    page.recorded_on = typed("recorded_on");
    match state
        .patients()
        .update_record(&rid, patch, Some(version))
        .await
    {
        Ok(_) => Redirect::to(&format!("/patients/{id}#records")).into_response(),
        Err(PhiError::PreconditionFailed) => {
            audit.annotate(|a| a.outcome = Some(crate::audit::Outcome::Failure));
            audit.context("conflict", ContextValue::Int(current.version));
            // The form now carries the version just read: saving again replaces theirs
            // knowingly.
            page.version = current.version;
            page.theirs = Some(record_view(&state, &current, false));
            render_status(StatusCode::CONFLICT, &page)
        }
        Err(e @ PhiError::Invalid(_)) => {
            audit.annotate(|a| a.outcome = Some(crate::audit::Outcome::Failure));
            page.version = version;
            page.errors = field_errors(&e);
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &page)
        }
        Err(PhiError::NotFound) => super::pages::not_found(u),
        Err(e) => ApiError::from(e).into_response(),
    }
}
