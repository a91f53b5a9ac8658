//! Patients and records: sealed at rest, searchable by blind index, masked per role,
//! de-identified on request, break-glass audited, disclosures accounted for.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, Options, TestServer, json};

const PW: &str = "Correct-Horse-9!";

struct Team {
    doctor: String,
    nurse: String,
    auditor: String,
}

async fn team(s: &TestServer) -> Team {
    s.user("doc", "doctor", PW).await;
    s.user("nur", "nurse", PW).await;
    s.user("aud", "auditor", PW).await;
    Team {
        doctor: s.login("doc", PW).await,
        nurse: s.login("nur", PW).await,
        auditor: s.login("aud", PW).await,
    }
}

fn ada() -> Value {
    json!({"given_name": "Ada", "family_name": "Lovelace", "birth_date": "1961-07-04", "sex": "female",
           "ssn": "123-45-6789", "email": "ada@example.org", "phone": "+1 555 0100", "address": "1 Analytical Way"})
}

async fn create(s: &TestServer, t: &str, body: Value) -> Value {
    let res = s
        .send_as(Method::POST, "/api/v1/patients", t, Some(body))
        .await;
    assert_eq!(res.status(), 201);
    json(res).await
}

async fn patients_round_trip_with_concurrency_control(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let p = create(&s, &t.doctor, ada()).await;
    let id = p["id"].as_str().unwrap();
    assert!(p["mrn"].as_str().unwrap().starts_with("MRN-"));
    assert_eq!(p["ssn"], "123-45-6789");
    let res = s.get_as(&format!("/api/v1/patients/{id}"), &t.doctor).await;
    assert_eq!(res.headers()["etag"], "\"v1\"");
    assert_eq!(json(res).await["family_name"], "Lovelace");
    // A stale If-Match is refused.
    let patch = |etag: &'static str, body: Value| {
        s.client
            .patch(s.url(&format!("/api/v1/patients/{id}")))
            .bearer_auth(&t.doctor)
            .header("if-match", etag)
            .json(&body)
    };
    let res = patch(
        "\"v1\"",
        json!({"phone": null, "given_name": "Augusta Ada"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"v2\"");
    let b = json(res).await;
    assert_eq!(b["given_name"], "Augusta Ada");
    assert!(b["phone"].is_null());
    let res = patch("\"v1\"", json!({"given_name": "Lost update"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    assert_eq!(json(res).await["code"], "precondition_failed");
    // Validation lists every field, never echoing the value.
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            &t.doctor,
            Some(
                json!({"given_name": "", "family_name": "X", "birth_date": "1961-02-30",
            "ssn": "666-12-3456", "email": "SECRET-CANARY", "sex": "robot"}),
            ),
        )
        .await;
    assert_eq!(res.status(), 422);
    let text = res.text().await.unwrap();
    assert!(!text.contains("SECRET-CANARY"));
    let b: Value = serde_json::from_str(&text).unwrap();
    let fields: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["given_name", "birth_date", "sex", "ssn", "email"]);
    // Duplicate MRN.
    let mut dup = ada();
    dup["mrn"] = p["mrn"].clone();
    assert_eq!(
        s.send_as(Method::POST, "/api/v1/patients", &t.doctor, Some(dup))
            .await
            .status(),
        409
    );
    // Soft delete.
    assert_eq!(
        s.send_as(
            Method::DELETE,
            &format!("/api/v1/patients/{id}"),
            &t.doctor,
            None
        )
        .await
        .status(),
        204
    );
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{id}"), &t.doctor)
            .await
            .status(),
        404
    );
}
both_backends!(patients_round_trip_with_concurrency_control);

async fn minimum_necessary_per_role(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let id = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let nurse_view = json(s.get_as(&format!("/api/v1/patients/{id}"), &t.nurse).await).await;
    assert_eq!(nurse_view["ssn"], "XXX-XX-6789");
    assert_eq!(nurse_view["given_name"], "Ada");
    // Nurses read but do not write.
    assert_eq!(
        s.send_as(
            Method::PATCH,
            &format!("/api/v1/patients/{id}"),
            &t.nurse,
            Some(json!({"phone": "1"}))
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        s.send_as(Method::POST, "/api/v1/patients", &t.nurse, Some(ada()))
            .await
            .status(),
        403
    );
    // Auditors do not read patients.
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{id}"), &t.auditor)
            .await
            .status(),
        403
    );
    // De-identified view.
    let anon = json(
        s.get_as(&format!("/api/v1/patients/{id}?anonymize=true"), &t.doctor)
            .await,
    )
    .await;
    assert_eq!(anon["given_name"], "REDACTED");
    assert_eq!(anon["family_name"], "REDACTED");
    assert_eq!(anon["birth_date"], "1961");
    for field in ["ssn", "email", "mrn", "phone", "address"] {
        assert!(anon[field].is_null(), "{field}: {anon}");
    }
    let pseudo = anon["id"].as_str().unwrap();
    assert!(pseudo.starts_with("anon-") && !pseudo.contains(&id[..8]));
    let again = json(
        s.get_as(&format!("/api/v1/patients/{id}?anonymize=true"), &t.nurse)
            .await,
    )
    .await;
    assert_eq!(again["id"], pseudo, "the pseudonym is stable");
    // Over 89: "90+".
    let mut old = ada();
    old["birth_date"] = json!("1920-01-01");
    let oid = create(&s, &t.doctor, old).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let anon = json(
        s.get_as(&format!("/api/v1/patients/{oid}?anonymize=true"), &t.doctor)
            .await,
    )
    .await;
    assert_eq!(anon["birth_date"], "90+");
}
both_backends!(minimum_necessary_per_role);

/// The de-identified view (Safe Harbor): no SSN or email, not even masked, and nothing in
/// a search page, a record list, their ids or their cursors that leads back to a real id.
/// Following the cursors pages through everything, and a de-identified page continues
/// only from a de-identified cursor.
async fn de_identified_answers_lead_back_to_nothing(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let mut real = Vec::new();
    let mut pids = Vec::new();
    for i in 0..3 {
        let mut p = ada();
        p["mrn"] = json!(format!("MRN-DEID-{i}"));
        p["ssn"] = json!(format!("321-54-{:04}", 9870 + i));
        p["email"] = json!(format!("deid{i}@example.org"));
        let made = create(&s, &t.doctor, p).await;
        let pid = made["id"].as_str().unwrap().to_owned();
        real.extend([
            pid.clone(),
            made["mrn"].as_str().unwrap().to_owned(),
            made["ssn"].as_str().unwrap().to_owned(),
        ]);
        for d in ["Asthma", "Gout"] {
            let r = s
                .send_as(
                    Method::POST,
                    &format!("/api/v1/patients/{pid}/records"),
                    &t.doctor,
                    Some(json!({"diagnosis": d, "notes": "n"})),
                )
                .await;
            real.push(json(r).await["id"].as_str().unwrap().to_owned());
        }
        pids.push(pid);
    }
    let leaks = |text: &str| -> Vec<String> {
        let mut found: Vec<String> = real
            .iter()
            .filter(|r| text.contains(r.as_str()))
            .cloned()
            .collect();
        for marker in ["XXX-XX", "@", "Lovelace", "Ada", "Asthma", "Gout"] {
            if text.contains(marker) {
                found.push(marker.to_owned());
            }
        }
        found
    };
    // Every page of a de-identified search, one patient per page.
    let mut pseudonyms = Vec::new();
    let mut url = "/api/v1/patients?q=lovelace&anonymize=true&limit=1".to_owned();
    for _ in 0..10 {
        let res = s.get_as(&url, &t.doctor).await;
        assert_eq!(res.status(), 200, "{url}");
        let headers = format!("{:?}", res.headers());
        let text = res.text().await.unwrap();
        assert!(leaks(&text).is_empty(), "{:?} in {text}", leaks(&text));
        assert!(leaks(&headers).is_empty(), "{headers}");
        let page: Value = serde_json::from_str(&text).unwrap();
        let p = &page["items"][0];
        for field in ["ssn", "email", "mrn", "phone", "address"] {
            assert!(p[field].is_null(), "{field}: {p}");
        }
        pseudonyms.push(p["id"].as_str().unwrap().to_owned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                url = format!(
                    "/api/v1/patients?q=lovelace&anonymize=true&limit=1&cursor={}",
                    form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
                )
            }
            None => break,
        }
    }
    let mut distinct = pseudonyms.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "the cursors page through every patient once"
    );
    // A de-identified page does not continue from a real id.
    let res = s
        .get_as(
            &format!("/api/v1/patients?anonymize=true&cursor={}", pids[0]),
            &t.doctor,
        )
        .await;
    assert_eq!(res.status(), 422);
    // Every page of a patient's de-identified records.
    let anon_patient = json(
        s.get_as(
            &format!("/api/v1/patients/{}?anonymize=true", pids[1]),
            &t.doctor,
        )
        .await,
    )
    .await;
    let mut url = format!(
        "/api/v1/patients/{}/records?anonymize=true&limit=1",
        pids[1]
    );
    let mut records = Vec::new();
    for _ in 0..10 {
        let res = s.get_as(&url, &t.nurse).await;
        assert_eq!(res.status(), 200, "{url}");
        let text = res.text().await.unwrap();
        assert!(leaks(&text).is_empty(), "{:?} in {text}", leaks(&text));
        let page: Value = serde_json::from_str(&text).unwrap();
        let r = &page["items"][0];
        assert_eq!(
            r["patient_id"], anon_patient["id"],
            "the patient's pseudonym"
        );
        records.push(r["id"].as_str().unwrap().to_owned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                url = format!(
                    "/api/v1/patients/{}/records?anonymize=true&limit=1&cursor={}",
                    pids[1],
                    form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
                )
            }
            None => break,
        }
    }
    records.sort();
    records.dedup();
    assert_eq!(
        records.len(),
        2,
        "the cursors page through every record once"
    );
}
both_backends!(de_identified_answers_lead_back_to_nothing);

async fn search_uses_blind_indexes_and_names_the_patients(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let a = create(&s, &t.doctor, ada()).await;
    let mut grace = ada();
    grace["given_name"] = json!("Grace");
    grace["family_name"] = json!("Hopper");
    grace["ssn"] = json!("234-56-7890");
    grace["birth_date"] = json!("1906-12-09");
    let g = create(&s, &t.doctor, grace).await;
    let search = |q: &str| {
        let url = format!(
            "/api/v1/patients?q={}",
            form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        );
        let s = &s;
        let t = t.nurse.clone();
        async move {
            let b = json(s.get_as(&url, &t).await).await;
            b["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let (aid, gid) = (
        a["id"].as_str().unwrap().to_owned(),
        g["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(search("lovelace").await, [aid.as_str()]);
    assert_eq!(search("  GRACE ").await, [gid.as_str()]);
    assert_eq!(search("1961-07-04").await, [aid.as_str()]);
    assert_eq!(search(a["mrn"].as_str().unwrap()).await, [aid.as_str()]);
    assert_eq!(
        search("Love").await,
        [aid.as_str()],
        "a prefix of 3 letters or more"
    );
    assert!(
        search("Lo").await.is_empty(),
        "2 letters match whole names only"
    );
    assert!(search("ovel").await.is_empty(), "no infix");
    let mut all = search("").await;
    all.sort();
    let mut both = vec![aid.clone(), gid.clone()];
    both.sort();
    assert_eq!(all, both);
    // One audit event for the search, naming the patients returned.
    let res = s.get_as("/api/v1/patients?q=lovelace", &t.nurse).await;
    assert_eq!(res.status(), 200);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let events: Vec<_> =
        custodian::audit::store::query(s.state.db(), &Default::default(), 10_000, true)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.request_id.as_deref() == Some(rid.as_str()))
            .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].action, "search");
    assert_eq!(
        events[0].context,
        format!(r#"{{"count":1,"patient_ids":["{aid}"]}}"#)
    );
    // The audit API finds it under the patient, and the accounting of disclosures
    // lists it; a patient the search did not return does not see it.
    let under = |pid: String| {
        let s = &s;
        let auditor = t.auditor.clone();
        let rid = rid.clone();
        async move {
            let b = json(
                s.get_as(
                    &format!("/api/v1/audit/events?patient_id={pid}&limit=500"),
                    &auditor,
                )
                .await,
            )
            .await;
            let d = json(
                s.get_as(
                    &format!("/api/v1/patients/{pid}/disclosures?limit=500"),
                    &auditor,
                )
                .await,
            )
            .await;
            let has = |v: &serde_json::Value| {
                v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["request_id"] == rid.as_str())
            };
            (has(&b), has(&d))
        }
    };
    assert_eq!(under(aid.clone()).await, (true, true));
    assert_eq!(under(gid.clone()).await, (false, false));
    assert!(s.state.audit().verify().await.unwrap().ok);
    // Bad paging.
    assert_eq!(
        s.get_as("/api/v1/patients?limit=0", &t.nurse)
            .await
            .status(),
        422
    );
}
both_backends!(search_uses_blind_indexes_and_names_the_patients);

/// Without `phi:ssn` the SSN is masked, and it is no search key either: an SSN-shaped
/// `q` is a 403 whether or not a patient has that SSN, so the search cannot tell whose
/// it is. With `phi:ssn` it finds the patient.
async fn ssn_is_no_search_key_without_phi_ssn(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let id = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let search = |q: &str, token: &str, extra: &str| {
        let url = format!(
            "/api/v1/patients?q={}{extra}",
            form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        );
        let (s, token) = (&s, token.to_owned());
        async move { s.get_as(&url, &token).await }
    };
    for (q, extra) in [
        ("123-45-6789", ""),
        (" 123-45-6789 ", ""),
        ("123-45-6789", "&anonymize=true"),
        ("234-56-7890", ""),
        ("666-12-3456", ""),
    ] {
        let res = search(q, &t.nurse, extra).await;
        assert_eq!(res.status(), 403, "{q:?}{extra}");
        let body = json(res).await;
        assert_eq!(body["code"], "forbidden");
        assert!(body.get("items").is_none());
    }
    // Other searches still work for the nurse, and the SSN search for the doctor.
    let b = json(search("lovelace", &t.nurse, "").await).await;
    assert_eq!(b["items"][0]["id"], id.as_str());
    let res = search("123-45-6789", &t.doctor, "").await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["items"][0]["id"], id.as_str());
}
both_backends!(ssn_is_no_search_key_without_phi_ssn);

async fn records_follow_their_permissions(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let pid = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{pid}/records"),
            &t.doctor,
            Some(json!({"diagnosis": "Hypertension", "notes": "BP 150/95"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let rid = json(res).await["id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.send_as(
            Method::POST,
            &format!("/api/v1/patients/{pid}/records"),
            &t.nurse,
            Some(json!({"diagnosis": "x"}))
        )
        .await
        .status(),
        403
    );
    let list = json(
        s.get_as(&format!("/api/v1/patients/{pid}/records"), &t.nurse)
            .await,
    )
    .await;
    assert_eq!(list["items"][0]["diagnosis"], "Hypertension");
    let r = json(
        s.get_as(&format!("/api/v1/records/{rid}?anonymize=true"), &t.nurse)
            .await,
    )
    .await;
    assert_eq!(
        (r["diagnosis"].as_str(), r["notes"].as_str()),
        (Some("REDACTED"), Some("REDACTED"))
    );
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/records/{rid}"),
            &t.doctor,
            Some(json!({"treatment": "ACE inhibitor"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["treatment"], "ACE inhibitor");
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{pid}/records"),
            &t.doctor,
            Some(json!({"diagnosis": "", "recorded_at": "yesterday"})),
        )
        .await;
    assert_eq!(res.status(), 422);
    assert_eq!(
        s.send_as(
            Method::DELETE,
            &format!("/api/v1/records/{rid}"),
            &t.doctor,
            None
        )
        .await
        .status(),
        204
    );
    assert_eq!(
        s.get_as(&format!("/api/v1/records/{rid}"), &t.doctor)
            .await
            .status(),
        404
    );
}
both_backends!(records_follow_their_permissions);

/// A user `medic` whose role (`er`) holds `breakglass` and nothing else; their token.
async fn breakglass_user(s: &TestServer) -> String {
    sqlx::query("INSERT INTO roles (name, builtin, created_at) VALUES ('er', 0, '')")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ('er', 'breakglass')")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    s.user("medic", "er", PW).await;
    s.login("medic", PW).await
}

async fn break_glass_is_allowed_flagged_and_accounted(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let pid = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let er = breakglass_user(&s).await;
    let url = s.url(&format!("/api/v1/patients/{pid}"));
    assert_eq!(
        s.client
            .get(&url)
            .bearer_auth(&er)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let res = s
        .client
        .get(&url)
        .bearer_auth(&er)
        .header("x-break-glass-reason", "urgent")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422, "a reason of at least 10 characters");
    let res = s
        .client
        .get(&url)
        .bearer_auth(&er)
        .header("x-break-glass-reason", "Unconscious patient in ER bay 3")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        json(res).await["ssn"],
        "XXX-XX-6789",
        "break-glass does not lift SSN masking"
    );
    // Every break-glass use raises a security event (counted before the answer).
    let raised = s.state.security().counts();
    assert!(raised.contains(&("break_glass", 1)), "{raised:?}");
    // A nurse (no breakglass permission) cannot use the header to read more than allowed.
    let res = s
        .client
        .get(s.url(&format!("/api/v1/patients/{pid}/records")))
        .bearer_auth(&t.auditor)
        .header("x-break-glass-reason", "Just looking around here")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // Review: the break-glass view of the audit log, and the patient's disclosures.
    let bg = json(
        s.get_as("/api/v1/audit/events?action=break_glass", &t.auditor)
            .await,
    )
    .await;
    let item = &bg["items"][0];
    assert_eq!(item["break_glass"], true);
    assert_eq!(item["reason"], "Unconscious patient in ER bay 3");
    assert_eq!(item["patient_id"], pid.as_str());
    let d = json(
        s.get_as(&format!("/api/v1/patients/{pid}/disclosures"), &t.auditor)
            .await,
    )
    .await;
    let items = d["items"].as_array().unwrap();
    assert!(items.iter().any(|i| i["actor"] == "medic"
        && i["purpose"] == "Unconscious patient in ER bay 3"
        && i["break_glass"] == true));
    assert!(
        items
            .iter()
            .any(|i| i["actor"] == "doc" && i["action"] == "create")
    );
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{pid}/disclosures"), &t.doctor)
            .await
            .status(),
        403
    );
}
both_backends!(break_glass_is_allowed_flagged_and_accounted);

/// Break-glass opens the patient it names and that patient's records, nothing wider: a
/// list or a search of patients is refused even with a reason. And every break-glass
/// access, to the patient or to their records, is a `break_glass` event naming the
/// patient and a security event.
async fn break_glass_opens_one_patient_and_always_raises(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let pid = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut other = ada();
    other["family_name"] = json!("Byron");
    create(&s, &t.doctor, other).await;
    let res = s
        .send_as(
            Method::POST,
            &format!("/api/v1/patients/{pid}/records"),
            &t.doctor,
            Some(json!({"diagnosis": "Hypertension"})),
        )
        .await;
    let rid = json(res).await["id"].as_str().unwrap().to_owned();
    let er = breakglass_user(&s).await;
    let glass = |path: String| {
        let s = &s;
        let er = er.clone();
        async move {
            s.client
                .get(s.url(&path))
                .bearer_auth(&er)
                .header("x-break-glass-reason", "Unconscious patient in ER bay 3")
                .send()
                .await
                .unwrap()
        }
    };
    // Never a list or a search.
    for path in [
        "/api/v1/patients",
        "/api/v1/patients?q=lovelace",
        "/api/v1/patients?anonymize=true",
    ] {
        let res = glass(path.to_owned()).await;
        assert_eq!(res.status(), 403, "{path}");
        assert_eq!(json(res).await["code"], "forbidden");
    }
    let raised = |s: &TestServer| {
        s.state
            .security()
            .counts()
            .into_iter()
            .find(|(r, _)| *r == "break_glass")
            .map_or(0, |(_, n)| n)
    };
    assert_eq!(raised(&s), 0, "a refused list is not a break-glass access");
    // The named patient's records, and one record: each raises.
    let res = glass(format!("/api/v1/patients/{pid}/records")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["items"][0]["diagnosis"], "Hypertension");
    assert_eq!(raised(&s), 1, "a break-glass read of the records raises");
    let res = glass(format!("/api/v1/records/{rid}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(raised(&s), 2, "a break-glass read of a record raises");
    let res = glass(format!("/api/v1/patients/{pid}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(raised(&s), 3);
    // Each is a `break_glass` event naming the patient, with the reason.
    let bg = json(
        s.get_as("/api/v1/audit/events?action=break_glass", &t.auditor)
            .await,
    )
    .await;
    let items = bg["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{bg}");
    assert!(items.iter().all(|e| e["patient_id"] == pid.as_str()
        && e["break_glass"] == true
        && e["reason"] == "Unconscious patient in ER bay 3"));
    let paths: Vec<&str> = items.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/patients/{id}",
            "/api/v1/records/{id}",
            "/api/v1/patients/{id}/records"
        ]
    );
}
both_backends!(break_glass_opens_one_patient_and_always_raises);

async fn ciphertexts_moved_in_the_database_do_not_open(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let a = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut other = ada();
    other["mrn"] = json!("MRN-OTHER");
    let b = create(&s, &t.doctor, other).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let db = s.state.db();
    // Column swap inside one row.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE patients SET family_name = given_name WHERE id = '{a}'"
    )))
    .execute(db.writer())
    .await
    .unwrap();
    let res = s.get_as(&format!("/api/v1/patients/{a}"), &t.doctor).await;
    assert_eq!(res.status(), 500);
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = res.text().await.unwrap();
    assert!(!body.contains("Ada") && body.contains(&rid));
    // Row swap: b's sealed SSN copied into a row it was not made for.
    let ssn_b: (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ssn FROM patients WHERE id = '{b}'"
    )))
    .fetch_one(db.reader())
    .await
    .unwrap();
    sqlx::query("UPDATE patients SET given_name = family_name WHERE id = $1")
        .bind(&a)
        .execute(db.writer())
        .await
        .unwrap();
    let _ = ssn_b;
    let c = create(
        &s,
        &t.doctor,
        json!({"given_name": "C", "family_name": "D", "birth_date": "1990-01-01", "mrn": "MRN-C"}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b_given: (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT given_name FROM patients WHERE id = '{b}'"
    )))
    .fetch_one(db.reader())
    .await
    .unwrap();
    sqlx::query("UPDATE patients SET given_name = $1 WHERE id = $2")
        .bind(&b_given.0)
        .bind(&c)
        .execute(db.writer())
        .await
        .unwrap();
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{c}"), &t.doctor)
            .await
            .status(),
        500
    );
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{b}"), &t.doctor)
            .await
            .status(),
        200
    );
}
both_backends!(ciphertexts_moved_in_the_database_do_not_open);

const CANARIES: [&str; 9] = [
    "Canarygiven",
    "Canaryfamily",
    "587-65-4321",
    "canary-mail@example.org",
    "+1 555 0199",
    "7 Canary Wharf",
    "CanaryDiagnosisXYZ",
    "CanaryTreatmentXYZ",
    "CanaryNotesXYZ",
];

/// Every PHI field carries a canary; after exercising every endpoint (errors included),
/// no canary is in the database (files or rows), in any error body, or in the audit trail.
async fn canaries_never_reach_storage_errors_or_audit(backend: Backend) {
    let s = TestServer::start_with(backend, Options::default()).await;
    let t = team(&s).await;
    let body = json!({"given_name": CANARIES[0], "family_name": CANARIES[1], "birth_date": "1970-03-03", "ssn": CANARIES[2],
        "email": CANARIES[3], "phone": CANARIES[4], "address": CANARIES[5], "mrn": "MRN-CANARY-1"});
    let p = create(&s, &t.doctor, body).await;
    let pid = p["id"].as_str().unwrap().to_owned();
    let r = json(
        s.send_as(
            Method::POST,
            &format!("/api/v1/patients/{pid}/records"),
            &t.doctor,
            Some(json!({"diagnosis": CANARIES[6], "treatment": CANARIES[7], "notes": CANARIES[8]})),
        )
        .await,
    )
    .await;
    let rid = r["id"].as_str().unwrap().to_owned();
    let mut error_bodies = Vec::new();
    for (m, path, tok, body) in [
        (
            Method::GET,
            format!("/api/v1/patients?q={}", CANARIES[0]),
            &t.auditor,
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/patients/{pid}"),
            &t.auditor,
            None,
        ),
        (
            Method::PATCH,
            format!("/api/v1/patients/{pid}"),
            &t.doctor,
            Some(json!({"email": CANARIES[0], "ssn": CANARIES[1]})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/patients/{pid}"),
            &t.doctor,
            Some(json!({"given_name": CANARIES[0], "oops": CANARIES[1]})),
        ),
        (
            Method::POST,
            "/api/v1/patients".to_owned(),
            &t.doctor,
            Some(json!({"given_name": CANARIES[0], "family_name": 5, "birth_date": CANARIES[2]})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/records/{rid}"),
            &t.doctor,
            Some(json!({"recorded_at": CANARIES[6]})),
        ),
        (
            Method::GET,
            format!("/api/v1/records/{rid}"),
            &t.auditor,
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/patients/{pid}/records?limit={}", CANARIES[0]),
            &t.nurse,
            None,
        ),
    ] {
        let res = s.send_as(m, &path, tok, body).await;
        assert!(res.status().is_client_error(), "{path}");
        error_bodies.push(res.text().await.unwrap());
    }
    for b in &error_bodies {
        for c in CANARIES {
            assert!(!b.contains(c), "{c} in an error body: {b}");
        }
    }
    // The audit trail.
    let trail = serde_json::to_string(
        &custodian::audit::store::query(s.state.db(), &Default::default(), 100_000, true)
            .await
            .unwrap(),
    )
    .unwrap();
    // The database: every text column of every table.
    let dump = match backend {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for f in ["test.sqlite", "test.sqlite-wal"] {
                if let Ok(b) = std::fs::read(s.db.path().join(f)) {
                    bytes.extend(b);
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Backend::Postgres => {
            let mut out = String::new();
            for table in [
                "patients",
                "records",
                "audit_events",
                "users",
                "login_attempts",
                "sessions",
                "meta",
            ] {
                let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT row_to_json(t)::text FROM {table} t"
                )))
                .fetch_all(s.state.db().reader())
                .await
                .unwrap();
                for r in rows {
                    out.push_str(&r.0);
                }
            }
            out
        }
    };
    assert!(dump.len() > 1000);
    for c in CANARIES {
        assert!(!trail.contains(c), "{c} reached the audit trail");
        assert!(!dump.contains(c), "{c} is in the database in the clear");
    }
    // And the data is all there for those allowed.
    let back = json(
        s.get_as(&format!("/api/v1/patients/{pid}"), &t.doctor)
            .await,
    )
    .await;
    assert_eq!(back["ssn"], CANARIES[2]);
}
both_backends!(canaries_never_reach_storage_errors_or_audit);

/// Rotation and online rewrap while reads run: no request fails, every key moves.
async fn rewrap_under_load(backend: Backend) {
    // The readers send as fast as the server answers: rate limits are not what this
    // tests (with reads in place they answered 429 before the rewrap ended).
    let s = TestServer::start_with(backend, Options::unlimited()).await;
    let t = team(&s).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let mut p = ada();
        p["mrn"] = json!(format!("MRN-L{i}"));
        ids.push(
            create(&s, &t.doctor, p).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for w in 0..4 {
        let (c, base, tok, ids, stop) = (
            s.client.clone(),
            s.base.clone(),
            t.doctor.clone(),
            ids.clone(),
            stop.clone(),
        );
        readers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                let res = c
                    .get(format!("{base}/api/v1/patients/{id}"))
                    .bearer_auth(&tok)
                    .send()
                    .await
                    .unwrap();
                if res.status() == 200 {
                    ok += 1
                } else {
                    failed += 1
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    let path = s.db.path().join("keyring");
    custodian::crypto::Keyring::load(&path)
        .unwrap()
        .rotate("2026-11-23T00:00:00Z")
        .unwrap();
    let n = s.state.patients().rewrap_all(3).await.unwrap();
    assert_eq!(n, 20);
    // New patients now get the new version too (the server picked it up without restart).
    let mut p = ada();
    p["mrn"] = json!("MRN-NEW");
    create(&s, &t.doctor, p).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for r in readers {
        let (o, f) = r.await.unwrap();
        ok += o;
        failed += f;
    }
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed during rotation and rewrap");
    let versions = s.state.patients().key_versions().await.unwrap();
    assert_eq!(versions, [(2, 21)]);
}
both_backends!(rewrap_under_load);

async fn deleted_patients_can_be_crypto_shredded(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let pid = create(&s, &t.doctor, ada()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut keep = ada();
    keep["mrn"] = json!("MRN-KEEP");
    let kept = create(&s, &t.doctor, keep).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.send_as(
            Method::DELETE,
            &format!("/api/v1/patients/{pid}"),
            &t.doctor,
            None
        )
        .await
        .status(),
        204
    );
    // Not yet past the cut-off: nothing happens.
    assert!(
        s.state
            .patients()
            .shred_deleted_before("2000-01-01T00:00:00Z")
            .await
            .unwrap()
            .is_empty()
    );
    let shredded = s
        .state
        .patients()
        .shred_deleted_before("2999-01-01T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(shredded, [pid.as_str()]);
    let row: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT data_key, shredded_at FROM patients WHERE id = $1")
            .bind(&pid)
            .fetch_one(s.state.db().reader())
            .await
            .unwrap();
    assert!(row.0.is_none() && row.1.is_some());
    assert_eq!(
        s.get_as(&format!("/api/v1/patients/{kept}"), &t.doctor)
            .await
            .status(),
        200
    );
    assert!(
        s.state
            .patients()
            .shred_deleted_before("not a time")
            .await
            .is_err()
    );
}
both_backends!(deleted_patients_can_be_crypto_shredded);

async fn name_search_pages_by_name_without_repeats(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let mut made = Vec::new();
    for (i, family) in ["Zyx", "Other", "Zyx", "Zyx", "Else", "Zyx", "Zyx", "Zyx"]
        .iter()
        .enumerate()
    {
        let mut p = ada();
        p["family_name"] = json!(family);
        p["given_name"] = json!(format!("G{i}"));
        p["ssn"] = json!(format!("345-67-{:04}", 1000 + i));
        p["birth_date"] = json!(format!("1970-01-{:02}", 10 + i));
        let id = create(&s, &t.doctor, p).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        made.push((id, *family));
    }
    // One of them is deleted: it never appears.
    let deleted = made[2].0.clone();
    assert_eq!(
        s.send_as(
            Method::DELETE,
            &format!("/api/v1/patients/{deleted}"),
            &t.doctor,
            None
        )
        .await
        .status(),
        204
    );
    // The Zyx patients' given names are G0, G1, …: name order is the order they were made.
    let expected: Vec<String> = made
        .iter()
        .filter(|(id, f)| *f == "Zyx" && *id != deleted)
        .map(|(id, _)| id.clone())
        .collect();
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut url = "/api/v1/patients?q=zyx&limit=2".to_owned();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page = json(s.get_as(&url, &t.nurse).await).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{page}");
        got.extend(items.iter().map(|p| p["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(got, expected, "every match once, in name order");
}
both_backends!(name_search_pages_by_name_without_repeats);

/// Writes through the pool's writer and audit batches through the audit writer's own
/// connection (SQLite in place: two writing connections on one file) wait for each
/// other instead of failing: 60 creations and 60 audited reads at once all succeed,
/// every one has its event, and the chain verifies.
async fn concurrent_writes_and_audited_reads_all_succeed(backend: Backend) {
    let s = TestServer::start_with(backend, Options::unlimited()).await;
    let t = team(&s).await;
    let first = create(&s, &t.doctor, ada()).await;
    let id = first["id"].as_str().unwrap().to_owned();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (c, base, tok, id) = (
            s.client.clone(),
            s.base.clone(),
            t.doctor.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut p = ada();
            p["mrn"] = json!(format!("MRN-C{i}"));
            let w = c
                .post(format!("{base}/api/v1/patients"))
                .bearer_auth(&tok)
                .json(&p)
                .send()
                .await
                .unwrap()
                .status();
            let r = c
                .get(format!("{base}/api/v1/patients/{id}"))
                .bearer_auth(&tok)
                .send()
                .await
                .unwrap()
                .status();
            (w.as_u16(), r.as_u16())
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), (201, 200));
    }
    let v = s.state.audit().verify().await.unwrap();
    assert!(v.ok, "{v:?}");
    let page = s
        .state
        .audit()
        .page(
            &custodian::audit::store::Filter {
                patient_id: Some(id),
                action: Some("read".into()),
                ..Default::default()
            },
            200,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 60);
}
both_backends!(concurrent_writes_and_audited_reads_all_succeed);
