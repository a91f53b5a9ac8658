//! An in-process SMART authorization server and FHIR R4 server for the SMART app tests.
//!
//! - `/fhir` advertises its endpoints in `.well-known/smart-configuration`; `/fhir2` only
//!   in its CapabilityStatement (`/metadata`, the `oauth-uris` extension).
//! - `/auth/authorize` approves at once: it redirects to `redirect_uri` with a code and
//!   the `state`; the patient is the `launch` value (EHR launch) or `p-high`.
//! - `/auth/token` checks the code (single use), the redirect URI, the client id and the
//!   PKCE verifier (S256), and issues `ACCESS-CANARY-n` / `REFRESH-CANARY-n`; the refresh
//!   grant replaces the access token (the old one stops working).
//! - FHIR reads need a live access token for the same patient. Patients are the JSON
//!   files in `tests/fixtures/smart/`; Observations are paged two at a time.
//! - Special patient ids: `slow` (answers after 3 s), `broken` (500), `forbidden` (403),
//!   `gone` (404), `flaky` (503 once, then `p-high`), `unauth` (401), `huge` (a body
//!   over the configured cap).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;

#[derive(Default)]
pub struct Inner {
    codes: HashMap<String, Grant>,
    access: HashMap<String, String>,
    refresh: HashMap<String, String>,
    flaky_seen: HashSet<String>,
    pub last_authorize: Option<HashMap<String, String>>,
    n: usize,
}

struct Grant {
    challenge: String,
    redirect_uri: String,
    patient: String,
}

pub struct Fixture {
    pub base: String,
    pub requests: AtomicUsize,
    pub token_requests: AtomicUsize,
    pub refreshes: AtomicUsize,
    /// `expires_in` of issued access tokens.
    pub expires_in: Mutex<i64>,
    /// Record a wrong PKCE challenge (to prove the token endpoint's check is used).
    pub corrupt_challenge: Mutex<bool>,
    /// A confidential client's secret: the token endpoint then needs HTTP Basic with it.
    pub client_secret: Mutex<Option<String>>,
    pub inner: Mutex<Inner>,
}

pub async fn start() -> Arc<Fixture> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fx = Arc::new(Fixture {
        base: format!("http://{addr}"),
        requests: AtomicUsize::new(0),
        token_requests: AtomicUsize::new(0),
        refreshes: AtomicUsize::new(0),
        expires_in: Mutex::new(3600),
        corrupt_challenge: Mutex::new(false),
        client_secret: Mutex::new(None),
        inner: Mutex::new(Inner::default()),
    });
    let app = Router::new()
        .route("/fhir/.well-known/smart-configuration", get(well_known))
        .route("/{base}/metadata", get(metadata))
        .route("/auth/authorize", get(authorize))
        .route("/auth/token", post(token))
        .route("/{base}/Patient/{id}", get(patient))
        .route("/{base}/{resource}", get(search))
        .layer(axum::middleware::from_fn_with_state(fx.clone(), count))
        .with_state(fx.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    fx
}

async fn count(
    State(fx): State<Arc<Fixture>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    fx.requests.fetch_add(1, Ordering::SeqCst);
    next.run(req).await
}

async fn well_known(State(fx): State<Arc<Fixture>>) -> Response {
    axum::Json(json!({
        "authorization_endpoint": format!("{}/auth/authorize", fx.base),
        "token_endpoint": format!("{}/auth/token", fx.base),
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "launch-standalone", "client-public", "context-ehr-patient"]
    }))
    .into_response()
}

async fn metadata(State(fx): State<Arc<Fixture>>, Path(base): Path<String>) -> Response {
    if base != "fhir2" {
        return StatusCode::NOT_FOUND.into_response();
    }
    axum::Json(json!({
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "security": {"extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": format!("{}/auth/authorize", fx.base)},
                {"url": "token", "valueUri": format!("{}/auth/token", fx.base)}
            ]
        }]}}]
    }))
    .into_response()
}

async fn authorize(
    State(fx): State<Arc<Fixture>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
    let state = q.get("state").cloned().unwrap_or_default();
    let mut inner = fx.inner.lock().unwrap();
    inner.last_authorize = Some(q.clone());
    let aud_ok = q
        .get("aud")
        .is_some_and(|a| a == &format!("{}/fhir", fx.base) || a == &format!("{}/fhir2", fx.base));
    if !aud_ok || q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return Redirect::to(&format!("{redirect}?error=invalid_request&state={state}"))
            .into_response();
    }
    inner.n += 1;
    let code = format!("code-{}", inner.n);
    let mut challenge = q.get("code_challenge").cloned().unwrap_or_default();
    if *fx.corrupt_challenge.lock().unwrap() {
        challenge.push('x');
    }
    inner.codes.insert(
        code.clone(),
        Grant {
            challenge,
            redirect_uri: redirect.clone(),
            patient: q.get("launch").cloned().unwrap_or_else(|| "p-high".into()),
        },
    );
    let mut u = url::Url::parse(&redirect).unwrap();
    u.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &state);
    Redirect::to(u.as_str()).into_response()
}

fn oauth_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": code}))).into_response()
}

async fn token(
    State(fx): State<Arc<Fixture>>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    fx.token_requests.fetch_add(1, Ordering::SeqCst);
    // A public client names itself in the form; a confidential one uses HTTP Basic.
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let client_ok = match fx.client_secret.lock().unwrap().as_deref() {
        Some(secret) => basic.as_deref() == Some(format!("custodian:{secret}").as_str()),
        None => basic.is_none() && f.get("client_id").map(String::as_str) == Some("custodian"),
    };
    if !client_ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let mut inner = fx.inner.lock().unwrap();
    let expires_in = *fx.expires_in.lock().unwrap();
    let patient = match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some(grant) = f.get("code").and_then(|c| inner.codes.remove(c)) else {
                return oauth_error("invalid_grant");
            };
            if f.get("redirect_uri") != Some(&grant.redirect_uri) {
                return oauth_error("invalid_client");
            }
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(verifier.as_bytes()));
            if computed != grant.challenge {
                return oauth_error("invalid_grant");
            }
            grant.patient
        }
        Some("refresh_token") => {
            let Some(p) = f
                .get("refresh_token")
                .and_then(|r| inner.refresh.get(r))
                .cloned()
            else {
                return oauth_error("invalid_grant");
            };
            fx.refreshes.fetch_add(1, Ordering::SeqCst);
            // The old access tokens of this patient stop working.
            inner.access.retain(|_, v| v != &p);
            p
        }
        _ => return oauth_error("unsupported_grant_type"),
    };
    inner.n += 1;
    let access = format!("ACCESS-CANARY-{}", inner.n);
    let refresh = format!("REFRESH-CANARY-{}", inner.n);
    inner.access.insert(access.clone(), patient.clone());
    inner.refresh.insert(refresh.clone(), patient.clone());
    axum::Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "refresh_token": refresh,
        "scope": "launch openid fhirUser patient/*.rs",
        "patient": patient,
    }))
    .into_response()
}

fn data(id: &str) -> Value {
    let file = match id {
        "p-missing" => "p-missing",
        _ => "p-high",
    };
    let path = format!(
        "{}/tests/fixtures/smart/{file}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The patient a bearer token may read, or the refusal.
fn check(fx: &Fixture, headers: &HeaderMap) -> Result<String, StatusCode> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    fx.inner
        .lock()
        .unwrap()
        .access
        .get(token)
        .cloned()
        .ok_or(StatusCode::UNAUTHORIZED)
}

async fn patient(
    State(fx): State<Arc<Fixture>>,
    headers: HeaderMap,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let allowed = match check(&fx, &headers) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if allowed != id {
        return StatusCode::FORBIDDEN.into_response();
    }
    match id.as_str() {
        "slow" => tokio::time::sleep(Duration::from_secs(3)).await,
        "broken" => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "forbidden" => return StatusCode::FORBIDDEN.into_response(),
        "gone" => return StatusCode::NOT_FOUND.into_response(),
        "unauth" => return StatusCode::UNAUTHORIZED.into_response(),
        "huge" => {
            let mut p = data(&id)["Patient"].clone();
            p["id"] = json!(id);
            p["text"] = json!({"div": "x".repeat(300_000)});
            return axum::Json(p).into_response();
        }
        "flaky" => {
            let first = fx.inner.lock().unwrap().flaky_seen.insert(id.clone());
            if first {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        }
        _ => {}
    }
    let mut p = data(&id)["Patient"].clone();
    p["id"] = json!(id);
    axum::Json(p).into_response()
}

async fn search(
    State(fx): State<Arc<Fixture>>,
    headers: HeaderMap,
    Path((base, resource)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let allowed = match check(&fx, &headers) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let Some(patient) = q.get("patient") else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if patient != &allowed {
        return StatusCode::FORBIDDEN.into_response();
    }
    let all = data(patient)[resource.as_str()]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (items, next) = if resource == "Observation" {
        let page: usize = q.get("_page").and_then(|p| p.parse().ok()).unwrap_or(0);
        let items: Vec<Value> = all.iter().skip(page * 2).take(2).cloned().collect();
        let next = (all.len() > (page + 1) * 2).then(|| {
            let mut u = url::Url::parse(&format!("{}/{base}/Observation", fx.base)).unwrap();
            u.query_pairs_mut()
                .append_pair("patient", patient)
                .append_pair("_page", &(page + 1).to_string());
            u.to_string()
        });
        (items, next)
    } else {
        (all, None)
    };
    let mut links =
        vec![json!({"relation": "self", "url": format!("{}/{base}/{resource}", fx.base)})];
    if let Some(n) = next {
        links.push(json!({"relation": "next", "url": n}));
    }
    axum::Json(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": items.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>(),
    }))
    .into_response()
}
