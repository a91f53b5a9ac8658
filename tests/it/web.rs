//! The admin pages over HTTP: session cookie, CSRF on every change, permissions, escaping.

use std::collections::HashMap;

use reqwest::header::{COOKIE, SET_COOKIE};

use crate::both_backends;
use crate::support::{Backend, Options, TestServer};

const PW: &str = "Correct-Horse-9!";
const XSS: &str = "<script>alert(1)</script>";

/// A browser that keeps cookies (by hand, to see exactly what is set).
pub(crate) struct Browser<'a> {
    s: &'a TestServer,
    cookies: HashMap<String, String>,
    /// Check every cookie against the pages' rules (off for the SMART app's own cookies).
    strict: bool,
}

impl<'a> Browser<'a> {
    pub(crate) fn new(s: &'a TestServer) -> Self {
        Self {
            s,
            cookies: HashMap::new(),
            strict: true,
        }
    }

    /// A browser that also keeps cookies made for embedding (the SMART app's).
    pub(crate) fn lenient(s: &'a TestServer) -> Self {
        Self {
            strict: false,
            ..Self::new(s)
        }
    }

    pub(crate) fn cookie(&self, name: &str) -> Option<&String> {
        self.cookies.get(name)
    }

    pub(crate) fn set_cookie(&mut self, name: &str, value: &str) {
        self.cookies.insert(name.to_owned(), value.to_owned());
    }

    fn keep(&mut self, res: &reqwest::Response) {
        for v in res.headers().get_all(SET_COOKIE) {
            let text = v.to_str().unwrap();
            let (pair, _) = text.split_once(';').unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            if !self.strict {
                if val.is_empty() {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_owned(), val.to_owned());
                }
                continue;
            }
            assert!(
                text.contains("HttpOnly")
                    && text.contains("SameSite=Strict")
                    && text.contains("Path=/"),
                "{text}"
            );
            // `__Host-` cookies always carry `Secure`; the test servers are dev over
            // plain HTTP, whose unprefixed cookies go without it (sign-in from another
            // machine works).
            assert_eq!(text.contains("Secure"), k.starts_with("__Host-"), "{text}");
            if val.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), val.to_owned());
            }
        }
    }

    pub(crate) fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(crate) async fn get(&mut self, path: &str) -> (u16, String) {
        let res = self
            .s
            .client
            .get(self.s.url(path))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep(&res);
        let status = res.status().as_u16();
        (status, res.text().await.unwrap())
    }

    /// A GET that also answers the redirect's `Location`.
    pub(crate) async fn get_full(&mut self, path: &str) -> (u16, String, Option<String>) {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            self.s.url(path)
        };
        let res = self
            .s
            .client
            .get(url)
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep(&res);
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        (status, res.text().await.unwrap(), location)
    }

    pub(crate) async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
    ) -> (u16, String, Option<String>) {
        let res = self
            .s
            .client
            .post(self.s.url(path))
            .header(COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(&res);
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        (status, res.text().await.unwrap(), location)
    }

    /// The CSRF token of the signed-in session (from the dashboard).
    pub(crate) async fn csrf(&mut self) -> String {
        let (_, html) = self.get("/admin").await;
        field(&html, "csrf")
    }

    pub(crate) async fn sign_in(&mut self, username: &str, password: &str) {
        let (_, html) = self.get("/login").await;
        let csrf = field(&html, "csrf");
        let (status, _, location) = self
            .post(
                "/login",
                &[
                    ("csrf", &csrf),
                    ("username", username),
                    ("password", password),
                ],
            )
            .await;
        assert_eq!((status, location.as_deref()), (303, Some("/")));
        assert!(self.cookies.contains_key("custodian"));
    }
}

/// The value of a hidden input in a page.
pub(crate) fn field(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    html.split(&marker)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

async fn sign_in_page_flow_and_csrf(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("webby", "admin", PW).await;
    let mut b = Browser::new(&s);
    // Without the double-submit cookie and field: refused and recorded.
    let res = s
        .client
        .post(s.url("/login"))
        .form(&[("username", "webby"), ("password", PW)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    b.sign_in("webby", PW).await;
    let (status, html) = b.get("/admin").await;
    assert_eq!(status, 200);
    assert!(html.contains("webby") && html.contains("Protected health information"));
    // Pages use no inline script or style (the CSP forbids them).
    assert!(!html.contains("<script>") && !html.contains(" style=") && !html.contains("<style"));
    let csrf = field(&html, "csrf");
    assert_eq!(csrf.len(), 64);
    // A change with a forged token: 403, nothing changes, and the audit trail says so.
    let (status, _, _) = b
        .post(
            "/admin/tokens",
            &[("csrf", &"0".repeat(64)), ("name", "forged")],
        )
        .await;
    assert_eq!(status, 403);
    let (status, _, _) = b.post("/admin/tokens", &[("name", "no-token")]).await;
    assert_eq!(status, 403);
    let denied = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("permission_denied".into()),
            ..Default::default()
        },
        100,
        true,
    )
    .await
    .unwrap();
    assert!(denied.len() >= 3, "{denied:?}");
    assert!(denied.iter().all(|e| e.context.contains("csrf")));
    // With the right token it works, and the secret is shown once.
    let (status, html, _) = b
        .post("/admin/tokens", &[("csrf", &csrf), ("name", "gui")])
        .await;
    assert_eq!(status, 200);
    let token = html
        .split("value=\"cat_")
        .nth(1)
        .map(|r| r.split('"').next().unwrap().to_owned())
        .unwrap();
    let (_, again) = b.get("/admin").await;
    assert!(!again.contains(&token), "the secret is shown only once");
    // Sign out ends the session.
    let (status, _, location) = b.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(
        (status, location.as_deref()),
        (303, Some("/login?ok=signed-out"))
    );
    let (status, _) = b.get("/admin").await;
    assert_eq!(status, 303);
}
both_backends!(sign_in_page_flow_and_csrf);

async fn pages_need_their_permission(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("nursey", "nurse", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("nursey", PW).await;
    for page in [
        "/admin/users",
        "/admin/roles",
        "/admin/audit",
        "/admin/audit.csv",
        "/admin/security",
    ] {
        let (status, _) = b.get(page).await;
        assert_eq!(status, 403, "{page}");
    }
    // Each refusal is recorded as what it is: a denied permission.
    let refused = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            actor: Some("nursey".into()),
            status: Some(403),
            ..Default::default()
        },
        100,
        true,
    )
    .await
    .unwrap();
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused.iter().all(|e| e.action == "permission_denied"));
    let (_, html) = b.get("/admin").await;
    assert!(!html.contains("href=\"/admin/users\""));
    // Without a session: to the sign-in page.
    let res = s.get("/admin/users").await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/login");
}
both_backends!(pages_need_their_permission);

async fn every_user_controlled_field_comes_back_escaped(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin_id = s.user("chief", "admin", PW).await;
    // Markup in a failed sign-in's username, in a user agent, and in a token name.
    s.client
        .post(s.url("/api/v1/auth/login"))
        .header("user-agent", XSS)
        .json(&serde_json::json!({"username": XSS, "password": "x"}))
        .send()
        .await
        .unwrap();
    let res = s
        .client
        .post(s.url("/api/v1/auth/login"))
        .header("user-agent", XSS)
        .json(&serde_json::json!({"username": "chief", "password": PW}))
        .send()
        .await
        .unwrap();
    let t = crate::support::json(res).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/tokens",
            &t,
            Some(serde_json::json!({"name": XSS})),
        )
        .await;
    assert_eq!(res.status(), 201);
    // A user whose email holds markup is refused by validation; a search for it is echoed.
    let mut b = Browser::new(&s);
    b.sign_in("chief", PW).await;
    for page in [
        "/admin".to_owned(),
        format!("/admin/users/{admin_id}"),
        "/admin/audit".to_owned(),
        format!("/admin/users?q={}", urlencode(XSS)),
        format!("/admin/audit?actor={}", urlencode(XSS)),
        "/admin/roles".to_owned(),
    ] {
        let (status, html) = b.get(&page).await;
        assert_eq!(status, 200, "{page}");
        assert!(!html.contains(XSS), "{page} echoes markup unescaped");
        assert!(!html.contains("<script>alert"), "{page}");
    }
    let (_, dashboard) = b.get("/admin").await;
    assert!(
        dashboard.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
            || dashboard.contains("&#60;script&#62;"),
        "the token name is shown, escaped"
    );
    let (_, audit) = b
        .get(&format!("/admin/audit?actor={}", urlencode(XSS)))
        .await;
    assert!(
        audit.contains("&lt;script&gt;") || audit.contains("&#60;script"),
        "the failed username is shown, escaped"
    );
}
both_backends!(every_user_controlled_field_comes_back_escaped);

async fn admins_manage_users_and_roles_from_the_pages(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root1", "admin", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("root1", PW).await;
    let (_, html) = b.get("/admin/users").await;
    let csrf = field(&html, "csrf");
    // Validation errors re-render the form with a message (never a 500).
    let (status, html, _) = b
        .post(
            "/admin/users",
            &[
                ("csrf", &csrf),
                ("username", "bad name"),
                ("email", ""),
                ("role", "nurse"),
                ("password", PW),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("username"), "{html}");
    let (status, html, _) = b
        .post(
            "/admin/users",
            &[
                ("csrf", &csrf),
                ("username", "newnurse"),
                ("email", ""),
                ("role", "nurse"),
                ("password", "weak"),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("too_short"));
    let (status, _, location) = b
        .post(
            "/admin/users",
            &[
                ("csrf", &csrf),
                ("username", "newnurse"),
                ("email", "nn@example.org"),
                ("role", "nurse"),
                ("password", PW),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let location = location.unwrap();
    let id = location
        .trim_start_matches("/admin/users/")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let (status, _, _) = b
        .post(
            &format!("/admin/users/{id}/role"),
            &[("csrf", &csrf), ("role", "doctor")],
        )
        .await;
    assert_eq!(status, 303);
    assert_eq!(s.state.identity().user(&id).await.unwrap().role, "doctor");
    // Roles matrix: grant audit:read to a new role through the checkboxes.
    let (status, _, _) = b
        .post("/admin/roles", &[("csrf", &csrf), ("name", "reviewer")])
        .await;
    assert_eq!(status, 303);
    let (status, _, _) = b
        .post(
            "/admin/roles/reviewer",
            &[
                ("csrf", &csrf),
                ("permission", "audit:read"),
                ("permission", "records:read"),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let role = custodian::identity::store::role(s.state.db(), "reviewer")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(role.permissions, ["audit:read", "records:read"]);
    let (status, html, _) = b
        .post(
            "/admin/roles/admin",
            &[("csrf", &csrf), ("permission", "audit:read")],
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        html.contains("your own role"),
        "nobody edits their own role"
    );
    // The audit page shows the changes; the CSV export has them too.
    let (_, audit) = b.get("/admin/audit?action=update").await;
    assert!(audit.contains("role reviewer"));
    let (status, csv) = b.get("/admin/audit.csv?action=create").await;
    assert_eq!(status, 200);
    assert!(csv.starts_with("seq,id,at,"));
    assert!(csv.contains(",create,user,"));
}
both_backends!(admins_manage_users_and_roles_from_the_pages);

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn security_events_are_listed_for_auditors(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("auditee", "auditor", PW).await;
    s.state.security().raise(
        custodian::security::Rule::FailedLoginsAddress,
        "203.0.113.9",
        "10 failed sign-ins from one address within 15m",
    );
    let mut b = Browser::new(&s);
    b.sign_in("auditee", PW).await;
    let (_, home) = b.get("/admin").await;
    assert!(home.contains("href=\"/admin/security\""));
    // Stored in the background: look until it is there (bounded).
    for _ in 0..100 {
        let (status, html) = b.get("/admin/security").await;
        assert_eq!(status, 200);
        if html.contains("failed_logins_address") {
            assert!(html.contains("203.0.113.9"));
            assert!(html.contains("warning"));
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the security event is not listed");
}
both_backends!(security_events_are_listed_for_auditors);

async fn admins_invite_from_the_pages(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root", "admin", PW).await;
    s.user("nora", "nurse", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("root", PW).await;
    let (status, html) = b.get("/admin/invitations").await;
    assert_eq!(status, 200);
    assert!(html.contains("Invite someone") && html.contains("No pending invitations."));
    let csrf = field(&html, "csrf");
    let (status, html, _) = b
        .post(
            "/admin/invitations",
            &[
                ("csrf", &csrf),
                ("email", "ivy@example.org"),
                ("role", "nurse"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Invitation sent to ivy@example.org."),
        "{html}"
    );
    assert!(html.contains("<td>ivy@example.org</td>"));
    let id = html
        .split("/admin/invitations/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    // A bad address is shown on the page, not a 500.
    let (status, html, _) = b
        .post(
            "/admin/invitations",
            &[
                ("csrf", &csrf),
                ("email", "not an address"),
                ("role", "nurse"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert!(html.contains("class=\"error\""), "{html}");
    // Resend gives a new invitation; revoke removes it.
    let (status, html, _) = b
        .post(
            &format!("/admin/invitations/{id}/resend"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, 200);
    assert!(html.contains("Sent again to ivy@example.org."));
    let id2 = html
        .split("/admin/invitations/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(id, id2);
    let (status, _, location) = b
        .post(
            &format!("/admin/invitations/{id2}/revoke"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(
        (status, location.as_deref()),
        (303, Some("/admin/invitations"))
    );
    let (_, html) = b.get("/admin/invitations").await;
    assert!(html.contains("No pending invitations."));
    // Without users:manage: refused; without the CSRF token: refused.
    let mut n = Browser::new(&s);
    n.sign_in("nora", PW).await;
    assert_eq!(n.get("/admin/invitations").await.0, 403);
    let (status, _, _) = b
        .post(
            "/admin/invitations",
            &[("email", "x@example.org"), ("role", "nurse")],
        )
        .await;
    assert_eq!(status, 403);
}
both_backends!(admins_invite_from_the_pages);

// ---- issue 22: the admin console, friendly dev defaults ----------------------------------

/// The `Set-Cookie` headers of a response.
fn set_cookies(res: &reqwest::Response) -> Vec<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Signs in through the form with raw requests; answers the sign-in response's cookies.
async fn form_sign_in(s: &TestServer, login_cookie: &str, user: &str) -> Vec<String> {
    let res = s.get("/login").await;
    let set = set_cookies(&res);
    let pair = set
        .iter()
        .find(|c| c.starts_with(&format!("{login_cookie}=")))
        .unwrap_or_else(|| panic!("no {login_cookie} in {set:?}"))
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = res.text().await.unwrap();
    let csrf = field(&html, "csrf");
    let res = s
        .client
        .post(s.url("/login"))
        .header(COOKIE, pair)
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", user),
            ("password", PW),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "sign-in through the form");
    set_cookies(&res)
}

/// Dev over plain HTTP drops `Secure` (and the `__Host-` prefix that needs it), so the
/// sign-in works from another machine; TLS at a proxy in dev, and staging, keep both.
async fn cookies_lose_secure_only_in_dev_over_plain_http(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("webby", "admin", PW).await;
    let set = form_sign_in(&s, "custodian_login", "webby").await;
    let session = set.iter().find(|c| c.starts_with("custodian=")).unwrap();
    assert!(!session.contains("Secure"), "{session}");
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    assert!(s.state.config().dev_over_plain_http());

    let proxied = TestServer::start_with(
        backend,
        Options {
            sets: vec![("server.behind_tls_proxy", "true".into())],
            ..Options::default()
        },
    )
    .await;
    proxied.user("webby", "admin", PW).await;
    let set = form_sign_in(&proxied, "__Host-custodian_login", "webby").await;
    let session = set
        .iter()
        .find(|c| c.starts_with("__Host-custodian="))
        .unwrap();
    assert!(
        session.contains("; Secure;") && session.contains("HttpOnly"),
        "{session}"
    );
    assert!(!set.iter().any(|c| c.starts_with("custodian=")));

    use std::os::unix::fs::PermissionsExt;
    let db = std::sync::Arc::new(crate::support::TestDb::new(backend).await);
    let keyring = db.path().join("keyring");
    custodian::crypto::Keyring::create(&keyring, "2026-01-01T00:00:00Z").unwrap();
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let staging = TestServer::start_on(
        db,
        Options {
            env: Some("staging"),
            ..Options::default()
        },
    )
    .await;
    staging.user("webby", "admin", PW).await;
    let set = form_sign_in(&staging, "__Host-custodian_login", "webby").await;
    assert!(
        set.iter()
            .any(|c| c.starts_with("__Host-custodian=") && c.contains("; Secure;")),
        "{set:?}"
    );
    // Staging keeps the 5-minute idle timeout; dev has an hour to explore.
    assert_eq!(
        staging.state.config().session.idle_timeout.to_string(),
        "5m"
    );
    assert_eq!(s.state.config().session.idle_timeout.to_string(), "1h");
}
both_backends!(cookies_lose_secure_only_in_dev_over_plain_http);

/// A page whose session ended by time sends its user to the sign-in page, which says
/// so (idle: the inactivity notice; absolute: its own).
async fn an_expired_page_session_says_so(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![
                ("session.idle_timeout", "10m".into()),
                ("session.absolute_timeout", "30m".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    s.user("webby", "admin", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("webby", PW).await;
    s.clock.advance(std::time::Duration::from_secs(11 * 60));
    let res = s
        .client
        .get(s.url("/admin"))
        .header(COOKIE, b.cookie_header())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/login?expired=1");
    let (_, html) = b.get("/login?expired=1").await;
    assert!(html.contains("signed out after a period of inactivity"));

    let mut b = Browser::new(&s);
    b.sign_in("webby", PW).await;
    // In use every 8 minutes: never idle, yet over at 30 minutes.
    for _ in 0..3 {
        s.clock.advance(std::time::Duration::from_secs(8 * 60));
        assert_eq!(b.get("/admin").await.0, 200);
    }
    s.clock.advance(std::time::Duration::from_secs(8 * 60));
    let res = s
        .client
        .get(s.url("/admin"))
        .header(COOKIE, b.cookie_header())
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["location"], "/login?ok=session-ended");
    let (_, html) = b.get("/login?ok=session-ended").await;
    assert!(html.contains("longest lifetime"));
    // No cookie at all: the plain sign-in page.
    assert_eq!(s.get("/admin").await.headers()["location"], "/login");
}
both_backends!(an_expired_page_session_says_so);

/// The page of every user's sessions and API tokens: filtered by user and kind, no
/// secret shown, one ended, one revoked, all of a user ended, each change needing its
/// CSRF token and `users:manage`.
async fn administrators_end_sessions_and_tokens_from_the_sessions_page(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root", "admin", PW).await;
    let nina = s.user("nina", "nurse", PW).await;
    s.user("otto", "nurse", PW).await;
    let nina_a = s.login("nina", PW).await;
    let nina_b = s.login("nina", PW).await;
    let otto = s.login("otto", PW).await;
    let token = crate::support::json(
        s.post(
            "/api/v1/tokens",
            Some(&nina_a),
            serde_json::json!({"name": "nina-export"}),
        )
        .await,
    )
    .await;
    let (token_id, secret) = (
        token["id"].as_str().unwrap().to_owned(),
        token["token"].as_str().unwrap().to_owned(),
    );
    let mut b = Browser::new(&s);
    b.sign_in("root", PW).await;
    let (status, html) = b.get("/admin/sessions").await;
    assert_eq!(status, 200);
    assert!(html.contains(">nina<") && html.contains(">otto<") && html.contains(">root<"));
    assert!(html.contains("nina-export") && html.contains("this one"));
    assert!(
        !html.contains(&secret) && !html.contains("cat_"),
        "no secret"
    );
    assert!(
        !html.contains(&nina_a) && !html.contains("cst_"),
        "no session token"
    );
    // Filters.
    let (_, html) = b.get("/admin/sessions?user=nin&kind=api_token").await;
    assert!(html.contains("nina-export") && html.contains("0 session(s), 1 API token(s)"));
    assert!(!html.contains(">otto<"));
    let (_, html) = b.get("/admin/sessions?user=nina&kind=session").await;
    assert!(html.contains("2 session(s), 0 API token(s)"), "{html}");
    let csrf = field(&html, "csrf");

    // End one of nina's sessions: that one only.
    let sessions = crate::support::json(
        s.get_as(&format!("/api/v1/sessions?user_id={nina}"), &otto)
            .await,
    )
    .await;
    assert_eq!(sessions["code"], "forbidden", "a nurse cannot list them");
    let root_api = s.login("root", PW).await;
    let listed = crate::support::json(
        s.get_as(&format!("/api/v1/sessions?user_id={nina}"), &root_api)
            .await,
    )
    .await;
    let ids: Vec<String> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    // Without the CSRF token: refused, nothing ends.
    let (status, _, _) = b
        .post(
            &format!("/admin/sessions/{}/end", ids[0]),
            &[("user_id", &nina)],
        )
        .await;
    assert_eq!(status, 403);
    let alive = |t: String| {
        let s = &s;
        async move { s.get_as("/api/v1/auth/me", &t).await.status().as_u16() }
    };
    assert_eq!(
        alive(nina_a.clone()).await + alive(nina_b.clone()).await,
        400
    );
    let (status, _, location) = b
        .post(
            &format!("/admin/sessions/{}/end", ids[0]),
            &[
                ("csrf", &csrf),
                ("user_id", &nina),
                ("back", "sessions"),
                ("back_user", "nina"),
                ("back_kind", "session"),
            ],
        )
        .await;
    assert_eq!(status, 303);
    assert_eq!(
        location.as_deref(),
        Some("/admin/sessions?user=nina&kind=session&ok=ended")
    );
    let statuses = [alive(nina_a.clone()).await, alive(nina_b.clone()).await];
    assert!(
        statuses.contains(&401) && statuses.contains(&200),
        "{statuses:?}"
    );
    // Revoke the token (from the user page's form: back to the user page).
    let (status, _, location) = b
        .post(
            &format!("/admin/users/{nina}/tokens/{token_id}/revoke"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, 303);
    assert_eq!(
        location.as_deref(),
        Some(format!("/admin/users/{nina}?ok=revoked").as_str())
    );
    assert_eq!(alive(secret.clone()).await, 401);
    // All of nina's, from the sessions page.
    let (status, _, location) = b
        .post(
            &format!("/admin/users/{nina}/sessions/end"),
            &[("csrf", &csrf), ("back", "sessions")],
        )
        .await;
    assert_eq!(status, 303);
    assert_eq!(
        location.as_deref(),
        Some("/admin/sessions?user=&kind=&ok=sessions-ended")
    );
    assert_eq!(alive(nina_a).await + alive(nina_b).await, 802);
    assert_eq!(alive(otto.clone()).await, 200, "otto's go on");
    let (_, html) = b.get("/admin/sessions?ok=sessions-ended").await;
    assert!(html.contains("Every sign-in of this user has ended"));
    assert!(!html.contains(">nina<"));

    // A nurse: no page, no action.
    let mut n = Browser::new(&s);
    n.sign_in("otto", PW).await;
    assert_eq!(n.get("/admin/sessions").await.0, 403);
    let ncsrf = n.csrf().await;
    let (status, _, _) = n
        .post(
            &format!("/admin/users/{nina}/sessions/end"),
            &[("csrf", &ncsrf)],
        )
        .await;
    assert_eq!(status, 403);
    // Every step is in the audit trail, naming whose session or token it was.
    let deleted = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("delete".into()),
            actor: Some("root".into()),
            ..Default::default()
        },
        20,
        true,
    )
    .await
    .unwrap();
    assert!(
        deleted
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("session") && e.context.contains(&nina))
    );
    assert!(
        deleted
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("api_token")
                && e.resource_id.as_deref() == Some(token_id.as_str()))
    );
}
both_backends!(administrators_end_sessions_and_tokens_from_the_sessions_page);

/// The user page: a password an administrator types must be changed at the first
/// sign-in unless unticked; the email is edited there; a lost second factor is reset.
async fn the_user_page_sets_passwords_emails_and_resets_the_second_factor(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root", "admin", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("root", PW).await;
    let (_, html) = b.get("/admin/users").await;
    assert!(
        html.contains("name=\"must_change_password\" value=\"1\" checked"),
        "ticked by default"
    );
    let csrf = field(&html, "csrf");
    let create = |name: &'static str, tick: bool| {
        let mut form = vec![
            ("csrf", csrf.clone()),
            ("username", name.to_owned()),
            ("email", format!("{name}@example.org")),
            ("role", "nurse".to_owned()),
            ("password", PW.to_owned()),
        ];
        if tick {
            form.push(("must_change_password", "1".to_owned()));
        }
        form
    };
    for (name, tick) in [("ticked", true), ("unticked", false)] {
        let form = create(name, tick);
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, _) = b.post("/admin/users", &form).await;
        assert_eq!(status, 303, "{name}");
    }
    let ticked = s
        .state
        .identity()
        .user_by_username("ticked")
        .await
        .unwrap()
        .unwrap();
    assert!(ticked.must_change_password);
    assert!(
        !s.state
            .identity()
            .user_by_username("unticked")
            .await
            .unwrap()
            .unwrap()
            .must_change_password
    );
    // The flagged user's sign-in page asks for a new password first, saying why.
    let mut t = Browser::new(&s);
    let (_, html) = t.get("/login").await;
    let lcsrf = field(&html, "csrf");
    let (status, html, _) = t
        .post(
            "/login",
            &[("csrf", &lcsrf), ("username", "ticked"), ("password", PW)],
        )
        .await;
    assert_eq!(status, 200);
    assert!(html.contains("An administrator set the password"), "{html}");
    let lcsrf = field(&html, "csrf");
    let (status, _, location) = t
        .post(
            "/login/password",
            &[
                ("csrf", &lcsrf),
                ("username", "ticked"),
                ("current_password", PW),
                ("new_password", "Battery-Staple-7?"),
            ],
        )
        .await;
    assert_eq!((status, location.as_deref()), (303, Some("/")));
    assert!(
        !s.state
            .identity()
            .user(&ticked.id)
            .await
            .unwrap()
            .must_change_password
    );
    let mut u = Browser::new(&s);
    u.sign_in("unticked", PW).await;

    // The user page: a reset, ticked by default.
    let page = format!("/admin/users/{}", ticked.id);
    let (_, html) = b.get(&page).await;
    assert!(html.contains("Must change it at the next sign-in"));
    let (status, _, _) = b
        .post(
            &format!("{page}/password"),
            &[
                ("csrf", &csrf),
                ("new_password", "Quartz-Lantern-5#"),
                ("must_change_password", "1"),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let (_, html) = b.get(&page).await;
    assert!(html.contains("must be changed at the next sign-in"));

    // The email: changed, then removed; a bad one is shown, not a 500.
    let (status, _, location) = b
        .post(
            &format!("{page}/email"),
            &[("csrf", &csrf), ("email", "New.Ticked@example.org")],
        )
        .await;
    assert_eq!(status, 303);
    assert_eq!(location.unwrap(), format!("{page}?ok=email-saved"));
    let after = s.state.identity().user(&ticked.id).await.unwrap();
    assert_eq!(after.email.as_deref(), Some("New.Ticked@example.org"));
    let (_, html) = b.get(&format!("{page}?ok=email-saved")).await;
    assert!(html.contains("not verified") && html.contains("verified only once"));
    let (status, html, _) = b
        .post(
            &format!("{page}/email"),
            &[("csrf", &csrf), ("email", "not an address")],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("email"), "{html}");
    let (status, _, _) = b
        .post(&format!("{page}/email"), &[("csrf", &csrf), ("email", "")])
        .await;
    assert_eq!(status, 303);
    assert_eq!(
        s.state.identity().user(&ticked.id).await.unwrap().email,
        None
    );
    // Without the CSRF token: refused, unchanged.
    let (status, _, _) = b
        .post(&format!("{page}/email"), &[("email", "x@example.org")])
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        s.state.identity().user(&ticked.id).await.unwrap().email,
        None
    );

    // The second factor: no button without one; with one, a reset ends the sessions.
    let unticked = s
        .state
        .identity()
        .user_by_username("unticked")
        .await
        .unwrap()
        .unwrap();
    let upage = format!("/admin/users/{}", unticked.id);
    let (_, html) = b.get(&upage).await;
    assert!(!html.contains("Reset two-factor"));
    let session = s.login("unticked", PW).await;
    crate::identity::enrol(&s, &session).await;
    let (_, html) = b.get(&upage).await;
    assert!(html.contains("Reset two-factor"));
    let (status, _, _) = b.post(&format!("{upage}/totp/reset"), &[]).await;
    assert_eq!(status, 403, "no CSRF token");
    assert!(
        s.state
            .identity()
            .user(&unticked.id)
            .await
            .unwrap()
            .totp_enabled
    );
    let (status, _, location) = b
        .post(&format!("{upage}/totp/reset"), &[("csrf", &csrf)])
        .await;
    assert_eq!(status, 303);
    assert_eq!(location.unwrap(), format!("{upage}?ok=totp-reset"));
    assert!(
        !s.state
            .identity()
            .user(&unticked.id)
            .await
            .unwrap()
            .totp_enabled
    );
    assert_eq!(s.get_as("/api/v1/auth/me", &session).await.status(), 401);
    assert_eq!(u.get("/admin").await.0, 303, "the page session ended too");
    let (_, html) = b.get(&format!("{upage}?ok=totp-reset")).await;
    assert!(html.contains("tell them yourself"));
    // Its own second factor: not from here.
    let root_id = s
        .state
        .identity()
        .user_by_username("root")
        .await
        .unwrap()
        .unwrap()
        .id;
    sqlx::query("UPDATE users SET totp_enabled = 1, totp_secret = 'x' WHERE id = $1")
        .bind(&root_id)
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let (status, html, _) = b
        .post(
            &format!("/admin/users/{root_id}/totp/reset"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, 422);
    assert!(html.contains("your own second factor"));
}
both_backends!(the_user_page_sets_passwords_emails_and_resets_the_second_factor);

/// The roles page says what each permission allows.
async fn the_roles_page_describes_every_permission(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root", "admin", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("root", PW).await;
    let (status, html) = b.get("/admin/roles").await;
    assert_eq!(status, 200);
    assert!(html.contains("What each permission allows"));
    for p in custodian::access::Permission::ALL {
        let escaped = p.description().replace('\'', "&#39;");
        assert!(
            html.contains(p.description()) || html.contains(&escaped),
            "{}",
            p.as_str()
        );
        assert!(html.contains(&format!("<code>{}</code>", p.as_str())));
    }
}
both_backends!(the_roles_page_describes_every_permission);

/// The audit page names users beside their ids (from the users table), and never a
/// patient: an auditor holds no PHI permission.
async fn the_audit_page_names_users_never_patients(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("root", "admin", PW).await;
    let nina = s.user("nina", "nurse", PW).await;
    s.user("audrey", "auditor", PW).await;
    let root = s.login("root", PW).await;
    let patient = crate::support::json(
        s.post(
            "/api/v1/patients",
            Some(&root),
            serde_json::json!({"given_name": "Zelda", "family_name": "Quartermain", "birth_date": "1970-01-02"}),
        )
        .await,
    )
    .await;
    let pid = patient["id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{pid}"), &root)
            .await
            .status(),
        200
    );
    assert_eq!(
        s.post(
            &format!("/api/v1/users/{nina}/unlock"),
            Some(&root),
            serde_json::json!({})
        )
        .await
        .status(),
        204
    );
    let mut b = Browser::new(&s);
    b.sign_in("audrey", PW).await;
    let (status, html) = b.get("/admin/audit").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("user <strong>nina</strong>"),
        "the user's name beside its id"
    );
    assert!(
        html.contains(&format!("title=\"{nina}\"")),
        "the whole id in reach"
    );
    assert!(html.contains(&format!("/admin/audit?patient_id={pid}")));
    for phi in ["Zelda", "Quartermain", "1970-01-02"] {
        assert!(!html.contains(phi), "{phi} on the audit page");
    }
    // The CSV export of a filtered view: that filter's events only.
    let (status, csv) = b.get("/admin/audit.csv?action=update&status=204").await;
    assert_eq!(status, 200);
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(!rows.is_empty());
    assert!(
        rows.iter()
            .all(|r| r.contains(",update,") && r.contains(",204,")),
        "{csv}"
    );
}
both_backends!(the_audit_page_names_users_never_patients);

/// Security events: filtered by rule, severity, subject and time, paged, and exported
/// as CSV (the same filters), on the page and in the API; every read audited.
async fn security_events_are_filtered_and_exported(backend: Backend) {
    use custodian::security::{Rule, SecurityEvent, insert};
    let s = TestServer::start(backend).await;
    s.user("audrey", "auditor", PW).await;
    let events = [
        (
            Rule::FailedLoginsAddress,
            "203.0.113.9",
            "2026-01-10T10:00:00.000000Z",
        ),
        (Rule::BreakGlass, "user-a", "2026-01-11T10:00:00.000000Z"),
        (Rule::BreakGlass, "user-b", "2026-01-12T10:00:00.000000Z"),
        (
            Rule::AuditChainBroken,
            "=cmd|' /C calc'!A0",
            "2026-01-13T10:00:00.000000Z",
        ),
    ];
    for (rule, subject, at) in events {
        insert(
            s.state.db(),
            &SecurityEvent::new(rule, subject, "detail", at.into()),
        )
        .await
        .unwrap();
    }
    let t = s.login("audrey", PW).await;
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["subject"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = crate::support::json(s.get_as("/api/v1/security/events", &t).await).await;
    assert_eq!(ids(&all).len(), 4);
    let q = |query: &str| {
        let url = format!("/api/v1/security/events?{query}");
        let s = &s;
        let t = t.clone();
        async move { crate::support::json(s.get_as(&url, &t).await).await }
    };
    assert_eq!(ids(&q("rule=break_glass").await), ["user-b", "user-a"]);
    assert_eq!(ids(&q("severity=critical").await).len(), 1);
    assert_eq!(ids(&q("subject=user-a").await), ["user-a"]);
    assert_eq!(
        ids(&q("since=2026-01-11T00:00:00Z&until=2026-01-12T00:00:00Z").await),
        ["user-a"]
    );
    // Paged newest first.
    let first = q("limit=3").await;
    assert_eq!(ids(&first).len(), 3);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = q(&format!("limit=3&cursor={}", urlencode(&cursor))).await;
    assert_eq!(ids(&second), ["203.0.113.9"]);
    assert!(second["next_cursor"].is_null());
    for bad in ["rule=nope", "severity=low", "cursor=xyz", "since=yesterday"] {
        let b = q(bad).await;
        assert_eq!(b["code"], "validation_error", "{bad}: {b}");
    }

    let mut b = Browser::new(&s);
    b.sign_in("audrey", PW).await;
    let (status, html) = b.get("/admin/security?rule=break_glass").await;
    assert_eq!(status, 200);
    assert!(html.contains("user-a") && html.contains("user-b") && !html.contains("203.0.113.9"));
    assert!(html.contains("/admin/security.csv?rule=break_glass"));
    let (status, html) = b.get("/admin/security?since=never").await;
    assert_eq!(status, 200);
    assert!(html.contains("RFC 3339"));
    let (status, csv) = b.get("/admin/security.csv?rule=break_glass").await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "id,at,rule,severity,subject,detail");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].contains(",break_glass,high,user-b,"));
    let (_, csv) = b.get("/admin/security.csv?severity=critical").await;
    assert!(csv.contains("'=cmd"), "a formula is defused: {csv}");
    // Exports and reads are audited; a nurse gets neither.
    let exports = custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            action: Some("export".into()),
            ..Default::default()
        },
        10,
        true,
    )
    .await
    .unwrap();
    assert_eq!(exports.len(), 2);
    assert!(
        exports
            .iter()
            .all(|e| e.resource_type.as_deref() == Some("security_events"))
    );
    s.user("nurse", "nurse", PW).await;
    let mut n = Browser::new(&s);
    n.sign_in("nurse", PW).await;
    assert_eq!(n.get("/admin/security.csv").await.0, 403);
}
both_backends!(security_events_are_filtered_and_exported);
