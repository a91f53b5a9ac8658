//! Rate limits: per route and method, per user or address, local or shared via Redis.

use std::time::Duration;

use serde_json::json;

use crate::both_backends;
use crate::support::{Backend, Options, TestServer, json};

const PASSWORD: &str = "Correct-Horse-9-Battery";

fn me_limited(rate: &str) -> Options {
    Options {
        sets: vec![(
            "rate_limit.routes",
            format!("{{\"GET /api/v1/auth/me\": \"{rate}\"}}"),
        )],
        ..Options::default()
    }
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

async fn refusals_carry_the_headers_and_the_budget_refills(backend: Backend) {
    let s = TestServer::start_with(backend, me_limited("3/m")).await;
    s.user("alice", "admin", PASSWORD).await;
    s.user("bob", "admin", PASSWORD).await;
    let alice = s.login("alice", PASSWORD).await;
    let bob = s.login("bob", PASSWORD).await;

    for left in ["2", "1", "0"] {
        let r = s.get_as("/api/v1/auth/me", &alice).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some(left));
    }
    let r = s.get_as("/api/v1/auth/me", &alice).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after").as_deref(), Some("20"));
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("3"));
    assert!(header(&r, "ratelimit-reset").is_some());
    assert_eq!(json(r).await["code"], "rate_limited");

    // Keyed by principal: bob has his own budget; so do anonymous callers (by address).
    assert_eq!(s.get_as("/api/v1/auth/me", &bob).await.status(), 200);
    assert_eq!(s.get("/api/v1/auth/me").await.status(), 401);
    // Per route and method: another endpoint of alice's is not affected.
    assert_eq!(s.get_as("/api/v1/sessions", &alice).await.status(), 200);

    // The refusal is audited, with the user who was refused.
    let r = s.get_as("/api/v1/auth/me", &alice).await;
    assert_eq!(r.status(), 429);
    let rid = header(&r, "x-request-id").unwrap();
    s.state.audit().flush().await.unwrap();
    let events = crate::audit::events_for(s.state.db(), &rid).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].status, Some(429));
    assert_eq!(events[0].actor.as_deref(), Some("alice"));

    // Twenty seconds later exactly one more request fits.
    s.clock.advance(Duration::from_secs(20));
    assert_eq!(s.get_as("/api/v1/auth/me", &alice).await.status(), 200);
    assert_eq!(s.get_as("/api/v1/auth/me", &alice).await.status(), 429);
}
both_backends!(refusals_carry_the_headers_and_the_budget_refills);

async fn sign_in_is_limited_by_address_before_the_password_is_checked(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.user("carol", "admin", PASSWORD).await;
    // Ten attempts a minute per address (the strict default), across usernames.
    for i in 0..10 {
        let r = s
            .post(
                "/api/v1/auth/login",
                None,
                json!({"username": format!("nobody{i}"), "password": "wrong-Password-1"}),
            )
            .await;
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    let r = s
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "carol", "password": PASSWORD}),
        )
        .await;
    assert_eq!(
        r.status(),
        429,
        "the right password does not pass the limit"
    );
    assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("10"));
    assert_eq!(header(&r, "retry-after").as_deref(), Some("6"));
    // The limit counted; the password was never tried: carol has no failure recorded.
    s.clock.advance(Duration::from_secs(6));
    assert_eq!(
        s.post(
            "/api/v1/auth/login",
            None,
            json!({"username": "carol", "password": PASSWORD}),
        )
        .await
        .status(),
        200
    );
}
both_backends!(sign_in_is_limited_by_address_before_the_password_is_checked);

async fn probes_and_assets_are_not_limited(backend: Backend) {
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("rate_limit.default", "2/m".into())],
            ..Options::default()
        },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(s.get("/health").await.status(), 200);
        assert_eq!(s.get("/assets/app.css").await.status(), 200);
    }
    // The default applies to every other route, matched or not.
    assert_eq!(s.get("/api/v1/nothing-here").await.status(), 404);
    assert_eq!(s.get("/api/v1/nothing-either").await.status(), 404);
    assert_eq!(s.get("/api/v1/nothing-at-all").await.status(), 429);
}
both_backends!(probes_and_assets_are_not_limited);

/// With Redis configured but not answering, limits still hold (each instance on its
/// own), no request fails for it, and `/ready` says so.
async fn a_redis_outage_falls_back_to_local_limits(backend: Backend) {
    let mut opts = me_limited("3/m");
    opts.no_redis = true;
    opts.sets
        .push(("redis.url", "redis://127.0.0.1:1/0".into()));
    let s = TestServer::start_with(backend, opts).await;
    s.user("dave", "admin", PASSWORD).await;
    let dave = s.login("dave", PASSWORD).await;
    for _ in 0..3 {
        assert_eq!(s.get_as("/api/v1/auth/me", &dave).await.status(), 200);
    }
    assert_eq!(s.get_as("/api/v1/auth/me", &dave).await.status(), 429);
    let r = s.get("/ready").await;
    assert_eq!(r.status(), 503);
    let body = json(r).await;
    assert_eq!(body["checks"]["rate_limit"], "degraded", "{body}");
    assert_eq!(body["checks"]["redis"], "unavailable", "{body}");
    let stats = s.state.limiter().stats();
    assert!(
        stats
            .redis_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}
both_backends!(a_redis_outage_falls_back_to_local_limits);

async fn ready_reports_where_limits_are_counted(backend: Backend) {
    let s = TestServer::start(backend).await;
    let body = json(s.get("/ready").await).await;
    let expected = if s.state.redis().is_some() {
        "shared"
    } else {
        "local"
    };
    assert_eq!(body["checks"]["rate_limit"], expected, "{body}");
    assert_eq!(body["status"], "ok");
}
both_backends!(ready_reports_where_limits_are_counted);

/// Two server processes on one PostgreSQL database and one Redis: what one instance
/// decides about a client holds on the other at once.
mod instances {
    use serde_json::json;

    use super::PASSWORD;
    use crate::cli::serve;
    use crate::support::{Backend, TestDb, redis_url};

    async fn login(c: &reqwest::Client, base: &str, user: &str, pw: &str) -> reqwest::Response {
        c.post(format!("{base}/api/v1/auth/login"))
            .json(&json!({"username": user, "password": pw}))
            .send()
            .await
            .unwrap()
    }

    async fn me(c: &reqwest::Client, base: &str, token: &str) -> u16 {
        c.get(format!("{base}/api/v1/auth/me"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn lockout_logout_and_rate_budget_hold_across_two_processes() {
        let Some(redis) = redis_url() else {
            eprintln!("skipped: TEST_REDIS_URL is not set");
            return;
        };
        if crate::support::postgres_url().is_none() {
            return;
        }
        let db = TestDb::new(Backend::Postgres).await;
        let dir = db.path().to_owned();
        let env = [
            ("CUSTODIAN_DATABASE__URL", db.url.as_str()),
            ("CUSTODIAN_REDIS__URL", redis.as_str()),
            ("CUSTODIAN_PASSWORD__HASH_MEMORY_KIB", "1024"),
            ("CUSTODIAN_PASSWORD__HASH_ITERATIONS", "1"),
            (
                "CUSTODIAN_RATE_LIMIT__ROUTES",
                "{\"GET /api/v1/sessions\": \"3/m\"}",
            ),
        ];
        for name in ["alice", "bob", "carol"] {
            crate::cli::create_user(&dir, &env, name, "admin", PASSWORD);
        }
        let a = serve(&dir, &env);
        let b = serve(&dir, &env);
        let (a, b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
        let c = reqwest::Client::new();

        // A lockout on A holds on B: five failures on A, then the right password on B.
        for _ in 0..5 {
            let r = login(&c, &a, "bob", "Wrong-password-123").await;
            assert!(matches!(r.status().as_u16(), 401 | 423));
        }
        let r = login(&c, &b, "bob", PASSWORD).await;
        assert_eq!(r.status(), 423, "bob is locked on B too");

        // A logout on A is refused on B.
        let r = login(&c, &a, "carol", PASSWORD).await;
        assert_eq!(r.status(), 200);
        let carol = crate::support::json(r).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(me(&c, &b, &carol).await, 200);
        let r = c
            .post(format!("{a}/api/v1/auth/logout"))
            .bearer_auth(&carol)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        assert_eq!(me(&c, &b, &carol).await, 401, "the session ended on B too");

        // The rate budget is shared: three a minute between both instances.
        let r = login(&c, &b, "alice", PASSWORD).await;
        let alice = crate::support::json(r).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let sessions = |base: &str| {
            c.get(format!("{base}/api/v1/sessions"))
                .bearer_auth(&alice)
                .send()
        };
        assert_eq!(sessions(&a).await.unwrap().status(), 200);
        assert_eq!(sessions(&b).await.unwrap().status(), 200);
        assert_eq!(sessions(&a).await.unwrap().status(), 200);
        let r = sessions(&b).await.unwrap();
        assert_eq!(r.status(), 429, "B saw the requests made on A");
        assert_eq!(sessions(&a).await.unwrap().status(), 429);
        // And the login limit too: eight sign-ins so far across A and B, ten allowed.
        assert_eq!(login(&c, &a, "alice", PASSWORD).await.status(), 200);
        assert_eq!(login(&c, &b, "alice", PASSWORD).await.status(), 200);
        assert_eq!(login(&c, &a, "alice", PASSWORD).await.status(), 429);
    }
}

/// Instances take several requests per Redis round trip for large budgets; the shared
/// budget still holds: two instances together never let more through than the burst.
#[tokio::test]
async fn leased_requests_never_exceed_the_shared_budget() {
    if crate::support::redis_url().is_none() || crate::support::postgres_url().is_none() {
        return;
    }
    let db = std::sync::Arc::new(crate::support::TestDb::new(Backend::Postgres).await);
    let opts = || me_limited("100/h burst 40");
    let a = TestServer::start_on(db.clone(), opts()).await;
    let b = TestServer::start_on(db.clone(), opts()).await;
    assert!(a.state.redis().is_some());
    a.user("erin", "admin", PASSWORD).await;
    let token = a.login("erin", PASSWORD).await;
    let mut allowed = 0;
    for i in 0..100 {
        let s = if i % 3 == 0 { &b } else { &a };
        match s.get_as("/api/v1/auth/me", &token).await.status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    // Burst 40, lease 2: each instance may strand at most one leased request.
    assert!((38..=40).contains(&allowed), "{allowed} allowed");
}
