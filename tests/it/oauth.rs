//! The SMART App Launch authorization server (issue 23): discovery, registered apps,
//! `/oauth/authorize` with sign-in, picker and consent, the token endpoint, scopes
//! enforced on every FHIR request (intersected with the role), EHR launch from a chart,
//! introspection, revocation, connected apps, the audit trail, and the attacks.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::fhir::fhir;
use crate::support::{Backend, Options, TestServer, json};
use crate::web::{Browser, field};

const PW: &str = "Correct-Horse-9!";
pub(crate) const CB: &str = "http://127.0.0.1:9/callback";
const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

pub(crate) fn verifier() -> String {
    let b: [u8; 32] = custodian::crypto::random_bytes().unwrap();
    custodian::crypto::hex(&b)
}

pub(crate) struct App {
    pub(crate) id: String,
    pub(crate) secret: Option<String>,
}

pub(crate) async fn register(s: &TestServer, admin: &str, body: Value) -> App {
    let res = s
        .send_as(Method::POST, "/api/v1/apps", admin, Some(body))
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let v = json(res).await;
    App {
        id: v["client_id"].as_str().unwrap().to_owned(),
        secret: v["client_secret"].as_str().map(str::to_owned),
    }
}

pub(crate) async fn patient(s: &TestServer, token: &str, given: &str, family: &str) -> String {
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            token,
            Some(json!({"given_name": given, "family_name": family, "birth_date": "1950-03-04", "ssn": "123-45-6789"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    json(res).await["id"].as_str().unwrap().to_owned()
}

pub(crate) async fn observation(
    s: &TestServer,
    token: &str,
    patient: &str,
    category: &str,
) -> String {
    let body = json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": LAB, "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2026-01-02",
        "valueQuantity": {"value": 12.5, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}
    });
    let (st, _, v) = fhir(
        s,
        Method::POST,
        "/fhir/Observation",
        Some(token),
        Some(body),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish()
}

/// The parameters of a good authorization request.
pub(crate) fn request<'a>(
    s: &'a TestServer,
    app: &'a str,
    scope: &'a str,
    challenge: &'a str,
) -> Vec<(&'static str, String)> {
    vec![
        ("response_type", "code".into()),
        ("client_id", app.into()),
        ("redirect_uri", CB.into()),
        ("scope", scope.into()),
        ("state", "st-123".into()),
        ("aud", s.url("/fhir")),
        ("code_challenge", challenge.into()),
        ("code_challenge_method", "S256".into()),
    ]
}

pub(crate) fn authorize_path(params: &[(&'static str, String)]) -> String {
    let p: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    format!("/oauth/authorize?{}", query(&p))
}

/// An HTML attribute's text as the browser reads it.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(end) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => out.push(c),
            None => out.push_str(&after[..=end]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn param(location: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(location).unwrap();
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Signs in, authorizes and consents (ticking what `keep` says, all when None, and
/// choosing `patient` in the picker when asked): the code.
pub(crate) async fn consent(
    b: &mut Browser<'_>,
    path: &str,
    patient: Option<&str>,
    keep: Option<&[&str]>,
) -> String {
    consent_page(b, path, patient, keep).await.0
}

/// [`consent`], answering the consent page too.
pub(crate) async fn consent_page(
    b: &mut Browser<'_>,
    path: &str,
    patient: Option<&str>,
    keep: Option<&[&str]>,
) -> (String, String) {
    let (st, html, loc) = b.get_full(path).await;
    assert_eq!(st, 200, "{html} {loc:?}");
    let csrf = field(&html, "csrf");
    let sealed = field(&html, "request");
    let scopes: Vec<String> = html
        .split("name=\"scope\" value=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(unescape)
        .collect();
    let mut form: Vec<(&str, String)> = vec![
        ("csrf", csrf),
        ("request", sealed),
        ("decision", "allow".into()),
        ("offline", "yes".into()),
    ];
    for sc in &scopes {
        if keep.is_none_or(|k| k.iter().any(|x| x == sc)) {
            form.push(("scope", sc.clone()));
        }
    }
    if let Some(p) = patient {
        form.push(("patient", p.into()));
    }
    let f: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, body, loc) = b.post("/oauth/consent", &f).await;
    assert_eq!(st, 303, "{body}");
    let loc = loc.unwrap();
    assert!(loc.starts_with(CB), "{loc}");
    assert_eq!(param(&loc, "state").as_deref(), Some("st-123"));
    let code = param(&loc, "code").unwrap_or_else(|| panic!("no code: {loc}"));
    (code, html)
}

async fn token(
    s: &TestServer,
    app: &App,
    form: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = s.client.post(s.url("/oauth/token"));
    let mut f: Vec<(&str, &str)> = form.to_vec();
    match &app.secret {
        Some(secret) => r = r.basic_auth(&app.id, Some(secret)),
        None => f.push(("client_id", &app.id)),
    }
    let res = r.form(&f).send().await.unwrap();
    let st = res.status().as_u16();
    let h = res.headers().clone();
    (st, h, json(res).await)
}

pub(crate) async fn exchange(
    s: &TestServer,
    app: &App,
    code: &str,
    verifier: &str,
) -> (u16, Value) {
    let (st, h, v) = token(
        s,
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", CB),
            ("code_verifier", verifier),
        ],
    )
    .await;
    if st == 200 {
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["pragma"], "no-cache");
    }
    (st, v)
}

/// An EHR launch from the chart of `patient`, consented whole: the access token.
async fn ehr_token(
    s: &TestServer,
    b: &mut Browser<'_>,
    app: &App,
    patient: &str,
    params: &mut Vec<(&'static str, String)>,
    verifier: &str,
) -> String {
    let csrf = b.csrf().await;
    let (_, _, loc) = b
        .post(
            &format!("/patients/{patient}/launch"),
            &[("csrf", &csrf), ("client_id", &app.id)],
        )
        .await;
    params.retain(|(k, _)| *k != "launch");
    params.push(("launch", param(&loc.unwrap(), "launch").unwrap()));
    let code = consent(b, &authorize_path(params), None, None).await;
    let (_, t) = exchange(s, app, &code, verifier).await;
    t["access_token"].as_str().unwrap().to_owned()
}

/// The audit events, newest first: all, or those naming a patient.
pub(crate) async fn events(
    s: &TestServer,
    patient: Option<&str>,
) -> Vec<custodian::audit::AuditEvent> {
    custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            patient_id: patient.map(str::to_owned),
            ..Default::default()
        },
        1000,
        true,
    )
    .await
    .unwrap()
}

struct World {
    admin: String,
    doctor: String,
    p1: String,
    p2: String,
}

async fn world(s: &TestServer) -> World {
    s.user("adm", "admin", PW).await;
    s.user("doc", "doctor", PW).await;
    let admin = s.login("adm", PW).await;
    let doctor = s.login("doc", PW).await;
    let p1 = patient(s, &doctor, "Ottilie", "Brennan").await;
    let p2 = patient(s, &doctor, "Other", "Person").await;
    World {
        admin,
        doctor,
        p1,
        p2,
    }
}

pub(crate) fn app_body(confidential: bool, scopes: &str) -> Value {
    json!({
        "name": "Test app",
        "client_type": if confidential { "confidential" } else { "public" },
        "redirect_uris": [CB],
        "launch_url": "http://127.0.0.1:9/launch",
        "scopes": scopes,
    })
}

pub(crate) const FULL: &str =
    "launch launch/patient offline_access online_access patient/*.cruds user/*.cruds";

async fn discovery(backend: Backend) {
    let s = TestServer::start(backend).await;
    let res = s.get("/fhir/.well-known/smart-configuration").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let v = json(res).await;
    let origin = s.url("");
    let origin = origin.trim_end_matches('/');
    assert_eq!(
        v["authorization_endpoint"],
        format!("{origin}/oauth/authorize")
    );
    assert_eq!(v["token_endpoint"], format!("{origin}/oauth/token"));
    assert_eq!(
        v["introspection_endpoint"],
        format!("{origin}/oauth/introspect")
    );
    assert_eq!(v["revocation_endpoint"], format!("{origin}/oauth/revoke"));
    assert_eq!(v["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(
        v["grant_types_supported"],
        json!(["authorization_code", "refresh_token"])
    );
    let caps: Vec<&str> = v["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in [
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "context-ehr-patient",
        "context-standalone-patient",
        "permission-patient",
        "permission-user",
        "permission-offline",
        "permission-v1",
        "permission-v2",
        "authorize-post",
    ] {
        assert!(caps.contains(&c), "{c}");
    }
    // Nothing claimed that does not work.
    for c in [
        "sso-openid-connect",
        "client-confidential-asymmetric",
        "context-banner",
    ] {
        assert!(!caps.contains(&c), "{c}");
    }
    assert!(v["scopes_supported"].as_array().unwrap().len() > 10);
    // The CapabilityStatement points to the same endpoints.
    let (st, _, cs) = fhir(&s, Method::GET, "/fhir/metadata", None, None).await;
    assert_eq!(st, 200);
    let ext = &cs["rest"][0]["security"]["extension"][0];
    assert_eq!(
        ext["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    let authorize = ext["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "authorize")
        .unwrap();
    assert_eq!(authorize["valueUri"], v["authorization_endpoint"]);
    assert_eq!(
        cs["rest"][0]["security"]["service"][0]["coding"][0]["code"],
        "SMART-on-FHIR"
    );
}
both_backends!(discovery);

async fn registration_rules(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    for (bad, field_name) in [
        (
            json!({"name": "x", "redirect_uris": ["http://app.example/cb"], "scopes": "patient/*.rs"}),
            "redirect_uris[0]",
        ),
        (
            json!({"name": "x", "redirect_uris": ["https://*.example/cb"], "scopes": "patient/*.rs"}),
            "redirect_uris[0]",
        ),
        (
            json!({"name": "x", "redirect_uris": ["https://a.example/cb#f"], "scopes": "patient/*.rs"}),
            "redirect_uris[0]",
        ),
        (
            json!({"name": "x", "redirect_uris": [], "scopes": "patient/*.rs"}),
            "redirect_uris",
        ),
        (
            json!({"name": "x", "redirect_uris": [CB], "scopes": "system/*.rs"}),
            "scopes",
        ),
        (
            json!({"name": "x", "redirect_uris": [CB], "scopes": "launch"}),
            "scopes",
        ),
        (
            json!({"name": "", "redirect_uris": [CB], "scopes": "patient/*.rs"}),
            "name",
        ),
        (
            json!({"name": "x", "redirect_uris": ["https://a.example/cb http://evil.example/cb"], "scopes": "patient/*.rs"}),
            "redirect_uris[0]",
        ),
    ] {
        let res = s
            .send_as(Method::POST, "/api/v1/apps", &w.admin, Some(bad.clone()))
            .await;
        assert_eq!(res.status(), 422, "{bad}");
        let v = json(res).await;
        assert!(v.to_string().contains(field_name), "{bad}: {v}");
    }
    // A confidential app's secret is shown once and stored hashed.
    let app = register(&s, &w.admin, app_body(true, FULL)).await;
    let secret = app.secret.clone().unwrap();
    let res = s
        .get_as(&format!("/api/v1/apps/{}", app.id), &w.admin)
        .await;
    let v = json(res).await;
    assert!(v.get("client_secret").is_none());
    let (stored,): (String,) =
        sqlx::query_as("SELECT secret_hash FROM oauth_clients WHERE id = $1")
            .bind(&app.id)
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert_ne!(stored, secret);
    assert!(!stored.contains(&secret));
    // A doctor may not register apps; an API token may not either (session only).
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/apps",
            &w.doctor,
            Some(app_body(false, FULL)),
        )
        .await;
    assert_eq!(res.status(), 403);
    // The audit trail names the registration.
    let events = events(&s, None).await;
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("oauth_client")
                && e.action == "create"
                && e.resource_id.as_deref() == Some(app.id.as_str()))
    );
}
both_backends!(registration_rules);

async fn standalone_launch(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let obs1 = observation(&s, &w.doctor, &w.p1, "laboratory").await;
    let obs2 = observation(&s, &w.doctor, &w.p2, "laboratory").await;
    let app = register(&s, &w.admin, app_body(true, FULL)).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let params = request(
        &s,
        &app.id,
        "launch/patient openid fhirUser patient/Patient.read patient/Observation.rs offline_access",
        &ch,
    );
    let path = authorize_path(&params);
    // Not signed in: first one page of our own that moves on by itself (the session
    // cookie is SameSite=Strict, not sent on the app's cross-site navigation), then the
    // sign-in page, coming back here after.
    let mut b = Browser::new(&s);
    let (st, html, _) = b.get_full(&path).await;
    assert_eq!(st, 200);
    assert!(html.contains("http-equiv=\"refresh\""), "{html}");
    let (st, _, loc) = b.get_full(&format!("{path}&_same_site=1")).await;
    assert_eq!(st, 303);
    let loc = loc.unwrap();
    assert!(
        loc.starts_with("/login?next=%2Foauth%2Fauthorize%3F"),
        "{loc}"
    );
    b.sign_in("doc", PW).await;
    // The picker finds what the doctor may read.
    let (st, html, _) = b.get_full(&format!("{path}&picker_q=Brennan")).await;
    assert_eq!(st, 200);
    assert!(html.contains("Brennan") && html.contains(&w.p1));
    assert!(html.contains("name=\"scope\" value=\"patient"));
    assert!(
        !html.contains("name=\"scope\" value=\"openid"),
        "an unsupported scope is not offered"
    );
    // Without choosing a patient: refused.
    let csrf = field(&html, "csrf");
    let sealed = field(&html, "request");
    let (st, _, _) = b
        .post(
            "/oauth/consent",
            &[
                ("csrf", &csrf),
                ("request", &sealed),
                ("decision", "allow"),
                ("scope", "patient/Patient.read"),
            ],
        )
        .await;
    assert_eq!(st, 400);
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["patient"], w.p1.as_str());
    assert!(t["expires_in"].as_i64().unwrap() > 0);
    assert!(t["refresh_token"].is_string());
    assert!(t.get("need_patient_banner").is_none());
    let scope = t["scope"].as_str().unwrap();
    assert!(
        scope.contains("patient/Observation.rs") && scope.contains("patient/Patient.read"),
        "{scope}"
    );
    assert!(!scope.contains("openid"), "{scope}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    assert!(at.starts_with("sat_"));
    // Stored hashed.
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM oauth_tokens WHERE token_hash = $1")
        .bind(&at)
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(n.0, 0);

    // Limited access (Inferno's second standalone test): the person unticks
    // Observations; the token says so and Observations are refused.
    let limited = consent(&mut b, &path, Some(&w.p1), Some(&["patient/Patient.read"])).await;
    let (st, lt) = exchange(&s, &app, &limited, &v).await;
    assert_eq!(st, 200, "{lt}");
    assert!(
        !lt["scope"].as_str().unwrap().contains("Observation"),
        "{lt}"
    );
    let lt = lt["access_token"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}", w.p1),
        Some(&lt),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&lt),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let consents = events(&s, Some(&w.p1)).await;
    assert!(
        consents
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("oauth_grant")
                && e.context.contains("\"unticked\":1")),
        "the consent records how many scopes were unticked"
    );

    // The launch patient: readable.
    let (st, _, pv) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200, "{pv}");
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{obs1}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);
    // Another patient: by direct read, by search parameter, by _id, by a reference chain.
    for path in [
        format!("/fhir/Patient/{}", w.p2),
        format!("/fhir/Observation/{obs2}"),
        format!("/fhir/Observation?patient={}", w.p2),
        format!("/fhir/Observation?patient=Patient/{}", w.p2),
        format!("/fhir/Patient?_id={}", w.p2),
        format!("/fhir/Patient?_id={},{}", w.p1, w.p2),
        format!("/fhir/Patient/{}/$everything", w.p2),
    ] {
        let (st, _, body) = fhir(&s, Method::GET, &path, Some(&at), None).await;
        assert_eq!(st, 403, "{path}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{path}");
        assert!(!body.to_string().contains("Person"), "{path}");
    }
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        "/fhir/Observation?patient.name=Person",
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 400);
    // A search without a patient is confined to the launch patient.
    let (st, _, bundle) = fhir(
        &s,
        Method::GET,
        "/fhir/Patient?name=Person",
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(bundle["total"], 0);
    let (st, _, bundle) = fhir(&s, Method::GET, "/fhir/Patient", Some(&at), None).await;
    assert_eq!(st, 200, "{bundle}");
    assert_eq!(bundle["total"], 1);
    // A scope not granted: refused (Condition), writes refused (read-only grant).
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Condition?patient={}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = fhir(
        &s,
        Method::DELETE,
        &format!("/fhir/Observation/{obs1}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    // The SMART token never opens /api/v1.
    let res = s.get_as(&format!("/api/v1/patients/{}", w.p1), &at).await;
    assert_eq!(res.status(), 401);
    let res = s.get_as("/api/v1/auth/me", &at).await;
    assert_eq!(res.status(), 401);
    // No break-glass for apps.
    let res = s
        .client
        .get(s.url(&format!("/fhir/Patient/{}", w.p2)))
        .bearer_auth(&at)
        .header("x-break-glass-reason", "An emergency, with a reason")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // The audit trail: the consent, the token, and each FHIR access naming the app; the
    // accounting of disclosures shows the app.
    let events = events(&s, Some(&w.p1)).await;
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("oauth_grant") && e.action == "create"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("oauth_token") && e.action == "create")
    );
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("Patient")
                && e.action == "read"
                && e.context.contains(&app.id))
    );
    let res = s
        .get_as(&format!("/api/v1/patients/{}/disclosures", w.p1), &w.admin)
        .await;
    let d = json(res).await;
    assert!(
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["app"] == app.id.as_str()),
        "{d}"
    );

    // A code used twice: refused, and every token of the grant revoked.
    let (st, e) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 400);
    assert_eq!(e["error"], "invalid_grant");
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
}
both_backends!(standalone_launch);

async fn codes_pkce_aud_redirects(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let app = register(&s, &w.admin, app_body(false, FULL)).await;
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let good = request(&s, &app.id, "patient/Patient.rs launch/patient", &ch);
    let with = |k: &str, val: Option<&str>| {
        let mut p: Vec<(&'static str, String)> =
            good.iter().filter(|(n, _)| *n != k).cloned().collect();
        if let Some(val) = val {
            let key: &'static str = good.iter().find(|(n, _)| *n == k).map_or("x", |(n, _)| *n);
            p.push((key, val.to_owned()));
        }
        authorize_path(&p)
    };
    // Unknown client, unregistered redirect URI (open redirect attempts): a page, never
    // a redirect.
    for path in [
        with("client_id", Some("app_nobody")),
        with("redirect_uri", Some("https://evil.example/cb")),
        with("redirect_uri", Some("http://127.0.0.1:9/callback/../evil")),
        with("redirect_uri", Some("http://127.0.0.1:9/callbackx")),
    ] {
        let (st, html, loc) = b.get_full(&path).await;
        assert_eq!(st, 400, "{path}");
        assert!(loc.is_none(), "{path}");
        assert!(!html.contains("evil.example"));
    }
    // No PKCE, plain PKCE, wrong aud, unknown response type: back to the app with an
    // error and no code.
    for (path, error) in [
        (with("code_challenge_method", None), "invalid_request"),
        (
            with("code_challenge_method", Some("plain")),
            "invalid_request",
        ),
        (with("code_challenge", None), "invalid_request"),
        (
            with("aud", Some("https://other.example/fhir")),
            "invalid_request",
        ),
        (with("aud", None), "invalid_request"),
        (
            with("response_type", Some("token")),
            "unsupported_response_type",
        ),
        (with("scope", Some("system/*.rs")), "invalid_scope"),
    ] {
        let (st, _, loc) = b.get_full(&path).await;
        assert_eq!(st, 303, "{path}");
        let loc = loc.unwrap();
        assert!(loc.starts_with(CB), "{loc}");
        assert_eq!(param(&loc, "error").as_deref(), Some(error), "{path}");
        assert!(param(&loc, "code").is_none());
        assert_eq!(param(&loc, "state").as_deref(), Some("st-123"));
    }
    // The sign-in page never sends anyone off-site.
    let (_, html) = b.get("/login?next=https://evil.example/").await;
    assert!(!html.contains("evil.example"));
    // The consent page lets its form's redirect reach the app's origin, and only it.
    let res = s
        .client
        .get(s.url(&authorize_path(&good)))
        .header("cookie", b.cookie_header())
        .send()
        .await
        .unwrap();
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("form-action 'self' http://127.0.0.1:9;")
            || csp.ends_with("form-action 'self' http://127.0.0.1:9"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    // redirect_uri left out of both requests (one registered): allowed (RFC 6749 §4.1.3).
    let no_redirect: Vec<(&'static str, String)> = good
        .iter()
        .filter(|(k, _)| *k != "redirect_uri")
        .cloned()
        .collect();
    let code = consent(&mut b, &authorize_path(&no_redirect), Some(&w.p1), None).await;
    let (st, _, t) = token(
        &s,
        &app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &v),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    // POST /oauth/authorize works as GET (authorize-post).
    let pairs: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, html, _) = b.post("/oauth/authorize", &pairs).await;
    assert_eq!(st, 200);
    assert!(html.contains("name=\"request\""));
    // CSRF on the consent form: refused without the session's token.
    let sealed = field(&html, "request");
    let (st, _, loc) = b
        .post(
            "/oauth/consent",
            &[
                ("request", &sealed),
                ("decision", "allow"),
                ("patient", &w.p1),
            ],
        )
        .await;
    assert_eq!(st, 403);
    assert!(loc.is_none());
    // A consent made for another session does not open in this one.
    let mut other = Browser::new(&s);
    other.sign_in("doc", PW).await;
    let csrf = other.csrf().await;
    let (st, _, loc) = other
        .post(
            "/oauth/consent",
            &[
                ("csrf", &csrf),
                ("request", &sealed),
                ("decision", "allow"),
                ("patient", &w.p1),
            ],
        )
        .await;
    assert_eq!(st, 400);
    assert!(loc.is_none());
    // Deny: access_denied back to the app.
    let csrf = b.csrf().await;
    let (st, _, loc) = b
        .post(
            "/oauth/consent",
            &[("csrf", &csrf), ("request", &sealed), ("decision", "deny")],
        )
        .await;
    assert_eq!(st, 303);
    assert_eq!(
        param(&loc.unwrap(), "error").as_deref(),
        Some("access_denied")
    );

    // At the token endpoint: a missing, blank or wrong verifier fails, and so does a
    // wrong redirect URI or client; each attempt spends the code.
    let path = authorize_path(&good);
    let wrong = verifier();
    for (verifier_sent, redirect) in [
        (None, CB),
        (Some(""), CB),
        (Some(wrong.as_str()), CB),
        (Some(v.as_str()), "http://127.0.0.1:9/other"),
    ] {
        let code = consent(&mut b, &path, Some(&w.p1), None).await;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect),
        ];
        if let Some(x) = verifier_sent {
            form.push(("code_verifier", x));
        }
        let (st, h, e) = token(&s, &app, &form).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"], "invalid_grant");
        assert_eq!(h["cache-control"], "no-store");
    }
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let other_app = register(&s, &w.admin, app_body(false, FULL)).await;
    let (st, _, e) = token(
        &s,
        &other_app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CB),
            ("code_verifier", &v),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    // An expired code.
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    s.clock.advance(Duration::from_secs(121));
    let (st, e) = exchange(&s, &app, &code, &v).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    // A confidential client with a wrong secret: 401 invalid_client.
    let conf = register(&s, &w.admin, app_body(true, FULL)).await;
    let bad = App {
        id: conf.id.clone(),
        secret: Some("scs_wrong".into()),
    };
    let (st, h, e) = token(
        &s,
        &bad,
        &[("grant_type", "refresh_token"), ("refresh_token", "srt_x")],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")));
    assert!(h.contains_key("www-authenticate"));
    let (st, _, e) = token(&s, &app, &[("grant_type", "password")]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
}
both_backends!(codes_pkce_aud_redirects);

async fn refresh_rotation(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let app = register(&s, &w.admin, app_body(false, FULL)).await;
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let path = authorize_path(&request(
        &s,
        &app.id,
        "launch/patient offline_access patient/Patient.rs patient/Observation.rs",
        &ch,
    ));
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200);
    let r1 = t["refresh_token"].as_str().unwrap().to_owned();
    // Refresh without scope: the same scopes, a new refresh token.
    let (st, _, t2) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
    )
    .await;
    assert_eq!(st, 200, "{t2}");
    assert_eq!(t2["scope"], t["scope"]);
    assert_eq!(t2["patient"], w.p1.as_str());
    let r2 = t2["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    // A subset narrows; a wider set is refused.
    let (st, _, t3) = token(
        &s,
        &app,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &r2),
            ("scope", "offline_access patient/Patient.rs"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t3}");
    assert_eq!(t3["scope"], "offline_access patient/Patient.rs");
    let narrowed = t3["access_token"].as_str().unwrap();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}", w.p1),
        Some(narrowed),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let r3 = t3["refresh_token"].as_str().unwrap().to_owned();
    let (st, _, e) = token(
        &s,
        &app,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &r3),
            (
                "scope",
                "offline_access patient/Patient.rs patient/Condition.rs",
            ),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_scope")));
    // Reusing an old refresh token revokes the whole grant.
    let live = t2["access_token"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&live),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, _, e) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&live),
        None,
    )
    .await;
    assert_eq!(st, 401);
    let (st, _, _) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r3)],
    )
    .await;
    assert_eq!(st, 400);
    // Without offline_access or online_access: no refresh token.
    let path = authorize_path(&request(
        &s,
        &app.id,
        "launch/patient patient/Patient.rs",
        &ch,
    ));
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200);
    assert!(t.get("refresh_token").is_none());
    // Online access ends with the session that granted it.
    let path = authorize_path(&request(
        &s,
        &app.id,
        "launch/patient online_access patient/Patient.rs",
        &ch,
    ));
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let r = t["refresh_token"].as_str().unwrap().to_owned();
    let online_access = t["access_token"].as_str().unwrap().to_owned();
    // The app's refreshes and introspections do not keep the person's session alive:
    // after the idle timeout (dev: 60 minutes) with only the app active, it has ended.
    let intro = || {
        s.client
            .post(s.url("/oauth/introspect"))
            .form(&[("token", r.as_str()), ("client_id", app.id.as_str())])
            .send()
    };
    s.clock.advance(Duration::from_secs(50 * 60));
    assert_eq!(json(intro().await.unwrap()).await["active"], true);
    s.clock.advance(Duration::from_secs(15 * 60));
    let (st, _, loc) = b.get_full("/admin").await;
    assert_eq!(st, 303);
    assert!(loc.unwrap().starts_with("/login"));
    assert_eq!(json(intro().await.unwrap()).await["active"], false);
    let (st, _, e) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r)],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    // Signing out ends online access at once, access token included.
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let online_access2 = t["access_token"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&online_access2),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let csrf = b.csrf().await;
    b.post("/logout", &[("csrf", &csrf)]).await;
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&online_access2),
        None,
    )
    .await;
    assert_eq!(st, 401);
    drop(online_access);
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;

    // A category smuggled through percent-encoding at refresh is refused, never widened.
    let path = authorize_path(&request(
        &s,
        &app.id,
        "launch/patient offline_access patient/Observation.rs?category=laboratory",
        &ch,
    ));
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let r = t["refresh_token"].as_str().unwrap().to_owned();
    let (st, _, e) = token(
        &s,
        &app,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &r),
            ("scope", "patient/Observation.rs?category=vital-signs%252Csocial-history%252Claboratory%252Cx%7Claboratory"),
        ],
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_scope")),
        "{e}"
    );
    // An administrator narrows the app: its grants narrow at their next refresh. (The
    // sessions of `world` idled out above.)
    let admin = s.login("adm", PW).await;
    let res = s
        .send_as(
            Method::PUT,
            &format!("/api/v1/apps/{}", app.id),
            &admin,
            Some(json!({"name": "Test app", "redirect_uris": [CB], "scopes": "launch/patient offline_access patient/Patient.rs"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let (st, _, t2) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r)],
    )
    .await;
    assert_eq!(st, 200, "{t2}");
    assert!(
        !t2["scope"].as_str().unwrap().contains("Observation"),
        "{t2}"
    );
    // Replays are in the audit trail as the grant's revocation.
    let (st, _, _) = token(
        &s,
        &app,
        &[("grant_type", "refresh_token"), ("refresh_token", &r)],
    )
    .await;
    assert_eq!(st, 400);
    let events = events(&s, None).await;
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("oauth_grant")
                && e.action == "delete"
                && e.context.contains("replay")
                && e.resource_id.is_some()),
        "the replay names the grant it revoked"
    );
    // The accounting of disclosures lists the app's reads, not its grants and tokens.
    let res = s
        .get_as(&format!("/api/v1/patients/{}/disclosures", w.p1), &admin)
        .await;
    let d = json(res).await;
    assert!(
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| !i["resource_type"]
                .as_str()
                .unwrap_or("")
                .starts_with("oauth_")),
        "{d}"
    );
}
both_backends!(refresh_rotation);

async fn ehr_launch_and_revocation(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let lab = observation(&s, &w.doctor, &w.p1, "laboratory").await;
    let vital = observation(&s, &w.doctor, &w.p1, "vital-signs").await;
    let app = register(&s, &w.admin, app_body(true, FULL)).await;
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;
    // The chart lists the app; "Launch" sends the browser to its launch URL.
    let (st, html) = b.get(&format!("/patients/{}", w.p1)).await;
    assert_eq!(st, 200);
    assert!(html.contains("Launch Test app"));
    let csrf = b.csrf().await;
    let (st, _, loc) = b
        .post(
            &format!("/patients/{}/launch", w.p1),
            &[("csrf", &csrf), ("client_id", &app.id)],
        )
        .await;
    assert_eq!(st, 303);
    let loc = loc.unwrap();
    assert!(loc.starts_with("http://127.0.0.1:9/launch?"), "{loc}");
    assert_eq!(param(&loc, "iss").unwrap(), s.url("/fhir"));
    let launch = param(&loc, "launch").unwrap();
    // Without CSRF: refused.
    let (st, _, _) = b
        .post(
            &format!("/patients/{}/launch", w.p1),
            &[("client_id", &app.id)],
        )
        .await;
    assert_eq!(st, 403);
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let mut params = request(
        &s,
        &app.id,
        &format!("launch patient/Observation.rs?category={LAB}|laboratory patient/Patient.rs"),
        &ch,
    );
    params.push(("launch", launch.clone()));
    let path = authorize_path(&params);
    // Another user cannot use this launch.
    s.user("doc2", "doctor", PW).await;
    let mut b2 = Browser::new(&s);
    b2.sign_in("doc2", PW).await;
    let (st, _, l) = b2.get_full(&path).await;
    assert_eq!(st, 303);
    assert_eq!(
        param(&l.unwrap(), "error").as_deref(),
        Some("invalid_request")
    );
    // ... and, spent, nor can its owner: a launch is single-use.
    let (st, _, l) = b.get_full(&path).await;
    assert_eq!(st, 303, "spent by the other user's attempt");
    assert!(param(&l.unwrap(), "error").is_some());
    // A new launch, expired after its five minutes.
    let csrf = b.csrf().await;
    let (_, _, loc) = b
        .post(
            &format!("/patients/{}/launch", w.p1),
            &[("csrf", &csrf), ("client_id", &app.id)],
        )
        .await;
    let launch = param(&loc.unwrap(), "launch").unwrap();
    s.clock.advance(Duration::from_secs(301));
    params.retain(|(k, _)| *k != "launch");
    params.push(("launch", launch));
    let (st, _, l) = b.get_full(&authorize_path(&params)).await;
    assert_eq!(st, 303);
    assert!(param(&l.unwrap(), "error").is_some());
    // A fresh one: the consent names the patient, no picker.
    let csrf = b.csrf().await;
    let (_, _, loc) = b
        .post(
            &format!("/patients/{}/launch", w.p1),
            &[("csrf", &csrf), ("client_id", &app.id)],
        )
        .await;
    let launch = param(&loc.unwrap(), "launch").unwrap();
    params.retain(|(k, _)| *k != "launch");
    params.push(("launch", launch));
    let path = authorize_path(&params);
    let (code, html) = consent_page(&mut b, &path, None, None).await;
    assert!(
        html.contains("Brennan") && !html.contains("picker_q"),
        "{html}"
    );
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], w.p1.as_str());
    assert_eq!(t["need_patient_banner"], true);
    assert!(
        t["smart_style_url"]
            .as_str()
            .unwrap()
            .ends_with("/oauth/smart-style.json")
    );
    let at = t["access_token"].as_str().unwrap().to_owned();
    // Granular: laboratory only.
    let (st, _, bundle) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200, "{bundle}");
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], lab.as_str());
    let (st, _, bundle) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}&category=vital-signs", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!((st, bundle["total"].as_i64()), (200, Some(0)));
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{vital}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{lab}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);

    // Introspection: for its own client only.
    let intro = |client: &App, tok: &str| {
        let r = s
            .client
            .post(s.url("/oauth/introspect"))
            .basic_auth(&client.id, client.secret.as_ref())
            .form(&[("token", tok.to_owned())]);
        async move { json(r.send().await.unwrap()).await }
    };
    let i = intro(&app, &at).await;
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["client_id"], app.id.as_str());
    assert_eq!(i["patient"], w.p1.as_str());
    assert!(i["exp"].as_i64().unwrap() > 0);
    assert!(i["scope"].as_str().unwrap().contains("laboratory"));
    let stranger = register(&s, &w.admin, app_body(true, FULL)).await;
    assert_eq!(intro(&stranger, &at).await["active"], false);
    let res = s
        .client
        .post(s.url("/oauth/introspect"))
        .form(&[("token", at.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // The role is read on every request: the doctor becomes a role without records:read.
    crate::delegation::role(&s, "frontdesk", &["patients:read"]).await;
    sqlx::query("UPDATE users SET role = 'frontdesk' WHERE username = 'doc'")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{lab}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    sqlx::query("UPDATE users SET role = 'doctor' WHERE username = 'doc'")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{lab}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);

    // Connected apps: the user sees the grant and revokes it; the next request fails.
    let res = s.get_as("/api/v1/auth/apps", &w.doctor).await;
    let list = json(res).await;
    let grant = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["client_id"] == app.id.as_str())
        .unwrap()
        .clone();
    assert!(grant["allows"].as_array().unwrap().len() == 2, "{grant}");
    let (_, html) = b.get("/account/apps").await;
    assert!(html.contains("Test app"));
    assert!(
        html.contains("Brennan, Ottilie"),
        "the launch patient by name"
    );
    let gid = grant["id"].as_str().unwrap();
    // Another user cannot revoke it.
    let other = s.login("doc2", PW).await;
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/auth/apps/{gid}"),
            &other,
            None,
        )
        .await;
    assert_eq!(res.status(), 404);
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/auth/apps/{gid}"),
            &w.doctor,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{lab}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
    assert_eq!(intro(&app, &at).await["active"], false);

    // RFC 7009 revocation of an access token, and the admin revoking all of an app.
    let at = ehr_token(&s, &mut b, &app, &w.p1, &mut params, &v).await;
    let res = s
        .client
        .post(s.url("/oauth/revoke"))
        .basic_auth(&app.id, app.secret.as_ref())
        .form(&[("token", at.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
    let at = ehr_token(&s, &mut b, &app, &w.p1, &mut params, &v).await;
    let res = s.get_as("/api/v1/grants", &w.admin).await;
    assert!(!json(res).await["items"].as_array().unwrap().is_empty());
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/apps/{}/grants", app.id),
            &w.admin,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
    // The admin page lists apps and grants.
    let mut a = Browser::new(&s);
    a.sign_in("adm", PW).await;
    let (st, html) = a.get("/admin/apps").await;
    assert_eq!(st, 200);
    assert!(html.contains(&app.id));
    let (st, _) = b.get("/admin/apps").await;
    assert_eq!(st, 403);
}
both_backends!(ehr_launch_and_revocation);

async fn role_and_scope_intersection(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    s.user("nur", "nurse", PW).await;
    let app = register(&s, &w.admin, app_body(false, FULL)).await;
    let mut b = Browser::new(&s);
    b.sign_in("nur", PW).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let path = authorize_path(&request(&s, &app.id, "launch/patient patient/*.cruds", &ch));
    let (_, html, _) = b.get_full(&path).await;
    assert!(
        html.contains("your role does not allow this"),
        "a nurse is told the app's writes will be refused"
    );
    let code = consent(&mut b, &path, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let at = t["access_token"].as_str().unwrap().to_owned();
    // A nurse's app reads but never writes, whatever its scopes.
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let body = json!({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": format!("Patient/{}", w.p1)},
        "effectiveDateTime": "2026-01-02"
    });
    let (st, _, _) = fhir(&s, Method::POST, "/fhir/Observation", Some(&at), Some(body)).await;
    assert_eq!(st, 403);
    // A doctor's app with patient/ write scopes writes only to its patient.
    let mut d = Browser::new(&s);
    d.sign_in("doc", PW).await;
    let code = consent(&mut d, &path, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let at = t["access_token"].as_str().unwrap().to_owned();
    let obs = |p: &str| {
        json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": format!("Patient/{p}")},
            "effectiveDateTime": "2026-01-02"
        })
    };
    let (st, _, _) = fhir(
        &s,
        Method::POST,
        "/fhir/Observation",
        Some(&at),
        Some(obs(&w.p2)),
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, created) = fhir(
        &s,
        Method::POST,
        "/fhir/Observation",
        Some(&at),
        Some(obs(&w.p1)),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs(&w.p2), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir", Some(&at), Some(tx)).await;
    assert_eq!(st, 403);
    // No SSN through an app even for a role that reads it in full.
    let (_, _, own) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&w.doctor),
        None,
    )
    .await;
    assert!(own.to_string().contains("123-45-6789"), "{own}");
    let (_, _, p) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert!(!p.to_string().contains("123-45-6789"), "{p}");
    // A category-limited app cannot overwrite a resource of another category.
    let vital = observation(&s, &w.doctor, &w.p1, "vital-signs").await;
    let lab_only = authorize_path(&request(
        &s,
        &app.id,
        &format!("launch/patient patient/Observation.cru?category={LAB}|laboratory"),
        &ch,
    ));
    let code = consent(&mut d, &lab_only, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let lab_token = t["access_token"].as_str().unwrap().to_owned();
    let mut overwrite = obs(&w.p1);
    overwrite["id"] = json!(vital);
    overwrite["category"] = json!([{"coding": [{"system": LAB, "code": "laboratory"}]}]);
    let (st, _, _) = fhir(
        &s,
        Method::PUT,
        &format!("/fhir/Observation/{vital}"),
        Some(&lab_token),
        Some(overwrite.clone()),
    )
    .await;
    assert_eq!(st, 403);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": overwrite, "request": {"method": "PUT", "url": format!("Observation/{vital}")}}
    ]});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir", Some(&lab_token), Some(tx)).await;
    assert_eq!(st, 403);
    let (_, _, still) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{vital}"),
        Some(&w.doctor),
        None,
    )
    .await;
    assert_eq!(still["category"][0]["coding"][0]["code"], "vital-signs");
    // A transaction may not name an entry `Patient/<launch patient>` to make another
    // patient's record look like the launch patient's.
    let aliasing = authorize_path(&request(
        &s,
        &app.id,
        "launch/patient user/Patient.ru patient/Observation.c",
        &ch,
    ));
    let code = consent(&mut d, &aliasing, Some(&w.p1), None).await;
    let (_, t) = exchange(&s, &app, &code, &v).await;
    let alias_token = t["access_token"].as_str().unwrap().to_owned();
    let (_, _, other) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p2),
        Some(&w.doctor),
        None,
    )
    .await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": format!("Patient/{}", w.p1), "resource": other, "request": {"method": "PUT", "url": format!("Patient/{}", w.p2)}},
        {"resource": obs(&w.p1), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir", Some(&alias_token), Some(tx)).await;
    assert_eq!(st, 403);
    let (_, _, b2) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}", w.p2),
        Some(&w.doctor),
        None,
    )
    .await;
    assert_eq!(
        b2["total"], 0,
        "nothing was written into the other patient's record"
    );
    // A deactivated user's app stops on the next request.
    sqlx::query("UPDATE users SET active = 0 WHERE username = 'doc'")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", w.p1),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
}
both_backends!(role_and_scope_intersection);

/// The loop closed: the built-in PRECISE-HBR app launches from a chart against this
/// server's own FHIR API and shows the patient's score.
async fn builtin_app_launches_against_this_server(backend: Backend) {
    let s = TestServer::start_with(backend, Options::default()).await;
    let w = world(&s).await;
    for cat in ["laboratory"] {
        observation(&s, &w.doctor, &w.p1, cat).await;
    }
    let res = s.get_as("/api/v1/apps/custodian", &w.admin).await;
    assert_eq!(res.status(), 200);
    let builtin = json(res).await;
    assert_eq!(builtin["builtin"], true);
    assert!(
        builtin["redirect_uris"]
            .to_string()
            .contains("/smart/callback")
    );
    let mut b = Browser::lenient(&s);
    b.sign_in("doc", PW).await;
    let (_, html) = b.get(&format!("/patients/{}", w.p1)).await;
    assert!(html.contains("Launch PRECISE-HBR"), "{html}");
    let csrf = b.csrf().await;
    let (st, _, loc) = b
        .post(
            &format!("/patients/{}/launch", w.p1),
            &[("csrf", &csrf), ("client_id", "custodian")],
        )
        .await;
    assert_eq!(st, 303);
    let loc = loc.unwrap();
    assert!(loc.starts_with("/smart/launch?iss="), "{loc}");
    // The app discovers this server, and sends the browser to its authorize endpoint.
    let (st, body, loc) = b.get_full(&loc).await;
    assert_eq!(st, 303, "{body}");
    let loc = loc.unwrap();
    assert!(loc.starts_with(&s.url("/oauth/authorize?")), "{loc}");
    let (st, html, _) = b.get_full(&loc).await;
    assert_eq!(st, 200, "{html}");
    assert!(html.contains("Brennan"));
    let csrf = field(&html, "csrf");
    let sealed = field(&html, "request");
    let mut form: Vec<(&str, String)> = vec![
        ("csrf", csrf),
        ("request", sealed),
        ("decision", "allow".into()),
    ];
    for sc in html
        .split("name=\"scope\" value=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
    {
        form.push(("scope", unescape(sc)));
    }
    let f: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, _, loc) = b.post("/oauth/consent", &f).await;
    assert_eq!(st, 303);
    let loc = loc.unwrap();
    assert!(loc.contains("/smart/callback?code="), "{loc}");
    // The callback exchanges the code with this server, then the score page reads this
    // server's FHIR data with the app's token.
    let (st, body, loc) = b.get_full(&loc).await;
    assert_eq!(st, 303, "{body}");
    assert_eq!(loc.as_deref(), Some("/smart/app"));
    let (st, html) = b.get("/smart/app").await;
    assert_eq!(st, 200, "{html}");
    assert!(
        html.contains("Brennan") && html.contains("PRECISE-HBR"),
        "{html}"
    );
    assert!(
        html.contains("12.5"),
        "the hemoglobin from this server's Observation: {html}"
    );
    // Every FHIR read the app made names it in the audit trail.
    let events = events(&s, Some(&w.p1)).await;
    assert!(
        events
            .iter()
            .any(|e| e.resource_type.as_deref() == Some("Observation")
                && e.context.contains("custodian")),
        "{events:?}"
    );
}
both_backends!(builtin_app_launches_against_this_server);

async fn builtin_app_is_off_outside_dev_by_default(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("oauth.builtin_app", "false".into())],
            ..Default::default()
        },
    )
    .await;
    let w = world(&s).await;
    let res = s.get_as("/api/v1/apps/custodian", &w.admin).await;
    assert_eq!(res.status(), 404);
    let prod = custodian::config::Config::builtin(custodian::config::Environment::Prod);
    assert!(!prod.oauth.builtin_app);
    let dev = custodian::config::Config::builtin(custodian::config::Environment::Dev);
    assert!(dev.oauth.builtin_app);
}
both_backends!(builtin_app_is_off_outside_dev_by_default);
