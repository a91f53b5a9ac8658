//! The browser session: a cookie holding the session token, CSRF tokens, and the
//! extractors every page uses (`WebUser` for reading, `WebForm` for changing).
//!
//! - The cookie is `__Host-custodian`, `HttpOnly; Secure; SameSite=Strict; Path=/`,
//!   with no lifetime of its own: the server session (idle and absolute timeouts) is the
//!   authority. Only in dev over plain HTTP (no TLS here or at a proxy) is it
//!   `custodian` without `Secure` (a `__Host-` cookie must be `Secure`), so that signing
//!   in works from another machine on the network; the server warns at start.
//! - Every form and fetch that changes something carries a CSRF token: the HMAC of the
//!   session id under a keyring key (synchronizer token, nothing stored). The sign-in
//!   form, which has no session yet, uses a double-submit cookie. A forged or missing
//!   token is a 403 and an audit event.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::access::{Permission, Principal};
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, ContextValue, Outcome};
use crate::config::Config;
use crate::crypto;
use crate::http::logging::UserSlot;
use crate::identity::IdentityError;
use crate::identity::service::Expiry;

const CSRF_PURPOSE: &str = "custodian/web/csrf/v1";
/// Longest form body read (forms are small).
const MAX_FORM: usize = 64 * 1024;

pub fn session_cookie_name(c: &Config) -> &'static str {
    if c.dev_over_plain_http() {
        "custodian"
    } else {
        "__Host-custodian"
    }
}

pub fn login_cookie_name(c: &Config) -> &'static str {
    if c.dev_over_plain_http() {
        "custodian_login"
    } else {
        "__Host-custodian_login"
    }
}

/// The `Secure` attribute of this server's cookies, with its separator: none in dev over
/// plain HTTP ([`Config::dev_over_plain_http`]), so that sign-in works from another
/// machine there; everywhere else the cookies are `Secure`.
pub fn secure_attribute(c: &Config) -> &'static str {
    if c.dev_over_plain_http() {
        ""
    } else {
        " Secure;"
    }
}

/// `Set-Cookie` for a value (or its removal when `value` is None).
pub fn set_cookie(c: &Config, name: &str, value: Option<&str>) -> HeaderValue {
    let secure = secure_attribute(c);
    let text = match value {
        Some(v) => format!("{name}={v}; HttpOnly;{secure} SameSite=Strict; Path=/"),
        None => format!("{name}=; HttpOnly;{secure} SameSite=Strict; Path=/; Max-Age=0"),
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// `Set-Cookie` for the SMART launch flow, which crosses sites (the EHR frames the app,
/// and the authorization server redirects back): `SameSite=None; Secure; Partitioned`
/// (CHIPS: the cookie is kept per top-level site, so it is usable only inside the EHR
/// that framed the app). Every change still needs its CSRF token.
pub fn set_embedded_cookie(name: &str, value: Option<&str>) -> HeaderValue {
    let text = match value {
        Some(v) => format!("{name}={v}; HttpOnly; Secure; SameSite=None; Partitioned; Path=/"),
        None => format!("{name}=; HttpOnly; Secure; SameSite=None; Partitioned; Path=/; Max-Age=0"),
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// Where the sign-in form may send the user afterwards: only the SMART app's own paths
/// (no open redirect).
pub fn safe_next(next: &str) -> Option<&str> {
    let ok = (next.starts_with("/smart/") || next.starts_with("/oauth/authorize?"))
        && !next.contains("//")
        && !next.contains('\\')
        && next.len() <= 4096
        && next.chars().all(|c| c.is_ascii_graphic());
    ok.then_some(next)
}

/// The signed-in browser user of a request, when there is one (for handlers that answer
/// something other than a redirect to the sign-in page when there is not).
pub async fn signed_in_user(
    state: &AppState,
    headers: &HeaderMap,
    audit: Option<&Audit>,
) -> Option<WebUser> {
    let token = cookie(headers, session_cookie_name(state.config()))?.to_owned();
    let principal = state.identity().authenticate(&token).await.ok()?;
    // The pages are for people in a session: a personal API token put in the cookie
    // does not sign anyone in (it would reach the session-only administration).
    principal.session_id()?;
    if let Some(audit) = audit {
        audit.set_actor(Actor::user(&principal.user_id, &principal.username));
    }
    let csrf = principal
        .session_id()
        .map(|s| csrf_token(state, s))
        .unwrap_or_default();
    Some(WebUser { principal, csrf })
}

/// A cookie's value from the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The CSRF token of a session.
pub fn csrf_token(state: &AppState, session_id: &str) -> String {
    match state.keys().derive(1, CSRF_PURPOSE) {
        Ok(key) => crypto::hex(&crypto::hmac_sha256(&key, &[session_id.as_bytes()])),
        Err(_) => String::new(),
    }
}

pub fn csrf_ok(expected: &str, given: &str) -> bool {
    !expected.is_empty() && crypto::constant_time_eq(expected.as_bytes(), given.as_bytes())
}

/// A signed-in browser user.
pub struct WebUser {
    pub principal: Principal,
    pub csrf: String,
}

impl WebUser {
    pub fn can(&self, p: Permission) -> bool {
        self.principal.has(p)
    }

    /// The page to answer instead when the user lacks `p` (a 403, or the TOTP set-up
    /// while enrolment is pending); None when the user may go on.
    pub fn refuse(&self, p: Permission) -> Option<Response> {
        if self.can(p) {
            None
        } else if self.principal.mfa_enrollment_pending {
            Some(Redirect::to("/admin#totp").into_response())
        } else {
            Some(super::pages::forbidden(self))
        }
    }
}

async fn web_user(parts: &mut Parts, state: &AppState) -> Result<WebUser, Response> {
    let token = cookie(&parts.headers, session_cookie_name(state.config()))
        .ok_or_else(|| to_login(None))?
        .to_owned();
    let principal = match state.identity().authenticate(&token).await {
        Ok(p) => p,
        // Ended by time: the sign-in page says so.
        Err(IdentityError::SessionExpired(why)) => return Err(to_login(Some(why))),
        Err(_) => return Err(to_login(None)),
    };
    // The pages are for people in a session: a personal API token put in the cookie
    // does not sign anyone in (it would reach the session-only administration).
    principal.session_id().ok_or_else(|| to_login(None))?;
    if let Some(audit) = parts.extensions.get::<Audit>() {
        audit.set_actor(Actor::user(&principal.user_id, &principal.username));
    }
    if let Some(slot) = parts.extensions.get::<UserSlot>() {
        slot.set(&principal.user_id);
    }
    let csrf = principal
        .session_id()
        .map(|s| csrf_token(state, s))
        .unwrap_or_default();
    Ok(WebUser { principal, csrf })
}

/// To the sign-in page; after a session that ended by time, with a notice saying so.
fn to_login(expired: Option<Expiry>) -> Response {
    Redirect::to(match expired {
        Some(Expiry::Idle) => "/login?expired=1",
        Some(Expiry::Absolute) => "/login?ok=session-ended",
        None => "/login",
    })
    .into_response()
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        web_user(parts, state).await
    }
}

/// Form fields in order (repeated names allowed, e.g. checkboxes).
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).into_owned().collect())
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// A field, trimmed, or "" when absent.
    pub fn text(&self, name: &str) -> String {
        self.get(name).unwrap_or("").trim().to_owned()
    }
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

async fn read_form(req: Request) -> Result<Fields, Response> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_FORM)
        .await
        .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.").into_response())?;
    Ok(Fields::parse(&bytes))
}

/// Records a refused CSRF token and answers 403.
fn forged(audit: Option<Audit>) -> Response {
    if let Some(a) = audit {
        a.annotate(|e| {
            e.action = Some(Action::PermissionDenied);
            e.outcome = Some(Outcome::Denied);
            e.context.insert("reason", ContextValue::Code("csrf"));
        });
    }
    tracing::warn!("a form or fetch arrived without a valid CSRF token; refused");
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "This form expired or did not come from this site. Go back, reload the page and try again.",
    )
        .into_response()
}

/// A change made by a signed-in user: the session, the fields, and a checked CSRF token
/// (from the `csrf` field, or the `X-CSRF-Token` header for fetches).
pub struct WebForm {
    pub user: WebUser,
    pub fields: Fields,
}

impl FromRequest<AppState> for WebForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let user = web_user(&mut parts, state).await?;
        let audit = parts.extensions.get::<Audit>().cloned();
        let header_token = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let fields = read_form(Request::from_parts(parts, body)).await?;
        let given = header_token
            .or_else(|| fields.get("csrf").map(str::to_owned))
            .unwrap_or_default();
        if !csrf_ok(&user.csrf, &given) {
            return Err(forged(audit));
        }
        Ok(WebForm { user, fields })
    }
}

/// The sign-in forms: no session yet, so a double-submit cookie guards them.
pub struct LoginForm {
    pub fields: Fields,
}

impl FromRequest<AppState> for LoginForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let expected = cookie(req.headers(), login_cookie_name(state.config()))
            .unwrap_or("")
            .to_owned();
        let audit = req.extensions().get::<Audit>().cloned();
        let fields = read_form(req).await?;
        if expected.len() < 32 || !csrf_ok(&expected, fields.get("csrf").unwrap_or("")) {
            return Err(forged(audit));
        }
        Ok(LoginForm { fields })
    }
}

/// A fresh double-submit value for the sign-in form.
pub fn new_login_csrf() -> String {
    crypto::random_bytes::<32>()
        .map(|b| crypto::hex(&b))
        .unwrap_or_default()
}
