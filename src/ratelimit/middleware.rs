//! The limiter in the request path.
//!
//! It runs after routing (so it knows the route pattern) and before the handler:
//! - a request with a bearer token is authenticated here first, and is limited as its
//!   user; the principal is kept in the request so the handler's extractor does not
//!   authenticate it a second time;
//! - anything else (no token, an invalid one, sign-in forms, pages) is limited by
//!   client address, before any authentication work is done.
//!
//! Every limited response carries `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset`; a refusal is 429 `rate_limited` with `Retry-After`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Decision;
use crate::app::AppState;
use crate::http::client_ip::ClientIp;
use crate::http::{ApiError, ErrorCode};

/// Paths no limit applies to: probes, metrics (which have their own access rule) and
/// static files.
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics" | "/favicon.ico")
        || path.starts_with("/assets/")
}

pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limiter = state.limiter();
    if !limiter.enabled() || exempt(req.uri().path()) {
        return next.run(req).await;
    }
    // Bounded: an invented method shares the `_OTHER` budget instead of opening a new one.
    let method = crate::http::method_label(req.method());
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => format!("{method} {}", p.as_str()),
        None => format!("{method} (unmatched)"),
    };
    let (mut parts, body) = req.into_parts();
    let client = match crate::identity::extract::pre_authenticate(&mut parts, &state).await {
        Some(p) => format!("user:{}", p.user_id),
        None => match parts.extensions.get::<ClientIp>() {
            Some(ClientIp(ip)) => format!("ip:{}", crate::http::client_ip::network_key(*ip)),
            None => "ip:unknown".to_owned(),
        },
    };
    let decision = limiter.check(&route, &client).await;
    if !decision.allowed {
        let mut res = ApiError::new(ErrorCode::RateLimited)
            .with_retry_after(decision.retry_after)
            .into_response();
        set_headers(res.headers_mut(), &decision);
        return res;
    }
    let mut res = next.run(Request::from_parts(parts, body)).await;
    set_headers(res.headers_mut(), &decision);
    res
}

fn set_headers(h: &mut HeaderMap, d: &Decision) {
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(d.reset));
}
