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
use serde_json::Value;
use serde_path_to_error::Segment;

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

/// Most field errors one 422 lists.
const MAX_ERRORS: usize = 32;
/// Longest field path shown (a path holds the client's own keys).
const MAX_FIELD: usize = 128;
/// Bytes of body the search for further wrong fields may re-read in all (each round
/// re-reads the body up to the next error): a large bad body gets fewer rounds, so a
/// 422 never costs much more than parsing the body a few times.
const COLLECT_BUDGET: usize = 4 * 1024 * 1024;

/// Parses a JSON body into `T`, mapping every failure to a 422 that names each wrong
/// field (see [`Collector`]). The body must be one JSON object: serde would also take an
/// array for a struct, field by position, which no client of this API means.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let first = match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        Ok(v) => match de.end() {
            Err(e) => return Err(not_json(&e)),
            Ok(()) if !starts_an_object(bytes) => return Err(not_an_object()),
            Ok(()) => return Ok(v),
        },
        Err(e) => e,
    };
    let segments: Vec<Segment> = first.path().iter().cloned().collect();
    let inner = first.into_inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            return Err(not_json(&inner));
        }
        serde_json::error::Category::Io => {
            return Err(ApiError::field("", "the body could not be read"));
        }
        serde_json::error::Category::Data => {}
    }
    if !starts_an_object(bytes) {
        return Err(not_an_object());
    }
    let mut c = Collector::default();
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut value) => {
            let mut more = c.step(&mut value, segments, &inner.to_string());
            let rounds = (COLLECT_BUDGET / bytes.len().max(1)).clamp(1, 4 * MAX_ERRORS);
            for _ in 0..rounds {
                if !more {
                    break;
                }
                match serde_path_to_error::deserialize::<_, T>(&value) {
                    Ok(_) => break,
                    Err(e) => {
                        let segments = e.path().iter().cloned().collect();
                        more = c.step(&mut value, segments, &e.into_inner().to_string());
                    }
                }
            }
        }
        Err(_) => {
            c.step(&mut Value::Null, segments, &inner.to_string());
        }
    }
    // In a stable order: by field.
    c.errors.sort_by(|a, b| a.field.cmp(&b.field));
    Err(ApiError::validation(c.errors))
}

fn not_json(e: &serde_json::Error) -> ApiError {
    ApiError::field(
        "",
        format!(
            "the body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
    )
}

fn not_an_object() -> ApiError {
    ApiError::field("", "the body must be a JSON object")
}

fn starts_an_object(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().first() == Some(&b'{')
}

/// Values tried in place of a wrong or missing one, so that deserialising again finds
/// the next wrong field (serde stops at the first). `null` first: it fits every
/// optional field.
fn placeholder(n: usize) -> Option<Value> {
    Some(match n {
        0 => Value::Null,
        1 => Value::String(String::new()),
        2 => Value::from(0),
        3 => Value::Bool(false),
        4 => Value::Array(Vec::new()),
        5 => Value::Object(serde_json::Map::new()),
        _ => return None,
    })
}

/// The field errors of one body: each wrong field once, with its own message.
#[derive(Default)]
struct Collector {
    errors: Vec<FieldError>,
    /// Placeholders tried so far, by field path.
    tried: std::collections::HashMap<String, usize>,
}

impl Collector {
    /// Records the error at `segments` (unless that field already has one) and changes
    /// `value` so that the next attempt gets past it. False when no progress is possible.
    fn step(&mut self, value: &mut Value, mut segments: Vec<Segment>, message: &str) -> bool {
        let message = message.split(" at line ").next().unwrap_or(message);
        // "missing field `x`" and "duplicate field `x`" are reported at the object that
        // holds (or lacks) the field: name the field.
        if let Some(name) = named_field(message) {
            segments.push(Segment::Map {
                key: name.to_owned(),
            });
        }
        let field = render(&segments);
        let known = self.errors.iter().any(|e| within(&field, &e.field));
        if !known && self.errors.len() < MAX_ERRORS {
            self.errors
                .push(FieldError::new(field.clone(), sanitize(message)));
        }
        if message.starts_with("duplicate field") {
            // Only the raw body has the duplicate; the parsed value kept one of them.
            return true;
        }
        if message.starts_with("unknown field") {
            return remove(value, &segments);
        }
        let n = self.tried.entry(field).or_insert(0);
        let Some(next) = placeholder(*n) else {
            return false;
        };
        *n += 1;
        put(value, &segments, next)
    }
}

/// The field a "missing field `x`" or "duplicate field `x`" message names: serde
/// reports both at the object, not at the field.
fn named_field(message: &str) -> Option<&str> {
    ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|r| r.split('`').next())
}

/// A path as clients read it: `address.zip`, `tags[1]`.
fn render(segments: &[Segment]) -> String {
    let mut s = String::new();
    for seg in segments {
        match seg {
            Segment::Seq { index } => s.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(key);
            }
            Segment::Unknown => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push('?');
            }
        }
    }
    s.chars().take(MAX_FIELD).collect()
}

/// Whether `field` is `known` or lies inside it.
fn within(field: &str, known: &str) -> bool {
    field == known
        || field.strip_prefix(known).is_some_and(|rest| {
            !known.is_empty() && (rest.starts_with('.') || rest.starts_with('['))
        })
}

/// The value at `segments`, if the path leads anywhere.
fn slot<'v>(value: &'v mut Value, segments: &[Segment]) -> Option<&'v mut Value> {
    let mut v = value;
    for seg in segments {
        v = match (seg, v) {
            (Segment::Map { key } | Segment::Enum { variant: key }, Value::Object(m)) => {
                m.get_mut(key)?
            }
            (Segment::Seq { index }, Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Sets the value at `segments` (inserting the last key into its object).
fn put(value: &mut Value, segments: &[Segment], new: Value) -> bool {
    let Some((last, parent)) = segments.split_last() else {
        return false;
    };
    match (last, slot(value, parent)) {
        (Segment::Map { key } | Segment::Enum { variant: key }, Some(Value::Object(m))) => {
            m.insert(key.clone(), new);
            true
        }
        (Segment::Seq { index }, Some(Value::Array(a))) => match a.get_mut(*index) {
            Some(v) => {
                *v = new;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Removes the key at `segments` from its object.
fn remove(value: &mut Value, segments: &[Segment]) -> bool {
    let Some((Segment::Map { key }, parent)) = segments.split_last() else {
        return false;
    };
    match slot(value, parent) {
        Some(Value::Object(m)) => m.remove(key).is_some(),
        _ => false,
    }
}

fn field_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.chars().take(MAX_FIELD).collect()
    }
}

/// Removes the submitted value from a serde message, and says what was expected in the
/// words of JSON (an object, an array, an integer), never in Rust's (`struct
/// LoginRequest`, `u32`).
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
            return match m.split_once(", expected ").and_then(|(_, e)| expected(e)) {
                Some(expected) => format!("{prefix}, expected {expected}"),
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

/// serde's "expected …" in JSON's words, or None when it would only name a Rust type.
fn expected(e: &str) -> Option<String> {
    let e = e.trim();
    let words = match e {
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "a character" | "char" | "string" => "a string",
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number of at least 0",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a sequence" | "sequence" => "an array",
        "a map" | "map" => "an object",
        "unit" => "null",
        _ if e.starts_with("struct ") && !e.starts_with("struct variant") => "an object",
        _ if e.starts_with("tuple") || e.starts_with("an array") => "an array",
        // Variant and field lists are the API's own words (`female`, `male`, …).
        _ if e.starts_with("one of ") || (e.starts_with('`') && e.ends_with('`')) => {
            return Some(e.to_owned());
        }
        _ => return None,
    };
    Some(words.to_owned())
}

/// A query string parsed strictly: unknown or malformed parameters are a 422.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(QueryParams)
    }
}

/// Parses a query string into `T`, naming every wrong parameter: each failing one is
/// reported, then left out (or, when required, given a placeholder) and the rest parsed
/// again, as [`parse`] does for bodies.
pub fn parse_query<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut errors: Vec<FieldError> = Vec::new();
    let mut tried: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for _ in 0..4 * MAX_ERRORS {
        let encoded = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter())
            .finish();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(encoded.as_bytes()));
        let e = match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) if errors.is_empty() => return Ok(v),
            Ok(_) => break,
            Err(e) => e,
        };
        let message = e.inner().to_string();
        let missing = message.starts_with("missing field");
        let field = named_field(&message).map_or_else(
            || field_path(&e.path().to_string()),
            |name| name.chars().take(MAX_FIELD).collect(),
        );
        if !errors.iter().any(|x| x.field == field) && errors.len() < MAX_ERRORS {
            errors.push(FieldError::new(field.clone(), sanitize(&message)));
        }
        if field.is_empty() {
            break;
        }
        if !missing {
            // Leave the wrong parameter out and parse the rest again.
            let before = pairs.len();
            pairs.retain(|(k, _)| *k != field);
            if pairs.len() == before {
                break;
            }
            continue;
        }
        // A required parameter: try a placeholder in its place.
        let n = tried.entry(field.clone()).or_insert(0);
        match ["0", "false", "x"].get(*n) {
            Some(p) => pairs.push((field, (*p).to_owned())),
            None => break,
        }
        *n += 1;
    }
    Err(ApiError::validation(errors))
}

/// Guards the API before routing: a body sent to `/api` must be JSON (415) and within
/// the limit (413), judged from the headers, so nothing reads an oversize body.
pub async fn body_guard(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let api = path.starts_with("/api/");
    // FHIR bodies are `application/fhir+json` or a search form: their routes check the
    // type; the size is checked here for both.
    let fhir = path == "/fhir" || path.starts_with("/fhir/");
    if !api && !fhir {
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
    if api && writes && has_body {
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

    fn all(json: &str) -> Vec<(String, String)> {
        let e = parse::<Body>(json.as_bytes()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ValidationError);
        e.field_errors()
            .iter()
            .map(|f| (f.field.clone(), f.message.clone()))
            .collect()
    }

    #[test]
    fn every_wrong_field_is_named_once() {
        let errors = all(r#"{"name": 5, "age": "CANARY", "kind": "CANARY2", "admin": true}"#);
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["admin", "age", "kind", "name"], "{errors:?}");
        assert!(!format!("{errors:?}").contains("CANARY"));
        // Missing fields are named too, each of them.
        let errors = all(r#"{"kind": "a"}"#);
        assert_eq!(
            errors,
            [
                ("age".to_owned(), "missing field `age`".to_owned()),
                ("name".to_owned(), "missing field `name`".to_owned())
            ]
        );
        let errors = all(r#"{"name": "x", "age": 3, "kind": "a", "kind": "b"}"#);
        assert_eq!(errors[0].0, "kind");
        assert!(errors[0].1.starts_with("duplicate field"), "{errors:?}");
    }

    #[test]
    fn a_large_bad_body_gets_few_rounds() {
        let mut body = format!(r#"{{"name": "{}", "age": 3"#, "x".repeat(900 * 1024));
        for i in 0..40 {
            body.push_str(&format!(r#", "extra{i}": 1"#));
        }
        body.push('}');
        let e = parse::<Body>(body.as_bytes()).unwrap_err();
        let n = e.field_errors().len();
        // 4 MiB of re-reading over a 900 KiB body: the first error and four more.
        assert!((1..=5).contains(&n), "{n}");
        // A small body gets every error.
        let mut small = String::from(r#"{"name": "x", "age": 3"#);
        for i in 0..40 {
            small.push_str(&format!(r#", "extra{i}": 1"#));
        }
        small.push('}');
        let e = parse::<Body>(small.as_bytes()).unwrap_err();
        assert_eq!(e.field_errors().len(), MAX_ERRORS);
    }

    #[test]
    fn messages_speak_json_not_rust() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            inner: Body,
            list: Vec<u32>,
        }
        let e = parse::<Outer>(br#"{"inner": 1, "list": {"a": 1}}"#).unwrap_err();
        let text = format!("{:?}", e.field_errors());
        for rust in ["struct", "Body", "u32", "sequence", "Outer"] {
            assert!(!text.contains(rust), "{rust}: {text}");
        }
        assert_eq!(e.field_errors()[0].field, "inner");
        assert_eq!(
            e.field_errors()[0].message,
            "invalid type, expected an object"
        );
        assert_eq!(e.field_errors()[1].field, "list");
        assert_eq!(
            e.field_errors()[1].message,
            "invalid type, expected an array"
        );
        // A body that is not one object is named as the whole body, in JSON's words.
        for body in [&b"[1, 2]"[..], b"[\"x\", 3]", b"\"text\"", b"7", b"null"] {
            let e = parse::<Body>(body).unwrap_err();
            assert_eq!(
                e.field_errors(),
                [FieldError::new("", "the body must be a JSON object")]
            );
        }
        // Trailing bytes after the object are not JSON.
        let (f, m) = err(r#"{"name": "x", "age": 3} {}"#);
        assert_eq!(f, "");
        assert!(m.contains("not valid JSON"), "{m}");
    }

    #[test]
    fn query_strings_name_every_wrong_parameter() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Q {
            limit: Option<crate::http::params::Limit<100, 20>>,
            flag: Option<bool>,
            user: String,
        }
        let e = parse_query::<Q>("limit=0&flag=maybe&extra=1").unwrap_err();
        let fields: Vec<&str> = e.field_errors().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["limit", "flag", "extra", "user"],
            "{:?}",
            e.field_errors()
        );
        assert_eq!(e.field_errors()[0].message, "must be between 1 and 100");
        let q = parse_query::<Q>("limit=100&user=u").unwrap();
        assert_eq!(q.limit.map(|l| l.get()), Some(100));
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
