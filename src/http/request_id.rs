//! `X-Request-Id`: every request gets an id made here, set on the response and visible
//! to everything that runs for the request (error bodies, log lines, the audit trail)
//! through a task-local. A client's own `X-Request-Id` never becomes the request's id
//! (anyone could otherwise give their requests the id of someone else's in the audit
//! trail); when well-formed it is kept beside it, as [`ClientRequestId`], which the
//! audit trail records as `client_request_id`: what the client sent, nothing more.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// The id of the current request, made by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The `X-Request-Id` the client sent, when well-formed: kept for the audit trail only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequestId(pub String);

/// The request id of the request being served, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.0.clone()).ok()
}

/// A client-sent id is kept (as [`ClientRequestId`]) when it is 1–128 characters of
/// `[A-Za-z0-9._:-]`, so it cannot carry markup, spaces or control characters.
pub fn is_well_formed(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh request id: a UUIDv7, time-ordered like the audit events that carry it,
/// so the audit trail's `request_id` index grows at its end.
pub fn generate() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub async fn middleware(mut req: Request, next: Next) -> Response {
    let sent = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_well_formed(v))
        .map(|v| ClientRequestId(v.to_owned()));
    if let Some(sent) = sent {
        req.extensions_mut().insert(sent);
    }
    let id = generate();
    let rid = RequestId(id.clone());
    req.extensions_mut().insert(rid.clone());
    let mut res = REQUEST_ID.scope(rid, next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids() {
        assert!(is_well_formed("abc-123_x.y:z"));
        assert!(is_well_formed(&"a".repeat(128)));
        assert!(!is_well_formed(""));
        assert!(!is_well_formed(&"a".repeat(129)));
        assert!(!is_well_formed("has space"));
        assert!(!is_well_formed("new\nline"));
        assert!(!is_well_formed("<script>"));
        assert!(is_well_formed(&generate()));
    }
}
