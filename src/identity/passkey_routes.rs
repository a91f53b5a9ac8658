//! HTTP for passkeys: the caller's own (list, add, remove), sign-in with a passkey
//! alone, and an administrator's view of a user's. The second factor after a password
//! is part of `POST /api/v1/auth/login` (`routes.rs`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::MaybeJsonBody;
use super::passkeys::{MAX_ANSWER_BYTES, PasskeyView};
use super::routes::{LoginResponse, audit_attempt, caller_present, origin};
use crate::access::{Authorized, need};
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::config::Secret;
use crate::http::client_ip::ClientIp;
use crate::http::json::JsonBody;
use crate::http::path::Path;
use crate::http::{ApiError, ErrorCode};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_passkeys, add_passkey))
        .routes(routes!(register_start))
        .routes(routes!(remove_passkey))
        .routes(routes!(sign_in_challenge))
        .routes(routes!(sign_in))
        .routes(routes!(user_passkeys))
}

/// A WebAuthn challenge: send `ceremony` back with the answer; pass `publicKey` to
/// `navigator.credentials.create()` / `.get()` (binary fields are base64url).
#[derive(Serialize, ToSchema)]
pub struct ChallengeView {
    ceremony: String,
    #[serde(rename = "publicKey")]
    #[schema(value_type = Object)]
    public_key: serde_json::Value,
}

impl From<super::passkeys::Challenge> for ChallengeView {
    fn from(c: super::passkeys::Challenge) -> Self {
        Self {
            ceremony: c.ceremony,
            public_key: c.public_key,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct PasskeyList {
    items: Vec<PasskeyView>,
    next_cursor: Option<String>,
}

/// Refuses an answer larger than any real authenticator sends, before parsing it.
pub fn check_answer(answer: &serde_json::Value) -> Result<(), ApiError> {
    let size = serde_json::to_vec(answer).map_or(usize::MAX, |v| v.len());
    if size > MAX_ANSWER_BYTES || !answer.is_object() {
        return Err(ApiError::field(
            "credential",
            "must be the PublicKeyCredential as JSON (at most 16 KiB)",
        ));
    }
    Ok(())
}

/// Mails the owner that a passkey was added or removed (at a verified address), and
/// says in the audit event whether it did. The change is made already: a mail that
/// cannot be queued is logged, not a failure (the answer carries recovery codes that
/// are shown only once).
pub async fn notify(
    state: &AppState,
    audit: &Audit,
    user: &super::model::User,
    added: bool,
    name: &str,
) {
    let notified = match state
        .accounts()
        .notify_passkey_change(user, added, name)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(user = %user.id, error = %e, "the passkey notice could not be queued");
            false
        }
    };
    audit.context("notified", ContextValue::Bool(notified));
}

/// The caller's passkeys (never a key: names and dates).
#[utoipa::path(get, path = "/api/v1/auth/passkeys", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The caller's passkeys", body = PasskeyList),
        (status = 401, description = "unauthorized")))]
pub async fn list_passkeys(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::SignedIn>,
) -> Result<Json<PasskeyList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("passkey");
    });
    Ok(Json(PasskeyList {
        items: state.identity().passkeys(&p.user_id).await?,
        next_cursor: None,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresenceRequest {
    /// The current password: required unless the session signed in within
    /// `session.reauth_window` (5 minutes by default).
    #[schema(value_type = String, format = Password)]
    password: String,
}

/// Start adding a passkey: the challenge for `navigator.credentials.create()`. Needs a
/// session (an API token gets 403 `session_required`) and a fresh sign-in: the current
/// `password`, which may be left out within `session.reauth_window` of signing in
/// (else 403 `reauthentication_required`). A wrong password counts like a failed
/// sign-in. The passkey asked for is discoverable with user verification, so it can
/// also sign in alone.
#[utoipa::path(post, path = "/api/v1/auth/passkeys/register", tag = "auth", security(("bearer" = [])),
    request_body(content = Option<PresenceRequest>, description = "Optional within the re-authentication window"),
    responses((status = 200, description = "Answer with navigator.credentials.create(), then POST /api/v1/auth/passkeys", body = ChallengeView),
        (status = 401, description = "invalid_credentials", body = crate::http::error::Problem),
        (status = 403, description = "session_required or reauthentication_required", body = crate::http::error::Problem),
        (status = 409, description = "conflict: the most passkeys allowed (10)", body = crate::http::error::Problem),
        (status = 423, description = "account_locked", body = crate::http::error::Problem)))]
pub async fn register_start(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    p: Authorized<need::OwnCredentials>,
    MaybeJsonBody(req): MaybeJsonBody<PresenceRequest>,
) -> Result<Json<ChallengeView>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(p.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("passkey_register_start"));
    });
    let Some(session) = p.session_id() else {
        return Err(ApiError::new(ErrorCode::SessionRequired));
    };
    let user = caller_present(
        &state,
        &audit,
        &p,
        req.map(|r| Secret::new(r.password)),
        &origin(ip, &headers),
    )
    .await?;
    let c = state
        .identity()
        .passkey_register_start(&user, session)
        .await?;
    Ok(Json(c.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPasskey {
    /// From `POST /api/v1/auth/passkeys/register`.
    ceremony: String,
    /// A name for it ("Laptop", "YubiKey"), 1 to 64 characters.
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    /// The `PublicKeyCredential` from `navigator.credentials.create()`, binary fields
    /// in base64url.
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct AddedPasskey {
    passkey: PasskeyView,
    /// Ten single-use codes, shown once, when the account had none (no TOTP): the way
    /// back if the passkey is lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_codes: Option<Vec<String>>,
}

/// Finish adding a passkey: the answer to the challenge this session started (single
/// use, valid for `passkeys.challenge_ttl`). A wrong or replayed answer is 401
/// `invalid_passkey`; a passkey already registered (to anyone) 409.
#[utoipa::path(post, path = "/api/v1/auth/passkeys", tag = "auth", security(("bearer" = [])),
    request_body = NewPasskey,
    responses((status = 201, description = "Added", body = AddedPasskey),
        (status = 401, description = "invalid_passkey", body = crate::http::error::Problem),
        (status = 403, description = "session_required", body = crate::http::error::Problem),
        (status = 409, description = "conflict", body = crate::http::error::Problem),
        (status = 422, description = "validation_error", body = crate::http::error::Problem)))]
pub async fn add_passkey(
    State(state): State<AppState>,
    audit: Audit,
    p: Authorized<need::OwnCredentials>,
    JsonBody(req): JsonBody<NewPasskey>,
) -> Result<Response, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("passkey");
        a.context.insert("user", ContextValue::id(&p.user_id));
    });
    check_answer(&req.credential)?;
    let Some(session) = p.session_id() else {
        return Err(ApiError::new(ErrorCode::SessionRequired));
    };
    let user = state.identity().user(&p.user_id).await?;
    let added = state
        .identity()
        .passkey_register_finish(&user, session, &req.ceremony, &req.name, &req.credential)
        .await?;
    audit.annotate(|a| {
        a.resource_id = Some(added.passkey.id.clone());
        a.context.insert(
            "recovery_codes_issued",
            ContextValue::Bool(added.recovery_codes.is_some()),
        );
    });
    notify(&state, &audit, &user, true, &added.passkey.name).await;
    Ok((
        StatusCode::CREATED,
        Json(AddedPasskey {
            passkey: added.passkey,
            recovery_codes: added.recovery_codes,
        }),
    )
        .into_response())
}

/// Remove one of the caller's passkeys. Needs a session and a fresh sign-in: the
/// current `password`, or a sign-in within `session.reauth_window` (else 403
/// `reauthentication_required`).
#[utoipa::path(delete, path = "/api/v1/auth/passkeys/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = String, Path, description = "Passkey id")),
    request_body(content = Option<PresenceRequest>, description = "Optional within the re-authentication window"),
    responses((status = 204, description = "Removed"),
        (status = 401, description = "invalid_credentials", body = crate::http::error::Problem),
        (status = 403, description = "session_required or reauthentication_required", body = crate::http::error::Problem),
        (status = 404, description = "No such passkey of the caller", body = crate::http::error::Problem)))]
pub async fn remove_passkey(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    p: Authorized<need::OwnCredentials>,
    Path(id): Path<String>,
    MaybeJsonBody(req): MaybeJsonBody<PresenceRequest>,
) -> Result<StatusCode, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("passkey");
        a.resource_id = Some(id.clone());
        a.context.insert("user", ContextValue::id(&p.user_id));
    });
    let user = caller_present(
        &state,
        &audit,
        &p,
        req.map(|r| Secret::new(r.password)),
        &origin(ip, &headers),
    )
    .await?;
    let Some(session) = p.session_id() else {
        return Err(ApiError::new(ErrorCode::SessionRequired));
    };
    let name = state.identity().passkey_remove(&user, session, &id).await?;
    notify(&state, &audit, &user, false, &name).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Start signing in with a passkey alone: the challenge for `navigator.credentials.get()`
/// (no account named: the passkey names its user). Single use, valid for
/// `passkeys.challenge_ttl`.
#[utoipa::path(post, path = "/api/v1/auth/passkey/challenge", tag = "auth",
    responses((status = 200, description = "Answer with navigator.credentials.get(), then POST /api/v1/auth/passkey/login", body = ChallengeView),
        (status = 429, description = "rate_limited", body = crate::http::error::Problem)))]
pub async fn sign_in_challenge(
    State(state): State<AppState>,
    audit: Audit,
) -> Result<Json<ChallengeView>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("passkey_challenge");
    });
    Ok(Json(state.identity().passkey_sign_in_start().await?.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasskeySignIn {
    /// From `POST /api/v1/auth/passkey/challenge`.
    ceremony: String,
    /// The `PublicKeyCredential` from `navigator.credentials.get()`, binary fields in
    /// base64url (with its `userHandle`).
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

/// Sign in with a passkey alone (discoverable, user verified): the same answer as
/// `POST /api/v1/auth/login`. A wrong, replayed or expired answer is 401
/// `invalid_passkey` and counts like a failed sign-in; a lock from failed passwords
/// does not stop it.
#[utoipa::path(post, path = "/api/v1/auth/passkey/login", tag = "auth", request_body = PasskeySignIn,
    responses((status = 200, description = "Signed in", body = LoginResponse),
        (status = 401, description = "invalid_passkey or invalid_credentials (deactivated)", body = crate::http::error::Problem),
        (status = 422, description = "validation_error", body = crate::http::error::Problem),
        (status = 429, description = "rate_limited (Retry-After)", body = crate::http::error::Problem)))]
pub async fn sign_in(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: axum::http::HeaderMap,
    JsonBody(req): JsonBody<PasskeySignIn>,
) -> Result<Json<LoginResponse>, ApiError> {
    check_answer(&req.credential)?;
    let origin = origin(ip, &headers);
    let identity = state.identity();
    let (result, facts) = identity
        .passkey_sign_in(&req.ceremony, &req.credential, &origin)
        .await;
    identity.record_attempt(&facts, &origin).await?;
    audit_attempt(&audit, result.is_ok(), &facts);
    audit.context("method", ContextValue::Code("passkey"));
    Ok(Json(LoginResponse::of(result?)))
}

/// A user's passkeys (names and dates), for an administrator (`users:manage`). Reset
/// them with `POST /api/v1/users/{id}/totp/reset`, which removes every second factor.
#[utoipa::path(get, path = "/api/v1/users/{id}/passkeys", tag = "users", security(("bearer" = ["users:manage"])),
    params(("id" = String, Path)),
    responses((status = 200, description = "The user's passkeys", body = PasskeyList),
        (status = 404, description = "not_found")))]
pub async fn user_passkeys(
    State(state): State<AppState>,
    audit: Audit,
    auth: Authorized<need::UsersManage>,
    Path(id): Path<String>,
) -> Result<Json<PasskeyList>, ApiError> {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("passkey");
        a.context.insert("user", ContextValue::id(&id));
    });
    let _ = &auth;
    let identity = state.identity();
    let user = identity.user(&id).await?;
    Ok(Json(PasskeyList {
        items: identity.passkeys(&user.id).await?,
        next_cursor: None,
    }))
}
