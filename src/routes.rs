//! Every capability's routes and the middleware, assembled in one place: the
//! capabilities import `http` (errors, extractors, middleware), and only this module
//! imports the capabilities to put them together. Middleware order, outermost first:
//! request id → security headers → request log → client IP → audit (the response waits
//! for its event to commit) → metrics → rate limit → CORS → catch panic → timeout → body
//! guard (415/413 from headers) → route (extract → authorise → service → respond).

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::http::{cors_layer, method_not_allowed, not_found, panic_response, timeout_middleware};

/// The routes of the API and their OpenAPI document, built together so that a route
/// cannot exist without its documentation. Capabilities add their routes here.
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::http::docs::ApiDoc::openapi())
        .routes(routes!(crate::ops::health::health))
        .routes(routes!(crate::ops::health::ready))
        .merge(crate::identity::routes::router())
        .merge(crate::identity::passkey_routes::router())
        .merge(crate::identity::admin::router())
        .merge(crate::audit::routes::router())
        .merge(crate::records::routes::router())
        .merge(crate::portal::routes::router())
        .merge(crate::privacy::routes::router())
        .merge(crate::security::routes::router())
        .merge(crate::smart::routes::api_router())
        .merge(crate::accounts::routes::router())
        .merge(crate::oauth::routes::api_router())
}

/// The OpenAPI document alone (for `custodian openapi` and the drift check).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    crate::http::docs::add_conventional_errors(&mut doc);
    crate::http::docs::add_links(&mut doc);
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
    crate::http::docs::add_conventional_errors(&mut doc);
    crate::http::docs::add_links(&mut doc);
    let limit = usize::try_from(cfg.server.max_body.0).unwrap_or(usize::MAX);
    let timeout = cfg.server.request_timeout.std();
    let trusted = Arc::new(cfg.server.trusted_proxies.clone());
    let header_settings = crate::http::headers::HeaderSettings {
        hsts: cfg.sends_hsts(),
    };
    let cors = cors_layer(&cfg.server.cors_origins);

    let mut app: Router<AppState> = api
        .merge(crate::http::docs::swagger(doc))
        .merge(crate::web::router())
        .merge(crate::smart::routes::web_router())
        .merge(crate::accounts::pages::router())
        .merge(crate::fhir::routes::router())
        .merge(crate::oauth::routes::router())
        .merge(crate::oauth::pages::router())
        .route("/metrics", axum::routing::get(crate::metrics::handler))
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    app = app
        .layer(from_fn(crate::http::json::body_guard))
        .layer(axum::Extension(crate::http::json::BodyLimit(limit)))
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
    app.layer(from_fn(crate::fhir::outcome::middleware))
        .layer(from_fn_with_state(
            state.audit().clone(),
            crate::audit::middleware::middleware,
        ))
        .layer(from_fn_with_state(
            trusted,
            crate::http::client_ip::middleware,
        ))
        .layer(from_fn(crate::http::logging::middleware))
        .layer(from_fn_with_state(
            header_settings,
            crate::http::headers::middleware,
        ))
        .layer(from_fn(crate::http::request_id::middleware))
        .with_state(state)
}
