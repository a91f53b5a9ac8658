//! HTTP for sign-in, sessions, passwords, TOTP and API tokens:
//! extract → authorise → call the service → audit → respond.

use crate::http::path::Path;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{MaybeJsonBody, MaybeSession};
use super::model::{AttemptReason, MAX_PASSWORD, MAX_USERNAME};
use super::service::{IdentityError, Origin};
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, ContextValue};
use crate::config::Secret;
use crate::http::client_ip::ClientIp;
use crate::http::json::{JsonBody, QueryParams};
use crate::http::{ApiError, ErrorCode, FieldError};

/// The identity layer's errors as problems: the one mapping.
impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Unauthorized => ApiError::new(ErrorCode::Unauthorized),
            IdentityError::SessionExpired(super::service::Expiry::Idle) => {
                ApiError::new(ErrorCode::Unauthorized).with_detail(
                    "The session expired: it was not used for longer than the idle timeout (session.idle_timeout). Sign in again (POST /api/v1/auth/login).",
                )
            }
            IdentityError::SessionExpired(super::service::Expiry::Absolute) => {
                ApiError::new(ErrorCode::Unauthorized).with_detail(
                    "The session expired: it reached its longest lifetime since sign-in (session.absolute_timeout). Sign in again (POST /api/v1/auth/login).",
                )
            }
            IdentityError::InvalidCredentials => ApiError::new(ErrorCode::InvalidCredentials),
            IdentityError::MfaRequired => ApiError::new(ErrorCode::MfaRequired),
            IdentityError::InvalidTotp => ApiError::new(ErrorCode::InvalidTotp),
            IdentityError::InvalidPasskey => ApiError::new(ErrorCode::InvalidPasskey),
            IdentityError::Locked { retry_after } => {
                ApiError::new(ErrorCode::AccountLocked).with_retry_after(retry_after)
            }
            IdentityError::RateLimited { retry_after } => ApiError::new(ErrorCode::RateLimited)
                .with_detail("Too many failed sign-ins from this address; retry after the time in Retry-After.")
                .with_retry_after(retry_after),
            IdentityError::PasswordExpired { set_by_admin: false } => {
                ApiError::new(ErrorCode::PasswordExpired)
            }
            IdentityError::PasswordExpired { set_by_admin: true } => {
                ApiError::new(ErrorCode::PasswordExpired).with_detail(
                    "An administrator set this password, and it must be changed before the first sign-in: change it with POST /api/v1/auth/password (username, current_password, new_password).",
                )
            }
            IdentityError::Policy(v) => ApiError::password_policy(v),
            IdentityError::Invalid(field, message) => ApiError::field(field, message),
            IdentityError::Conflict(detail) => ApiError::new(ErrorCode::Conflict).with_detail(detail),
            IdentityError::NotFound => ApiError::new(ErrorCode::NotFound),
            IdentityError::Forbidden(detail) => ApiError::new(ErrorCode::Forbidden).with_detail(detail),
            IdentityError::ReauthenticationRequired => {
                ApiError::new(ErrorCode::ReauthenticationRequired)
            }
            IdentityError::TooBusy => ApiError::new(ErrorCode::RateLimited)
                .with_detail("Too many passkey sign-ins are in progress; retry in a minute.")
                .with_retry_after(60),
            IdentityError::Busy => ApiError::new(ErrorCode::RateLimited)
                .with_detail("The server is busy checking passwords; retry in a moment.")
                .with_retry_after(1),
            IdentityError::Store(e) => ApiError::from(e),
            IdentityError::Crypto(e) => ApiError::internal(e),
            IdentityError::Internal(m) => ApiError::internal(anyhow::anyhow!(m)),
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(me))
        .routes(routes!(change_password))
        .routes(routes!(totp_enroll))
        .routes(routes!(totp_confirm))
        .routes(routes!(totp_disable))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(rotate_token))
        .routes(routes!(revoke_token))
}

/// Where a sign-in comes from: the client address and (the start of) its user agent.
pub fn origin(ip: ClientIp, headers: &axum::http::HeaderMap) -> Origin {
    Origin {
        ip: Some(ip.0.to_string()),
        user_agent: headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
    }
}

/// Describes a sign-in attempt in the request's audit event: who (the user, or the name
/// typed), `login` / `login_failed` / `account_locked`, and the reason.
pub fn audit_attempt(audit: &Audit, ok: bool, facts: &super::service::AttemptFacts) {
    audit.set_actor(match &facts.user_id {
        Some(id) => Actor::user(id, &facts.username),
        None => Actor {
            id: None,
            name: facts.username.clone(),
        },
    });
    let action = if ok {
        Action::Login
    } else if facts.reason == AttemptReason::Locked || facts.locked_now {
        Action::AccountLocked
    } else {
        Action::LoginFailed
    };
    audit.annotate(|a| {
        a.action = Some(action);
        a.resource_type = Some("session");
        a.context
            .insert("reason", ContextValue::Code(facts.reason.as_str()));
    });
}

/// Describes a failed re-authentication (a wrong current password or code on a
/// credential change) in the request's audit event, as a failed sign-in: the security
/// rules count it with the others.
pub fn audit_reauth<T>(
    audit: &Audit,
    result: &Result<T, IdentityError>,
    facts: &super::service::AttemptFacts,
) {
    if matches!(
        result,
        Err(IdentityError::InvalidCredentials
            | IdentityError::InvalidTotp
            | IdentityError::Locked { .. }
            | IdentityError::RateLimited { .. })
    ) {
        audit_attempt(audit, false, facts);
    }
}

/// Refuses over-long input before any hashing work.
fn check_lengths(
    username: Option<&str>,
    passwords: &[(&'static str, &str)],
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Some(u) = username
        && u.chars().count() > MAX_USERNAME
    {
        errors.push(FieldError::new("username", "must be at most 64 characters"));
    }
    for (field, p) in passwords {
        if p.chars().count() > MAX_PASSWORD {
            errors.push(FieldError::new(*field, "must be at most 1024 characters"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(errors))
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    #[schema(value_type = String, format = Password)]
    password: String,
    /// The current TOTP code, or a recovery code, when TOTP is on.
    #[serde(default)]
    totp_code: Option<String>,
    /// Instead of a code: the answer to the passkey challenge of an `mfa_required`
    /// answer (`{"ceremony", "credential"}`).
    #[serde(default)]
    passkey: Option<PasskeyAnswer>,
}

/// A passkey answer sent as the second factor.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasskeyAnswer {
    /// The `ceremony` of the challenge.
    pub ceremony: String,
    /// The `PublicKeyCredential` from `navigator.credentials.get()` (base64url fields).
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct UserSummary {
    pub id: String,
    pub username: String,
    pub email: Option<String>,
    pub role: String,
    pub permissions: Vec<String>,
    pub mfa_enabled: bool,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// A session token (`cst_…`), shown once.
    access_token: String,
    token_type: &'static str,
    /// Seconds of inactivity after which the session ends.
    expires_in: u64,
    user: UserSummary,
    password_expires_at: Option<String>,
}

impl LoginResponse {
    pub fn of(ok: super::service::NewLogin) -> Self {
        LoginResponse {
            access_token: ok.token.expose().to_owned(),
            token_type: "Bearer",
            expires_in: ok.expires_in,
            user: UserSummary {
                id: ok.user.id,
                username: ok.user.username,
                email: ok.user.email,
                role: ok.user.role,
                permissions: ok.permissions,
                mfa_enabled: ok.user.totp_enabled,
            },
            password_expires_at: ok.password_expires_at,
        }
    }
}

/// The `mfa_required` answer for `user_id`: which second factors the account has, and a
/// passkey challenge when it has a passkey (the password was right).
pub async fn second_factor_offer(state: &AppState, user_id: Option<&str>) -> ApiError {
    let e = ApiError::new(ErrorCode::MfaRequired);
    let Some(id) = user_id else { return e };
    let identity = state.identity();
    let user = match identity.user(id).await {
        Ok(u) => u,
        Err(err) => return err.into(),
    };
    let challenge = match identity.passkey_second_factor_start(id).await {
        Ok(c) => c,
        Err(err) => return err.into(),
    };
    let mut methods = Vec::new();
    if user.totp_enabled {
        methods.push("totp");
    }
    methods.push("recovery_code");
    if challenge.is_some() {
        methods.push("passkey");
    }
    e.with_second_factors(methods, challenge.map(|c| c.to_json()))
}
/// Sign in with a username and password, and a second factor when the account has one:
/// a TOTP or recovery code (`totp_code`), or the answer to the passkey challenge that
/// the `mfa_required` answer carries (`passkey`).
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = LoginResponse),
        (status = 401, description = "invalid_credentials, mfa_required (with `methods` and, for an account with a passkey, a `passkey` challenge), invalid_totp or invalid_passkey", body = crate::http::error::Problem),
        (status = 403, description = "password_expired", body = crate::http::error::Problem),
        (status = 422, description = "validation_error", body = crate::http::error::Problem),
        (status = 423, description = "account_locked (Retry-After)", body = crate::http::error::Problem),
        (status = 429, description = "rate_limited (Retry-After)", body = crate::http::error::Problem)))]
pub async fn login(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    check_lengths(Some(&req.username), &[("password", &req.password)])?;
    if let Some(pk) = &req.passkey {
        super::passkey_routes::check_answer(&pk.credential)?;
    }
    let origin = origin(ip, &headers);
    let password = Secret::new(req.password);
    let identity = state.identity();
    let (result, facts) = identity
        .login_with(
            &req.username,
            &password,
            super::service::SecondFactorAnswer {
                code: req.totp_code.as_deref(),
                passkey: req
                    .passkey
                    .as_ref()
                    .map(|p| (p.ceremony.as_str(), &p.credential)),
            },
            &origin,
        )
        .await;
    identity.record_attempt(&facts, &origin).await?;
    audit_attempt(&audit, result.is_ok(), &facts);
    let ok = match result {
        Ok(ok) => ok,
        Err(IdentityError::MfaRequired) => {
            return Err(second_factor_offer(&state, facts.user_id.as_deref()).await);
        }
        Err(e) => return Err(e.into()),
    };
    audit.context("method", ContextValue::Code(method_code(&ok.method)));
    if ok.used_recovery_code {
        audit.context("recovery_code", ContextValue::Bool(true));
    }
    Ok(Json(LoginResponse::of(ok)))
}

/// A sign-in method as an audit code.
pub fn method_code(method: &str) -> &'static str {
    match method {
        "password+totp" => "password+totp",
        "password+recovery_code" => "password+recovery_code",
        "password+passkey" => "password+passkey",
        "passkey" => "passkey",
        _ => "password",
    }
}

/// End this session.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "Signed out"), (status = 401, description = "unauthorized")))]
pub async fn logout(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::SignedIn>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Logout);
        a.resource_type = Some("session");
    });
    match p.session_id() {
        Some(id) => state.identity().logout(id).await?,
        None => {
            return Err(ApiError::new(ErrorCode::BadRequest)
                .with_detail("This is an API token; revoke it with DELETE /api/v1/tokens/{id}."));
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogoutAllQuery {
    /// Also revoke every personal API token of the caller (default false).
    #[serde(default)]
    include_api_tokens: Option<bool>,
}

/// End every session of the caller, and the apps they signed in to; with
/// `include_api_tokens=true`, their personal API tokens too. Needs a session: an API
/// token gets 403 `session_required`.
#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth", security(("bearer" = [])),
    params(LogoutAllQuery),
    responses((status = 204, description = "Every session ended"), (status = 401, description = "unauthorized"),
        (status = 403, description = "session_required", body = crate::http::error::Problem)))]
pub async fn logout_all(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::OwnCredentials>,
    QueryParams(q): QueryParams<LogoutAllQuery>,
) -> Result<StatusCode, ApiError> {
    let tokens = q.include_api_tokens.unwrap_or(false);
    audit.annotate(|a| {
        a.action = Some(Action::Logout);
        a.resource_type = Some("session");
        a.context.insert("all", ContextValue::Bool(true));
        a.context.insert("api_tokens", ContextValue::Bool(tokens));
    });
    state.identity().revoke_all(&p.user_id, tokens).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct Me {
    id: String,
    username: String,
    email: Option<String>,
    role: String,
    permissions: Vec<String>,
    mfa_enabled: bool,
    /// True while `mfa.required` holds and TOTP is not confirmed yet.
    mfa_enrollment_required: bool,
    password_expires_at: Option<String>,
    /// A patient account's own patient record (absent for staff accounts).
    #[serde(skip_serializing_if = "Option::is_none")]
    patient_id: Option<String>,
}

/// Who am I.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The caller", body = Me), (status = 401, description = "unauthorized")))]
pub async fn me(audit: Audit, p: Authorized<need::SignedIn>) -> Result<Json<Me>, ApiError> {
    let p = p.0;
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("user");
        a.resource_id = Some(p.user_id.clone());
    });
    Ok(Json(Me {
        permissions: if p.mfa_enrollment_pending {
            Vec::new()
        } else {
            p.permissions
                .iter()
                .map(|x| x.as_str().to_owned())
                .collect()
        },
        mfa_enrollment_required: p.mfa_enrollment_pending,
        id: p.user_id,
        username: p.username,
        email: p.email,
        role: p.role,
        mfa_enabled: p.mfa_enabled,
        password_expires_at: p.password_expires_at,
        patient_id: p.patient,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    #[schema(value_type = String, format = Password)]
    current_password: String,
    #[schema(value_type = String, format = Password)]
    new_password: String,
    /// Without a bearer token (an expired password): whose password.
    #[serde(default)]
    username: Option<String>,
    /// The current TOTP code (or a recovery code): required when TOTP is on.
    #[serde(default)]
    totp_code: Option<String>,
    /// Also revoke every personal API token of the account (default false; the
    /// caller's other sessions end in any case).
    #[serde(default)]
    revoke_api_tokens: bool,
}

/// Change a password. With a bearer token (a session; an API token gets 403
/// `session_required`): the caller's, after the current password and, when TOTP is on,
/// `totp_code`; failures count like sign-in failures (lock, throttles). The caller's
/// other sessions end; their API tokens too with `revoke_api_tokens`. Without a token
/// (an expired password): `username` + `current_password` (+ `totp_code`), counted like
/// sign-in.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", request_body = PasswordChange,
    security((), ("bearer" = [])),
    responses((status = 204, description = "Changed"),
        (status = 401, description = "invalid_credentials, mfa_required or invalid_totp", body = crate::http::error::Problem),
        (status = 403, description = "session_required", body = crate::http::error::Problem),
        (status = 422, description = "password_policy with violations", body = crate::http::error::Problem),
        (status = 423, description = "account_locked (Retry-After)", body = crate::http::error::Problem),
        (status = 429, description = "rate_limited (Retry-After)", body = crate::http::error::Problem)))]
pub async fn change_password(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    MaybeSession(p): MaybeSession,
    JsonBody(req): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    check_lengths(
        req.username.as_deref(),
        &[
            ("current_password", &req.current_password),
            ("new_password", &req.new_password),
        ],
    )?;
    let identity = state.identity();
    let current = Secret::new(req.current_password);
    let new = Secret::new(req.new_password);
    let origin = origin(ip, &headers);
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.context.insert("change", ContextValue::Code("password"));
    });
    match p {
        Some(p) => {
            let user = identity.user(&p.user_id).await?;
            audit.annotate(|a| a.resource_id = Some(user.id.clone()));
            let (result, facts) = identity
                .change_password(
                    &user,
                    &super::service::PasswordChange {
                        current: &current,
                        code: req.totp_code.as_deref(),
                        new: &new,
                        keep_session: p.session_id(),
                        revoke_tokens: req.revoke_api_tokens,
                    },
                    &origin,
                )
                .await;
            audit_reauth(&audit, &result, &facts);
            result?;
        }
        None => {
            let Some(username) = req.username else {
                return Err(ApiError::new(ErrorCode::Unauthorized));
            };
            // Same checks as sign-in: throttles, lockout, dummy hash, failure counting.
            let (result, facts) = identity
                .login(&username, &current, req.totp_code.as_deref(), &origin)
                .await;
            identity.record_attempt(&facts, &origin).await?;
            let user = match result {
                Ok(_) | Err(IdentityError::PasswordExpired { .. }) => identity
                    .user_by_username(&username)
                    .await?
                    .ok_or(IdentityError::InvalidCredentials)?,
                Err(IdentityError::MfaRequired) => {
                    return Err(ApiError::new(ErrorCode::MfaRequired)
                        .with_detail("TOTP is on for this account: send the code as totp_code."));
                }
                Err(e) => {
                    audit_attempt(&audit, false, &facts);
                    return Err(e.into());
                }
            };
            audit.set_actor(Actor::user(&user.id, &user.username));
            audit.annotate(|a| a.resource_id = Some(user.id.clone()));
            // Sign-in made a session the caller never sees: end it with the others.
            identity.set_password(&user, &new, None).await?;
            if req.revoke_api_tokens {
                identity.revoke_tokens(&user.id).await?;
            }
        }
    }
    audit.context(
        "api_tokens_revoked",
        ContextValue::Bool(req.revoke_api_tokens),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct EnrollResponse {
    /// Base32 secret for manual entry.
    secret: String,
    otpauth_uri: String,
    /// The otpauth URI as an SVG QR code.
    qr_svg: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The current password: required unless the session signed in with it within
    /// `session.reauth_window` (5 minutes by default).
    #[schema(value_type = String, format = Password)]
    password: String,
}

/// Checks that the caller of a second-factor change is who the session says: the
/// current password when given (counted like sign-in), else a session signed in with
/// the password within `session.reauth_window`.
pub async fn confirm_presence(
    state: &AppState,
    audit: &Audit,
    p: &crate::access::Principal,
    user: &super::model::User,
    password: Option<Secret>,
    origin: &Origin,
) -> Result<(), ApiError> {
    let identity = state.identity();
    match password {
        Some(password) => {
            check_lengths(None, &[("password", password.expose())])?;
            // TOTP is off while enrolling: the password is the factor asked for.
            let (result, facts) = identity.reauthenticate(user, &password, None, origin).await;
            audit_reauth(audit, &result, &facts);
            Ok(result?)
        }
        None => {
            let fresh = match p.session_id() {
                Some(id) => identity.session_is_fresh(id).await?,
                None => false,
            };
            if fresh {
                Ok(())
            } else {
                Err(IdentityError::ReauthenticationRequired.into())
            }
        }
    }
}

/// [`confirm_presence`] of the caller: reads their account, checks the password when
/// sent (else a fresh sign-in), and returns the account.
pub async fn caller_present(
    state: &AppState,
    audit: &Audit,
    p: &crate::access::Principal,
    password: Option<Secret>,
    origin: &Origin,
) -> Result<super::model::User, ApiError> {
    let user = state.identity().user(&p.user_id).await?;
    confirm_presence(state, audit, p, &user, password, origin).await?;
    Ok(user)
}

/// Start TOTP enrolment (RFC 6238: SHA-1, 6 digits, 30 s). Shown only to the caller.
/// Needs a session (an API token gets 403 `session_required`) and the current
/// `password`, which may be left out within `session.reauth_window` of signing in
/// (else 403 `reauthentication_required`). A wrong password counts like a failed sign-in.
#[utoipa::path(post, path = "/api/v1/auth/totp/enroll", tag = "auth", security(("bearer" = [])),
    request_body(content = Option<EnrollRequest>, description = "Optional within the re-authentication window"),
    responses((status = 200, description = "Scan the QR code, then confirm", body = EnrollResponse),
        (status = 401, description = "invalid_credentials", body = crate::http::error::Problem),
        (status = 403, description = "session_required or reauthentication_required", body = crate::http::error::Problem),
        (status = 409, description = "TOTP already on", body = crate::http::error::Problem),
        (status = 423, description = "account_locked", body = crate::http::error::Problem)))]
pub async fn totp_enroll(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    p: Authorized<need::OwnCredentials>,
    MaybeJsonBody(req): MaybeJsonBody<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(p.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("totp_enroll"));
    });
    let user = state.identity().user(&p.user_id).await?;
    if user.totp_enabled {
        return Err(IdentityError::Conflict("TOTP is already on; turn it off first").into());
    }
    confirm_presence(
        &state,
        &audit,
        &p,
        &user,
        req.map(|r| Secret::new(r.password)),
        &origin(ip, &headers),
    )
    .await?;
    let e = state.identity().totp_enroll(&user).await?;
    Ok(Json(EnrollResponse {
        secret: e.secret.expose().to_owned(),
        otpauth_uri: e.otpauth_uri.expose().to_owned(),
        qr_svg: e.qr_svg,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    code: String,
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryCodes {
    /// Ten single-use codes, shown once.
    recovery_codes: Vec<String>,
}

/// Confirm TOTP enrolment with a code; TOTP is then on.
#[utoipa::path(post, path = "/api/v1/auth/totp/confirm", tag = "auth", security(("bearer" = [])),
    request_body = CodeRequest,
    responses((status = 200, description = "TOTP is on", body = RecoveryCodes),
        (status = 401, description = "invalid_totp"),
        (status = 409, description = "conflict: no enrolment started (POST /api/v1/auth/totp/enroll first)")))]
pub async fn totp_confirm(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::OwnCredentials>,
    JsonBody(req): JsonBody<CodeRequest>,
) -> Result<Json<RecoveryCodes>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(p.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("totp_confirm"));
    });
    let user = state.identity().user(&p.user_id).await?;
    let codes = state.identity().totp_confirm(&user, &req.code).await?;
    Ok(Json(RecoveryCodes {
        recovery_codes: codes,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableTotp {
    #[schema(value_type = String, format = Password)]
    password: String,
    code: String,
}

/// Turn TOTP off (refused with 409 when `mfa.required`): needs a session, the password
/// and a current code; failures count like failed sign-ins.
#[utoipa::path(delete, path = "/api/v1/auth/totp", tag = "auth", security(("bearer" = [])),
    request_body = DisableTotp,
    responses((status = 204, description = "TOTP is off"),
        (status = 401, description = "invalid_credentials, mfa_required or invalid_totp", body = crate::http::error::Problem),
        (status = 403, description = "session_required", body = crate::http::error::Problem),
        (status = 409, description = "conflict", body = crate::http::error::Problem),
        (status = 423, description = "account_locked", body = crate::http::error::Problem)))]
pub async fn totp_disable(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    p: Authorized<need::OwnCredentials>,
    JsonBody(req): JsonBody<DisableTotp>,
) -> Result<StatusCode, ApiError> {
    check_lengths(None, &[("password", &req.password)])?;
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(p.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("totp_disable"));
    });
    let user = state.identity().user(&p.user_id).await?;
    let (result, facts) = state
        .identity()
        .totp_disable(
            &user,
            &Secret::new(req.password),
            &req.code,
            &origin(ip, &headers),
        )
        .await;
    if let Some(facts) = &facts {
        audit_reauth(&audit, &result, facts);
    }
    result?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct TokenView {
    id: String,
    name: String,
    created_at: String,
    expires_at: String,
    last_used_at: Option<String>,
    /// The token ends within 24 hours.
    expires_soon: bool,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    items: Vec<TokenView>,
    next_cursor: Option<String>,
}

/// The caller's API tokens (never their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, description = "Tokens", body = TokenList)))]
pub async fn list_tokens(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::Enrolled>,
) -> Result<Json<TokenList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("api_token");
    });
    let identity = state.identity();
    let items = identity
        .tokens(&p.user_id)
        .await?
        .into_iter()
        .map(|t| TokenView {
            expires_soon: identity.expires_soon(&t.expires_at),
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
        })
        .collect();
    Ok(Json(TokenList {
        items,
        next_cursor: None,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    #[schema(min_length = 1, max_length = 100)]
    name: String,
    /// Lifetime in seconds, capped by `api_tokens.max_lifetime`.
    #[serde(default)]
    #[schema(minimum = 1)]
    expires_in: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    id: String,
    name: String,
    /// The secret (`cat_…`), shown once.
    token: String,
    expires_at: String,
}

fn created(row: super::store::TokenRow, token: &Secret) -> Response {
    (
        StatusCode::CREATED,
        Json(CreatedToken {
            id: row.id,
            name: row.name,
            token: token.expose().to_owned(),
            expires_at: row.expires_at,
        }),
    )
        .into_response()
}

/// Create an API token. Needs a session: an API token never mints a credential (it
/// gets 403 `session_required`).
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])), request_body = NewToken,
    responses((status = 201, description = "Created; the secret is shown once", body = CreatedToken),
        (status = 403, description = "session_required", body = crate::http::error::Problem)))]
pub async fn create_token(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::OwnCredentialsEnrolled>,
    JsonBody(req): JsonBody<NewToken>,
) -> Result<Response, ApiError> {
    let (row, token) = state
        .identity()
        .create_token(&p.user_id, &req.name, req.expires_in)
        .await?;
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("api_token");
        a.resource_id = Some(row.id.clone());
    });
    Ok(created(row, &token))
}

/// Replace a token's secret (same name and expiry); the old secret stops working at
/// once. An API token may rotate only itself (403 `session_required` for another).
#[utoipa::path(post, path = "/api/v1/tokens/{id}/rotate", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 201, description = "The new token; the secret is shown once", body = CreatedToken),
        (status = 403, description = "session_required", body = crate::http::error::Problem),
        (status = 404, description = "No such live token")))]
pub async fn rotate_token(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::Enrolled>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("api_token");
        a.resource_id = Some(id.clone());
        a.context.insert("change", ContextValue::Code("rotate"));
    });
    // A token rotating itself keeps its expiry; rotating another of the user's tokens
    // (which may live longer) is a session's to do.
    if let crate::access::Credential::ApiToken(own) = &p.credential
        && *own != id
    {
        return Err(ApiError::new(ErrorCode::SessionRequired)
            .with_detail("An API token may rotate only itself; sign in to rotate another."));
    }
    let (row, token) = state.identity().rotate_token(&p.user_id, &id).await?;
    audit.context("new_token", ContextValue::id(&row.id));
    Ok(created(row, &token))
}

/// Revoke a token.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such live token")))]
pub async fn revoke_token(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::Enrolled>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("api_token");
        a.resource_id = Some(id.clone());
    });
    state.identity().revoke_token(&p.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
