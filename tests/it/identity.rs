//! Identity: sign-in, lockout, login history, TOTP, sessions, passwords, API tokens.

use std::sync::Arc;
use std::time::Duration;

use custodian::identity::totp;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, Options, TestDb, TestServer, json, postgres_url};

const PW: &str = "Correct-Horse-9!";
const PW2: &str = "Battery-Staple-7?";

async fn server(backend: Backend, sets: Vec<(&'static str, String)>) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            sets,
            ..Options::default()
        },
    )
    .await
}

async fn try_login(
    s: &TestServer,
    username: &str,
    password: &str,
    code: Option<&str>,
) -> reqwest::Response {
    let mut body = json!({"username": username, "password": password});
    if let Some(c) = code {
        body["totp_code"] = json!(c);
    }
    s.post("/api/v1/auth/login", None, body).await
}

async fn code_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    (status, json(res).await)
}

async fn sign_in_and_out(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("dr_who", "doctor", PW).await;
    let res = try_login(&s, "  DR_WHO ", PW, None).await;
    assert_eq!(res.status(), 200);
    let body = json(res).await;
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("cst_") && token.len() >= 47);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["role"], "doctor");
    // Dev's idle timeout: an hour, to explore the API (staging and prod: 5 minutes).
    assert_eq!(body["expires_in"], 3600);

    let me = json(s.get_as("/api/v1/auth/me", &token).await).await;
    assert_eq!(me["username"], "dr_who");
    assert_eq!(me["role"], "doctor");
    let perms: Vec<&str> = me["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(perms.contains(&"phi:ssn") && !perms.contains(&"users:manage"));

    // The token is stored hashed: its text is nowhere in the database.
    let row: (String,) = sqlx::query_as("SELECT token_hash FROM sessions")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_ne!(row.0, token);

    assert_eq!(
        s.send_as(Method::POST, "/api/v1/auth/logout", &token, None)
            .await
            .status(),
        204
    );
    let res = s.get_as("/api/v1/auth/me", &token).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(json(res).await["code"], "unauthorized");

    // Tampered, foreign and missing tokens.
    let mut tampered = s.login("dr_who", PW).await;
    tampered.pop();
    tampered.push('x');
    for bad in [tampered.as_str(), "cst_nope", "Bearer", "cat_", ""] {
        assert_eq!(
            s.get_as("/api/v1/auth/me", bad).await.status(),
            401,
            "{bad}"
        );
    }
    assert_eq!(s.get("/api/v1/auth/me").await.status(), 401);
}
both_backends!(sign_in_and_out);

async fn wrong_password_and_unknown_user_answer_alike(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("alice", "nurse", PW).await;
    let (sa, mut a) = code_of(try_login(&s, "alice", "Wrong-Password-1!", None).await).await;
    let (sb, mut b) = code_of(try_login(&s, "nobody", "Wrong-Password-1!", None).await).await;
    assert_eq!((sa, sb), (401, 401));
    a.as_object_mut().unwrap().remove("request_id");
    b.as_object_mut().unwrap().remove("request_id");
    assert_eq!(a, b);
    assert_eq!(a["code"], "invalid_credentials");
}
both_backends!(wrong_password_and_unknown_user_answer_alike);

async fn lockout_at_exactly_n_failures_then_release(backend: Backend) {
    let s = server(
        backend,
        vec![
            ("lockout.max_failures", "3".into()),
            ("lockout.duration", "15m".into()),
        ],
    )
    .await;
    let id = s.user("bob", "nurse", PW).await;
    for i in 1..=3 {
        let (st, body) = code_of(try_login(&s, "bob", "Wrong-Password-1!", None).await).await;
        assert_eq!(
            (st, body["code"].as_str()),
            (401, Some("invalid_credentials")),
            "attempt {i}"
        );
    }
    // Locked: even the right password answers 423 with Retry-After.
    let res = try_login(&s, "bob", PW, None).await;
    assert_eq!(res.status(), 423);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 800 && retry <= 900, "{retry}");
    assert_eq!(json(res).await["code"], "account_locked");
    // The lock ends after the duration, and a success starts the count again.
    s.clock.advance(Duration::from_secs(15 * 60 + 1));
    assert_eq!(try_login(&s, "bob", PW, None).await.status(), 200);
    for _ in 0..2 {
        assert_eq!(
            try_login(&s, "bob", "Wrong-Password-1!", None)
                .await
                .status(),
            401
        );
    }
    assert_eq!(try_login(&s, "bob", PW, None).await.status(), 200);

    // Every attempt is in the login history, with its reason, newest first.
    let admin = s.user("root_admin", "admin", PW).await;
    let _ = admin;
    let t = s.login("root_admin", PW).await;
    let logins = json(s.get_as(&format!("/api/v1/users/{id}/logins"), &t).await).await;
    let reasons: Vec<&str> = logins["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "success",
            "bad_password",
            "bad_password",
            "success",
            "locked",
            "bad_password",
            "bad_password",
            "bad_password"
        ]
    );
    assert_eq!(logins["items"][0]["ip"], "127.0.0.1");
}
both_backends!(lockout_at_exactly_n_failures_then_release);

async fn unknown_usernames_lock_too_and_admins_unlock(backend: Backend) {
    let s = server(backend, vec![("lockout.max_failures", "2".into())]).await;
    for _ in 0..2 {
        assert_eq!(
            try_login(&s, "ghost", "Wrong-Password-1!", None)
                .await
                .status(),
            401
        );
    }
    assert_eq!(
        try_login(&s, "ghost", "Wrong-Password-1!", None)
            .await
            .status(),
        423
    );

    let carol = s.user("carol", "nurse", PW).await;
    for _ in 0..2 {
        try_login(&s, "carol", "Wrong-Password-1!", None).await;
    }
    assert_eq!(try_login(&s, "carol", PW, None).await.status(), 423);
    s.user("boss", "admin", PW).await;
    let t = s.login("boss", PW).await;
    let user = json(s.get_as(&format!("/api/v1/users/{carol}"), &t).await).await;
    assert!(user["locked_until"].is_string());
    assert_eq!(
        s.send_as(
            Method::POST,
            &format!("/api/v1/users/{carol}/unlock"),
            &t,
            None
        )
        .await
        .status(),
        204
    );
    assert_eq!(try_login(&s, "carol", PW, None).await.status(), 200);
}
both_backends!(unknown_usernames_lock_too_and_admins_unlock);

async fn password_spraying_is_blocked_per_address(backend: Backend) {
    let s = server(
        backend,
        vec![
            ("lockout.ip_max_failures", "4".into()),
            ("lockout.max_failures", "10".into()),
        ],
    )
    .await;
    s.user("dave", "nurse", PW).await;
    for i in 0..4 {
        assert_eq!(
            try_login(&s, &format!("user{i}"), "Wrong-Password-1!", None)
                .await
                .status(),
            401
        );
    }
    let res = try_login(&s, "dave", PW, None).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(json(res).await["code"], "rate_limited");
}
both_backends!(password_spraying_is_blocked_per_address);

pub(crate) fn current_code(s: &TestServer, secret_b32: &str, offset_steps: i64) -> String {
    let secret = totp::TotpSecret::from_base32(secret_b32).unwrap();
    let now = s.clock.now_unix();
    totp::code_at(&secret, totp::step_at(now + offset_steps * 30))
}

pub(crate) async fn enrol(s: &TestServer, token: &str) -> (String, Vec<String>) {
    let res = s
        .send_as(Method::POST, "/api/v1/auth/totp/enroll", token, None)
        .await;
    assert_eq!(res.status(), 200);
    let e = json(res).await;
    let secret = e["secret"].as_str().unwrap().to_owned();
    assert!(
        e["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/Custodian:")
    );
    assert!(e["qr_svg"].as_str().unwrap().contains("<svg"));
    let code = current_code(s, &secret, 0);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/totp/confirm",
            token,
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let codes: Vec<String> = json(res).await["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(codes.len(), 10);
    (secret, codes)
}

async fn totp_second_factor(backend: Backend) {
    let s = server(backend, vec![("lockout.max_failures", "10".into())]).await;
    s.user("erin", "doctor", PW).await;
    let t = s.login("erin", PW).await;
    let (secret, recovery) = enrol(&s, &t).await;
    // The secret is stored sealed, not as text.
    let stored: (Option<String>,) =
        sqlx::query_as("SELECT totp_secret FROM users WHERE username = 'erin'")
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert!(!stored.0.unwrap().contains(&secret));

    s.clock.advance(Duration::from_secs(30));
    let (st, b) = code_of(try_login(&s, "erin", PW, None).await).await;
    assert_eq!((st, b["code"].as_str()), (401, Some("mfa_required")));
    let (st, b) = code_of(try_login(&s, "erin", PW, Some("000000")).await).await;
    assert_eq!((st, b["code"].as_str()), (401, Some("invalid_totp")));
    let code = current_code(&s, &secret, 0);
    assert_eq!(try_login(&s, "erin", PW, Some(&code)).await.status(), 200);
    // Replay of the same code: refused.
    let (st, b) = code_of(try_login(&s, "erin", PW, Some(&code)).await).await;
    assert_eq!((st, b["code"].as_str()), (401, Some("invalid_totp")));
    // A code two steps old: refused; the previous step's code is still accepted once.
    s.clock.advance(Duration::from_secs(30));
    assert_eq!(
        try_login(&s, "erin", PW, Some(&current_code(&s, &secret, -2)))
            .await
            .status(),
        401
    );
    assert_eq!(
        try_login(&s, "erin", PW, Some(&current_code(&s, &secret, 0)))
            .await
            .status(),
        200
    );
    // Recovery codes: once each.
    assert_eq!(
        try_login(&s, "erin", PW, Some(&recovery[3])).await.status(),
        200
    );
    assert_eq!(
        try_login(&s, "erin", PW, Some(&recovery[3])).await.status(),
        401
    );
    assert_eq!(
        try_login(
            &s,
            "erin",
            PW,
            Some(&recovery[4].to_lowercase().replace('-', " "))
        )
        .await
        .status(),
        200
    );
    // A wrong code counts as a failed attempt in the history.
    let failures: (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM login_attempts WHERE reason = 'bad_totp'")
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert_eq!(failures.0, 4);
}
both_backends!(totp_second_factor);

async fn mfa_required_forces_enrolment_first(backend: Backend) {
    let s = server(backend, vec![("mfa.required", "true".into())]).await;
    s.user("frank", "auditor", PW).await;
    let t = s.login("frank", PW).await;
    let res = s.get_as("/api/v1/audit/events", &t).await;
    assert_eq!(res.status(), 403);
    assert_eq!(json(res).await["code"], "mfa_enrollment_required");
    let res = s.get_as("/api/v1/tokens", &t).await;
    assert_eq!(json(res).await["code"], "mfa_enrollment_required");
    let me = json(s.get_as("/api/v1/auth/me", &t).await).await;
    assert_eq!(me["mfa_enrollment_required"], true);
    enrol(&s, &t).await;
    // The same session now has the user's permissions.
    assert_eq!(s.get_as("/api/v1/audit/events", &t).await.status(), 200);
    // And TOTP cannot be turned off while required.
    let res = s
        .send_as(
            Method::DELETE,
            "/api/v1/auth/totp",
            &t,
            Some(json!({"password": PW, "code": "123456"})),
        )
        .await;
    assert_eq!(res.status(), 409);
}
both_backends!(mfa_required_forces_enrolment_first);

async fn expired_passwords_must_be_changed_first(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("gina", "nurse", PW).await;
    s.clock.advance(Duration::from_secs(91 * 86_400));
    let (st, b) = code_of(try_login(&s, "gina", PW, None).await).await;
    assert_eq!((st, b["code"].as_str()), (403, Some("password_expired")));
    assert!(b.get("access_token").is_none());
    // The old password may not come back.
    let res = s
        .post(
            "/api/v1/auth/password",
            None,
            json!({"username": "gina", "current_password": PW, "new_password": PW}),
        )
        .await;
    assert_eq!(res.status(), 422);
    let b = json(res).await;
    assert_eq!(b["code"], "password_policy");
    assert!(
        b["violations"]
            .as_array()
            .unwrap()
            .contains(&json!("reused"))
    );
    // A wrong current password is a failed sign-in.
    let res = s
        .post(
            "/api/v1/auth/password",
            None,
            json!({"username": "gina", "current_password": "Nope-Nope-1!", "new_password": PW2}),
        )
        .await;
    assert_eq!(res.status(), 401);
    let res = s
        .post(
            "/api/v1/auth/password",
            None,
            json!({"username": "gina", "current_password": PW, "new_password": PW2}),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(try_login(&s, "gina", PW2, None).await.status(), 200);
    assert_eq!(try_login(&s, "gina", PW, None).await.status(), 401);
}
both_backends!(expired_passwords_must_be_changed_first);

async fn idle_and_absolute_timeouts(backend: Backend) {
    let s = server(
        backend,
        vec![
            ("session.idle_timeout", "10s".into()),
            ("session.absolute_timeout", "1m".into()),
        ],
    )
    .await;
    s.user("hank", "nurse", PW).await;
    let t = s.login("hank", PW).await;
    s.clock.advance(Duration::from_secs(8));
    assert_eq!(s.get_as("/api/v1/auth/me", &t).await.status(), 200);
    s.clock.advance(Duration::from_secs(8));
    assert_eq!(
        s.get_as("/api/v1/auth/me", &t).await.status(),
        200,
        "activity kept it alive"
    );
    s.clock.advance(Duration::from_secs(11));
    let res = s.get_as("/api/v1/auth/me", &t).await;
    assert_eq!(res.status(), 401, "idle too long");
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let b = json(res).await;
    assert_eq!(b["code"], "unauthorized", "the contract's code stays");
    let detail = b["detail"].as_str().unwrap();
    assert!(
        detail.contains("session expired")
            && detail.contains("idle")
            && detail.contains("Sign in again"),
        "{detail}"
    );

    // Absolute: continuous use still ends at one minute.
    let t = s.login("hank", PW).await;
    for _ in 0..7 {
        s.clock.advance(Duration::from_secs(8));
        assert_eq!(s.get_as("/api/v1/auth/me", &t).await.status(), 200);
    }
    s.clock.advance(Duration::from_secs(8));
    let res = s.get_as("/api/v1/auth/me", &t).await;
    assert_eq!(res.status(), 401, "past the absolute lifetime");
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let b = json(res).await;
    assert_eq!(b["code"], "unauthorized");
    let detail = b["detail"].as_str().unwrap();
    assert!(
        detail.contains("session expired") && detail.contains("absolute_timeout"),
        "{detail}"
    );
    assert!(!detail.contains("idle"), "{detail}");

    // Revoked, unknown or malformed: the plain answer, nothing about expiry.
    let t = s.login("hank", PW).await;
    assert_eq!(
        s.send_as(Method::POST, "/api/v1/auth/logout", &t, None)
            .await
            .status(),
        204
    );
    for token in [t.as_str(), "cst_unknown", "garbage"] {
        let b = json(s.get_as("/api/v1/auth/me", token).await).await;
        assert_eq!(b["code"], "unauthorized");
        assert!(
            !b["detail"].as_str().unwrap().contains("expired"),
            "{token}: {b}"
        );
    }
}
both_backends!(idle_and_absolute_timeouts);

async fn a_password_change_ends_the_other_sessions(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("ivy", "nurse", PW).await;
    let (a, b) = (s.login("ivy", PW).await, s.login("ivy", PW).await);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/password",
            &a,
            Some(json!({"current_password": PW, "new_password": PW2})),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(s.get_as("/api/v1/auth/me", &a).await.status(), 200);
    assert_eq!(s.get_as("/api/v1/auth/me", &b).await.status(), 401);
    // logout-all ends the rest.
    assert_eq!(
        s.send_as(Method::POST, "/api/v1/auth/logout-all", &a, None)
            .await
            .status(),
        204
    );
    assert_eq!(s.get_as("/api/v1/auth/me", &a).await.status(), 401);
}
both_backends!(a_password_change_ends_the_other_sessions);

/// Revocation on one instance holds on the other at once (PostgreSQL + Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_holds_across_instances() {
    if postgres_url().is_none() {
        return;
    }
    let db = Arc::new(TestDb::new(Backend::Postgres).await);
    let a = TestServer::start_on(db.clone(), Options::default()).await;
    let b = TestServer::start_on(db.clone(), Options::default()).await;
    a.user("june", "nurse", PW).await;
    let on_b = b.login("june", PW).await;
    let on_a = a.login("june", PW).await;
    assert_eq!(b.get_as("/api/v1/auth/me", &on_b).await.status(), 200);
    let res = a
        .send_as(
            Method::POST,
            "/api/v1/auth/password",
            &on_a,
            Some(json!({"current_password": PW, "new_password": PW2})),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(b.get_as("/api/v1/auth/me", &on_b).await.status(), 401);
    // A logout on B is refused on A.
    let t = b.login("june", PW2).await;
    assert_eq!(a.get_as("/api/v1/auth/me", &t).await.status(), 200);
    assert_eq!(
        b.send_as(Method::POST, "/api/v1/auth/logout", &t, None)
            .await
            .status(),
        204
    );
    assert_eq!(a.get_as("/api/v1/auth/me", &t).await.status(), 401);
}

async fn the_policy_applies_on_every_path(backend: Backend) {
    let s = server(backend, vec![]).await;
    let kim = s.user("kim", "nurse", PW).await;
    s.user("lead", "admin", PW).await;
    let admin = s.login("lead", PW).await;
    // Admin reset.
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/users/{kim}/password"),
            &admin,
            Some(json!({"new_password": "short"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let v = json(res).await["violations"].clone();
    for rule in [
        "too_short",
        "missing_uppercase",
        "missing_digit",
        "missing_special",
    ] {
        assert!(v.as_array().unwrap().contains(&json!(rule)), "{rule}: {v}");
    }
    // Admin create: common password, and one containing the username.
    let res = s.send_as(Method::POST, "/api/v1/users", &admin, Some(json!({"username": "newbie", "email": "n@example.org", "password": "Password123!", "role": "nurse"}))).await;
    assert_eq!(json(res).await["violations"], json!(["common_password"]));
    let res = s.send_as(Method::POST, "/api/v1/users", &admin, Some(json!({"username": "newbie", "email": "n@example.org", "password": "Newbie-Rules-42!", "role": "nurse"}))).await;
    assert!(
        json(res).await["violations"]
            .as_array()
            .unwrap()
            .contains(&json!("contains_username"))
    );
    // Self-service change.
    let t = s.login("kim", PW).await;
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/password",
            &t,
            Some(json!({"current_password": PW, "new_password": "alllowercase"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    // A good reset works and ends the user's sessions.
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/users/{kim}/password"),
            &admin,
            Some(json!({"new_password": PW2})),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(s.get_as("/api/v1/auth/me", &t).await.status(), 401);
}
both_backends!(the_policy_applies_on_every_path);

async fn api_tokens_rotate_and_die_with_their_user(backend: Backend) {
    let s = server(backend, vec![("api_tokens.max_lifetime", "7d".into())]).await;
    let uid = s.user("leo", "doctor", PW).await;
    let t = s.login("leo", PW).await;
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/tokens",
            &t,
            Some(json!({"name": "ci", "expires_in": 999_999_999})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let created = json(res).await;
    let cat = created["token"].as_str().unwrap().to_owned();
    assert!(cat.starts_with("cat_"));
    // Capped at seven days.
    let exp = time::OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let lifetime = exp.unix_timestamp() - s.clock.now_unix();
    assert_eq!(lifetime, 7 * 86_400);
    assert_eq!(
        json(s.get_as("/api/v1/auth/me", &cat).await).await["username"],
        "leo"
    );
    // Listed without the secret.
    let list = s.get_as("/api/v1/tokens", &t).await.text().await.unwrap();
    assert!(!list.contains(&cat));
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["items"][0]["name"], "ci");
    assert_eq!(list["items"][0]["expires_soon"], false);
    assert!(list["items"][0]["last_used_at"].is_string());
    // Rotation: the old secret dies at once.
    let id = created["id"].as_str().unwrap();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/tokens/{id}/rotate"),
            &t,
            None,
        )
        .await;
    assert_eq!(res.status(), 201);
    let rotated = json(res).await;
    let cat2 = rotated["token"].as_str().unwrap().to_owned();
    assert_eq!(s.get_as("/api/v1/auth/me", &cat).await.status(), 401);
    assert_eq!(s.get_as("/api/v1/auth/me", &cat2).await.status(), 200);
    // Expiry warning within 24 hours.
    s.clock.advance(Duration::from_secs(6 * 86_400 + 3600));
    let t = s.login("leo", PW).await;
    let list = json(s.get_as("/api/v1/tokens", &t).await).await;
    assert_eq!(list["items"][0]["expires_soon"], true);
    // A deactivated user's token stops working.
    s.user("chief", "admin", PW).await;
    let admin = s.login("chief", PW).await;
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &admin,
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.get_as("/api/v1/auth/me", &cat2).await.status(), 401);
    // Revocation.
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &admin,
            Some(json!({"active": true})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let t = s.login("leo", PW).await;
    let c = json(
        s.send_as(
            Method::POST,
            "/api/v1/tokens",
            &t,
            Some(json!({"name": "x"})),
        )
        .await,
    )
    .await;
    let tid = c["id"].as_str().unwrap();
    assert_eq!(
        s.send_as(Method::DELETE, &format!("/api/v1/tokens/{tid}"), &t, None)
            .await
            .status(),
        204
    );
    assert_eq!(
        s.get_as("/api/v1/auth/me", c["token"].as_str().unwrap())
            .await
            .status(),
        401
    );
    assert_eq!(
        s.send_as(Method::DELETE, &format!("/api/v1/tokens/{tid}"), &t, None)
            .await
            .status(),
        404
    );
}
both_backends!(api_tokens_rotate_and_die_with_their_user);

async fn a_role_change_holds_on_the_next_request(backend: Backend) {
    let s = server(backend, vec![]).await;
    let uid = s.user("mia", "auditor", PW).await;
    s.user("top", "admin", PW).await;
    let admin = s.login("top", PW).await;
    let t = s.login("mia", PW).await;
    assert_eq!(s.get_as("/api/v1/audit/events", &t).await.status(), 200);
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &admin,
            Some(json!({"role": "nurse"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = s.get_as("/api/v1/audit/events", &t).await;
    assert_eq!(res.status(), 403);
    assert_eq!(json(res).await["code"], "forbidden");
}
both_backends!(a_role_change_holds_on_the_next_request);

async fn the_last_admin_stays(backend: Backend) {
    let s = server(backend, vec![]).await;
    let only = s.user("sole", "admin", PW).await;
    let t = s.login("sole", PW).await;
    for patch in [json!({"active": false}), json!({"role": "nurse"})] {
        let res = s
            .send_as(
                Method::PATCH,
                &format!("/api/v1/users/{only}"),
                &t,
                Some(patch),
            )
            .await;
        assert_eq!(res.status(), 409);
        assert_eq!(json(res).await["code"], "conflict");
    }
    let second = s.user("second", "admin", PW).await;
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{second}"),
            &t,
            Some(json!({"role": "doctor"})),
        )
        .await;
    assert_eq!(res.status(), 200);
}
both_backends!(the_last_admin_stays);

async fn bad_input_is_422_before_any_hashing(backend: Backend) {
    let s = server(backend, vec![]).await;
    for body in [
        json!({"username": "a".repeat(65), "password": "x"}),
        json!({"username": "a", "password": "x".repeat(1025)}),
        json!({"username": 5, "password": "x"}),
        json!({"username": "a"}),
        json!({"username": "a", "password": "b", "admin": true}),
    ] {
        let res = s.post("/api/v1/auth/login", None, body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(json(res).await["code"], "validation_error");
    }
    let before: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_attempts")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(before.0, 0, "refused input is not an attempt");
}
both_backends!(bad_input_is_422_before_any_hashing);

async fn secrets_never_reach_the_audit_trail(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("nia", "doctor", "Canary-Pass-777!").await;
    try_login(&s, "nia", "Canary-Wrong-888!", None).await;
    let t = s.login("nia", "Canary-Pass-777!").await;
    let created = json(
        s.send_as(
            Method::POST,
            "/api/v1/tokens",
            &t,
            Some(json!({"name": "n"})),
        )
        .await,
    )
    .await;
    let cat = created["token"].as_str().unwrap();
    let all = custodian::audit::store::query(s.state.db(), &Default::default(), 10_000, true)
        .await
        .unwrap();
    let text = serde_json::to_string(&all).unwrap();
    for canary in ["Canary-Pass", "Canary-Wrong", &t[4..], &cat[4..]] {
        assert!(!text.contains(canary), "{canary} reached the audit trail");
    }
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"login_failed")
            && actions.contains(&"login")
            && actions.contains(&"create")
    );
}
both_backends!(secrets_never_reach_the_audit_trail);

// ---- issue 22: the admin console ---------------------------------------------------------

async fn status_body(res: reqwest::Response) -> (u16, Value) {
    let st = res.status().as_u16();
    let text = res.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A password an administrator typed can be marked "must change at next sign-in": the
/// sign-in answers like an expired password, saying why, the expired-password change
/// clears it, and the API's default (false) keeps the contract (create, then sign in).
async fn an_administrators_password_must_be_changed_when_asked(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("root", "admin", PW).await;
    let root = s.login("root", PW).await;
    // The contract: created with a password, then signs in.
    let (st, plain) = status_body(
        s.post(
            "/api/v1/users",
            Some(&root),
            json!({"username": "plain", "password": PW, "role": "nurse"}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 201);
    assert_eq!(plain["must_change_password"], false);
    assert_eq!(try_login(&s, "plain", PW, None).await.status(), 200);

    let (st, u) = status_body(
        s.post(
            "/api/v1/users",
            Some(&root),
            json!({"username": "newbie", "password": PW, "role": "nurse", "must_change_password": true}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 201);
    assert_eq!(u["must_change_password"], true);
    let id = u["id"].as_str().unwrap().to_owned();
    let (st, b) = code_of(try_login(&s, "newbie", PW, None).await).await;
    assert_eq!((st, b["code"].as_str()), (403, Some("password_expired")));
    assert!(
        b["detail"].as_str().unwrap().contains("administrator"),
        "{b}"
    );
    assert!(b.get("access_token").is_none());
    // A wrong password still says only that (the flag reveals nothing to a guesser).
    let (st, b) = code_of(try_login(&s, "newbie", PW2, None).await).await;
    assert_eq!((st, b["code"].as_str()), (401, Some("invalid_credentials")));
    // The expired-password change (no token) clears it.
    let res = s
        .post(
            "/api/v1/auth/password",
            None,
            json!({"username": "newbie", "current_password": PW, "new_password": PW2}),
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(try_login(&s, "newbie", PW2, None).await.status(), 200);
    let view = json(s.get_as(&format!("/api/v1/users/{id}"), &root).await).await;
    assert_eq!(view["must_change_password"], false);

    // An administrator's reset: flagged on request only.
    let reset_path = format!("/api/v1/users/{id}/password");
    let reset = |flag: Option<bool>, pw: &'static str| {
        let mut body = json!({"new_password": pw});
        if let Some(f) = flag {
            body["must_change_password"] = json!(f);
        }
        s.post(&reset_path, Some(&root), body)
    };
    assert_eq!(reset(Some(true), "Quartz-Lantern-5#").await.status(), 204);
    let (st, b) = code_of(try_login(&s, "newbie", "Quartz-Lantern-5#", None).await).await;
    assert_eq!((st, b["code"].as_str()), (403, Some("password_expired")));
    assert_eq!(reset(None, "Velvet-Harbor-3%").await.status(), 204);
    assert_eq!(
        try_login(&s, "newbie", "Velvet-Harbor-3%", None)
            .await
            .status(),
        200
    );
    // Audited with the flag, never the password.
    let events = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("update".into()),
            ..Default::default()
        },
        100,
        true,
    )
    .await
    .unwrap();
    let resets: Vec<_> = events
        .iter()
        .filter(|e| e.context.contains("password_reset"))
        .collect();
    assert_eq!(resets.len(), 2);
    assert!(resets[0].context.contains("\"must_change_password\":true"));
    assert!(resets[1].context.contains("\"must_change_password\":false"));
    assert!(events.iter().all(|e| !e.context.contains("Quartz")));
}
both_backends!(an_administrators_password_must_be_changed_when_asked);

/// An administrator resets a lost authenticator: the secret and recovery codes go, the
/// user's sessions end, they sign in with the password alone (and with `mfa.required`
/// can do nothing but enrol); never one's own, and 409 when there is nothing to reset.
async fn an_administrator_resets_a_lost_second_factor(backend: Backend) {
    let s = server(backend, vec![("mfa.required", "true".into())]).await;
    let root_id = s.user("root", "admin", PW).await;
    let ada = s.user("ada", "doctor", PW).await;
    // Both enrol (mfa.required), then sign in with a code.
    let root_first = s.login("root", PW).await;
    let (root_secret, _) = enrol(&s, &root_first).await;
    let ada_first = s.login("ada", PW).await;
    let (ada_secret, ada_codes) = enrol(&s, &ada_first).await;
    s.clock.advance(Duration::from_secs(30));
    let code = current_code(&s, &root_secret, 0);
    let root = json(try_login(&s, "root", PW, Some(&code)).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = current_code(&s, &ada_secret, 0);
    let ada_session = json(try_login(&s, "ada", PW, Some(&code)).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, b) = code_of(
        s.post(
            "/api/v1/tokens",
            Some(&ada_session),
            json!({"name": "script"}),
        )
        .await,
    )
    .await;
    let ada_token = b["token"].as_str().unwrap().to_owned();

    // Never one's own: that is DELETE /api/v1/auth/totp, with the password and a code.
    let (st, b) = code_of(
        s.post(
            &format!("/api/v1/users/{root_id}/totp/reset"),
            Some(&root),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!((st, b["code"].as_str()), (403, Some("forbidden")));
    assert!(
        s.state
            .identity()
            .user(&root_id)
            .await
            .unwrap()
            .totp_enabled
    );

    let (st, b) = code_of(
        s.send_as(
            Method::POST,
            &format!("/api/v1/users/{ada}/totp/reset"),
            &root,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["notified"], false, "no verified address: no mail");
    let user = s.state.identity().user(&ada).await.unwrap();
    assert!(!user.totp_enabled && user.totp_secret.is_none());
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1")
        .bind(&ada)
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(n, 0, "the recovery codes are gone");
    // Her sessions ended; her API token lives, but is refused until she enrols again.
    assert_eq!(
        s.get_as("/api/v1/auth/me", &ada_session).await.status(),
        401
    );
    let (st, b) = code_of(s.get_as("/api/v1/patients", &ada_token).await).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (403, Some("mfa_enrollment_required"))
    );
    // The old recovery code opens nothing; the password alone signs in, confined to
    // enrolment.
    let (st, _) = code_of(try_login(&s, "ada", PW, Some(&ada_codes[0])).await).await;
    assert_eq!(st, 200, "a code given with no TOTP on is not asked for");
    let fresh = s.login("ada", PW).await;
    let (st, b) = code_of(s.get_as("/api/v1/patients", &fresh).await).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (403, Some("mfa_enrollment_required"))
    );
    let (secret, _) = enrol(&s, &fresh).await;
    assert_eq!(s.get_as("/api/v1/patients", &fresh).await.status(), 200);
    assert_ne!(secret, ada_secret);
    assert_eq!(s.get_as("/api/v1/patients", &ada_token).await.status(), 200);
    // Nothing to reset for a user without a second factor... after a reset, twice:
    s.post(
        &format!("/api/v1/users/{ada}/totp/reset"),
        Some(&root),
        json!({}),
    )
    .await;
    let (st, b) = code_of(
        s.post(
            &format!("/api/v1/users/{ada}/totp/reset"),
            Some(&root),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!((st, b["code"].as_str()), (409, Some("conflict")));
    let (st, _) = code_of(
        s.post(
            "/api/v1/users/00000000-0000-0000-0000-000000000000/totp/reset",
            Some(&root),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 404);
    // Audited as an update of the user, saying what changed.
    let events = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("update".into()),
            ..Default::default()
        },
        200,
        true,
    )
    .await
    .unwrap();
    let resets: Vec<_> = events
        .iter()
        .filter(|e| e.context.contains("totp_reset") && e.status == Some(200))
        .collect();
    assert_eq!(resets.len(), 2);
    assert!(
        resets
            .iter()
            .all(|e| e.resource_id.as_deref() == Some(ada.as_str())
                && e.actor.as_deref() == Some("root"))
    );
}
both_backends!(an_administrator_resets_a_lost_second_factor);

/// Every user's API tokens and sessions, for an administrator: listed without secrets,
/// revoked one by one or all at once.
async fn administrators_see_and_end_other_users_credentials(backend: Backend) {
    let s = server(backend, vec![]).await;
    s.user("root", "admin", PW).await;
    let nina = s.user("nina", "nurse", PW).await;
    let other = s.user("otto", "nurse", PW).await;
    let root = s.login("root", PW).await;
    let nina_session = s.login("nina", PW).await;
    let mut secrets = Vec::new();
    for name in ["export", "backup"] {
        let (st, b) = code_of(
            s.post("/api/v1/tokens", Some(&nina_session), json!({"name": name}))
                .await,
        )
        .await;
        assert_eq!(st, 201);
        secrets.push((
            b["id"].as_str().unwrap().to_owned(),
            b["token"].as_str().unwrap().to_owned(),
        ));
    }
    let otto_session = s.login("otto", PW).await;
    let (_, b) = code_of(
        s.post(
            "/api/v1/tokens",
            Some(&otto_session),
            json!({"name": "otto's"}),
        )
        .await,
    )
    .await;
    let otto_token = (
        b["id"].as_str().unwrap().to_owned(),
        b["token"].as_str().unwrap().to_owned(),
    );

    let (st, list) = code_of(
        s.get_as(&format!("/api/v1/users/{nina}/tokens"), &root)
            .await,
    )
    .await;
    assert_eq!(st, 200);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|t| t["user_id"] == nina.as_str()));
    let text = list.to_string();
    for (_, secret) in &secrets {
        assert!(!text.contains(secret.as_str()), "no secret is listed");
    }
    assert!(items.iter().all(|t| t.get("token").is_none()));
    assert_eq!(
        s.get_as(
            "/api/v1/users/00000000-0000-0000-0000-000000000000/tokens",
            &root
        )
        .await
        .status(),
        404
    );
    // Sessions carry the username.
    let sessions = json(
        s.get_as(&format!("/api/v1/sessions?user_id={nina}"), &root)
            .await,
    )
    .await;
    assert_eq!(sessions["items"][0]["username"], "nina");

    // Revoke one: it stops at once, the other goes on.
    let (export_id, export) = &secrets[0];
    let (backup_id, backup) = &secrets[1];
    let path = format!("/api/v1/users/{nina}/tokens/{export_id}");
    assert_eq!(
        s.send_as(Method::DELETE, &path, &root, None).await.status(),
        204
    );
    assert_eq!(s.get_as("/api/v1/auth/me", export).await.status(), 401);
    assert_eq!(s.get_as("/api/v1/auth/me", backup).await.status(), 200);
    assert_eq!(
        s.send_as(Method::DELETE, &path, &root, None).await.status(),
        404
    );
    // A token of another user, named under this one: not found, and it lives on.
    let (st, _) = code_of(
        s.send_as(
            Method::DELETE,
            &format!("/api/v1/users/{nina}/tokens/{}", otto_token.0),
            &root,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(
        s.get_as("/api/v1/auth/me", &otto_token.1).await.status(),
        200
    );
    let _ = other;

    // All of a user at once: sessions and tokens; the account stays active.
    assert_eq!(
        s.post(
            &format!("/api/v1/users/{nina}/logout"),
            Some(&root),
            json!({})
        )
        .await
        .status(),
        204
    );
    for t in [&nina_session, backup] {
        assert_eq!(s.get_as("/api/v1/auth/me", t).await.status(), 401);
    }
    let _ = backup_id;
    assert_eq!(try_login(&s, "nina", PW, None).await.status(), 200);
    assert_eq!(
        s.get_as("/api/v1/auth/me", &otto_session).await.status(),
        200
    );
    let ended = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("logout".into()),
            ..Default::default()
        },
        10,
        true,
    )
    .await
    .unwrap();
    assert!(
        ended
            .iter()
            .any(|e| e.resource_id.as_deref() == Some(nina.as_str())
                && e.actor.as_deref() == Some("root"))
    );
}
both_backends!(administrators_see_and_end_other_users_credentials);
