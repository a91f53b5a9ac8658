//! Account lifecycle by email, against an in-process SMTP server: invitations, email
//! verification, password reset, self-registration, and the outbox.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::identity::{current_code, enrol};
use crate::smtp_sink::Sink;
use crate::support::{Backend, Options, TestServer, json};

const PW: &str = "Correct-Horse-9!";
const PW2: &str = "Battery-Staple-7?";
const PW3: &str = "Quartz-Lantern-5#";

async fn server(backend: Backend, extra: Vec<(&'static str, String)>) -> (TestServer, Arc<Sink>) {
    let sink = Sink::start().await;
    let mut sets = vec![
        ("mail.smtp_host", "127.0.0.1".to_owned()),
        ("mail.smtp_port", sink.port.to_string()),
        ("mail.smtp_tls", "none".to_owned()),
        ("mail.base_url", "http://custodian.test".to_owned()),
        ("mail.poll_interval", "100ms".to_owned()),
        ("lockout.max_failures", "3".to_owned()),
    ];
    sets.extend(extra);
    let s = TestServer::start_with(
        backend,
        Options {
            sets,
            ..Options::default()
        },
    )
    .await;
    (s, sink)
}

async fn admin(s: &TestServer) -> String {
    s.user("root", "admin", PW).await;
    s.login("root", PW).await
}

async fn post(
    s: &TestServer,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> reqwest::Response {
    match token {
        Some(t) => s.send_as(Method::POST, path, t, Some(body)).await,
        None => s.post(path, None, body).await,
    }
}

/// Invites `email` as `role`, accepts with `username`; answers the user id.
async fn invited(s: &TestServer, sink: &Sink, admin: &str, email: &str, username: &str) -> String {
    let n = sink.count();
    let res = post(
        s,
        "/api/v1/invitations",
        Some(admin),
        json!({"email": email, "role": "nurse"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let mail = sink.wait_for(n).await;
    assert_eq!(mail.to, email);
    let res = post(
        s,
        "/api/v1/invitations/accept",
        None,
        json!({"token": mail.token(), "username": username, "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 201);
    json(res).await["id"].as_str().unwrap().to_owned()
}

both_backends!(an_invitation_becomes_an_account);
async fn an_invitation_becomes_an_account(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    let res = post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "Nina@Example.org", "role": "nurse"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let inv = json(res).await;
    assert_eq!(inv["email"], "nina@example.org");
    let mail = sink.wait_for(0).await;
    assert_eq!(mail.to, "nina@example.org");
    assert_eq!(mail.subject(), "Your invitation to Custodian");
    assert!(mail.link().starts_with("/accounts/invite/") && mail.token().len() == 64);
    // Listed while pending; the token itself is never listed.
    let list = json(s.get_as("/api/v1/invitations", &root).await).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&mail.token()));
    // The stored token is a hash.
    let stored: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM account_tokens")
        .fetch_all(s.state.db().reader())
        .await
        .unwrap();
    assert!(stored.iter().all(|(h,)| h != &mail.token()));
    // The link's page shows a form; opening it spends nothing.
    let page = s.get(&mail.link()).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("nina@example.org"));

    // The policy applies; a refused password leaves the link usable.
    let res = post(
        &s,
        "/api/v1/invitations/accept",
        None,
        json!({"token": mail.token(), "username": "nina", "password": "short"}),
    )
    .await;
    assert_eq!(res.status(), 422);
    let res = post(
        &s,
        "/api/v1/invitations/accept",
        None,
        json!({"token": mail.token(), "username": "nina", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let acc = json(res).await;
    assert_eq!(acc["role"], "nurse");
    // Single use.
    let res = post(
        &s,
        "/api/v1/invitations/accept",
        None,
        json!({"token": mail.token(), "username": "nina2", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 400);
    assert_eq!(s.get(&mail.link()).await.status(), 400);
    // The account works, and its address counts as verified (a reset reaches it).
    let nina = s.login("nina", PW).await;
    let me = json(s.get_as("/api/v1/auth/me", &nina).await).await;
    assert_eq!(me["username"], "nina");
    assert_eq!(
        json(s.get_as("/api/v1/invitations", &root).await).await["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Revoke and resend: a revoked link dies; a resent one replaces the old link.
    let res = post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "omar@example.org", "role": "doctor"}),
    )
    .await;
    let first = json(res).await["id"].as_str().unwrap().to_owned();
    let old = sink.wait_for(1).await;
    let res = post(
        &s,
        &format!("/api/v1/invitations/{first}/resend"),
        Some(&root),
        json!({}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let second = json(res).await["id"].as_str().unwrap().to_owned();
    let new = sink.wait_for(2).await;
    assert_ne!(old.token(), new.token());
    assert_eq!(s.get(&old.link()).await.status(), 400);
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/invitations/{second}"),
            &root,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(s.get(&new.link()).await.status(), 400);

    // Only users:manage may invite.
    let res = post(
        &s,
        "/api/v1/invitations",
        Some(&nina),
        json!({"email": "x@example.org", "role": "admin"}),
    )
    .await;
    assert_eq!(res.status(), 403);
    // Every step is in the audit trail, and no token is.
    let events: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT action, resource_type, context FROM audit_events")
            .fetch_all(s.state.db().reader())
            .await
            .unwrap();
    assert!(
        events
            .iter()
            .any(|(a, t, _)| a == "create" && t.as_deref() == Some("invitation"))
    );
    assert!(events.iter().any(|(a, t, c)| a == "create"
        && t.as_deref() == Some("user")
        && c.contains("invitation")));
    let all = format!("{events:?}");
    for m in [&mail, &old, &new] {
        assert!(!all.contains(&m.token()));
    }
}

both_backends!(a_password_reset_ends_every_session);
async fn a_password_reset_ends_every_session(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    invited(&s, &sink, &root, "paula@example.org", "paula").await;
    let old_session = s.login("paula", PW).await;
    let res = post(
        &s,
        "/api/v1/tokens",
        Some(&old_session),
        json!({"name": "script"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let api_token = crate::support::json(res).await["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let res = post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "paula"}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let mail = sink.wait_for(1).await;
    assert_eq!(mail.to, "paula@example.org");
    assert!(mail.link().starts_with("/accounts/reset/"));
    // The page asks for the new password (no TOTP on this account).
    let page = s.get(&mail.link()).await.text().await.unwrap();
    assert!(page.contains("new_password") && !page.contains("totp_code"));
    // History applies: the current password may not come back; the link survives that.
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": mail.token(), "new_password": PW}),
    )
    .await;
    assert_eq!(res.status(), 422);
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": mail.token(), "new_password": PW2}),
    )
    .await;
    assert_eq!(res.status(), 204);
    // The old session is dead; the new password works; the user was told. Personal
    // API tokens stay unless the reset asks to revoke them (below).
    assert_eq!(
        s.get_as("/api/v1/auth/me", &old_session).await.status(),
        401
    );
    assert_eq!(s.get_as("/api/v1/auth/me", &api_token).await.status(), 200);
    s.login("paula", PW2).await;
    let notice = sink.wait_for(2).await;
    assert_eq!(notice.subject(), "Your Custodian password was changed");
    assert!(!notice.data.contains("/accounts/"));
    // Single use.
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": mail.token(), "new_password": PW3}),
    )
    .await;
    assert_eq!(res.status(), 400);

    // An expired link is refused.
    let res = post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "paula@example.org"}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let late = sink.wait_for(3).await;
    s.clock.advance(Duration::from_secs(31 * 60));
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": late.token(), "new_password": PW3}),
    )
    .await;
    assert_eq!(res.status(), 400);

    // A locked account can still be reset, and the reset lifts the lock.
    for _ in 0..3 {
        s.post(
            "/api/v1/auth/login",
            None,
            json!({"username": "paula", "password": "Wrong-Password-1!"}),
        )
        .await;
    }
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "paula", "password": PW2}),
        )
        .await;
    assert_eq!(res.status(), 423, "locked");
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "paula"}),
    )
    .await;
    let unlock = sink.wait_for(4).await;
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": unlock.token(), "new_password": PW3, "revoke_api_tokens": true}),
    )
    .await;
    assert_eq!(res.status(), 204);
    s.login("paula", PW3).await;
    assert_eq!(s.get_as("/api/v1/auth/me", &api_token).await.status(), 401);
}

both_backends!(a_reset_needs_the_second_factor_when_totp_is_on);
async fn a_reset_needs_the_second_factor_when_totp_is_on(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    invited(&s, &sink, &root, "tom@example.org", "tom").await;
    let t = s.login("tom", PW).await;
    let (secret, recovery) = enrol(&s, &t).await;
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "tom"}),
    )
    .await;
    let mail = sink.wait_for(1).await;
    assert!(
        s.get(&mail.link())
            .await
            .text()
            .await
            .unwrap()
            .contains("totp_code")
    );
    let confirm = |code: Option<String>| {
        let mut body = json!({"token": mail.token(), "new_password": PW2});
        if let Some(c) = code {
            body["totp_code"] = json!(c);
        }
        body
    };
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        confirm(None),
    )
    .await;
    assert_eq!(
        (res.status().as_u16(), json(res).await["code"].clone()),
        (401, json!("mfa_required"))
    );
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        confirm(Some("000000".into())),
    )
    .await;
    assert_eq!(
        (res.status().as_u16(), json(res).await["code"].clone()),
        (401, json!("invalid_totp"))
    );
    s.clock.advance(Duration::from_secs(30));
    let code = current_code(&s, &secret, 0);
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        confirm(Some(code)),
    )
    .await;
    assert_eq!(res.status(), 204);
    // A recovery code works too (on a new link).
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "tom"}),
    )
    .await;
    let mail2 = sink.wait_for(3).await;
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": mail2.token(), "new_password": PW3, "totp_code": recovery[0]}),
    )
    .await;
    assert_eq!(res.status(), 204);
}

both_backends!(reset_requests_reveal_nothing);
async fn reset_requests_reveal_nothing(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    invited(&s, &sink, &root, "vera@example.org", "vera").await;
    // An account whose address was never verified (created by an administrator).
    let res = post(
        &s,
        "/api/v1/users",
        Some(&root),
        json!({"username": "uma", "email": "uma@example.org", "role": "nurse", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let mut answers = Vec::new();
    for who in ["nobody", "nobody@example.org", "uma", "vera"] {
        let res = post(
            &s,
            "/api/v1/auth/password-reset",
            None,
            json!({"username_or_email": who}),
        )
        .await;
        answers.push((res.status().as_u16(), res.text().await.unwrap()));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(answers[0].0, 202);
    // Only vera's verified address gets a mail; uma's unverified one gets nothing.
    let mail = sink.wait_for(1).await;
    assert_eq!(mail.to, "vera@example.org");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 2);
    // The request is rate-limited per address (10/m).
    let mut last = 0;
    for _ in 0..12 {
        last = post(
            &s,
            "/api/v1/auth/password-reset",
            None,
            json!({"username_or_email": "nobody"}),
        )
        .await
        .status()
        .as_u16();
    }
    assert_eq!(last, 429);
}

both_backends!(email_addresses_are_verified_by_link);
async fn email_addresses_are_verified_by_link(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    let res = post(
        &s,
        "/api/v1/users",
        Some(&root),
        json!({"username": "walt", "email": "walt@example.org", "role": "nurse", "password": PW}),
    )
    .await;
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let walt = s.login("walt", PW).await;
    let res = post(
        &s,
        "/api/v1/auth/email/verification",
        Some(&walt),
        json!({}),
    )
    .await;
    assert_eq!(res.status(), 202);
    assert_eq!(json(res).await["sent"], true);
    let mail = sink.wait_for(0).await;
    assert_eq!(mail.to, "walt@example.org");
    assert!(mail.link().starts_with("/accounts/verify/"));
    // Opening the link only shows a button.
    assert_eq!(s.get(&mail.link()).await.status(), 200);
    let res = post(
        &s,
        "/api/v1/auth/email/verify",
        None,
        json!({"token": mail.token()}),
    )
    .await;
    assert_eq!(res.status(), 204);
    let res = post(
        &s,
        "/api/v1/auth/email/verify",
        None,
        json!({"token": mail.token()}),
    )
    .await;
    assert_eq!(res.status(), 400);
    // Verified: nothing more to send; a reset now reaches the address.
    let res = post(
        &s,
        "/api/v1/auth/email/verification",
        Some(&walt),
        json!({}),
    )
    .await;
    assert_eq!(json(res).await["sent"], false);
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "walt"}),
    )
    .await;
    assert_eq!(
        sink.wait_for(1).await.subject(),
        "Reset your Custodian password"
    );

    // A new address must be verified again: a verification link for the old address
    // stops working, and resets go nowhere until then.
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            &root,
            Some(json!({"email": "walt@new.example.org"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "walt"}),
    )
    .await;
    let res = post(
        &s,
        "/api/v1/auth/email/verification",
        Some(&walt),
        json!({}),
    )
    .await;
    assert_eq!(json(res).await["sent"], true);
    // The old, verified address is told of the change; the reset sent nothing.
    let notice = sink.wait_for(2).await;
    assert_eq!(notice.to, "walt@example.org");
    assert_eq!(
        notice.subject(),
        "The email address of your Custodian account was changed"
    );
    let m = sink.wait_for(3).await;
    assert_eq!(
        m.to, "walt@new.example.org",
        "the reset for the unverified address sent nothing"
    );
}

both_backends!(self_registration_is_off_then_gated);
async fn self_registration_is_off_then_gated(backend: Backend) {
    let (s, _) = server(backend, vec![]).await;
    let res = post(
        &s,
        "/api/v1/auth/register",
        None,
        json!({"username": "zed", "email": "zed@example.org", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 404);

    let (s, sink) = server(backend, vec![("accounts.self_registration", "true".into())]).await;
    let res = post(
        &s,
        "/api/v1/auth/register",
        None,
        json!({"username": "zed", "email": "zed@example.org", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 202);
    // Inactive until the address is verified.
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "zed", "password": PW}),
        )
        .await;
    assert_eq!(res.status(), 401);
    let mail = sink.wait_for(0).await;
    let res = post(
        &s,
        "/api/v1/auth/email/verify",
        None,
        json!({"token": mail.token()}),
    )
    .await;
    assert_eq!(res.status(), 204);
    let zed = s.login("zed", PW).await;
    let me = json(s.get_as("/api/v1/auth/me", &zed).await).await;
    assert_eq!(me["role"], "registered");
    // No PHI until an administrator gives a real role.
    assert_eq!(s.get_as("/api/v1/patients?q=x", &zed).await.status(), 403);
    // A second registration with the same address creates nothing and says nothing.
    let res = post(
        &s,
        "/api/v1/auth/register",
        None,
        json!({"username": "zed2", "email": "zed@example.org", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users WHERE username = 'zed2'")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(n.0, 0);

    // A registration role with PHI permissions is refused.
    let (s, _) = server(
        backend,
        vec![
            ("accounts.self_registration", "true".into()),
            ("accounts.self_registration_role", "doctor".into()),
        ],
    )
    .await;
    let res = post(
        &s,
        "/api/v1/auth/register",
        None,
        json!({"username": "yan", "email": "yan@example.org", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 503);
}

both_backends!(the_outbox_retries_and_never_sends_twice);
async fn the_outbox_retries_and_never_sends_twice(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    // The server refuses the first attempt (451): the mail waits, then goes once.
    sink.fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
    post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "a@example.org", "role": "nurse"}),
    )
    .await;
    for _ in 0..100 {
        let row: (i64, Option<String>) =
            sqlx::query_as("SELECT attempts, last_error FROM mail_outbox")
                .fetch_one(s.state.db().reader())
                .await
                .unwrap();
        if row.0 >= 1 && row.1.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink.count(), 0);
    s.clock.advance(Duration::from_secs(120));
    s.state.accounts().outbox().deliver_due().await.unwrap();
    let mail = sink.wait_for(0).await;
    assert_eq!(mail.to, "a@example.org");
    let row: (i64, Option<String>) = sqlx::query_as("SELECT attempts, sent_at FROM mail_outbox")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(row.0, 2);
    assert!(row.1.is_some());
    // The body is sealed in the database.
    let body: (String,) = sqlx::query_as("SELECT body FROM mail_outbox")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert!(!body.0.contains("/accounts/") && body.0.starts_with('v'));

    // A claim left by a process that stopped mid-send is not sent again.
    sqlx::query(
        "INSERT INTO mail_outbox (id, recipient, subject, body, created_at, attempts, next_attempt_at, claimed_at) \
         VALUES ('stuck', 'b@example.org', 's', 'x', '2000-01-01T00:00:00.000000Z', 1, '2000-01-01T00:00:00.000000Z', '2000-01-01T00:00:00.000000Z')",
    )
    .execute(s.state.db().writer())
    .await
    .unwrap();
    s.state.accounts().outbox().deliver_due().await.unwrap();
    let stuck: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT sent_at, failed_at FROM mail_outbox WHERE id = 'stuck'")
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert_eq!(stuck.0, None);
    assert!(stuck.1.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1);
}

/// Dev without SMTP: mails land in a folder under data_dir.
#[tokio::test]
async fn dev_writes_mails_to_a_folder() {
    let s = TestServer::start(Backend::Sqlite).await;
    let root = admin(&s).await;
    let res = post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "f@example.org", "role": "nurse"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let dir = s.db.path().join("mail");
    let mut found = None;
    for _ in 0..200 {
        if let Some(e) = std::fs::read_dir(&dir).ok().and_then(|mut d| d.next()) {
            found = Some(e.unwrap().path());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let file = found.expect("a mail file");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("To: <f@example.org>") && text.contains("/accounts/invite/"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// The pages behind the links work in a browser's way: form posts with the CSRF cookie.
#[tokio::test]
async fn the_pages_behind_the_links() {
    let (s, sink) = server(Backend::Sqlite, vec![]).await;
    let root = admin(&s).await;
    post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "p@example.org", "role": "nurse"}),
    )
    .await;
    let mail = sink.wait_for(0).await;
    let res = s.get(&mail.link()).await;
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .next()
        .unwrap();
    let html = res.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    // Without the cookie: refused.
    let res = s
        .client
        .post(s.url(&mail.link()))
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", "pia"),
            ("password", PW),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = s
        .client
        .post(s.url(&mail.link()))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", "pia"),
            ("password", PW),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("Your account is ready"));
    s.login("pia", PW).await;
    // The forgot-password form answers the same for anyone.
    let res = s.get("/login/forgot").await;
    let cookie = res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = res.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let mut pages = Vec::new();
    for who in ["pia", "nobody"] {
        let res = s
            .client
            .post(s.url("/login/forgot"))
            .header("cookie", &cookie)
            .form(&[("csrf", csrf.as_str()), ("username_or_email", who)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        pages.push(text.split("name=\"csrf\"").next().unwrap().to_owned());
    }
    assert_eq!(pages[0], pages[1]);
    // The administrators' page lists and invites.
    assert!(
        s.get("/login")
            .await
            .text()
            .await
            .unwrap()
            .contains("/login/forgot")
    );
}

/// Mail over TLS: implicit TLS and STARTTLS, with the server's certificate trusted through
/// mail.smtp_ca_file; the password is sent only inside TLS; a server that does not offer
/// STARTTLS gets nothing (no fallback to clear text).
#[tokio::test]
async fn mail_goes_over_tls_or_not_at_all() {
    use crate::smtp_sink::{Mode, tls_for_localhost};
    custodian::http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    for (name, implicit) in [("implicit", true), ("starttls", false)] {
        let (acceptor, pem) = tls_for_localhost();
        let ca = dir.path().join(format!("{name}.pem"));
        std::fs::write(&ca, pem).unwrap();
        let sink = Sink::start_with(if implicit {
            Mode::Implicit(acceptor)
        } else {
            Mode::Starttls(acceptor)
        })
        .await;
        let s = TestServer::start_with(
            Backend::Sqlite,
            Options {
                sets: vec![
                    ("mail.smtp_host", "localhost".into()),
                    ("mail.smtp_port", sink.port.to_string()),
                    ("mail.smtp_tls", name.into()),
                    ("mail.smtp_ca_file", ca.display().to_string()),
                    ("mail.smtp_username", "relay-user".into()),
                    ("mail.smtp_password", "RELAY-CANARY".into()),
                    ("mail.base_url", "https://custodian.test".into()),
                ],
                ..Options::default()
            },
        )
        .await;
        let root = admin(&s).await;
        let res = post(
            &s,
            "/api/v1/invitations",
            Some(&root),
            json!({"email": "t@example.org", "role": "nurse"}),
        )
        .await;
        assert_eq!(res.status(), 201);
        let mail = sink.wait_for(0).await;
        assert_eq!(mail.to, "t@example.org", "{name}");
        let auths = sink.auths.lock().unwrap().clone();
        assert_eq!(
            auths,
            vec![("\0relay-user\0RELAY-CANARY".to_owned(), true)],
            "{name}"
        );
    }
    // STARTTLS required, not offered: the mail fails, nothing is sent in clear.
    let sink = Sink::start().await;
    let s = TestServer::start_with(
        Backend::Sqlite,
        Options {
            sets: vec![
                ("mail.smtp_host", "localhost".into()),
                ("mail.smtp_port", sink.port.to_string()),
                ("mail.smtp_tls", "starttls".into()),
                ("mail.smtp_username", "relay-user".into()),
                ("mail.smtp_password", "RELAY-CANARY".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let root = admin(&s).await;
    post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "u@example.org", "role": "nurse"}),
    )
    .await;
    let mut failed = None;
    for _ in 0..200 {
        let row: (Option<String>, Option<String>) =
            sqlx::query_as("SELECT failed_at, last_error FROM mail_outbox")
                .fetch_one(s.state.db().reader())
                .await
                .unwrap();
        if row.0.is_some() {
            failed = row.1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed.unwrap().contains("STARTTLS"));
    assert_eq!(sink.count(), 0);
    assert!(
        sink.auths.lock().unwrap().is_empty(),
        "no password in clear"
    );
}

both_backends!(an_address_change_kills_the_links_sent_before);
/// Issue 20, item 4: after an administrator changes a user's email, a reset link sent to
/// the old address no longer resets anything and the old (verified) address is told
/// (that nothing goes to the new address until it is verified is in
/// `email_addresses_are_verified_by_link`).
async fn an_address_change_kills_the_links_sent_before(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    let id = invited(&s, &sink, &root, "paula@example.org", "paula").await;
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "paula"}),
    )
    .await;
    let link = sink.wait_for(1).await;
    assert_eq!(link.to, "paula@example.org");
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            &root,
            Some(json!({"email": "someone@else.example"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    // Revoked in the same change...
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM account_tokens WHERE user_id = $1 AND revoked_at IS NULL AND used_at IS NULL",
    )
    .bind(&id)
    .fetch_one(s.state.db().reader())
    .await
    .unwrap();
    assert_eq!(live, 0, "every outstanding link of the account is revoked");
    // ...so the old link is dead, on the API and on its page.
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": link.token(), "new_password": PW2}),
    )
    .await;
    assert_eq!(res.status(), 400);
    assert!(
        !s.get(&link.link())
            .await
            .text()
            .await
            .unwrap()
            .contains("new_password")
    );
    s.login("paula", PW).await;
    // The old, verified address hears of the change; the new one gets nothing.
    let notice = sink.wait_for(2).await;
    assert_eq!(notice.to, "paula@example.org");
    assert!(!notice.data.contains("/accounts/"));
    // Even a link that escaped revocation (written straight into the table) dies with
    // the address: the link is bound to where it was sent.
    let sql = "UPDATE account_tokens SET revoked_at = NULL WHERE purpose = 'reset_password'";
    sqlx::query(sql)
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": link.token(), "new_password": PW2}),
    )
    .await;
    assert_eq!(res.status(), 400);
    s.login("paula", PW).await;
}

both_backends!(a_reset_link_cannot_be_used_to_guess_codes);
/// A sibling of item 3: the second factor asked by a reset link counts failures like
/// sign-in, and a link dies after three wrong codes.
async fn a_reset_link_cannot_be_used_to_guess_codes(backend: Backend) {
    let (s, sink) = server(backend, vec![("lockout.max_failures", "10".into())]).await;
    let root = admin(&s).await;
    let id = invited(&s, &sink, &root, "tom@example.org", "tom").await;
    let t = s.login("tom", PW).await;
    let (secret, _) = enrol(&s, &t).await;
    post(
        &s,
        "/api/v1/auth/password-reset",
        None,
        json!({"username_or_email": "tom"}),
    )
    .await;
    let mail = sink.wait_for(1).await;
    for guess in ["000000", "111111", "222222"] {
        let res = post(
            &s,
            "/api/v1/auth/password-reset/confirm",
            None,
            json!({"token": mail.token(), "new_password": PW2, "totp_code": guess}),
        )
        .await;
        assert_eq!(res.status(), 401);
    }
    s.clock.advance(Duration::from_secs(30));
    let res = post(
        &s,
        "/api/v1/auth/password-reset/confirm",
        None,
        json!({"token": mail.token(), "new_password": PW2, "totp_code": current_code(&s, &secret, 0)}),
    )
    .await;
    assert_eq!(res.status(), 400, "the link died after three wrong codes");
    let history = custodian::identity::store::attempts(s.state.db(), &id, None, 50)
        .await
        .unwrap();
    assert_eq!(history.iter().filter(|a| a.reason == "bad_totp").count(), 3);
}

/// A resend the sender may not make (the invitation's role holds more than they do)
/// leaves the invitation and its link as they were.
async fn a_refused_resend_leaves_the_invitation(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    crate::delegation::role(&s, "usermgr", &["users:manage"]).await;
    s.user("um", "usermgr", PW).await;
    let um = s.login("um", PW).await;
    let res = post(
        &s,
        "/api/v1/invitations",
        Some(&root),
        json!({"email": "boss@example.org", "role": "admin"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let id = json(res).await["id"].as_str().unwrap().to_owned();
    let mail = sink.wait_for(0).await;
    let res = post(
        &s,
        &format!("/api/v1/invitations/{id}/resend"),
        Some(&um),
        json!({}),
    )
    .await;
    assert_eq!(res.status(), 403);
    let list = json(s.get_as("/api/v1/invitations", &root).await).await;
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id.as_str()),
        "{list}"
    );
    // The link sent first still works.
    let res = post(
        &s,
        "/api/v1/invitations/accept",
        None,
        json!({"token": mail.token(), "username": "boss", "password": PW}),
    )
    .await;
    assert_eq!(res.status(), 201);
}
both_backends!(a_refused_resend_leaves_the_invitation);

/// A second factor reset by an administrator is told by mail to the account's verified
/// address (nothing goes to an unverified one), through the outbox; the email change of
/// the user page tells the old verified address like the API's.
async fn a_second_factor_reset_and_an_email_change_are_told_by_mail(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    let vera = invited(&s, &sink, &root, "vera@example.org", "vera").await;
    let t = s.login("vera", PW).await;
    enrol(&s, &t).await;
    let n = sink.count();
    let res = post(
        &s,
        &format!("/api/v1/users/{vera}/totp/reset"),
        Some(&root),
        json!({}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["notified"], true);
    let mail = sink.wait_for(n).await;
    assert_eq!(mail.to, "vera@example.org");
    assert_eq!(
        mail.subject(),
        "The second factor of your Custodian account was reset"
    );
    assert!(mail.data.contains("\"vera\"") && mail.data.contains("administrator"));

    // An address never verified gets nothing.
    let res = post(
        &s,
        "/api/v1/users",
        Some(&root),
        json!({"username": "ulla", "email": "ulla@example.org", "password": PW, "role": "nurse"}),
    )
    .await;
    let ulla = json(res).await["id"].as_str().unwrap().to_owned();
    let t = s.login("ulla", PW).await;
    enrol(&s, &t).await;
    let res = post(
        &s,
        &format!("/api/v1/users/{ulla}/totp/reset"),
        Some(&root),
        json!({}),
    )
    .await;
    assert_eq!(json(res).await["notified"], false);
    let (queued,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM mail_outbox WHERE recipient = $1")
        .bind("ulla@example.org")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(queued, 0);

    // The user page's email change: the old, verified address is told.
    let mut b = crate::web::Browser::new(&s);
    b.sign_in("root", PW).await;
    let csrf = b.csrf().await;
    let n = sink.count();
    let (status, _, _) = b
        .post(
            &format!("/admin/users/{vera}/email"),
            &[("csrf", &csrf), ("email", "vera.new@example.org")],
        )
        .await;
    assert_eq!(status, 303);
    let mail = sink.wait_for(n).await;
    assert_eq!(mail.to, "vera@example.org");
    assert_eq!(
        mail.subject(),
        "The email address of your Custodian account was changed"
    );
}
both_backends!(a_second_factor_reset_and_an_email_change_are_told_by_mail);

/// A passkey added to or removed from an account is told by mail to its verified
/// address; the passkey origin follows `mail.base_url` (here http://custodian.test).
async fn a_passkey_added_or_removed_is_told_by_mail(backend: Backend) {
    let (s, sink) = server(backend, vec![]).await;
    let root = admin(&s).await;
    invited(&s, &sink, &root, "pia@example.org", "pia").await;
    let t = s.login("pia", PW).await;
    let mut key = crate::softkey::SoftKey::new("http://custodian.test");
    let n = sink.count();
    let added = crate::passkeys::register(&s, &t, &mut key, "Work laptop").await;
    let mail = sink.wait_for(n).await;
    assert_eq!(mail.to, "pia@example.org");
    assert_eq!(
        mail.subject(),
        "A passkey was added to your Custodian account"
    );
    assert!(mail.data.contains("Work laptop") && mail.data.contains("\"pia\""));
    let id = added["passkey"]["id"].as_str().unwrap();
    let n = sink.count();
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/auth/passkeys/{id}"),
            &t,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let mail = sink.wait_for(n).await;
    assert_eq!(
        mail.subject(),
        "A passkey was removed from your Custodian account"
    );
    // A passkey made for another site does not register here.
    let mut elsewhere = crate::softkey::SoftKey::new("http://localhost:5005");
    let c = json(
        s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &t, None)
            .await,
    )
    .await;
    let answer = elsewhere.register(&c);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/passkeys",
            &t,
            Some(json!({"ceremony": c["ceremony"], "name": "x", "credential": answer})),
        )
        .await;
    assert_eq!(res.status(), 401);
}
both_backends!(a_passkey_added_or_removed_is_told_by_mail);
