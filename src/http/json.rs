//! Strict request bodies and query strings.
//!
//! [`JsonBody`] accepts only `application/json`, at most `server.max_body` bytes, and
//! answers every parse failure with a 422 naming the field. Messages never echo the
//! submitted value (it may be PHI): serde's "invalid type: string \"…\"" is cut to
//! "invalid type, expected …".

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode, FieldError};

/// The body limit, put in request extensions by the router.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// A JSON request body, parsed strictly.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Whether a `Content-Type` is JSON (`application/json`, optionally with parameters).
pub fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .map(|m| m.trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if !is_json(ct) {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType));
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(1024 * 1024, |l| l.0);
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large(limit))?;
        parse(&bytes).map(JsonBody)
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge)
        .with_detail(format!("The request body is larger than {limit} bytes."))
}

/// Parses a JSON body into `T`, mapping every failure to a 422.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    let value = result.map_err(|e| {
        let field = field_path(&e.path().to_string());
        let inner = e.into_inner();
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                return ApiError::field(
                    "",
                    format!(
                        "the body is not valid JSON (line {}, column {})",
                        inner.line(),
                        inner.column()
                    ),
                );
            }
            serde_json::error::Category::Io => "the body could not be read".to_owned(),
            serde_json::error::Category::Data => sanitize(&inner.to_string()),
        };
        ApiError::field(field, message)
    })?;
    Ok(value)
}

fn field_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_owned()
    }
}

/// Removes the submitted value from a serde message.
pub fn sanitize(message: &str) -> String {
    // serde_json appends " at line L column C".
    let m = message.split(" at line ").next().unwrap_or(message);
    for prefix in [
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown variant",
    ] {
        if m.starts_with(prefix) {
            return match m.split_once(", expected ") {
                Some((_, expected)) => format!("{prefix}, expected {expected}"),
                None => prefix.to_owned(),
            };
        }
    }
    if m.starts_with("unknown field") {
        // "unknown field `x`, expected one of …": the field name is the client's key,
        // not a value; keep it, shortened.
        let name = m.split('`').nth(1).unwrap_or("");
        let name: String = name.chars().take(64).collect();
        return format!("unknown field `{name}`");
    }
    if m.starts_with("missing field") || m.starts_with("duplicate field") {
        return m.split(", expected").next().unwrap_or(m).to_owned();
    }
    // Our own validation messages (from `Deserialize` impls) are written to be safe.
    if m.starts_with('!') {
        return m.trim_start_matches('!').to_owned();
    }
    "invalid value".to_owned()
}

/// A query string parsed strictly: unknown or malformed parameters are a 422.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryParams)
            .map_err(|e| {
                let field = field_path(&e.path().to_string());
                ApiError::validation(vec![FieldError::new(
                    field,
                    sanitize(&e.into_inner().to_string()),
                )])
            })
    }
}

/// Guards the API before routing: a body sent to `/api` must be JSON (415) and within
/// the limit (413), judged from the headers, so nothing reads an oversize body.
pub async fn body_guard(req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .map_or(1024 * 1024, |l| l.0);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    let has_body =
        declared.is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);
    let writes = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if writes && has_body {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if !is_json(ct) {
            return ApiError::new(ErrorCode::UnsupportedMediaType).into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        age: u32,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Kind {
        A,
        B,
    }

    fn err(json: &str) -> (String, String) {
        let e = parse::<Body>(json.as_bytes()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ValidationError);
        let f = &e.field_errors()[0];
        (f.field.clone(), f.message.clone())
    }

    #[test]
    fn wrong_type_names_the_field_without_the_value() {
        let (f, m) = err(r#"{"name": "x", "age": "SECRET-CANARY"}"#);
        assert_eq!(f, "age");
        assert!(!m.contains("CANARY"), "{m}");
        assert!(m.starts_with("invalid type, expected"), "{m}");
    }

    #[test]
    fn unknown_fields_and_missing_fields() {
        let (f, m) = err(r#"{"name": "x", "age": 3, "admin": true}"#);
        assert_eq!(f, "admin");
        assert_eq!(m, "unknown field `admin`");
        let (_, m) = err(r#"{"name": "x"}"#);
        assert_eq!(m, "missing field `age`");
    }

    #[test]
    fn unknown_enum_variant_hides_the_value() {
        let (f, m) = err(r#"{"name": "x", "age": 3, "kind": "CANARY-VARIANT"}"#);
        assert_eq!(f, "kind");
        assert!(!m.contains("CANARY"), "{m}");
    }

    #[test]
    fn malformed_json() {
        let (f, m) = err(r#"{"name": "#);
        assert_eq!(f, "");
        assert!(m.contains("not valid JSON"), "{m}");
    }

    #[test]
    fn content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(Some("application/jsonx")));
        assert!(!is_json(None));
    }
}
