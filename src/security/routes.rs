//! HTTP for reading security events (needs `audit:read`; reading them is audited).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Filter, Rule, SEVERITIES, SecurityPage, decode_cursor};
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::Audit;
use crate::audit::model::{Action, ContextValue};
use crate::http::json::QueryParams;
use crate::http::params::{Limit, Text, Time};
use crate::http::{ApiError, FieldError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

#[derive(Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecurityQuery {
    /// Only this rule: `failed_logins_account`, `failed_logins_address`,
    /// `account_locked`, `break_glass`, `many_patients` or `audit_chain_broken`.
    rule: Option<String>,
    /// Only this severity: `warning`, `high` or `critical`.
    severity: Option<String>,
    /// Only this subject, exactly (a user id or username, or an address).
    #[param(inline)]
    subject: Option<Text<200>>,
    /// RFC 3339; events at or after.
    #[param(inline)]
    since: Option<Time>,
    /// RFC 3339; events before.
    #[param(inline)]
    until: Option<Time>,
    #[param(inline)]
    limit: Option<Limit<500, 100>>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl SecurityQuery {
    fn filter(&self) -> Result<(Filter, u32), ApiError> {
        let mut errors = Vec::new();
        let mut f = Filter::default();
        if let Some(r) = self.rule.as_deref().filter(|r| !r.is_empty()) {
            match Rule::ALL.iter().find(|x| x.as_str() == r) {
                Some(x) => f.rule = Some(x.as_str().to_owned()),
                None => errors.push(FieldError::new("rule", "is not a rule")),
            }
        }
        if let Some(s) = self.severity.as_deref().filter(|s| !s.is_empty()) {
            match SEVERITIES.iter().find(|x| **x == s) {
                Some(x) => f.severity = Some((*x).to_owned()),
                None => errors.push(FieldError::new(
                    "severity",
                    "must be warning, high or critical",
                )),
            }
        }
        f.subject = self
            .subject
            .as_ref()
            .map(|s| s.as_str().trim().to_owned())
            .filter(|s| !s.is_empty());
        f.since = self.since.clone().map(Time::into_timestamp);
        f.until = self.until.clone().map(Time::into_timestamp);
        if let (Some(s), Some(u)) = (&f.since, &f.until)
            && s > u
        {
            errors.push(FieldError::new("until", "must not be before since"));
        }
        if let Some(c) = &self.cursor {
            match decode_cursor(c) {
                Some(b) => f.before = Some(b),
                None => errors.push(FieldError::new(
                    "cursor",
                    "is not a cursor from a previous page",
                )),
            }
        }
        if errors.is_empty() {
            Ok((f, self.limit.unwrap_or_default().get()))
        } else {
            Err(ApiError::validation(errors))
        }
    }
}

/// Security events raised by the rules over the audit stream, newest first, filtered by
/// rule, severity, subject and time (needs `audit:read`).
#[utoipa::path(get, path = "/api/v1/security/events", tag = "audit", security(("bearer" = ["audit:read"])),
    params(SecurityQuery),
    responses((status = 200, description = "A page of events", body = SecurityPage),
        (status = 403, description = "forbidden"), (status = 422, description = "validation_error")))]
pub async fn events(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
    QueryParams(q): QueryParams<SecurityQuery>,
) -> Result<Json<SecurityPage>, ApiError> {
    let (filter, limit) = q.filter()?;
    let page = state.security().search(&filter, limit).await?;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("security_events");
        a.context
            .insert("count", ContextValue::Int(page.items.len() as i64));
    });
    Ok(Json(page))
}
