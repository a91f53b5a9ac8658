//! Conventions every response follows: security headers, request ids, problem+json
//! errors, no-store on the API, 500s without internals, the client IP rule.

use axum::Router;
use axum::routing::get;
use custodian::app::AppState;
use custodian::http::client_ip::ClientIp;
use custodian::http::{ApiError, ErrorCode};

use crate::both_backends;
use crate::support::{Backend, Options, TestServer, json};

const SECURITY_HEADERS: [&str; 5] = [
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "permissions-policy",
];

fn test_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/test/panic",
            get(|| async {
                if std::hint::black_box(true) {
                    panic!("PANIC-CANARY-4242");
                }
                "unreachable"
            }),
        )
        .route(
            "/api/v1/test/internal",
            get(|| async {
                Err::<(), _>(ApiError::internal(anyhow::anyhow!(
                    "INTERNAL-CANARY-7777 at db"
                )))
            }),
        )
        .route(
            "/api/v1/test/conflict",
            get(|| async { Err::<(), _>(ApiError::new(ErrorCode::Conflict)) }),
        )
        .route(
            "/api/v1/test/ip",
            get(|ip: ClientIp| async move { ip.0.to_string() }),
        )
        .route(
            "/api/v1/test/slow",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                "slow"
            }),
        )
}

async fn server(backend: Backend, sets: Vec<(&'static str, String)>) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            sets,
            extra: Some(test_routes()),
            ..Options::default()
        },
    )
    .await
}

fn assert_security_headers(res: &reqwest::Response, what: &str) {
    for h in SECURITY_HEADERS {
        assert!(res.headers().contains_key(h), "{what}: missing {h}");
    }
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{what}: CSP lacks {part}: {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    assert_eq!(res.headers()["referrer-policy"], "no-referrer");
    assert!(
        res.headers().contains_key("x-request-id"),
        "{what}: no X-Request-Id"
    );
}

async fn headers_on_every_kind_of_response(backend: Backend) {
    let s = server(backend, vec![("server.request_timeout", "300ms".into())]).await;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (s.client.get(s.url("/health")), 200, "health"),
        (s.client.get(s.url("/api/openapi.json")), 200, "openapi"),
        (s.client.get(s.url("/api/docs/")), 200, "docs"),
        (s.client.get(s.url("/nope")), 404, "404"),
        (s.client.get(s.url("/api/v1/nope")), 404, "api 404"),
        (s.client.delete(s.url("/health")), 405, "405"),
        (s.client.get(s.url("/api/v1/test/conflict")), 409, "409"),
        (s.client.get(s.url("/api/v1/test/internal")), 500, "500"),
        (s.client.get(s.url("/api/v1/test/panic")), 500, "panic"),
        (s.client.get(s.url("/api/v1/test/slow")), 503, "timeout"),
        (
            s.client
                .post(s.url("/api/v1/nope"))
                .header("content-type", "text/plain")
                .body("x"),
            415,
            "415",
        ),
    ];
    for (req, status, what) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{what}");
        assert_security_headers(&res, what);
        if status >= 400 {
            assert_eq!(
                res.headers()["content-type"],
                "application/problem+json",
                "{what}"
            );
        }
    }
}
both_backends!(headers_on_every_kind_of_response);

async fn api_responses_are_not_cacheable(backend: Backend) {
    let s = server(backend, vec![]).await;
    for path in ["/api/openapi.json", "/api/v1/nope"] {
        let res = s.get(path).await;
        assert_eq!(res.headers()["cache-control"], "no-store", "{path}");
    }
}
both_backends!(api_responses_are_not_cacheable);

async fn hsts_only_over_tls_or_outside_dev(backend: Backend) {
    // Dev over plain HTTP: no HSTS (browsers would pin a local host to HTTPS).
    let s = server(backend, vec![]).await;
    assert!(
        !s.get("/health")
            .await
            .headers()
            .contains_key("strict-transport-security")
    );
}
both_backends!(hsts_only_over_tls_or_outside_dev);

/// The request id is the server's: a client's `X-Request-Id` never becomes the id of
/// its request (in the response, the error body or the audit trail), so nobody can give
/// their requests the id of someone else's. A well-formed client id is kept beside it,
/// as `client_request_id`, for what it is: what the client sent.
async fn request_ids_are_made_by_the_server(backend: Backend) {
    let s = server(backend, vec![]).await;
    let send = |path: &str, sent: &str| {
        let req = s.client.get(s.url(path)).header("x-request-id", sent);
        async move { req.send().await.unwrap() }
    };
    // A victim's request, and another client reusing its id.
    let victim = send("/api/v1/nope", "trace-abc.123:x").await;
    let victim_id = victim.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(victim_id, "trace-abc.123:x");
    assert!(uuid::Uuid::parse_str(&victim_id).is_ok(), "{victim_id}");
    assert_eq!(json(victim).await["request_id"], victim_id.as_str());
    let copycat = send("/api/v1/nope", &victim_id).await;
    let copycat_id = copycat.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        copycat_id, victim_id,
        "a client cannot take another request's id"
    );
    assert_eq!(json(copycat).await["request_id"], copycat_id.as_str());
    // The audit trail: one event per server id; the client's id beside it.
    let events = custodian::audit::store::query(s.state.db(), &Default::default(), 1000, true)
        .await
        .unwrap();
    let with = |id: &str| -> Vec<_> {
        events
            .iter()
            .filter(|e| e.request_id.as_deref() == Some(id))
            .collect()
    };
    let (v, c) = (with(&victim_id), with(&copycat_id));
    assert_eq!((v.len(), c.len()), (1, 1), "{events:?}");
    assert_eq!(v[0].client_request_id.as_deref(), Some("trace-abc.123:x"));
    assert_eq!(c[0].client_request_id.as_deref(), Some(victim_id.as_str()));
    // A malformed client id is not kept at all.
    for bad in ["has space", "<script>alert(1)</script>", &"a".repeat(129)] {
        let res = send("/api/v1/nope", bad).await;
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "a generated UUID, not {bad:?}"
        );
        let e = custodian::audit::store::query(s.state.db(), &Default::default(), 1000, true)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.request_id.as_deref() == Some(id.as_str()))
            .unwrap();
        assert_eq!(e.client_request_id, None, "{bad:?}");
    }
    let a = s.get("/health").await.headers()["x-request-id"].clone();
    let b = s.get("/health").await.headers()["x-request-id"].clone();
    assert_ne!(a, b);
    let v = s.state.audit().verify().await.unwrap();
    assert!(v.ok, "{v:?}");
}
both_backends!(request_ids_are_made_by_the_server);

async fn server_errors_reveal_nothing_but_the_request_id(backend: Backend) {
    let s = server(backend, vec![]).await;
    for path in ["/api/v1/test/internal", "/api/v1/test/panic"] {
        let res = s.get(path).await;
        assert_eq!(res.status(), 500);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let text = res.text().await.unwrap();
        assert!(!text.contains("CANARY"), "{path}: {text}");
        assert!(!text.contains("at db"), "{path}: {text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["code"], "internal_error");
        assert_eq!(body["status"], 500);
        assert_eq!(body["request_id"], id.as_str());
    }
    // The server still answers after a panic.
    assert_eq!(s.get("/health").await.status(), 200);
}
both_backends!(server_errors_reveal_nothing_but_the_request_id);

async fn problem_documents_have_the_contract_shape(backend: Backend) {
    let s = server(backend, vec![]).await;
    let body = json(s.get("/api/v1/nope").await).await;
    assert_eq!(body["type"], "about:blank");
    assert_eq!(body["title"], "Not Found");
    assert_eq!(body["status"], 404);
    assert_eq!(body["code"], "not_found");
    assert!(body["detail"].is_string());
}
both_backends!(problem_documents_have_the_contract_shape);

async fn forwarded_for_is_ignored_from_untrusted_peers(backend: Backend) {
    let s = server(backend, vec![]).await;
    let res = s
        .client
        .get(s.url("/api/v1/test/ip"))
        .header("x-forwarded-for", "198.51.100.7")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "127.0.0.1");
}
both_backends!(forwarded_for_is_ignored_from_untrusted_peers);

async fn forwarded_for_is_used_from_trusted_proxies(backend: Backend) {
    let s = server(
        backend,
        vec![("server.trusted_proxies", "127.0.0.1/32".into())],
    )
    .await;
    let res = s
        .client
        .get(s.url("/api/v1/test/ip"))
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "198.51.100.7");
    let res = s.get("/api/v1/test/ip").await;
    assert_eq!(res.text().await.unwrap(), "127.0.0.1");
}
both_backends!(forwarded_for_is_used_from_trusted_proxies);

async fn cors_allows_only_listed_origins(backend: Backend) {
    let s = server(
        backend,
        vec![("server.cors_origins", "https://ehr.example.org".into())],
    )
    .await;
    let ok = s
        .client
        .get(s.url("/health"))
        .header("origin", "https://ehr.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://ehr.example.org"
    );
    let other = s
        .client
        .get(s.url("/health"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    // No CORS configured: no CORS headers at all.
    let plain = server(backend, vec![]).await;
    let res = plain
        .client
        .get(plain.url("/health"))
        .header("origin", "https://ehr.example.org")
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}
both_backends!(cors_allows_only_listed_origins);

async fn graceful_shutdown_finishes_in_flight_requests(backend: Backend) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started = std::sync::Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let extra = Router::new().route(
        "/api/v1/test/in-flight",
        get(move || {
            let started = started.clone();
            async move {
                if let Some(tx) = started.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                "finished"
            }
        }),
    );
    let mut s = TestServer::start_with(
        backend,
        Options {
            extra: Some(extra),
            ..Options::default()
        },
    )
    .await;
    let client = s.client.clone();
    let url = s.url("/api/v1/test/in-flight");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    started_rx.await.unwrap();
    s.begin_stop();
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "finished");
    s.stop().await;
    // After shutdown nothing answers.
    let fresh = reqwest::Client::new();
    assert!(fresh.get(s.url("/health")).send().await.is_err());
}
both_backends!(graceful_shutdown_finishes_in_flight_requests);
