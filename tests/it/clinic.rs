//! The clinician workspace over HTTP (issue 22): who reaches which page, break-glass
//! bound to one patient and one session, writes refused without their permission,
//! records kept to their own patient, escaping, and the audit trail of each page.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestServer, json};
use crate::web::{Browser, field};

const PW: &str = "Correct-Horse-9!";

async fn patient(s: &TestServer, token: &str, given: &str, family: &str) -> Value {
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            token,
            Some(json!({"given_name": given, "family_name": family, "birth_date": "1970-05-05", "ssn": "123-45-6789"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    json(res).await
}

async fn signed_in<'a>(s: &'a TestServer, username: &str) -> Browser<'a> {
    let mut b = Browser::new(s);
    b.sign_in(username, PW).await;
    b
}

async fn events_of(s: &TestServer, patient_id: &str) -> Vec<custodian::audit::AuditEvent> {
    custodian::audit::store::query(
        s.state.db(),
        &custodian::audit::store::Filter {
            patient_id: Some(patient_id.to_owned()),
            ..Default::default()
        },
        1000,
        true,
    )
    .await
    .unwrap()
}

async fn break_glass_is_one_patient_one_session_and_a_while(backend: Backend) {
    // Sessions that outlive the break-glass access, to see the access end by itself.
    let s = TestServer::start_with(
        backend,
        crate::support::Options {
            sets: vec![
                ("session.idle_timeout", "2h".into()),
                ("session.absolute_timeout", "12h".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    s.user("doc", "doctor", PW).await;
    crate::delegation::role(&s, "responder", &["breakglass"]).await;
    s.user("resp", "responder", PW).await;
    let doc = s.login("doc", PW).await;
    let a = patient(&s, &doc, "Alma", "Quartermaine").await;
    let b = patient(&s, &doc, "Bodil", "Ravensworth").await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let mut r = signed_in(&s, "resp").await;
    let csrf = r.csrf().await;
    // Never a list or a search.
    for path in ["/patients", "/patients?q=quartermaine", "/patients?q=Qua"] {
        let (st, html) = r.get(path).await;
        assert_eq!(st, 403, "{path}");
        assert!(!html.contains("Quartermaine"), "{path}");
    }
    // The chart: a reason form, nothing of the patient.
    let (st, html) = r.get(&format!("/patients/{a}")).await;
    assert_eq!(st, 403);
    assert!(html.contains("name=\"reason\"") && !html.contains("Quartermaine"));
    // Without the CSRF token: refused; a short reason: refused.
    let (st, _, _) = r
        .post(
            &format!("/patients/{a}/breakglass"),
            &[("reason", "An emergency, truly")],
        )
        .await;
    assert_eq!(st, 403);
    let (st, html, _) = r
        .post(
            &format!("/patients/{a}/breakglass"),
            &[("csrf", &csrf), ("reason", "urgent")],
        )
        .await;
    assert_eq!(st, 403);
    assert!(html.contains("at least 10 characters") && !html.contains("Quartermaine"));
    let (st, _, location) = r
        .post(
            &format!("/patients/{a}/breakglass"),
            &[
                ("csrf", &csrf),
                ("reason", "Unconscious, brought in by ambulance"),
            ],
        )
        .await;
    assert_eq!(
        (st, location.as_deref()),
        (303, Some(format!("/patients/{a}").as_str()))
    );
    let (st, html) = r.get(&format!("/patients/{a}")).await;
    assert_eq!(st, 200);
    assert!(html.contains("Quartermaine") && html.contains("Emergency access"));
    // The access is flagged and names its reason.
    let events = events_of(&s, a).await;
    assert!(
        events.iter().any(|e| e.break_glass
            && e.reason.as_deref() == Some("Unconscious, brought in by ambulance")
            && e.action == "break_glass"),
        "{events:?}"
    );
    // The same cookie opens no other patient (this hand-made browser sends it to every
    // path, unlike a real one), and still no list.
    let (st, html) = r.get(&format!("/patients/{b}")).await;
    assert_eq!(st, 403);
    assert!(!html.contains("Ravensworth"));
    assert_eq!(r.get("/patients?q=quartermaine").await.0, 403);
    // Nor in another session of the same user.
    let cookie = r.cookie("custodian_bg").cloned().unwrap();
    let mut again = signed_in(&s, "resp").await;
    again.set_cookie("custodian_bg", &cookie);
    assert_eq!(again.get(&format!("/patients/{a}")).await.0, 403);
    // And it ends.
    s.clock.advance(Duration::from_secs(31 * 60));
    let (st, html) = r.get(&format!("/patients/{a}")).await;
    assert_eq!(st, 403);
    assert!(html.contains("name=\"reason\"") && !html.contains("Quartermaine"));
}
both_backends!(break_glass_is_one_patient_one_session_and_a_while);

async fn each_door_keeps_its_permission(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("doc", "doctor", PW).await;
    s.user("nur", "nurse", PW).await;
    s.user("aud", "auditor", PW).await;
    let doc = s.login("doc", PW).await;
    let a = patient(&s, &doc, "Cora", "<script>alert(1)</script>").await;
    let b = patient(&s, &doc, "Dina", "Elsewhere").await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let rec = |p: &str| {
        let (s, doc, p) = (&s, doc.clone(), p.to_owned());
        async move {
            let res = s
                .send_as(
                    Method::POST,
                    &format!("/api/v1/patients/{p}/records"),
                    &doc,
                    Some(json!({"diagnosis": "Gout"})),
                )
                .await;
            json(res).await["id"].as_str().unwrap().to_owned()
        }
    };
    let rid_b = rec(b).await;

    // The nurse reads, writes nothing, reveals no SSN.
    let mut n = signed_in(&s, "nur").await;
    let csrf = n.csrf().await;
    let (st, html) = n.get(&format!("/patients/{a}")).await;
    assert_eq!(st, 200);
    assert!(
        (html.contains("&lt;script&gt;") || html.contains("&#60;script&#62;"))
            && !html.contains("<script>alert"),
        "the name is shown, escaped"
    );
    assert!(html.contains("XXX-XX-6789") && !html.contains("123-45-6789"));
    let (st, _, _) = n
        .post(&format!("/patients/{a}/ssn"), &[("csrf", &csrf)])
        .await;
    assert_eq!(st, 403);
    let (st, _, _) = n
        .post(
            &format!("/patients/{a}/records"),
            &[("csrf", &csrf), ("diagnosis", "Nope")],
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(
        n.get(&format!("/patients/{a}/records/{rid_b}/edit"))
            .await
            .0,
        403
    );

    // The doctor: an SSN shown only on the audited click; a record of another patient
    // is not this patient's to edit.
    let mut d = signed_in(&s, "doc").await;
    let csrf = d.csrf().await;
    let (_, html) = d.get(&format!("/patients/{a}")).await;
    assert!(html.contains("XXX-XX-6789") && !html.contains("123-45-6789"));
    let (st, html, _) = d
        .post(&format!("/patients/{a}/ssn"), &[("csrf", &csrf)])
        .await;
    assert_eq!(st, 200);
    assert!(html.contains("123-45-6789"));
    let events = events_of(&s, a).await;
    let reveal = events
        .iter()
        .find(|e| e.path.as_deref() == Some("/patients/{id}/ssn"))
        .expect("the reveal's event");
    assert!(reveal.context.contains("ssn"), "{reveal:?}");
    assert_eq!(
        d.get(&format!("/patients/{a}/records/{rid_b}/edit"))
            .await
            .0,
        404
    );
    let (st, _, _) = d
        .post(
            &format!("/patients/{a}/records/{rid_b}"),
            &[("csrf", &csrf), ("version", "1"), ("diagnosis", "Moved")],
        )
        .await;
    assert_eq!(st, 404);
    let (_, html) = d.get(&format!("/patients/{b}/records/{rid_b}/edit")).await;
    let version = field(&html, "version");
    assert_eq!(version, "1");
    // A stale version saves nothing and shows what is stored.
    let (st, _, _) = d
        .post(
            &format!("/patients/{b}/records/{rid_b}"),
            &[("csrf", &csrf), ("version", "1"), ("diagnosis", "First")],
        )
        .await;
    assert_eq!(st, 303);
    let (st, html, _) = d
        .post(
            &format!("/patients/{b}/records/{rid_b}"),
            &[("csrf", &csrf), ("version", "1"), ("diagnosis", "Second")],
        )
        .await;
    assert_eq!(st, 409);
    assert!(html.contains("First") && html.contains("value=\"Second\""));
    let stored = json(s.get_as(&format!("/api/v1/records/{rid_b}"), &doc).await).await;
    assert_eq!(stored["diagnosis"], "First");
    // A missing patient is a 404 page, and says nothing else.
    assert_eq!(d.get("/patients/no-such-patient").await.0, 404);

    // The auditor reads no chart and no list.
    let mut au = signed_in(&s, "aud").await;
    assert_eq!(au.get(&format!("/patients/{a}")).await.0, 403);
    assert_eq!(au.get("/patients?q=cora").await.0, 403);

    // Each page is one audit event naming its patient; a search names those it showed.
    let (st, _) = n.get("/patients?q=dina%20else").await;
    assert_eq!(st, 200);
    let events = events_of(&s, b).await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "search" && e.path.as_deref() == Some("/patients")),
        "{events:?}"
    );
    let events = events_of(&s, a).await;
    let chart_reads = events
        .iter()
        .filter(|e| {
            e.action == "read"
                && e.path.as_deref() == Some("/patients/{id}")
                && e.resource_type.as_deref() == Some("patient")
                && e.outcome == "success"
        })
        .count();
    assert!(chart_reads >= 2, "the nurse's and the doctor's: {events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.action == "permission_denied" && e.actor.as_deref() == Some("aud")),
        "the auditor's refused chart names the patient too: {events:?}"
    );
}
both_backends!(each_door_keeps_its_permission);
