//! The outbound HTTP the SMART app makes: FHIR R4 reads and searches, SMART discovery,
//! and the token endpoint.
//!
//! - TLS is always verified (webpki roots, ring); redirects are never followed (a FHIR
//!   server cannot send us elsewhere), and `next` links must stay on the FHIR base.
//! - Timeouts: connect (`smart.connect_timeout`, 5 s) and whole request
//!   (`smart.timeout`, 20 s).
//! - GETs answered 502, 503 or 504 are retried (`smart.retries`, with doubling backoff);
//!   nothing else is retried and POSTs never are.
//! - Bodies are read up to `smart.max_response`; a larger one is refused.
//! - Errors carry no response body and no token: they are safe to log.

use std::time::Duration;

use serde_json::Value;
use url::Url;

use crate::config::Secret;
use crate::config::SmartConfig;

#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("the FHIR server did not answer in time")]
    Timeout,
    #[error("the FHIR server could not be reached")]
    Unreachable,
    #[error("the FHIR server answered {0}")]
    Status(u16),
    #[error("the FHIR server refused the access token (401)")]
    Unauthorized,
    #[error("the FHIR server refused access (403)")]
    Forbidden,
    #[error("not found on the FHIR server (404)")]
    NotFound,
    #[error("the response is larger than smart.max_response")]
    TooLarge,
    #[error("the response is not the JSON expected: {0}")]
    Malformed(&'static str),
    #[error("the link leaves the FHIR server")]
    ForeignLink,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub max_pages: u32,
    pub max_bytes: usize,
}

impl Settings {
    pub fn from_config(c: &SmartConfig) -> Self {
        Self {
            connect_timeout: c.connect_timeout.std(),
            timeout: c.timeout.std(),
            retries: c.retries,
            backoff: c.retry_backoff.std(),
            max_pages: c.max_pages.max(1),
            max_bytes: usize::try_from(c.max_response.0).unwrap_or(usize::MAX),
        }
    }
}

/// The HTTP client, built once.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: Settings,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fhir::Client")
    }
}

/// A search result: the resources (from `entry[].resource`) and whether paging stopped
/// at `smart.max_pages` with more to read.
#[derive(Debug, Default)]
pub struct Found {
    pub resources: Vec<Value>,
    pub truncated: bool,
    pub pages: u32,
    /// The server withheld some resources (a patient's restriction): the Bundle's
    /// `meta.security` carries `REDACTED`, or an OperationOutcome entry `suppressed`.
    pub withheld: bool,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self, anyhow::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .user_agent(concat!("custodian/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn map_send(e: &reqwest::Error) -> FhirError {
        if e.is_timeout() {
            FhirError::Timeout
        } else {
            FhirError::Unreachable
        }
    }

    async fn read_body(&self, mut res: reqwest::Response) -> Result<Vec<u8>, FhirError> {
        if res
            .content_length()
            .is_some_and(|n| n > self.settings.max_bytes as u64)
        {
            return Err(FhirError::TooLarge);
        }
        let mut body = Vec::new();
        loop {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.settings.max_bytes {
                        return Err(FhirError::TooLarge);
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => return Err(Self::map_send(&e)),
            }
        }
    }

    fn status_error(status: u16) -> FhirError {
        match status {
            401 => FhirError::Unauthorized,
            403 => FhirError::Forbidden,
            404 | 410 => FhirError::NotFound,
            s => FhirError::Status(s),
        }
    }

    /// GET a JSON document, with a bearer token when given; retried on 502/503/504.
    pub async fn get_json(&self, url: &Url, token: Option<&Secret>) -> Result<Value, FhirError> {
        let mut attempt = 0;
        loop {
            let mut req = self
                .http
                .get(url.clone())
                .header("accept", "application/fhir+json, application/json");
            if let Some(t) = token {
                req = req.bearer_auth(t.expose());
            }
            let res = req.send().await.map_err(|e| Self::map_send(&e))?;
            let status = res.status().as_u16();
            if matches!(status, 502..=504) && attempt < self.settings.retries {
                attempt += 1;
                let wait = self.settings.backoff * 2u32.saturating_pow(attempt - 1);
                tracing::info!(status, attempt, "FHIR server busy; retrying the GET");
                tokio::time::sleep(wait).await;
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(Self::status_error(status));
            }
            let body = self.read_body(res).await?;
            return serde_json::from_slice(&body).map_err(|_| FhirError::Malformed("not JSON"));
        }
    }

    /// POST a form (the token endpoint), never retried. Basic auth for a confidential
    /// client. Answers the status and the JSON body (errors are JSON too in OAuth).
    pub async fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        basic: Option<(&str, &Secret)>,
    ) -> Result<(u16, Value), FhirError> {
        let body = serde_urlencoded::to_string(form).map_err(|_| FhirError::Malformed("form"))?;
        let mut req = self
            .http
            .post(url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body);
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret.expose()));
        }
        let res = req.send().await.map_err(|e| Self::map_send(&e))?;
        let status = res.status().as_u16();
        let body = self.read_body(res).await?;
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// Reads `<base>/<type>/<id>`.
    pub async fn read(
        &self,
        base: &Url,
        token: &Secret,
        resource: &str,
        id: &str,
    ) -> Result<Value, FhirError> {
        let url = join(base, &[resource, id])?;
        let v = self.get_json(&url, Some(token)).await?;
        if v.get("resourceType").and_then(Value::as_str) != Some(resource) {
            return Err(FhirError::Malformed("not the resource asked for"));
        }
        Ok(v)
    }

    /// Searches `<base>/<type>?params`, following `next` links (on the same base) up to
    /// `max_pages`. Entries that are not of `resource` (e.g. OperationOutcome) are left out.
    pub async fn search(
        &self,
        base: &Url,
        token: &Secret,
        resource: &str,
        params: &[(&str, &str)],
    ) -> Result<Found, FhirError> {
        let mut url = join(base, &[resource])?;
        url.query_pairs_mut().extend_pairs(params);
        let mut found = Found::default();
        loop {
            let bundle = self.get_json(&url, Some(token)).await?;
            found.pages += 1;
            if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
                return Err(FhirError::Malformed("a search did not answer a Bundle"));
            }
            let redacted = bundle
                .pointer("/meta/security")
                .and_then(Value::as_array)
                .is_some_and(|l| {
                    l.iter()
                        .any(|c| c.get("code").and_then(Value::as_str) == Some("REDACTED"))
                });
            let suppressed = bundle
                .get("entry")
                .and_then(Value::as_array)
                .is_some_and(|es| {
                    es.iter().any(|e| {
                        e.pointer("/resource/resourceType").and_then(Value::as_str)
                            == Some("OperationOutcome")
                            && e.pointer("/resource/issue")
                                .and_then(Value::as_array)
                                .is_some_and(|is| {
                                    is.iter().any(|i| {
                                        i.get("code").and_then(Value::as_str) == Some("suppressed")
                                    })
                                })
                    })
                });
            found.withheld |= redacted || suppressed;
            if let Some(entries) = bundle.get("entry").and_then(Value::as_array) {
                found.resources.extend(
                    entries
                        .iter()
                        .filter_map(|e| e.get("resource"))
                        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource))
                        .cloned(),
                );
            }
            let next = bundle
                .get("link")
                .and_then(Value::as_array)
                .and_then(|links| {
                    links
                        .iter()
                        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
                })
                .and_then(|l| l.get("url"))
                .and_then(Value::as_str);
            let Some(next) = next else {
                return Ok(found);
            };
            if found.pages >= self.settings.max_pages {
                found.truncated = true;
                return Ok(found);
            }
            let next = base.join(next).map_err(|_| FhirError::ForeignLink)?;
            if !within(base, &next) {
                return Err(FhirError::ForeignLink);
            }
            url = next;
        }
    }
}

/// Whether `url` is on the same origin as `base` and under its path.
pub fn within(base: &Url, url: &Url) -> bool {
    url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.path().starts_with(base.path().trim_end_matches('/'))
}

/// `base` + path segments (the segments are escaped).
pub fn join(base: &Url, segments: &[&str]) -> Result<Url, FhirError> {
    let mut url = base.clone();
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| FhirError::Malformed("base URL"))?;
        path.pop_if_empty();
        for s in segments {
            path.push(s);
        }
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_escapes_segments() {
        let base = Url::parse("https://ehr.example/fhir/").unwrap();
        let u = join(&base, &["Patient", "a/../b"]).unwrap();
        assert_eq!(u.as_str(), "https://ehr.example/fhir/Patient/a%2F..%2Fb");
        let base = Url::parse("https://ehr.example/fhir").unwrap();
        assert_eq!(
            join(&base, &["Observation"]).unwrap().as_str(),
            "https://ehr.example/fhir/Observation"
        );
    }

    #[test]
    fn next_links_must_stay_on_the_base() {
        let base = Url::parse("https://ehr.example/fhir").unwrap();
        let ok = Url::parse("https://ehr.example/fhir/Observation?page=2").unwrap();
        assert!(within(&base, &ok));
        for bad in [
            "https://evil.example/fhir/Observation",
            "http://ehr.example/fhir/Observation",
            "https://ehr.example:8443/fhir/Observation",
            "https://ehr.example/other",
        ] {
            assert!(!within(&base, &Url::parse(bad).unwrap()), "{bad}");
        }
    }
}
