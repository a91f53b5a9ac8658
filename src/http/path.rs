//! Path parameters with the API's own errors.
//!
//! axum's `Path` answers a parameter it cannot decode (`/api/v1/patients/%FF`: not
//! UTF-8 once percent-decoded) with a bare `text/plain` 400. [`Path`] answers with the
//! problem document like every other error: an id that is not even text names nothing
//! this server issued, so it is 404 `not_found`, exactly as an unknown id; a parameter
//! of another type that does not parse is 422 naming it.

use axum::extract::FromRequestParts;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// Drop-in for `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(rejection(&r)),
        }
    }
}

fn rejection(r: &PathRejection) -> ApiError {
    let PathRejection::FailedToDeserializePathParams(e) = r else {
        // Missing parameters: the route and its handler disagree (a bug of ours).
        return ApiError::internal(anyhow::anyhow!("path parameters: {}", r.body_text()));
    };
    match e.kind() {
        ErrorKind::InvalidUtf8InPathParam { .. } => ApiError::new(ErrorCode::NotFound),
        ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
            ApiError::field(key.clone(), "invalid value")
        }
        ErrorKind::ParseError { .. } | ErrorKind::ParseErrorAtIndex { .. } => {
            ApiError::new(ErrorCode::NotFound)
        }
        _ => ApiError::internal(anyhow::anyhow!("path parameters: {}", e.body_text())),
    }
}
