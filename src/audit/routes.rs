//! HTTP for reading the audit trail. Reading it is itself audited (the request's own
//! event says what was read and how much).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Audit;
use super::model::{Action, ContextValue, Outcome};
use super::service::{MAX_PAGE, Page, VerifyReport, decode_cursor};

// The page-size bound the document states is the service's.
const _: () = assert!(MAX_PAGE == 500);
use super::store::Filter;
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::http::json::QueryParams;
use crate::http::params::{Limit, Time};
use crate::http::{ApiError, FieldError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events))
        .routes(routes!(verify))
}

#[derive(Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// A user id or a username.
    actor: Option<String>,
    patient_id: Option<String>,
    /// One of the actions (`read`, `login_failed`, `break_glass`, `permission_denied`, …).
    action: Option<String>,
    /// `success`, `failure`, `denied` (401, 403) or `error` (5xx).
    outcome: Option<String>,
    /// The HTTP status sent (100–599).
    #[param(minimum = 100, maximum = 599)]
    status: Option<u16>,
    /// RFC 3339; events at or after.
    #[param(inline)]
    since: Option<Time>,
    /// RFC 3339; events before.
    #[param(inline)]
    until: Option<Time>,
    #[param(inline)]
    limit: Option<Limit<500, 50>>,
    cursor: Option<String>,
}

impl EventQuery {
    fn filter(&self) -> Result<(Filter, u32), ApiError> {
        let mut errors = Vec::new();
        let mut f = Filter {
            actor: self.actor.clone().filter(|s| !s.is_empty()),
            patient_id: self.patient_id.clone().filter(|s| !s.is_empty()),
            ..Filter::default()
        };
        if let Some(a) = &self.action {
            match Action::parse(a) {
                Some(a) => f.action = Some(a.as_str().to_owned()),
                None => errors.push(FieldError::new("action", "is not an audit action")),
            }
        }
        if let Some(o) = &self.outcome {
            match Outcome::parse(o) {
                Some(o) => f.outcome = Some(o.as_str().to_owned()),
                None => errors.push(FieldError::new(
                    "outcome",
                    "must be success, failure, denied or error",
                )),
            }
        }
        if let Some(s) = self.status {
            if (100..=599).contains(&s) {
                f.status = Some(i64::from(s));
            } else {
                errors.push(FieldError::new("status", "must be an HTTP status, 100–599"));
            }
        }
        f.since = self.since.clone().map(Time::into_timestamp);
        f.until = self.until.clone().map(Time::into_timestamp);
        if let (Some(s), Some(u)) = (&f.since, &f.until)
            && s > u
        {
            errors.push(FieldError::new("until", "must not be before since"));
        }
        let limit = self.limit.unwrap_or_default().get();
        if let Some(c) = &self.cursor {
            match decode_cursor(c) {
                Some(seq) => f.before_seq = Some(seq),
                None => errors.push(FieldError::new(
                    "cursor",
                    "is not a cursor from a previous page",
                )),
            }
        }
        if errors.is_empty() {
            Ok((f, limit))
        } else {
            Err(ApiError::validation(errors))
        }
    }
}

/// Audit events, newest first (needs `audit:read`).
#[utoipa::path(get, path = "/api/v1/audit/events", tag = "audit", security(("bearer" = ["audit:read"])),
    params(EventQuery),
    responses((status = 200, description = "A page of events", body = Page),
        (status = 403, description = "forbidden"), (status = 422, description = "validation_error")))]
pub async fn events(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
    QueryParams(q): QueryParams<EventQuery>,
) -> Result<Json<Page>, ApiError> {
    let (filter, limit) = q.filter()?;
    let page = state.audit().page(&filter, limit).await?;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("audit_log");
        a.context
            .insert("count", ContextValue::Int(page.items.len() as i64));
        if let Some(pid) = &filter.patient_id {
            a.context.insert("patient_id", ContextValue::id(pid));
        }
    });
    Ok(Json(page))
}

/// Verify the audit chain (needs `audit:read`).
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit", security(("bearer" = ["audit:read"])),
    responses((status = 200, description = "The result (ok or the first bad event)", body = VerifyReport),
        (status = 403, description = "forbidden")))]
pub async fn verify(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
) -> Result<Json<VerifyReport>, ApiError> {
    let report = state.audit().verify().await?;
    if !report.ok {
        state.security().raise(
            crate::security::Rule::AuditChainBroken,
            "audit_log",
            &format!(
                "verification failed at event {}",
                report.first_bad.as_deref().unwrap_or("(the head)")
            ),
        );
    }
    audit.annotate(|a| {
        a.action = Some(Action::AuditVerify);
        a.resource_type = Some("audit_log");
        a.context.insert("ok", ContextValue::Bool(report.ok));
        a.context.insert("events", ContextValue::Int(report.events));
    });
    Ok(Json(report))
}
