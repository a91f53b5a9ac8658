//! Security headers on every response, `Cache-Control: no-store` on the API.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

/// The policy every page and every API response carries.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
form-action 'self'";

pub const PERMISSIONS_POLICY: &str = "accelerometer=(), camera=(), geolocation=(), gyroscope=(), \
magnetometer=(), microphone=(), payment=(), usb=(), interest-cohort=()";

pub const HSTS: &str = "max-age=31536000; includeSubDomains";

/// A handler that needs another policy (the API docs page, the SMART app page) puts
/// this in its response extensions; nothing else can change the policy.
#[derive(Clone, Debug)]
pub struct CspOverride(pub HeaderValue);

/// What the header middleware needs to know.
#[derive(Clone, Copy, Debug)]
pub struct HeaderSettings {
    pub hsts: bool,
}

pub async fn middleware(
    State(settings): State<HeaderSettings>,
    req: Request,
    next: Next,
) -> Response {
    let is_api =
        req.uri().path().starts_with("/api/") && !req.uri().path().starts_with("/api/docs");
    let mut res = next.run(req).await;
    let csp = res.extensions().get::<CspOverride>().map(|o| o.0.clone());
    apply(res.headers_mut(), settings, csp, is_api);
    res
}

fn apply(h: &mut HeaderMap, settings: HeaderSettings, csp: Option<HeaderValue>, is_api: bool) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        csp.unwrap_or(HeaderValue::from_static(CSP)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // A page that lets named EHR origins frame it (the SMART app) says so in its
    // `frame-ancestors`; `X-Frame-Options` cannot name origins, so it is left out there.
    let framable = h
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.contains("frame-ancestors 'none'"));
    if !framable {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static(PERMISSIONS_POLICY),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if settings.hsts {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
    // The API is never cached; pages are not either unless a handler (static assets)
    // says otherwise.
    if is_api || !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The version an `If-Match` header names: `W/"3"`, `"3"`, `3`, or the `v`-prefixed
/// ETags of `/api/v1` (`"v3"`, `W/"v3"`); `*` and no header mean any version. Anything
/// else is a 412: a precondition that cannot be read does not hold.
pub fn if_match_version(
    headers: &axum::http::HeaderMap,
) -> Result<Option<i64>, crate::http::ApiError> {
    let Some(v) = headers.get(axum::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let tag = text.trim_start_matches("W/").trim_matches('"');
    tag.strip_prefix('v')
        .unwrap_or(tag)
        .parse()
        .map(Some)
        .map_err(|_| {
            crate::http::ApiError::new(crate::http::ErrorCode::PreconditionFailed)
                .with_detail("If-Match must be an ETag this server sent, e.g. W/\"3\" or \"v3\".")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_meets_the_contract() {
        for part in [
            "default-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(CSP.contains(part), "{part}");
        }
        assert!(!CSP.contains("unsafe-inline"));
        assert!(!CSP.contains("http"), "no third-party origins");
    }

    #[test]
    fn hsts_only_when_asked() {
        let mut h = HeaderMap::new();
        apply(&mut h, HeaderSettings { hsts: false }, None, true);
        assert!(!h.contains_key(header::STRICT_TRANSPORT_SECURITY));
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        let mut h = HeaderMap::new();
        apply(&mut h, HeaderSettings { hsts: true }, None, false);
        assert_eq!(h[header::STRICT_TRANSPORT_SECURITY], HSTS);
    }

    #[test]
    fn api_responses_are_never_cacheable() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=600"),
        );
        apply(&mut h, HeaderSettings { hsts: false }, None, true);
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
    }

    #[test]
    fn if_match_reads_every_etag_form_this_server_sends() {
        let with = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::IF_MATCH, v.parse().unwrap());
            if_match_version(&h).ok().flatten()
        };
        for v in ["W/\"3\"", "\"3\"", "3", "\"v3\"", "W/\"v3\"", "v3"] {
            assert_eq!(with(v), Some(3), "{v}");
        }
        assert_eq!(with("*"), None);
        let mut h = axum::http::HeaderMap::new();
        h.insert(axum::http::header::IF_MATCH, "\"abc\"".parse().unwrap());
        assert!(if_match_version(&h).is_err());
        assert_eq!(
            if_match_version(&axum::http::HeaderMap::new()).ok(),
            Some(None)
        );
    }
}
