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
    let principal = state
        .identity()
        .authenticate(token)
        .await
        .map_err(|e| match e {
            IdentityError::Unauthorized => ApiError::new(crate::http::ErrorCode::Unauthorized),
            other => ApiError::from(other),
        })?;
    if let Some(audit) = parts.extensions.get::<Audit>() {
        audit.set_actor(Actor::user(&principal.user_id, &principal.username));
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

/// A principal when the request carries a token; `None` when it carries none. A token
/// that is present but invalid is still a 401.
pub struct MaybePrincipal(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybePrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match bearer(parts) {
            None => Ok(MaybePrincipal(None)),
            Some(Err(())) => Err(ApiError::new(crate::http::ErrorCode::Unauthorized)),
            Some(Ok(token)) => {
                let token = token.to_owned();
                authenticate(parts, state, &token)
                    .await
                    .map(|p| MaybePrincipal(Some(p)))
            }
        }
    }
}
