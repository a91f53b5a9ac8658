//! HTTP for the account lifecycle: invitations (`users:manage`), accepting one, email
//! verification, password reset, self-registration.

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AccountsError, Invitation};
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, ContextValue};
use crate::config::Secret;
use crate::http::json::JsonBody;
use crate::http::{ApiError, ErrorCode};
use crate::identity::model::MAX_PASSWORD;

impl From<AccountsError> for ApiError {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::InvalidLink => ApiError::new(ErrorCode::BadRequest)
                .with_detail("The link is unknown, expired or already used: ask for a new one."),
            AccountsError::Disabled => ApiError::new(ErrorCode::NotFound),
            AccountsError::MailUnavailable => ApiError::new(ErrorCode::ServiceUnavailable)
                .with_detail("No mail can be sent: mail.smtp_host is not configured."),
            AccountsError::Refused(why) => {
                ApiError::new(ErrorCode::ServiceUnavailable).with_detail(why)
            }
            AccountsError::Identity(i) => i.into(),
            AccountsError::Store(s) => s.into(),
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_invitations, create_invitation))
        .routes(routes!(revoke_invitation))
        .routes(routes!(resend_invitation))
        .routes(routes!(accept_invitation))
        .routes(routes!(request_reset))
        .routes(routes!(confirm_reset))
        .routes(routes!(request_verification))
        .routes(routes!(verify_email))
        .routes(routes!(register))
}

fn password(p: String, field: &'static str) -> Result<Secret, ApiError> {
    if p.chars().count() > MAX_PASSWORD {
        return Err(ApiError::field(field, "must be at most 1024 characters"));
    }
    Ok(Secret::new(p))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvitation {
    pub email: String,
    pub role: String,
}

#[derive(Serialize, ToSchema)]
pub struct InvitationPage {
    pub items: Vec<Invitation>,
    /// Always null: every pending invitation is listed (at most 500).
    pub next_cursor: Option<String>,
}

/// Invites someone by email to an account with a role (needs `users:manage`). The
/// invitee gets a single-use link, valid `accounts.invite_ttl`.
#[utoipa::path(post, path = "/api/v1/invitations", tag = "accounts", security(("bearer" = ["users:manage"])),
    request_body = NewInvitation,
    responses((status = 201, description = "Invited", body = Invitation),
        (status = 422, description = "validation_error"),
        (status = 503, description = "no mail can be sent")))]
pub async fn create_invitation(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    JsonBody(req): JsonBody<NewInvitation>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("invitation");
    });
    let inv = state
        .accounts()
        .invite(&req.email, &req.role, &auth.0)
        .await?;
    audit.annotate(|a| a.resource_id = Some(inv.id.clone()));
    Ok((StatusCode::CREATED, Json(inv)).into_response())
}

/// Pending invitations (needs `users:manage`).
#[utoipa::path(get, path = "/api/v1/invitations", tag = "accounts", security(("bearer" = ["users:manage"])),
    responses((status = 200, description = "Pending invitations, newest first", body = InvitationPage)))]
pub async fn list_invitations(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
) -> Result<Json<InvitationPage>, ApiError> {
    let items = state.accounts().invitations().await?;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("invitation");
        a.context
            .insert("count", ContextValue::Int(items.len() as i64));
    });
    Ok(Json(InvitationPage {
        items,
        next_cursor: None,
    }))
}

/// Revokes a pending invitation: its link stops working (needs `users:manage`).
#[utoipa::path(delete, path = "/api/v1/invitations/{id}", tag = "accounts", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, description = "not_found")))]
pub async fn revoke_invitation(
    State(state): State<AppState>,
    audit: Audit,
    _auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("invitation");
        a.resource_id = Some(id.clone());
    });
    state.accounts().revoke_invitation(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a pending invitation again, with a new link (the old one stops working).
#[utoipa::path(post, path = "/api/v1/invitations/{id}/resend", tag = "accounts", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 200, description = "Sent again (a new id)", body = Invitation), (status = 404, description = "not_found")))]
pub async fn resend_invitation(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<Invitation>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("invitation");
        a.resource_id = Some(id.clone());
    });
    Ok(Json(
        state.accounts().resend_invitation(&id, &auth.0).await?,
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitation {
    pub token: String,
    pub username: String,
    pub password: String,
    /// A patient invitation: the patient's birth date (YYYY-MM-DD) as on their record;
    /// a wrong one ends the link.
    #[serde(default)]
    pub birth_date: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct NewAccount {
    pub id: String,
    pub username: String,
    pub role: String,
    /// The account must enrol TOTP at its first sign-in.
    pub mfa_required: bool,
}

/// Accepts an invitation: sets the username and password (the policy applies). The
/// account's email counts as verified. With `mfa.required`, TOTP is enrolled at the first
/// sign-in, before anything else.
#[utoipa::path(post, path = "/api/v1/invitations/accept", tag = "accounts", request_body = AcceptInvitation,
    responses((status = 201, description = "The account", body = NewAccount),
        (status = 400, description = "the link is unknown, expired or used"),
        (status = 409, description = "the username is taken"),
        (status = 422, description = "validation_error or password_policy")))]
pub async fn accept_invitation(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<AcceptInvitation>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("user");
        a.context.insert("via", ContextValue::Code("invitation"));
    });
    let pw = password(req.password, "password")?;
    crate::portal::check_patient_invitation(&state, &req.token, req.birth_date.as_deref()).await?;
    let user = state
        .accounts()
        .accept_invitation(&req.token, &req.username, &pw)
        .await?;
    audit.set_actor(Actor::user(&user.id, &user.username));
    audit.annotate(|a| a.resource_id = Some(user.id.clone()));
    Ok((
        StatusCode::CREATED,
        Json(NewAccount {
            id: user.id,
            username: user.username,
            role: user.role,
            mfa_required: state.identity().settings().mfa_required,
        }),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub username_or_email: String,
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub status: &'static str,
    pub detail: &'static str,
}

const RESET_ACCEPTED: Accepted = Accepted {
    status: "accepted",
    detail: "If an account matches and its email address is verified, a link to reset its password was sent there.",
};

/// Asks for a password-reset link. Always 202 with the same body, whether or not an
/// account matches (no account enumeration); the link goes only to a verified address.
#[utoipa::path(post, path = "/api/v1/auth/password-reset", tag = "auth", request_body = ResetRequest,
    responses((status = 202, description = "Accepted (always)", body = Accepted),
        (status = 429, description = "rate_limited")))]
pub async fn request_reset(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("password_reset");
    });
    if req.username_or_email.chars().count() > 254 {
        return Err(ApiError::field(
            "username_or_email",
            "must be at most 254 characters",
        ));
    }
    state.accounts().request_reset(&req.username_or_email);
    Ok((StatusCode::ACCEPTED, Json(RESET_ACCEPTED)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    pub token: String,
    pub new_password: String,
    /// Needed when the account has TOTP: a current code or a recovery code.
    pub totp_code: Option<String>,
    /// Also revoke every personal API token of the account (default false: a reset
    /// ends sessions only).
    #[serde(default)]
    pub revoke_api_tokens: bool,
}

/// Sets a new password with a reset link (policy and history apply; TOTP or a recovery
/// code when the account has TOTP). Every session of the account ends and a lock is
/// lifted; the user is told by mail.
#[utoipa::path(post, path = "/api/v1/auth/password-reset/confirm", tag = "auth", request_body = ResetConfirm,
    responses((status = 204, description = "The password is set"),
        (status = 400, description = "the link is unknown, expired or used"),
        (status = 401, description = "mfa_required or invalid_totp"),
        (status = 422, description = "password_policy")))]
pub async fn confirm_reset(
    State(state): State<AppState>,
    audit: Audit,
    ip: crate::http::client_ip::ClientIp,
    headers: axum::http::HeaderMap,
    JsonBody(req): JsonBody<ResetConfirm>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.context
            .insert("change", ContextValue::Code("password_reset"));
    });
    let pw = password(req.new_password, "new_password")?;
    let user = state
        .accounts()
        .confirm_reset(
            &req.token,
            &pw,
            req.totp_code.as_deref(),
            req.revoke_api_tokens,
            &crate::identity::routes::origin(ip, &headers),
        )
        .await?;
    audit.set_actor(Actor::user(&user.id, &user.username));
    audit.annotate(|a| a.resource_id = Some(user.id.clone()));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct VerificationSent {
    /// False when the address is already verified or there is none.
    pub sent: bool,
}

/// Sends a verification link to the caller's email address, unless it is verified.
#[utoipa::path(post, path = "/api/v1/auth/email/verification", tag = "auth", security(("bearer" = [])),
    responses((status = 202, description = "Queued (or nothing to do)", body = VerificationSent),
        (status = 503, description = "no mail can be sent")))]
pub async fn request_verification(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::SignedIn>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("email_verification");
        a.resource_id = Some(auth.0.user_id.clone());
    });
    let user = state.identity().user(&auth.0.user_id).await?;
    let sent = state.accounts().send_verification(&user).await?;
    Ok((StatusCode::ACCEPTED, Json(VerificationSent { sent })).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmail {
    pub token: String,
}

/// Verifies an email address with the link sent to it (and activates a self-registered
/// account).
#[utoipa::path(post, path = "/api/v1/auth/email/verify", tag = "auth", request_body = VerifyEmail,
    responses((status = 204, description = "Verified"),
        (status = 400, description = "the link is unknown, expired, used, or for an address the account no longer has")))]
pub async fn verify_email(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<VerifyEmail>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("email_verification");
    });
    let user = state.accounts().verify_email(&req.token).await?;
    audit.set_actor(Actor::user(&user.id, &user.username));
    audit.annotate(|a| a.resource_id = Some(user.id.clone()));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub username: String,
    pub email: String,
    pub password: String,
}

const REGISTERED: Accepted = Accepted {
    status: "accepted",
    detail: "Confirm your email address with the link sent to it; an administrator then gives the account its role.",
};

/// Self-registration, when `accounts.self_registration` is on (404 otherwise): an
/// inactive account with the registration role (no PHI permission), activated by the
/// email verification; an administrator then gives it a real role.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = Registration,
    responses((status = 202, description = "Accepted", body = Accepted),
        (status = 404, description = "self-registration is off"),
        (status = 409, description = "the username is taken"),
        (status = 422, description = "validation_error or password_policy")))]
pub async fn register(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<Registration>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("user");
        a.context.insert("via", ContextValue::Code("registration"));
    });
    let pw = password(req.password, "password")?;
    state
        .accounts()
        .register(&req.username, &req.email, &pw)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(REGISTERED)).into_response())
}
