//! HTTP plumbing: errors, extractors, headers, middleware, the server loop. It imports
//! no capability: `crate::routes` assembles every capability's routes and the
//! middleware, in this order, outermost first:
//! request id → security headers → request log → client IP → audit (the response waits
//! for its event to commit) → CORS → catch panic → timeout → body guard (415/413 from
//! headers) → route (extract → authorise → service → respond).

pub mod client_ip;
pub mod docs;
pub mod error;
pub mod headers;
pub mod json;
pub mod logging;
pub mod params;
pub mod path;
pub mod request_id;
pub mod server;
pub mod tls;

use std::any::Any;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use error::{ApiError, ErrorCode, FieldError};

/// The name of a request method as a bounded label: one of the nine methods of RFC 9110
/// (and PATCH), or `_OTHER` for any method a client invents. Metrics and rate-limit keys
/// use it, so that a client cannot make a new series or budget per request.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter(|o| !o.contains('*'))
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                axum::http::header::IF_MATCH,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

pub async fn timeout_middleware(
    State(limit): State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(limit = ?limit, "request timed out");
            ApiError::new(ErrorCode::Timeout).into_response()
        }
    }
}

pub fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed)
}
