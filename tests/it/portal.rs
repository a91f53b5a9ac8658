//! Patients' own rights (issue 25): patient accounts made only from a record, reaching
//! only their own record through every door (`/api/v1`, `/fhir`, SMART apps, pages),
//! the right of access (portal, FHIR Bundle and printable downloads), and the patient's
//! own accounting of disclosures.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::fhir::fhir;
use crate::oauth::{
    FULL, app_body, authorize_path, consent, exchange, observation, register, request, verifier,
};
use crate::smtp_sink::Sink;
use crate::support::{Backend, Options, TestServer, json};
use crate::web::Browser;

const PW: &str = "Correct-Horse-9!";
/// A family name only patient B has: it must never reach patient A.
const B_CANARY: &str = "Zebulonski";
/// Patient A's SSN: a patient sees it masked.
const A_SSN: &str = "512-34-4329";

struct Clinic {
    admin: String,
    doctor: String,
    a: String,
    b: String,
    a_record: String,
    b_record: String,
    a_obs: String,
    b_obs: String,
}

async fn new_patient(s: &TestServer, doctor: &str, body: Value) -> String {
    let res = s
        .send_as(Method::POST, "/api/v1/patients", doctor, Some(body))
        .await;
    assert_eq!(res.status(), 201);
    json(res).await["id"].as_str().unwrap().to_owned()
}

async fn record(s: &TestServer, doctor: &str, patient: &str, diagnosis: &str) -> String {
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{patient}/records"),
            doctor,
            Some(json!({"diagnosis": diagnosis, "treatment": "rest"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    json(res).await["id"].as_str().unwrap().to_owned()
}

async fn clinic(s: &TestServer) -> Clinic {
    s.user("adm", "admin", PW).await;
    s.user("doc", "doctor", PW).await;
    let admin = s.login("adm", PW).await;
    let doctor = s.login("doc", PW).await;
    let a = new_patient(
        s,
        &doctor,
        json!({"given_name": "Ada", "family_name": "Quill", "birth_date": "1961-02-03",
               "ssn": A_SSN, "email": "ada@example.org"}),
    )
    .await;
    let b = new_patient(
        s,
        &doctor,
        json!({"given_name": "Bert", "family_name": B_CANARY, "birth_date": "1970-05-06"}),
    )
    .await;
    let a_record = record(s, &doctor, &a, "Ada's sprained ankle").await;
    let b_record = record(s, &doctor, &b, "Zebulonski diagnosis").await;
    let a_obs = observation(s, &doctor, &a, "laboratory").await;
    let b_obs = observation(s, &doctor, &b, "laboratory").await;
    Clinic {
        admin,
        doctor,
        a,
        b,
        a_record,
        b_record,
        a_obs,
        b_obs,
    }
}

/// A patient account for `patient`, made as an accepted patient invitation makes it.
async fn patient_account(s: &TestServer, username: &str, patient: &str) -> String {
    s.state
        .identity()
        .create_patient_user(
            username,
            Some(&format!("{username}@example.org")),
            &custodian::config::Secret::new(PW.into()),
            patient,
        )
        .await
        .unwrap()
        .id
}

/// The clinic lets its doctors review amendment requests (the permission is the admin
/// role's by default).
pub(crate) async fn doctors_review(s: &TestServer, admin: &str) {
    let res = s
        .send_as(
            Method::PUT,
            "/api/v1/roles/doctor",
            admin,
            Some(
                json!({"permissions": ["patients:read", "patients:write", "records:read",
                "records:write", "phi:ssn", "amendments:review"]}),
            ),
        )
        .await;
    assert_eq!(res.status(), 200);
}

async fn status(s: &TestServer, method: Method, path: &str, token: &str) -> u16 {
    s.send_as(method, path, token, None).await.status().as_u16()
}

both_backends!(a_patient_account_reaches_only_its_own_record);
async fn a_patient_account_reaches_only_its_own_record(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    patient_account(&s, "ada", &c.a).await;
    let me = s.login("ada", PW).await;
    let who = json(s.get_as("/api/v1/auth/me", &me).await).await;
    assert_eq!(who["role"], "patient");
    assert_eq!(who["patient_id"], c.a.as_str());
    assert_eq!(who["permissions"], json!([]));

    // /api/v1: every staff route refuses, for the own record as for another.
    for (m, path) in [
        (Method::GET, "/api/v1/patients".to_owned()),
        (Method::GET, format!("/api/v1/patients?q={B_CANARY}")),
        (Method::GET, format!("/api/v1/patients/{}", c.a)),
        (Method::GET, format!("/api/v1/patients/{}", c.b)),
        (Method::GET, format!("/api/v1/patients/{}/records", c.b)),
        (Method::GET, format!("/api/v1/records/{}", c.b_record)),
        (Method::GET, format!("/api/v1/records/{}", c.a_record)),
        (Method::PATCH, format!("/api/v1/records/{}", c.a_record)),
        (Method::DELETE, format!("/api/v1/patients/{}", c.a)),
        (Method::GET, format!("/api/v1/patients/{}/disclosures", c.a)),
        (Method::GET, "/api/v1/audit/events".to_owned()),
        (Method::GET, "/api/v1/users".to_owned()),
    ] {
        let st = status(&s, m.clone(), &path, &me).await;
        assert!(st == 403 || st == 404 || st == 422, "{m} {path}: {st}");
        assert_ne!(st, 200, "{m} {path}");
    }
    // Break-glass is not a patient's: the header changes nothing.
    let res = s
        .client
        .get(s.url(&format!("/api/v1/patients/{}", c.b)))
        .bearer_auth(&me)
        .header("x-break-glass-reason", "I want to see my neighbour")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            &me,
            Some(json!({"given_name": "X", "family_name": "Y", "birth_date": "2000-01-01"})),
        )
        .await;
    assert_eq!(res.status(), 403);

    // The own record through /api/v1/me.
    let res = s.get_as("/api/v1/me/record", &me).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/fhir+json");
    assert!(
        res.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    let text = res.text().await.unwrap();
    let bundle: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "collection");
    crate::fhir_capture::capture("fhir", &bundle);
    assert!(text.contains(&c.a) && text.contains(&c.a_obs));
    assert!(text.contains("Ada's sprained ankle"));
    assert!(!text.contains(&c.b) && !text.contains(B_CANARY) && !text.contains(&c.b_obs));
    assert!(!text.contains(A_SSN), "the SSN is masked for the patient");
    // Staff have no "own record".
    assert_eq!(
        status(&s, Method::GET, "/api/v1/me/record", &c.doctor).await,
        403
    );
    assert_eq!(
        status(&s, Method::GET, "/api/v1/me/disclosures", &c.doctor).await,
        403
    );

    // /fhir: the own compartment, read only.
    let get = |path: String| {
        let s = &s;
        let me = me.clone();
        async move { fhir(s, Method::GET, &path, Some(&me), None).await }
    };
    let (st, _, v) = get(format!("/fhir/Patient/{}", c.a)).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        !v.to_string().contains(A_SSN),
        "the SSN is masked for the patient"
    );
    let (st, _, _) = get(format!("/fhir/Observation/{}", c.a_obs)).await;
    assert_eq!(st, 200);
    let (st, _, v) = get(format!("/fhir/Patient/{}/$everything", c.a)).await;
    assert_eq!(st, 200);
    assert!(!v.to_string().contains(B_CANARY));
    let (st, _, v) = get("/fhir/Observation".into()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["total"], 1, "confined to the own compartment: {v}");
    let (st, _, v) = get("/fhir/Patient".into()).await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 1);
    assert_eq!(v["entry"][0]["resource"]["id"], c.a.as_str());
    let (st, _, v) = get(format!("/fhir/Patient?family={B_CANARY}")).await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 0, "no other patient is found by name");
    let (st, _, v) = get(format!("/fhir/Condition?patient={}", c.a)).await;
    assert_eq!(st, 200);
    assert!(v.to_string().contains("Ada's sprained ankle"));
    for path in [
        format!("/fhir/Patient/{}", c.b),
        format!("/fhir/Patient/{}/_history/1", c.b),
        format!("/fhir/Observation/{}", c.b_obs),
        format!("/fhir/Observation/{}/_history/1", c.b_obs),
        format!("/fhir/Observation?patient={}", c.b),
        format!("/fhir/Observation?subject=Patient/{}", c.b),
        format!("/fhir/Observation?patient=Patient/{}", c.b),
        format!("/fhir/Patient?_id={}", c.b),
        format!("/fhir/Patient?_id={},{}", c.a, c.b),
        format!("/fhir/Patient/{}/$everything", c.b),
        format!("/fhir/Condition?patient={}", c.b),
    ] {
        let (st, _, v) = get(path.clone()).await;
        // Refused; `subject` is no search parameter here at all (400).
        assert!(
            st == 403 || (st == 400 && path.contains("subject")),
            "{path}: {st} {v}"
        );
        assert!(!v.to_string().contains(B_CANARY), "{path}");
    }
    // A record of B as a Condition.
    let (st, _, v) = get(format!("/fhir/Condition/record-{}", c.b_record)).await;
    assert!(st == 403 || st == 404, "{st} {v}");
    assert!(!v.to_string().contains("Zebulonski"));
    // Another person's search page token: it stands for B's search, and is refused.
    let (st, _, staff) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}&_anonymize=true", c.b),
        Some(&c.doctor),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let own_link = staff["link"][0]["url"].as_str().unwrap();
    let page_path = &own_link[own_link.find("/fhir/").unwrap()..];
    assert!(page_path.contains("_page="), "{page_path}");
    let (st, _, _) = get(page_path.to_owned()).await;
    assert_eq!(st, 403, "a sealed page of B's search");
    // Writes: none, not even to the own record.
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{}", c.a)}});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir/Observation", Some(&me), Some(obs)).await;
    assert_eq!(st, 403);
    let (_, _, mine) = get(format!("/fhir/Patient/{}", c.a)).await;
    let (st, _, _) = fhir(
        &s,
        Method::PUT,
        &format!("/fhir/Patient/{}", c.a),
        Some(&me),
        Some(mine),
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = fhir(
        &s,
        Method::DELETE,
        &format!("/fhir/Observation/{}", c.a_obs),
        Some(&me),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:1d0c3c5e-0000-4000-8000-000000000001",
        "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": format!("Patient/{}", c.a)}},
        "request": {"method": "POST", "url": "Observation"}}]});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir", Some(&me), Some(tx)).await;
    assert_eq!(st, 403);

    // An API token of the patient is as confined as the session.
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/tokens",
            &me,
            Some(json!({"name": "my script"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let tok = json(res).await["token"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", c.b),
        Some(&tok),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", c.a),
        Some(&tok),
        None,
    )
    .await;
    assert_eq!(st, 200);

    // Pages: the portal, never a staff page.
    let mut b = Browser::new(&s);
    b.sign_in("ada", PW).await;
    let (st, _, loc) = b.get_full("/").await;
    assert_eq!((st, loc.as_deref()), (303, Some("/my")));
    let (st, html) = b.get("/my").await;
    assert_eq!(st, 200);
    assert!(html.contains("Quill") && html.contains("sprained ankle"));
    assert!(!html.contains(B_CANARY) && !html.contains(A_SSN));
    assert!(html.contains("***-**-4329") || html.contains("4329"));
    for path in [
        "/patients".to_owned(),
        format!("/patients?q={B_CANARY}"),
        format!("/patients/{}", c.b),
        format!("/patients/{}", c.a),
        "/admin/users".to_owned(),
        "/admin/audit".to_owned(),
    ] {
        let (st, html) = b.get(&path).await;
        assert!(st == 403 || st == 404, "{path}: {st}");
        assert!(!html.contains(B_CANARY), "{path}");
    }
    let (st, text) = b.get("/my/record.json").await;
    assert_eq!(st, 200);
    assert!(text.contains(&c.a_obs) && !text.contains(B_CANARY));
    let (st, html) = b.get("/my/record/print").await;
    assert_eq!(st, 200);
    assert!(html.contains("Health record of Ada Quill") && !html.contains(B_CANARY));
    // A staff member has no portal.
    let mut d = Browser::new(&s);
    d.sign_in("doc", PW).await;
    let (st, _) = d.get("/my").await;
    assert_eq!(st, 403);
    let _ = c.admin;
}

both_backends!(patient_accounts_are_made_only_from_a_record);
async fn patient_accounts_are_made_only_from_a_record(backend: Backend) {
    let sink = Sink::start().await;
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![
                ("mail.smtp_host", "127.0.0.1".to_owned()),
                ("mail.smtp_port", sink.port.to_string()),
                ("mail.smtp_tls", "none".to_owned()),
                ("mail.base_url", "http://custodian.test".to_owned()),
                ("mail.poll_interval", "100ms".to_owned()),
            ],
            ..Options::default()
        },
    )
    .await;
    let c = clinic(&s).await;
    s.user("nurse", "nurse", PW).await;
    let nurse = s.login("nurse", PW).await;

    // The patient role is given by no other way.
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/invitations",
            &c.admin,
            Some(json!({"email": "x@example.org", "role": "patient"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/users",
            &c.admin,
            Some(json!({"username": "fake", "password": PW, "role": "patient"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let nurse_id = json(s.get_as("/api/v1/auth/me", &nurse).await).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{nurse_id}"),
            &c.admin,
            Some(json!({"role": "patient"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    // The role never gets a permission.
    let res = s
        .send_as(
            Method::PUT,
            "/api/v1/roles/patient",
            &c.admin,
            Some(json!({"permissions": ["patients:read"]})),
        )
        .await;
    assert_eq!(res.status(), 409);
    let res = s
        .send_as(Method::DELETE, "/api/v1/roles/patient", &c.admin, None)
        .await;
    assert_eq!(res.status(), 409);

    // Inviting needs patients:write.
    let path = format!("/api/v1/patients/{}/invitation", c.a);
    let res = s
        .send_as(Method::POST, &path, &nurse, Some(json!({})))
        .await;
    assert_eq!(res.status(), 403);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients/00000000-0000-4000-8000-000000000000/invitation",
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 404);
    // B's record has no email: one must be given.
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{}/invitation", c.b),
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 422);

    // To the address on the record; the mail names no patient.
    let n = sink.count();
    let res = s
        .send_as(Method::POST, &path, &c.doctor, Some(json!({})))
        .await;
    assert_eq!(res.status(), 201);
    let inv = json(res).await;
    assert_eq!(inv["role"], "patient");
    assert_eq!(inv["patient_id"], c.a.as_str());
    assert_eq!(inv["email"], "ada@example.org");
    let first = sink.wait_for(n).await;
    assert_eq!(first.to, "ada@example.org");
    assert!(!first.data.contains("Quill") && !first.data.contains("Ada"));
    // Resent by an administrator: still a patient invitation of the same record; the
    // first link is dead.
    let n = sink.count();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/invitations/{}/resend", inv["id"].as_str().unwrap()),
            &c.admin,
            None,
        )
        .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let second = sink.wait_for(n).await;
    let accept = |token: String, username: &'static str, birth: &'static str| {
        let s = &s;
        async move {
            s.post(
                "/api/v1/invitations/accept",
                None,
                json!({"token": token, "username": username, "password": PW, "birth_date": birth}),
            )
            .await
        }
    };
    assert_eq!(
        accept(first.token(), "ada", "1961-02-03").await.status(),
        400
    );
    // The mailbox alone does not open the record: the birth date is asked, and a wrong
    // one ends the link.
    let res = s
        .post(
            "/api/v1/invitations/accept",
            None,
            json!({"token": second.token(), "username": "ada", "password": PW}),
        )
        .await;
    assert_eq!(res.status(), 422);
    assert_eq!(
        accept(second.token(), "ada", "1961-02-04").await.status(),
        400
    );
    assert_eq!(
        accept(second.token(), "ada", "1961-02-03").await.status(),
        400,
        "ended"
    );
    let n = sink.count();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/invitations/{}/resend", inv["id"].as_str().unwrap()),
            &c.admin,
            None,
        )
        .await;
    assert_eq!(
        res.status(),
        404,
        "a link ended by a wrong birth date is not resent"
    );
    let res = s
        .send_as(Method::POST, &path, &c.doctor, Some(json!({})))
        .await;
    assert_eq!(res.status(), 201);
    let third = sink.wait_for(n).await;
    let res = accept(third.token(), "ada", "1961-02-03").await;
    assert_eq!(res.status(), 201);
    let me = s.login("ada", PW).await;
    let who = json(s.get_as("/api/v1/auth/me", &me).await).await;
    assert_eq!(who["patient_id"], c.a.as_str());
    assert_eq!(who["role"], "patient");
    let ada_id = who["id"].as_str().unwrap().to_owned();
    // One account per record.
    let res = s
        .send_as(Method::POST, &path, &c.doctor, Some(json!({})))
        .await;
    assert_eq!(res.status(), 409);
    // The account keeps its role.
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/users/{ada_id}"),
            &c.admin,
            Some(json!({"role": "doctor"})),
        )
        .await;
    assert_eq!(res.status(), 409);
    assert_eq!(
        status(&s, Method::GET, &format!("/fhir/Patient/{}", c.b), &me).await,
        403
    );
    // Nobody on the staff sets a patient account's credentials (users:manage would
    // otherwise open any record, unflagged, as the patient).
    for (m, path, body) in [
        (
            Method::POST,
            format!("/api/v1/users/{ada_id}/password"),
            json!({"new_password": "Taken-Over-Pass-77!"}),
        ),
        (
            Method::PATCH,
            format!("/api/v1/users/{ada_id}"),
            json!({"email": "attacker@example.org"}),
        ),
        (
            Method::POST,
            format!("/api/v1/users/{ada_id}/totp/reset"),
            json!({}),
        ),
    ] {
        let res = s.send_as(m.clone(), &path, &c.admin, Some(body)).await;
        let st = res.status().as_u16();
        assert!(st == 409 || st == 404, "{m} {path}: {st}");
    }
    assert_eq!(
        json(s.get_as("/api/v1/auth/me", &me).await).await["email"],
        "ada@example.org"
    );
    // Inviting needs patients:read too (the invitation names the record's address).
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/roles",
            &c.admin,
            Some(json!({"name": "registrar", "permissions": ["patients:write"]})),
        )
        .await;
    assert_eq!(res.status(), 201);
    s.user("reg", "registrar", PW).await;
    let reg = s.login("reg", PW).await;
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{}/invitation", c.b),
            &reg,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 403);

    // A link to a record erased since leads nowhere.
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/patients/{}", c.b),
            &c.doctor,
            Some(json!({"email": "bert@example.org"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let n = sink.count();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{}/invitation", c.b),
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let mail = sink.wait_for(n).await;
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/patients/{}", c.b),
            &c.doctor,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(
        accept(mail.token(), "bert", "1970-05-06").await.status(),
        400
    );
}

both_backends!(the_patient_sees_who_accessed_their_record);
async fn the_patient_sees_who_accessed_their_record(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    patient_account(&s, "ada", &c.a).await;
    let me = s.login("ada", PW).await;
    // The patient's own reads are not disclosures.
    assert_eq!(status(&s, Method::GET, "/api/v1/me/record", &me).await, 200);
    // A nurse reads through FHIR; a porter breaks the glass with a reason.
    s.user("nina", "nurse", PW).await;
    let nurse = s.login("nina", PW).await;
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", c.a),
        Some(&nurse),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/roles",
            &c.admin,
            Some(json!({"name": "porter", "permissions": ["breakglass"]})),
        )
        .await;
    assert_eq!(res.status(), 201);
    s.user("pat", "porter", PW).await;
    let porter = s.login("pat", PW).await;
    let res = s
        .client
        .get(s.url(&format!("/api/v1/patients/{}", c.a)))
        .bearer_auth(&porter)
        .header(
            "x-break-glass-reason",
            "Collapsed in the lobby, no staff near",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // An app the patient connected reads the record: listed, with the app.
    let app = register(&s, &c.admin, app_body(false, FULL)).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let params = request(
        &s,
        &app.id,
        "launch/patient patient/Patient.rs patient/Observation.rs",
        &ch,
    );
    let mut b = Browser::new(&s);
    b.sign_in("ada", PW).await;
    let code = consent(&mut b, &authorize_path(&params), None, None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], c.a.as_str());
    let at = t["access_token"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={}", c.a),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 200);

    let page = json(s.get_as("/api/v1/me/disclosures", &me).await).await;
    let items = page["items"].as_array().unwrap();
    let by = |who: &str| {
        items
            .iter()
            .filter(|d| d["actor"] == who)
            .cloned()
            .collect::<Vec<Value>>()
    };
    assert!(!by("doc").is_empty(), "the doctor's writes: {page}");
    assert!(!by("nina").is_empty(), "the nurse's read");
    let glass = by("pat");
    assert!(
        glass
            .iter()
            .any(|d| d["break_glass"] == true
                && d["purpose"] == "Collapsed in the lobby, no staff near"),
        "{glass:?}"
    );
    let ada = by("ada");
    assert!(!ada.is_empty(), "the app's reads are listed: {page}");
    assert!(
        ada.iter().all(|d| d["app"] == app.id.as_str()),
        "only the app's reads, not the patient's own: {ada:?}"
    );
    // Nobody edits it: there is no such route.
    for m in [Method::DELETE, Method::PATCH, Method::PUT, Method::POST] {
        let st = status(&s, m.clone(), "/api/v1/me/disclosures", &me).await;
        assert_eq!(st, 405, "{m}");
    }
    // The portal page says the same.
    let (st, html) = b.get("/my/disclosures").await;
    assert_eq!(st, 200);
    assert!(html.contains("nina") && html.contains("Collapsed in the lobby"));
    assert!(html.contains("emergency access"));

    // The app is confined to the patient's own record, whatever it asks; the patient
    // can disconnect it.
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", c.b),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let apps = json(s.get_as("/api/v1/auth/apps", &me).await).await;
    let grant = apps["items"][0]["id"].as_str().unwrap().to_owned();
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/auth/apps/{grant}"),
            &me,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{}", c.a),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 401);
}

both_backends!(a_patient_grants_apps_only_its_own_record);
async fn a_patient_grants_apps_only_its_own_record(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    patient_account(&s, "ada", &c.a).await;
    let app = register(&s, &c.admin, app_body(false, FULL)).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let mut b = Browser::new(&s);
    b.sign_in("ada", PW).await;
    // user/ scopes alone: refused, back to the app.
    let params = request(&s, &app.id, "user/Patient.rs", &ch);
    let (st, _, loc) = b.get_full(&authorize_path(&params)).await;
    assert_eq!(st, 303);
    assert!(loc.unwrap().contains("error=invalid_scope"));
    // Mixed: only the patient/ ones are offered, for the own record, no picker.
    let params = request(&s, &app.id, "launch/patient user/*.rs patient/*.rs", &ch);
    let (st, html, _) = b.get_full(&authorize_path(&params)).await;
    assert_eq!(st, 200);
    assert!(!html.contains("value=\"user/"), "{html}");
    assert!(
        !html.contains("picker_q"),
        "no patient picker for a patient"
    );
    // A forged choice of another patient is ignored: the grant is the own record.
    let code = consent(&mut b, &authorize_path(&params), Some(&c.b), None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["patient"], c.a.as_str());
    assert!(!t["scope"].as_str().unwrap().contains("user/"), "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let (st, _, v) = fhir(&s, Method::GET, "/fhir/Observation", Some(&at), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["total"], 1);
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", c.b_obs),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);
    // patient/*.rs includes no write, and a patient's app writes nothing anyway.
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{}", c.a)}});
    let (st, _, _) = fhir(&s, Method::POST, "/fhir/Observation", Some(&at), Some(obs)).await;
    assert_eq!(st, 403);
}

both_backends!(an_amendment_goes_from_request_to_decision);
async fn an_amendment_goes_from_request_to_decision(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    doctors_review(&s, &c.admin).await;
    patient_account(&s, "ada", &c.a).await;
    let me = s.login("ada", PW).await;
    s.user("nurse", "nurse", PW).await;
    let nurse = s.login("nurse", PW).await;
    let ask = |body: Value| {
        let s = &s;
        let me = me.clone();
        async move {
            s.send_as(Method::POST, "/api/v1/me/amendments", &me, Some(body))
                .await
        }
    };
    // Only the patient's own record, only known fields.
    for body in [
        json!({"target": {"resource": "record", "id": c.b_record, "field": "diagnosis"}, "requested": "x", "reason": "y"}),
        json!({"target": {"resource": "record", "id": c.a_record, "field": "version"}, "requested": "x", "reason": "y"}),
        json!({"target": {"resource": "patient", "field": "mrn"}, "requested": "x", "reason": "y"}),
        json!({"target": {"resource": "fhir", "id": format!("Observation/{}", c.b_obs)}, "requested": "x", "reason": "y"}),
        json!({"target": {"resource": "patient", "field": "family_name"}, "requested": "", "reason": "y"}),
    ] {
        let res = ask(body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("Zebulonski"),
            "no oracle on another record: {text}"
        );
    }
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/me/amendments",
            &c.doctor,
            Some(json!({"target": {"resource": "patient", "field": "family_name"}, "requested": "x", "reason": "y"})),
        )
        .await;
    assert_eq!(res.status(), 403, "staff have no amendments of their own");
    let name = json(
        ask(
            json!({"target": {"resource": "patient", "field": "family_name"},
            "requested": "Quillon", "reason": "My name is misspelled."}),
        )
        .await,
    )
    .await;
    assert_eq!(name["status"], "pending");
    let record = json(
        ask(
            json!({"target": {"resource": "record", "id": c.a_record, "field": "diagnosis"},
            "requested": "Sprained left ankle, not right", "reason": "It was the left one."}),
        )
        .await,
    )
    .await;
    let obs = json(
        ask(
            json!({"target": {"resource": "fhir", "id": format!("Observation/{}", c.a_obs)},
            "requested": "The value is 13.5, not 12.5", "reason": "The lab letter says so."}),
        )
        .await,
    )
    .await;
    // 60 days to decide.
    let created = time::OffsetDateTime::parse(
        name["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let due = time::OffsetDateTime::parse(
        name["due_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((due - created).whole_days(), 60);

    // Reviewers only.
    assert_eq!(
        status(&s, Method::GET, "/api/v1/amendments", &nurse).await,
        403
    );
    let pending = json(s.get_as("/api/v1/amendments", &c.doctor).await).await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 3);

    // Accepted: the field is changed, as a new version; the old value is kept.
    let id = name["id"].as_str().unwrap();
    let etag = |res: &reqwest::Response| res.headers()["etag"].to_str().unwrap().to_owned();
    let before = etag(
        &s.get_as(&format!("/api/v1/patients/{}", c.a), &c.doctor)
            .await,
    );
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{id}/accept"),
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let done = json(res).await;
    assert_eq!(done["status"], "accepted");
    assert_eq!(done["previous"], "Quill");
    let res = s
        .get_as(&format!("/api/v1/patients/{}", c.a), &c.doctor)
        .await;
    assert_ne!(before, etag(&res), "a new version");
    assert_eq!(json(res).await["family_name"], "Quillon");
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{id}/accept"),
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 409, "decided once");
    // A FHIR resource is amended by the reviewer, who says how.
    let oid = obs["id"].as_str().unwrap();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{oid}/accept"),
            &c.doctor,
            Some(json!({})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{oid}/accept"),
            &c.doctor,
            Some(json!({"note": "Observation corrected to 13.5 g/dL (version 2)."})),
        )
        .await;
    assert_eq!(res.status(), 200);

    // Denied with a written reason; the patient reads it and disagrees, once.
    let rid = record["id"].as_str().unwrap();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{rid}/deny"),
            &c.doctor,
            Some(json!({"reason": "short"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/amendments/{rid}/deny"),
            &c.doctor,
            Some(json!({"reason": "The X-ray report names the right ankle."})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mine = json(s.get_as("/api/v1/me/amendments", &me).await).await;
    let denied = mine["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == rid)
        .unwrap()
        .clone();
    assert_eq!(denied["status"], "denied");
    assert_eq!(
        denied["decision"],
        "The X-ray report names the right ankle."
    );
    assert!(
        mine["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a.get("previous").is_none()),
        "the replaced value is the reviewers'"
    );
    let path = format!("/api/v1/me/amendments/{rid}/statement");
    let res = s
        .send_as(
            Method::POST,
            &path,
            &me,
            Some(json!({"statement": "I was there: it was my left ankle."})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = s
        .send_as(
            Method::POST,
            &path,
            &me,
            Some(json!({"statement": "again"})),
        )
        .await;
    assert_eq!(res.status(), 409);
    // Attached to the record: reviewers and the chart see it.
    let denied = json(
        s.get_as("/api/v1/amendments?status=denied", &c.doctor)
            .await,
    )
    .await;
    assert_eq!(
        denied["items"][0]["statement"],
        "I was there: it was my left ankle."
    );
    let mut d = Browser::new(&s);
    d.sign_in("doc", PW).await;
    let (_, html) = d.get(&format!("/patients/{}", c.a)).await;
    assert!(
        html.contains("I was there: it was my left ankle."),
        "{html}"
    );

    // Every step is in the audit trail, naming the patient.
    let events = crate::oauth::events(&s, Some(&c.a)).await;
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e.resource_type.as_deref() == Some("amendment"))
        .map(|e| e.action.as_str())
        .collect();
    assert!(
        steps.iter().filter(|a| **a == "create").count() >= 3,
        "{steps:?}"
    );
    assert!(
        steps.iter().filter(|a| **a == "update").count() >= 4,
        "{steps:?}"
    );

    // Undecided past 60 days: raised as a security event, once.
    ask(json!({"target": {"resource": "patient", "field": "phone"},
        "requested": "+1 555 0100", "reason": "New number."}))
    .await;
    let count = |s: &TestServer| {
        s.state
            .security()
            .counts()
            .iter()
            .find(|(r, _)| *r == "amendment_overdue")
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(count(&s), 0);
    s.clock
        .advance(std::time::Duration::from_secs(61 * 24 * 3600));
    let doctor = s.login("doc", PW).await;
    let overdue = json(s.get_as("/api/v1/amendments?status=overdue", &doctor).await).await;
    assert_eq!(overdue["items"].as_array().unwrap().len(), 1);
    assert_eq!(overdue["items"][0]["overdue"], true);
    assert_eq!(count(&s), 1);
    json(s.get_as("/api/v1/amendments", &doctor).await).await;
    assert_eq!(count(&s), 1, "raised once");
}

both_backends!(the_pages_carry_restrictions_and_amendments);
async fn the_pages_carry_restrictions_and_amendments(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    doctors_review(&s, &c.admin).await;
    patient_account(&s, "ada", &c.a).await;
    s.user("nurse", "nurse", PW).await;
    let mut p = Browser::new(&s);
    p.sign_in("ada", PW).await;
    let csrf = p.csrf().await;
    // A restriction from the page (and none without the session's token).
    let (st, _, _) = p
        .post(
            "/my/restrictions",
            &[("csrf", "forged"), ("category", "PSY"), ("role", "doctor")],
        )
        .await;
    assert_eq!(st, 403);
    let (st, _, loc) = p
        .post(
            "/my/restrictions",
            &[("csrf", &csrf), ("category", "PSY"), ("role", "doctor")],
        )
        .await;
    assert_eq!(
        (st, loc.as_deref()),
        (303, Some("/my/restrictions?ok=saved"))
    );
    let (_, html) = p.get("/my/restrictions").await;
    assert!(html.contains("behavioural and mental health") && html.contains("doctor"));
    let (_, html, _) = p
        .post("/my/restrictions", &[("csrf", &csrf), ("category", "PSY")])
        .await;
    assert!(html.contains("restricted already"), "{html}");
    // A correction request from the page.
    let (st, _, loc) = p
        .post(
            "/my/amendments",
            &[
                ("csrf", &csrf),
                ("target", "patient:family_name"),
                ("requested", "Quillon"),
                ("reason", "Misspelled at registration."),
            ],
        )
        .await;
    assert_eq!(
        (st, loc.as_deref()),
        (303, Some("/my/amendments?ok=created"))
    );
    let (_, html, _) = p
        .post(
            "/my/amendments",
            &[
                ("csrf", &csrf),
                ("target", &format!("record:{}:diagnosis", c.b_record)),
                ("requested", "x"),
                ("reason", "y"),
            ],
        )
        .await;
    assert!(html.contains("must be one of your records"), "{html}");
    assert!(!html.contains("Zebulonski"));
    let mine = json(
        s.get_as("/api/v1/me/amendments", &s.login("ada", PW).await)
            .await,
    )
    .await;
    let id = mine["items"][0]["id"].as_str().unwrap().to_owned();

    // The reviewer's pages.
    let mut d = Browser::new(&s);
    d.sign_in("doc", PW).await;
    let (st, html) = d.get("/amendments").await;
    assert_eq!(st, 200);
    assert!(html.contains("Quill, Ada") && html.contains(&id));
    let (st, html) = d.get(&format!("/amendments/{id}")).await;
    assert_eq!(st, 200);
    assert!(html.contains("Misspelled at registration."));
    let dcsrf = d.csrf().await;
    let (st, html, _) = d
        .post(
            &format!("/amendments/{id}/decide"),
            &[("csrf", &dcsrf), ("decision", "deny"), ("reason", "short")],
        )
        .await;
    assert_eq!(st, 200);
    assert!(
        html.contains("reason: must be 10 to 2000 characters"),
        "{html}"
    );
    let (st, _, loc) = d
        .post(
            &format!("/amendments/{id}/decide"),
            &[
                ("csrf", &dcsrf),
                ("decision", "deny"),
                ("reason", "Your passport says Quill."),
            ],
        )
        .await;
    assert_eq!((st, loc.as_deref()), (303, Some("/amendments?ok=saved")));
    // The patient reads why, and answers.
    let (_, html) = p.get("/my/amendments").await;
    assert!(html.contains("Your passport says Quill."));
    let (st, _, _) = p
        .post(
            &format!("/my/amendments/{id}/statement"),
            &[("csrf", &csrf), ("statement", "My passport was wrong too.")],
        )
        .await;
    assert_eq!(st, 303);
    let (_, html) = p.get("/my/amendments").await;
    assert!(html.contains("My passport was wrong too."));

    // Who may open what.
    let mut n = Browser::new(&s);
    n.sign_in("nurse", PW).await;
    for path in [
        "/amendments",
        "/admin/privacy",
        "/my/restrictions",
        "/my/amendments",
    ] {
        let (st, _) = n.get(path).await;
        assert_eq!(st, 403, "{path}");
    }
    let (st, _) = p.get("/amendments").await;
    assert_eq!(st, 403, "a patient reviews nothing");
    let mut a = Browser::new(&s);
    a.sign_in("adm", PW).await;
    let (st, html) = a.get("/admin/privacy").await;
    assert_eq!(st, 200);
    assert!(html.contains("behavioural and mental health") && html.contains("Quill, Ada"));
}

both_backends!(every_staff_route_refuses_a_patient_account);
/// The OpenAPI sweep with a patient token: every route that needs a permission answers
/// 403, with the patient's own record id in the path (a staff route is not a door to
/// one's own record either); the session-only administration likewise.
async fn every_staff_route_refuses_a_patient_account(backend: Backend) {
    let s = TestServer::start(backend).await;
    let c = clinic(&s).await;
    patient_account(&s, "ada", &c.a).await;
    let me = s.login("ada", PW).await;
    let doc = json(s.get("/api/openapi.json").await).await;
    let ops = crate::access::operations(&doc);
    let mut checked = 0;
    for (method, path, scopes) in &ops {
        if scopes.is_empty() {
            continue;
        }
        let path = path.replace("00000000-0000-0000-0000-000000000000", &c.a);
        let res = s.send_as(method.clone(), &path, &me, Some(json!({}))).await;
        let st = res.status().as_u16();
        let body = res.text().await.unwrap();
        assert_eq!(st, 403, "{method} {path} needs {scopes:?}: {body}");
        assert!(
            !body.contains("Quill") && !body.contains(B_CANARY),
            "{method} {path}"
        );
        checked += 1;
    }
    assert!(checked >= 40, "{checked}");
}
