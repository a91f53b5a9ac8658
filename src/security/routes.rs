//! HTTP for reading security events (needs `audit:read`; reading them is audited).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::SecurityEvent;
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::Audit;
use crate::audit::model::{Action, ContextValue};
use crate::http::ApiError;
use crate::http::json::QueryParams;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

#[derive(Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecurityQuery {
    #[param(inline)]
    limit: Option<crate::http::params::Limit<500, 100>>,
}

/// The newest security events.
#[derive(Serialize, ToSchema)]
pub struct SecurityPage {
    pub items: Vec<SecurityEvent>,
    /// Always null: the list is the newest `limit` events.
    pub next_cursor: Option<String>,
}

/// Security events raised by the rules over the audit stream, newest first (needs
/// `audit:read`).
#[utoipa::path(get, path = "/api/v1/security/events", tag = "audit", security(("bearer" = ["audit:read"])),
    params(SecurityQuery),
    responses((status = 200, description = "The newest events", body = SecurityPage),
        (status = 403, description = "forbidden"), (status = 422, description = "validation_error")))]
pub async fn events(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::AuditRead>,
    QueryParams(q): QueryParams<SecurityQuery>,
) -> Result<Json<SecurityPage>, ApiError> {
    let limit = q.limit.unwrap_or_default().get();
    let items = state.security().list(limit).await?;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("security_events");
        a.context
            .insert("count", ContextValue::Int(items.len() as i64));
    });
    Ok(Json(SecurityPage {
        items,
        next_cursor: None,
    }))
}
