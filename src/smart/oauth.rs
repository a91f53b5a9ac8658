//! SMART App Launch 2.x as a client: discovery, PKCE S256, the authorization URL, and
//! the token endpoint (authorization code and refresh token grants).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::fhir::{self, Client, FhirError};
use crate::config::Secret;
use crate::crypto;

/// The endpoints of an EHR's authorization server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub authorize: Url,
    pub token: Url,
}

const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

fn parse_endpoint(v: Option<&Value>) -> Option<Url> {
    let u = Url::parse(v?.as_str()?).ok()?;
    matches!(u.scheme(), "https" | "http").then_some(u)
}

/// Reads `<iss>/.well-known/smart-configuration`, falling back to the CapabilityStatement
/// (`<iss>/metadata`) `oauth-uris` extension.
pub async fn discover(client: &Client, iss: &Url) -> Result<Endpoints, FhirError> {
    let well_known = fhir::join(iss, &[".well-known", "smart-configuration"])?;
    match client.get_json(&well_known, None).await {
        Ok(v) => {
            if let (Some(authorize), Some(token)) = (
                parse_endpoint(v.get("authorization_endpoint")),
                parse_endpoint(v.get("token_endpoint")),
            ) {
                return Ok(Endpoints { authorize, token });
            }
        }
        Err(FhirError::NotFound | FhirError::Status(_) | FhirError::Malformed(_)) => {}
        Err(e) => return Err(e),
    }
    let metadata = fhir::join(iss, &["metadata"])?;
    let cap = client.get_json(&metadata, None).await?;
    let ext = cap
        .get("rest")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.pointer("/security/extension").and_then(Value::as_array))
        .flatten()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(OAUTH_URIS))
        .and_then(|e| e.get("extension").and_then(Value::as_array))
        .ok_or(FhirError::Malformed("no SMART endpoints advertised"))?;
    let find = |name: &str| {
        parse_endpoint(
            ext.iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(name))
                .and_then(|e| e.get("valueUri")),
        )
    };
    match (find("authorize"), find("token")) {
        (Some(authorize), Some(token)) => Ok(Endpoints { authorize, token }),
        _ => Err(FhirError::Malformed("no SMART endpoints advertised")),
    }
}

/// A fresh PKCE verifier (43 characters of base64url from 32 random bytes).
pub fn new_verifier() -> Result<Secret, crypto::CryptoError> {
    Ok(Secret::new(
        URL_SAFE_NO_PAD.encode(crypto::random_bytes::<32>()?),
    ))
}

/// The S256 challenge of a verifier.
pub fn challenge(verifier: &Secret) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose().as_bytes()))
}

/// What goes on the authorization URL.
pub struct AuthorizeRequest<'a> {
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub scope: &'a str,
    pub state: &'a str,
    pub aud: &'a str,
    pub launch: Option<&'a str>,
    pub challenge: &'a str,
}

pub fn authorize_url(endpoint: &Url, r: &AuthorizeRequest<'_>) -> Url {
    let mut u = endpoint.clone();
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", r.client_id)
            .append_pair("redirect_uri", r.redirect_uri)
            .append_pair("scope", r.scope)
            .append_pair("state", r.state)
            .append_pair("aud", r.aud)
            .append_pair("code_challenge", r.challenge)
            .append_pair("code_challenge_method", "S256");
        if let Some(l) = r.launch {
            q.append_pair("launch", l);
        }
    }
    u
}

/// A token response.
pub struct Tokens {
    pub access: Secret,
    pub refresh: Option<Secret>,
    /// Seconds (from `expires_in`; 300 when the server does not say).
    pub expires_in: i64,
    pub scope: String,
    /// The patient in context.
    pub patient: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Http(#[from] FhirError),
    /// The authorization server refused (the OAuth `error` code only).
    #[error("the authorization server refused: {0}")]
    Refused(String),
    #[error("the token response is not usable: {0}")]
    Malformed(&'static str),
}

fn oauth_error_code(v: &Value) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .filter(|s| s.len() <= 40 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or("unknown")
        .to_owned()
}

fn tokens(v: &Value) -> Result<Tokens, TokenError> {
    let access = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(TokenError::Malformed("no access_token"))?;
    if !v
        .get("token_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(TokenError::Malformed("token_type is not Bearer"));
    }
    Ok(Tokens {
        access: Secret::new(access.to_owned()),
        refresh: v
            .get("refresh_token")
            .and_then(Value::as_str)
            .map(|s| Secret::new(s.to_owned())),
        expires_in: v
            .get("expires_in")
            .and_then(Value::as_i64)
            .filter(|n| *n > 0)
            .unwrap_or(300),
        scope: v
            .get("scope")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        patient: v.get("patient").and_then(Value::as_str).map(str::to_owned),
    })
}

/// The client's credentials: public (id only) or confidential (id + secret, Basic auth).
pub struct ClientAuth<'a> {
    pub client_id: &'a str,
    pub secret: Option<&'a Secret>,
}

async fn token_request(
    client: &Client,
    endpoint: &Url,
    auth: &ClientAuth<'_>,
    mut form: Vec<(&str, &str)>,
) -> Result<Tokens, TokenError> {
    if auth.secret.is_none() {
        form.push(("client_id", auth.client_id));
    }
    let (status, body) = client
        .post_form(endpoint, &form, auth.secret.map(|s| (auth.client_id, s)))
        .await?;
    if !(200..300).contains(&status) {
        return Err(TokenError::Refused(oauth_error_code(&body)));
    }
    tokens(&body)
}

/// Exchanges an authorization code (with its PKCE verifier).
pub async fn exchange_code(
    client: &Client,
    endpoint: &Url,
    auth: &ClientAuth<'_>,
    code: &str,
    redirect_uri: &str,
    verifier: &Secret,
) -> Result<Tokens, TokenError> {
    let form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", verifier.expose()),
    ];
    token_request(client, endpoint, auth, form).await
}

/// Uses a refresh token.
pub async fn refresh(
    client: &Client,
    endpoint: &Url,
    auth: &ClientAuth<'_>,
    refresh_token: &Secret,
) -> Result<Tokens, TokenError> {
    let form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.expose()),
    ];
    token_request(client, endpoint, auth, form).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_known_answer() {
        // RFC 7636 appendix B.
        let v = Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(challenge(&v), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let fresh = new_verifier().unwrap();
        assert_eq!(fresh.expose().len(), 43);
        assert_ne!(fresh.expose(), new_verifier().unwrap().expose());
    }

    #[test]
    fn the_authorization_url_carries_everything() {
        let u = authorize_url(
            &Url::parse("https://ehr.example/auth/authorize").unwrap(),
            &AuthorizeRequest {
                client_id: "custodian",
                redirect_uri: "https://app.example/smart/callback",
                scope: "launch openid",
                state: "s1",
                aud: "https://ehr.example/fhir",
                launch: Some("L1"),
                challenge: "c1",
            },
        );
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["aud"], "https://ehr.example/fhir");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["launch"], "L1");
        assert_eq!(q["scope"], "launch openid");
    }

    #[test]
    fn token_responses_are_checked() {
        let ok = serde_json::json!({"access_token":"a","token_type":"bearer","expires_in":3600,"patient":"p1","scope":"x"});
        let t = tokens(&ok).unwrap();
        assert_eq!(t.expires_in, 3600);
        assert_eq!(t.patient.as_deref(), Some("p1"));
        assert!(tokens(&serde_json::json!({"token_type":"Bearer"})).is_err());
        assert!(tokens(&serde_json::json!({"access_token":"a","token_type":"mac"})).is_err());
        assert_eq!(
            oauth_error_code(&serde_json::json!({"error":"invalid_grant"})),
            "invalid_grant"
        );
        assert_eq!(
            oauth_error_code(&serde_json::json!({"error":"<script>"})),
            "unknown"
        );
    }
}
