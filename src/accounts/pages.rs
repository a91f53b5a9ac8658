//! The pages behind the links in mails (accept an invitation, reset a password, verify an
//! address), the "forgot your password" form, and the administrators' invitations page.
//!
//! Anonymous forms carry the double-submit CSRF cookie of the sign-in page. A link's
//! GET only shows a form: nothing is spent until the form is posted, so a mail scanner
//! that opens links does not use them up.

use crate::http::path::Path;
use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::AccountsError;
use crate::access::Permission;
use crate::app::AppState;
use crate::audit::{Action, Actor, Audit, ContextValue};
use crate::config::Secret;
use crate::identity::IdentityError;
use crate::identity::service::describe;
use crate::web::pages::{Layout, render, render_status};
use crate::web::session::{
    LoginForm, WebForm, WebUser, login_cookie_name, new_login_csrf, set_cookie,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login/forgot", get(forgot_form).post(forgot_submit))
        .route(
            "/accounts/invite/{token}",
            get(invite_form).post(invite_submit),
        )
        .route(
            "/accounts/reset/{token}",
            get(reset_form).post(reset_submit),
        )
        .route(
            "/accounts/verify/{token}",
            get(verify_form).post(verify_submit),
        )
        .route("/admin/invitations", get(invitations).post(invite))
        .route("/admin/invitations/{id}/revoke", post(revoke))
        .route("/admin/invitations/{id}/resend", post(resend))
}

struct Field {
    label: &'static str,
    name: &'static str,
    kind: &'static str,
    value: String,
    autocomplete: &'static str,
    required: bool,
}

fn field(
    label: &'static str,
    name: &'static str,
    kind: &'static str,
    autocomplete: &'static str,
) -> Field {
    Field {
        label,
        name,
        kind,
        value: String::new(),
        autocomplete,
        required: true,
    }
}

#[derive(Template)]
#[template(path = "account_form.html")]
struct FormPage {
    layout: Layout,
    heading: &'static str,
    intro: Vec<String>,
    error: Option<String>,
    violations: Vec<&'static str>,
    show_form: bool,
    action: String,
    csrf: String,
    fields: Vec<Field>,
    submit: &'static str,
}

impl FormPage {
    fn new(
        heading: &'static str,
        action: String,
        submit: &'static str,
        fields: Vec<Field>,
    ) -> Self {
        Self {
            layout: Layout::anonymous(None),
            heading,
            intro: Vec::new(),
            error: None,
            violations: Vec::new(),
            show_form: true,
            action,
            csrf: String::new(),
            fields,
            submit,
        }
    }

    /// Renders with a fresh double-submit CSRF value (cookie and field).
    fn respond(mut self, status: axum::http::StatusCode, state: &AppState) -> Response {
        let csrf = new_login_csrf();
        self.csrf.clone_from(&csrf);
        let mut r = render_status(status, &self);
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(
                state.config(),
                login_cookie_name(state.config()),
                Some(&csrf),
            ),
        );
        r
    }

    fn done(mut self, heading: &'static str, text: String, state: &AppState) -> Response {
        self.heading = heading;
        self.intro = vec![text];
        self.show_form = false;
        self.respond(axum::http::StatusCode::OK, state)
    }

    /// The page again with `e` said (the form stays unless the link is gone).
    fn error(mut self, e: crate::http::ApiError, state: &AppState) -> Response {
        let status = e.code().status();
        if status == axum::http::StatusCode::BAD_REQUEST {
            self.show_form = false;
        }
        self.error = Some(e.detail_text());
        self.respond(status, state)
    }

    fn invalid_link(mut self, state: &AppState) -> Response {
        self.show_form = false;
        self.error = Some(
            "This link is unknown, expired or already used. Ask for a new one (or ask your administrator)."
                .into(),
        );
        self.respond(axum::http::StatusCode::BAD_REQUEST, state)
    }
}

fn ok(state: &AppState, page: FormPage) -> Response {
    page.respond(axum::http::StatusCode::OK, state)
}

/// Puts an account error on the page, or answers it as an API error (500s).
fn failed(mut page: FormPage, e: AccountsError, state: &AppState) -> Response {
    match e {
        AccountsError::InvalidLink => page.invalid_link(state),
        AccountsError::Identity(IdentityError::Policy(v)) => {
            page.error = Some("The password does not meet the policy:".into());
            page.violations = v;
            page.respond(axum::http::StatusCode::UNPROCESSABLE_ENTITY, state)
        }
        AccountsError::Identity(
            ie @ (IdentityError::Invalid(..)
            | IdentityError::Conflict(_)
            | IdentityError::MfaRequired
            | IdentityError::InvalidTotp
            | IdentityError::Busy),
        ) => {
            page.error = Some(describe(&ie));
            page.respond(axum::http::StatusCode::UNPROCESSABLE_ENTITY, state)
        }
        AccountsError::MailUnavailable | AccountsError::Disabled | AccountsError::Refused(_) => {
            page.show_form = false;
            page.error = Some(e.to_string());
            page.respond(axum::http::StatusCode::SERVICE_UNAVAILABLE, state)
        }
        other => crate::http::ApiError::from(other).into_response(),
    }
}

// ---- forgot ------------------------------------------------------------------------------------

fn forgot_page() -> FormPage {
    let mut p = FormPage::new(
        "Reset your password",
        "/login/forgot".into(),
        "Send the link",
        vec![field(
            "Username or email",
            "username_or_email",
            "text",
            "username",
        )],
    );
    p.intro = vec!["Enter your username or email address. If they match an account with a verified email address, a link to choose a new password is sent there.".into()];
    p
}

pub async fn forgot_form(State(state): State<AppState>, audit: Audit) -> Response {
    audit.annotate(|a| a.resource_type = Some("page"));
    ok(&state, forgot_page())
}

pub async fn forgot_submit(
    State(state): State<AppState>,
    audit: Audit,
    LoginForm { fields }: LoginForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Access);
        a.resource_type = Some("password_reset");
    });
    let who = fields.text("username_or_email");
    if !who.is_empty() && who.chars().count() <= 254 {
        state.accounts().request_reset(&who);
    }
    forgot_page().done(
        "Check your mail",
        "If the username or address matches an account with a verified email address, a link to choose a new password was sent there. It works once, for a short time.".into(),
        &state,
    )
}

// ---- invitation -------------------------------------------------------------------------------

/// A patient invitation asks for the birth date on the record.
fn birth_date_field() -> Field {
    field("Your birth date", "birth_date", "date", "bday")
}

fn invite_page(token: &str) -> FormPage {
    FormPage::new(
        "Create your account",
        format!("/accounts/invite/{token}"),
        "Create the account",
        vec![
            field("Username", "username", "text", "username"),
            field("Password", "password", "password", "new-password"),
        ],
    )
}

pub async fn invite_form(
    State(state): State<AppState>,
    audit: Audit,
    Path(token): Path<String>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("invitation"));
    let mut page = invite_page(&token);
    match state.accounts().invitation(&token).await {
        Ok(inv) if inv.patient_id.is_some() => {
            page.intro = vec![format!(
                "You were invited as {} to your patient account. Give your birth date as your clinic recorded it, then choose a username and a password.",
                inv.email
            )];
            page.fields.push(birth_date_field());
            ok(&state, page)
        }
        Ok(inv) => {
            page.intro = vec![format!(
                "You were invited as {} with the role \"{}\". Choose a username and a password.",
                inv.email, inv.role
            )];
            ok(&state, page)
        }
        Err(e) => failed(page, e, &state),
    }
}

pub async fn invite_submit(
    State(state): State<AppState>,
    audit: Audit,
    Path(token): Path<String>,
    LoginForm { fields }: LoginForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("user");
        a.context.insert("via", ContextValue::Code("invitation"));
    });
    let mut page = invite_page(&token);
    let username = fields.text("username");
    if let Some(f) = page.fields.first_mut() {
        f.value = username.chars().take(64).collect();
    }
    let pw = Secret::new(
        fields
            .get("password")
            .unwrap_or("")
            .chars()
            .take(1025)
            .collect(),
    );
    let birth = fields.text("birth_date");
    if !birth.is_empty() {
        page.fields.push(birth_date_field());
    }
    if let Err(e) = crate::portal::check_patient_invitation(
        &state,
        &token,
        Some(birth.as_str()).filter(|b| !b.is_empty()),
    )
    .await
    {
        return page.error(e, &state);
    }
    match state
        .accounts()
        .accept_invitation(&token, &username, &pw)
        .await
    {
        Ok(user) => {
            audit.set_actor(Actor::user(&user.id, &user.username));
            audit.annotate(|a| a.resource_id = Some(user.id.clone()));
            let mfa = state.identity().settings().mfa_required;
            page.done(
                "Your account is ready",
                if mfa {
                    format!(
                        "Sign in as {}; you will set up two-factor authentication first.",
                        user.username
                    )
                } else {
                    format!("Sign in as {}.", user.username)
                },
                &state,
            )
        }
        Err(e) => failed(page, e, &state),
    }
}

// ---- reset ----------------------------------------------------------------------------------

fn reset_page(token: &str, totp: bool) -> FormPage {
    let mut fields = vec![field(
        "New password",
        "new_password",
        "password",
        "new-password",
    )];
    if totp {
        fields.push(field(
            "Authentication code (or a recovery code)",
            "totp_code",
            "text",
            "one-time-code",
        ));
    }
    fields.push(Field {
        label: "Also revoke every API token of the account (do this if someone else may know one)",
        name: "revoke_api_tokens",
        kind: "checkbox",
        value: "revoke".into(),
        autocomplete: "off",
        required: false,
    });
    FormPage::new(
        "Choose a new password",
        format!("/accounts/reset/{token}"),
        "Set the password",
        fields,
    )
}

pub async fn reset_form(
    State(state): State<AppState>,
    audit: Audit,
    Path(token): Path<String>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("password_reset"));
    match state.accounts().reset_target(&token).await {
        Ok((user, totp)) => {
            let mut page = reset_page(&token, totp);
            page.intro = vec![format!(
                "For the account {}. Every session of the account ends when the password is set.",
                user.username
            )];
            ok(&state, page)
        }
        Err(e) => failed(reset_page(&token, false), e, &state),
    }
}

pub async fn reset_submit(
    State(state): State<AppState>,
    audit: Audit,
    ip: crate::http::client_ip::ClientIp,
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
    LoginForm { fields }: LoginForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("user");
        a.context
            .insert("change", ContextValue::Code("password_reset"));
    });
    let totp = state
        .accounts()
        .reset_target(&token)
        .await
        .map(|(_, t)| t)
        .unwrap_or(false);
    let page = reset_page(&token, totp);
    let pw = Secret::new(
        fields
            .get("new_password")
            .unwrap_or("")
            .chars()
            .take(1025)
            .collect(),
    );
    let code = fields.text("totp_code");
    match state
        .accounts()
        .confirm_reset(
            &token,
            &pw,
            Some(code.as_str()).filter(|c| !c.is_empty()),
            fields.get("revoke_api_tokens") == Some("revoke"),
            &crate::identity::routes::origin(ip, &headers),
        )
        .await
    {
        Ok(user) => {
            audit.set_actor(Actor::user(&user.id, &user.username));
            audit.annotate(|a| a.resource_id = Some(user.id.clone()));
            page.done(
                "Your password is set",
                "Sign in with the new password. Every other session of the account has ended."
                    .into(),
                &state,
            )
        }
        Err(e) => failed(page, e, &state),
    }
}

// ---- verify -----------------------------------------------------------------------------------

fn verify_page(token: &str) -> FormPage {
    let mut p = FormPage::new(
        "Confirm your email address",
        format!("/accounts/verify/{token}"),
        "Confirm",
        Vec::new(),
    );
    p.intro = vec!["Confirm that this address belongs to your Custodian account.".into()];
    p
}

pub async fn verify_form(
    State(state): State<AppState>,
    audit: Audit,
    Path(token): Path<String>,
) -> Response {
    audit.annotate(|a| a.resource_type = Some("email_verification"));
    ok(&state, verify_page(&token))
}

pub async fn verify_submit(
    State(state): State<AppState>,
    audit: Audit,
    Path(token): Path<String>,
    LoginForm { fields: _ }: LoginForm,
) -> Response {
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("email_verification");
    });
    match state.accounts().verify_email(&token).await {
        Ok(user) => {
            audit.set_actor(Actor::user(&user.id, &user.username));
            audit.annotate(|a| a.resource_id = Some(user.id.clone()));
            verify_page(&token).done(
                "Your email address is confirmed",
                "Thank you. You can close this page.".into(),
                &state,
            )
        }
        Err(e) => failed(verify_page(&token), e, &state),
    }
}

// ---- invitations (administrators) -----------------------------------------------------------

#[derive(Template)]
#[template(path = "invitations.html")]
struct InvitationsPage {
    layout: Layout,
    invitations: Vec<super::Invitation>,
    roles: Vec<String>,
    errors: Vec<String>,
    ttl: String,
    mfa: bool,
}

async fn invitations_page(
    state: &AppState,
    u: &WebUser,
    errors: Vec<String>,
    notice: Option<String>,
) -> Response {
    let invitations = match state.accounts().invitations().await {
        Ok(i) => i,
        Err(e) => return crate::http::ApiError::from(e).into_response(),
    };
    let roles = match crate::identity::store::roles(state.db()).await {
        // Patients are invited from their record, not here.
        Ok(r) => r
            .into_iter()
            .map(|r| r.name)
            .filter(|n| n != crate::identity::roles::PATIENT_ROLE)
            .collect(),
        Err(e) => return crate::http::ApiError::from(e).into_response(),
    };
    render(&InvitationsPage {
        layout: Layout::of(state, u, notice),
        invitations,
        roles,
        errors,
        ttl: state.accounts().config().invite_ttl.to_string(),
        mfa: state.identity().settings().mfa_required,
    })
}

pub async fn invitations(State(state): State<AppState>, audit: Audit, u: WebUser) -> Response {
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Read);
        a.resource_type = Some("invitation");
    });
    invitations_page(&state, &u, Vec::new(), None).await
}

pub async fn invite(State(state): State<AppState>, audit: Audit, form: WebForm) -> Response {
    let u = form.user;
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Create);
        a.resource_type = Some("invitation");
    });
    let email = form.fields.text("email");
    let role = form.fields.text("role");
    match state.accounts().invite(&email, &role, &u.principal).await {
        Ok(inv) => {
            audit.annotate(|a| a.resource_id = Some(inv.id.clone()));
            invitations_page(
                &state,
                &u,
                Vec::new(),
                Some(format!("Invitation sent to {}.", inv.email)),
            )
            .await
        }
        Err(AccountsError::Identity(e @ IdentityError::Invalid(..))) => {
            invitations_page(&state, &u, vec![describe(&e)], None).await
        }
        Err(e @ AccountsError::MailUnavailable) => {
            invitations_page(&state, &u, vec![e.to_string()], None).await
        }
        Err(e) => crate::http::ApiError::from(e).into_response(),
    }
}

pub async fn revoke(
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
        a.resource_type = Some("invitation");
        a.resource_id = Some(id.clone());
    });
    match state.accounts().revoke_invitation(&id).await {
        Ok(()) | Err(AccountsError::Identity(IdentityError::NotFound)) => {
            Redirect::to("/admin/invitations").into_response()
        }
        Err(e) => crate::http::ApiError::from(e).into_response(),
    }
}

pub async fn resend(
    State(state): State<AppState>,
    audit: Audit,
    Path(id): Path<String>,
    form: WebForm,
) -> Response {
    let u = form.user;
    if let Some(r) = u.refuse(Permission::UsersManage) {
        return r;
    }
    audit.annotate(|a| {
        a.action = Some(Action::Update);
        a.resource_type = Some("invitation");
        a.resource_id = Some(id.clone());
    });
    match state.accounts().resend_invitation(&id, &u.principal).await {
        Ok(inv) => {
            invitations_page(
                &state,
                &u,
                Vec::new(),
                Some(format!("Sent again to {}.", inv.email)),
            )
            .await
        }
        Err(AccountsError::Identity(IdentityError::NotFound)) => {
            Redirect::to("/admin/invitations").into_response()
        }
        Err(e) => crate::http::ApiError::from(e).into_response(),
    }
}
