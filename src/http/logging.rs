//! One log line per request: request id, method, route pattern (never the raw path,
//! which may hold ids), status, latency and the authenticated user id when there is
//! one. Never a body, a query value or a header value.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ErrorCause;
use super::request_id::RequestId;

/// A slot in the request that authentication fills, so the log line names the user.
#[derive(Clone, Debug, Default)]
pub struct UserSlot(std::sync::Arc<std::sync::OnceLock<String>>);

impl UserSlot {
    pub fn set(&self, user_id: &str) {
        let _ = self.0.set(user_id.to_owned());
    }
}

pub async fn middleware(mut req: Request, next: Next) -> Response {
    let slot = UserSlot::default();
    req.extensions_mut().insert(slot.clone());
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "-".to_owned(), |p| p.as_str().to_owned());
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map_or_else(String::new, |r| r.0.clone());
    let res = next.run(req).await;
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    let status = res.status().as_u16();
    let user_id = slot.0.get().cloned().unwrap_or_default();
    if let Some(cause) = res.extensions().get::<ErrorCause>() {
        tracing::error!(
            target: "custodian::http",
            %request_id, %method, %route, status, latency_ms, %user_id,
            error = %format!("{:#}", cause.0),
            "request failed"
        );
    } else if route.starts_with("/health") || route.starts_with("/ready") {
        tracing::debug!(
            target: "custodian::http",
            %request_id, %method, %route, status, latency_ms,
            "request"
        );
    } else {
        tracing::info!(
            target: "custodian::http",
            %request_id, %method, %route, status, latency_ms, %user_id,
            "request"
        );
    }
    res
}
