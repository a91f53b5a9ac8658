//! HTTP of the authorization server that apps call: discovery, the token,
//! introspection and revocation endpoints (form-encoded, RFC 6749 errors), and the
//! JSON API for apps and grants (administrators and each user).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::scopes::CONTEXT_SCOPES;
use super::store::{ClientRow, GrantRow};
use super::{Issued, NewApp, OAuth, OAuthError};
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, ContextValue, Outcome};
use crate::http::json::JsonBody;
use crate::http::path::Path;
use crate::http::{ApiError, ErrorCode};

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        match e {
            OAuthError::Invalid(errors) => ApiError::validation(errors),
            OAuthError::NotFound => ApiError::new(ErrorCode::NotFound),
            OAuthError::Store(s) => ApiError::from(s),
            other => ApiError::new(ErrorCode::BadRequest).with_detail(other.description()),
        }
    }
}

/// The routes apps call (not in the OpenAPI document: they are OAuth's, not ours).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/fhir/.well-known/smart-configuration",
            get(configuration).options(preflight),
        )
        .route("/oauth/token", post(token).options(preflight))
        .route("/oauth/introspect", post(introspect))
        .route("/oauth/revoke", post(revoke).options(preflight))
        .route("/oauth/smart-style.json", get(style))
}

pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_apps, create_app))
        .routes(routes!(get_app, update_app, delete_app))
        .routes(routes!(app_grants, revoke_app_grants))
        .routes(routes!(all_grants))
        .routes(routes!(revoke_any_grant))
        .routes(routes!(my_apps))
        .routes(routes!(revoke_my_app))
}

fn oauth(state: &AppState) -> &OAuth {
    state.oauth()
}

/// `Access-Control-Allow-Origin: *` for what a browser app reads without cookies.
fn open_cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// The server's own origin (scheme://host) from its FHIR base.
pub fn origin_of(base: &str) -> String {
    base.trim_end_matches('/')
        .strip_suffix("/fhir")
        .unwrap_or(base)
        .to_owned()
}

/// What the discovery document lists as capabilities: only what works.
pub const CAPABILITIES: [&str; 11] = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "context-ehr-patient",
    "context-standalone-patient",
    "permission-patient",
    "permission-user",
    "permission-offline",
    "permission-online",
    "authorize-post",
];

/// `GET /fhir/.well-known/smart-configuration`: the SMART discovery document.
async fn configuration(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let base = crate::fhir::routes::base_url(&state, &headers);
    let origin = origin_of(&base);
    let mut scopes: Vec<String> = CONTEXT_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    for t in crate::fhir::resources::ResourceType::ALL {
        for level in ["patient", "user"] {
            scopes.push(format!("{level}/{}.rs", t.as_str()));
            scopes.push(format!("{level}/{}.cruds", t.as_str()));
            scopes.push(format!("{level}/{}.read", t.as_str()));
        }
    }
    scopes.push("patient/*.rs".into());
    scopes.push("user/*.rs".into());
    let mut capabilities: Vec<&str> = CAPABILITIES.to_vec();
    capabilities.push("permission-v1");
    capabilities.push("permission-v2");
    let body = json!({
        "issuer": base,
        "authorization_endpoint": format!("{origin}/oauth/authorize"),
        "token_endpoint": format!("{origin}/oauth/token"),
        "introspection_endpoint": format!("{origin}/oauth/introspect"),
        "revocation_endpoint": format!("{origin}/oauth/revoke"),
        "management_endpoint": format!("{origin}/account/apps"),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": scopes,
        "capabilities": capabilities,
    });
    let mut r = Json(body).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    open_cors(r)
}

/// `GET /oauth/smart-style.json`: the styling an EHR-launched app may follow.
async fn style() -> Response {
    open_cors(
        Json(json!({
            "color_background": "#f7f8fa",
            "color_error": "#b3261e",
            "color_highlight": "#0b5cad",
            "color_modal_backdrop": "rgba(0,0,0,0.4)",
            "color_success": "#1b7f3b",
            "color_text": "#1b1f24",
            "dim_border_radius": "6px",
            "dim_font_size": "16px",
            "dim_spacing_size": "16px",
            "font_family_body": "system-ui, sans-serif",
            "font_family_heading": "system-ui, sans-serif"
        }))
        .into_response(),
    )
}

/// An answer of the token endpoints: never cached (RFC 6749 §5.1).
fn no_store(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    open_cors(r)
}

/// An RFC 6749 §5.2 error; `invalid_client` with Basic authentication is a 401 with
/// `WWW-Authenticate`.
fn oauth_error(e: &OAuthError, basic: bool) -> Response {
    let status = match e {
        OAuthError::InvalidClient => StatusCode::UNAUTHORIZED,
        OAuthError::Store(_) | OAuthError::Crypto => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "the token endpoint failed");
    }
    let mut r = no_store(
        status,
        &json!({"error": e.code(), "error_description": e.description()}),
    );
    if matches!(e, OAuthError::InvalidClient) && basic {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"custodian\""),
        );
    }
    r
}

/// The form of a token-endpoint request, and the client's credentials from HTTP Basic
/// or the form (never both).
struct ClientForm {
    fields: Vec<(String, String)>,
    client_id: Option<String>,
    secret: Option<String>,
    basic: bool,
}

impl ClientForm {
    fn get(&self, name: &str) -> Option<&str> {
        let mut found = self.fields.iter().filter(|(k, _)| k == name);
        let first = found.next().map(|(_, v)| v.as_str());
        // A parameter sent twice is refused (RFC 6749 §3.1).
        if found.next().is_some() { None } else { first }
    }
    fn repeated(&self) -> Option<&str> {
        let mut names: Vec<&str> = self.fields.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, String), ()>> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Some(Err(()));
    }
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest.trim()) else {
        return Some(Err(()));
    };
    let Ok(text) = String::from_utf8(raw) else {
        return Some(Err(()));
    };
    let Some((id, secret)) = text.split_once(':') else {
        return Some(Err(()));
    };
    // RFC 6749 §2.3.1: both are form-urlencoded inside Basic.
    let dec = |s: &str| -> String {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some(Ok((dec(id), dec(secret))))
}

fn read_form(headers: &HeaderMap, body: &[u8]) -> Result<ClientForm, OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    if ct.as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(OAuthError::InvalidRequest(
            "send the request as application/x-www-form-urlencoded",
        ));
    }
    let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let mut form = ClientForm {
        fields,
        client_id: None,
        secret: None,
        basic: false,
    };
    if form.repeated().is_some() {
        return Err(OAuthError::InvalidRequest("a parameter was sent twice"));
    }
    match basic_credentials(headers) {
        Some(Ok((id, secret))) => {
            if form.get("client_secret").is_some() {
                return Err(OAuthError::InvalidRequest(
                    "send the client's credentials one way: Basic or the form",
                ));
            }
            if form.get("client_id").is_some_and(|c| c != id) {
                return Err(OAuthError::InvalidClient);
            }
            form.client_id = Some(id);
            form.secret = Some(secret);
            form.basic = true;
        }
        Some(Err(())) => return Err(OAuthError::InvalidClient),
        None => {
            form.client_id = form.get("client_id").map(str::to_owned);
            form.secret = form.get("client_secret").map(str::to_owned);
        }
    }
    Ok(form)
}

async fn client_of(
    state: &AppState,
    form: &ClientForm,
    audit: &Audit,
) -> Result<ClientRow, OAuthError> {
    let id = form.client_id.as_deref().ok_or(OAuthError::InvalidClient)?;
    // The client it claims to be, recorded whatever the outcome.
    audit.context("client_id", ContextValue::id(id));
    oauth(state)
        .authenticate_client(id, form.secret.as_deref())
        .await
}

fn audit_token(audit: &Audit, g: &GrantRow, kind: &'static str) {
    audit.set_actor(Actor::user(&g.user_id, &g.username));
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("oauth_token");
        a.resource_id = Some(g.id.clone());
        a.patient_id = g.patient_id.clone();
        a.context
            .insert("client_id", ContextValue::id(&g.client_id));
        a.context.insert("grant_type", ContextValue::Code(kind));
    });
}

fn issued_body(state: &AppState, headers: &HeaderMap, i: &Issued) -> Value {
    let mut body = json!({
        "access_token": i.access_token.expose(),
        "token_type": "Bearer",
        "expires_in": i.expires_in,
        "scope": i.scope,
    });
    if let Some(r) = &i.refresh_token {
        body["refresh_token"] = json!(r.expose());
    }
    if let Some(p) = &i.patient {
        body["patient"] = json!(p);
    }
    if i.ehr_launch {
        let origin = origin_of(&crate::fhir::routes::base_url(state, headers));
        body["need_patient_banner"] = json!(true);
        body["smart_style_url"] = json!(format!("{origin}/oauth/smart-style.json"));
    }
    body
}

/// `POST /oauth/token`: `authorization_code` and `refresh_token`.
async fn token(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("oauth_token");
    });
    let form = match read_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => return refused(&audit, &e, false),
    };
    let client = match client_of(&state, &form, &audit).await {
        Ok(c) => c,
        Err(e) => return refused(&audit, &e, form.basic),
    };
    audit.context("client_id", ContextValue::id(&client.id));
    let result = match form.get("grant_type") {
        Some("authorization_code") => match form.get("code") {
            None => Err(OAuthError::InvalidRequest("code is required")),
            Some(code) => {
                oauth(&state)
                    .exchange_code(
                        &client,
                        code,
                        form.get("redirect_uri"),
                        form.get("code_verifier"),
                    )
                    .await
            }
        }
        .map(|i| (i, "authorization_code")),
        Some("refresh_token") => match form.get("refresh_token") {
            None => Err(OAuthError::InvalidRequest("refresh_token is required")),
            Some(t) => oauth(&state)
                .refresh(&client, t, form.get("scope"))
                .await
                .map(|i| (i, "refresh_token")),
        },
        Some(_) => Err(OAuthError::UnsupportedGrantType),
        None => Err(OAuthError::InvalidRequest("grant_type is required")),
    };
    match result {
        Ok((issued, kind)) => {
            audit_token(&audit, &issued.grant, kind);
            no_store(StatusCode::OK, &issued_body(&state, &headers, &issued))
        }
        Err(e) => refused(&audit, &e, form.basic),
    }
}

fn refused(audit: &Audit, e: &OAuthError, basic: bool) -> Response {
    if let OAuthError::Replayed { grant_id, .. } = e {
        // The replay revoked the grant: the event says which.
        audit.annotate(|a| {
            a.action = Some(Action::Delete);
            a.resource_type = Some("oauth_grant");
            a.resource_id = Some(grant_id.clone());
            a.context.insert("reason", ContextValue::Code("replay"));
        });
    }
    audit.annotate(|a| {
        a.outcome = Some(match e {
            OAuthError::Store(_) | OAuthError::Crypto => Outcome::Error,
            _ => Outcome::Denied,
        });
        a.context.insert("error", ContextValue::Code(e.code()));
    });
    oauth_error(e, basic)
}

/// The common start of introspection and revocation: the form, the app (authenticated),
/// and the `token` it asks about; or the error answer.
async fn about_token(
    state: &AppState,
    audit: &Audit,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ClientRow, String), Response> {
    let form = read_form(headers, body).map_err(|e| refused(audit, &e, false))?;
    let client = client_of(state, &form, audit)
        .await
        .map_err(|e| refused(audit, &e, form.basic))?;
    audit.context("client_id", ContextValue::id(&client.id));
    match form.get("token") {
        Some(t) => Ok((client, t.to_owned())),
        None => Err(refused(
            audit,
            &OAuthError::InvalidRequest("token is required"),
            form.basic,
        )),
    }
}

/// `POST /oauth/introspect` (RFC 7662), for a registered client about its own tokens.
async fn introspect(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("oauth_token");
    });
    let (client, token) = match about_token(&state, &audit, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let i = oauth(&state).introspect(&client, &token).await;
    let body = if i.active {
        let mut b = json!({
            "active": true,
            "scope": i.scope,
            "client_id": i.client_id,
            "username": i.username,
            "exp": i.exp,
            "token_type": i.token_type,
        });
        if let Some(p) = i.patient {
            b["patient"] = json!(p);
        }
        b
    } else {
        json!({"active": false})
    };
    no_store(StatusCode::OK, &body)
}

/// `POST /oauth/revoke` (RFC 7009): 200 whether or not the token was known.
async fn revoke(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("oauth_token");
    });
    let (client, token) = match about_token(&state, &audit, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match oauth(&state).revoke_token(&client, &token).await {
        Ok(grant) => {
            if let Some(g) = grant {
                audit.annotate(|a| a.resource_id = Some(g));
            }
            no_store(StatusCode::OK, &json!({}))
        }
        Err(e) => refused(&audit, &e, false),
    }
}

// ---- the JSON API ---------------------------------------------------------------

/// A registered app.
#[derive(Serialize, ToSchema)]
pub struct AppView {
    client_id: String,
    name: String,
    /// `public` or `confidential`.
    client_type: &'static str,
    redirect_uris: Vec<String>,
    launch_url: Option<String>,
    /// The scopes the app may ask for (space-separated).
    scopes: String,
    /// This server's own PRECISE-HBR app.
    builtin: bool,
    created_at: String,
    updated_at: String,
    /// A confidential app's secret: only in the answer that registered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_secret: Option<String>,
}

impl AppView {
    fn of(c: ClientRow) -> Self {
        Self {
            client_id: c.id,
            name: c.name,
            client_type: if c.confidential {
                "confidential"
            } else {
                "public"
            },
            redirect_uris: c.redirect_uris,
            launch_url: c.launch_url,
            scopes: c.scopes,
            builtin: c.builtin,
            created_at: c.created_at,
            updated_at: c.updated_at,
            client_secret: None,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AppList {
    items: Vec<AppView>,
}

/// A new app, or an app's new settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppRequest {
    name: String,
    /// `public` (default) or `confidential` (gets a secret, shown once). Fixed at
    /// registration.
    #[serde(default)]
    client_type: Option<String>,
    /// Exact redirect URIs: https, or http to a loopback host; no wildcards.
    redirect_uris: Vec<String>,
    #[serde(default)]
    launch_url: Option<String>,
    /// Space-separated scopes the app may ask for.
    scopes: String,
}

fn new_app(r: AppRequest) -> Result<NewApp, ApiError> {
    let confidential = match r.client_type.as_deref() {
        None | Some("public") => false,
        Some("confidential") => true,
        Some(_) => {
            return Err(ApiError::field(
                "client_type",
                "must be public or confidential",
            ));
        }
    };
    Ok(NewApp {
        name: r.name,
        confidential,
        redirect_uris: r.redirect_uris,
        launch_url: r.launch_url,
        scopes: r.scopes,
    })
}

fn audit_app(audit: &Audit, action: Action, id: Option<&str>) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("oauth_client");
        a.resource_id = id.map(str::to_owned);
    });
}

/// The registered apps (`users:manage`).
#[utoipa::path(get, path = "/api/v1/apps", tag = "apps", security(("bearer" = ["users:manage"])),
    responses((status = 200, body = AppList)))]
pub async fn list_apps(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
) -> Result<Json<AppList>, ApiError> {
    audit_app(&audit, Action::Read, None);
    let items = oauth(&state)
        .apps()
        .await?
        .into_iter()
        .map(AppView::of)
        .collect();
    Ok(Json(AppList { items }))
}

/// Registers an app (`users:manage`); a confidential app's secret is in this answer only.
#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", security(("bearer" = ["users:manage"])),
    request_body = AppRequest,
    responses((status = 201, body = AppView), (status = 422, description = "validation_error")))]
pub async fn create_app(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    JsonBody(req): JsonBody<AppRequest>,
) -> Result<Response, ApiError> {
    audit_app(&audit, Action::Create, None);
    let app = new_app(req)?;
    let (row, secret) = oauth(&state).register(&auth.0.user_id, &app).await?;
    audit_app(&audit, Action::Create, Some(&row.id));
    let mut view = AppView::of(row);
    view.client_secret = secret.map(|s| s.expose().to_owned());
    let mut r = (StatusCode::CREATED, Json(view)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[utoipa::path(get, path = "/api/v1/apps/{id}", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 200, body = AppView), (status = 404, description = "not_found")))]
pub async fn get_app(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<AppView>, ApiError> {
    audit_app(&audit, Action::Read, Some(&id));
    Ok(Json(AppView::of(oauth(&state).app(&id).await?)))
}

/// Changes an app's name, redirect URIs, launch URL and scopes (not its type).
#[utoipa::path(put, path = "/api/v1/apps/{id}", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), request_body = AppRequest,
    responses((status = 200, body = AppView), (status = 404, description = "not_found"), (status = 422, description = "validation_error")))]
pub async fn update_app(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<AppRequest>,
) -> Result<Json<AppView>, ApiError> {
    audit_app(&audit, Action::Update, Some(&id));
    let app = new_app(req)?;
    Ok(Json(AppView::of(oauth(&state).update(&id, &app).await?)))
}

/// Deletes an app: every grant made to it is revoked.
#[utoipa::path(delete, path = "/api/v1/apps/{id}", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 204, description = "Deleted"), (status = 404, description = "not_found")))]
pub async fn delete_app(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit_app(&audit, Action::Delete, Some(&id));
    let n = oauth(&state).delete(&id).await?;
    audit.context(
        "grants_revoked",
        ContextValue::Int(i64::try_from(n).unwrap_or(0)),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// A grant: what a person allowed an app.
#[derive(Serialize, ToSchema)]
pub struct GrantView {
    id: String,
    client_id: String,
    app: String,
    user_id: String,
    username: String,
    /// The launch patient (`patient/` scopes reach only this patient).
    patient_id: Option<String>,
    scopes: String,
    /// What the scopes allow, in words.
    allows: Vec<String>,
    created_at: String,
    last_used_at: Option<String>,
}

impl GrantView {
    fn of(g: GrantRow) -> Self {
        let (s, _) = super::scopes::Scopes::parse(&g.scopes);
        Self {
            allows: s.resources.iter().map(|r| r.describe()).collect(),
            id: g.id,
            client_id: g.client_id,
            app: g.client_name,
            user_id: g.user_id,
            username: g.username,
            patient_id: g.patient_id,
            scopes: g.scopes,
            created_at: g.created_at,
            last_used_at: g.last_used_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct GrantList {
    items: Vec<GrantView>,
}

fn audit_grant(audit: &Audit, action: Action, id: Option<&str>) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("oauth_grant");
        a.resource_id = id.map(str::to_owned);
    });
}

/// The live grants of one app (`users:manage`).
#[utoipa::path(get, path = "/api/v1/apps/{id}/grants", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 200, body = GrantList)))]
pub async fn app_grants(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<GrantList>, ApiError> {
    audit_grant(&audit, Action::Read, None);
    audit.context("client_id", ContextValue::id(&id));
    oauth(&state).app(&id).await?;
    let items = oauth(&state)
        .grants(None, Some(&id))
        .await?
        .into_iter()
        .map(GrantView::of)
        .collect();
    Ok(Json(GrantList { items }))
}

/// Revokes every grant of an app (its tokens stop working on their next request).
#[utoipa::path(delete, path = "/api/v1/apps/{id}/grants", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 204, description = "Revoked"), (status = 404, description = "not_found")))]
pub async fn revoke_app_grants(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit_grant(&audit, Action::Delete, None);
    audit.context("client_id", ContextValue::id(&id));
    let n = oauth(&state).revoke_app(&id).await?;
    audit.context(
        "grants_revoked",
        ContextValue::Int(i64::try_from(n).unwrap_or(0)),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Every live grant, newest first (`users:manage`).
#[utoipa::path(get, path = "/api/v1/grants", tag = "apps", security(("bearer" = ["users:manage"])),
    responses((status = 200, body = GrantList)))]
pub async fn all_grants(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
) -> Result<Json<GrantList>, ApiError> {
    audit_grant(&audit, Action::Read, None);
    let items = oauth(&state)
        .grants(None, None)
        .await?
        .into_iter()
        .map(GrantView::of)
        .collect();
    Ok(Json(GrantList { items }))
}

/// Revokes one grant of anyone (`users:manage`).
#[utoipa::path(delete, path = "/api/v1/grants/{id}", tag = "apps", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 204, description = "Revoked"), (status = 404, description = "not_found")))]
pub async fn revoke_any_grant(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit_grant(&audit, Action::Delete, Some(&id));
    oauth(&state).revoke_grant(&id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's connected apps: what each may do, when it was last used.
#[utoipa::path(get, path = "/api/v1/auth/apps", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = GrantList)))]
pub async fn my_apps(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::SignedIn>,
) -> Result<Json<GrantList>, ApiError> {
    audit_grant(&audit, Action::Read, None);
    let items = oauth(&state)
        .grants(Some(&auth.0.user_id), None)
        .await?
        .into_iter()
        .map(GrantView::of)
        .collect();
    Ok(Json(GrantList { items }))
}

/// Disconnects one of the caller's apps: its tokens stop working on their next request.
#[utoipa::path(delete, path = "/api/v1/auth/apps/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 204, description = "Revoked"), (status = 404, description = "not_found")))]
pub async fn revoke_my_app(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::SignedIn>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit_grant(&audit, Action::Delete, Some(&id));
    oauth(&state)
        .revoke_grant(&id, Some(&auth.0.user_id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
