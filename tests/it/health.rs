//! `/health` and `/ready`.

use crate::both_backends;
use crate::support::{Backend, Options, TestServer, json};

async fn health_is_ok(backend: Backend) {
    let s = TestServer::start(backend).await;
    let res = s.get("/health").await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await, serde_json::json!({"status": "ok"}));
}
both_backends!(health_is_ok);

async fn ready_checks_the_database(backend: Backend) {
    let s = TestServer::start(backend).await;
    let res = s.get("/ready").await;
    assert_eq!(res.status(), 200);
    let body = json(res).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["database"], "ok");
    let expected_redis = if backend == Backend::Postgres && crate::support::redis_url().is_some() {
        "ok"
    } else {
        "not_configured"
    };
    assert_eq!(body["checks"]["redis"], expected_redis);

    // The database goes away: not ready, and /health still answers.
    s.state.db().close().await;
    let res = s.get("/ready").await;
    assert_eq!(res.status(), 503);
    let body = json(res).await;
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["database"], "unavailable");
    assert_eq!(s.get("/health").await.status(), 200);
}
both_backends!(ready_checks_the_database);

async fn ready_fails_when_redis_does_not_answer(backend: Backend) {
    let port = crate::support::free_port();
    let s = TestServer::start_with(
        backend,
        Options {
            sets: vec![("redis.url", format!("redis://127.0.0.1:{port}"))],
            no_redis: true,
            ..Options::default()
        },
    )
    .await;
    let res = s.get("/ready").await;
    assert_eq!(res.status(), 503);
    let body = json(res).await;
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["redis"], "unavailable");
}
both_backends!(ready_fails_when_redis_does_not_answer);
