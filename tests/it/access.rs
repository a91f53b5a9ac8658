//! Deny by default, checked against every route of the OpenAPI document (not a hand
//! list): without a token every protected `/api/v1` route is 401; with a valid token
//! whose role lacks the permission the document names, 403.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestServer, json};

const PW: &str = "Correct-Horse-9!";
/// Routes the contract makes public (credentials in the body).
const PUBLIC: [&str; 9] = [
    "/api/v1/auth/login",
    "/api/v1/auth/passkey/challenge",
    "/api/v1/auth/passkey/login",
    "/api/v1/auth/password",
    "/api/v1/auth/password-reset",
    "/api/v1/auth/password-reset/confirm",
    "/api/v1/auth/email/verify",
    "/api/v1/auth/register",
    "/api/v1/invitations/accept",
];

pub(crate) fn operations(doc: &Value) -> Vec<(Method, String, Vec<String>)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let scopes: Vec<String> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|req| req.get("bearer"))
                .flat_map(|s| s.as_array().cloned().unwrap_or_default())
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
            let concrete = path.replace("{id}", "00000000-0000-0000-0000-000000000000");
            ops.push((
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                concrete,
                scopes,
            ));
        }
    }
    ops
}

async fn every_route_denies_by_default(backend: Backend) {
    let s = TestServer::start(backend).await;
    let doc = json(s.get("/api/openapi.json").await).await;
    let ops = operations(&doc);
    assert!(ops.len() >= 20, "the document lists the API: {}", ops.len());

    // A role with no permission at all.
    sqlx::query("INSERT INTO roles (name, builtin, created_at) VALUES ('nothing', 0, '')")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    s.user("nobody", "nothing", PW).await;
    let token = s.login("nobody", PW).await;

    for (method, path, scopes) in &ops {
        let public = PUBLIC.contains(&path.as_str());
        let body = Some(json!({}));
        let res = s
            .client
            .request(method.clone(), s.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        if public {
            assert_ne!(res.status(), 401, "{method} {path} is public");
        } else {
            assert_eq!(res.status(), 401, "{method} {path} without a token");
            assert_eq!(res.headers()["www-authenticate"], "Bearer");
        }
        if !scopes.is_empty() {
            let res = s.send_as(method.clone(), path, &token, body).await;
            assert_eq!(res.status(), 403, "{method} {path} needs {scopes:?}");
            assert_eq!(json(res).await["code"], "forbidden");
        }
    }
    // Every permission-guarded route names its permission in the document.
    let guarded: usize = ops.iter().filter(|(_, _, s)| !s.is_empty()).count();
    assert!(guarded >= 12, "{guarded}");
}
both_backends!(every_route_denies_by_default);

async fn the_audit_log_reads_are_filtered_paged_and_audited(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("aud", "auditor", PW).await;
    s.user("nurse1", "nurse", PW).await;
    let t = s.login("aud", PW).await;
    let n = s.login("nurse1", PW).await;
    assert_eq!(s.get_as("/api/v1/audit/events", &n).await.status(), 403);
    for i in 0..5 {
        s.client
            .get(s.url(&format!("/api/v1/x/{i}")))
            .header("x-request-id", format!("pg-{i}"))
            .send()
            .await
            .unwrap();
    }
    let page = json(s.get_as("/api/v1/audit/events?limit=3", &t).await).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    // Newest first.
    assert!(items[0]["seq"].as_i64() > items[1]["seq"].as_i64());
    let cursor = page["next_cursor"].as_str().unwrap();
    let next = json(
        s.get_as(&format!("/api/v1/audit/events?limit=3&cursor={cursor}"), &t)
            .await,
    )
    .await;
    assert!(next["items"][0]["seq"].as_i64() < items[2]["seq"].as_i64());
    // Filters.
    let logins = json(s.get_as("/api/v1/audit/events?action=login", &t).await).await;
    assert_eq!(logins["items"].as_array().unwrap().len(), 2);
    let mine = json(
        s.get_as("/api/v1/audit/events?actor=aud&action=login", &t)
            .await,
    )
    .await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    let future = json(
        s.get_as("/api/v1/audit/events?since=2999-01-01T00:00:00Z", &t)
            .await,
    )
    .await;
    assert!(future["items"].as_array().unwrap().is_empty());
    // Bad filters.
    for q in [
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "limit=0",
        "limit=501",
        "limit=abc",
        "action=hack",
        "cursor=zzz",
        "colour=red",
        "since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
    ] {
        let res = s.get_as(&format!("/api/v1/audit/events?{q}"), &t).await;
        assert_eq!(res.status(), 422, "{q}");
        assert_eq!(json(res).await["code"], "validation_error");
    }
    // Verify over HTTP.
    let v = json(s.get_as("/api/v1/audit/verify", &t).await).await;
    assert_eq!(v["ok"], true);
    assert!(v["events"].as_i64().unwrap() > 5);
    assert_eq!(v["head"].as_str().unwrap().len(), 64);
    // Reading the audit log is itself audited.
    let reads = json(
        s.get_as("/api/v1/audit/events?actor=aud&limit=500", &t)
            .await,
    )
    .await;
    let kinds: Vec<(&str, &str)> = reads["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["resource_type"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(kinds.contains(&("read", "audit_log")), "{kinds:?}");
    assert!(kinds.contains(&("audit_verify", "audit_log")), "{kinds:?}");
}
both_backends!(the_audit_log_reads_are_filtered_paged_and_audited);

async fn roles_are_managed_with_guards(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("boss", "admin", PW).await;
    let t = s.login("boss", PW).await;
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/roles",
            &t,
            Some(json!({"name": "night", "permissions": ["patients:read", "root", "sudo"]})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let b = json(res).await;
    let messages: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        ["unknown permission `root`", "unknown permission `sudo`"]
    );
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/roles",
            &t,
            Some(json!({"name": "<b>x</b>", "permissions": []})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/roles",
            &t,
            Some(json!({"name": "night", "permissions": ["audit:read"]})),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        json(res).await,
        json!({"name": "night", "permissions": ["audit:read"], "builtin": false})
    );
    assert_eq!(
        s.send_as(
            Method::POST,
            "/api/v1/roles",
            &t,
            Some(json!({"name": "night", "permissions": []}))
        )
        .await
        .status(),
        409
    );

    // A permission taken from a role is gone on its users' next request.
    s.user("owl", "night", PW).await;
    let owl = s.login("owl", PW).await;
    assert_eq!(s.get_as("/api/v1/audit/events", &owl).await.status(), 200);
    let res = s
        .send_as(
            Method::PUT,
            "/api/v1/roles/night",
            &t,
            Some(json!({"permissions": ["patients:read"]})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.get_as("/api/v1/audit/events", &owl).await.status(), 403);

    // Guards. Nobody edits their own role, an admin neither.
    let res = s
        .send_as(
            Method::PUT,
            "/api/v1/roles/admin",
            &t,
            Some(json!({"permissions": ["audit:read"]})),
        )
        .await;
    assert_eq!(res.status(), 403);
    assert_eq!(json(res).await["code"], "forbidden");
    // Someone holding everything through another role still cannot strip the admin
    // role of what keeps the product manageable.
    let all = json(s.get_as("/api/v1/permissions", &t).await).await["items"].clone();
    let res = s
        .post(
            "/api/v1/roles",
            Some(&t),
            json!({"name": "super", "permissions": all}),
        )
        .await;
    assert_eq!(res.status(), 201);
    s.user("sup", "super", PW).await;
    let sup = s.login("sup", PW).await;
    let res = s
        .send_as(
            Method::PUT,
            "/api/v1/roles/admin",
            &sup,
            Some(json!({"permissions": ["audit:read"]})),
        )
        .await;
    assert_eq!(res.status(), 409);
    assert_eq!(
        s.send_as(Method::DELETE, "/api/v1/roles/night", &t, None)
            .await
            .status(),
        409,
        "held by owl"
    );
    assert_eq!(
        s.send_as(Method::DELETE, "/api/v1/roles/doctor", &t, None)
            .await
            .status(),
        409,
        "built in"
    );
    assert_eq!(
        s.send_as(Method::DELETE, "/api/v1/roles/nope", &t, None)
            .await
            .status(),
        404
    );
    let list = json(s.get_as("/api/v1/roles", &t).await).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "admin",
            "auditor",
            "doctor",
            "night",
            "nurse",
            "patient",
            "registered",
            "super"
        ]
    );
    let perms = json(s.get_as("/api/v1/permissions", &t).await).await;
    assert_eq!(perms["items"].as_array().unwrap().len(), 10);
    // Every change is in the audit trail, with who did it.
    let events = custodian::audit::store::query(s.state.db(), &Default::default(), 1000, true)
        .await
        .unwrap();
    let role_changes = events
        .iter()
        .filter(|e| {
            e.resource_type.as_deref() == Some("role") && e.actor.as_deref() == Some("boss")
        })
        .count();
    assert!(role_changes >= 8, "{role_changes}");
}
both_backends!(roles_are_managed_with_guards);
