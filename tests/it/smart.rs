//! The SMART on FHIR app and the PRECISE-HBR score, end to end against the in-process
//! authorization + FHIR server of `smart_fixture`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

use crate::both_backends;
use crate::smart_fixture::{self, Fixture};
use crate::support::{Backend, Options, TestServer, json};

const PW: &str = "Correct-Horse-9!";
const EHR: &str = "https://ehr.example.org";

/// A browser with a cookie jar that records every `Set-Cookie` line.
struct Jar {
    cookies: HashMap<String, String>,
    set: Vec<String>,
}

impl Jar {
    fn new() -> Self {
        Self {
            cookies: HashMap::new(),
            set: Vec::new(),
        }
    }

    fn keep(&mut self, res: &reqwest::Response) {
        for v in res.headers().get_all(SET_COOKIE) {
            let text = v.to_str().unwrap().to_owned();
            let (pair, _) = text.split_once(';').unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            if val.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), val.to_owned());
            }
            self.set.push(text);
        }
    }

    fn header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, s: &TestServer, url: &str) -> reqwest::Response {
        let full = if url.starts_with("http") {
            url.to_owned()
        } else {
            s.url(url)
        };
        let res = s
            .client
            .get(full)
            .header(COOKIE, self.header())
            .send()
            .await
            .unwrap();
        self.keep(&res);
        res
    }

    async fn post(
        &mut self,
        s: &TestServer,
        path: &str,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        let res = s
            .client
            .post(s.url(path))
            .header(COOKIE, self.header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.keep(&res);
        res
    }

    async fn sign_in(
        &mut self,
        s: &TestServer,
        username: &str,
        next: Option<&str>,
    ) -> reqwest::Response {
        let page = match next {
            Some(n) => format!("/login?next={}", urlencode(n)),
            None => "/login".into(),
        };
        let html = self.get(s, &page).await.text().await.unwrap();
        let csrf = field(&html, "csrf");
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("username", username),
            ("password", PW),
        ];
        let next_field = next.map(str::to_owned);
        if let Some(n) = &next_field {
            assert_eq!(field(&html, "next"), *n, "the form carries next");
            form.push(("next", n));
        }
        let res = self.post(s, "/login", &form).await;
        assert_eq!(res.status(), if next.is_some() { 200 } else { 303 });
        res
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The attribute value that follows `marker` in the page, unescaped.
fn attribute_after(html: &str, marker: &str) -> String {
    html.split(marker)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("nothing after {marker}"))
        .replace("&#x2f;", "/")
        .replace("&#x3d;", "=")
        .replace("&#x3f;", "?")
        .replace("&amp;", "&")
        .replace("&#38;", "&")
        .replace("&#61;", "=")
        .replace("&#47;", "/")
}

/// The value of a form field.
fn field(html: &str, name: &str) -> String {
    attribute_after(html, &format!("name=\"{name}\" value=\""))
}

/// The `href` of the link with this id.
fn field_href(html: &str, id: &str) -> String {
    attribute_after(html, &format!("id=\"{id}\" href=\""))
}

fn location(res: &reqwest::Response) -> String {
    res.headers()
        .get(LOCATION)
        .unwrap_or_else(|| panic!("no Location ({})", res.status()))
        .to_str()
        .unwrap()
        .to_owned()
}

async fn server(backend: Backend, fx: &Fixture, extra: Vec<(&'static str, String)>) -> TestServer {
    let mut sets = vec![
        (
            "smart.allowed_issuers",
            format!("{0}/fhir,{0}/fhir2", fx.base),
        ),
        ("smart.timeout", "1s".to_owned()),
        ("smart.retry_backoff", "10ms".to_owned()),
        ("smart.frame_ancestors", EHR.to_owned()),
        ("smart.max_response", "200KiB".to_owned()),
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
    // A fixed calculation date: the fixture's ages and 30-day windows depend on it.
    s.clock.set(time::macros::datetime!(2026-11-23 12:00 UTC));
    s
}

/// Signs in a doctor and runs a launch through the callback; answers the jar holding the
/// context cookie and the `/smart/app` response.
async fn launch(s: &TestServer, fx: &Fixture, jar: &mut Jar, query: &str) -> reqwest::Response {
    let res = jar.get(s, &format!("/smart/launch?{query}")).await;
    assert_eq!(res.status(), 303, "launch");
    let authorize = location(&res);
    assert!(
        authorize.starts_with(&format!("{}/auth/authorize?", fx.base)),
        "{authorize}"
    );
    let res = s.client.get(&authorize).send().await.unwrap();
    let callback = location(&res);
    assert!(
        callback.starts_with(&s.url("/smart/callback?")),
        "{callback}"
    );
    let res = jar.get(s, &callback).await;
    if res.status() != 303 {
        return res;
    }
    assert_eq!(location(&res), "/smart/app");
    jar.get(s, "/smart/app").await
}

async fn doctor(s: &TestServer) -> Jar {
    s.user("doc", "doctor", PW).await;
    let mut jar = Jar::new();
    jar.sign_in(s, "doc", None).await;
    jar
}

both_backends!(score_api_follows_the_contract);
async fn score_api_follows_the_contract(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("doc", "doctor", PW).await;
    s.user("aud", "auditor", PW).await;
    let doc = s.login("doc", PW).await;
    let auditor = s.login("aud", PW).await;
    let body = json!({"age": 77.77, "hemoglobin": 11.2, "egfr": 45, "wbc": 9.1,
        "prior_bleeding": true, "oral_anticoagulation": true, "arc_hbr": []});
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/precise-hbr/score",
            &doc,
            Some(body.clone()),
        )
        .await;
    assert_eq!(res.status(), 200);
    let r = json(res).await;
    // 2 + 11.9425 + 9.5 + 3.025 + 4.88 + 7 + 5 = 43.35 → 43
    assert_eq!(r["score"], 43);
    assert_eq!(r["category"], "very_hbr");
    assert_eq!(r["complete"], true);
    assert_eq!(r["components"].as_array().unwrap().len(), 7);
    assert!(r["estimated_risk_pct"].as_f64().unwrap() > 20.0);

    // Missing inputs: a lower bound, no category; creatinine derives eGFR.
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/precise-hbr/score",
            &doc,
            Some(json!({"age": 70, "creatinine": 1.2, "sex": "male", "hemoglobin": null})),
        )
        .await;
    let r = json(res).await;
    assert_eq!(r["complete"], false);
    assert_eq!(r["category"], serde_json::Value::Null);
    assert_eq!(r["missing"], json!(["hemoglobin", "wbc"]));

    // Out of range and unknown elements: 422 naming the fields.
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/precise-hbr/score",
            &doc,
            Some(json!({"age": 130, "hemoglobin": 30, "arc_hbr": ["stroke"]})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let text = res.text().await.unwrap();
    for f in ["age", "hemoglobin", "arc_hbr[0]"] {
        assert!(text.contains(&format!("\"{f}\"")), "{f}: {text}");
    }

    // An auditor has no records:read.
    let res = s
        .send_as(
            reqwest::Method::POST,
            "/api/v1/precise-hbr/score",
            &auditor,
            Some(body),
        )
        .await;
    assert_eq!(res.status(), 403);

    // Audited as a calculation, without the values.
    let events = json(
        s.get_as(
            "/api/v1/audit/events?action=calculate",
            &s.login("aud", PW).await,
        )
        .await,
    )
    .await;
    let items = events["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{events}");
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains("77.77"), "{all}");
}

both_backends!(ehr_launch_end_to_end);
async fn ehr_launch_end_to_end(backend: Backend) {
    let fx = smart_fixture::start().await;
    let s = server(backend, &fx, vec![]).await;
    let mut jar = doctor(&s).await;

    // Launch: the authorization request carries PKCE S256, state, aud and the scopes.
    let res = jar
        .get(
            &s,
            &format!(
                "/smart/launch?iss={}/fhir&launch=p-high",
                urlencode(&fx.base)
            ),
        )
        .await;
    assert_eq!(res.status(), 303);
    let binding = jar.set.last().unwrap().clone();
    assert!(binding.starts_with("custodian_smart_launch="), "{binding}");
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=None",
        "Partitioned",
        "Path=/",
    ] {
        assert!(binding.contains(attr), "{attr}: {binding}");
    }
    let authorize = location(&res);
    let q: HashMap<String, String> = url::Url::parse(&authorize)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["aud"], format!("{}/fhir", fx.base));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert_eq!(q["launch"], "p-high");
    assert!(q["state"].len() >= 32);
    assert!(
        q["scope"].contains("patient/Observation.rs"),
        "{}",
        q["scope"]
    );
    assert!(
        !q["scope"].contains("launch/patient"),
        "EHR launch: no launch/patient"
    );
    assert_eq!(q["redirect_uri"], s.url("/smart/callback"));

    // Authorize → callback → app.
    let res = s.client.get(&authorize).send().await.unwrap();
    let callback = location(&res);
    let res = jar.get(&s, &callback).await;
    assert_eq!(res.status(), 303);
    assert_eq!(location(&res), "/smart/app");
    assert!(jar.cookies.contains_key("custodian_smart"));
    assert!(
        !jar.cookies.contains_key("custodian_smart_launch"),
        "binding cleared"
    );
    let res = jar.get(&s, "/smart/app").await;
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains(&format!("frame-ancestors {EHR}")), "{csp}");
    assert!(!csp.contains("unsafe-inline"));
    assert!(res.headers().get("x-frame-options").is_none());
    let html = res.text().await.unwrap();
    assert!(html.contains("Protected health information"), "banner");
    assert!(html.contains("Walter Testpatient"));
    assert!(html.contains("<span id=\"score\">43</span>"), "{html}");
    assert!(html.contains("Very high bleeding risk"));
    // Sources as recorded: the newest final hemoglobin (page 1), eGFR from page 2.
    assert!(
        html.contains("Observation/hb-new, 2026-11-01T08:00:00Z: 112 g/L"),
        "{html}"
    );
    assert!(html.contains("Observation/egfr-1"), "paging");
    assert!(html.contains("MedicationRequest/apixaban"));
    assert!(html.contains("Condition/gi-bleed"));
    assert!(!html.contains("hb-prelim"));
    assert!(
        html.contains("id=\"idle-warning\""),
        "session-timeout warning"
    );

    // Tokens are stored sealed, never in clear.
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT access_token, refresh_token FROM smart_contexts")
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert!(
        !row.0.contains("CANARY") && row.0.starts_with('v'),
        "{}",
        row.0
    );
    assert!(!row.1.unwrap().contains("CANARY"));

    // What-if: recomputed here, marked, audited without values.
    let csrf = field(&html, "csrf");
    let res = jar
        .post(
            &s,
            "/smart/app",
            &[
                ("csrf", &csrf),
                ("age", "78"),
                ("hemoglobin", "14.9"),
                ("egfr", "45"),
                ("wbc", "9.1"),
                ("sex", "male"),
                ("prior_bleeding", "1"),
                ("oral_anticoagulation", "1"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    // 43.405 − 9.5 + 0.25 = 34.155 → 34
    assert!(html.contains("<span id=\"score\">34</span>"), "{html}");
    assert!(html.contains("(override)"));
    assert!(html.contains("What-if"));
    // Without the CSRF token: refused.
    let res = jar.post(&s, "/smart/app", &[("hemoglobin", "5")]).await;
    assert_eq!(res.status(), 403);

    // The state works once.
    let res = jar.get(&s, &callback).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("launch_invalid"));

    // Audit: the FHIR read names the FHIR patient; the what-if names only the inputs.
    s.user("aud", "auditor", PW).await;
    let aud = s.login("aud", PW).await;
    let events = json(s.get_as("/api/v1/audit/events?limit=100", &aud).await).await;
    let items = events["items"].as_array().unwrap();
    assert!(items.iter().any(|e| e["action"] == "read"
        && e["resource_type"] == "fhir_patient"
        && e["resource_id"] == "p-high"
        && e["actor"] == "doc"));
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("14.9") && !text.contains("CANARY") && !text.contains("Walter"),
        "{text}"
    );
    let raw: Vec<(String,)> =
        sqlx::query_as("SELECT context FROM audit_events WHERE action = 'calculate'")
            .fetch_all(s.state.db().reader())
            .await
            .unwrap();
    assert!(raw.iter().any(|(c,)| c.contains("hemoglobin")), "{raw:?}");
    assert!(raw.iter().all(|(c,)| !c.contains("14.9")), "{raw:?}");

    // Sign-out deletes the tokens; the app then asks for a new launch.
    let admin_html = jar.get(&s, "/admin").await.text().await.unwrap();
    let csrf = field(&admin_html, "csrf");
    let res = jar.post(&s, "/logout", &[("csrf", &csrf)]).await;
    assert_eq!(res.status(), 303);
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM smart_contexts")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(n.0, 0);
    let res = jar.get(&s, "/smart/app").await;
    assert_eq!(res.status(), 401);
}

both_backends!(launch_guards);
async fn launch_guards(backend: Backend) {
    let fx = smart_fixture::start().await;
    let s = server(backend, &fx, vec![]).await;

    // Not allow-listed: 400 before any outbound request (no SSRF, no open redirect).
    let before = fx.requests.load(Ordering::SeqCst);
    for iss in [
        format!("{}/evil", fx.base),
        "http://169.254.169.254/latest".to_owned(),
        String::new(),
    ] {
        let res = s
            .client
            .get(s.url(&format!("/smart/launch?iss={}&launch=x", urlencode(&iss))))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{iss}");
        assert!(res.text().await.unwrap().contains("issuer_not_allowed"));
    }
    assert_eq!(fx.requests.load(Ordering::SeqCst), before);

    // Signed out: to the sign-in page, which comes back to the launch (only to /smart/).
    let mut jar = Jar::new();
    let target = format!(
        "/smart/launch?iss={}&launch=p-high",
        urlencode(&format!("{}/fhir", fx.base))
    );
    let res = jar.get(&s, &target).await;
    assert_eq!(res.status(), 303);
    let to = location(&res);
    assert!(to.starts_with("/login?next="), "{to}");
    s.user("doc", "doctor", PW).await;
    let next = url::Url::parse(&format!("http://x{to}"))
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "next")
        .unwrap()
        .1
        .into_owned();
    let res = jar.sign_in(&s, "doc", Some(&next)).await;
    // A page that moves on to the launch by itself (not a redirect: see `signed_in`).
    let page = res.text().await.unwrap();
    assert!(page.contains("http-equiv=\"refresh\""), "{page}");
    assert_eq!(field_href(&page, "continue"), next);
    // The sign-in of a launch may be framed by the EHR: its cookies cross sites.
    let session_cookie = jar
        .set
        .iter()
        .rev()
        .find(|c| c.starts_with("custodian="))
        .unwrap();
    assert!(
        session_cookie.contains("SameSite=None") && session_cookie.contains("Partitioned"),
        "{session_cookie}"
    );
    // `next` elsewhere is ignored (no open redirect).
    let mut other = Jar::new();
    let html = other
        .get(&s, "/login?next=https://evil.example/")
        .await
        .text()
        .await
        .unwrap();
    assert!(!html.contains("evil.example"));

    // A callback with an unknown state, or from another browser (no binding cookie).
    let res = jar.get(&s, "/smart/callback?code=c&state=forged").await;
    assert_eq!(res.status(), 400);
    let res = jar.get(&s, &next).await;
    let authorize = location(&res);
    let res = s.client.get(&authorize).send().await.unwrap();
    let callback = location(&res);
    let mut stranger = Jar::new();
    stranger.cookies = jar.cookies.clone();
    stranger.cookies.remove("custodian_smart_launch");
    let res = stranger.get(&s, &callback).await;
    assert_eq!(res.status(), 400);
    // ... and that state is spent: the right browser cannot use it after.
    let res = jar.get(&s, &callback).await;
    assert_eq!(res.status(), 400);

    // The EHR says no.
    let res = jar.get(&s, &next).await;
    let q: HashMap<String, String> = url::Url::parse(&location(&res))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let res = jar
        .get(
            &s,
            &format!("/smart/callback?error=access_denied&state={}", q["state"]),
        )
        .await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("launch_denied"));

    // PKCE: a verifier that does not match the challenge is refused by the token endpoint.
    *fx.corrupt_challenge.lock().unwrap() = true;
    let res = launch(&s, &fx, &mut jar, &next["/smart/launch?".len()..]).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("token_refused"));
    *fx.corrupt_challenge.lock().unwrap() = false;

    // An auditor (no records:read) cannot launch.
    s.user("aud", "auditor", PW).await;
    let mut aj = Jar::new();
    aj.sign_in(&s, "aud", None).await;
    let res = aj.get(&s, &next).await;
    assert_eq!(res.status(), 403);
}

both_backends!(standalone_launch_discovers_from_the_capability_statement);
async fn standalone_launch_discovers_from_the_capability_statement(backend: Backend) {
    let fx = smart_fixture::start().await;
    let s = server(backend, &fx, vec![]).await;
    let mut jar = doctor(&s).await;
    let res = launch(
        &s,
        &fx,
        &mut jar,
        &format!("iss={}", urlencode(&format!("{}/fhir2", fx.base))),
    )
    .await;
    assert_eq!(res.status(), 200);
    let scope = fx.inner.lock().unwrap().last_authorize.clone().unwrap()["scope"].clone();
    assert!(scope.contains("launch/patient"), "{scope}");
    assert!(
        res.text()
            .await
            .unwrap()
            .contains("<span id=\"score\">43</span>")
    );
}

both_backends!(the_access_token_is_refreshed_by_the_clock);
async fn the_access_token_is_refreshed_by_the_clock(backend: Backend) {
    let fx = smart_fixture::start().await;
    *fx.expires_in.lock().unwrap() = 300;
    let s = server(backend, &fx, vec![]).await;
    let mut jar = doctor(&s).await;
    let q = format!(
        "iss={}&launch=p-high",
        urlencode(&format!("{}/fhir", fx.base))
    );
    assert_eq!(launch(&s, &fx, &mut jar, &q).await.status(), 200);
    assert_eq!(fx.refreshes.load(Ordering::SeqCst), 0);
    // Still valid for more than a minute: no refresh.
    s.clock.advance(std::time::Duration::from_secs(200));
    assert_eq!(jar.get(&s, "/smart/app").await.status(), 200);
    assert_eq!(fx.refreshes.load(Ordering::SeqCst), 0);
    // Within a minute of expiry by the clock: refreshed, and the page still works
    // (the fixture revoked the old access token).
    s.clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(jar.get(&s, "/smart/app").await.status(), 200);
    assert_eq!(fx.refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(jar.get(&s, "/smart/app").await.status(), 200);
    assert_eq!(fx.refreshes.load(Ordering::SeqCst), 1);
    // The Custodian session's idle timeout ends the app too, and its tokens are deleted.
    s.clock.advance(std::time::Duration::from_secs(3600));
    assert_eq!(jar.get(&s, "/smart/app").await.status(), 401);
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM smart_contexts")
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(n.0, 0);
}

both_backends!(fhir_failures_give_clear_answers);
async fn fhir_failures_give_clear_answers(backend: Backend) {
    let fx = smart_fixture::start().await;
    let s = server(backend, &fx, vec![]).await;
    let mut jar = doctor(&s).await;
    let iss = urlencode(&format!("{}/fhir", fx.base));
    for (patient, status, code) in [
        ("slow", 503, "fhir_unavailable"),
        ("broken", 503, "fhir_unavailable"),
        ("forbidden", 403, "fhir_forbidden"),
        ("gone", 404, "not_found"),
        ("unauth", 401, "smart_relaunch_required"),
        ("huge", 502, "fhir_bad_response"),
    ] {
        let res = launch(&s, &fx, &mut jar, &format!("iss={iss}&launch={patient}")).await;
        assert_eq!(res.status(), status, "{patient}");
        let html = res.text().await.unwrap();
        assert!(html.contains(code), "{patient}: {html}");
        assert!(!html.contains("CANARY"));
    }
    // A 503 is retried (GETs only) and then succeeds.
    let res = launch(&s, &fx, &mut jar, &format!("iss={iss}&launch=flaky")).await;
    assert_eq!(res.status(), 200);

    // Malformed data and unknown units: the page still renders, incomplete, with notes.
    let res = launch(&s, &fx, &mut jar, &format!("iss={iss}&launch=p-missing")).await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(html.contains("Incomplete"), "{html}");
    assert!(html.contains("furlongs"));
    assert!(html.contains("Observation/broken could not be read"));
    assert!(html.contains("outside the possible range"));
    assert!(html.contains("id=\"missing\""));
    // Medication statements are read (the fixture grants patient/*.rs): the active one
    // counts, the completed one does not.
    assert!(html.contains("MedicationStatement/ibuprofen-otc"), "{html}");
    assert!(!html.contains("warfarin-old"));
}

both_backends!(calculator_page_from_the_admin_gui);
async fn calculator_page_from_the_admin_gui(backend: Backend) {
    // The built-in app off: no issuer at all is allowed.
    let s = TestServer::start_with(
        backend,
        crate::support::Options {
            sets: vec![("oauth.builtin_app", "false".into())],
            ..Default::default()
        },
    )
    .await;
    let mut jar = doctor(&s).await;
    let admin = jar.get(&s, "/admin").await.text().await.unwrap();
    assert!(admin.contains("href=\"/smart/calculator\""));
    let res = jar.get(&s, "/smart/calculator").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    let html = res.text().await.unwrap();
    let csrf = field(&html, "csrf");
    let res = jar
        .post(
            &s,
            "/smart/calculator",
            &[
                ("csrf", &csrf),
                ("age", "52"),
                ("hemoglobin", "15"),
                ("egfr", "100"),
                ("wbc", "3"),
                ("prior_bleeding", "1"),
                ("oral_anticoagulation", "1"),
                ("arc_hbr", "active_cancer"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(html.contains("<span id=\"score\">23</span>"), "{html}");
    assert!(html.contains("High bleeding risk"));
    let res = jar
        .post(
            &s,
            "/smart/calculator",
            &[("csrf", &csrf), ("hemoglobin", "40")],
        )
        .await;
    assert_eq!(res.status(), 422);
    // Without the app configured, a launch says so.
    let res = jar
        .get(&s, "/smart/launch?iss=https://ehr.example/fhir")
        .await;
    assert_eq!(res.status(), 404);
    assert!(res.text().await.unwrap().contains("smart_disabled"));
}

/// The real binary, a whole launch and score with debug logging: no token, code, state or
/// patient data reaches the log.
#[tokio::test]
async fn tokens_and_phi_never_reach_the_log() {
    use crate::cli::{create_user, serve};
    let fx = smart_fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let issuers = format!("{}/fhir", fx.base);
    let env = [
        ("CUSTODIAN_DATA_DIR", data.as_str()),
        ("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024"),
        ("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1"),
        ("CUSTODIAN_LOGGING__LEVEL", "debug"),
        ("CUSTODIAN_SMART__ALLOWED_ISSUERS", issuers.as_str()),
    ];
    create_user(dir.path(), &env, "doc", "doctor", PW);
    let mut served = serve(dir.path(), &env);
    let base = format!("http://{}", served.addr);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut cookies: HashMap<String, String> = HashMap::new();
    let keep = |res: &reqwest::Response, cookies: &mut HashMap<String, String>| {
        for v in res.headers().get_all(SET_COOKIE) {
            let (pair, _) = v.to_str().unwrap().split_once(';').unwrap();
            let (k, val) = pair.split_once('=').unwrap();
            cookies.insert(k.to_owned(), val.to_owned());
        }
    };
    let header = |cookies: &HashMap<String, String>| {
        cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let res = client.get(format!("{base}/login")).send().await.unwrap();
    keep(&res, &mut cookies);
    let csrf = field(&res.text().await.unwrap(), "csrf");
    let res = client
        .post(format!("{base}/login"))
        .header(COOKIE, header(&cookies))
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", "doc"),
            ("password", PW),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    keep(&res, &mut cookies);
    let res = client
        .get(format!(
            "{base}/smart/launch?iss={}&launch=p-high",
            urlencode(&issuers)
        ))
        .header(COOKIE, header(&cookies))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    keep(&res, &mut cookies);
    let res = client.get(location(&res)).send().await.unwrap();
    let callback = location(&res);
    let res = client
        .get(&callback)
        .header(COOKIE, header(&cookies))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    keep(&res, &mut cookies);
    let res = client
        .get(format!("{base}/smart/app"))
        .header(COOKIE, header(&cookies))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("Walter"));
    let state = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    served.child.kill().unwrap();
    let _ = served.child.wait();
    let lines: Vec<String> = served
        .early
        .iter()
        .cloned()
        .chain(served.lines.iter())
        .collect();
    assert!(lines.iter().any(|l| l.contains("/smart/app")), "{lines:?}");
    for l in &lines {
        for secret in [
            "CANARY",
            "Walter",
            "Testpatient",
            "1948-01-15",
            "code-",
            state.as_str(),
        ] {
            assert!(!l.contains(secret), "`{secret}` reached the log: {l}");
        }
    }
}

both_backends!(confidential_client_and_the_page_cap);
async fn confidential_client_and_the_page_cap(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let fx = smart_fixture::start().await;
    *fx.client_secret.lock().unwrap() = Some("SECRET-CANARY".into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client_secret");
    std::fs::write(&file, "SECRET-CANARY\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = server(
        backend,
        &fx,
        vec![
            ("smart.client_secret_file", file.display().to_string()),
            ("smart.max_pages", "1".to_owned()),
        ],
    )
    .await;
    let mut jar = doctor(&s).await;
    let q = format!(
        "iss={}&launch=p-high",
        urlencode(&format!("{}/fhir", fx.base))
    );
    let res = launch(&s, &fx, &mut jar, &q).await;
    // The token endpoint accepted HTTP Basic with the secret from the file.
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    // One page of Observations only: eGFR (page 2) is not read, and the page says why.
    assert!(
        html.contains("Only the first pages of Observation were read"),
        "{html}"
    );
    assert!(html.contains("Incomplete"));
    assert!(!html.contains("SECRET-CANARY"));
    // A public client's request is refused by this (confidential) registration.
    *fx.client_secret.lock().unwrap() = Some("another".into());
    let before = fx.token_requests.load(Ordering::SeqCst);
    let res = launch(&s, &fx, &mut jar, &q).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("token_refused"));
    assert_eq!(fx.token_requests.load(Ordering::SeqCst), before + 1);
}
