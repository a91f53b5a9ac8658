//! The admin pages. Each handler: session → permission → service → audit → page.
//! Every value in a page is escaped by the templates; forms re-render with messages on
//! bad input (never a 500).

use crate::http::json::QueryParams as Query;
use crate::http::path::Path;
use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::session::{
    LoginForm, WebForm, WebUser, login_cookie_name, new_login_csrf, safe_next, session_cookie_name,
    set_cookie, set_embedded_cookie,
};
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, AuditEvent, ContextValue};
use crate::config::Secret;
use crate::http::client_ip::ClientIp;
use crate::http::{ApiError, ErrorCode};
use crate::identity::routes::origin;
use crate::identity::service::describe;
use crate::identity::{Grantor, IdentityError};
use crate::identity::{roles, store};

/// What every page's frame needs.
pub struct Layout {
    pub(crate) signed_in: bool,
    pub(crate) username: String,
    pub(crate) role: String,
    pub(crate) csrf: String,
    pub(crate) idle_seconds: u64,
    pub(crate) can_users: bool,
    pub(crate) can_roles: bool,
    pub(crate) can_audit: bool,
    pub(crate) can_calc: bool,
    pub(crate) can_patients: bool,
    /// A patient account: its own record is at /my.
    pub(crate) is_patient: bool,
    pub(crate) can_amend: bool,
    pub(crate) notice: Option<String>,
}

impl Layout {
    pub(crate) fn anonymous(notice: Option<String>) -> Self {
        Self {
            signed_in: false,
            username: String::new(),
            role: String::new(),
            csrf: String::new(),
            idle_seconds: 0,
            can_users: false,
            can_roles: false,
            can_audit: false,
            can_calc: false,
            can_patients: false,
            is_patient: false,
            can_amend: false,
            notice,
        }
    }

    pub(crate) fn of(state: &AppState, u: &WebUser, notice: Option<String>) -> Self {
        Self {
            signed_in: true,
            username: u.principal.username.clone(),
            role: u.principal.role.clone(),
            csrf: u.csrf.clone(),
            idle_seconds: state.identity().settings().idle_timeout.as_secs(),
            can_users: u.can(Permission::UsersManage),
            can_roles: u.can(Permission::RolesManage),
            can_audit: u.can(Permission::AuditRead),
            can_calc: u.can(Permission::RecordsRead),
            can_patients: u.can(Permission::PatientsRead),
            is_patient: u.principal.patient.is_some(),
            can_amend: u.can(Permission::AmendmentsReview),
            notice,
        }
    }
}

pub(crate) fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

pub(crate) fn render_status<T: Template>(status: StatusCode, t: &T) -> Response {
    let mut r = render(t);
    *r.status_mut() = status;
    r
}

#[derive(Template)]
#[template(path = "message.html")]
struct Message {
    layout: Layout,
    heading: &'static str,
    text: String,
    back: &'static str,
}

/// The frame of an error page: signed in, no idle timer.
fn error_layout(u: &WebUser) -> Layout {
    Layout {
        signed_in: true,
        username: u.principal.username.clone(),
        role: u.principal.role.clone(),
        csrf: u.csrf.clone(),
        idle_seconds: 0,
        can_users: u.can(Permission::UsersManage),
        can_roles: u.can(Permission::RolesManage),
        can_audit: u.can(Permission::AuditRead),
        can_calc: u.can(Permission::RecordsRead),
        can_patients: u.can(Permission::PatientsRead),
        is_patient: u.principal.patient.is_some(),
        can_amend: u.can(Permission::AmendmentsReview),
        notice: None,
    }
}

/// The page for something that does not exist (or is not this user's to know of).
pub fn not_found(u: &WebUser) -> Response {
    render_status(
        StatusCode::NOT_FOUND,
        &Message {
            layout: error_layout(u),
            heading: "Not found",
            text: "There is nothing here. It may have been deleted.".into(),
            back: "/",
        },
    )
}

/// The page for a role that lacks the permission a page needs (recorded in the audit
/// trail as `permission_denied`).
pub fn forbidden(u: &WebUser) -> Response {
    let layout = error_layout(u);
    let mut r = render_status(
        StatusCode::FORBIDDEN,
        &Message {
            layout,
            heading: "Not allowed",
            text: "Your role does not allow this page.".into(),
            back: "/admin",
        },
    );
    r.extensions_mut()
        .insert(crate::http::error::PermissionRefused);
    r
}

/// A stored time as people read it: `2026-11-23 03:59:51 UTC`.
pub(crate) fn display_time(s: &str) -> String {
    match (s.get(..10), s.get(11..19)) {
        (Some(d), Some(t)) if s.get(10..11) == Some("T") => format!("{d} {t} UTC"),
        _ => s.to_owned(),
    }
}

/// Notices chosen by code, so no request value is ever reflected into a page.
pub(crate) fn notice(code: Option<&str>) -> Option<String> {
    let text = match code? {
        "expired" => "You were signed out after a period of inactivity.",
        "signed-out" => "You are signed out.",
        "session-ended" => {
            "Your session reached its longest lifetime (session.absolute_timeout). Sign in again."
        }
        "saved" => "Saved.",
        "created" => "Created.",
        "deleted" => "Deleted.",
        "unlocked" => "Unlocked.",
        "sessions-ended" => {
            "Every sign-in of this user has ended: sessions, API tokens and app grants."
        }
        "password-set" => {
            "The password was set, and every sign-in of the user ended: sessions, API tokens and app grants."
        }
        "tokens-revoked" => "Every API token of yours is revoked.",
        "revoked" => "Revoked.",
        "ended" => "The session ended.",
        "email-saved" => {
            "Saved. The new address counts as verified only once its owner follows the link sent to it; links sent to the old address no longer work."
        }
        "totp-reset" => {
            "The second factor was reset and the user's sessions ended: they set up an authenticator again at their next sign-in. No mail was sent (no verified address, or mail is off): tell them yourself."
        }
        "totp-reset-mailed" => {
            "The second factor was reset and the user's sessions ended: they set up an authenticator again at their next sign-in, and were told by mail."
        }
        _ => return None,
    };
    Some(text.to_owned())
}

#[derive(Deserialize)]
pub struct NoticeQuery {
    #[serde(default)]
    ok: Option<String>,
    #[serde(default)]
    expired: Option<String>,
    /// Where to go after signing in (only the SMART app's paths are honoured).
    #[serde(default)]
    next: Option<String>,
}

// ---- sign-in ---------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "login.html")]
pub(super) struct LoginPage {
    layout: Layout,
    login_csrf: String,
    username: String,
    next: String,
    error: Option<String>,
    need_totp: bool,
    /// The second-factor step of an account with a passkey: its challenge (JSON).
    passkey_challenge: Option<String>,
    expired: bool,
    /// The password to change is one an administrator set (not one past its age).
    set_by_admin: bool,
    violations: Vec<&'static str>,
}

pub(super) fn login_page(state: &AppState, mut page: LoginPage) -> Response {
    let csrf = new_login_csrf();
    page.login_csrf.clone_from(&csrf);
    let embedded = embedded_flow(state, &page.next);
    let mut r = render(&page);
    let name = login_cookie_name(state.config());
    r.headers_mut().append(
        header::SET_COOKIE,
        if embedded {
            set_embedded_cookie(name, Some(&csrf))
        } else {
            set_cookie(state.config(), name, Some(&csrf))
        },
    );
    if embedded {
        crate::smart::routes::allow_framing(state, &mut r);
    }
    r
}

/// Whether a sign-in is part of a SMART launch that an EHR may frame: its cookies then
/// cross sites (`SameSite=None; Partitioned`) and its page may be framed by the EHR.
fn embedded_flow(state: &AppState, next: &str) -> bool {
    !next.is_empty() && !state.config().smart.frame_ancestors.is_empty()
}

pub(super) fn blank_login(notice: Option<String>) -> LoginPage {
    LoginPage {
        layout: Layout::anonymous(notice),
        login_csrf: String::new(),
        username: String::new(),
        next: String::new(),
        error: None,
        need_totp: false,
        passkey_challenge: None,
        expired: false,
        set_by_admin: false,
        violations: Vec::new(),
    }
}

impl LoginPage {
    pub(super) fn set_next(&mut self, next: &str) {
        self.next = safe_next(next).unwrap_or("").to_owned();
    }

    pub(super) fn next(&self) -> &str {
        &self.next
    }

    pub(super) fn fail(&mut self, message: &str) {
        self.error = Some(message.to_owned());
    }
}

pub async fn login_form(
    State(state): State<AppState>,
    audit: Audit,
    Query(q): Query<NoticeQuery>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("page"));
    let n = if q.expired.is_some() {
        notice(Some("expired"))
    } else {
        notice(q.ok.as_deref())
    };
    let mut page = blank_login(n);
    page.next = q
        .next
        .as_deref()
        .and_then(safe_next)
        .unwrap_or("")
        .to_owned();
    login_page(&state, page)
}

/// Where a sign-in that came with `next` goes on: a page that moves on by itself. Not a
/// redirect, because the SMART launch it returns to redirects to the EHR, and browsers
/// hold a redirect chain that began with a form post to `form-action 'self'`.
#[derive(Template)]
#[template(path = "continue.html")]
struct Continue {
    layout: Layout,
    next: String,
}

pub(super) fn signed_in(state: &AppState, token: &Secret, next: &str) -> Response {
    let embedded = embedded_flow(state, next);
    let mut r = if next.is_empty() {
        Redirect::to("/").into_response()
    } else {
        let mut r = render(&Continue {
            layout: Layout::anonymous(None),
            next: next.to_owned(),
        });
        if embedded {
            crate::smart::routes::allow_framing(state, &mut r);
        }
        r
    };
    let cfg = state.config();
    let (session, login) = (session_cookie_name(cfg), login_cookie_name(cfg));
    let headers = r.headers_mut();
    if embedded {
        headers.append(
            header::SET_COOKIE,
            set_embedded_cookie(session, Some(token.expose())),
        );
        headers.append(header::SET_COOKIE, set_embedded_cookie(login, None));
    } else {
        headers.append(
            header::SET_COOKIE,
            set_cookie(cfg, session, Some(token.expose())),
        );
        headers.append(header::SET_COOKIE, set_cookie(cfg, login, None));
    }
    r
}

pub async fn login_submit(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: HeaderMap,
    LoginForm { fields }: LoginForm,
) -> Response {
    let username = fields.text("username");
    let password = Secret::new(fields.get("password").unwrap_or("").to_owned());
    let code = fields.text("totp_code");
    let mut page = blank_login(None);
    page.username = username.chars().take(64).collect();
    page.next = safe_next(&fields.text("next")).unwrap_or("").to_owned();
    if username.chars().count() > 64 || password.expose().chars().count() > 1024 {
        page.error = Some("The username or password is too long.".into());
        return login_page(&state, page);
    }
    let origin = origin(ip, &headers);
    let identity = state.identity();
    let ceremony = fields.text("passkey_ceremony");
    let answer = Some(fields.text("passkey_credential"))
        .filter(|a| !a.is_empty() && a.len() <= crate::identity::passkeys::MAX_ANSWER_BYTES)
        .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok());
    let (result, facts) = identity
        .login_with(
            &username,
            &password,
            crate::identity::service::SecondFactorAnswer {
                code: Some(code.as_str()).filter(|c| !c.is_empty()),
                passkey: answer.as_ref().map(|a| (ceremony.as_str(), a)),
            },
            &origin,
        )
        .await;
    if let Err(e) = identity.record_attempt(&facts, &origin).await {
        return ApiError::from(e).into_response();
    }
    crate::identity::routes::audit_attempt(&audit, result.is_ok(), &facts);
    if let Ok(ok) = &result {
        audit.context(
            "method",
            ContextValue::Code(crate::identity::routes::method_code(&ok.method)),
        );
    }
    if matches!(
        result,
        Err(IdentityError::MfaRequired
            | IdentityError::InvalidTotp
            | IdentityError::InvalidPasskey)
    ) && let Some(id) = facts.user_id.as_deref()
    {
        // The password was right: a new passkey challenge for the second step.
        match identity.passkey_second_factor_start(id).await {
            Ok(c) => page.passkey_challenge = c.map(|c| c.to_json().to_string()),
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    match result {
        Ok(ok) => signed_in(&state, &ok.token, &page.next),
        Err(IdentityError::MfaRequired) => {
            page.need_totp = true;
            login_page(&state, page)
        }
        Err(IdentityError::InvalidTotp) => {
            page.need_totp = true;
            page.error = Some("The authentication code is wrong or was already used.".into());
            login_page(&state, page)
        }
        Err(IdentityError::InvalidPasskey) => {
            page.need_totp = true;
            page.error = Some("The passkey was not accepted. Try again.".into());
            login_page(&state, page)
        }
        Err(IdentityError::PasswordExpired { set_by_admin }) => {
            page.expired = true;
            page.set_by_admin = set_by_admin;
            // TOTP is on: the change needs a fresh code too.
            page.need_totp = !code.is_empty();
            login_page(&state, page)
        }
        Err(IdentityError::Locked { retry_after }) => {
            page.error = Some(format!(
                "Too many failed sign-ins: this account is locked. Try again in {} minutes, or ask an administrator to unlock it.",
                retry_after.div_ceil(60)
            ));
            login_page(&state, page)
        }
        Err(IdentityError::RateLimited { .. }) => {
            page.error =
                Some("Too many failed sign-ins from this address. Try again later.".into());
            login_page(&state, page)
        }
        Err(IdentityError::InvalidCredentials) => {
            page.error = Some("The username or password is wrong.".into());
            login_page(&state, page)
        }
        Err(IdentityError::Busy) => {
            page.error = Some("The server is busy. Try again in a moment.".into());
            login_page(&state, page)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The expired-password form: change it, then sign in.
pub async fn login_password(
    State(state): State<AppState>,
    audit: Audit,
    ip: ClientIp,
    headers: HeaderMap,
    LoginForm { fields }: LoginForm,
) -> Response {
    let username = fields.text("username");
    let current = Secret::new(fields.get("current_password").unwrap_or("").to_owned());
    let new = Secret::new(fields.get("new_password").unwrap_or("").to_owned());
    let code = fields.text("totp_code");
    let mut page = blank_login(None);
    page.username = username.chars().take(64).collect();
    page.next = safe_next(&fields.text("next")).unwrap_or("").to_owned();
    page.expired = true;
    let origin = origin(ip, &headers);
    let identity = state.identity();
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.context.insert("change", ContextValue::Code("password"));
    });
    let (result, facts) = identity
        .login(
            &username,
            &current,
            Some(code.as_str()).filter(|c| !c.is_empty()),
            &origin,
        )
        .await;
    if let Err(e) = identity.record_attempt(&facts, &origin).await {
        return ApiError::from(e).into_response();
    }
    crate::identity::routes::audit_reauth(&audit, &result, &facts);
    if let Err(IdentityError::PasswordExpired { set_by_admin }) = &result {
        page.set_by_admin = *set_by_admin;
    }
    let user = match result {
        Ok(_) | Err(IdentityError::PasswordExpired { .. }) => {
            match identity.user_by_username(&username).await {
                Ok(Some(u)) => u,
                _ => {
                    page.error = Some("The username or password is wrong.".into());
                    return login_page(&state, page);
                }
            }
        }
        Err(IdentityError::MfaRequired | IdentityError::InvalidTotp) => {
            page.need_totp = true;
            page.error = Some("Enter a new code from your authenticator app.".into());
            return login_page(&state, page);
        }
        Err(IdentityError::Locked { .. } | IdentityError::RateLimited { .. }) => {
            page.error = Some("Too many failed attempts; try again later.".into());
            return login_page(&state, page);
        }
        Err(_) => {
            page.error = Some("The username or current password is wrong.".into());
            return login_page(&state, page);
        }
    };
    audit.set_actor(Actor::user(&user.id, &user.username));
    audit.annotate(|a| a.resource_id = Some(user.id.clone()));
    match identity.set_password(&user, &new, None).await {
        Ok(()) => {}
        Err(IdentityError::Policy(v)) => {
            page.violations = v;
            page.error = Some("The new password does not meet the policy:".into());
            return login_page(&state, page);
        }
        Err(e) => return ApiError::from(e).into_response(),
    }
    match identity.login(&username, &new, None, &origin).await {
        (Ok(ok), facts) => {
            let _ = identity.record_attempt(&facts, &origin).await;
            signed_in(&state, &ok.token, &page.next)
        }
        _ => Redirect::to("/login?ok=password-set").into_response(),
    }
}

pub async fn logout(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Logout);
        a.resource_type = Some("session");
    });
    if let Some(id) = form.user.principal.session_id()
        && let Err(e) = state.identity().logout(id).await
    {
        return ApiError::from(e).into_response();
    }
    let mut r = Redirect::to("/login?ok=signed-out").into_response();
    let name = session_cookie_name(state.config());
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(state.config(), name, None));
    if !state.config().smart.frame_ancestors.is_empty() {
        // A session begun inside an EHR frame has a partitioned cookie of its own.
        r.headers_mut()
            .append(header::SET_COOKIE, set_embedded_cookie(name, None));
    }
    r
}

/// `/`: where a signed-in person starts. A role that reads patients and administers
/// nothing starts at the patient list; everyone else at the dashboard; nobody signed in
/// at the sign-in page.
pub async fn start(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match super::session::signed_in_user(&state, &headers, None).await {
        None => Redirect::to("/login").into_response(),
        Some(u) if u.principal.patient.is_some() => Redirect::to("/my").into_response(),
        Some(u)
            if u.can(Permission::PatientsRead)
                && !u.can(Permission::UsersManage)
                && !u.can(Permission::RolesManage) =>
        {
            Redirect::to("/patients").into_response()
        }
        Some(_) => Redirect::to("/admin").into_response(),
    }
}

// ---- dashboard -------------------------------------------------------------------------

struct TokenRow {
    id: String,
    name: String,
    created_at: String,
    expires_at: String,
    last_used_at: String,
    expires_soon: bool,
}

struct SessionRow {
    created_at: String,
    last_used_at: String,
    ip: String,
    user_agent: String,
}

struct NewToken {
    name: String,
    token: String,
}

struct Enrol {
    secret: String,
    qr_svg: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
pub(super) struct Dashboard {
    layout: Layout,
    email: String,
    permissions: Vec<String>,
    password_expires: String,
    mfa_enabled: bool,
    mfa_pending: bool,
    mfa_required: bool,
    tokens: Vec<TokenRow>,
    sessions: Vec<SessionRow>,
    new_token: Option<NewToken>,
    token_error: Option<String>,
    enrol: Option<Enrol>,
    recovery_codes: Vec<String>,
    totp_error: Option<String>,
    pub(super) passkeys: Vec<super::passkeys::PasskeyRow>,
    pub(super) passkey_error: Option<String>,
    pub(super) passkey_recovery_codes: Vec<String>,
    /// The user's role must sign in with a passkey (`mfa.phishing_resistant_roles`).
    passkey_required: bool,
    password_error: Option<String>,
    password_violations: Vec<&'static str>,
    /// Just changed: the API tokens that still work are listed with the offer to
    /// revoke them.
    password_changed: bool,
}

pub(super) async fn dashboard(
    state: &AppState,
    u: &WebUser,
    notice: Option<String>,
) -> Result<Dashboard, ApiError> {
    let identity = state.identity();
    let p = &u.principal;
    let tokens = if p.mfa_enrollment_pending {
        Vec::new()
    } else {
        identity
            .tokens(&p.user_id)
            .await?
            .into_iter()
            .map(|t| TokenRow {
                expires_soon: identity.expires_soon(&t.expires_at),
                id: t.id,
                name: t.name,
                created_at: display_time(&t.created_at),
                expires_at: display_time(&t.expires_at),
                last_used_at: t
                    .last_used_at
                    .as_deref()
                    .map_or_else(|| "never".into(), display_time),
            })
            .collect()
    };
    let sessions = store::live_sessions(state.db(), Some(&p.user_id), &identity.now_timestamp())
        .await?
        .into_iter()
        .map(|s| SessionRow {
            created_at: display_time(&s.created_at),
            last_used_at: display_time(&s.last_used_at),
            ip: s.ip.unwrap_or_default(),
            user_agent: s.user_agent.unwrap_or_default(),
        })
        .collect();
    Ok(Dashboard {
        layout: Layout::of(state, u, notice),
        email: p.email.clone().unwrap_or_default(),
        permissions: p
            .permissions
            .iter()
            .map(|x| x.as_str().to_owned())
            .collect(),
        password_expires: p
            .password_expires_at
            .as_deref()
            .map_or_else(|| "never".into(), display_time),
        mfa_enabled: p.mfa_enabled,
        mfa_pending: p.mfa_enrollment_pending,
        mfa_required: identity.settings().mfa_required,
        tokens,
        sessions,
        new_token: None,
        token_error: None,
        enrol: None,
        recovery_codes: Vec::new(),
        totp_error: None,
        passkeys: super::passkeys::rows(state, &p.user_id).await?,
        passkey_error: None,
        passkey_recovery_codes: Vec::new(),
        passkey_required: identity.requires_passkey(&p.role),
        password_error: None,
        password_violations: Vec::new(),
        password_changed: false,
    })
}

pub(super) fn or_error(r: Result<Dashboard, ApiError>) -> Response {
    match r {
        Ok(d) => render(&d),
        Err(e) => e.into_response(),
    }
}

pub async fn home(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<NoticeQuery>,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("user");
        a.resource_id = Some(u.principal.user_id.clone());
    });
    or_error(dashboard(&state, &u, notice(q.ok.as_deref())).await)
}

pub async fn totp_enroll(
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
            .insert("change", ContextValue::Code("totp_enroll"));
    });
    let identity = state.identity();
    let result = async {
        let user = identity.user(&u.principal.user_id).await?;
        let mut d = dashboard(&state, u, None)
            .await
            .map_err(|_| IdentityError::Internal("page".into()))?;
        // The current password, unless the session signed in with it moments ago.
        let present = crate::identity::routes::confirm_presence(
            &state,
            &audit,
            &u.principal,
            &user,
            form_password(&form.fields),
            &origin(ip, &headers),
        )
        .await;
        if let Err(e) = present {
            d.totp_error = Some(presence_error(&e));
            return Ok(d);
        }
        match identity.totp_enroll(&user).await {
            Ok(e) => {
                d.enrol = Some(Enrol {
                    secret: e.secret.expose().to_owned(),
                    qr_svg: e.qr_svg,
                })
            }
            Err(IdentityError::Conflict(m)) => d.totp_error = Some(m.into()),
            Err(e) => return Err(e),
        }
        Ok::<_, IdentityError>(d)
    }
    .await;
    or_error(result.map_err(ApiError::from))
}

pub async fn totp_confirm(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(u.principal.user_id.clone());
        a.context
            .insert("change", ContextValue::Code("totp_confirm"));
    });
    let identity = state.identity();
    let result = async {
        let user = identity.user(&u.principal.user_id).await?;
        let outcome = identity
            .totp_confirm(&user, &form.fields.text("code"))
            .await;
        // Re-read the principal: TOTP may be on now, and with it the user's permissions.
        let mut d = dashboard(&state, u, None)
            .await
            .map_err(|_| IdentityError::Internal("page".into()))?;
        match outcome {
            Ok(codes) => {
                d.mfa_enabled = true;
                d.mfa_pending = false;
                d.recovery_codes = codes;
            }
            Err(IdentityError::InvalidTotp) => {
                d.totp_error = Some("That code is wrong or was already used; start again.".into())
            }
            Err(IdentityError::Conflict(m)) => d.totp_error = Some(m.into()),
            Err(e) => return Err(e),
        }
        Ok::<_, IdentityError>(d)
    }
    .await;
    or_error(result.map_err(ApiError::from))
}

/// The current password of a credential-change form, when typed.
pub(super) fn form_password(fields: &super::session::Fields) -> Option<Secret> {
    fields
        .get("password")
        .filter(|p| !p.is_empty())
        .map(|p| Secret::new(p.to_owned()))
}

/// What the pages say when a credential change could not confirm it is the user.
pub(super) fn presence_error(e: &ApiError) -> String {
    match e.code() {
        ErrorCode::ReauthenticationRequired => "Enter your current password to do this.".into(),
        ErrorCode::AccountLocked => {
            "Too many failed attempts: password checks are locked for now; try again later.".into()
        }
        ErrorCode::RateLimited => {
            "Too many failed attempts from this address; try again later.".into()
        }
        ErrorCode::MfaRequired => "Enter the code from your authenticator app too.".into(),
        _ => "The password or code is wrong.".into(),
    }
}

pub async fn totp_disable(
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
            .insert("change", ContextValue::Code("totp_disable"));
    });
    let identity = state.identity();
    let result = async {
        let user = identity.user(&u.principal.user_id).await?;
        let password = Secret::new(form.fields.get("password").unwrap_or("").to_owned());
        let (outcome, facts) = identity
            .totp_disable(
                &user,
                &password,
                &form.fields.text("code"),
                &origin(ip, &headers),
            )
            .await;
        if let Some(facts) = &facts {
            crate::identity::routes::audit_reauth(&audit, &outcome, facts);
        }
        let mut d = dashboard(&state, u, None)
            .await
            .map_err(|_| IdentityError::Internal("page".into()))?;
        match outcome {
            Ok(()) => d.mfa_enabled = false,
            Err(
                e @ (IdentityError::InvalidCredentials
                | IdentityError::InvalidTotp
                | IdentityError::MfaRequired
                | IdentityError::Locked { .. }
                | IdentityError::RateLimited { .. }),
            ) => {
                d.totp_error = Some(presence_error(&ApiError::from(e)));
            }
            Err(IdentityError::Conflict(m)) => d.totp_error = Some(m.into()),
            Err(e) => return Err(e),
        }
        Ok::<_, IdentityError>(d)
    }
    .await;
    or_error(result.map_err(ApiError::from))
}

/// The signed-in user changes their own password: the current password (and code when
/// TOTP is on) first, counted like sign-in; their other sessions end, and their API
/// tokens too when asked. The page then lists the tokens that still work.
pub async fn password_change(
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
        a.context.insert("change", ContextValue::Code("password"));
    });
    let f = &form.fields;
    let current = Secret::new(f.get("current_password").unwrap_or("").to_owned());
    let new = Secret::new(f.get("new_password").unwrap_or("").to_owned());
    let code = f.text("totp_code");
    let revoke_tokens = f.text("api_tokens") == "revoke";
    let identity = state.identity();
    let user = match identity.user(&u.principal.user_id).await {
        Ok(user) => user,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (result, facts) = identity
        .change_password(
            &user,
            &crate::identity::service::PasswordChange {
                current: &current,
                code: Some(code.as_str()).filter(|c| !c.is_empty()),
                new: &new,
                keep_session: u.principal.session_id(),
                revoke_tokens,
            },
            &origin(ip, &headers),
        )
        .await;
    crate::identity::routes::audit_reauth(&audit, &result, &facts);
    audit.context("api_tokens_revoked", ContextValue::Bool(revoke_tokens));
    let mut d = match dashboard(&state, u, None).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    match result {
        Ok(()) => {
            d.password_changed = true;
            d.layout.notice = Some(if revoke_tokens {
                "Password changed. Your other sessions and every API token of yours have ended."
                    .into()
            } else {
                "Password changed. Your other sessions have ended.".into()
            });
            render(&d)
        }
        Err(IdentityError::Policy(v)) => {
            d.password_violations = v;
            d.password_error = Some("The new password does not meet the policy:".into());
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &d)
        }
        Err(
            e @ (IdentityError::InvalidCredentials
            | IdentityError::InvalidTotp
            | IdentityError::MfaRequired
            | IdentityError::Locked { .. }
            | IdentityError::RateLimited { .. }
            | IdentityError::Invalid(..)),
        ) => {
            d.password_error = Some(presence_error(&ApiError::from(e)));
            render_status(StatusCode::UNPROCESSABLE_ENTITY, &d)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Revokes every API token of the signed-in user.
pub async fn tokens_revoke_all(
    State(state): State<AppState>,
    audit: Audit,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("api_token");
        a.context.insert("all", ContextValue::Bool(true));
    });
    match state
        .identity()
        .revoke_tokens(&form.user.principal.user_id)
        .await
    {
        Ok(()) => Redirect::to("/admin?ok=tokens-revoked#tokens").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn token_create(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    if u.principal.mfa_enrollment_pending {
        return Redirect::to("/admin#totp").into_response();
    }
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("api_token");
    });
    let days: u64 = form.fields.text("days").parse().unwrap_or(7);
    let name = form.fields.text("name");
    let created = state
        .identity()
        .create_token(
            &u.principal.user_id,
            &name,
            Some(days.saturating_mul(86_400)),
        )
        .await;
    let mut d = match dashboard(&state, u, None).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    match created {
        Ok((row, token)) => {
            audit.annotate(|a| a.resource_id = Some(row.id.clone()));
            d.new_token = Some(NewToken {
                name: row.name,
                token: token.expose().to_owned(),
            });
            if let Ok(fresh) = dashboard(&state, u, None).await {
                d.tokens = fresh.tokens;
            }
        }
        Err(IdentityError::Invalid(_, m)) => d.token_error = Some(format!("The name {m}.")),
        Err(e) => return ApiError::from(e).into_response(),
    }
    render(&d)
}

pub async fn token_rotate(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    if u.principal.mfa_enrollment_pending {
        return Redirect::to("/admin#totp").into_response();
    }
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("api_token");
        a.resource_id = Some(id.clone());
        a.context.insert("change", ContextValue::Code("rotate"));
    });
    match state
        .identity()
        .rotate_token(&u.principal.user_id, &id)
        .await
    {
        Ok((row, token)) => match dashboard(&state, u, None).await {
            Ok(mut d) => {
                d.new_token = Some(NewToken {
                    name: row.name,
                    token: token.expose().to_owned(),
                });
                render(&d)
            }
            Err(e) => e.into_response(),
        },
        Err(IdentityError::NotFound) => Redirect::to("/admin#tokens").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn token_revoke(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("api_token");
        a.resource_id = Some(id.clone());
    });
    match state
        .identity()
        .revoke_token(&form.user.principal.user_id, &id)
        .await
    {
        Ok(()) | Err(IdentityError::NotFound) => {
            Redirect::to("/admin?ok=revoked#tokens").into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn end_my_sessions(
    State(state): State<AppState>,
    audit: Audit,
    form: WebForm,
) -> Response {
    let tokens = form.fields.text("api_tokens") == "revoke";
    audit.annotate(|a| {
        a.action = Some(Action::Logout);
        a.resource_type = Some("session");
        a.context.insert("all", ContextValue::Bool(true));
        a.context.insert("api_tokens", ContextValue::Bool(tokens));
    });
    if let Err(e) = state
        .identity()
        .revoke_all(&form.user.principal.user_id, tokens)
        .await
    {
        return ApiError::from(e).into_response();
    }
    let mut r = Redirect::to("/login?ok=signed-out").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state.config(), session_cookie_name(state.config()), None),
    );
    r
}

/// "Stay signed in": a real request that refreshes the server session.
pub async fn keepalive(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("session");
        a.context.insert("keepalive", ContextValue::Bool(true));
    });
    match form.user.principal.session_id() {
        Some(id) => match state.identity().touch_session(id).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => ApiError::from(e).into_response(),
        },
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

// ---- users -----------------------------------------------------------------------------

struct UserRow {
    id: String,
    username: String,
    email: String,
    role: String,
    active: bool,
    mfa_enabled: bool,
    /// An authenticator was set up but not confirmed yet.
    mfa_pending: bool,
    locked_until: Option<String>,
    password_changed_at: String,
    password_age_days: i64,
    must_change_password: bool,
}

async fn user_row(state: &AppState, u: crate::identity::model::User) -> Result<UserRow, ApiError> {
    let now = state.clock().now();
    let locked_until = store::locked_until(
        state.db(),
        &format!("user:{}", u.username),
        &state.identity().now_timestamp(),
    )
    .await?;
    let age = time::OffsetDateTime::parse(
        &u.password_changed_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(0, |t| (now - t).whole_days());
    Ok(UserRow {
        id: u.id,
        username: u.username,
        email: u.email.unwrap_or_default(),
        role: u.role,
        active: u.active,
        mfa_enabled: u.totp_enabled,
        mfa_pending: !u.totp_enabled && u.totp_secret.is_some(),
        locked_until: locked_until.as_deref().map(display_time),
        password_changed_at: display_time(&u.password_changed_at),
        password_age_days: age,
        must_change_password: u.must_change_password,
    })
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    layout: Layout,
    q: String,
    users: Vec<UserRow>,
    next: Option<String>,
    roles: Vec<String>,
    errors: Vec<String>,
    form_username: String,
    form_email: String,
    form_role: String,
    form_must_change: bool,
}

#[derive(Deserialize)]
pub struct UsersQuery {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    ok: Option<String>,
}

async fn users_page(
    state: &AppState,
    u: &WebUser,
    q: &str,
    after: Option<&str>,
    notice: Option<String>,
) -> Result<UsersPage, ApiError> {
    const PAGE: usize = 50;
    let q: String = q.chars().take(64).collect();
    let rows = store::list_users(
        state.db(),
        Some(q.as_str()).filter(|s| !s.is_empty()),
        after,
        PAGE as i64 + 1,
    )
    .await?;
    let more = rows.len() > PAGE;
    let mut users = Vec::new();
    for r in rows.into_iter().take(PAGE) {
        users.push(user_row(state, r).await?);
    }
    let next = if more {
        users.last().map(|r| r.username.clone())
    } else {
        None
    };
    Ok(UsersPage {
        layout: Layout::of(state, u, notice),
        q,
        users,
        next,
        // A patient account is made from a patient's record, never here.
        roles: store::roles(state.db())
            .await?
            .into_iter()
            .map(|r| r.name)
            .filter(|n| n != crate::identity::roles::PATIENT_ROLE)
            .collect(),
        errors: Vec::new(),
        form_username: String::new(),
        form_email: String::new(),
        form_role: "nurse".into(),
        form_must_change: true,
    })
}

pub async fn users(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<UsersQuery>,
) -> Response {
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("user");
    });
    match users_page(
        &state,
        &u,
        q.q.as_deref().unwrap_or(""),
        q.after.as_deref(),
        notice(q.ok.as_deref()),
    )
    .await
    {
        Ok(p) => render(&p),
        Err(e) => e.into_response(),
    }
}

pub async fn user_create(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("user");
    });
    let f = &form.fields;
    let (username, email, role) = (f.text("username"), f.text("email"), f.text("role"));
    let password = Secret::new(f.get("password").unwrap_or("").to_owned());
    let email_opt = Some(email.as_str()).filter(|e| !e.is_empty());
    // Checked by default on the form: a password an administrator typed is theirs to
    // know, so its owner replaces it at the first sign-in.
    let must_change = f.get("must_change_password").is_some();
    match state
        .identity()
        .create_user_with(
            Grantor::user(&u.principal),
            &username,
            email_opt,
            &role,
            &password,
            must_change,
        )
        .await
    {
        Ok(user) => {
            audit.annotate(|a| {
                a.resource_id = Some(user.id.clone());
                a.context.insert("role", ContextValue::id(&user.role));
                a.context
                    .insert("must_change_password", ContextValue::Bool(must_change));
            });
            Redirect::to(&format!("/admin/users/{}?ok=created", user.id)).into_response()
        }
        Err(
            e @ (IdentityError::Invalid(..)
            | IdentityError::Conflict(_)
            | IdentityError::Policy(_)
            | IdentityError::Forbidden(_)),
        ) => match users_page(&state, u, "", None, None).await {
            Ok(mut p) => {
                p.errors = vec![describe(&e)];
                p.form_username = username.chars().take(64).collect();
                p.form_email = email.chars().take(254).collect();
                p.form_role = role;
                p.form_must_change = must_change;
                render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
            }
            Err(e) => e.into_response(),
        },
        Err(e) => ApiError::from(e).into_response(),
    }
}

struct LoginRow {
    at: String,
    success: bool,
    reason: String,
    ip: String,
    user_agent: String,
}

#[derive(Template)]
#[template(path = "user.html")]
struct UserPage {
    layout: Layout,
    user: UserRow,
    email_verified: bool,
    /// The viewer's role covers this account's (they may change it).
    manageable: bool,
    roles: Vec<String>,
    sessions: Vec<super::sessions::CredentialRow>,
    tokens: Vec<super::sessions::CredentialRow>,
    /// The user's authenticators: TOTP is `user.mfa_enabled`; these are the passkeys.
    passkeys: Vec<super::passkeys::PasskeyRow>,
    logins: Vec<LoginRow>,
    errors: Vec<String>,
}

async fn user_page(
    state: &AppState,
    u: &WebUser,
    id: &str,
    notice: Option<String>,
) -> Result<UserPage, ApiError> {
    let user = state.identity().user(id).await?;
    let is_patient = user.patient_id.is_some();
    let logins = store::attempts(state.db(), id, None, 50)
        .await?
        .into_iter()
        .map(|a| LoginRow {
            at: display_time(&a.at),
            success: a.success,
            reason: a.reason,
            ip: a.ip.unwrap_or_default(),
            user_agent: a.user_agent.unwrap_or_default(),
        })
        .collect();
    let email_verified = state
        .accounts()
        .is_verified(&user)
        .await
        .map_err(ApiError::from)?;
    let manageable = super::sessions::may_manage(state, u, &user.role).await?;
    let (sessions, tokens) = super::sessions::credentials_of(state, &user.id).await?;
    Ok(UserPage {
        layout: Layout::of(state, u, notice),
        user: user_row(state, user).await?,
        email_verified,
        manageable,
        // A patient account keeps its role; nobody else is given it.
        roles: store::roles(state.db())
            .await?
            .into_iter()
            .map(|r| r.name)
            .filter(|n| (n == crate::identity::roles::PATIENT_ROLE) == is_patient)
            .collect(),
        sessions,
        tokens,
        passkeys: super::passkeys::rows(state, id).await?,
        logins,
        errors: Vec::new(),
    })
}

pub async fn user(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Path(id): Path<String>,
    Query(q): Query<NoticeQuery>,
) -> Response {
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("user");
        a.resource_id = Some(id.clone());
    });
    match user_page(&state, &u, &id, notice(q.ok.as_deref())).await {
        Ok(p) => render(&p),
        Err(e) => e.into_response(),
    }
}

/// Renders the user page with the message of a refused or invalid change (422), or the
/// error as the API would answer it.
pub(crate) async fn user_page_error(
    state: &AppState,
    u: &WebUser,
    id: &str,
    e: IdentityError,
) -> Response {
    match e {
        IdentityError::Invalid(..)
        | IdentityError::Conflict(_)
        | IdentityError::Policy(_)
        | IdentityError::Forbidden(_) => match user_page(state, u, id, None).await {
            Ok(mut p) => {
                p.errors = vec![describe(&e)];
                render_status(StatusCode::UNPROCESSABLE_ENTITY, &p)
            }
            Err(e) => e.into_response(),
        },
        e => ApiError::from(e).into_response(),
    }
}

/// The user-administration actions, one route each.
#[derive(Clone, Copy)]
pub enum UserAction {
    Role,
    Active,
    Unlock,
    Password,
    EndSessions,
    Email,
    TotpReset,
}

pub async fn user_action(
    state: AppState,
    audit: Audit,
    id: String,
    form: WebForm,
    action: UserAction,
) -> Response {
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.resource_id = Some(id.clone());
    });
    let identity = state.identity();
    let by = Grantor::user(&u.principal);
    let f = &form.fields;
    let result: Result<&'static str, IdentityError> = match action {
        UserAction::Role => {
            let role = f.text("role");
            audit.context("role", ContextValue::id(&role));
            identity
                .update_user(by, &id, Some(&role), None, None)
                .await
                .map(|_| "saved")
        }
        UserAction::Active => {
            let active = f.text("active") == "true";
            audit.context("active", ContextValue::Bool(active));
            identity
                .update_user(by, &id, None, None, Some(active))
                .await
                .map(|_| "saved")
        }
        UserAction::Unlock => {
            audit.context("change", ContextValue::Code("unlock"));
            identity.unlock(by, &id).await.map(|()| "unlocked")
        }
        UserAction::Password => {
            audit.context("change", ContextValue::Code("password_reset"));
            // Checked by default on the form (see `user_create`).
            let must_change = f.get("must_change_password").is_some();
            audit.context("must_change_password", ContextValue::Bool(must_change));
            let new = Secret::new(f.get("new_password").unwrap_or("").to_owned());
            identity
                .admin_reset_password(by, &id, &new, must_change)
                .await
                .map(|()| "password-set")
        }
        UserAction::EndSessions => {
            audit.context("change", ContextValue::Code("end_credentials"));
            identity
                .end_credentials(by, &id)
                .await
                .map(|_| "sessions-ended")
        }
        UserAction::Email => {
            // The same change as `PATCH /api/v1/users/{id}` with `email`: links sent to
            // the old address die, the new one must be verified, and a verified old
            // address is told.
            audit.context("email_changed", ContextValue::Bool(true));
            let email = f.text("email");
            let before = match identity.user(&id).await {
                Ok(b) => b,
                Err(e) => return ApiError::from(e).into_response(),
            };
            let new = Some(email.as_str()).filter(|e| !e.is_empty());
            match identity.update_user(by, &id, None, Some(new), None).await {
                Ok(after) => {
                    if after.email != before.email
                        && let Err(e) = state.accounts().notify_email_changed(&before).await
                    {
                        return ApiError::from(e).into_response();
                    }
                    Ok("email-saved")
                }
                Err(e) => Err(e),
            }
        }
        UserAction::TotpReset => {
            audit.context("change", ContextValue::Code("totp_reset"));
            match identity.reset_totp(by, &id).await {
                Ok(before) => match state.accounts().notify_totp_reset(&before).await {
                    Ok(notified) => {
                        audit.context("notified", ContextValue::Bool(notified));
                        Ok(if notified {
                            "totp-reset-mailed"
                        } else {
                            "totp-reset"
                        })
                    }
                    Err(e) => return ApiError::from(e).into_response(),
                },
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(code) => super::sessions::back(f, &id, code),
        Err(e) => user_page_error(&state, u, &id, e).await,
    }
}

// ---- roles -----------------------------------------------------------------------------

struct RoleRow {
    name: String,
    builtin: bool,
    permissions: Vec<String>,
}

#[derive(Template)]
#[template(path = "roles.html")]
struct RolesPage {
    layout: Layout,
    roles: Vec<RoleRow>,
    permissions: Vec<String>,
    /// Each permission and what it allows.
    descriptions: Vec<(&'static str, &'static str)>,
    errors: Vec<String>,
}

async fn roles_page(
    state: &AppState,
    u: &WebUser,
    notice: Option<String>,
    errors: Vec<String>,
) -> Result<RolesPage, ApiError> {
    Ok(RolesPage {
        layout: Layout::of(state, u, notice),
        roles: store::roles(state.db())
            .await?
            .into_iter()
            .map(|r| RoleRow {
                name: r.name,
                builtin: r.builtin,
                permissions: r.permissions,
            })
            .collect(),
        permissions: Permission::ALL
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        descriptions: Permission::ALL
            .iter()
            .map(|p| (p.as_str(), p.description()))
            .collect(),
        errors,
    })
}

pub async fn roles_list(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(q): Query<NoticeQuery>,
) -> Response {
    if let Some(r) = u.refuse(Permission::RolesManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("role");
    });
    match roles_page(&state, &u, notice(q.ok.as_deref()), Vec::new()).await {
        Ok(p) => render(&p),
        Err(e) => e.into_response(),
    }
}

async fn role_result(
    state: &AppState,
    u: &WebUser,
    r: Result<&'static str, IdentityError>,
) -> Response {
    match r {
        Ok(code) => Redirect::to(&format!("/admin/roles?ok={code}")).into_response(),
        Err(
            e @ (IdentityError::Invalid(..)
            | IdentityError::Conflict(_)
            | IdentityError::NotFound
            | IdentityError::Forbidden(_)),
        ) => match roles_page(state, u, None, vec![describe(&e)]).await {
            Ok(p) => render_status(StatusCode::UNPROCESSABLE_ENTITY, &p),
            Err(e) => e.into_response(),
        },
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn role_create(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::RolesManage) {
        return r;
    }
    let name = form.fields.text("name");
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("role");
        a.resource_id = Some(name.chars().take(64).collect());
    });
    let r = roles::create(
        state.db(),
        Grantor::user(&u.principal),
        &name,
        &[],
        &state.identity().now_timestamp(),
    )
    .await
    .map(|()| "created");
    role_result(&state, u, r).await
}

pub async fn role_save(
    State(state): State<AppState>,
    audit: Audit,
    Path(name): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::RolesManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("role");
        a.resource_id = Some(name.chars().take(64).collect());
    });
    let r = match roles::parse_permissions(&form.fields.all("permission")) {
        Ok(perms) => {
            audit.context("permissions", ContextValue::Int(perms.len() as i64));
            roles::update(state.db(), Grantor::user(&u.principal), &name, &perms)
                .await
                .map(|()| "saved")
        }
        Err(unknown) => Err(IdentityError::Invalid(
            "permission",
            if unknown.is_empty() {
                "is unknown"
            } else {
                "is not a known permission"
            },
        )),
    };
    role_result(&state, u, r).await
}

pub async fn role_delete(
    State(state): State<AppState>,
    audit: Audit,
    Path(name): Path<String>,
    form: WebForm,
) -> Response {
    let u = &form.user;
    if let Some(r) = u.refuse(Permission::RolesManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Delete);
        a.resource_type = Some("role");
        a.resource_id = Some(name.chars().take(64).collect());
    });
    let r = roles::delete(state.db(), Grantor::user(&u.principal), &name)
        .await
        .map(|()| "deleted");
    role_result(&state, u, r).await
}

// ---- audit -----------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct AuditFilter {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    patient_id: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    cursor: Option<String>,
}

/// An id as the audit page shows it: the first characters, the whole in a tooltip and
/// in the filter it links to.
struct ShortId {
    full: String,
    short: String,
}

impl ShortId {
    fn of(id: Option<String>) -> Option<Self> {
        let full = id.filter(|i| !i.is_empty())?;
        let short = if full.chars().count() > 10 {
            format!("{}…", full.chars().take(8).collect::<String>())
        } else {
            full.clone()
        };
        Some(Self { full, short })
    }
}

struct EventRow {
    seq: i64,
    at: String,
    actor: String,
    actor_id: Option<ShortId>,
    action: String,
    resource_type: String,
    /// The username, for a user resource (or a session or token of a user): never a
    /// patient's name (an auditor holds no PHI permission).
    resource_name: String,
    resource_id: Option<ShortId>,
    patient_id: Option<ShortId>,
    method: String,
    path: String,
    status: String,
    outcome: String,
    ip: String,
    break_glass: bool,
}

impl EventRow {
    /// The user an event is about: a user resource, or the owner named in its context
    /// (a session or token ended by an administrator).
    fn user_of(e: &AuditEvent) -> Option<String> {
        if e.resource_type.as_deref() == Some("user") {
            return e.resource_id.clone();
        }
        serde_json::from_str::<serde_json::Value>(&e.context)
            .ok()?
            .get("user_id")?
            .as_str()
            .map(str::to_owned)
    }

    fn new(e: AuditEvent, names: &std::collections::HashMap<String, String>) -> Self {
        let resource_name = Self::user_of(&e)
            .and_then(|id| names.get(&id).cloned())
            .unwrap_or_default();
        Self {
            seq: e.seq,
            at: display_time(&e.at),
            actor: e.actor.unwrap_or_default(),
            actor_id: ShortId::of(e.actor_id),
            action: e.action,
            resource_type: e.resource_type.unwrap_or_default(),
            resource_name,
            resource_id: ShortId::of(e.resource_id),
            patient_id: ShortId::of(e.patient_id),
            method: e.method.unwrap_or_default(),
            path: e.path.unwrap_or_default(),
            status: e.status.map(|s| s.to_string()).unwrap_or_default(),
            outcome: e.outcome,
            ip: e.ip.unwrap_or_default(),
            break_glass: e.break_glass,
        }
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    layout: Layout,
    f: AuditFilter,
    actions: Vec<String>,
    outcomes: Vec<String>,
    events: Vec<EventRow>,
    next_cursor: Option<String>,
    query: String,
    errors: Vec<String>,
}

fn audit_filter(f: &AuditFilter) -> (crate::audit::store::Filter, Vec<String>) {
    let mut errors = Vec::new();
    let mut out = crate::audit::store::Filter::default();
    let opt = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    out.actor = opt(&f.actor);
    out.patient_id = opt(&f.patient_id);
    if let Some(a) = opt(&f.action) {
        match Action::parse(&a) {
            Some(a) => out.action = Some(a.as_str().to_owned()),
            None => errors.push("Action: not an audit action.".to_owned()),
        }
    }
    if let Some(o) = opt(&f.outcome) {
        match crate::audit::Outcome::parse(&o) {
            Some(o) => out.outcome = Some(o.as_str().to_owned()),
            None => errors.push("Outcome: success, failure, denied or error.".to_owned()),
        }
    }
    if let Some(s) = opt(&f.status) {
        match s.parse::<i64>() {
            Ok(n) if (100..=599).contains(&n) => out.status = Some(n),
            _ => errors.push("Status: an HTTP status such as 403.".to_owned()),
        }
    }
    for (label, raw, slot) in [
        ("Since", &f.since, &mut out.since),
        ("Until", &f.until, &mut out.until),
    ] {
        if let Some(v) = opt(raw) {
            match crate::clock::parse_rfc3339(&v) {
                Some(t) => *slot = Some(t),
                None => errors.push(format!(
                    "{label}: use an RFC 3339 time such as 2026-01-31T00:00:00Z."
                )),
            }
        }
    }
    if let Some(c) = &f.cursor {
        out.before_seq = crate::audit::service::decode_cursor(c);
    }
    (out, errors)
}

fn filter_query(f: &AuditFilter) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("actor", &f.actor)
        .append_pair("patient_id", &f.patient_id)
        .append_pair("action", &f.action)
        .append_pair("outcome", &f.outcome)
        .append_pair("status", &f.status)
        .append_pair("since", &f.since)
        .append_pair("until", &f.until)
        .finish()
}

pub async fn audit_log(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(f): Query<AuditFilter>,
) -> Response {
    if let Some(r) = u.refuse(Permission::AuditRead) {
        return r;
    }
    let (filter, errors) = audit_filter(&f);
    let page = if errors.is_empty() {
        match state.audit().page(&filter, 100).await {
            Ok(p) => p,
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        crate::audit::service::Page {
            items: Vec::new(),
            next_cursor: None,
        }
    };
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("audit_log");
        a.context
            .insert("count", ContextValue::Int(page.items.len() as i64));
    });
    // Usernames beside the ids of the users the events are about (from the users
    // table: nothing of a patient).
    let mut ids: Vec<String> = page.items.iter().filter_map(EventRow::user_of).collect();
    ids.sort();
    ids.dedup();
    let names = match store::usernames(state.db(), &ids).await {
        Ok(n) => n,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let p = AuditPage {
        layout: Layout::of(&state, &u, None),
        query: filter_query(&f),
        actions: Action::ALL.iter().map(|a| a.as_str().to_owned()).collect(),
        outcomes: crate::audit::Outcome::ALL
            .iter()
            .map(|o| o.as_str().to_owned())
            .collect(),
        events: page
            .items
            .into_iter()
            .map(|e| EventRow::new(e, &names))
            .collect(),
        next_cursor: page.next_cursor,
        errors,
        f,
    };
    render(&p)
}

/// The security-event filters of the page (and of its CSV export), as typed.
#[derive(Deserialize, Default)]
pub struct SecurityFilter {
    #[serde(default)]
    rule: String,
    #[serde(default)]
    severity: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    cursor: Option<String>,
}

fn security_filter(f: &SecurityFilter) -> (crate::security::Filter, Vec<String>) {
    let mut errors = Vec::new();
    let mut out = crate::security::Filter::default();
    let opt = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    if let Some(r) = opt(&f.rule) {
        match crate::security::Rule::ALL.iter().find(|x| x.as_str() == r) {
            Some(x) => out.rule = Some(x.as_str().to_owned()),
            None => errors.push("Rule: not a rule.".to_owned()),
        }
    }
    if let Some(v) = opt(&f.severity) {
        match crate::security::SEVERITIES.iter().find(|x| **x == v) {
            Some(x) => out.severity = Some((*x).to_owned()),
            None => errors.push("Severity: warning, high or critical.".to_owned()),
        }
    }
    out.subject = opt(&f.subject).map(|s| s.chars().take(200).collect());
    for (label, raw, slot) in [
        ("Since", &f.since, &mut out.since),
        ("Until", &f.until, &mut out.until),
    ] {
        if let Some(v) = opt(raw) {
            match crate::clock::parse_rfc3339(&v) {
                Some(t) => *slot = Some(t),
                None => errors.push(format!(
                    "{label}: use an RFC 3339 time such as 2026-01-31T00:00:00Z."
                )),
            }
        }
    }
    if let Some(c) = &f.cursor {
        out.before = crate::security::decode_cursor(c);
    }
    (out, errors)
}

fn security_query(f: &SecurityFilter) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("rule", &f.rule)
        .append_pair("severity", &f.severity)
        .append_pair("subject", &f.subject)
        .append_pair("since", &f.since)
        .append_pair("until", &f.until)
        .finish()
}

#[derive(Template)]
#[template(path = "security.html")]
struct SecurityEventsPage {
    layout: Layout,
    f: SecurityFilter,
    rules: Vec<String>,
    severities: Vec<String>,
    events: Vec<crate::security::SecurityEvent>,
    next_cursor: Option<String>,
    query: String,
    errors: Vec<String>,
}

/// Security events, newest first, filtered by rule, severity, subject and time (needs
/// `audit:read`; the read is audited).
pub async fn security_events(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(f): Query<SecurityFilter>,
) -> Response {
    if let Some(r) = u.refuse(Permission::AuditRead) {
        return r;
    }
    let (filter, errors) = security_filter(&f);
    let page = if errors.is_empty() {
        match state.security().search(&filter, 100).await {
            Ok(p) => p,
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        crate::security::SecurityPage {
            items: Vec::new(),
            next_cursor: None,
        }
    };
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("security_events");
        a.context
            .insert("count", ContextValue::Int(page.items.len() as i64));
    });
    render(&SecurityEventsPage {
        layout: Layout::of(&state, &u, None),
        query: security_query(&f),
        rules: crate::security::Rule::ALL
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect(),
        severities: crate::security::SEVERITIES
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        events: page
            .items
            .into_iter()
            .map(|mut e| {
                e.at = display_time(&e.at);
                e
            })
            .collect(),
        next_cursor: page.next_cursor,
        errors,
        f,
    })
}

/// The filtered security events as CSV, newest first, every page (audited as an
/// export).
pub async fn security_csv(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(f): Query<SecurityFilter>,
) -> Response {
    if let Some(r) = u.refuse(Permission::AuditRead) {
        return r;
    }
    let (mut filter, errors) = security_filter(&f);
    if !errors.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, errors.join(" ")).into_response();
    }
    let mut out = crate::security::CSV_COLUMNS.join(",");
    out.push('\n');
    let mut n: i64 = 0;
    loop {
        let page = match state.security().search(&filter, 500).await {
            Ok(p) => p,
            Err(e) => return ApiError::from(e).into_response(),
        };
        for e in &page.items {
            out.push_str(&crate::security::csv_line(e));
            out.push('\n');
            n += 1;
        }
        match page
            .next_cursor
            .as_deref()
            .and_then(crate::security::decode_cursor)
        {
            Some(next) => filter.before = Some(next),
            None => break,
        }
    }
    audit.annotate(|a| {
        a.action = Some(Action::Export);
        a.resource_type = Some("security_events");
        a.context.insert("count", ContextValue::Int(n));
        a.context.insert("format", ContextValue::Code("csv"));
    });
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"security-events.csv\"",
            ),
        ],
        out,
    )
        .into_response()
}

/// The filtered audit log as CSV (audited as an export).
pub async fn audit_csv(
    State(state): State<AppState>,
    audit: Audit,
    u: WebUser,
    Query(f): Query<AuditFilter>,
) -> Response {
    if let Some(r) = u.refuse(Permission::AuditRead) {
        return r;
    }
    let (filter, errors) = audit_filter(&f);
    if !errors.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, errors.join(" ")).into_response();
    }
    let mut out = Vec::new();
    let fmt = crate::audit::export::Format::Csv;
    if crate::audit::export::write_header(&mut out, fmt).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let n = match state
        .audit()
        .export(&filter, |e| {
            crate::audit::export::write_event(&mut out, fmt, e)
        })
        .await
    {
        Ok(n) => n,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    audit.annotate(|a| {
        a.action = Some(Action::Export);
        a.resource_type = Some("audit_log");
        a.context.insert(
            "count",
            ContextValue::Int(i64::try_from(n).unwrap_or(i64::MAX)),
        );
        a.context.insert("format", ContextValue::Code("csv"));
    });
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit.csv\"",
            ),
        ],
        out,
    )
        .into_response()
}
