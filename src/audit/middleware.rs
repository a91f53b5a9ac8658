//! The activity middleware: every request (but health checks and static files) yields
//! one event after the handler decides, and the response is sent only once that event
//! — and every event the handler added — is committed. If the audit store cannot be
//! written, the request fails closed with 503 and the failure is logged.
//!
//! Handlers enrich the request's event through the [`Audit`] extractor: the action and
//! resource, the actor (set by authentication), and the patients whose data the
//! response carries. A request about one patient names it in `patient_id`; a search
//! page names all the patients it returns in its one event, as `patient_ids` in the
//! context (hashed into the chain with the rest), and the database indexes both in
//! `audit_event_patients`, so the patient filter and the accounting of disclosures
//! find the event under each patient (migrations/*/0010_audit_patients.sql).
//!
//! A request refused before its handler ran (401, 403, a bad body, 413, 415, 429) is
//! still about something: the [`Subjects`] registered for the routes say what, from the
//! route and its path alone, so that such a request names its patient too. A refusal
//! for want of a permission ([`PermissionRefused`] on the response) is recorded as
//! `permission_denied`, with the action it attempted in `context.attempted`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::model::{Action, Context, ContextValue, NewEvent, Outcome, SafeId};
use super::service::AuditLog;
use crate::http::client_ip::ClientIp;
use crate::http::error::{ApiError, ErrorCode, PermissionRefused};
use crate::http::request_id::{ClientRequestId, RequestId};

/// Who acted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub id: Option<String>,
    pub name: String,
}

impl Actor {
    pub fn anonymous() -> Self {
        Self {
            id: None,
            name: "anonymous".into(),
        }
    }
    pub fn user(id: &str, username: &str) -> Self {
        Self {
            id: Some(id.to_owned()),
            name: username.to_owned(),
        }
    }
    pub fn system(command: &str) -> Self {
        Self {
            id: None,
            name: format!("system:{command}"),
        }
    }
}

/// What a handler says about its request.
#[derive(Clone, Debug, Default)]
pub struct Annotation {
    pub action: Option<Action>,
    pub resource_type: Option<&'static str>,
    pub resource_id: Option<String>,
    pub patient_id: Option<String>,
    pub outcome: Option<Outcome>,
    pub break_glass: bool,
    pub reason: Option<String>,
    pub context: Context,
}

#[derive(Debug, Default)]
struct Draft {
    actor: Option<Actor>,
    primary: Annotation,
    extra: Vec<Annotation>,
}

/// The audit record of the current request, shared by the middleware and the handler.
#[derive(Clone, Debug, Default)]
pub struct Audit(Arc<Mutex<Draft>>);

impl Audit {
    fn with<R>(&self, f: impl FnOnce(&mut Draft) -> R) -> Option<R> {
        self.0.lock().ok().map(|mut d| f(&mut d))
    }

    /// Names who made the request (authentication calls this).
    pub fn set_actor(&self, actor: Actor) {
        self.with(|d| d.actor = Some(actor));
    }

    pub fn actor(&self) -> Option<Actor> {
        self.with(|d| d.actor.clone()).flatten()
    }

    /// Describes the request's own event.
    pub fn annotate(&self, f: impl FnOnce(&mut Annotation)) {
        self.with(|d| f(&mut d.primary));
    }

    /// Adds a value to the request event's context.
    pub fn context(&self, key: &'static str, value: ContextValue) {
        self.with(|d| d.primary.context.insert(key, value));
    }

    /// Names, in the request's own event, the patients whose data the response carries
    /// (a search page): one event listing them all instead of one event per patient.
    /// An id that is not an opaque id (it cannot be, ids are made here) gets an event
    /// of its own rather than being left out.
    pub fn name_patients<'a>(&self, action: Action, ids: impl IntoIterator<Item = &'a str>) {
        let mut listed = Vec::new();
        for id in ids {
            match SafeId::new(id) {
                Some(s) => listed.push(s),
                None => self.touch_patient(action, "patient", Some(id), Some(id)),
            }
        }
        if !listed.is_empty() {
            self.context("patient_ids", ContextValue::Ids(listed));
        }
    }

    /// Adds an event naming one patient whose data the response carries (or, for a
    /// break-glass access, the patient it was for).
    pub fn touch_patient(
        &self,
        action: Action,
        resource_type: &'static str,
        resource_id: Option<&str>,
        patient_id: Option<&str>,
    ) {
        self.with(|d| {
            d.extra.push(Annotation {
                action: Some(action),
                resource_type: Some(resource_type),
                resource_id: resource_id.map(str::to_owned),
                patient_id: patient_id.map(str::to_owned),
                break_glass: d.primary.break_glass,
                reason: d.primary.reason.clone(),
                ..Annotation::default()
            });
        });
    }

    /// Whether a handler has said what the request is about.
    fn described(&self) -> bool {
        self.with(|d| {
            d.primary.action.is_some()
                || d.primary.resource_type.is_some()
                || d.primary.patient_id.is_some()
        })
        .unwrap_or(true)
    }

    /// Takes what `about` says for the request's own event (when no handler said it).
    fn describe(&self, about: Annotation) {
        self.with(|d| {
            let p = &mut d.primary;
            p.action = about.action;
            p.resource_type = about.resource_type;
            p.resource_id = about.resource_id;
            p.patient_id = about.patient_id;
            p.context.extend(about.context);
        });
    }

    /// Records the request as refused for want of a permission: `permission_denied`,
    /// with what it attempted.
    fn refused(&self) {
        self.with(|d| {
            let p = &mut d.primary;
            if let Some(attempted) = p.action.filter(|a| *a != Action::PermissionDenied) {
                p.context
                    .insert("attempted", ContextValue::Code(attempted.as_str()));
            }
            p.action = Some(Action::PermissionDenied);
        });
    }

    /// The request event and the extra events, completed with the request's facts.
    fn events(&self, common: &Common, log: &AuditLog) -> Vec<NewEvent> {
        let Some((actor, primary, extra)) = self.with(|d| {
            (
                d.actor.clone(),
                std::mem::take(&mut d.primary),
                std::mem::take(&mut d.extra),
            )
        }) else {
            return Vec::new();
        };
        let actor = actor.unwrap_or_else(Actor::anonymous);
        std::iter::once(primary)
            .chain(extra)
            .map(|a| {
                let outcome = a
                    .outcome
                    .unwrap_or_else(|| Outcome::from_status(common.status));
                let mut e = log.event(a.action.unwrap_or(Action::Access), outcome);
                e.actor_id.clone_from(&actor.id);
                e.actor = Some(actor.name.clone());
                e.resource_type = a.resource_type;
                e.resource_id = a.resource_id;
                e.patient_id = a.patient_id;
                e.method = Some(common.method.clone());
                e.path.clone_from(&common.route);
                e.status = Some(common.status);
                e.ip.clone_from(&common.ip);
                e.user_agent.clone_from(&common.user_agent);
                e.request_id.clone_from(&common.request_id);
                e.client_request_id.clone_from(&common.client_request_id);
                e.break_glass = a.break_glass;
                e.reason = a.reason;
                e.context = a.context;
                e
            })
            .collect()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Audit {
    type Rejection = std::convert::Infallible;

    /// The request's record; a detached one on routes that are not audited.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Audit>().cloned().unwrap_or_default())
    }
}

struct Common {
    method: String,
    route: Option<String>,
    status: u16,
    ip: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    client_request_id: Option<String>,
}

/// What a request is about, told from its method, route pattern and path alone: for the
/// requests that no handler described because they were refused before it ran.
/// Registered once at start-up ([`AuditLog::describe_with`]); consulted only for those.
pub trait Subjects: Send + Sync + 'static {
    /// The action, resource and patient of a request to `route` (`/api/v1/records/{id}`)
    /// at `path` (`/api/v1/records/5f…`); `None` for routes it does not know.
    fn about<'a>(
        &'a self,
        method: &'a str,
        route: &'a str,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Annotation>> + Send + 'a>>;
}

/// Several capabilities' [`Subjects`]: the first that knows the route answers.
pub struct AnyOf(pub Vec<Arc<dyn Subjects>>);

impl Subjects for AnyOf {
    fn about<'a>(
        &'a self,
        method: &'a str,
        route: &'a str,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Annotation>> + Send + 'a>> {
        Box::pin(async move {
            for s in &self.0 {
                if let Some(a) = s.about(method, route, path).await {
                    return Some(a);
                }
            }
            None
        })
    }
}

/// The segment of `path` that stands where `route` has `{name}`.
pub fn path_param<'a>(route: &str, path: &'a str, name: &str) -> Option<&'a str> {
    let (mut r, mut p) = (route.split('/'), path.split('/'));
    loop {
        match (r.next(), p.next()) {
            (Some(rs), Some(ps)) => {
                if rs.strip_prefix('{').and_then(|x| x.strip_suffix('}')) == Some(name) {
                    return Some(ps);
                }
            }
            _ => return None,
        }
    }
}

/// The action an undescribed request to a resource attempted, by its method.
pub fn action_of(method: &str) -> Action {
    match method {
        "GET" | "HEAD" => Action::Read,
        "POST" => Action::Create,
        "PUT" | "PATCH" => Action::Update,
        "DELETE" => Action::Delete,
        _ => Action::Access,
    }
}

/// Paths that yield no event: liveness, readiness, metrics and static files.
pub fn is_exempt(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/ready" | "/metrics" | "/favicon.ico" | "/api/docs"
    ) || path.starts_with("/assets/")
        || path.starts_with("/api/docs/")
}

/// Longest user agent kept.
const MAX_USER_AGENT: usize = 256;

pub async fn middleware(State(log): State<AuditLog>, mut req: Request, next: Next) -> Response {
    if is_exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let audit = Audit::default();
    req.extensions_mut().insert(audit.clone());
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let ip = req.extensions().get::<ClientIp>().map(|c| c.0.to_string());
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let client_request_id = req
        .extensions()
        .get::<ClientRequestId>()
        .map(|r| r.0.clone());
    // Kept for `Subjects` (a cheap clone: the URI's bytes are shared).
    let uri = req.uri().clone();
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(MAX_USER_AGENT).collect());

    let res = next.run(req).await;

    if let (Some(subjects), Some(route)) = (log.subjects(), route.as_deref())
        && !audit.described()
        && let Some(about) = subjects.about(&method, route, uri.path()).await
    {
        audit.describe(about);
    }
    if res.extensions().get::<PermissionRefused>().is_some() {
        audit.refused();
    }
    let common = Common {
        method,
        route,
        status: res.status().as_u16(),
        ip,
        user_agent,
        request_id,
        client_request_id,
    };
    let events = audit.events(&common, &log);
    match log.record(events).await {
        Ok(()) => res,
        Err(e) => {
            tracing::error!(
                error = %e,
                request_id = common.request_id.as_deref().unwrap_or(""),
                route = common.route.as_deref().unwrap_or("-"),
                status = common.status,
                "audit event not stored: the response is withheld (503)"
            );
            ApiError::new(ErrorCode::ServiceUnavailable)
                .with_detail("The audit trail cannot be written; the request was not completed. Try again shortly.")
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_params_by_pattern() {
        let r = "/api/v1/patients/{id}/records";
        assert_eq!(
            path_param(r, "/api/v1/patients/p-1/records", "id"),
            Some("p-1")
        );
        assert_eq!(path_param(r, "/api/v1/patients/p-1/records", "x"), None);
        assert_eq!(
            path_param("/api/v1/records/{id}", "/api/v1/records", "id"),
            None
        );
        assert_eq!(action_of("PATCH"), Action::Update);
    }

    #[test]
    fn exempt_paths() {
        for p in [
            "/health",
            "/ready",
            "/metrics",
            "/assets/app.css",
            "/api/docs/",
            "/api/docs/swagger-ui.css",
        ] {
            assert!(is_exempt(p), "{p}");
        }
        for p in [
            "/api/v1/patients",
            "/api/openapi.json",
            "/login",
            "/admin/users",
            "/healthz",
        ] {
            assert!(!is_exempt(p), "{p}");
        }
    }
}
