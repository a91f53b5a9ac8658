//! Every user's live sessions and personal API tokens, for administrators
//! (`users:manage`): listed together, filtered by user and kind, each ended on its own or
//! all of a user's at once. The same rules as the API (`DELETE /api/v1/sessions/{id}`,
//! `DELETE /api/v1/users/{id}/tokens/{token_id}`, `POST /api/v1/users/{id}/logout`):
//! nobody acts on an account holding more than they do, and no secret is ever shown.

use std::collections::HashMap;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::pages::{Layout, display_time, notice, render, render_status};
use super::session::{Fields, WebForm, WebUser};
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::ApiError;
use crate::http::json::QueryParams as Query;
use crate::http::path::Path;
use crate::identity::service::describe;
use crate::identity::{Grantor, IdentityError, store};

/// Most sessions and most tokens listed on one page (each).
const MAX_ROWS: i64 = 500;

/// A live session or API token as the pages list it.
pub struct CredentialRow {
    /// `session` or `api_token`.
    pub kind: &'static str,
    pub id: String,
    pub user_id: String,
    pub username: String,
    /// The browser (user agent) of a session, the name of a token.
    pub label: String,
    pub ip: String,
    pub created_at: String,
    pub last_used_at: String,
    pub expires_at: String,
    pub expires_soon: bool,
    /// The viewer may end it (their role covers the owner's).
    pub manageable: bool,
    /// The viewer's own current session.
    pub current: bool,
}

/// Whether the viewer may act on an account holding `role` (delegation: their
/// permissions cover the role's).
pub(crate) async fn may_manage(
    state: &AppState,
    u: &WebUser,
    role: &str,
) -> Result<bool, ApiError> {
    let perms = store::role_permissions(state.db(), role).await?;
    Ok(Grantor::user(&u.principal).missing(&perms).is_empty())
}

fn session_row(s: store::SessionRow, manageable: bool, current: Option<&str>) -> CredentialRow {
    CredentialRow {
        kind: "session",
        current: current == Some(s.id.as_str()),
        id: s.id,
        user_id: s.user_id,
        username: s.username,
        label: s.user_agent.unwrap_or_default(),
        ip: s.ip.unwrap_or_default(),
        created_at: display_time(&s.created_at),
        last_used_at: display_time(&s.last_used_at),
        expires_at: display_time(&s.absolute_expires_at),
        expires_soon: false,
        manageable,
    }
}

fn token_row(
    state: &AppState,
    username: String,
    t: store::TokenRow,
    manageable: bool,
) -> CredentialRow {
    CredentialRow {
        kind: "api_token",
        expires_soon: state.identity().expires_soon(&t.expires_at),
        id: t.id,
        user_id: t.user_id,
        username,
        label: t.name,
        ip: String::new(),
        created_at: display_time(&t.created_at),
        last_used_at: t
            .last_used_at
            .as_deref()
            .map_or_else(|| "never".into(), display_time),
        expires_at: display_time(&t.expires_at),
        manageable,
        current: false,
    }
}

/// One user's live sessions and API tokens (for the user page; the viewer's right to act
/// is the caller's to show).
pub(crate) async fn credentials_of(
    state: &AppState,
    user_id: &str,
) -> Result<(Vec<CredentialRow>, Vec<CredentialRow>), ApiError> {
    let identity = state.identity();
    let now = identity.now_timestamp();
    let sessions = store::live_sessions(state.db(), Some(user_id), &now)
        .await?
        .into_iter()
        .filter(|s| !identity.session_idle(&s.last_used_at))
        .map(|s| session_row(s, true, None))
        .collect();
    let user = identity.user(user_id).await?;
    let tokens = identity
        .user_tokens(user_id)
        .await?
        .into_iter()
        .map(|t| token_row(state, user.username.clone(), t, true))
        .collect();
    Ok((sessions, tokens))
}

#[derive(Deserialize, Default)]
pub struct SessionsQuery {
    /// Part of a username.
    #[serde(default)]
    user: String,
    /// `session`, `api_token`, or empty for both.
    #[serde(default)]
    kind: String,
    #[serde(default)]
    ok: Option<String>,
}

#[derive(Template)]
#[template(path = "sessions.html")]
struct SessionsPage {
    layout: Layout,
    user: String,
    kind: String,
    rows: Vec<CredentialRow>,
    sessions: usize,
    tokens: usize,
    /// A list was cut at [`MAX_ROWS`].
    truncated: bool,
    errors: Vec<String>,
}

async fn sessions_page(
    state: &AppState,
    u: &WebUser,
    user: &str,
    kind: &str,
    notice: Option<String>,
) -> Result<SessionsPage, ApiError> {
    let identity = state.identity();
    let now = identity.now_timestamp();
    let user: String = user.trim().chars().take(64).collect();
    let kind = match kind {
        "session" | "api_token" => kind,
        _ => "",
    };
    let q = Some(user.as_str()).filter(|q| !q.is_empty());
    let mut roles: HashMap<String, bool> = HashMap::new();
    let mut manageable = async |user_id: &str| -> Result<bool, ApiError> {
        let role = identity.user(user_id).await?.role;
        if let Some(m) = roles.get(&role) {
            return Ok(*m);
        }
        let m = may_manage(state, u, &role).await?;
        roles.insert(role, m);
        Ok(m)
    };
    let mut rows = Vec::new();
    let mut truncated = false;
    let (mut sessions, mut tokens) = (0, 0);
    if kind != "api_token" {
        let found = store::sessions_of_users(state.db(), q, &now, MAX_ROWS).await?;
        truncated |= found.len() as i64 >= MAX_ROWS;
        for s in found {
            if identity.session_idle(&s.last_used_at) {
                continue;
            }
            let m = manageable(&s.user_id).await?;
            rows.push(session_row(s, m, u.principal.session_id()));
            sessions += 1;
        }
    }
    if kind != "session" {
        let found = store::tokens_of_users(state.db(), q, &now, MAX_ROWS).await?;
        truncated |= found.len() as i64 >= MAX_ROWS;
        for t in found {
            let m = manageable(&t.token.user_id).await?;
            rows.push(token_row(state, t.username, t.token, m));
            tokens += 1;
        }
    }
    Ok(SessionsPage {
        layout: Layout::of(state, u, notice),
        user,
        kind: kind.to_owned(),
        rows,
        sessions,
        tokens,
        truncated,
        errors: Vec::new(),
    })
}

/// `GET /admin/sessions`: every user's live sessions and API tokens.
pub async fn sessions(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<SessionsQuery>,
) -> Response {
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    match sessions_page(&state, &u, &q.user, &q.kind, notice(q.ok.as_deref())).await {
        Ok(p) => {
            audit.annotate(|a| {
                a.action = Some(Action::Read);
                a.resource_type = Some("session");
                a.context
                    .insert("sessions", ContextValue::Int(p.sessions as i64));
                a.context
                    .insert("api_tokens", ContextValue::Int(p.tokens as i64));
            });
            render(&p)
        }
        Err(e) => e.into_response(),
    }
}

/// Where a change made from the sessions page or a user page goes next: back to the
/// page it came from (`back=sessions`, with its filters), else the user's page. The
/// filters are re-encoded, so nothing of the form becomes a path.
pub(crate) fn back(f: &Fields, user_id: &str, code: &str) -> Response {
    if f.text("back") == "sessions" {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("user", &f.text("back_user"))
            .append_pair("kind", &f.text("back_kind"))
            .append_pair("ok", code)
            .finish();
        Redirect::to(&format!("/admin/sessions?{query}")).into_response()
    } else {
        let path: String = form_urlencoded::byte_serialize(user_id.as_bytes()).collect();
        Redirect::to(&format!("/admin/users/{path}?ok={code}")).into_response()
    }
}

/// A refused or failed change, shown on the page it came from.
async fn refused(state: &AppState, form: &WebForm, user_id: &str, e: IdentityError) -> Response {
    let f = &form.fields;
    if f.text("back") != "sessions" {
        return super::pages::user_page_error(state, &form.user, user_id, e).await;
    }
    match e {
        IdentityError::Forbidden(_) | IdentityError::Conflict(_) | IdentityError::Invalid(..) => {
            match sessions_page(
                state,
                &form.user,
                &f.text("back_user"),
                &f.text("back_kind"),
                None,
            )
            .await
            {
                Ok(mut p) => {
                    p.errors = vec![describe(&e)];
                    render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
                }
                Err(e) => e.into_response(),
            }
        }
        e => ApiError::from(e).into_response(),
    }
}

/// `POST /admin/sessions/{id}/end`: ends one session.
pub async fn end_session(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    if let Some(r) = form.user.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("session");
        a.resource_id = Some(id.chars().take(64).collect());
    });
    let owner = form.fields.text("user_id");
    match state
        .identity()
        .end_session(Grantor::user(&form.user.principal), &id)
        .await
    {
        Ok(owner) => {
            audit.context("user_id", ContextValue::id(&owner));
            back(&form.fields, &owner, "ended")
        }
        // Already gone: nothing left to end.
        Err(IdentityError::NotFound) => back(&form.fields, &owner, "ended"),
        Err(e) => refused(&state, &form, &owner, e).await,
    }
}

/// `POST /admin/users/{id}/tokens/{token_id}/revoke`: revokes one API token of a user.
pub async fn revoke_token(
    State(state): State<AppState>,
    audit: Audit,
    Path((user_id, token_id)): Path<(String, String)>,
    form: WebForm,
) -> Response {
    if let Some(r) = form.user.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("api_token");
        a.resource_id = Some(token_id.chars().take(64).collect());
        a.context.insert("user_id", ContextValue::id(&user_id));
    });
    match state
        .identity()
        .admin_revoke_token(Grantor::user(&form.user.principal), &user_id, &token_id)
        .await
    {
        Ok(()) | Err(IdentityError::NotFound) => back(&form.fields, &user_id, "revoked"),
        Err(e) => refused(&state, &form, &user_id, e).await,
    }
}
