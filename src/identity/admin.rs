//! HTTP for administering accounts and sessions (`users:manage`), and reading roles and
//! permissions. Every change is audited with who did what to whom (never a password).

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::delegation::Grantor;
use super::model::{MAX_PASSWORD, User};
use super::service::IdentityError;
use super::store;
use crate::access::{Authorized, Permission, need};
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::config::Secret;
use crate::http::json::{JsonBody, QueryParams};
use crate::http::params::Limit;
use crate::http::{ApiError, FieldError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, patch_user))
        .routes(routes!(unlock_user))
        .routes(routes!(reset_password))
        .routes(routes!(user_logins))
        .routes(routes!(list_sessions))
        .routes(routes!(delete_session))
        .routes(routes!(user_tokens))
        .routes(routes!(revoke_user_token))
        .routes(routes!(logout_user))
        .routes(routes!(reset_totp))
        .routes(routes!(permissions))
        .routes(routes!(roles, create_role))
        .routes(routes!(update_role, delete_role))
}

#[derive(Serialize, ToSchema)]
pub struct UserView {
    id: String,
    username: String,
    email: Option<String>,
    role: String,
    active: bool,
    mfa_enabled: bool,
    /// Set while sign-in is locked for this account.
    locked_until: Option<String>,
    password_changed_at: String,
    /// An administrator set the password: the user must change it at the next sign-in.
    must_change_password: bool,
    created_at: String,
    updated_at: String,
}

async fn view(state: &AppState, u: User) -> Result<UserView, ApiError> {
    let now = state.identity().now_timestamp();
    let locked_until =
        store::locked_until(state.db(), &format!("user:{}", u.username), &now).await?;
    Ok(UserView {
        id: u.id,
        username: u.username,
        email: u.email,
        role: u.role,
        active: u.active,
        mfa_enabled: u.totp_enabled,
        locked_until,
        password_changed_at: u.password_changed_at,
        must_change_password: u.must_change_password,
        created_at: u.created_at,
        updated_at: u.updated_at,
    })
}

fn audit_user(audit: &Audit, action: Action, id: &str) {
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("user");
        a.resource_id = Some(id.to_owned());
    });
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// Part of a username or email.
    q: Option<String>,
    #[param(inline)]
    limit: Option<Limit<200, 50>>,
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserPage {
    items: Vec<UserView>,
    next_cursor: Option<String>,
}

/// Users, by username (needs `users:manage`).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", security(("bearer" = ["users:manage"])), params(UserQuery),
    responses((status = 200, description = "A page of users", body = UserPage)))]
pub async fn list_users(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    QueryParams(q): QueryParams<UserQuery>,
) -> Result<Json<UserPage>, ApiError> {
    let limit = q.limit.unwrap_or_default().get();
    let rows = store::list_users(
        state.db(),
        q.q.as_deref(),
        q.cursor.as_deref(),
        i64::from(limit) + 1,
    )
    .await?;
    let more = rows.len() > limit as usize;
    let mut items = Vec::new();
    for u in rows.into_iter().take(limit as usize) {
        items.push(view(&state, u).await?);
    }
    let next_cursor = if more {
        items.last().map(|u| u.username.clone())
    } else {
        None
    };
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("user");
        a.context
            .insert("count", ContextValue::Int(items.len() as i64));
    });
    Ok(Json(UserPage { items, next_cursor }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Letters, digits and `. _ - @`.
    #[schema(min_length = 1, max_length = 64)]
    username: String,
    #[serde(default)]
    #[schema(format = Email, max_length = 254)]
    email: Option<String>,
    #[schema(value_type = String, format = Password, max_length = 1024)]
    password: String,
    role: String,
    /// The user must change the password at the first sign-in (sign-in answers 403
    /// `password_expired` until then). Default false.
    #[serde(default)]
    must_change_password: bool,
}

/// Create a user (needs `users:manage`); the password policy applies.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", security(("bearer" = ["users:manage"])), request_body = NewUser,
    responses((status = 201, description = "Created", body = UserView),
        (status = 409, description = "username taken"),
        (status = 422, description = "validation_error or password_policy")))]
pub async fn create_user(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    JsonBody(req): JsonBody<NewUser>,
) -> Result<Response, ApiError> {
    if req.password.chars().count() > MAX_PASSWORD {
        return Err(ApiError::field(
            "password",
            "must be at most 1024 characters",
        ));
    }
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("user");
    });
    let user = state
        .identity()
        .create_user_with(
            Grantor::user(&auth),
            &req.username,
            req.email.as_deref(),
            &req.role,
            &Secret::new(req.password),
            req.must_change_password,
        )
        .await?;
    audit.annotate(|a| {
        a.resource_id = Some(user.id.clone());
        a.context.insert("role", ContextValue::id(&user.role));
        a.context.insert(
            "must_change_password",
            ContextValue::Bool(user.must_change_password),
        );
    });
    Ok((StatusCode::CREATED, Json(view(&state, user).await?)).into_response())
}

/// One user (needs `users:manage`).
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 200, body = UserView), (status = 404, description = "not_found")))]
pub async fn get_user(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<UserView>, ApiError> {
    audit_user(&audit, Action::Read, &id);
    let u = state.identity().user(&id).await?;
    Ok(Json(view(&state, u).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    #[serde(default)]
    role: Option<String>,
    /// A new email, or null to remove it.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    email: Option<Option<String>>,
    #[serde(default)]
    active: Option<bool>,
}

/// `Some(None)` for an explicit null, `None` for an absent field.
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// Change a user's role, email or active flag (needs `users:manage`). Deactivating ends
/// every session and API token of the user at once. The last active user who can manage
/// users cannot be deactivated or given a role without `users:manage` (409).
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), request_body = UserPatch,
    responses((status = 200, body = UserView), (status = 409, description = "conflict"), (status = 404, description = "not_found")))]
pub async fn patch_user(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UserPatch>,
) -> Result<Json<UserView>, ApiError> {
    audit_user(&audit, Action::Update, &id);
    let email = req.email.as_ref().map(|e| e.as_deref());
    let before = state.identity().user(&id).await?;
    let after = state
        .identity()
        .update_user(
            Grantor::user(&auth),
            &id,
            req.role.as_deref(),
            email,
            req.active,
        )
        .await?;
    if !after.email.eq(&before.email) {
        state
            .accounts()
            .notify_email_changed(&before)
            .await
            .map_err(ApiError::from)?;
    }
    audit.annotate(|a| {
        if let Some(r) = &req.role {
            a.context.insert("role", ContextValue::id(r));
        }
        if let Some(act) = req.active {
            a.context.insert("active", ContextValue::Bool(act));
        }
        if req.email.is_some() {
            a.context.insert("email_changed", ContextValue::Bool(true));
        }
    });
    let u = state.identity().user(&id).await?;
    Ok(Json(view(&state, u).await?))
}

/// End a sign-in lock early (needs `users:manage`).
#[utoipa::path(post, path = "/api/v1/users/{id}/unlock", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 204, description = "Unlocked"), (status = 404, description = "not_found")))]
pub async fn unlock_user(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit_user(&audit, Action::Update, &id);
    audit.context("change", ContextValue::Code("unlock"));
    state.identity().unlock(Grantor::user(&auth), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordReset {
    #[schema(value_type = String, format = Password)]
    new_password: String,
    /// The user must change it at the next sign-in (sign-in answers 403
    /// `password_expired` until then). Default false.
    #[serde(default)]
    must_change_password: bool,
}

/// Set a user's password (needs `users:manage`, and every permission of the user's
/// role): the policy and history apply, and every credential of the user ends —
/// sessions, personal API tokens and app grants. With `must_change_password` the user
/// must change it at the next sign-in.
#[utoipa::path(post, path = "/api/v1/users/{id}/password", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), request_body = PasswordReset,
    responses((status = 204, description = "Set"), (status = 422, description = "password_policy")))]
pub async fn reset_password(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PasswordReset>,
) -> Result<StatusCode, ApiError> {
    if req.new_password.chars().count() > MAX_PASSWORD {
        return Err(ApiError::field(
            "new_password",
            "must be at most 1024 characters",
        ));
    }
    audit_user(&audit, Action::Update, &id);
    audit.context("change", ContextValue::Code("password_reset"));
    audit.context(
        "must_change_password",
        ContextValue::Bool(req.must_change_password),
    );
    state
        .identity()
        .admin_reset_password(
            Grantor::user(&auth),
            &id,
            &Secret::new(req.new_password),
            req.must_change_password,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    #[param(inline)]
    limit: Option<Limit<200, 50>>,
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LoginView {
    at: String,
    ip: Option<String>,
    user_agent: Option<String>,
    success: bool,
    /// success, bad_password, unknown_user, locked, bad_totp, mfa_required, expired, inactive, rate_limited
    reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoginPage {
    items: Vec<LoginView>,
    next_cursor: Option<String>,
}

/// A user's sign-in attempts, newest first (needs `users:manage`).
#[utoipa::path(get, path = "/api/v1/users/{id}/logins", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path), PageQuery), responses((status = 200, body = LoginPage)))]
pub async fn user_logins(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<LoginPage>, ApiError> {
    audit_user(&audit, Action::Read, &id);
    audit.context("what", ContextValue::Code("logins"));
    state.identity().user(&id).await?;
    let limit = q.limit.unwrap_or_default().get();
    let before = match &q.cursor {
        Some(c) => Some(
            c.split_once('|')
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor from a previous page"))?,
        ),
        None => None,
    };
    let rows = store::attempts(state.db(), &id, before, i64::from(limit) + 1).await?;
    let more = rows.len() > limit as usize;
    let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        rows.last().map(|r| format!("{}|{}", r.at, r.id))
    } else {
        None
    };
    Ok(Json(LoginPage {
        items: rows
            .into_iter()
            .map(|r| LoginView {
                at: r.at,
                ip: r.ip,
                user_agent: r.user_agent,
                success: r.success,
                reason: r.reason,
            })
            .collect(),
        next_cursor,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    user_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionView {
    id: String,
    user_id: String,
    username: String,
    created_at: String,
    last_used_at: String,
    expires_at: String,
    ip: Option<String>,
    user_agent: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionPage {
    items: Vec<SessionView>,
    next_cursor: Option<String>,
}

/// Active sessions, of one user or all (needs `users:manage`).
#[utoipa::path(get, path = "/api/v1/sessions", tag = "users", security(("bearer" = ["users:manage"])),
    params(SessionQuery), responses((status = 200, body = SessionPage)))]
pub async fn list_sessions(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    QueryParams(q): QueryParams<SessionQuery>,
) -> Result<Json<SessionPage>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("session");
    });
    let identity = state.identity();
    let rows =
        store::live_sessions(state.db(), q.user_id.as_deref(), &identity.now_timestamp()).await?;
    let items = rows
        .into_iter()
        .filter(|s| !identity.session_idle(&s.last_used_at))
        .map(|s| SessionView {
            id: s.id,
            user_id: s.user_id,
            username: s.username,
            created_at: s.created_at,
            last_used_at: s.last_used_at,
            expires_at: s.absolute_expires_at,
            ip: s.ip,
            user_agent: s.user_agent,
        })
        .collect();
    Ok(Json(SessionPage {
        items,
        next_cursor: None,
    }))
}

/// End a session (needs `users:manage`).
#[utoipa::path(delete, path = "/api/v1/sessions/{id}", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)), responses((status = 204, description = "Ended"), (status = 404, description = "not_found")))]
pub async fn delete_session(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("session");
        a.resource_id = Some(id.clone());
    });
    let owner = state
        .identity()
        .end_session(Grantor::user(&auth), &id)
        .await?;
    audit.context("user_id", ContextValue::id(&owner));
    Ok(StatusCode::NO_CONTENT)
}

/// A user's personal API token, as an administrator sees it (never its secret).
#[derive(Serialize, ToSchema)]
pub struct UserTokenView {
    id: String,
    user_id: String,
    name: String,
    created_at: String,
    expires_at: String,
    last_used_at: Option<String>,
    /// The token ends within 24 hours.
    expires_soon: bool,
}

#[derive(Serialize, ToSchema)]
pub struct UserTokenList {
    items: Vec<UserTokenView>,
    next_cursor: Option<String>,
}

/// A user's live personal API tokens, newest first, never their secrets (needs
/// `users:manage`).
#[utoipa::path(get, path = "/api/v1/users/{id}/tokens", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 200, body = UserTokenList), (status = 404, description = "not_found")))]
pub async fn user_tokens(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<UserTokenList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("api_token");
        a.context.insert("user_id", ContextValue::id(&id));
    });
    let identity = state.identity();
    let items: Vec<UserTokenView> = identity
        .user_tokens(&id)
        .await?
        .into_iter()
        .map(|t| UserTokenView {
            expires_soon: identity.expires_soon(&t.expires_at),
            id: t.id,
            user_id: t.user_id,
            name: t.name,
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
        })
        .collect();
    audit.context("count", ContextValue::Int(items.len() as i64));
    Ok(Json(UserTokenList {
        items,
        next_cursor: None,
    }))
}

/// Revoke one personal API token of a user (needs `users:manage`, and every permission
/// of the user's role); it stops working at once.
#[utoipa::path(delete, path = "/api/v1/users/{id}/tokens/{token_id}", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path), ("token_id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, description = "not_found: no such user or live token")))]
pub async fn revoke_user_token(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("api_token");
        a.resource_id = Some(token_id.chars().take(64).collect());
        a.context.insert("user_id", ContextValue::id(&id));
    });
    state
        .identity()
        .admin_revoke_token(Grantor::user(&auth), &id, &token_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// End every credential of a user: sessions, personal API tokens and app grants (needs
/// `users:manage`, and every permission of the user's role). The account stays active:
/// its owner can sign in again.
#[utoipa::path(post, path = "/api/v1/users/{id}/logout", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 204, description = "Every credential ended"), (status = 404, description = "not_found")))]
pub async fn logout_user(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Logout);
        a.resource_type = Some("user");
        a.resource_id = Some(id.clone());
        a.context.insert("all", ContextValue::Bool(true));
    });
    let ended = state
        .identity()
        .end_credentials(Grantor::user(&auth), &id)
        .await?;
    audit.context(
        "ended",
        ContextValue::Int(i64::try_from(ended).unwrap_or(i64::MAX)),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct TotpResetView {
    /// Whether the user was told by mail (only to a verified address, when mail can be
    /// sent).
    notified: bool,
}

/// Reset a user's second factors, for a lost authenticator (needs `users:manage`, and
/// every permission of the user's role; never one's own): the TOTP secret, every
/// passkey and the recovery codes are removed, the user's sessions and app grants end, and the user is told by
/// mail. They sign in with the password and set up an authenticator again (with
/// `mfa.required`, before anything else).
#[utoipa::path(post, path = "/api/v1/users/{id}/totp/reset", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 200, description = "Reset", body = TotpResetView),
        (status = 404, description = "not_found"),
        (status = 409, description = "conflict: no second factor to reset")))]
pub async fn reset_totp(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<TotpResetView>, ApiError> {
    audit_user(&audit, Action::Update, &id);
    audit.context("change", ContextValue::Code("totp_reset"));
    let user = state
        .identity()
        .reset_totp(Grantor::user(&auth), &id)
        .await?;
    let notified = state
        .accounts()
        .notify_totp_reset(&user)
        .await
        .map_err(ApiError::from)?;
    audit.context("notified", ContextValue::Bool(notified));
    Ok(Json(TotpResetView { notified }))
}

/// The permission names.
#[utoipa::path(get, path = "/api/v1/permissions", tag = "roles", security(("bearer" = ["roles:manage"])),
    responses((status = 200, body = NameList)))]
pub async fn permissions(
    audit: Audit,
    _auth: Authorized<need::RolesManage>,
) -> Result<Json<NameList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("permission");
    });
    Ok(Json(NameList {
        items: Permission::ALL.iter().map(|x| x.as_str()).collect(),
        next_cursor: None,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct NameList {
    items: Vec<&'static str>,
    next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RoleList {
    items: Vec<RoleView>,
    next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RoleView {
    name: String,
    permissions: Vec<String>,
    builtin: bool,
}

/// The roles and their permissions.
#[utoipa::path(get, path = "/api/v1/roles", tag = "roles", security(("bearer" = ["roles:manage"])),
    responses((status = 200, body = RoleList)))]
pub async fn roles(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::RolesManage>,
) -> Result<Json<RoleList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("role");
    });
    let rows = store::roles(state.db()).await?;
    Ok(Json(RoleList {
        items: rows
            .into_iter()
            .map(|r| RoleView {
                name: r.name,
                permissions: r.permissions,
                builtin: r.builtin,
            })
            .collect(),
        next_cursor: None,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRole {
    #[schema(pattern = "^[a-z0-9_-]{1,32}$")]
    name: String,
    #[schema(schema_with = permission_names)]
    permissions: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolePermissions {
    #[schema(schema_with = permission_names)]
    permissions: Vec<String>,
}

/// The schema of a list of permissions: each one of the permissions the server knows.
fn permission_names() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(SchemaType::new(Type::String))
                .enum_values(Some(Permission::ALL.iter().map(|p| p.as_str()))),
        )
        .build()
}

fn known_permissions(names: &[String]) -> Result<Vec<Permission>, ApiError> {
    super::roles::parse_permissions(names).map_err(|unknown| {
        ApiError::validation(
            unknown
                .iter()
                .map(|u| {
                    FieldError::new(
                        "permissions",
                        format!(
                            "unknown permission `{}`",
                            u.chars().take(64).collect::<String>()
                        ),
                    )
                })
                .collect(),
        )
    })
}

async fn role_view(state: &AppState, name: &str) -> Result<RoleView, ApiError> {
    let r = store::role(state.db(), name)
        .await?
        .ok_or(IdentityError::NotFound)?;
    Ok(RoleView {
        name: r.name,
        permissions: r.permissions,
        builtin: r.builtin,
    })
}

/// Create a role (needs `roles:manage`); unknown permission names are a 422 listing them.
#[utoipa::path(post, path = "/api/v1/roles", tag = "roles", security(("bearer" = ["roles:manage"])),
    request_body = NewRole,
    responses((status = 201, body = RoleView), (status = 409, description = "exists"), (status = 422, description = "validation_error")))]
pub async fn create_role(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::RolesManage>,
    JsonBody(req): JsonBody<NewRole>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("role");
        a.resource_id = Some(req.name.chars().take(64).collect());
    });
    let perms = known_permissions(&req.permissions)?;
    super::roles::create(
        state.db(),
        Grantor::user(&auth),
        &req.name,
        &perms,
        &state.identity().now_timestamp(),
    )
    .await?;
    audit.context("permissions", ContextValue::Int(perms.len() as i64));
    Ok((
        StatusCode::CREATED,
        Json(role_view(&state, &req.name).await?),
    )
        .into_response())
}

/// Replace a role's permissions (needs `roles:manage`). The admin role keeps
/// `users:manage` and `roles:manage`; takes effect on its users' next request.
#[utoipa::path(put, path = "/api/v1/roles/{name}", tag = "roles", security(("bearer" = ["roles:manage"])),
    params(("name" = String, Path)), request_body = RolePermissions,
    responses((status = 200, body = RoleView), (status = 404, description = "not_found"), (status = 409, description = "conflict"),
        (status = 422, description = "validation_error")))]
pub async fn update_role(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::RolesManage>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<RolePermissions>,
) -> Result<Json<RoleView>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("role");
        a.resource_id = Some(name.chars().take(64).collect());
    });
    let perms = known_permissions(&req.permissions)?;
    super::roles::update(state.db(), Grantor::user(&auth), &name, &perms).await?;
    audit.context("permissions", ContextValue::Int(perms.len() as i64));
    Ok(Json(role_view(&state, &name).await?))
}

/// Delete a role (needs `roles:manage`); 409 while users hold it or for a built-in role.
#[utoipa::path(delete, path = "/api/v1/roles/{name}", tag = "roles", security(("bearer" = ["roles:manage"])),
    params(("name" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, description = "not_found"), (status = 409, description = "conflict")))]
pub async fn delete_role(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::RolesManage>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("role");
        a.resource_id = Some(name.chars().take(64).collect());
    });
    super::roles::delete(state.db(), Grantor::user(&auth), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
