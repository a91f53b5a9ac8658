//! Search that finds people (issue 22): full names in either order, prefixes of 3 letters
//! or more, MRNs and birth dates as people type them, ranked by relevance then name —
//! through keyed tags only: what the index does not match, and that the database holds
//! no name or prefix in the clear.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{Backend, TestServer, json};

const PW: &str = "Correct-Horse-9!";

struct Team {
    doctor: String,
    nurse: String,
}

async fn team(s: &TestServer) -> Team {
    s.user("doc", "doctor", PW).await;
    s.user("nur", "nurse", PW).await;
    Team {
        doctor: s.login("doc", PW).await,
        nurse: s.login("nur", PW).await,
    }
}

async fn create(s: &TestServer, token: &str, given: &str, family: &str, birth: &str) -> Value {
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            token,
            Some(json!({"given_name": given, "family_name": family, "birth_date": birth})),
        )
        .await;
    assert_eq!(res.status(), 201, "{given} {family}");
    json(res).await
}

/// The answer to `q` (all pages of `limit`), as "Given Family" strings in answer order.
async fn find(s: &TestServer, token: &str, q: &str, limit: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..200 {
        let mut url = format!(
            "/api/v1/patients?q={}&limit={limit}",
            form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let res = s.get_as(&url, token).await;
        assert_eq!(res.status(), 200, "{q}");
        let page = json(res).await;
        assert_eq!(page["truncated"], false, "{q}: {page}");
        for p in page["items"].as_array().unwrap() {
            out.push(format!(
                "{} {}",
                p["given_name"].as_str().unwrap(),
                p["family_name"].as_str().unwrap()
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("{q}: the pages never end");
}

async fn people_are_found_as_they_are_typed(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let jane = create(&s, &t.doctor, "Jane", "Doe", "1961-07-04").await;
    create(&s, &t.doctor, "John", "Doe", "1950-01-02").await;
    create(&s, &t.doctor, "Jane", "Dowling", "1972-03-04").await;
    create(&s, &t.doctor, "Janet", "Doerr", "1961-07-04").await;
    create(&s, &t.doctor, "Janet", "Smith", "1980-05-06").await;
    create(&s, &t.doctor, "José", "García", "1990-01-01").await;
    create(&s, &t.doctor, "Mary-Ann", "O'Brien", "1955-02-03").await;
    create(&s, &t.doctor, "Li", "Wu", "2001-09-10").await;
    let n = &t.nurse;

    // A full name in either order; a whole word ranks above a prefix.
    assert_eq!(
        find(&s, n, "Jane Doe", 20).await,
        ["Jane Doe", "Janet Doerr"]
    );
    assert_eq!(
        find(&s, n, "doe jane", 20).await,
        ["Jane Doe", "Janet Doerr"]
    );
    // "Family, Given": each word in its part only.
    assert_eq!(
        find(&s, n, "Doe, Jane", 20).await,
        ["Jane Doe", "Janet Doerr"]
    );
    assert!(find(&s, n, "Jane, Doe", 20).await.is_empty());
    // One word: whole-word matches by name, then prefix matches by name.
    assert_eq!(
        find(&s, n, "Doe", 20).await,
        ["Jane Doe", "John Doe", "Janet Doerr"]
    );
    assert_eq!(
        find(&s, n, "jan", 2).await,
        ["Jane Doe", "Janet Doerr", "Jane Dowling", "Janet Smith"],
        "paged two at a time, by family name then given name"
    );
    // Case and accents aside; apostrophes and hyphens as people type them.
    for q in ["garcia", "GARCÍA", "jose garc", "José"] {
        assert_eq!(find(&s, n, q, 20).await, ["José García"], "{q}");
    }
    for q in [
        "obrien",
        "O'Brien",
        "o’brien",
        "mary-ann",
        "Mary Ann",
        "ann obr",
    ] {
        assert_eq!(find(&s, n, q, 20).await, ["Mary-Ann O'Brien"], "{q}");
    }
    // Three words; two words beginning alike (one word of the name may answer both).
    assert_eq!(
        find(&s, n, "mary ann obrien", 20).await,
        ["Mary-Ann O'Brien"]
    );
    assert_eq!(
        find(&s, n, "jan janet", 20).await,
        ["Janet Doerr", "Janet Smith"]
    );
    assert!(find(&s, n, "jose maria garcia", 20).await.is_empty());
    // Names shorter than 3 letters are found whole.
    assert_eq!(find(&s, n, "Wu", 20).await, ["Li Wu"]);
    assert_eq!(find(&s, n, "li wu", 20).await, ["Li Wu"]);
    // Birth dates in the common forms, alone or with a name.
    for q in [
        "1961-07-04",
        "07/04/1961",
        "7/4/61",
        "4 July 1961",
        "Jul 4, 1961",
        "19610704",
    ] {
        assert_eq!(find(&s, n, q, 20).await, ["Jane Doe", "Janet Doerr"], "{q}");
    }
    assert_eq!(
        find(&s, n, "doe 07/04/1961", 20).await,
        ["Jane Doe", "Janet Doerr"]
    );
    assert_eq!(
        find(&s, n, "jane doe 1961-07-04", 20).await,
        ["Jane Doe", "Janet Doerr"]
    );
    // The MRN, whole.
    let mrn = jane["mrn"].as_str().unwrap();
    assert_eq!(find(&s, n, mrn, 20).await, ["Jane Doe"]);
    assert_eq!(find(&s, n, &mrn.to_lowercase(), 20).await, ["Jane Doe"]);

    // What it does not match: infixes, two letters as a prefix, a word nobody has, a
    // date nobody of that name has, part of an MRN.
    for q in [
        "oe",
        "ane",
        "Do",
        "Ja",
        "John Smith",
        "Doe 1999-01-01",
        "arcia",
        "Dxe",
        &mrn[..mrn.len() - 2],
        "1961",
    ] {
        assert!(find(&s, n, q, 20).await.is_empty(), "{q}");
    }

    // A renamed patient is found by the new name only; a deleted one not at all.
    let id = jane["id"].as_str().unwrap();
    let res = s
        .send_as(
            Method::PATCH,
            &format!("/api/v1/patients/{id}"),
            &t.doctor,
            Some(json!({"family_name": "Quayle"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(find(&s, n, "Doe", 20).await, ["John Doe", "Janet Doerr"]);
    assert_eq!(find(&s, n, "quay jane", 20).await, ["Jane Quayle"]);
    let res = s
        .send_as(
            Method::DELETE,
            &format!("/api/v1/patients/{id}"),
            &t.doctor,
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    assert!(find(&s, n, "quayle", 20).await.is_empty());
    let terms: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM patient_terms WHERE patient_id = $1")
        .bind(id)
        .fetch_one(s.state.db().reader())
        .await
        .unwrap();
    assert_eq!(terms.0, 0, "a deleted patient's tags go with it");

    // The FHIR name parameter reads the same index: prefixes, any part, every word.
    let fhir = |q: &'static str| {
        let (s, n) = (&s, n.clone());
        async move {
            let b = json(s.get_as(&format!("/fhir/Patient?{q}"), &n).await).await;
            let mut names: Vec<String> = b["entry"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .map(|x| {
                            x["resource"]["name"][0]["family"]
                                .as_str()
                                .unwrap()
                                .to_owned()
                        })
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            (b["total"].as_i64().unwrap(), names)
        }
    };
    assert_eq!(
        fhir("name=doe").await,
        (2, vec!["Doe".into(), "Doerr".into()])
    );
    assert_eq!(fhir("family=garc").await, (1, vec!["García".into()]));
    assert_eq!(fhir("given=garc").await, (0, vec![]));
    assert_eq!(fhir("name=jan&name=smi").await, (1, vec!["Smith".into()]));
    assert_eq!(fhir("name=Jan%20Smi").await, (1, vec!["Smith".into()]));
    assert_eq!(fhir("name=wu").await, (1, vec!["Wu".into()]));
    assert_eq!(fhir("name=do").await, (0, vec![]));
}
both_backends!(people_are_found_as_they_are_typed);

/// A search pages through at most 100 patients. When more match, the answer is one
/// page, the best ranked, and says so. Cursors are sealed to their search: another
/// search's, or a forged one, is refused, and none carries an id.
async fn a_search_answers_the_best_hundred(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    for i in 0..101u8 {
        let given = format!(
            "Many{}{}",
            char::from(b'a' + i / 26),
            char::from(b'a' + i % 26)
        );
        create(&s, &t.doctor, &given, "Common", "1970-01-01").await;
    }
    create(&s, &t.doctor, "Exact", "Commonwealth", "1970-01-01").await;
    // 101 whole-word matches and a prefix match: one page, whole words first.
    let page = json(
        s.get_as("/api/v1/patients?q=common&limit=20", &t.nurse)
            .await,
    )
    .await;
    assert_eq!(page["truncated"], true, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    assert!(
        page["next_cursor"].is_null(),
        "no paging through a truncated answer"
    );
    assert!(items.iter().all(|p| p["family_name"] == "Common"));
    let given: Vec<&str> = items
        .iter()
        .map(|p| p["given_name"].as_str().unwrap())
        .collect();
    let mut sorted = given.clone();
    sorted.sort();
    assert_eq!(given, sorted, "the page by name");
    let page = json(
        s.get_as("/api/v1/patients?q=commonw&limit=10", &t.nurse)
            .await,
    )
    .await;
    assert_eq!(page["truncated"], false);
    assert_eq!(page["items"][0]["given_name"], "Exact");
    // Two words: every candidate is checked, so the truncated page is the best of all.
    let page = json(
        s.get_as("/api/v1/patients?q=common%20many&limit=5", &t.nurse)
            .await,
    )
    .await;
    assert_eq!(page["truncated"], true, "{page}");
    let first: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["given_name"].as_str().unwrap())
        .collect();
    assert_eq!(first, ["Manyaa", "Manyab", "Manyac", "Manyad", "Manyae"]);

    // Up to 100 matches page through, and the cursors are sealed to their search.
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut url = "/api/v1/patients?q=manya&limit=5".to_owned();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let p = json(s.get_as(&url, &t.nurse).await).await;
        assert_eq!(p["truncated"], false);
        for item in p["items"].as_array().unwrap() {
            let id = item["id"].as_str().unwrap();
            if let Some(c) = &cursor {
                assert!(!c.contains(id));
            }
            got.push(item["given_name"].as_str().unwrap().to_owned());
        }
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(got.len(), 26, "Manyaa … Manyaz");
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    let p1 = json(s.get_as("/api/v1/patients?q=manya&limit=5", &t.nurse).await).await;
    let c = p1["next_cursor"].as_str().unwrap().to_owned();
    for bad in [
        format!("/api/v1/patients?q=manyb&limit=5&cursor={c}"),
        format!("/api/v1/patients?q=manya&limit=5&anonymize=true&cursor={c}"),
        "/api/v1/patients?q=manya&limit=5&cursor=5".to_owned(),
    ] {
        let res = s.get_as(&bad, &t.nurse).await;
        assert_eq!(res.status(), 422, "{bad}");
    }
    // The de-identified search orders by pseudonym and names nobody.
    let d = json(
        s.get_as("/api/v1/patients?q=manya&limit=50&anonymize=true", &t.nurse)
            .await,
    )
    .await;
    let text = d.to_string();
    assert!(!text.contains("Many") && !text.contains("Common"), "{text}");
    let ids: Vec<&str> = d["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 26);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "by pseudonym");
}
both_backends!(a_search_answers_the_best_hundred);

/// Without `phi:ssn` an SSN is no search key, alone or among other words.
async fn an_ssn_among_words_needs_phi_ssn(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let res = s
        .send_as(
            Method::POST,
            "/api/v1/patients",
            &t.doctor,
            Some(json!({"given_name": "Sam", "family_name": "Secret", "birth_date": "1970-01-01", "ssn": "123-45-6789"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    for q in ["123-45-6789", "secret 123-45-6789", "Secret,123-45-6789"] {
        let url = format!(
            "/api/v1/patients?q={}",
            form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        );
        assert_eq!(s.get_as(&url, &t.nurse).await.status(), 403, "{q}");
    }
    // With it, the SSN finds its patient.
    assert_eq!(find(&s, &t.doctor, "123-45-6789", 20).await, ["Sam Secret"]);
}
both_backends!(an_ssn_among_words_needs_phi_ssn);

/// The index holds keyed tags only: no name, and no prefix of one, is in the database
/// in the clear, and a tag is not the plain hash of what it stands for.
async fn the_search_index_holds_no_plaintext(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    let p = create(&s, &t.doctor, "Quintessa", "Zephyrine", "1966-06-06").await;
    let pid = p["id"].as_str().unwrap();
    assert_eq!(
        find(&s, &t.nurse, "zeph quin", 20).await,
        ["Quintessa Zephyrine"]
    );
    let tags: Vec<(String,)> =
        sqlx::query_as("SELECT tag FROM patient_terms WHERE patient_id = $1")
            .bind(pid)
            .fetch_all(s.state.db().reader())
            .await
            .unwrap();
    // Two words: each a token tag and one tag per prefix of 3.. letters; one pair tag.
    assert_eq!(tags.len(), 2 + (9 - 2) + (9 - 2) + 1, "{tags:?}");
    for (tag,) in &tags {
        assert!(
            tag.len() == 24
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{tag}"
        );
    }
    let unkeyed = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(b"zep");
        custodian::crypto::hex(&h)[..24].to_owned()
    };
    assert!(tags.iter().all(|(t,)| *t != unkeyed));
    // The database, as a reader of it sees it.
    let dump = match backend {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for f in ["test.sqlite", "test.sqlite-wal"] {
                if let Ok(b) = std::fs::read(s.db.path().join(f)) {
                    bytes.extend(b);
                }
            }
            String::from_utf8_lossy(&bytes).to_lowercase()
        }
        Backend::Postgres => {
            let mut out = String::new();
            for table in [
                "patients",
                "patient_terms",
                "patient_versions",
                "audit_events",
            ] {
                let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT row_to_json(t)::text FROM {table} t"
                )))
                .fetch_all(s.state.db().reader())
                .await
                .unwrap();
                for (r,) in rows {
                    out.push_str(&r.to_lowercase());
                }
            }
            out
        }
    };
    for word in ["quintessa", "zephyrine"] {
        for k in 5..=word.len() {
            assert!(!dump.contains(&word[..k]), "{} in the database", &word[..k]);
        }
    }
}
both_backends!(the_search_index_holds_no_plaintext);

/// Patients stored before the name tags existed get them when the server starts.
async fn patients_stored_before_the_tags_get_them_at_start(backend: Backend) {
    let s = TestServer::start(backend).await;
    let t = team(&s).await;
    create(&s, &t.doctor, "Olden", "Times", "1940-04-04").await;
    // As a database of the previous version holds it: no tags, version 0.
    sqlx::query("DELETE FROM patient_terms")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    sqlx::query("UPDATE patients SET terms_version = 0")
        .execute(s.state.db().writer())
        .await
        .unwrap();
    assert!(find(&s, &t.nurse, "olden", 20).await.is_empty());
    // The next server to start on this database builds them.
    let next = TestServer::start_on(s.db.clone(), Default::default()).await;
    assert_eq!(find(&next, &t.nurse, "olden", 20).await, ["Olden Times"]);
    assert_eq!(find(&s, &t.nurse, "tim", 20).await, ["Olden Times"]);
}
both_backends!(patients_stored_before_the_tags_get_them_at_start);
