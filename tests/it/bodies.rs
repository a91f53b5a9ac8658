//! Malformed requests get a precise 4xx problem, never a 500 and never a panic.

use axum::Router;
use axum::routing::{get, post};
use custodian::app::AppState;
use custodian::http::json::{JsonBody, QueryParams};
use serde::Deserialize;

use crate::both_backends;
use crate::support::{Backend, Options, TestServer, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Patientish {
    given_name: String,
    age: u32,
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Paging {
    limit: Option<u32>,
}

fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/test/echo", post(|JsonBody(b): JsonBody<Patientish>| async move { b.given_name }))
        .route("/api/v1/test/page", get(|QueryParams(p): QueryParams<Paging>| async move { p.limit.unwrap_or(0).to_string() }))
}

async fn server(backend: Backend) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            sets: vec![("server.max_body", "1KiB".into())],
            extra: Some(routes()),
            ..Options::default()
        },
    )
    .await
}

async fn post_raw(
    s: &TestServer,
    ct: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = s.client.post(s.url("/api/v1/test/echo")).body(body);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

async fn valid_json_is_accepted(backend: Backend) {
    let s = server(backend).await;
    let res = post_raw(
        &s,
        Some("application/json; charset=utf-8"),
        r#"{"given_name":"Ada","age":36}"#,
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "Ada");
}
both_backends!(valid_json_is_accepted);

async fn wrong_media_type_is_415(backend: Backend) {
    let s = server(backend).await;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonp"),
    ] {
        let res = post_raw(&s, ct, r#"{"given_name":"Ada","age":36}"#).await;
        assert_eq!(res.status(), 415, "{ct:?}");
        assert_eq!(json(res).await["code"], "unsupported_media_type");
    }
}
both_backends!(wrong_media_type_is_415);

async fn oversize_bodies_are_413(backend: Backend) {
    let s = server(backend).await;
    let big = format!(r#"{{"given_name":"{}","age":1}}"#, "x".repeat(2048));
    let res = post_raw(&s, Some("application/json"), big.clone()).await;
    assert_eq!(res.status(), 413);
    assert_eq!(json(res).await["code"], "payload_too_large");
    // Chunked, without Content-Length: caught while reading.
    let status = raw_chunked_post(&s, "/api/v1/test/echo", big.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
}
both_backends!(oversize_bodies_are_413);

/// Sends a chunked POST over a raw socket and returns the status line.
async fn raw_chunked_post(s: &TestServer, path: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(256) {
        let _ = sock
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = sock.write_all(chunk).await;
        let _ = sock.write_all(b"\r\n").await;
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

async fn each_kind_of_bad_json_is_422_with_the_field(backend: Backend) {
    let s = server(backend).await;
    let cases = [
        (
            r#"{"given_name": "Ada", "age": "SECRET-CANARY"}"#,
            "age",
            "invalid type",
        ),
        (
            r#"{"given_name": "Ada", "age": -3}"#,
            "age",
            "invalid value",
        ),
        (r#"{"given_name": "Ada"}"#, "age", "missing field `age`"),
        (
            r#"{"given_name": "Ada", "age": 3, "role": "admin"}"#,
            "role",
            "unknown field `role`",
        ),
        (
            r#"{"given_name": "Ada", "age": 3, "tags": ["a", 5]}"#,
            "tags[1]",
            "invalid type",
        ),
        (r#"{"given_name": "Ada", "age": "#, "", "not valid JSON"),
        (r#"[1,2,3]"#, "", "the body must be a JSON object"),
        (r#"["Ada", 36]"#, "", "the body must be a JSON object"),
        ("", "", "not valid JSON"),
        ("\u{0}\u{1}", "", "not valid JSON"),
    ];
    for (body, field, message) in cases {
        let res = post_raw(&s, Some("application/json"), body).await;
        assert_eq!(res.status(), 422, "{body}");
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("CANARY"),
            "the submitted value is never echoed: {text}"
        );
        let b: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(b["code"], "validation_error", "{body}");
        assert_eq!(b["errors"][0]["field"], field, "{body}: {text}");
        assert!(
            b["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{body}: {text}"
        );
    }
}
both_backends!(each_kind_of_bad_json_is_422_with_the_field);

async fn bad_query_parameters_are_422(backend: Backend) {
    let s = server(backend).await;
    assert_eq!(
        s.get("/api/v1/test/page?limit=5")
            .await
            .text()
            .await
            .unwrap(),
        "5"
    );
    for q in ["limit=abc", "limit=-1", "limit=99999999999", "offset=3"] {
        let res = s.get(&format!("/api/v1/test/page?{q}")).await;
        assert_eq!(res.status(), 422, "{q}");
        assert_eq!(json(res).await["code"], "validation_error");
    }
}
both_backends!(bad_query_parameters_are_422);

/// A 422 names every wrong field of a body or query string, missing ones included, in
/// JSON's words (never a Rust type), and a path id that is not UTF-8 is a problem
/// document too, on the API and on the pages.
async fn every_wrong_field_is_named(backend: Backend) {
    let s = TestServer::start_with(backend, Options::unlimited()).await;
    s.user("doc", "doctor", "Correct-Horse-9!").await;
    let t = s.login("doc", "Correct-Horse-9!").await;
    let res = s
        .post(
            "/api/v1/patients",
            Some(&t),
            serde_json::json!({"given_name": 5, "family_name": true, "sex": 7, "mrn": [], "nickname": "CANARY"}),
        )
        .await;
    assert_eq!(res.status(), 422);
    let text = res.text().await.unwrap();
    let b: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fields: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "birth_date",
            "family_name",
            "given_name",
            "mrn",
            "nickname",
            "sex"
        ],
        "{text}"
    );
    for e in b["errors"].as_array().unwrap() {
        assert!(!e["field"].as_str().unwrap().is_empty(), "{text}");
    }
    // Not one object: named as the whole body, in JSON's words.
    for body in [
        serde_json::json!([1, 2]),
        serde_json::json!(["doc", "pw"]),
        serde_json::json!("x"),
    ] {
        let res = s.post("/api/v1/auth/login", None, body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        let text = res.text().await.unwrap();
        assert!(text.contains("the body must be a JSON object"), "{text}");
        for rust in ["struct", "LoginRequest", "sequence", "u32"] {
            assert!(!text.contains(rust), "{rust} in {text}");
        }
    }
    // A query string: every wrong parameter at once.
    let res = s
        .get_as(
            &format!(
                "/api/v1/patients?limit=0&q={}&bogus=1&anonymize=perhaps",
                "a".repeat(201)
            ),
            &t,
        )
        .await;
    assert_eq!(res.status(), 422);
    let b = json(res).await;
    let mut fields: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["anonymize", "bogus", "limit", "q"], "{b}");
    // A path id that is not UTF-8: 404 like any id never issued, as problem+json.
    s.user("adm", "admin", "Correct-Horse-9!").await;
    let admin = s.login("adm", "Correct-Horse-9!").await;
    for path in [
        "/api/v1/patients/%FF",
        "/api/v1/patients/%FF/records",
        "/api/v1/records/%C3%28",
        "/api/v1/users/%FF/logins",
    ] {
        let res = s.get_as(path, &admin).await;
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
        assert_eq!(json(res).await["code"], "not_found", "{path}");
    }
    let res = s
        .send_as(reqwest::Method::DELETE, "/api/v1/roles/%FF", &admin, None)
        .await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}
both_backends!(every_wrong_field_is_named);
