//! HTTP plumbing: router assembly and middleware order, errors, extractors, headers.
//!
//! Order, outermost first:
//! request id → security headers → request log → client IP → audit (the response waits
//! for its event to commit) → CORS → catch panic → timeout → body guard (415/413 from
//! headers) → route (extract → authorise → service → respond).

pub mod client_ip;
pub mod docs;
pub mod error;
pub mod headers;
pub mod health;
pub mod json;
pub mod logging;
pub mod params;
pub mod path;
pub mod request_id;
pub mod server;
pub mod tls;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
pub use error::{ApiError, ErrorCode, FieldError};

/// The name of a request method as a bounded label: one of the nine methods of RFC 9110
/// (and PATCH), or `_OTHER` for any method a client invents. Metrics and rate-limit keys
/// use it, so that a client cannot make a new series or budget per request.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// The routes of the API and their OpenAPI document, built together so that a route
/// cannot exist without its documentation. Capabilities add their routes here.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .merge(crate::identity::routes::router())
        .merge(crate::identity::admin::router())
        .merge(crate::audit::routes::router())
        .merge(crate::records::routes::router())
        .merge(crate::security::routes::router())
        .merge(crate::smart::routes::api_router())
        .merge(crate::accounts::routes::router())
}

/// The OpenAPI document alone (for `custodian openapi` and the drift check).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    docs::add_conventional_errors(&mut doc);
    docs::add_links(&mut doc);
    doc
}

/// The whole application router with every middleware.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// The router with extra routes merged in before the middleware (tests use this to add
/// a slow or failing handler behind the real stack).
pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    let cfg = state.config();
    let (api, mut doc) = api().split_for_parts();
    docs::add_conventional_errors(&mut doc);
    docs::add_links(&mut doc);
    let limit = usize::try_from(cfg.server.max_body.0).unwrap_or(usize::MAX);
    let timeout = cfg.server.request_timeout.std();
    let trusted = Arc::new(cfg.server.trusted_proxies.clone());
    let header_settings = headers::HeaderSettings {
        hsts: cfg.sends_hsts(),
    };
    let cors = cors_layer(&cfg.server.cors_origins);

    let mut app: Router<AppState> = api
        .merge(docs::swagger(doc))
        .merge(crate::web::router())
        .merge(crate::smart::routes::web_router())
        .merge(crate::accounts::pages::router())
        .route("/metrics", axum::routing::get(crate::metrics::handler))
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    app = app
        .layer(from_fn(json::body_guard))
        .layer(axum::Extension(json::BodyLimit(limit)))
        .layer(DefaultBodyLimit::max(limit))
        .layer(from_fn_with_state(timeout, timeout_middleware))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn_with_state(
            state.clone(),
            crate::ratelimit::middleware::middleware,
        ))
        .layer(from_fn_with_state(
            state.clone(),
            crate::metrics::middleware,
        ));
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app.layer(from_fn_with_state(
        state.audit().clone(),
        crate::audit::middleware::middleware,
    ))
    .layer(from_fn_with_state(trusted, client_ip::middleware))
    .layer(from_fn(logging::middleware))
    .layer(from_fn_with_state(header_settings, headers::middleware))
    .layer(from_fn(request_id::middleware))
    .with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter(|o| !o.contains('*'))
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                axum::http::header::IF_MATCH,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn timeout_middleware(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(limit = ?limit, "request timed out");
            ApiError::new(ErrorCode::Timeout).into_response()
        }
    }
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed)
}
