//! The pages' passkeys: sign in with a passkey alone (`/login/passkey`), and one's own
//! passkeys on the dashboard (add, remove). The WebAuthn calls happen in the browser
//! (`assets/app.js`); these handlers hold every check. The second factor after a
//! password is part of `POST /login` (`pages.rs`).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::pages::{
    blank_login, dashboard, display_time, form_password, login_page, or_error, presence_error,
    signed_in,
};
use super::session::{LoginForm, WebForm};
use crate::app::AppState;
use crate::audit::{Action, Audit, ContextValue};
use crate::http::client_ip::ClientIp;
use crate::http::path::Path;
use crate::http::{ApiError, ErrorCode};
use crate::identity::IdentityError;
use crate::identity::passkeys::MAX_ANSWER_BYTES;
use crate::identity::routes::{audit_attempt, caller_present, origin};

/// A passkey as the dashboard and the user page list it.
pub struct PasskeyRow {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: String,
}

/// A user's passkeys, for a page.
pub async fn rows(state: &AppState, user_id: &str) -> Result<Vec<PasskeyRow>, ApiError> {
    Ok(state
        .identity()
        .passkeys(user_id)
        .await?
        .into_iter()
        .map(|p| PasskeyRow {
            id: p.id,
            name: p.name,
            created_at: display_time(&p.created_at),
            last_used_at: p
                .last_used_at
                .as_deref()
                .map_or_else(|| "never".into(), display_time),
        })
        .collect())
}

fn answer(raw: &str) -> Option<serde_json::Value> {
    if raw.is_empty() || raw.len() > MAX_ANSWER_BYTES {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .filter(serde_json::Value::is_object)
}

/// `POST /login/passkey`: the answer to a challenge from
/// `POST /api/v1/auth/passkey/challenge`, posted by the sign-in page's script.
pub async fn sign_in(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: HeaderMap,
    LoginForm { fields }: LoginForm,
) -> Response {
    let mut page = blank_login(None);
    page.set_next(&fields.text("next"));
    let origin = origin(ip, &headers);
    let identity = state.identity();
    let credential = answer(&fields.text("credential")).unwrap_or_default();
    let (result, facts) = identity
        .passkey_sign_in(&fields.text("ceremony"), &credential, &origin)
        .await;
    if let Err(e) = identity.record_attempt(&facts, &origin).await {
        return ApiError::from(e).into_response();
    }
    audit_attempt(&audit, result.is_ok(), &facts);
    audit.context("method", ContextValue::Code("passkey"));
    match result {
        Ok(ok) => signed_in(&state, &ok.token, page.next()),
        Err(IdentityError::RateLimited { .. }) => {
            page.fail("Too many failed sign-ins from this address. Try again later.");
            login_page(&state, page)
        }
        Err(IdentityError::InvalidPasskey | IdentityError::InvalidCredentials) => {
            page.fail("That passkey was not accepted. Try again, or sign in with your password.");
            login_page(&state, page)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /admin/passkeys/challenge`: a registration challenge for this session, as JSON
/// for the dashboard's script, after a fresh sign-in (or the password).
pub async fn challenge(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: HeaderMap,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(u.principal.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("passkey_register_start"));
    });
    let result = async {
        let Some(session) = u.principal.session_id() else {
            return Err(ApiError::new(ErrorCode::SessionRequired));
        };
        let user = caller_present(
            &state,
            &audit,
            &u.principal,
            form_password(&form.fields),
            &origin(ip, &headers),
        )
        .await
        .map_err(|e| {
            let detail = presence_error(&e);
            ApiError::new(e.code()).with_detail(detail)
        })?;
        let c = state
            .identity()
            .passkey_register_start(&user, session)
            .await?;
        Ok(c.to_json())
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /admin/passkeys`: the answer to that challenge, with a name.
pub async fn add(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("passkey");
        a.context
            .insert("user", ContextValue::id(&u.principal.user_id));
    });
    let result = async {
        let user = state.identity().user(&u.principal.user_id).await?;
        let session = u
            .principal
            .session_id()
            .ok_or(IdentityError::Unauthorized)?;
        let credential = answer(&form.fields.text("credential")).unwrap_or_default();
        let outcome = state
            .identity()
            .passkey_register_finish(
                &user,
                session,
                &form.fields.text("ceremony"),
                &form.fields.text("name"),
                &credential,
            )
            .await;
        // Read the principal again: the session may have its full rights now.
        let principal = state
            .identity()
            .authenticate_session_id(session)
            .await
            .unwrap_or_else(|_| u.principal.clone());
        let me = super::session::WebUser {
            principal,
            csrf: u.csrf.clone(),
        };
        let mut d = dashboard(&state, &me, None)
            .await
            .map_err(|_| IdentityError::Internal("page".into()))?;
        match outcome {
            Ok(r) => {
                audit.annotate(|a| a.resource_id = Some(r.passkey.id.clone()));
                crate::identity::passkey_routes::notify(&state, &audit, &user, true, &r.passkey.name)
                    .await;
                d.passkey_recovery_codes = r.recovery_codes.unwrap_or_default();
            }
            Err(IdentityError::InvalidPasskey) => {
                d.passkey_error = Some("The passkey could not be added (the answer did not verify, or came too late). Try again.".into());
            }
            Err(IdentityError::Invalid(_, m)) => {
                d.passkey_error = Some(format!("The name {m}."));
            }
            Err(IdentityError::Conflict(m)) => d.passkey_error = Some(m.into()),
            Err(IdentityError::Forbidden(m)) => d.passkey_error = Some(m),
            Err(e) => return Err(e),
        }
        Ok::<_, IdentityError>(d)
    }
    .await;
    or_error(result.map_err(ApiError::from))
}

/// `POST /admin/passkeys/{id}/remove`: after a fresh sign-in (or the password).
pub async fn remove(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("passkey");
        a.resource_id = Some(id.clone());
        a.context
            .insert("user", ContextValue::id(&u.principal.user_id));
    });
    let result = async {
        let mut d = dashboard(&state, u, None).await?;
        let present = caller_present(
            &state,
            &audit,
            &u.principal,
            form_password(&form.fields),
            &origin(ip, &headers),
        )
        .await;
        let user = match present {
            Ok(user) => user,
            Err(e) => {
                d.passkey_error = Some(presence_error(&e));
                return Ok(d);
            }
        };
        let session = u.principal.session_id().unwrap_or_default();
        match state.identity().passkey_remove(&user, session, &id).await {
            Ok(name) => {
                crate::identity::passkey_routes::notify(&state, &audit, &user, false, &name).await;
            }
            Err(IdentityError::NotFound) => {
                d.passkey_error = Some("No such passkey.".into());
                return Ok(d);
            }
            Err(IdentityError::Forbidden(m)) => {
                d.passkey_error = Some(m);
                return Ok(d);
            }
            Err(e) => return Err(ApiError::from(e)),
        }
        let mut d = dashboard(&state, u, Some("Passkey removed.".into())).await?;
        d.passkey_error = None;
        Ok(d)
    }
    .await;
    or_error(result)
}
