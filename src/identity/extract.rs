//! Authentication as an extractor: `Principal` in a handler's arguments means the
//! request carried a valid bearer token; anything else is a 401 before the handler runs.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::service::IdentityError;
use crate::access::Principal;
use crate::app::AppState;
use crate::audit::{Actor, Audit};
use crate::http::ApiError;
use crate::http::logging::UserSlot;

fn bearer(parts: &Parts) -> Option<Result<&str, ()>> {
    let value = parts.headers.get(header::AUTHORIZATION)?;
    let Ok(text) = value.to_str() else {
        return Some(Err(()));
    };
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Some(Err(()));
    }
    Some(Ok(token.trim()))
}

async fn authenticate(
    parts: &mut Parts,
    state: &AppState,
    token: &str,
) -> Result<Principal, ApiError> {
    // A SMART app's token opens the FHIR API only (never /api/v1 or the pages).
    let smart = token.starts_with(super::service::SMART_TOKEN_PREFIX);
    let path = parts.uri.path();
    let under_fhir = path == "/fhir" || path.starts_with("/fhir/");
    let found = if smart && !under_fhir {
        Err(IdentityError::Unauthorized)
    } else if smart {
        state.identity().authenticate_smart(token).await
    } else {
        state.identity().authenticate(token).await
    };
    let principal = found.map_err(|e| match e {
        IdentityError::Unauthorized => ApiError::new(crate::http::ErrorCode::Unauthorized),
        other => ApiError::from(other),
    })?;
    if let Some(audit) = parts.extensions.get::<Audit>() {
        audit.set_actor(Actor::user(&principal.user_id, &principal.username));
        if let Some(app) = principal.smart() {
            // Every access an app makes names the app (and the accounting shows it).
            audit.context("client_id", crate::audit::ContextValue::id(&app.client_id));
        }
    }
    if let Some(slot) = parts.extensions.get::<UserSlot>() {
        slot.set(&principal.user_id);
    }
    Ok(principal)
}

/// A principal already authenticated for this request (by the rate limiter, which
/// limits authenticated requests per user).
#[derive(Clone)]
struct PreAuthenticated(Principal);

/// Authenticates a request's bearer token ahead of its handler and keeps the result
/// for the handler's extractor; returns the principal. `None` when there is no token or
/// it is not valid (the extractor then answers 401 as usual).
pub async fn pre_authenticate(parts: &mut Parts, state: &AppState) -> Option<Principal> {
    let token = match bearer(parts) {
        Some(Ok(t)) => t.to_owned(),
        _ => return None,
    };
    let principal = authenticate(parts, state, &token).await.ok()?;
    parts.extensions.insert(PreAuthenticated(principal.clone()));
    Some(principal)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(PreAuthenticated(p)) = parts.extensions.get::<PreAuthenticated>() {
            return Ok(p.clone());
        }
        match bearer(parts) {
            Some(Ok(token)) => {
                let token = token.to_owned();
                authenticate(parts, state, &token).await
            }
            _ => Err(ApiError::new(crate::http::ErrorCode::Unauthorized)),
        }
    }
}

impl<R: crate::access::Requirement> FromRequestParts<AppState> for crate::access::Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        Self::check(principal)
    }
}

/// A session's principal when the request carries a token; `None` when it carries none.
/// A token that is present but invalid is still a 401, and a personal API token a 403
/// `session_required` (for routes that change the caller's own credentials), both
/// before the body is read.
pub struct MaybeSession(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybeSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match bearer(parts) {
            None => Ok(MaybeSession(None)),
            Some(Err(())) => Err(ApiError::new(crate::http::ErrorCode::Unauthorized)),
            Some(Ok(token)) => {
                let token = token.to_owned();
                let p = authenticate(parts, state, &token).await?;
                if p.session_id().is_none() {
                    return Err(ApiError::new(crate::http::ErrorCode::SessionRequired));
                }
                Ok(MaybeSession(Some(p)))
            }
        }
    }
}

/// A JSON body that may be absent: no body at all (and no `Content-Type`), or an empty
/// one, is `None`; anything else is parsed as strictly as [`crate::http::json::JsonBody`].
pub struct MaybeJsonBody<T>(pub Option<T>);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S>
    for MaybeJsonBody<T>
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Self::Rejection> {
        use crate::http::json::{BodyLimit, is_json, parse};
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().ok().map(str::to_owned));
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(1024 * 1024, |l| l.0);
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| {
                ApiError::new(crate::http::ErrorCode::PayloadTooLarge)
                    .with_detail(format!("The request body is larger than {limit} bytes."))
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeJsonBody(None));
        }
        match ct {
            Some(ct) if is_json(ct.as_deref()) => parse(&bytes).map(|v| MaybeJsonBody(Some(v))),
            _ => Err(ApiError::new(crate::http::ErrorCode::UnsupportedMediaType)),
        }
    }
}
