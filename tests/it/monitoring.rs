//! Metrics, security events and the log scrubber.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, Options, TestDb, TestServer, json};

const PW: &str = "Correct-Horse-9!";

async fn metrics_text(s: &TestServer, token: Option<&str>) -> (u16, String) {
    let mut r = s.client.get(s.url("/metrics"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let res = r.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_count_requests_audit_logins_and_limits(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![(
                "rate_limit.routes",
                "{\"GET /api/v1/sessions\": \"1/m\"}".into(),
            )],
            ..Options::default()
        },
    )
    .await;
    s.user("admin1", "admin", PW).await;
    let admin = s.login("admin1", PW).await;
    let r = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "admin1", "password": "Wrong-Horse-9!"}),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(s.get_as("/api/v1/auth/me", &admin).await.status(), 200);
    assert_eq!(s.get_as("/api/v1/sessions", &admin).await.status(), 200);
    assert_eq!(s.get_as("/api/v1/sessions", &admin).await.status(), 429);

    // From loopback (the default monitoring.metrics_allow) without credentials.
    let (status, text) = metrics_text(&s, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        value(
            &text,
            "custodian_http_requests_total{route=\"/api/v1/auth/me\",method=\"GET\",status=\"200\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("custodian_http_request_duration_seconds_bucket{route=\"/api/v1/auth/me\",method=\"GET\",le=\"+Inf\"} 1"));
    assert_eq!(value(&text, "custodian_login_failures_total"), Some(1.0));
    assert_eq!(
        value(&text, "custodian_rate_limit_rejections_total"),
        Some(1.0)
    );
    assert_eq!(value(&text, "custodian_key_version_current"), Some(1.0));
    assert!(value(&text, "custodian_audit_events_total").unwrap() >= 5.0);
    assert!(value(&text, "custodian_audit_queue_depth").is_some());
    assert!(value(&text, "custodian_audit_batch_size_largest").unwrap() >= 1.0);
    // Labels are patterns: no user, token or address appears.
    assert!(!text.contains("admin1") && !text.contains("127.0.0.1") && !text.contains("cst_"));
}
both_backends!(metrics_count_requests_audit_logins_and_limits);

async fn metrics_need_an_allowed_address_or_audit_read(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("monitoring.metrics_allow", "10.9.8.0/24".into())],
            ..Options::default()
        },
    )
    .await;
    s.user("aud", "auditor", PW).await;
    s.user("nur", "nurse", PW).await;
    let auditor = s.login("aud", PW).await;
    let nurse = s.login("nur", PW).await;
    assert_eq!(metrics_text(&s, None).await.0, 404);
    assert_eq!(metrics_text(&s, Some(&nurse)).await.0, 404);
    assert_eq!(metrics_text(&s, Some("cst_not-a-token")).await.0, 404);
    let (status, text) = metrics_text(&s, Some(&auditor)).await;
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE custodian_http_requests_total counter"));
}
both_backends!(metrics_need_an_allowed_address_or_audit_read);

/// Outside dev `/metrics` needs a credential even from loopback (behind a reverse proxy
/// on the same machine, loopback is every client): the scrape token Prometheus sends as
/// a bearer token, or a user with `audit:read`.
async fn metrics_need_a_credential_outside_dev(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let db = std::sync::Arc::new(TestDb::new(backend).await);
    let keyring = db.path().join("keyring");
    custodian::crypto::Keyring::create(&keyring, "2026-01-01T00:00:00Z").unwrap();
    let token = "scrape-token-0123456789abcdef0123456789";
    let token_file = db.path().join("metrics-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    for p in [&keyring, &token_file] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let s = TestServer::start_on(
        db,
        Options {
            env: Some("staging"),
            sets: vec![
                (
                    "monitoring.metrics_token_file",
                    token_file.display().to_string(),
                ),
                // Listing loopback does not open it outside dev (and is a start-up warning).
                ("monitoring.metrics_allow", "127.0.0.1, ::1".into()),
                ("mfa.required", "true".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    s.user("aud", "auditor", PW).await;
    s.user("nur", "nurse", PW).await;
    let auditor = s.login("aud", PW).await;
    let nurse = s.login("nur", PW).await;
    assert_eq!(metrics_text(&s, None).await.0, 404);
    assert_eq!(metrics_text(&s, Some(&nurse)).await.0, 404);
    assert_eq!(metrics_text(&s, Some("scrape-token-wrong")).await.0, 404);
    assert_eq!(
        metrics_text(&s, Some(&token[..token.len() - 1])).await.0,
        404
    );
    let (status, text) = metrics_text(&s, Some(token)).await;
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE custodian_http_requests_total counter"));
    // An auditor who has still to set up TOTP (mfa.required) holds nothing yet.
    assert_eq!(metrics_text(&s, Some(&auditor)).await.0, 404);
    crate::identity::enrol(&s, &auditor).await;
    assert_eq!(metrics_text(&s, Some(&auditor)).await.0, 200);
}
both_backends!(metrics_need_a_credential_outside_dev);

/// Security events are stored in the background: wait (bounded) until `n` of `rule`.
async fn wait_for(s: &TestServer, token: &str, rule: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let body = json(s.get_as("/api/v1/security/events", token).await).await;
        let items: Vec<Value> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["rule"] == rule)
            .cloned()
            .collect();
        if items.len() >= n {
            return items;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {n} security event(s) {rule}");
}

async fn rules_over_the_audit_stream_raise_security_events(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![
                ("security.failed_logins_per_account", "3".into()),
                ("security.distinct_patients_per_hour", "2".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let victim = s.user("victim", "nurse", PW).await;
    s.user("aud", "auditor", PW).await;
    s.user("doc", "doctor", PW).await;
    let auditor = s.login("aud", PW).await;
    let doctor = s.login("doc", PW).await;

    // Failed sign-ins: one event at the third, not one per attempt; a lockout at the fifth.
    for _ in 0..5 {
        let r = s
            .post(
                "/api/v1/auth/login",
                None,
                json!({"username": "victim", "password": "Wrong-Horse-9!"}),
            )
            .await;
        assert!(matches!(r.status().as_u16(), 401 | 423));
    }
    let failed = wait_for(&s, &auditor, "failed_logins_account", 1).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["subject"], victim.as_str());
    assert_eq!(failed[0]["severity"], "warning");
    let locked = wait_for(&s, &auditor, "account_locked", 1).await;
    assert_eq!(locked[0]["subject"], victim.as_str());

    // One user reading more distinct patients in an hour than allowed.
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = json!({"given_name": format!("Canary{i}"), "family_name": "Zyx", "birth_date": "1950-01-02", "sex": "female"});
        let r = s
            .send_as(Method::POST, "/api/v1/patients", &doctor, Some(body))
            .await;
        assert_eq!(r.status(), 201);
        ids.push(json(r).await["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let r = s.get_as(&format!("/api/v1/patients/{id}"), &doctor).await;
        assert_eq!(r.status(), 200);
    }
    let many = wait_for(&s, &auditor, "many_patients", 1).await;
    assert_eq!(many[0]["severity"], "high");
    // No PHI in any event.
    let all = json(s.get_as("/api/v1/security/events", &auditor).await).await;
    assert!(!all.to_string().contains("Canary"), "{all}");

    // A broken chain found by verification.
    sqlx::query("UPDATE audit_head SET hash = 'f00d' WHERE id = 1")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let r = s.get_as("/api/v1/audit/verify", &auditor).await;
    assert_eq!(json(r).await["ok"], false);
    let broken = wait_for(&s, &auditor, "audit_chain_broken", 1).await;
    assert_eq!(broken[0]["severity"], "critical");

    // Listed in the admin GUI too; reading the list needs audit:read.
    assert_eq!(
        s.get_as("/api/v1/security/events", &doctor).await.status(),
        403
    );
    let (status, text) = metrics_text(&s, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        value(
            &text,
            "custodian_security_events_total{rule=\"account_locked\"}"
        ),
        Some(1.0)
    );
}
both_backends!(rules_over_the_audit_stream_raise_security_events);

/// A fake Sentry: accepts envelopes on a local port and keeps their bytes.
async fn fake_sentry() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read the head, then Content-Length bytes of body.
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                store
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).to_string());
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    )
                    .await;
            });
        }
    });
    (port, got)
}

/// With a DSN, security events and their breadcrumbs reach Sentry, scrubbed: no
/// canary of the requests (an e-mail as username, an SSN-like password, a token) does.
#[tokio::test]
async fn error_reports_reach_sentry_without_phi_or_secrets() {
    let (port, got) = fake_sentry().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let dsn = format!("http://abc123publickey@127.0.0.1:{port}/42");
    let served = crate::cli::serve(
        dir.path(),
        &[
            ("CUSTODIAN_DATA_DIR", &data),
            ("CUSTODIAN_MONITORING__SENTRY_DSN", &dsn),
            ("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024"),
            ("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1"),
            ("CUSTODIAN_LOGGING__LEVEL", "info"),
        ],
    );
    let base = format!("http://{}", served.addr);
    let c = reqwest::Client::new();
    for _ in 0..3 {
        let r = c
            .post(format!("{base}/api/v1/auth/login?ssn=987-65-4321"))
            .header("authorization", "Bearer cat_canaryTOKENvalue")
            .header("cookie", "custodian_session=cst_canaryCOOKIE")
            .json(&json!({"username": "jane.canary@example.org", "password": "Pw-123-45-6789-x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // The report is sent in the background: wait (bounded) for it.
    let mut all = String::new();
    for _ in 0..200 {
        all = got.lock().unwrap().join("\n");
        if all.contains("failed_logins_account") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        all.contains("security event failed_logins_account"),
        "no report arrived: {all}"
    );
    assert!(all.contains("X-Sentry-Auth: Sentry sentry_key=abc123publickey"));
    for canary in [
        "jane.canary",
        "123-45-6789",
        "987-65-4321",
        "cat_canary",
        "cst_canary",
        "Pw-123",
    ] {
        assert!(!all.contains(canary), "{canary} reached Sentry: {all}");
    }
    drop(served);
}

/// A client that invents a method per request makes no new series and no new rate-limit
/// budget: every label of `/metrics` takes its values from a fixed set.
async fn invented_methods_make_no_new_series(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("rate_limit.default", "40/m".into())],
            ..Options::default()
        },
    )
    .await;
    let mut statuses = Vec::new();
    for i in 0..50 {
        let m = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        for path in ["/api/v1/patients", "/no/such/path"] {
            let r = s
                .client
                .request(m.clone(), s.url(path))
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
    }
    // One shared budget of 40 for all of them per route, not one budget per method.
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, text) = metrics_text(&s, None).await;
    assert_eq!(status, 200);
    assert!(!text.contains("INVENTED"), "{text}");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("custodian_http_requests_total{"))
        .collect();
    assert!(series.len() <= 6, "{series:#?}");
    assert!(
        series
            .iter()
            .any(|l| l.contains("route=\"(unmatched)\",method=\"_OTHER\"")),
        "{series:#?}"
    );
    let total: f64 = series
        .iter()
        .filter(|l| l.contains("method=\"_OTHER\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 100.0, "{series:#?}");
}
both_backends!(invented_methods_make_no_new_series);
