//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, `degraded` (serving, but the rate limiter has fallen back to this
    /// instance's own memory because Redis failed) or `unavailable`.
    pub status: &'static str,
    /// Each dependency: `ok`, `unavailable`, or `not_configured`.
    pub checks: Checks,
}

#[derive(Serialize, ToSchema)]
pub struct Checks {
    pub database: &'static str,
    pub redis: &'static str,
    /// Where rate limits are counted: `shared` (Redis), `local` (this instance),
    /// `degraded` (Redis configured but failing: counted locally) or `off`.
    pub rate_limit: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: the database (and Redis when configured) answer.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "A dependency does not answer", body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let database = match tokio::time::timeout(CHECK_TIMEOUT, state.db().ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            "unavailable"
        }
        Err(_) => {
            tracing::warn!("readiness: database check timed out");
            "unavailable"
        }
    };
    let redis = match state.redis() {
        None => "not_configured",
        Some(client) => match tokio::time::timeout(CHECK_TIMEOUT, ping_redis(client)).await {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                tracing::warn!(error = %e.kind_str(), "readiness: redis check failed");
                "unavailable"
            }
            Err(_) => {
                tracing::warn!("readiness: redis check timed out");
                "unavailable"
            }
        },
    };
    let ok = database == "ok" && redis != "unavailable";
    let rate_limit = state.limiter().mode();
    let status = match (ok, rate_limit) {
        (false, _) => "unavailable",
        (true, crate::ratelimit::Mode::Degraded) => "degraded",
        (true, _) => "ok",
    };
    let body = Readiness {
        status,
        checks: Checks {
            database,
            redis,
            rate_limit: rate_limit.as_str(),
        },
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn ping_redis(client: &redis::Client) -> Result<(), RedisFailure> {
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|_| RedisFailure::Connect)?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|_| RedisFailure::Command)?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(RedisFailure::Command)
    }
}

/// Why Redis failed, without the URL (it may carry a password).
#[derive(Debug)]
enum RedisFailure {
    Connect,
    Command,
}

impl RedisFailure {
    fn kind_str(&self) -> &'static str {
        match self {
            RedisFailure::Connect => "cannot connect",
            RedisFailure::Command => "PING failed",
        }
    }
}
