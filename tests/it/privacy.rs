//! Sensitivity labels and patients' restrictions (issue 25): enforced on every door —
//! `/api/v1`, `/fhir` reads, vreads, searches and `$everything`, SMART apps, the
//! de-identified view, writes, the pages — with no leak by count or by error, and
//! break-glass opening them (flagged, raised).

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::fhir::fhir;
use crate::oauth::{
    FULL, app_body, authorize_path, consent, exchange, register, request, verifier,
};
use crate::support::{Backend, TestServer, json};
use crate::web::Browser;

const PW: &str = "Correct-Horse-9!";
const ACT: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// The behavioural-health Observation's value: never outside the restriction.
const PSY_CANARY: &str = "Canary-Psych-Scale";
/// The HIV record's diagnosis: never outside the restriction.
const HIV_CANARY: &str = "Canary-HIV-Diagnosis";

struct World {
    admin: String,
    doctor: String,
    nurse: String,
    me: String,
    a: String,
    psy_obs: String,
    plain_obs: String,
    hiv_record: String,
}

async fn world(s: &TestServer) -> World {
    s.user("adm", "admin", PW).await;
    s.user("doc", "doctor", PW).await;
    s.user("nina", "nurse", PW).await;
    let admin = s.login("adm", PW).await;
    let doctor = s.login("doc", PW).await;
    let nurse = s.login("nina", PW).await;
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            &doctor,
            Some(json!({"given_name": "Ada", "family_name": "Quill", "birth_date": "1961-02-03"})),
        )
        .await;
    let a = json(res).await["id"].as_str().unwrap().to_owned();
    let obs = |text: &str, labels: &[&str]| {
        let mut v = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"text": text},
            "subject": {"reference": format!("Patient/{a}")},
            "effectiveDateTime": "2026-03-04",
            "valueString": text,
        });
        if !labels.is_empty() {
            v["meta"] = json!({"security": labels.iter().map(|l| json!({"system": ACT, "code": l})).collect::<Vec<_>>()});
        }
        v
    };
    let (st, _, v) = fhir(
        s,
        Method::POST,
        "/fhir/Observation",
        Some(&doctor),
        Some(obs(PSY_CANARY, &["PSY"])),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let psy_obs = v["id"].as_str().unwrap().to_owned();
    // Shown with its label and the confidentiality code R.
    assert!(v["meta"]["security"].to_string().contains("\"R\""), "{v}");
    let (st, _, v) = fhir(
        s,
        Method::POST,
        "/fhir/Observation",
        Some(&doctor),
        Some(obs("Blood pressure fine", &[])),
    )
    .await;
    assert_eq!(st, 201);
    let plain_obs = v["id"].as_str().unwrap().to_owned();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{a}/records"),
            &doctor,
            Some(json!({"diagnosis": HIV_CANARY, "labels": ["hiv"]})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let r = json(res).await;
    assert_eq!(r["labels"], json!(["HIV"]));
    let hiv_record = r["id"].as_str().unwrap().to_owned();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{a}/records"),
            &doctor,
            Some(json!({"diagnosis": "Sprained ankle"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    // Unknown labels are refused.
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{a}/records"),
            &doctor,
            Some(json!({"diagnosis": "x", "labels": ["SECRET"]})),
        )
        .await;
    assert_eq!(res.status(), 422);
    s.state
        .identity()
        .create_patient_user("ada", None, &custodian::config::Secret::new(PW.into()), &a)
        .await
        .unwrap();
    let me = s.login("ada", PW).await;
    World {
        admin,
        doctor,
        nurse,
        me,
        a,
        psy_obs,
        plain_obs,
        hiv_record,
    }
}

/// No answer outside the restriction names a withheld item or its category.
fn clean(text: &str) {
    for leak in [
        PSY_CANARY,
        HIV_CANARY,
        "\"PSY\"",
        "\"HIV\"",
        "behavioural",
        "HIV/AIDS",
    ] {
        assert!(!text.contains(leak), "{leak} in {text}");
    }
}

async fn restrict(s: &TestServer, me: &str, body: Value) -> Value {
    let res = s
        .send_as(Method::POST, "/api/v1/me/restrictions", me, Some(body))
        .await;
    assert_eq!(res.status(), 201);
    json(res).await
}

both_backends!(restrictions_hold_on_every_door);
async fn restrictions_hold_on_every_door(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let a = &w.a;
    // Before any restriction the nurse sees both observations.
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}"),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(v["total"], 2);

    // The patient restricts PSY to doctors (no app), and HIV to nobody.
    let psy = restrict(
        &s,
        &w.me,
        json!({"category": "PSY", "roles": ["doctor"], "apps": false}),
    )
    .await;
    assert_eq!(psy["consent"]["resourceType"], "Consent");
    assert_eq!(psy["consent"]["provision"]["type"], "deny");
    restrict(&s, &w.me, json!({"category": "hiv"})).await;
    // Refused: a second restriction of a category, an unknown one, the patient role,
    // and anyone but a patient account.
    for (body, want) in [
        (json!({"category": "PSY"}), 409),
        (json!({"category": "XYZ"}), 422),
        (json!({"category": "ETH", "roles": ["patient"]}), 422),
        (json!({"category": "ETH", "roles": ["no-such-role"]}), 422),
    ] {
        let res = s
            .send_as(
                Method::POST,
                "/api/v1/me/restrictions",
                &w.me,
                Some(body.clone()),
            )
            .await;
        assert_eq!(res.status(), want, "{body}");
    }
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/me/restrictions",
            &w.doctor,
            Some(json!({"category": "ETH"})),
        )
        .await;
    assert_eq!(res.status(), 403);
    // Stored sealed: the category is not in the table in clear.
    let bodies: Vec<(String,)> = sqlx::query_as("SELECT body FROM consents")
        .fetch_all(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(
        bodies
            .iter()
            .all(|(b,)| !b.contains("PSY") && !b.contains("HIV"))
    );

    // FHIR search by the nurse: the PSY observation is out of the page and the total;
    // the bundle says one item is withheld, not what.
    let (st, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}"),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 1);
    let text = v.to_string();
    clean(&text);
    assert!(text.contains(&w.plain_obs) && !text.contains(&w.psy_obs));
    assert!(text.contains("REDACTED") && text.contains("suppressed"));
    assert!(text.contains("1 item is withheld"), "{text}");
    // The count does not follow the criteria (a count by code would say what it is).
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}&code:text={PSY_CANARY}"),
        Some(&w.nurse),
        None,
    )
    .await;
    if v.get("total").is_some() {
        assert_eq!(v["total"], 0);
        assert!(v.to_string().contains("1 item is withheld"));
    }
    clean(&v.to_string());
    // Read and vread: 403 "suppressed", no content, no category.
    for path in [
        format!("/fhir/Observation/{}", w.psy_obs),
        format!("/fhir/Observation/{}/_history/1", w.psy_obs),
        format!("/fhir/Condition/record-{}", w.hiv_record),
    ] {
        let (st, _, v) = fhir(&s, Method::GET, &path, Some(&w.nurse), None).await;
        assert_eq!(st, 403, "{path}: {v}");
        assert_eq!(v["issue"][0]["code"], "suppressed", "{v}");
        clean(&v.to_string());
    }
    // The de-identified search withholds the same.
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}&_anonymize=true"),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(v["total"], 1);
    clean(&v.to_string());
    // Conditions: the HIV record is out.
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Condition?patient={a}"),
        Some(&w.nurse),
        None,
    )
    .await;
    clean(&v.to_string());
    assert!(v.to_string().contains("Sprained ankle"));

    // /api/v1 records: out of the list, counted; one by id refused.
    let res = s
        .get_as(&format!("/api/v1/patients/{a}/records"), &w.nurse)
        .await;
    let page = json(res).await;
    clean(&page.to_string());
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["withheld"], 1);
    let res = s
        .get_as(&format!("/api/v1/records/{}", w.hiv_record), &w.nurse)
        .await;
    assert_eq!(res.status(), 403);
    let body = res.text().await.unwrap();
    assert!(body.contains("\"withheld\""), "{body}");
    clean(&body);

    // The doctor: PSY is theirs to see, HIV nobody's.
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&w.doctor),
        None,
    )
    .await;
    assert!(v.to_string().contains(PSY_CANARY));
    let (st, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Patient/{a}/$everything"),
        Some(&w.doctor),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let text = v.to_string();
    assert!(text.contains(PSY_CANARY) && !text.contains(HIV_CANARY));
    assert!(text.contains("1 item is withheld") && text.contains("REDACTED"));
    // A withheld record cannot be changed or deleted by someone it is kept from.
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/records/{}", w.hiv_record),
            &w.doctor,
            Some(json!({"diagnosis": "overwritten blind"})),
        )
        .await;
    assert_eq!(res.status(), 403);
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/records/{}", w.hiv_record),
            &w.doctor,
            None,
        )
        .await;
    assert_eq!(res.status(), 403);
    // …nor a withheld FHIR resource by someone it is kept from (a doctor's app).

    // A doctor's app: no app may see PSY.
    let app = register(&s, &w.admin, app_body(false, FULL)).await;
    let v = verifier();
    let ch = custodian::oauth::s256(&v);
    let params = request(
        &s,
        &app.id,
        "launch/patient patient/Observation.rs patient/Patient.rs",
        &ch,
    );
    let mut b = Browser::new(&s);
    b.sign_in("doc", PW).await;
    let code = consent(&mut b, &authorize_path(&params), Some(a), None).await;
    let (st, t) = exchange(&s, &app, &code, &v).await;
    assert_eq!(st, 200, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}"),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(v["total"], 1);
    clean(&v.to_string());
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&at),
        None,
    )
    .await;
    assert_eq!(st, 403);

    // Break-glass (the administrator holds breakglass): opens it, flagged and raised.
    let before = s
        .state
        .security()
        .counts()
        .iter()
        .find(|(r, _)| *r == "break_glass")
        .map_or(0, |(_, n)| *n);
    let res = s
        .client
        .get(s.url(&format!("/api/v1/records/{}", w.hiv_record)))
        .bearer_auth(&w.admin)
        .header(
            "x-break-glass-reason",
            "Needle-stick exposure of a nurse, urgent",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains(HIV_CANARY));
    let after = s
        .state
        .security()
        .counts()
        .iter()
        .find(|(r, _)| *r == "break_glass")
        .map_or(0, |(_, n)| *n);
    assert!(after > before, "a break-glass use is raised");
    let ev = json(
        s.get_as("/api/v1/audit/events?action=break_glass", &w.admin)
            .await,
    )
    .await;
    assert!(
        ev["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "Needle-stick exposure of a nurse, urgent"),
        "{ev}"
    );
    let reads = json(
        s.get_as(
            &format!("/api/v1/audit/events?patient_id={a}&action=read"),
            &w.admin,
        )
        .await,
    )
    .await;
    assert!(
        reads["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["break_glass"] == true && e["context"]["restriction_overridden"] == true),
        "{reads}"
    );
    // Without the header, the administrator is kept out like anyone.
    let res = s
        .get_as(&format!("/api/v1/records/{}", w.hiv_record), &w.admin)
        .await;
    assert_eq!(res.status(), 403);
    // The patient sees every break-glass access in their accounting.
    let acc = json(s.get_as("/api/v1/me/disclosures", &w.me).await).await;
    assert!(
        acc["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["break_glass"] == true
                && d["purpose"] == "Needle-stick exposure of a nurse, urgent"),
        "{acc}"
    );

    // The patient sees all of their own record.
    let res = s.get_as("/api/v1/me/record", &w.me).await;
    let text = res.text().await.unwrap();
    assert!(text.contains(PSY_CANARY) && text.contains(HIV_CANARY));

    // Staff see that restrictions exist, not which category is kept from them; the
    // privacy officer's report has it all.
    let list = json(
        s.get_as(&format!("/api/v1/patients/{a}/restrictions"), &w.nurse)
            .await,
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    clean(&list.to_string());
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["applies_to_you"] == true)
    );
    let report = json(s.get_as("/api/v1/restrictions", &w.admin).await).await;
    let cats: Vec<&str> = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["category"].as_str().unwrap())
        .collect();
    assert_eq!(cats.len(), 2);
    assert!(cats.contains(&"PSY") && cats.contains(&"HIV"));
    assert_eq!(
        s.get_as("/api/v1/restrictions", &w.nurse).await.status(),
        403
    );

    // The chart: a count, the break-glass offer where the role has it, no content.
    let mut n = Browser::new(&s);
    n.sign_in("nina", PW).await;
    let (st, html) = n.get(&format!("/patients/{a}")).await;
    assert_eq!(st, 200);
    assert!(html.contains("withheld at the patient's request"), "{html}");
    clean(&html);
    let mut adm = Browser::new(&s);
    adm.sign_in("adm", PW).await;
    let (_, html) = adm.get(&format!("/patients/{a}")).await;
    assert!(html.contains("Break the glass"));
    // (The add-record form lists every label; the withheld items are not there.)
    assert!(!html.contains(PSY_CANARY) && !html.contains(HIV_CANARY));
    let (st, html) = n
        .get(&format!("/patients/{a}/records/{}/edit", w.hiv_record))
        .await;
    assert!(st == 403 || st == 404, "{st}");
    clean(&html);

    // Ending a restriction opens the category again.
    let id = psy["id"].as_str().unwrap();
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/me/restrictions/{id}"),
            &w.me,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let (_, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation?patient={a}"),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(v["total"], 2);
    let mine = json(s.get_as("/api/v1/me/restrictions", &w.me).await).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
}

both_backends!(a_label_added_later_covers_older_versions);
async fn a_label_added_later_covers_older_versions(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    restrict(&s, &w.me, json!({"category": "ETH"})).await;
    // The plain observation gets the ETH label in a second version.
    let (_, _, mut v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", w.plain_obs),
        Some(&w.doctor),
        None,
    )
    .await;
    v["meta"] = json!({"security": [{"system": ACT, "code": "ETH"}]});
    let (st, _, v) = fhir(
        &s,
        Method::PUT,
        &format!("/fhir/Observation/{}", w.plain_obs),
        Some(&w.doctor),
        Some(v),
    )
    .await;
    // The doctor's role is not allowed ETH: the answer that would echo it is refused
    // from now on, and so is version 1, from before the label.
    assert_eq!(st, 200, "{v}");
    for path in [
        format!("/fhir/Observation/{}", w.plain_obs),
        format!("/fhir/Observation/{}/_history/1", w.plain_obs),
    ] {
        let (st, _, _) = fhir(&s, Method::GET, &path, Some(&w.doctor), None).await;
        assert_eq!(st, 403, "{path}");
    }
    // And it cannot be changed back blind.
    let (st, _, _) = fhir(
        &s,
        Method::DELETE,
        &format!("/fhir/Observation/{}", w.plain_obs),
        Some(&w.doctor),
        None,
    )
    .await;
    assert_eq!(st, 403);
}

both_backends!(labels_stick_and_requests_about_withheld_items_stay_withheld);
async fn labels_stick_and_requests_about_withheld_items_stay_withheld(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    crate::portal::doctors_review(&s, &w.admin).await;
    let a = &w.a;
    restrict(&s, &w.me, json!({"category": "PSY", "roles": ["doctor"]})).await;
    restrict(&s, &w.me, json!({"category": "HIV"})).await;
    restrict(&s, &w.me, json!({"category": "ETH"})).await;
    // A label in lower case is withheld all the same.
    let (st, _, v) = fhir(
        &s,
        Method::POST,
        "/fhir/Observation",
        Some(&w.doctor),
        Some(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "Canary-Eth"},
            "subject": {"reference": format!("Patient/{a}")},
            "meta": {"security": [{"system": ACT, "code": "eth"}]}}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let eth = v["id"].as_str().unwrap().to_owned();
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{eth}"),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(st, 403);
    // A PUT that leaves meta.security out keeps the labels.
    let (_, _, mut v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&w.doctor),
        None,
    )
    .await;
    v.as_object_mut().unwrap().remove("meta");
    let (st, _, v) = fhir(
        &s,
        Method::PUT,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&w.doctor),
        Some(v),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["meta"]["security"].to_string().contains("PSY"), "{v}");
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(st, 403, "still withheld from the nurse");
    // Deleted since: an old version stays withheld from whoever a restriction keeps out.
    let (st, _, _) = fhir(
        &s,
        Method::DELETE,
        &format!("/fhir/Observation/{}", w.psy_obs),
        Some(&w.doctor),
        None,
    )
    .await;
    assert_eq!(st, 204);
    let (st, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Observation/{}/_history/1", w.psy_obs),
        Some(&w.nurse),
        None,
    )
    .await;
    assert_eq!(st, 403, "{v}");
    clean(&v.to_string());

    // A correction asked about the HIV record: a reviewer kept out of HIV sees that it
    // exists and when it is due, not what it says.
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/me/amendments",
            &w.me,
            Some(json!({"target": {"resource": "record", "id": w.hiv_record, "field": "diagnosis"},
                "requested": "Not Canary-HIV-Diagnosis but something else", "reason": "Wrong test."})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let list = json(s.get_as("/api/v1/amendments", &w.doctor).await).await;
    let item = &list["items"][0];
    assert_eq!(item["requested"], "(withheld at the patient's request)");
    clean(&list.to_string());
    let mut d = Browser::new(&s);
    d.sign_in("doc", PW).await;
    let (_, html) = d
        .get(&format!("/amendments/{}", item["id"].as_str().unwrap()))
        .await;
    clean(&html);
    // The patient reads their own request whole.
    let mine = json(s.get_as("/api/v1/me/amendments", &w.me).await).await;
    assert!(mine.to_string().contains(HIV_CANARY));
}

both_backends!(consents_read_as_fhir_by_the_patient_and_the_privacy_officer);
async fn consents_read_as_fhir_by_the_patient_and_the_privacy_officer(backend: Backend) {
    let s = TestServer::start(backend).await;
    let w = world(&s).await;
    let a = &w.a;
    let psy = restrict(&s, &w.me, json!({"category": "PSY", "roles": ["doctor"]})).await;
    let id = psy["id"].as_str().unwrap().to_owned();
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/me/restrictions/{id}"),
            &w.me,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    restrict(&s, &w.me, json!({"category": "HIV"})).await;
    // The patient: their own, active and ended, without naming themself.
    let (st, _, v) = fhir(&s, Method::GET, "/fhir/Consent", Some(&w.me), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["total"], 2);
    let statuses: Vec<&str> = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses.contains(&"active") && statuses.contains(&"inactive"));
    let (st, h, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Consent/{id}"),
        Some(&w.me),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["resourceType"], "Consent");
    assert_eq!(v["status"], "inactive");
    assert_eq!(h["etag"], "W/\"2\"");
    // The privacy officer (audit:read) reads them; clinicians and apps do not.
    let (st, _, v) = fhir(
        &s,
        Method::GET,
        &format!("/fhir/Consent?patient={a}"),
        Some(&w.admin),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 2);
    for who in [&w.doctor, &w.nurse] {
        let (st, _, v) = fhir(
            &s,
            Method::GET,
            &format!("/fhir/Consent?patient={a}"),
            Some(who),
            None,
        )
        .await;
        assert_eq!(st, 403);
        clean(&v.to_string());
        let (st, _, _) = fhir(
            &s,
            Method::GET,
            &format!("/fhir/Consent/{id}"),
            Some(who),
            None,
        )
        .await;
        assert_eq!(st, 403);
    }
    let (st, _, _) = fhir(&s, Method::GET, "/fhir/Consent", Some(&w.admin), None).await;
    assert_eq!(st, 400, "a search names its patient");
    let (st, _, _) = fhir(
        &s,
        Method::GET,
        "/fhir/Consent/no-such-consent",
        Some(&w.admin),
        None,
    )
    .await;
    assert_eq!(st, 404);
    // Listed in the CapabilityStatement.
    let (_, _, cap) = fhir(&s, Method::GET, "/fhir/metadata", None, None).await;
    assert!(
        cap["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["type"] == "Consent")
    );
}
