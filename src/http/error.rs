//! The one HTTP error type and its one status table.
//!
//! Every failure a client sees is an RFC 9457 `application/problem+json` body built
//! here. A 500 carries the request id and nothing else of its cause; the cause travels
//! to the request-log middleware in a response extension and is logged there.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::request_id::current_request_id;

/// The stable machine codes of the contract. Each has exactly one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    ValidationError,
    Unauthorized,
    Forbidden,
    NotFound,
    Gone,
    MethodNotAllowed,
    NotAcceptable,
    Conflict,
    PreconditionFailed,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    Timeout,
    ServiceUnavailable,
    InternalError,
    InvalidCredentials,
    MfaRequired,
    InvalidTotp,
    AccountLocked,
    PasswordExpired,
    PasswordPolicy,
    MfaEnrollmentRequired,
    SessionRequired,
    ReauthenticationRequired,
    InvalidPasskey,
    /// What was asked for is withheld at the patient's request (a restriction).
    Withheld,
}

impl ErrorCode {
    /// The status table.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::ValidationError => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Gone => StatusCode::GONE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout | Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidCredentials
            | Self::MfaRequired
            | Self::InvalidTotp
            | Self::InvalidPasskey => StatusCode::UNAUTHORIZED,
            Self::Withheld => StatusCode::FORBIDDEN,
            Self::AccountLocked => StatusCode::LOCKED,
            Self::PasswordExpired
            | Self::MfaEnrollmentRequired
            | Self::SessionRequired
            | Self::ReauthenticationRequired => StatusCode::FORBIDDEN,
            Self::PasswordPolicy => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// The code as it appears in the body.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::ValidationError => "validation_error",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Gone => "gone",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotAcceptable => "not_acceptable",
            Self::Conflict => "conflict",
            Self::PreconditionFailed => "precondition_failed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::ServiceUnavailable => "service_unavailable",
            Self::InternalError => "internal_error",
            Self::InvalidCredentials => "invalid_credentials",
            Self::MfaRequired => "mfa_required",
            Self::InvalidTotp => "invalid_totp",
            Self::AccountLocked => "account_locked",
            Self::PasswordExpired => "password_expired",
            Self::PasswordPolicy => "password_policy",
            Self::MfaEnrollmentRequired => "mfa_enrollment_required",
            Self::SessionRequired => "session_required",
            Self::ReauthenticationRequired => "reauthentication_required",
            Self::InvalidPasskey => "invalid_passkey",
            Self::Withheld => "withheld",
        }
    }

    /// The default human explanation.
    const fn detail(self) -> &'static str {
        match self {
            Self::BadRequest => "The request could not be understood.",
            Self::ValidationError => "The request has invalid fields; see `errors`.",
            Self::Unauthorized => "A valid bearer token is required.",
            Self::Forbidden => "You do not have the permission this needs.",
            Self::NotFound => "There is nothing at this address.",
            Self::Gone => "This resource was deleted.",
            Self::MethodNotAllowed => "This address does not accept that method.",
            Self::NotAcceptable => "This server answers in JSON only (application/fhir+json).",
            Self::Conflict => "The request conflicts with the current state.",
            Self::PreconditionFailed => "The resource changed since you read it; read it again.",
            Self::PayloadTooLarge => "The request body is too large.",
            Self::UnsupportedMediaType => "Send the body as application/json.",
            Self::RateLimited => "Too many requests; retry after the time in Retry-After.",
            Self::Timeout => "The request took too long and was stopped; try again.",
            Self::ServiceUnavailable => "The service is temporarily unavailable; try again.",
            Self::InternalError => {
                "Something went wrong on our side. Quote the request_id when you report it."
            }
            Self::InvalidCredentials => "The username or password is wrong.",
            Self::MfaRequired => {
                "A second factor is needed: the code from your authenticator app or a recovery code (totp_code), or your passkey (answer the `passkey` challenge)."
            }
            Self::InvalidPasskey => {
                "The passkey was not accepted: the challenge is unknown, used or expired, or the answer does not verify. Start again."
            }
            Self::InvalidTotp => "The authentication code is wrong or was already used.",
            Self::AccountLocked => {
                "Too many failed sign-ins: the account is locked; retry after the time in Retry-After or ask an administrator to unlock it."
            }
            Self::PasswordExpired => {
                "The password has expired: change it with POST /api/v1/auth/password."
            }
            Self::PasswordPolicy => "The new password does not meet the policy; see `violations`.",
            Self::MfaEnrollmentRequired => {
                "A second factor is required before anything else: enrol TOTP (POST /api/v1/auth/totp/enroll, then confirm) or a passkey (POST /api/v1/auth/passkeys/register, then POST /api/v1/auth/passkeys). A role that must use a passkey (mfa.phishing_resistant_roles) needs one, and a session signed in with it."
            }
            Self::SessionRequired => {
                "This needs a signed-in session (a token from POST /api/v1/auth/login); a personal API token cannot do it."
            }
            Self::ReauthenticationRequired => {
                "Confirm it is you: send your current password (and your authentication code when TOTP is on)."
            }
            Self::Withheld => {
                "This is withheld at the patient's request. In an emergency, break-glass opens it (audited)."
            }
        }
    }
}

/// One invalid field of a 422.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Path of the field (`address.zip`, `items[2]`), or empty for the whole body.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The problem document (RFC 9457) every error answers with.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For `password_policy`: the stable names of the rules the password breaks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<&'static str>,
    /// For `mfa_required`: the second factors this account can use (`totp`,
    /// `recovery_code`, `passkey`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<&'static str>,
    /// For `mfa_required` when the account has a passkey: a WebAuthn challenge
    /// (`{"ceremony", "publicKey"}`) to answer as `passkey` in the same sign-in.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub passkey: Option<serde_json::Value>,
}

/// The error every handler, extractor and middleware returns.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    detail: Option<Cow<'static, str>>,
    errors: Vec<FieldError>,
    violations: Vec<&'static str>,
    retry_after: Option<u64>,
    /// For `mfa_required`: the methods, and a passkey challenge (boxed: rare, and an
    /// error travels through every `Result` of the server).
    second_factors: Option<Box<(Vec<&'static str>, Option<serde_json::Value>)>>,
    cause: Option<anyhow::Error>,
}

impl ApiError {
    /// What a page tells a person about this error: each field error with its field,
    /// else the detail, else the code's own sentence. Never the cause (a 500's
    /// internals stay in the log).
    pub fn detail_text(&self) -> String {
        if !self.errors.is_empty() {
            return self
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ");
        }
        match &self.detail {
            Some(d) if self.code != ErrorCode::InternalError => d.to_string(),
            _ => self.code.detail().to_owned(),
        }
    }

    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            detail: None,
            errors: Vec::new(),
            violations: Vec::new(),
            retry_after: None,
            second_factors: None,
            cause: None,
        }
    }

    /// For `mfa_required`: which second factors the account has, and a passkey
    /// challenge when it has a passkey.
    pub fn with_second_factors(
        mut self,
        methods: Vec<&'static str>,
        passkey: Option<serde_json::Value>,
    ) -> Self {
        self.second_factors = Some(Box::new((methods, passkey)));
        self
    }

    /// A detail for the client. It must never hold PHI or secrets.
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        Self {
            errors,
            ..Self::new(ErrorCode::ValidationError)
        }
    }

    /// A 422 `password_policy` listing the rules the password breaks.
    pub fn password_policy(violations: Vec<&'static str>) -> Self {
        Self {
            violations,
            ..Self::new(ErrorCode::PasswordPolicy)
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    /// An unexpected failure: logged with the request id, answered as a bare 500.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(ErrorCode::InternalError)
        }
    }

    /// The service cannot answer now (e.g. the database is down): a 503 whose cause is logged.
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(ErrorCode::ServiceUnavailable)
        }
    }

    pub const fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn field_errors(&self) -> &[FieldError] {
        &self.errors
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::unavailable(e)
        } else {
            ApiError::internal(e)
        }
    }
}

/// Marks a response that refused a request for want of a permission (403 `forbidden`,
/// or a page saying so): the audit middleware records it as `permission_denied`.
#[derive(Clone, Copy, Debug)]
pub struct PermissionRefused;

/// The logged cause of an error response, picked up by the request-log middleware.
#[derive(Clone, Debug)]
pub struct ErrorCause(pub Arc<anyhow::Error>);

pub const PROBLEM_JSON: &str = "application/problem+json";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let (methods, passkey) = self.second_factors.map(|b| *b).unwrap_or_default();
        let problem = Problem {
            type_: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self
                .detail
                .map_or_else(|| self.code.detail().to_owned(), Cow::into_owned),
            code: self.code.as_str(),
            request_id: current_request_id(),
            errors: self.errors,
            violations: self.violations,
            methods,
            passkey,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec());
        let mut res = (status, body).into_response();
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(cause) = self.cause {
            res.extensions_mut().insert(ErrorCause(Arc::new(cause)));
        }
        if self.code == ErrorCode::Forbidden {
            res.extensions_mut().insert(PermissionRefused);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The status table, checked entry by entry.
    #[test]
    fn status_table() {
        let table = [
            (ErrorCode::BadRequest, 400, "bad_request"),
            (ErrorCode::ValidationError, 422, "validation_error"),
            (ErrorCode::Unauthorized, 401, "unauthorized"),
            (ErrorCode::Forbidden, 403, "forbidden"),
            (ErrorCode::NotFound, 404, "not_found"),
            (ErrorCode::Gone, 410, "gone"),
            (ErrorCode::MethodNotAllowed, 405, "method_not_allowed"),
            (ErrorCode::NotAcceptable, 406, "not_acceptable"),
            (ErrorCode::Conflict, 409, "conflict"),
            (ErrorCode::PreconditionFailed, 412, "precondition_failed"),
            (ErrorCode::PayloadTooLarge, 413, "payload_too_large"),
            (
                ErrorCode::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (ErrorCode::RateLimited, 429, "rate_limited"),
            (ErrorCode::Timeout, 503, "timeout"),
            (ErrorCode::ServiceUnavailable, 503, "service_unavailable"),
            (ErrorCode::InternalError, 500, "internal_error"),
            (ErrorCode::InvalidCredentials, 401, "invalid_credentials"),
            (ErrorCode::MfaRequired, 401, "mfa_required"),
            (ErrorCode::InvalidTotp, 401, "invalid_totp"),
            (ErrorCode::AccountLocked, 423, "account_locked"),
            (ErrorCode::PasswordExpired, 403, "password_expired"),
            (ErrorCode::PasswordPolicy, 422, "password_policy"),
            (
                ErrorCode::MfaEnrollmentRequired,
                403,
                "mfa_enrollment_required",
            ),
            (ErrorCode::SessionRequired, 403, "session_required"),
            (
                ErrorCode::ReauthenticationRequired,
                403,
                "reauthentication_required",
            ),
        ];
        for (code, status, name) in table {
            assert_eq!(code.status().as_u16(), status, "{name}");
            assert_eq!(code.as_str(), name);
            // The serde name and the body name agree.
            assert_eq!(serde_json::to_value(code).unwrap(), name);
        }
    }

    async fn body(res: Response) -> serde_json::Value {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn unauthorized_carries_www_authenticate() {
        let res = ApiError::new(ErrorCode::Unauthorized).into_response();
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let b = body(res).await;
        assert_eq!(b["code"], "unauthorized");
        assert_eq!(b["status"], 401);
        assert_eq!(b["title"], "Unauthorized");
    }

    #[tokio::test]
    async fn internal_errors_hide_their_cause() {
        let res =
            ApiError::internal(anyhow::anyhow!("secret-canary connection string")).into_response();
        assert_eq!(res.status(), 500);
        assert!(res.extensions().get::<ErrorCause>().is_some());
        let b = body(res).await;
        assert_eq!(b["code"], "internal_error");
        assert!(!b.to_string().contains("secret-canary"));
    }

    #[tokio::test]
    async fn validation_lists_fields_and_retry_after_is_a_header() {
        let res = ApiError::field("birth_date", "must be YYYY-MM-DD").into_response();
        let b = body(res).await;
        assert_eq!(b["errors"][0]["field"], "birth_date");
        let res = ApiError::new(ErrorCode::RateLimited)
            .with_retry_after(7)
            .into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "7");
    }
}
