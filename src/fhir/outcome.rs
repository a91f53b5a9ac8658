//! Errors under `/fhir` are OperationOutcomes. Every error in Custodian is an
//! `ApiError` answered as problem+json (one status table, one place); under `/fhir`
//! this middleware rewrites that answer into an OperationOutcome carrying the same
//! status, headers (`WWW-Authenticate`, `Retry-After`) and request id, with one issue
//! per invalid element (its FHIRPath `expression`). It runs outside the rate limiter,
//! the body guard and the timeout, so their refusals are OperationOutcomes too.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

use crate::http::error::PROBLEM_JSON;

/// Largest problem body rewritten (they are small; anything else is left alone).
const MAX_PROBLEM: usize = 64 * 1024;

pub async fn middleware(req: Request, next: Next) -> Response {
    let fhir = req.uri().path() == "/fhir" || req.uri().path().starts_with("/fhir/");
    let res = next.run(req).await;
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !fhir || !is_problem {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_PROBLEM).await else {
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::empty());
    };
    let problem: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let outcome = operation_outcome(&problem);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::routes::FHIR_JSON),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(outcome.to_string()))
}

/// The FHIR issue type of each error code of the status table.
fn issue_code(code: &str) -> &'static str {
    match code {
        "bad_request" | "validation_error" | "password_policy" => "invalid",
        "unauthorized" | "invalid_credentials" | "mfa_required" | "invalid_totp" => "login",
        "forbidden"
        | "session_required"
        | "reauthentication_required"
        | "mfa_enrollment_required"
        | "password_expired" => "forbidden",
        "not_found" => "not-found",
        "gone" => "deleted",
        "method_not_allowed" | "unsupported_media_type" | "not_acceptable" => "not-supported",
        "conflict" | "precondition_failed" => "conflict",
        "payload_too_large" => "too-costly",
        "rate_limited" => "throttled",
        "timeout" => "timeout",
        "service_unavailable" => "transient",
        "account_locked" => "lock-error",
        "withheld" => "suppressed",
        _ => "exception",
    }
}

/// A problem document as an OperationOutcome: its detail as the first issue's
/// diagnostics (with the request id, to quote in a report), each field error as an
/// issue of its own naming the element.
pub fn operation_outcome(problem: &Value) -> Value {
    let code = problem["code"].as_str().unwrap_or("internal_error");
    let detail = problem["detail"].as_str().unwrap_or("The request failed.");
    let request_id = problem["request_id"].as_str();
    let kind = issue_code(code);
    let severity = if kind == "exception" || kind == "transient" {
        "fatal"
    } else {
        "error"
    };
    let mut diagnostics = detail.to_owned();
    if let Some(id) = request_id {
        diagnostics.push_str(&format!(" (request id {id})"));
    }
    let mut issues = vec![json!({
        "severity": severity,
        "code": kind,
        "details": {"coding": [{"system": "https://custodian.dev/fhir/CodeSystem/error", "code": code}], "text": detail},
        "diagnostics": diagnostics,
    })];
    if let Some(errors) = problem["errors"].as_array() {
        issues = errors
            .iter()
            .map(|e| {
                let field = e["field"].as_str().unwrap_or_default();
                let message = e["message"].as_str().unwrap_or_default();
                let mut i = json!({
                    "severity": "error",
                    "code": if kind == "invalid" { "invalid" } else { kind },
                    "diagnostics": format!("{field}: {message}"),
                });
                if !field.is_empty() {
                    i["expression"] = json!([field]);
                }
                i
            })
            .chain(issues)
            .collect();
    }
    let mut out = json!({"resourceType": "OperationOutcome", "issue": issues});
    if let Some(id) = request_id.filter(|i| super::service::valid_id(i)) {
        out["id"] = json!(id);
    }
    out
}
