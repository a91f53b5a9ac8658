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

/// Adds to every operation the error answers the conventions give it, each as a
/// problem document (`application/problem+json`, schema `Problem`), so that the
/// document lists every status the server can answer and the shape of its body:
///
/// - every `/api/v1` operation: 429 (rate limits), 500 and 503 (the database, the audit
///   trail failing closed, the request timeout);
/// - operations that need a token: 401 and 403;
/// - a path with a parameter: 404 (an id that names nothing);
/// - a request body: 413, 415 and 422; query parameters: 422.
///
/// Error answers an operation documents itself keep their description and get the
/// problem body too.
pub fn add_conventional_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let problem = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build()
    };
    for (path, item) in &mut doc.paths.paths {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        let has_path_param = path.contains('{');
        let ops = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for op in ops.into_iter().flatten() {
            let secured = op.security.as_ref().is_some_and(|reqs| !reqs.is_empty());
            let has_query = op.parameters.iter().flatten().any(|p| match p {
                utoipa::openapi::RefOr::T(p) => {
                    p.parameter_in == utoipa::openapi::path::ParameterIn::Query
                }
                utoipa::openapi::RefOr::Ref(_) => false,
            });
            let has_body = op.request_body.is_some();
            let mut add = vec![
                ("429", "rate_limited (Retry-After)"),
                ("500", "internal_error (the body holds only a request_id)"),
                ("503", "service_unavailable or timeout"),
            ];
            if secured {
                add.push(("401", "unauthorized: a missing, invalid or expired token"));
                add.push(("403", "forbidden, or mfa_enrollment_required"));
            }
            if has_path_param {
                add.push(("404", "not_found"));
            }
            if has_body {
                add.push(("413", "payload_too_large"));
                add.push(("415", "unsupported_media_type"));
            }
            if has_body || has_query {
                add.push(("422", "validation_error"));
            }
            for (status, description) in add {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .build()
                            .into()
                    });
            }
            // Every error answer is a problem document (`ApiError` is the only way to
            // answer one), whatever content type the annotation guessed.
            for (status, response) in &mut op.responses.responses {
                let is_error = status.starts_with('4') || status.starts_with('5');
                if let utoipa::openapi::RefOr::T(r) = response
                    && is_error
                {
                    r.content.clear();
                    r.content.insert(PROBLEM_JSON.to_owned(), problem().into());
                }
            }
        }
    }
}

const PROBLEM_JSON: &str = super::error::PROBLEM_JSON;

/// Adds OpenAPI links from each operation that creates a resource (a `POST` answering
/// 201 with the new resource's `id`, or `name` for roles) to the operations on that
/// resource, so that clients and the fuzzer's stateful phase can follow them:
/// `POST /api/v1/patients` → `GET /api/v1/patients/{id}`, `POST /api/v1/patients/{id}/records`
/// → `GET /api/v1/records/{id}`, and so on. The created resource's collection is the last
/// segment of the path it was posted to.
pub fn add_links(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::LinkBuilder;
    // (path, method, operation id) of every operation.
    let mut ops: Vec<(String, &'static str, String)> = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [
            ("get", &item.get),
            ("put", &item.put),
            ("post", &item.post),
            ("delete", &item.delete),
            ("patch", &item.patch),
        ] {
            if let Some(id) = op.as_ref().and_then(|o| o.operation_id.clone()) {
                ops.push((path.clone(), method, id));
            }
        }
    }
    let schemas = doc
        .components
        .as_ref()
        .map(|c| c.schemas.clone())
        .unwrap_or_default();
    for (path, item) in &mut doc.paths.paths {
        let Some(post) = item.post.as_mut() else {
            continue;
        };
        let Some(collection) = path.rsplit('/').next().filter(|s| !s.starts_with('{')) else {
            continue;
        };
        let Some(RefOr::T(created)) = post.responses.responses.get_mut("201") else {
            continue;
        };
        // The field of the created resource that names it.
        let key = created
            .content
            .get("application/json")
            .and_then(|c| match c {
                RefOr::T(c) => c.schema.as_ref(),
                RefOr::Ref(_) => None,
            })
            .and_then(|s| match s {
                RefOr::Ref(r) => r.ref_location.rsplit('/').next().map(str::to_owned),
                RefOr::T(_) => None,
            })
            .and_then(|name| schemas.get(&name).cloned())
            .and_then(|s| match s {
                RefOr::T(utoipa::openapi::schema::Schema::Object(o)) => ["id", "name"]
                    .into_iter()
                    .find(|k| o.properties.contains_key(*k)),
                _ => None,
            });
        let Some(key) = key else { continue };
        let prefix = format!("/api/v1/{collection}/{{");
        for (target, _method, operation_id) in &ops {
            let Some(rest) = target.strip_prefix(&prefix) else {
                continue;
            };
            let Some((param, _)) = rest.split_once('}') else {
                continue;
            };
            created.links.insert(
                operation_id.clone(),
                LinkBuilder::new()
                    .operation_id(operation_id.clone())
                    .parameter(param, format!("$response.body#/{key}"))
                    .build()
                    .into(),
            );
        }
    }
}
