//! Nobody hands out more than they hold (issue 20, item 1): a manager of users or roles
//! cannot grant, assign, create or widen a role beyond their own permissions, cannot
//! act on an account that holds more than they do, and cannot edit their own role —
//! through the API, the pages and invitations alike.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestServer, json};
use crate::web::Browser;

const PW: &str = "Correct-Horse-9!";

pub(crate) async fn role(s: &TestServer, name: &str, perms: &[&str]) {
    let mut tx = s.state.db().writer().begin().await.unwrap();
    sqlx::query("INSERT INTO roles (name, builtin, created_at) VALUES ($1, 0, '')")
        .bind(name)
        .execute(&mut *tx)
        .await
        .unwrap();
    for p in perms {
        sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
            .bind(name)
            .bind(*p)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn status_code(res: reqwest::Response) -> (u16, Value) {
    let st = res.status().as_u16();
    let text = res.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn user_role(s: &TestServer, id: &str) -> String {
    s.state.identity().user(id).await.unwrap().role
}

async fn a_user_manager_cannot_grant_what_it_lacks(backend: Backend) {
    let s = TestServer::start(backend).await;
    role(&s, "usermgr", &["users:manage"]).await;
    let me = s.user("um", "usermgr", PW).await;
    let nurse = s.user("nina", "nurse", PW).await;
    let admin = s.user("root", "admin", PW).await;
    let um = s.login("um", PW).await;
    let root_session = s.login("root", PW).await;

    // Itself or anyone else into admin (or doctor, with phi:ssn): refused, unchanged.
    for (target, new_role) in [(&me, "admin"), (&nurse, "admin"), (&nurse, "doctor")] {
        let (st, b) = status_code(
            s.send_as(
                Method::PATCH,
                &format!("/api/v1/users/{target}"),
                &um,
                Some(json!({"role": new_role})),
            )
            .await,
        )
        .await;
        assert_eq!(
            (st, b["code"].as_str()),
            (403, Some("forbidden")),
            "{new_role}"
        );
    }
    assert_eq!(user_role(&s, &me).await, "usermgr");
    assert_eq!(user_role(&s, &nurse).await, "nurse");
    // The nurse's role holds patients:read and records:read, which um lacks: even a
    // demotion of the nurse is out of reach.
    let (st, _) = status_code(
        s.send_as(
            Method::PATCH,
            &format!("/api/v1/users/{nurse}"),
            &um,
            Some(json!({"role": "registered"})),
        )
        .await,
    )
    .await;
    assert_eq!(st, 403);
    // Creating an account with a role beyond its own: refused; within it: fine.
    let (st, b) = status_code(
        s.post(
            "/api/v1/users",
            Some(&um),
            json!({"username": "mole", "email": "mole@example.org", "password": PW, "role": "admin"}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 403);
    assert!(
        b["detail"].as_str().unwrap().contains("phi:ssn"),
        "names what is missing: {b}"
    );
    assert!(
        s.state
            .identity()
            .user_by_username("mole")
            .await
            .unwrap()
            .is_none()
    );
    let (st, created) = status_code(
        s.post(
            "/api/v1/users",
            Some(&um),
            json!({"username": "temp", "email": "temp@example.org", "password": PW, "role": "registered"}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 201);
    let temp = created["id"].as_str().unwrap().to_owned();
    // Within what it holds, it manages: the new account can be given its own role.
    assert_eq!(
        s.send_as(
            Method::PATCH,
            &format!("/api/v1/users/{temp}"),
            &um,
            Some(json!({"role": "usermgr"}))
        )
        .await
        .status(),
        200
    );

    // An account holding more than um: no email change (a reset link to um's inbox
    // would take it over), no password reset, no unlock, no deactivation, no ending its
    // sessions.
    let root_sessions = json(
        s.get_as(&format!("/api/v1/sessions?user_id={admin}"), &root_session)
            .await,
    )
    .await;
    let root_sid = root_sessions["items"][0]["id"].as_str().unwrap().to_owned();
    let root_token = json(
        s.post(
            "/api/v1/tokens",
            Some(&root_session),
            json!({"name": "nightly"}),
        )
        .await,
    )
    .await;
    let root_token_id = root_token["id"].as_str().unwrap().to_owned();
    let root_cat = root_token["token"].as_str().unwrap().to_owned();
    // Looking is allowed (no secret is shown); acting is not.
    let listed = json(
        s.get_as(&format!("/api/v1/users/{admin}/tokens"), &um)
            .await,
    )
    .await;
    assert_eq!(listed["items"][0]["id"], root_token_id.as_str());
    assert!(!listed.to_string().contains(&root_cat));
    sqlx::query("UPDATE users SET totp_enabled = 1, totp_secret = 'x' WHERE id = $1")
        .bind(&admin)
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::PATCH,
            format!("/api/v1/users/{admin}"),
            Some(json!({"email": "um@attacker.example"})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/users/{admin}"),
            Some(json!({"active": false})),
        ),
        (
            Method::POST,
            format!("/api/v1/users/{admin}/password"),
            Some(json!({"new_password": "Taken-Over-Now-1!"})),
        ),
        (Method::POST, format!("/api/v1/users/{admin}/unlock"), None),
        (Method::DELETE, format!("/api/v1/sessions/{root_sid}"), None),
        (
            Method::DELETE,
            format!("/api/v1/users/{admin}/tokens/{root_token_id}"),
            None,
        ),
        (Method::POST, format!("/api/v1/users/{admin}/logout"), None),
        (
            Method::POST,
            format!("/api/v1/users/{admin}/totp/reset"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/users/{admin}/password"),
            Some(json!({"new_password": "Taken-Over-Now-1!", "must_change_password": true})),
        ),
    ];
    for (method, path, body) in attempts {
        let (st, b) = status_code(s.send_as(method.clone(), &path, &um, body).await).await;
        assert_eq!(
            (st, b["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}"
        );
    }
    let root = s.state.identity().user(&admin).await.unwrap();
    assert_eq!(root.email.as_deref(), Some("root@example.org"));
    assert!(root.active);
    assert!(root.totp_enabled, "its second factor stays");
    assert!(!root.must_change_password);
    assert_eq!(
        s.get_as("/api/v1/auth/me", &root_session).await.status(),
        200
    );
    assert_eq!(s.get_as("/api/v1/auth/me", &root_cat).await.status(), 200);
    sqlx::query("UPDATE users SET totp_enabled = 0, totp_secret = NULL WHERE id = $1")
        .bind(&admin)
        .execute(s.state.db().writer())
        .await
        .unwrap();
    // And the admin still signs in.
    s.login("root", PW).await;
}
both_backends!(a_user_manager_cannot_grant_what_it_lacks);

async fn a_role_manager_cannot_widen_roles(backend: Backend) {
    let s = TestServer::start(backend).await;
    role(&s, "rolemgr", &["roles:manage"]).await;
    role(&s, "lab", &["records:read"]).await;
    s.user("rm", "rolemgr", PW).await;
    let rm = s.login("rm", PW).await;

    // Its own role: never, not even within what it holds.
    for perms in [json!(["roles:manage", "phi:ssn"]), json!(["roles:manage"])] {
        let (st, b) = status_code(
            s.send_as(
                Method::PUT,
                "/api/v1/roles/rolemgr",
                &rm,
                Some(json!({"permissions": perms})),
            )
            .await,
        )
        .await;
        assert_eq!((st, b["code"].as_str()), (403, Some("forbidden")));
    }
    // A new role, another role, or deleting one, beyond what it holds: refused.
    let (st, _) = status_code(
        s.post(
            "/api/v1/roles",
            Some(&rm),
            json!({"name": "spy", "permissions": ["patients:read", "phi:ssn"]}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 403);
    for (name, perms) in [
        ("nurse", json!(["patients:read", "records:read", "phi:ssn"])),
        ("lab", json!([])),
        ("admin", json!(["users:manage", "roles:manage"])),
    ] {
        let (st, _) = status_code(
            s.send_as(
                Method::PUT,
                &format!("/api/v1/roles/{name}"),
                &rm,
                Some(json!({"permissions": perms})),
            )
            .await,
        )
        .await;
        assert_eq!(st, 403, "{name}");
    }
    assert_eq!(
        s.send_as(Method::DELETE, "/api/v1/roles/lab", &rm, None)
            .await
            .status(),
        403
    );
    // Within what it holds, it works.
    let (st, _) = status_code(
        s.post(
            "/api/v1/roles",
            Some(&rm),
            json!({"name": "deputy", "permissions": ["roles:manage"]}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 201);
    // Nothing changed where it was refused: the nurse still cannot see a full SSN.
    let nurse = custodian::identity::store::role(s.state.db(), "nurse")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(nurse.permissions, ["patients:read", "records:read"]);
    let own = custodian::identity::store::role(s.state.db(), "rolemgr")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(own.permissions, ["roles:manage"]);
    let spy = custodian::identity::store::role(s.state.db(), "spy")
        .await
        .unwrap();
    assert!(spy.is_none());
}
both_backends!(a_role_manager_cannot_widen_roles);

async fn the_pages_hold_the_same_line(backend: Backend) {
    let s = TestServer::start(backend).await;
    role(&s, "usermgr", &["users:manage", "roles:manage"]).await;
    s.user("um", "usermgr", PW).await;
    let nurse = s.user("nina", "nurse", PW).await;
    let admin = s.user("root", "admin", PW).await;
    let root_session = s.login("root", PW).await;
    let root_cat = json(
        s.post(
            "/api/v1/tokens",
            Some(&root_session),
            json!({"name": "nightly"}),
        )
        .await,
    )
    .await;
    let root_token_id = root_cat["id"].as_str().unwrap().to_owned();
    let root_sid = json(
        s.get_as(&format!("/api/v1/sessions?user_id={admin}"), &root_session)
            .await,
    )
    .await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::query("UPDATE users SET totp_enabled = 1, totp_secret = 'x' WHERE id = $1")
        .bind(&admin)
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let mut b = Browser::new(&s);
    b.sign_in("um", PW).await;
    let csrf = b.csrf().await;
    // The pages show the admin's credentials and account, with no way to act on them.
    let (status, html) = b.get("/admin/sessions?user=root").await;
    assert_eq!(status, 200);
    assert!(html.contains("beyond your role"), "{html}");
    assert!(!html.contains(&format!("/admin/sessions/{root_sid}/end")));
    assert!(!html.contains(&format!("/tokens/{root_token_id}/revoke")));
    let (status, html) = b.get(&format!("/admin/users/{admin}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("you can look, not change it"));
    assert!(!html.contains("Reset two-factor") && !html.contains("Change email"));

    let (status, html, _) = b
        .post(
            "/admin/users",
            &[
                ("csrf", &csrf),
                ("username", "mole"),
                ("email", "mole@example.org"),
                ("password", PW),
                ("role", "admin"),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("hold yourself"), "{html}");
    for (path, fields) in [
        (
            format!("/admin/users/{nurse}/role"),
            vec![("role", "admin")],
        ),
        (
            format!("/admin/users/{admin}/password"),
            vec![("new_password", "Taken-Over-Now-1!")],
        ),
        (
            format!("/admin/users/{admin}/active"),
            vec![("active", "false")],
        ),
        (format!("/admin/users/{admin}/unlock"), vec![]),
        (format!("/admin/users/{admin}/sessions/end"), vec![]),
        (
            format!("/admin/users/{admin}/email"),
            vec![("email", "um@attacker.example")],
        ),
        (format!("/admin/users/{admin}/totp/reset"), vec![]),
        (
            format!("/admin/sessions/{root_sid}/end"),
            vec![("user_id", admin.as_str())],
        ),
        (
            format!("/admin/users/{admin}/tokens/{root_token_id}/revoke"),
            vec![],
        ),
        (
            format!("/admin/users/{admin}/tokens/{root_token_id}/revoke"),
            vec![("back", "sessions")],
        ),
        (
            format!("/admin/sessions/{root_sid}/end"),
            vec![("back", "sessions")],
        ),
    ] {
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend(fields);
        let (status, html, _) = b.post(&path, &form).await;
        assert_eq!(status, 422, "{path}");
        assert!(html.contains("hold yourself"), "{path}");
    }
    let (status, html, _) = b
        .post(
            "/admin/roles/usermgr",
            &[("csrf", &csrf), ("permission", "phi:ssn")],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("your own role"));
    let (status, _, _) = b
        .post(
            "/admin/roles/nurse",
            &[
                ("csrf", &csrf),
                ("permission", "patients:read"),
                ("permission", "phi:ssn"),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(user_role(&s, &nurse).await, "nurse");
    let root = s.state.identity().user(&admin).await.unwrap();
    assert!(root.active && root.totp_enabled);
    assert_eq!(root.email.as_deref(), Some("root@example.org"));
    assert_eq!(
        s.get_as("/api/v1/auth/me", &root_session).await.status(),
        200
    );
    assert_eq!(
        s.get_as("/api/v1/auth/me", root_cat["token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    let nurse_role = custodian::identity::store::role(s.state.db(), "nurse")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(nurse_role.permissions, ["patients:read", "records:read"]);
}
both_backends!(the_pages_hold_the_same_line);

async fn invitations_stay_within_the_inviters_rights(backend: Backend) {
    let s = TestServer::start(backend).await;
    role(&s, "usermgr", &["users:manage"]).await;
    s.user("um", "usermgr", PW).await;
    let um = s.login("um", PW).await;
    // Refused for what the inviter lacks before anything else (even with no mail set up).
    let (st, b) = status_code(
        s.post(
            "/api/v1/invitations",
            Some(&um),
            json!({"email": "new@example.org", "role": "admin"}),
        )
        .await,
    )
    .await;
    assert_eq!((st, b["code"].as_str()), (403, Some("forbidden")));
}
both_backends!(invitations_stay_within_the_inviters_rights);
