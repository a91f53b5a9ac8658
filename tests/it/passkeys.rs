//! Passkeys (issue 24): registration, second factor after the password, sign-in with a
//! passkey alone, and the attacks — a replayed challenge, the wrong origin, the wrong
//! relying-party id, no user verification, a cloned authenticator whose counter goes
//! back, a removed credential, an expired challenge, another session's challenge; the
//! lockout that stops passwords but not passkeys; `mfa.phishing_resistant_roles`; an
//! administrator's reset. Every ceremony runs a real WebAuthn exchange with the soft
//! authenticator of the test kit (`softkey.rs`) against the server's `webauthn-rs`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::softkey::SoftKey;
use crate::support::{Backend, Options, TestServer, json};

const PW: &str = "Correct-Horse-9!";
/// Dev's relying party: `localhost`, any port.
const ORIGIN: &str = "http://localhost:8443";

async fn start(backend: Backend, extra: Vec<(&'static str, String)>) -> TestServer {
    let mut sets = vec![("rate_limit.enabled", "false".to_owned())];
    sets.extend(extra);
    TestServer::start_with(
        backend,
        Options {
            sets,
            ..Options::default()
        },
    )
    .await
}

/// Registers a passkey for the session `token`; returns the 201 body.
pub(crate) async fn register(s: &TestServer, token: &str, key: &mut SoftKey, name: &str) -> Value {
    let res = s
        .send_as(Method::POST, "/api/v1/auth/passkeys/register", token, None)
        .await;
    assert_eq!(res.status(), 200);
    let c = json(res).await;
    assert_eq!(
        c["publicKey"]["authenticatorSelection"]["residentKey"],
        "required"
    );
    assert_eq!(
        c["publicKey"]["authenticatorSelection"]["userVerification"],
        "required"
    );
    let answer = key.register(&c);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/passkeys",
            token,
            Some(json!({"ceremony": c["ceremony"], "name": name, "credential": answer})),
        )
        .await;
    assert_eq!(res.status(), 201);
    json(res).await
}

/// Password sign-in up to `mfa_required`: the problem, with its passkey challenge.
async fn password_step(s: &TestServer, username: &str) -> Value {
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": username, "password": PW}),
        )
        .await;
    assert_eq!(res.status(), 401);
    let p = json(res).await;
    assert_eq!(p["code"], "mfa_required", "{p}");
    p
}

async fn second_factor(
    s: &TestServer,
    username: &str,
    challenge: &Value,
    answer: Value,
) -> reqwest::Response {
    s.post(
        "/api/v1/auth/login",
        None,
        json!({"username": username, "password": PW,
               "passkey": {"ceremony": challenge["ceremony"], "credential": answer}}),
    )
    .await
}

async fn challenge(s: &TestServer) -> Value {
    let res = s
        .post("/api/v1/auth/passkey/challenge", None, json!({}))
        .await;
    assert_eq!(res.status(), 200);
    let c = json(res).await;
    assert!(
        c["publicKey"]["allowCredentials"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    assert_eq!(c["publicKey"]["userVerification"], "required");
    assert!(c.get("mediation").is_none() && c["publicKey"].get("mediation").is_none());
    c
}

async fn passwordless(s: &TestServer, c: &Value, answer: Value) -> reqwest::Response {
    s.post(
        "/api/v1/auth/passkey/login",
        None,
        json!({"ceremony": c["ceremony"], "credential": answer}),
    )
    .await
}

async fn code(res: reqwest::Response) -> String {
    let status = res.status();
    let v = json(res).await;
    format!("{} {}", status.as_u16(), v["code"].as_str().unwrap_or(""))
}

async fn every_ceremony(backend: Backend) {
    let s = start(backend, vec![]).await;
    s.user("ada", "doctor", PW).await;
    let token = s.login("ada", PW).await;
    let mut key = SoftKey::new(ORIGIN);

    // Registration: a discoverable, user-verified credential; recovery codes, since the
    // account had no second factor.
    let added = register(&s, &token, &mut key, "Laptop").await;
    assert_eq!(added["passkey"]["name"], "Laptop");
    assert_eq!(added["recovery_codes"].as_array().unwrap().len(), 10);
    let list = json(s.get_as("/api/v1/auth/passkeys", &token).await).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["items"][0]["last_used_at"].is_null());
    assert!(list["items"][0].get("credential").is_none());
    // The same authenticator again: the challenge excludes it.
    let c = json(
        s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &token, None)
            .await,
    )
    .await;
    assert!(
        key.try_register(&c).is_err(),
        "the registered credential is excluded"
    );

    // Second factor: the password alone is not enough, and the answer carries a
    // challenge for this account's passkeys.
    let p = password_step(&s, "ada").await;
    let methods: Vec<&str> = p["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(methods, ["recovery_code", "passkey"]);
    let allowed = p["passkey"]["publicKey"]["allowCredentials"]
        .as_array()
        .unwrap();
    assert_eq!(allowed.len(), 1);
    let answer = key.sign(&p["passkey"]);
    let res = second_factor(&s, "ada", &p["passkey"], answer.clone()).await;
    assert_eq!(res.status(), 200);
    let session = json(res).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.get_as("/api/v1/auth/me", &session).await.status(), 200);
    // The same answer again: the challenge is spent.
    assert_eq!(
        code(second_factor(&s, "ada", &p["passkey"], answer).await).await,
        "401 invalid_passkey"
    );

    // Passwordless: no username, the passkey names its user.
    let c = challenge(&s).await;
    let answer = key.sign(&c);
    let res = passwordless(&s, &c, answer.clone()).await;
    assert_eq!(res.status(), 200);
    let v = json(res).await;
    assert_eq!(v["user"]["username"], "ada");
    assert_eq!(
        s.get_as("/api/v1/auth/me", v["access_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    // Replayed: refused.
    assert_eq!(
        code(passwordless(&s, &c, answer).await).await,
        "401 invalid_passkey"
    );
    let list = json(s.get_as("/api/v1/auth/passkeys", &token).await).await;
    assert!(list["items"][0]["last_used_at"].is_string());

    // A recovery code still works, once.
    let rc = added["recovery_codes"][0].as_str().unwrap();
    let with_code = |c: &str| json!({"username": "ada", "password": PW, "totp_code": c});
    assert_eq!(
        s.post("/api/v1/auth/login", None, with_code(rc))
            .await
            .status(),
        200
    );
    assert_eq!(
        code(s.post("/api/v1/auth/login", None, with_code(rc)).await).await,
        "401 invalid_totp"
    );

    // Every ceremony is in the audit trail, and the login history says how.
    s.user("root", "admin", PW).await;
    let admin = s.login("root", PW).await;
    let events = json(
        s.get_as("/api/v1/audit/events?action=create&limit=200", &admin)
            .await,
    )
    .await;
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["resource_type"] == "passkey"),
        "{events}"
    );
    let logins = json(
        s.get_as("/api/v1/audit/events?action=login&limit=200", &admin)
            .await,
    )
    .await;
    let methods: Vec<&str> = logins["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["context"]["method"].as_str())
        .collect();
    assert!(
        methods.contains(&"passkey") && methods.contains(&"password+passkey"),
        "{methods:?}"
    );
}
both_backends!(every_ceremony);

async fn forged_and_replayed_answers_are_refused(backend: Backend) {
    // Each refused answer counts like a wrong password: the lock is tested elsewhere.
    let s = start(backend, vec![("lockout.max_failures", "100".into())]).await;
    s.user("bo", "nurse", PW).await;
    let token = s.login("bo", PW).await;
    let mut key = SoftKey::new(ORIGIN);
    register(&s, &token, &mut key, "Phone").await;

    type Tamper = Box<dyn Fn(&mut SoftKey)>;
    let attempts: Vec<(&str, Tamper)> = vec![
        (
            "wrong origin",
            Box::new(|k: &mut SoftKey| {
                k.wrong_origin("http://evil.example:8443");
            }),
        ),
        (
            "wrong rp id",
            Box::new(|k: &mut SoftKey| {
                k.wrong_rp_id("evil.example");
            }),
        ),
        (
            "no user verification",
            Box::new(|k: &mut SoftKey| {
                k.without_uv();
            }),
        ),
    ];
    for (what, tamper) in &attempts {
        // As the second factor ...
        let p = password_step(&s, "bo").await;
        tamper(&mut key);
        let answer = key.sign(&p["passkey"]);
        assert_eq!(
            code(second_factor(&s, "bo", &p["passkey"], answer).await).await,
            "401 invalid_passkey",
            "{what}"
        );
        // ... and alone.
        let c = challenge(&s).await;
        tamper(&mut key);
        let answer = key.sign(&c);
        assert_eq!(
            code(passwordless(&s, &c, answer).await).await,
            "401 invalid_passkey",
            "{what}"
        );
    }

    // A cloned authenticator: a copy taken now falls behind the original's counter.
    let mut clone = key.clone();
    let c = challenge(&s).await;
    assert_eq!(passwordless(&s, &c, key.sign(&c)).await.status(), 200);
    let c = challenge(&s).await;
    assert_eq!(passwordless(&s, &c, key.sign(&c)).await.status(), 200);
    let c = challenge(&s).await;
    assert_eq!(
        code(passwordless(&s, &c, clone.sign(&c)).await).await,
        "401 invalid_passkey",
        "counter went back"
    );

    // A clone answering a second-factor challenge that was issued before the original
    // moved on: the counter is checked against the stored one, not the challenge's.
    let mut clone = key.clone();
    let p = password_step(&s, "bo").await;
    let c = challenge(&s).await;
    assert_eq!(passwordless(&s, &c, key.sign(&c)).await.status(), 200);
    assert_eq!(
        code(second_factor(&s, "bo", &p["passkey"], clone.sign(&p["passkey"])).await).await,
        "401 invalid_passkey",
        "stale counter on an open challenge"
    );

    // A challenge answered after it expired.
    let c = challenge(&s).await;
    let answer = key.sign(&c);
    s.clock.advance(Duration::from_secs(6 * 60));
    assert_eq!(
        code(passwordless(&s, &c, answer).await).await,
        "401 invalid_passkey",
        "expired"
    );

    // A registration challenge of one session answered in another.
    let token = {
        // A fresh session (the first is past the re-authentication window now).
        let p = password_step(&s, "bo").await;
        let res = second_factor(&s, "bo", &p["passkey"], key.sign(&p["passkey"])).await;
        assert_eq!(res.status(), 200);
        json(res).await["access_token"].as_str().unwrap().to_owned()
    };
    let p = password_step(&s, "bo").await;
    let res = second_factor(&s, "bo", &p["passkey"], key.sign(&p["passkey"])).await;
    let second = json(res).await["access_token"].as_str().unwrap().to_owned();
    let c = json(
        s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &token, None)
            .await,
    )
    .await;
    let mut other_key = SoftKey::new(ORIGIN);
    let answer = other_key.register(&c);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/auth/passkeys",
            &second,
            Some(json!({"ceremony": c["ceremony"], "name": "Stolen", "credential": answer})),
        )
        .await;
    assert_eq!(
        code(res).await,
        "401 invalid_passkey",
        "another session's challenge"
    );
    // A second-factor challenge is not a sign-in challenge.
    let p = password_step(&s, "bo").await;
    assert_eq!(
        code(passwordless(&s, &p["passkey"], key.sign(&p["passkey"])).await).await,
        "401 invalid_passkey"
    );

    // A removed credential: removing needs a fresh sign-in.
    let list = json(s.get_as("/api/v1/auth/passkeys", &token).await).await;
    let id = list["items"][0]["id"].as_str().unwrap().to_owned();
    s.clock.advance(Duration::from_secs(10 * 60));
    let path = format!("/api/v1/auth/passkeys/{id}");
    assert_eq!(
        code(s.send_as(Method::DELETE, &path, &token, None).await).await,
        "403 reauthentication_required"
    );
    let res = s
        .send_as(
            Method::DELETE,
            &path,
            &token,
            Some(json!({"password": "wrong-password-1"})),
        )
        .await;
    assert_eq!(code(res).await, "401 invalid_credentials");
    let res = s
        .send_as(Method::DELETE, &path, &token, Some(json!({"password": PW})))
        .await;
    assert_eq!(res.status(), 204);
    let c = challenge(&s).await;
    assert_eq!(
        code(passwordless(&s, &c, key.sign(&c)).await).await,
        "401 invalid_passkey",
        "removed"
    );
    // Without a passkey (and TOTP) the password alone signs in again.
    assert_eq!(
        s.post(
            "/api/v1/auth/login",
            None,
            json!({"username": "bo", "password": PW})
        )
        .await
        .status(),
        200
    );

    // An API token cannot add or remove passkeys.
    let t = json(
        s.send_as(
            Method::POST,
            "/api/v1/tokens",
            &token,
            Some(json!({"name": "script"})),
        )
        .await,
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        code(
            s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &t, None)
                .await
        )
        .await,
        "403 session_required"
    );
}
both_backends!(forged_and_replayed_answers_are_refused);

/// An attacker who knows only the username locks the account with wrong passwords; its
/// owner still signs in with the passkey, and the lock still stops passwords.
async fn a_password_lockout_does_not_stop_a_passkey(backend: Backend) {
    let s = start(backend, vec![("lockout.max_failures", "3".into())]).await;
    s.user("cy", "doctor", PW).await;
    let token = s.login("cy", PW).await;
    let mut key = SoftKey::new(ORIGIN);
    register(&s, &token, &mut key, "Key").await;
    for _ in 0..4 {
        s.post(
            "/api/v1/auth/login",
            None,
            json!({"username": "cy", "password": "Wrong-Guess-000"}),
        )
        .await;
    }
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "cy", "password": PW}),
        )
        .await;
    assert_eq!(code(res).await, "423 account_locked");
    let c = challenge(&s).await;
    let res = passwordless(&s, &c, key.sign(&c)).await;
    assert_eq!(res.status(), 200);
    let session = json(res).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.get_as("/api/v1/auth/me", &session).await.status(), 200);
    // The passkey did not lift the lock on passwords.
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "cy", "password": PW}),
        )
        .await;
    assert_eq!(code(res).await, "423 account_locked");
}
both_backends!(a_password_lockout_does_not_stop_a_passkey);

/// `mfa.phishing_resistant_roles`: an administrator without a passkey may only enrol
/// one; afterwards only a session signed in with the passkey has the role's rights (a
/// recovery code lets them in to enrol again, no further).
async fn phishing_resistant_roles_need_a_passkey(backend: Backend) {
    let s = start(
        backend,
        vec![("mfa.phishing_resistant_roles", "admin".into())],
    )
    .await;
    s.user("root", "admin", PW).await;
    s.user("doc", "doctor", PW).await;
    let token = s.login("root", PW).await;
    assert_eq!(
        code(s.get_as("/api/v1/users", &token).await).await,
        "403 mfa_enrollment_required"
    );
    let me = json(s.get_as("/api/v1/auth/me", &token).await).await;
    assert_eq!(me["mfa_enrollment_required"], true);
    // Other roles are not affected.
    let doc = s.login("doc", PW).await;
    assert_eq!(s.get_as("/api/v1/patients", &doc).await.status(), 200);
    // No API token either.
    assert_eq!(
        code(
            s.send_as(
                Method::POST,
                "/api/v1/tokens",
                &token,
                Some(json!({"name": "x"}))
            )
            .await
        )
        .await,
        "403 mfa_enrollment_required"
    );
    // TOTP is not enough for this role.
    let (secret, codes) = crate::identity::enrol(&s, &token).await;
    assert_eq!(
        code(s.get_as("/api/v1/users", &token).await).await,
        "403 mfa_enrollment_required"
    );
    let mut key = SoftKey::new(ORIGIN);
    let added = register(&s, &token, &mut key, "Admin key").await;
    assert!(
        added.get("recovery_codes").is_none(),
        "TOTP gave codes already"
    );
    // The session that enrolled it proved the passkey: it may work now.
    assert_eq!(s.get_as("/api/v1/users", &token).await.status(), 200);

    // A phisher with the password and a TOTP code signs in, but only to a confined
    // session, which cannot add a passkey of its own either.
    s.clock.advance(Duration::from_secs(30));
    let totp = crate::identity::current_code(&s, &secret, 0);
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "root", "password": PW, "totp_code": totp}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let phished = json(res).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        code(s.get_as("/api/v1/users", &phished).await).await,
        "403 mfa_enrollment_required"
    );
    assert_eq!(
        code(
            s.send_as(
                Method::POST,
                "/api/v1/auth/passkeys/register",
                &phished,
                None
            )
            .await
        )
        .await,
        "403 forbidden"
    );
    // Nor remove the owner's passkeys (to enrol its own afterwards).
    let list = json(s.get_as("/api/v1/auth/passkeys", &phished).await).await;
    let id = list["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        code(
            s.send_as(
                Method::DELETE,
                &format!("/api/v1/auth/passkeys/{id}"),
                &phished,
                None
            )
            .await
        )
        .await,
        "403 forbidden"
    );
    assert_eq!(
        json(s.get_as("/api/v1/auth/passkeys", &token).await).await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A recovery code signs in, confined too, but may enrol a new passkey (a lost one).
    let res = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "root", "password": PW, "totp_code": codes[0]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let by_code = json(res).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        code(s.get_as("/api/v1/users", &by_code).await).await,
        "403 mfa_enrollment_required"
    );
    register(&s, &by_code, &mut SoftKey::new(ORIGIN), "Spare key").await;
    assert_eq!(s.get_as("/api/v1/users", &by_code).await.status(), 200);

    // The passkey as second factor, or alone: full rights.
    let p = password_step(&s, "root").await;
    let methods = p["methods"].to_string();
    assert!(
        methods.contains("totp") && methods.contains("passkey"),
        "{methods}"
    );
    let res = second_factor(&s, "root", &p["passkey"], key.sign(&p["passkey"])).await;
    let by_passkey = json(res).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.get_as("/api/v1/users", &by_passkey).await.status(), 200);
    let c = challenge(&s).await;
    let alone = json(passwordless(&s, &c, key.sign(&c)).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.get_as("/api/v1/users", &alone).await.status(), 200);
}
both_backends!(phishing_resistant_roles_need_a_passkey);

/// An administrator resets a user's authenticators: passkeys, TOTP and recovery codes
/// go, the user's sessions end, and the old passkey signs in no more.
async fn an_administrator_resets_authenticators(backend: Backend) {
    let s = start(backend, vec![]).await;
    s.user("root", "admin", PW).await;
    let id = s.user("dee", "nurse", PW).await;
    let admin = s.login("root", PW).await;
    let token = s.login("dee", PW).await;
    let mut key = SoftKey::new(ORIGIN);
    register(&s, &token, &mut key, "Laptop").await;
    register(&s, &token, &mut SoftKey::new(ORIGIN), "Phone").await;
    // At most ten, counted again when a registration finishes: two started at nine.
    for i in 0..7 {
        register(&s, &token, &mut SoftKey::new(ORIGIN), &format!("Key {i}")).await;
    }
    let start = || async {
        json(
            s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &token, None)
                .await,
        )
        .await
    };
    let (c1, c2) = (start().await, start().await);
    let finish = |c: Value| {
        let answer = SoftKey::new(ORIGIN).register(&c);
        let token = token.clone();
        let s = &s;
        async move {
            s.send_as(
                Method::POST,
                "/api/v1/auth/passkeys",
                &token,
                Some(json!({"ceremony": c["ceremony"], "name": "One more", "credential": answer})),
            )
            .await
        }
    };
    assert_eq!(finish(c1).await.status(), 201);
    assert_eq!(code(finish(c2).await).await, "409 conflict", "an eleventh");
    assert_eq!(
        code(
            s.send_as(Method::POST, "/api/v1/auth/passkeys/register", &token, None)
                .await
        )
        .await,
        "409 conflict"
    );
    let list = json(
        s.get_as(&format!("/api/v1/users/{id}/passkeys"), &admin)
            .await,
    )
    .await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 10);
    assert_eq!(names[..2], ["Laptop", "Phone"]);
    // A nurse may not look at anyone's.
    assert_eq!(
        code(
            s.get_as(&format!("/api/v1/users/{id}/passkeys"), &token)
                .await
        )
        .await,
        "403 forbidden"
    );
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/users/{id}/totp/reset"),
            &admin,
            None,
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        s.get_as("/api/v1/auth/me", &token).await.status(),
        401,
        "sessions ended"
    );
    let list = json(
        s.get_as(&format!("/api/v1/users/{id}/passkeys"), &admin)
            .await,
    )
    .await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let c = challenge(&s).await;
    assert_eq!(
        code(passwordless(&s, &c, key.sign(&c)).await).await,
        "401 invalid_passkey"
    );
    // The password alone signs in again (no second factor left).
    assert_eq!(
        s.post(
            "/api/v1/auth/login",
            None,
            json!({"username": "dee", "password": PW})
        )
        .await
        .status(),
        200
    );
    let events = json(
        s.get_as("/api/v1/audit/events?action=update&limit=200", &admin)
            .await,
    )
    .await;
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["context"]["change"] == "totp_reset"),
        "{events}"
    );
}
both_backends!(an_administrator_resets_authenticators);

/// Undoes the HTML escaping of an attribute value.
fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#60;", "<")
        .replace("&#62;", ">")
        .replace("&amp;", "&")
        .replace("&#38;", "&")
}

/// The pages carry every ceremony, with their CSRF tokens: adding a passkey on the
/// dashboard, signing in with it alone, the second step after the password, a forged
/// answer refused, and removing it.
async fn the_pages_carry_every_ceremony(backend: Backend) {
    use crate::web::{Browser, field};
    let s = start(backend, vec![]).await;
    s.user("eve", "nurse", PW).await;
    let mut b = Browser::new(&s);
    b.sign_in("eve", PW).await;
    let csrf = b.csrf().await;
    // Without the session's CSRF token, no challenge.
    let (status, _, _) = b
        .post("/admin/passkeys/challenge", &[("csrf", &"0".repeat(64))])
        .await;
    assert_eq!(status, 403);
    let (status, body, _) = b
        .post("/admin/passkeys/challenge", &[("csrf", &csrf)])
        .await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    let mut key = SoftKey::new(ORIGIN);
    let answer = key.register(&c).to_string();
    let ceremony = c["ceremony"].as_str().unwrap();
    let (status, html, _) = b
        .post(
            "/admin/passkeys",
            &[
                ("csrf", &csrf),
                ("ceremony", ceremony),
                ("name", "Desk key"),
                ("credential", &answer),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Passkey added") && html.contains("Desk key"),
        "{html}"
    );

    // The sign-in page: the passkey alone.
    let mut alone = Browser::new(&s);
    let (_, html) = alone.get("/login").await;
    assert!(html.contains("id=\"passkey-sign-in\""));
    let login_csrf = field(&html, "csrf");
    let c = challenge(&s).await;
    let answer = key.sign(&c).to_string();
    let ceremony = c["ceremony"].as_str().unwrap();
    let (status, _, location) = alone
        .post(
            "/login/passkey",
            &[
                ("csrf", &login_csrf),
                ("ceremony", ceremony),
                ("credential", &answer),
            ],
        )
        .await;
    assert_eq!((status, location.as_deref()), (303, Some("/")));
    assert!(alone.cookie("custodian").is_some());

    // A forged answer: the page says so, and nobody is signed in.
    let mut forged = Browser::new(&s);
    let (_, html) = forged.get("/login").await;
    let login_csrf = field(&html, "csrf");
    let c = challenge(&s).await;
    key.wrong_origin("http://evil.example:8443");
    let answer = key.sign(&c).to_string();
    let (status, html, _) = forged
        .post(
            "/login/passkey",
            &[
                ("csrf", &login_csrf),
                ("ceremony", c["ceremony"].as_str().unwrap()),
                ("credential", &answer),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert!(html.contains("not accepted"), "{html}");
    assert!(forged.cookie("custodian").is_none());

    // The password, then the passkey: the second step carries its challenge.
    let mut second = Browser::new(&s);
    let (_, html) = second.get("/login").await;
    let login_csrf = field(&html, "csrf");
    let (status, html, _) = second
        .post(
            "/login",
            &[("csrf", &login_csrf), ("username", "eve"), ("password", PW)],
        )
        .await;
    assert_eq!(status, 200);
    let raw = html
        .split("data-challenge=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a passkey challenge on the second step");
    let c: Value = serde_json::from_str(&unescape(raw)).unwrap();
    let login_csrf = field(&html, "csrf");
    let answer = key.sign(&c).to_string();
    let (status, _, location) = second
        .post(
            "/login",
            &[
                ("csrf", &login_csrf),
                ("username", "eve"),
                ("password", PW),
                ("passkey_ceremony", c["ceremony"].as_str().unwrap()),
                ("passkey_credential", &answer),
            ],
        )
        .await;
    assert_eq!((status, location.as_deref()), (303, Some("/")));

    // Removing it: the dashboard's button, within the re-authentication window.
    let c = challenge(&s).await;
    let token = json(passwordless(&s, &c, key.sign(&c)).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = json(s.get_as("/api/v1/auth/passkeys", &token).await).await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let csrf = second.csrf().await;
    let (status, html, _) = second
        .post(&format!("/admin/passkeys/{id}/remove"), &[("csrf", &csrf)])
        .await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Passkey removed") && !html.contains("Desk key"),
        "{html}"
    );
}
both_backends!(the_pages_carry_every_ceremony);
