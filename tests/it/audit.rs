//! The audit trail: one event per request, durable before the response, append-only,
//! tamper-evident, one chain across instances, and nothing lost on a crash.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use custodian::app::AppState;
use custodian::audit::store::{Filter, query};
use custodian::audit::{Action, Actor, Audit, AuditEvent, ContextValue};
use custodian::store::{Backend as DbBackend, Db};

use crate::both_backends;
use crate::support::{Backend, Options, TestDb, TestServer};

/// The events of one request: by the server's request id (the response's
/// `X-Request-Id`), or by the `X-Request-Id` the test sent (`client_request_id`).
pub(crate) async fn events_for(db: &Db, request_id: &str) -> Vec<AuditEvent> {
    let all = query(db, &Filter::default(), 100_000, true).await.unwrap();
    all.into_iter()
        .filter(|e| {
            e.request_id.as_deref() == Some(request_id)
                || e.client_request_id.as_deref() == Some(request_id)
        })
        .collect()
}

async fn all_events(db: &Db) -> Vec<AuditEvent> {
    query(db, &Filter::default(), 100_000, true).await.unwrap()
}

fn patient_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/test/patients/{id}",
            get(|audit: Audit, Path(id): Path<String>| async move {
                audit.set_actor(Actor::user("u-1", "dr_who"));
                audit.annotate(|a| {
                    a.action = Some(Action::Read);
                    a.resource_type = Some("patient");
                    a.resource_id = Some(id.clone());
                    a.patient_id = Some(id.clone());
                });
                audit.context("records", ContextValue::Int(2));
                for other in ["p-2", "p-3"] {
                    audit.touch_patient(Action::Read, "patient", Some(other), Some(other));
                }
                "PHI-CANARY-1234"
            }),
        )
        .route(
            "/api/v1/test/page",
            get(|audit: Audit| async move {
                audit.set_actor(Actor::user("u-1", "dr_who"));
                audit.annotate(|a| {
                    a.action = Some(Action::Search);
                    a.resource_type = Some("patient");
                });
                // A page of four: three opaque ids, and one that is not an id.
                audit.name_patients(Action::Read, ["p-4", "p-5", "p-6", "not an id"]);
                "PHI-CANARY-5678"
            }),
        )
}

async fn patient_server(backend: Backend) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            extra: Some(patient_routes()),
            ..Options::default()
        },
    )
    .await
}

async fn every_request_yields_one_event_with_its_facts(backend: Backend) {
    let s = TestServer::start(backend).await;
    let res = s
        .client
        .get(s.url("/api/v1/nope?secret=QUERY-CANARY"))
        .header("x-request-id", "audit-rid-1")
        .header("user-agent", "audit-test-agent")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let events = events_for(s.state.db(), "audit-rid-1").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.action, "access");
    assert_eq!(e.outcome, "failure");
    assert_eq!(e.status, Some(404));
    assert_eq!(e.method.as_deref(), Some("GET"));
    assert_eq!(e.path, None, "an unmatched path is not recorded raw");
    assert_eq!(e.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(e.user_agent.as_deref(), Some("audit-test-agent"));
    assert_eq!(e.actor.as_deref(), Some("anonymous"));
    assert!(!serde_json::to_string(e).unwrap().contains("CANARY"));

    let res = s
        .client
        .get(s.url("/api/openapi.json"))
        .header("x-request-id", "audit-rid-2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = events_for(s.state.db(), "audit-rid-2").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].path.as_deref(), Some("/api/openapi.json"));
    assert_eq!(events[0].outcome, "success");

    // Liveness, readiness and static files are not audited.
    let before = all_events(s.state.db()).await.len();
    for p in [
        "/health",
        "/ready",
        "/api/docs/",
        "/api/docs/swagger-ui.css",
    ] {
        assert!(s.get(p).await.status().is_success(), "{p}");
    }
    assert_eq!(all_events(s.state.db()).await.len(), before);
}
both_backends!(every_request_yields_one_event_with_its_facts);

async fn handlers_name_the_patients_they_disclose(backend: Backend) {
    let s = patient_server(backend).await;
    let res = s
        .client
        .get(s.url("/api/v1/test/patients/p-1"))
        .header("x-request-id", "audit-rid-3")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "PHI-CANARY-1234");
    let events = events_for(s.state.db(), "audit-rid-3").await;
    assert_eq!(events.len(), 3);
    let patients: Vec<_> = events
        .iter()
        .map(|e| e.patient_id.clone().unwrap())
        .collect();
    assert_eq!(patients, ["p-1", "p-2", "p-3"]);
    for e in &events {
        assert_eq!(e.action, "read");
        assert_eq!(e.actor_id.as_deref(), Some("u-1"));
        assert_eq!(e.actor.as_deref(), Some("dr_who"));
        assert_eq!(e.path.as_deref(), Some("/api/v1/test/patients/{id}"));
        assert_eq!(e.status, Some(200));
    }
    assert_eq!(events[0].context, r#"{"records":2}"#);
}
both_backends!(handlers_name_the_patients_they_disclose);

async fn a_page_names_its_patients_in_one_event(backend: Backend) {
    let s = patient_server(backend).await;
    let res = s
        .client
        .get(s.url("/api/v1/test/page"))
        .header("x-request-id", "audit-page-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "PHI-CANARY-5678");
    let events = events_for(s.state.db(), "audit-page-1").await;
    // The page's event lists the ids; the one that is not an id gets its own event.
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].action, "search");
    assert_eq!(events[0].patient_id, None);
    assert_eq!(events[0].context, r#"{"patient_ids":["p-4","p-5","p-6"]}"#);
    assert_eq!(events[1].patient_id.as_deref(), Some("not an id"));
    // The patient filter finds the page's event under each patient it names, and only
    // under those.
    for p in ["p-4", "p-5", "p-6"] {
        let f = Filter {
            patient_id: Some(p.into()),
            ..Filter::default()
        };
        let found = query(s.state.db(), &f, 100, false).await.unwrap();
        assert_eq!(found.len(), 1, "{p}");
        assert_eq!(found[0].id, events[0].id, "{p}");
    }
    let f = Filter {
        patient_id: Some("p-7".into()),
        ..Filter::default()
    };
    assert!(
        query(s.state.db(), &f, 100, false)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.state.audit().verify().await.unwrap().ok);
}
both_backends!(a_page_names_its_patients_in_one_event);

/// Runs SQL on the patient index around its append-only triggers.
async fn tamper_index(db: &Db, sql: &str) {
    match db.backend() {
        DbBackend::Sqlite => {
            around(
                db,
                &["DROP TRIGGER audit_event_patients_no_delete"],
                sql,
                &[],
            )
            .await;
        }
        DbBackend::Postgres => {
            let t = "audit_event_patients_append_only";
            let off = format!("ALTER TABLE audit_event_patients DISABLE TRIGGER {t}");
            let on = format!("ALTER TABLE audit_event_patients ENABLE TRIGGER {t}");
            around(db, &[off.as_str()], sql, &[on.as_str()]).await;
        }
    }
}

async fn the_patient_index_is_checked_by_verify(backend: Backend) {
    for (case, sql) in [
        // Hiding a disclosure: the page's event no longer found under p-5.
        (
            "removed",
            "DELETE FROM audit_event_patients WHERE patient_id = 'p-5'",
        ),
        // Inventing one: the page's event found under a patient it does not name.
        (
            "added",
            "INSERT INTO audit_event_patients (patient_id, seq) \
             SELECT 'p-9', seq FROM audit_event_patients WHERE patient_id = 'p-5'",
        ),
        // Pointing past the chain's end.
        (
            "orphan",
            "INSERT INTO audit_event_patients (patient_id, seq) VALUES ('p-9', 1000000)",
        ),
    ] {
        let s = patient_server(backend).await;
        for rid in ["idx-1", "idx-2"] {
            s.client
                .get(s.url("/api/v1/test/page"))
                .header("x-request-id", rid)
                .send()
                .await
                .unwrap();
        }
        s.get("/api/v1/t/after").await;
        assert!(s.state.audit().verify().await.unwrap().ok, "{case}");
        // Directly, the index refuses changes like the events do.
        let e = sqlx::query("DELETE FROM audit_event_patients")
            .execute(s.state.db().writer())
            .await;
        assert!(e.unwrap_err().to_string().contains("append-only"), "{case}");
        tamper_index(s.state.db(), sql).await;
        let r = s.state.audit().verify().await.unwrap();
        assert!(!r.ok, "{case}: {r:?}");
        let first = events_for(s.state.db(), "idx-1").await[0].id.clone();
        match case {
            "orphan" => assert_eq!(r.first_bad.as_deref(), Some("index"), "{r:?}"),
            _ => assert_eq!(
                r.first_bad.as_deref(),
                Some(first.as_str()),
                "{case}: {r:?}"
            ),
        }
    }
}
both_backends!(the_patient_index_is_checked_by_verify);

async fn responses_fail_closed_when_the_audit_store_is_down(backend: Backend) {
    let s = patient_server(backend).await;
    assert_eq!(s.get("/api/v1/test/patients/p-1").await.status(), 200);
    s.state.db().close().await;
    let res = s.get("/api/v1/test/patients/p-1").await;
    assert_eq!(res.status(), 503);
    let body = res.text().await.unwrap();
    assert!(
        !body.contains("PHI-CANARY"),
        "PHI was disclosed without an audit record: {body}"
    );
    assert!(body.contains("service_unavailable"));
}
both_backends!(responses_fail_closed_when_the_audit_store_is_down);

async fn the_chain_verifies_after_concurrent_requests(backend: Backend) {
    // 200 requests at once from one address: rate limits are not what this tests.
    let s = TestServer::start_with(backend, Options::unlimited()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (c, url) = (s.client.clone(), s.url(&format!("/api/v1/concurrent/{i}")));
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 404);
    }
    let report = s.state.audit().verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events, 200);
    let events = all_events(s.state.db()).await;
    assert_eq!(
        report.head.as_deref(),
        Some(events.last().unwrap().hash.as_str())
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    // Group commit happened: fewer transactions than events.
    let stats = s.state.audit().writer().unwrap().stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=200).contains(&batches), "{batches}");
}
both_backends!(the_chain_verifies_after_concurrent_requests);

async fn verify_is_clean_while_requests_append(backend: Backend) {
    // Verification on a live server: events (with their patient index rows) are
    // appended while it walks the chain and reads the head; none of that is tampering.
    let s = TestServer::start_with(
        backend,
        Options {
            extra: Some(patient_routes()),
            ..Options::unlimited()
        },
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (c, stop) = (s.client.clone(), stop.clone());
        let url = s.url(if w % 2 == 0 {
            "/api/v1/test/page"
        } else {
            "/api/v1/elsewhere"
        });
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.get(&url).send().await.unwrap();
                n += 1;
            }
            n
        }));
    }
    for round in 0..20 {
        let r = s.state.audit().verify().await.unwrap();
        assert!(r.ok, "round {round}: {r:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for t in load {
        sent += t.await.unwrap();
    }
    assert!(sent > 0);
    let r = s.state.audit().verify().await.unwrap();
    assert!(r.ok, "{r:?}");
    // At least one event per request (a page also names its one odd id in its own).
    assert!(
        r.events >= i64::from(sent),
        "{} events, {sent} requests",
        r.events
    );
}
both_backends!(verify_is_clean_while_requests_append);

async fn events_cannot_be_changed_or_removed(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.get("/api/v1/x").await;
    let db = s.state.db();
    for sql in [
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events",
        "UPDATE audit_checkpoints SET hash = 'x'",
    ] {
        let e = sqlx::query(sql).execute(db.writer()).await;
        if sql.contains("checkpoints") {
            // No rows: the statement succeeds vacuously, nothing to protect yet.
            continue;
        }
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("append-only"), "{sql}: {msg}");
    }
    if db.backend() == DbBackend::Postgres {
        let e = sqlx::query("TRUNCATE audit_events")
            .execute(db.writer())
            .await;
        assert!(e.unwrap_err().to_string().contains("append-only"));
    }
    assert_eq!(all_events(db).await.len(), 1);
    assert!(s.state.audit().verify().await.unwrap().ok);
}
both_backends!(events_cannot_be_changed_or_removed);

/// Runs SQL around the append-only triggers, as an attacker with database access could.
async fn tamper(db: &Db, sql: &str) {
    match db.backend() {
        DbBackend::Sqlite => {
            let off = [
                "DROP TRIGGER audit_events_no_update",
                "DROP TRIGGER audit_events_no_delete",
            ];
            around(db, &off, sql, &[]).await;
        }
        DbBackend::Postgres => {
            let off = ["ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"];
            let on = ["ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"];
            around(db, &off, sql, &on).await;
        }
    }
}

/// Runs `off`, then `sql`, then `on`, on one connection.
async fn around(db: &Db, off: &[&str], sql: &str, on: &[&str]) {
    let mut conn = db.writer().acquire().await.unwrap();
    for q in off.iter().copied().chain([sql]).chain(on.iter().copied()) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(q.to_owned()))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

async fn direct_edits_are_found_by_verify(backend: Backend) {
    for (case, sql, reason) in [
        (
            "edit",
            "UPDATE audit_events SET patient_id = 'someone-else' WHERE seq = 3",
            "edited",
        ),
        (
            "removal",
            "DELETE FROM audit_events WHERE seq = 3",
            "missing",
        ),
        (
            "truncation",
            "DELETE FROM audit_events WHERE seq >= 4",
            "head",
        ),
        (
            "relink",
            "UPDATE audit_events SET prev_hash = hash WHERE seq = 3",
            "link",
        ),
    ] {
        let s = TestServer::start(backend).await;
        for i in 0..5 {
            s.get(&format!("/api/v1/t/{i}")).await;
        }
        assert!(s.state.audit().verify().await.unwrap().ok);
        let third = all_events(s.state.db())
            .await
            .into_iter()
            .find(|e| e.seq == 3)
            .unwrap();
        tamper(s.state.db(), sql).await;
        let r = s.state.audit().verify().await.unwrap();
        assert!(!r.ok, "{case}: {r:?}");
        let first_bad = r.first_bad.clone().unwrap();
        let why = r.reason.clone().unwrap();
        match case {
            "truncation" => assert_eq!(first_bad, "head", "{case}: {r:?}"),
            "removal" => assert_ne!(
                first_bad, third.id,
                "{case}: the event after the gap is named"
            ),
            _ => assert_eq!(first_bad, third.id, "{case}: {r:?}"),
        }
        assert!(why.contains(reason), "{case}: {why}");
    }
}
both_backends!(direct_edits_are_found_by_verify);

async fn a_rewritten_chain_fails_on_the_signed_head(backend: Backend) {
    let s = TestServer::start(backend).await;
    for i in 0..3 {
        s.get(&format!("/api/v1/t/{i}")).await;
    }
    // Rewrite the last event consistently (new hash) and move the head, without the key.
    let mut last = all_events(s.state.db()).await.pop().unwrap();
    last.actor = Some("mallory".into());
    let new_hash = last.compute_hash();
    tamper(
        s.state.db(),
        &format!(
            "UPDATE audit_events SET actor = 'mallory', hash = '{new_hash}' WHERE seq = {}; \
             UPDATE audit_head SET hash = '{new_hash}' WHERE id = 1",
            last.seq
        ),
    )
    .await;
    let r = s.state.audit().verify().await.unwrap();
    assert!(!r.ok);
    assert_eq!(r.first_bad.as_deref(), Some("head"));
    assert!(r.reason.unwrap().contains("signature"));
}
both_backends!(a_rewritten_chain_fails_on_the_signed_head);

async fn the_sink_copies_committed_events(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("audit.jsonl");
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("audit.sink", sink.display().to_string())],
            ..Options::default()
        },
    )
    .await;
    s.client
        .get(s.url("/api/v1/sunk"))
        .header("x-request-id", "sink-rid")
        .send()
        .await
        .unwrap();
    let text = std::fs::read_to_string(&sink).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["audit"]["client_request_id"], "sink-rid");
    assert!(line["audit"]["context"].is_object());
    assert_eq!(line["audit"]["seq"], 1);
}
both_backends!(the_sink_copies_committed_events);

async fn retention_purge_keeps_the_chain_verifiable(backend: Backend) {
    let s = patient_server(backend).await;
    // Four old events: two requests, and a page naming p-4…p-6 (its event and the odd
    // id's), whose patient index rows go with them.
    for i in 0..2 {
        s.get(&format!("/api/v1/old/{i}")).await;
    }
    s.get("/api/v1/test/page").await;
    s.clock.advance(std::time::Duration::from_secs(10 * 86_400));
    // Two new events: the same page again.
    s.get("/api/v1/test/page").await;
    let named = |p: &str| Filter {
        patient_id: Some(p.into()),
        ..Filter::default()
    };
    assert_eq!(
        query(s.state.db(), &named("p-4"), 100, true)
            .await
            .unwrap()
            .len(),
        2
    );
    let r = s
        .state
        .audit()
        .purge(std::time::Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(r.purged, 4);
    assert_eq!(r.up_to_seq, Some(4));
    let left = all_events(s.state.db()).await;
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6]);
    // Only the new page is still found under its patients.
    let under = query(s.state.db(), &named("p-4"), 100, true).await.unwrap();
    assert_eq!(under.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
    let v = s.state.audit().verify().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.events, 2);
    // The checkpoint itself cannot be altered.
    let e = sqlx::query("UPDATE audit_checkpoints SET purged = 0")
        .execute(s.state.db().writer())
        .await;
    assert!(e.unwrap_err().to_string().contains("append-only"));
    // Nothing older than the retention: a second purge removes nothing.
    assert_eq!(
        s.state
            .audit()
            .purge(std::time::Duration::from_secs(86_400))
            .await
            .unwrap()
            .purged,
        0
    );
}
both_backends!(retention_purge_keeps_the_chain_verifiable);

/// Two servers' writers on one database (two instances on PostgreSQL, or a server
/// and another process on one SQLite file) keep one chain.
async fn two_writers_on_one_database_keep_one_chain(backend: Backend) {
    let db = Arc::new(TestDb::new(backend).await);
    let a = TestServer::start_on(db.clone(), Options::unlimited()).await;
    let b = TestServer::start_on(db.clone(), Options::unlimited()).await;
    // Taking turns: each writer finds, at its next batch, that the other moved the
    // head since its own last commit, and must store through the locked path.
    for i in 0..6 {
        for s in [&a, &b] {
            let r = s
                .client
                .get(s.url(&format!("/api/v1/turns/{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404);
        }
    }
    for s in [&a, &b] {
        let moved = s.state.audit().writer().unwrap().stats().snapshot()[5];
        assert!(moved >= 1, "the head-moved path was not taken: {moved}");
    }
    let mut tasks = Vec::new();
    for i in 0..150 {
        for s in [&a, &b] {
            let (c, url) = (s.client.clone(), s.url(&format!("/api/v1/both/{i}")));
            tasks.push(tokio::spawn(async move {
                c.get(url).send().await.unwrap().status()
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 404);
    }
    let r = a.state.audit().verify().await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.events, 312);
    assert_eq!(b.state.audit().verify().await.unwrap(), r);
    let seqs: Vec<i64> = all_events(a.state.db())
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=312).collect::<Vec<_>>());
}
both_backends!(two_writers_on_one_database_keep_one_chain);

/// On a SQLite file the requests lead their own batches (`audit/local.rs`): a request
/// cancelled while it leads (its client gone, its commit timeout) must not take the
/// others' events with it, nor its own, which is already queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_loses_no_event() {
    use custodian::audit::Outcome;
    let s = TestServer::start(Backend::Sqlite).await;
    let audit = s.state.audit().clone();
    let writer = audit.writer().unwrap();
    let event = |i: usize| {
        let mut e = audit.event(Action::Access, Outcome::Success);
        e.resource_id = Some(format!("cancel-{i}"));
        e
    };
    // The pool's writer connection is the gate a leader takes before it appends: held
    // here, the first request leads and waits at the gate with nothing taken yet.
    let gate = s.state.db().writer().acquire().await.unwrap();
    let first = {
        let (a, e) = (audit.clone(), event(0));
        tokio::spawn(async move { a.record(vec![e]).await })
    };
    let depth = |n: usize| async move {
        for _ in 0..500 {
            if writer.queue_depth() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the queue never reached {n}: {}", writer.queue_depth());
    };
    depth(1).await;
    let mut others = Vec::new();
    for i in 1..=40 {
        let (a, e) = (audit.clone(), event(i));
        others.push(tokio::spawn(async move { a.record(vec![e]).await }));
    }
    depth(41).await;
    // The leader goes away; the gate opens; another request leads.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    drop(gate);
    for t in others {
        t.await.unwrap().unwrap();
    }
    audit.flush().await.unwrap();
    let stored: Vec<String> = all_events(s.state.db())
        .await
        .into_iter()
        .filter_map(|e| e.resource_id)
        .filter(|r| r.starts_with("cancel-"))
        .collect();
    // Every event, the cancelled leader's too (its response was never sent; recording
    // more than was answered is allowed, less is not).
    assert_eq!(stored.len(), 41, "{stored:?}");
    for i in 0..=40 {
        assert!(
            stored.contains(&format!("cancel-{i}")),
            "cancel-{i} missing"
        );
    }
    let r = audit.verify().await.unwrap();
    assert!(r.ok, "{r:?}");
}

/// `custodian audit verify` / `export` on a data directory.
mod commands {
    use crate::cli::{run, serve};

    fn env(data: &str) -> [(&'static str, &str); 2] {
        // Thousands of requests from one address: limits off, as in the benchmarks.
        [
            ("CUSTODIAN_DATA_DIR", data),
            ("CUSTODIAN_RATE_LIMIT__ENABLED", "false"),
        ]
    }

    /// The data directory's database, opened directly (to tamper with it, or look).
    async fn open(url: &custodian::config::Secret) -> custodian::store::Db {
        custodian::store::Db::connect(
            url,
            &custodian::store::PoolSettings {
                max_connections: 1,
                acquire_timeout: std::time::Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn verify_and_export_from_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().display().to_string();
        {
            let s = serve(dir.path(), &env(&data));
            let c = reqwest::Client::new();
            for i in 0..3 {
                c.get(format!("http://{}/api/v1/cli/{i}", s.addr))
                    .header("x-request-id", format!("cli-{i}"))
                    .send()
                    .await
                    .unwrap();
            }
        }
        let (code, out, err) = run(dir.path(), &["audit", "verify"], &env(&data));
        assert_eq!(code, 0, "{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["ok"], true);
        // The dev bootstrap's account creation and the three requests.
        assert_eq!(report["events"], 4);

        let (code, out, err) = run(
            dir.path(),
            &["audit", "export", "--format", "jsonl"],
            &env(&data),
        );
        assert_eq!(code, 0, "{err}");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Bootstrap, the three requests, and the verification (reading the log is audited).
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0]["actor"], "system:dev-bootstrap");
        assert_eq!(lines[1]["client_request_id"], "cli-0");
        assert_eq!(lines[4]["action"], "audit_verify");
        assert_eq!(lines[4]["actor"], "system:audit-verify");

        let (code, out, _) = run(
            dir.path(),
            &["audit", "export", "--format", "csv"],
            &env(&data),
        );
        assert_eq!(code, 0);
        let mut rows = out.lines();
        assert!(
            rows.next()
                .unwrap()
                .starts_with("seq,id,at,actor_id,actor,action,")
        );
        // Five events plus the JSON export just made.
        assert_eq!(rows.count(), 6);

        let (code, out, _) = run(
            dir.path(),
            &["audit", "export", "--since", "2999-01-01T00:00:00Z"],
            &env(&data),
        );
        assert_eq!(code, 0);
        assert!(out.is_empty());
        let (code, _, err) = run(
            dir.path(),
            &["audit", "export", "--since", "last week"],
            &env(&data),
        );
        assert_eq!(code, 2);
        assert!(err.contains("RFC 3339"), "{err}");
        let (code, _, _) = run(
            dir.path(),
            &["audit", "export", "--format", "xml"],
            &env(&data),
        );
        assert_eq!(code, 2);

        // Tamper with the file directly: verify names the event and fails.
        let db_path = dir.path().join("custodian.sqlite");
        let url = custodian::config::Secret::new(format!("sqlite://{}", db_path.display()));
        let db = open(&url).await;
        let second: String = sqlx::Row::get(
            &sqlx::query("SELECT id FROM audit_events WHERE seq = 2")
                .fetch_one(db.reader())
                .await
                .unwrap(),
            0,
        );
        sqlx::raw_sql("DROP TRIGGER audit_events_no_update; UPDATE audit_events SET status = 200 WHERE seq = 2").execute(db.writer()).await.unwrap();
        db.close().await;
        let (code, out, err) = run(dir.path(), &["audit", "verify"], &env(&data));
        assert_ne!(code, 0);
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["ok"], false);
        assert_eq!(report["first_bad"], second.as_str());
        assert!(err.contains(&second), "{err}");
        // The failure is a stored security event too.
        let db = open(&url).await;
        let events = custodian::security::list(&db, 10).await.unwrap();
        db.close().await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].rule, "audit_chain_broken");
        assert_eq!(events[0].severity, "critical");
        assert!(events[0].detail.contains(&second));
    }

    #[tokio::test]
    async fn key_rotation_keeps_the_chain_verifiable_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().display().to_string();
        let (code, _, err) = run(dir.path(), &["audit", "verify"], &env(&data));
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = run(dir.path(), &["keys", "rotate"], &env(&data));
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("version 2"), "{out}");
        let (code, _, err) = run(dir.path(), &["audit", "verify"], &env(&data));
        assert_eq!(code, 0, "{err}");
        let (_, out, _) = run(dir.path(), &["audit", "export"], &env(&data));
        assert!(out.contains("\"action\":\"key_rotated\""), "{out}");
    }

    /// kill -9 under load loses no event for any response a client received.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_crash_loses_no_event_of_a_received_response() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().display().to_string();
        let mut s = serve(dir.path(), &env(&data));
        let client = reqwest::Client::new();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for worker in 0..32 {
            let (c, addr, got) = (client.clone(), s.addr.clone(), received.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..10_000 {
                    let rid = format!("crash-{worker}-{i}");
                    match c
                        .get(format!("http://{addr}/api/v1/crash"))
                        .header("x-request-id", &rid)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 404 => got.lock().unwrap().push(rid),
                        Ok(r) => panic!("unexpected {}", r.status()),
                        Err(_) => break,
                    }
                }
            }));
        }
        while received.lock().unwrap().len() < 300 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        s.child.kill().unwrap(); // SIGKILL: no shutdown, no flush
        s.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let received = received.lock().unwrap().clone();
        assert!(received.len() >= 300);

        let url = custodian::config::Secret::new(format!("sqlite://{}/custodian.sqlite", data));
        let db = open(&url).await;
        let stored: std::collections::HashSet<String> =
            // The test tags each request with its own X-Request-Id, kept as the client's.
            sqlx::query(
                "SELECT client_request_id FROM audit_events WHERE client_request_id IS NOT NULL",
            )
                .fetch_all(db.reader())
                .await
                .unwrap()
                .iter()
                .map(|r| sqlx::Row::get::<String, _>(r, 0))
                .collect();
        db.close().await;
        let lost: Vec<&String> = received.iter().filter(|r| !stored.contains(*r)).collect();
        assert!(
            lost.is_empty(),
            "{} of {} received responses have no event: {:?}",
            lost.len(),
            received.len(),
            &lost[..lost.len().min(5)]
        );
        let (code, out, err) = run(dir.path(), &["audit", "verify"], &env(&data));
        assert_eq!(code, 0, "{out} {err}");
    }
}

async fn flush_waits_for_everything_queued(backend: Backend) {
    let s = TestServer::start(backend).await;
    let log = s.state.audit().clone();
    let mut pending = Vec::new();
    for i in 0..50 {
        let log = log.clone();
        pending.push(tokio::spawn(async move {
            let mut e = log.event(Action::Access, custodian::audit::Outcome::Success);
            e.request_id = Some(format!("flush-{i}"));
            log.record(vec![e]).await
        }));
    }
    tokio::task::yield_now().await;
    log.flush().await.unwrap();
    for p in pending {
        p.await.unwrap().unwrap();
    }
    assert_eq!(all_events(s.state.db()).await.len(), 50);
    assert!(log.verify().await.unwrap().ok);
}
both_backends!(flush_waits_for_everything_queued);

/// Every request about a patient names the patient, whatever its outcome (a 401, a
/// 403, a bad body, a success), and each field holds what it says: `resource_id` the
/// resource acted on (no id for a list), `patient_id` the patient. A refusal for want of
/// a permission is a `permission_denied` event saying what was attempted, and no
/// disclosure. The API filters on `outcome` and `status`, and answers `context` as an
/// object; the chain still verifies.
async fn audit_records_what_each_request_was_about(backend: Backend) {
    let s = TestServer::start(backend).await;
    const PW: &str = "Correct-Horse-9!";
    s.user("doc", "doctor", PW).await;
    s.user("nur", "nurse", PW).await;
    s.user("aud", "auditor", PW).await;
    let (doc, nur, aud) = (
        s.login("doc", PW).await,
        s.login("nur", PW).await,
        s.login("aud", PW).await,
    );
    let body = serde_json::json!({"given_name": "Ada", "family_name": "Lovelace", "birth_date": "1961-07-04"});
    let res = s.post("/api/v1/patients", Some(&doc), body).await;
    let pid = crate::support::json(res).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = s
        .post(
            &format!("/api/v1/patients/{pid}/records"),
            Some(&doc),
            serde_json::json!({"diagnosis": "Gout"}),
        )
        .await;
    let rid = crate::support::json(res).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // (request, expected status, action, resource type, resource id, attempted)
    type Case<'a> = (
        reqwest::RequestBuilder,
        u16,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            s.client
                .get(s.url(&format!("/api/v1/patients/{pid}")))
                .bearer_auth(&aud),
            403,
            "permission_denied",
            "patient",
            Some(&pid),
            Some("read"),
        ),
        (
            s.client
                .get(s.url(&format!("/api/v1/records/{rid}")))
                .bearer_auth(&aud),
            403,
            "permission_denied",
            "record",
            Some(&rid),
            Some("read"),
        ),
        (
            s.client
                .patch(s.url(&format!("/api/v1/patients/{pid}")))
                .bearer_auth(&nur)
                .json(&serde_json::json!({"phone": "1"})),
            403,
            "permission_denied",
            "patient",
            Some(&pid),
            Some("update"),
        ),
        (
            s.client
                .get(s.url(&format!("/api/v1/patients/{pid}/records"))),
            401,
            "read",
            "record",
            None,
            None,
        ),
        (
            s.client
                .patch(s.url(&format!("/api/v1/records/{rid}")))
                .bearer_auth(&doc)
                .json(&serde_json::json!({"nope": 1})),
            422,
            "update",
            "record",
            Some(&rid),
            None,
        ),
        // The same on /fhir: a refused read and a refused compartment search name the
        // patient they were about.
        (
            s.client
                .get(s.url(&format!("/fhir/Patient/{pid}")))
                .bearer_auth(&aud),
            403,
            "permission_denied",
            "Patient",
            Some(&pid),
            Some("read"),
        ),
        (
            s.client
                .get(s.url(&format!("/fhir/Observation?patient={pid}")))
                .bearer_auth(&aud),
            403,
            "permission_denied",
            "Observation",
            None,
            Some("search"),
        ),
        (
            s.client
                .get(s.url(&format!("/api/v1/patients/{pid}/records")))
                .bearer_auth(&nur),
            200,
            "read",
            "record",
            None,
            None,
        ),
    ];
    let (mut denied, mut forbidden) = (Vec::new(), Vec::new());
    for (i, (req, status, action, rtype, rid_, attempted)) in cases.into_iter().enumerate() {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), status, "case {i}");
        let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let events = events_for(s.state.db(), &request_id).await;
        assert_eq!(events.len(), 1, "case {i}: {events:?}");
        let e = &events[0];
        assert_eq!(
            e.patient_id.as_deref(),
            Some(pid.as_str()),
            "case {i}: {e:?}"
        );
        assert_eq!(e.action, action, "case {i}: {e:?}");
        assert_eq!(e.resource_type.as_deref(), Some(rtype), "case {i}: {e:?}");
        assert_eq!(e.resource_id.as_deref(), rid_, "case {i}: {e:?}");
        let context: serde_json::Value = serde_json::from_str(&e.context).unwrap();
        assert_eq!(context["attempted"].as_str(), attempted, "case {i}: {e:?}");
        if status == 401 || status == 403 {
            assert_eq!(e.outcome, "denied");
            denied.push(request_id.clone());
        }
        if status == 403 {
            forbidden.push(request_id);
        }
    }
    // The API: filters on outcome and status; context is an object.
    let page = |q: &str| {
        let (s, aud) = (&s, aud.clone());
        let url = format!("/api/v1/audit/events?patient_id={pid}&limit=500{q}");
        async move { s.get_as(&url, &aud).await }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let by_outcome = crate::support::json(page("&outcome=denied").await).await;
    let mut got = ids(&by_outcome);
    got.reverse();
    assert_eq!(got, denied, "{by_outcome}");
    let by_status = crate::support::json(page("&status=403").await).await;
    let mut got = ids(&by_status);
    got.reverse();
    assert_eq!(got, forbidden, "{by_status}");
    assert!(
        by_status["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == 403
                && e["action"] == "permission_denied"
                && e["context"]["attempted"].is_string())
    );
    let all = crate::support::json(page("").await).await;
    assert!(
        all["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["context"].is_object()),
        "{all}"
    );
    for bad in ["&outcome=maybe", "&status=99", "&status=abc"] {
        let res = page(bad).await;
        assert_eq!(res.status(), 422, "{bad}");
    }
    // A refusal disclosed nothing: it is not in the accounting of disclosures.
    let d = crate::support::json(
        s.get_as(
            &format!("/api/v1/patients/{pid}/disclosures?limit=500"),
            &aud,
        )
        .await,
    )
    .await;
    let disclosed = ids(&d);
    assert!(disclosed.iter().all(|r| !denied.contains(r)), "{d}");
    assert!(
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["action"] != "permission_denied")
    );
    let v = s.state.audit().verify().await.unwrap();
    assert!(v.ok, "{v:?}");
    let res = s.get_as("/api/v1/audit/verify", &aud).await;
    assert_eq!(crate::support::json(res).await["ok"], true);
}
both_backends!(audit_records_what_each_request_was_about);

/// The accounting of disclosures filters in the query: a page holds `limit`
/// disclosures however many refused requests lie between them (it used to filter a
/// fetched page, and came back short, with a cursor, or empty).
async fn the_accounting_of_disclosures_fills_its_pages(backend: Backend) {
    let s = TestServer::start_with(backend, Options::unlimited()).await;
    const PW: &str = "Correct-Horse-9!";
    s.user("doc", "doctor", PW).await;
    s.user("aud", "auditor", PW).await;
    let (doc, aud) = (s.login("doc", PW).await, s.login("aud", PW).await);
    let body = serde_json::json!({"given_name": "Ada", "family_name": "Lovelace", "birth_date": "1961-07-04"});
    let res = s.post("/api/v1/patients", Some(&doc), body).await;
    let pid = crate::support::json(res).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Three reads (and the create), each followed by refusals that name the patient.
    for _ in 0..3 {
        let res = s.get_as(&format!("/api/v1/patients/{pid}"), &doc).await;
        assert_eq!(res.status(), 200);
        for _ in 0..5 {
            let res = s.get_as(&format!("/fhir/Patient/{pid}"), &aud).await;
            assert_eq!(res.status(), 403);
        }
    }
    let page = |cursor: Option<String>| {
        let (s, aud, pid) = (&s, aud.clone(), pid.clone());
        async move {
            let url = match cursor {
                Some(c) => format!("/api/v1/patients/{pid}/disclosures?limit=2&cursor={c}"),
                None => format!("/api/v1/patients/{pid}/disclosures?limit=2"),
            };
            crate::support::json(s.get_as(&url, &aud).await).await
        }
    };
    let first = page(None).await;
    let second = page(first["next_cursor"].as_str().map(str::to_owned)).await;
    let actions = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(actions(&first), ["read", "read"], "{first}");
    assert_eq!(actions(&second), ["read", "create"], "{second}");
    if let Some(c) = second["next_cursor"].as_str() {
        let third = page(Some(c.to_owned())).await;
        assert!(actions(&third).is_empty(), "{third}");
    }
}
both_backends!(the_accounting_of_disclosures_fills_its_pages);
