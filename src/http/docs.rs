//! The OpenAPI document (generated from the code) and Swagger UI (served from the
//! binary: the `vendored` build of utoipa-swagger-ui carries its files).

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::{Config as SwaggerConfig, SwaggerUi};

use super::headers::CspOverride;

pub const OPENAPI_PATH: &str = "/api/openapi.json";
pub const DOCS_PATH: &str = "/api/docs";

/// Swagger UI injects one `<style>` element; this is its SHA-256, checked by a test
/// that loads the page in Chromium. It changes with the Swagger UI version.
pub const SWAGGER_STYLE_HASH: &str = "'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Custodian",
        description = "A security-first healthcare API server. Every `/api/v1` route needs `Authorization: Bearer <token>` unless it says otherwise. Errors are RFC 9457 problem documents with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(super::error::Problem, super::error::FieldError, super::error::ErrorCode)),
    modifiers(&BearerAuth),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "auth", description = "Sign-in, sessions, passwords, TOTP"),
        (name = "tokens", description = "Personal API tokens"),
        (name = "users", description = "Accounts and sessions (users:manage)"),
        (name = "roles", description = "Roles and permissions (roles:manage)"),
        (name = "audit", description = "The audit trail (audit:read)"),
        (name = "patients", description = "Patients (PHI, sealed field by field)"),
        (name = "records", description = "Medical records (PHI)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A session token (`cst_…`) or an API token (`cat_…`)."))
                    .build(),
            ),
        );
    }
}

/// Swagger UI under `/api/docs`, serving the document at `/api/openapi.json`, with
/// the page's own content-security policy (the global one plus the style hash).
pub fn swagger<S: Clone + Send + Sync + 'static>(doc: utoipa::openapi::OpenApi) -> Router<S> {
    let config = SwaggerConfig::new([OPENAPI_PATH])
        .validator_url("none")
        .try_it_out_enabled(true);
    let ui = SwaggerUi::new(DOCS_PATH)
        .url(OPENAPI_PATH, doc)
        .config(config);
    Router::from(ui).layer(axum::middleware::from_fn(docs_csp))
}

fn docs_policy() -> String {
    super::headers::CSP.replace(
        "style-src 'self'",
        &format!("style-src 'self' {SWAGGER_STYLE_HASH}"),
    )
}

async fn docs_csp(req: Request, next: Next) -> Response {
    let is_page = req.uri().path().starts_with(DOCS_PATH);
    let mut res = next.run(req).await;
    if is_page && let Ok(v) = HeaderValue::from_str(&docs_policy()) {
        res.extensions_mut().insert(CspOverride(v));
    }
    res
}
