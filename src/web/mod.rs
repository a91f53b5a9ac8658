//! The admin web pages: server-rendered (askama templates in `templates/`, escaped by
//! default), the project's own CSS and script in `assets/` served from the binary, no
//! inline script or style, so the strict content-security policy holds.

pub mod clinic;
pub mod pages;
pub mod passkeys;
pub mod portal;
pub mod requests;
pub mod session;
pub mod sessions;

use crate::http::path::Path;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::app::AppState;
use crate::audit::Audit;
use pages::UserAction;
use session::WebForm;

const APP_CSS: &str = include_str!("../../assets/app.css");
const APP_JS: &str = include_str!("../../assets/app.js");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::start))
        .route("/my", get(portal::home))
        .route("/my/record.json", get(portal::download))
        .route("/my/record/print", get(portal::print))
        .route("/my/disclosures", get(portal::disclosures))
        .route(
            "/my/restrictions",
            get(requests::my_restrictions).post(requests::restrict),
        )
        .route("/my/restrictions/{id}/end", post(requests::unrestrict))
        .route(
            "/my/amendments",
            get(requests::my_amendments).post(requests::request),
        )
        .route("/my/amendments/{id}/statement", post(requests::statement))
        .route("/amendments", get(requests::review_list))
        .route("/amendments/{id}", get(requests::review))
        .route("/amendments/{id}/decide", post(requests::decide))
        .route("/admin/privacy", get(requests::report))
        .route("/patients", get(clinic::list))
        .route("/patients/{id}", get(clinic::chart))
        .route("/patients/{id}/ssn", post(clinic::reveal_ssn))
        .route("/patients/{id}/breakglass", post(clinic::break_glass_start))
        .route(
            "/patients/{id}/breakglass/end",
            post(clinic::break_glass_end),
        )
        .route("/patients/{id}/records", post(clinic::add_record))
        .route("/patients/{id}/records/{rid}", post(clinic::save_record))
        .route(
            "/patients/{id}/records/{rid}/edit",
            get(clinic::edit_record),
        )
        .route("/login", get(pages::login_form).post(pages::login_submit))
        .route("/login/password", post(pages::login_password))
        .route("/login/passkey", post(passkeys::sign_in))
        .route("/admin/passkeys", post(passkeys::add))
        .route("/admin/passkeys/challenge", post(passkeys::challenge))
        .route("/admin/passkeys/{id}/remove", post(passkeys::remove))
        .route("/logout", post(pages::logout))
        .route("/admin", get(pages::home))
        .route("/admin/keepalive", post(pages::keepalive))
        .route("/admin/totp/enroll", post(pages::totp_enroll))
        .route("/admin/totp/confirm", post(pages::totp_confirm))
        .route("/admin/totp/disable", post(pages::totp_disable))
        .route("/admin/password", post(pages::password_change))
        .route("/admin/tokens", post(pages::token_create))
        .route("/admin/tokens/revoke-all", post(pages::tokens_revoke_all))
        .route("/admin/tokens/{id}/rotate", post(pages::token_rotate))
        .route("/admin/tokens/{id}/revoke", post(pages::token_revoke))
        .route("/admin/sessions/end-all", post(pages::end_my_sessions))
        .route("/admin/users", get(pages::users).post(pages::user_create))
        .route("/admin/users/{id}", get(pages::user))
        .route(
            "/admin/users/{id}/role",
            post(user_action_route(UserAction::Role)),
        )
        .route(
            "/admin/users/{id}/active",
            post(user_action_route(UserAction::Active)),
        )
        .route(
            "/admin/users/{id}/unlock",
            post(user_action_route(UserAction::Unlock)),
        )
        .route(
            "/admin/users/{id}/password",
            post(user_action_route(UserAction::Password)),
        )
        .route(
            "/admin/users/{id}/sessions/end",
            post(user_action_route(UserAction::EndSessions)),
        )
        // Issue 22, admin console: every user's sessions and tokens, email, TOTP reset.
        .route("/admin/sessions", get(sessions::sessions))
        .route("/admin/sessions/{id}/end", post(sessions::end_session))
        .route(
            "/admin/users/{id}/tokens/{token_id}/revoke",
            post(sessions::revoke_token),
        )
        .route(
            "/admin/users/{id}/email",
            post(user_action_route(UserAction::Email)),
        )
        .route(
            "/admin/users/{id}/totp/reset",
            post(user_action_route(UserAction::TotpReset)),
        )
        .route("/admin/security.csv", get(pages::security_csv))
        .route(
            "/admin/roles",
            get(pages::roles_list).post(pages::role_create),
        )
        .route("/admin/roles/{name}", post(pages::role_save))
        .route("/admin/roles/{name}/delete", post(pages::role_delete))
        .route("/admin/audit", get(pages::audit_log))
        .route("/admin/security", get(pages::security_events))
        .route("/admin/audit.csv", get(pages::audit_csv))
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
}

#[allow(clippy::type_complexity)]
fn user_action_route(
    action: UserAction,
) -> impl Fn(
    State<AppState>,
    Audit,
    Path<String>,
    WebForm,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(state), audit, Path(id), form| {
        Box::pin(pages::user_action(state, audit, id, form, action))
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
