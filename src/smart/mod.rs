//! The SMART on FHIR app and the PRECISE-HBR score (`docs/smart.md`).
//!
//! - [`score`]: the score, a pure function.
//! - [`inputs`]: FHIR R4 resources → score inputs, with sources and notes.
//! - [`fhir`]: outbound HTTP (FHIR reads and searches, discovery, token endpoint).
//! - [`oauth`]: SMART App Launch 2.x client pieces (PKCE S256, authorization URL, grants).
//! - [`store`]: pending launches and launch contexts (tokens sealed, tied to a session).
//! - [`routes`]: `/smart/launch`, `/smart/callback`, `/smart/app`, `/smart/calculator`,
//!   and `POST /api/v1/precise-hbr/score`.
//!
//! The launch flow, and what binds each step:
//! 1. `/smart/launch?iss=&launch=` needs a signed-in Custodian user with `records:read`.
//!    The `iss` must be in `smart.allowed_issuers`, checked before any outbound request.
//!    A random `state` (stored hashed, single use, `smart.launch_ttl`) and a random
//!    browser binding (cookie, stored hashed) are made; the PKCE verifier is sealed.
//! 2. `/smart/callback` takes the launch by its state (deleting it), checks the binding
//!    cookie and that the Custodian session is still valid, exchanges the code with the
//!    verifier, and stores the tokens sealed, tied to the session, behind a new cookie.
//! 3. `/smart/app` finds the context by its cookie, checks the session (idle timeout,
//!    lock, role), refreshes the access token when it nears expiry by the clock, reads
//!    the FHIR data and shows the score.

pub mod fhir;
pub mod inputs;
pub mod oauth;
pub mod routes;
pub mod score;
pub mod store;

use std::sync::Arc;

use time::OffsetDateTime;
use url::Url;

use crate::access::{Permission, Principal};
use crate::clock::{SharedClock, timestamp};
use crate::config::{Config, Secret, SmartConfig};
use crate::crypto::{self, SharedKeyring};
use crate::identity::Identity;
use crate::store::{Db, StoreError};
use fhir::FhirError;
use oauth::TokenError;

const VERIFIER_PURPOSE: &str = "custodian/smart/verifier/v1";
const TOKEN_PURPOSE: &str = "custodian/smart/token/v1";

/// Why a SMART step failed. Every variant is safe to show and to log (no token, no
/// response body, no PHI).
#[derive(Debug, thiserror::Error)]
pub enum SmartError {
    #[error("the SMART app is not configured (smart.allowed_issuers is empty)")]
    Disabled,
    #[error("this FHIR server is not in smart.allowed_issuers")]
    IssuerNotAllowed,
    #[error("the launch is unknown, expired, already used, or from another browser")]
    LaunchInvalid,
    #[error("the EHR did not authorize the app ({0})")]
    Denied(String),
    #[error("the EHR refused the token request ({0})")]
    TokenRefused(String),
    #[error("the EHR gave no patient in the launch context")]
    NoPatient,
    #[error("sign in again, then launch the app again from the EHR")]
    Relaunch,
    #[error("the Custodian session has ended")]
    SessionEnded,
    #[error("your role does not allow this")]
    Forbidden,
    #[error("the FHIR server is unavailable: {0}")]
    FhirUnavailable(FhirError),
    #[error("the FHIR server refused access to this data")]
    FhirForbidden,
    #[error("the patient was not found on the FHIR server")]
    FhirNotFound,
    #[error("the FHIR server's answer could not be used: {0}")]
    FhirBadResponse(FhirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a sealed value could not be opened or made")]
    Crypto,
    #[error("{0}")]
    Internal(String),
}

impl From<FhirError> for SmartError {
    fn from(e: FhirError) -> Self {
        match e {
            FhirError::Timeout | FhirError::Unreachable => SmartError::FhirUnavailable(e),
            FhirError::Status(s) if s >= 500 => SmartError::FhirUnavailable(e),
            FhirError::Unauthorized => SmartError::Relaunch,
            FhirError::Forbidden => SmartError::FhirForbidden,
            FhirError::NotFound => SmartError::FhirNotFound,
            other => SmartError::FhirBadResponse(other),
        }
    }
}

impl From<TokenError> for SmartError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Http(h) => h.into(),
            TokenError::Refused(code) => SmartError::TokenRefused(code),
            TokenError::Malformed(m) => SmartError::FhirBadResponse(FhirError::Malformed(m)),
        }
    }
}

/// The SMART service, built once.
#[derive(Clone)]
pub struct Smart {
    inner: Arc<Inner>,
}

struct Inner {
    config: SmartConfig,
    client_secret: Option<Secret>,
    client: fhir::Client,
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    identity: Identity,
    idle_timeout: std::time::Duration,
}

/// A new launch: where to send the browser and the binding cookie to set.
pub struct Started {
    pub authorize_url: Url,
    pub binding: Secret,
}

/// A context ready to use: its row (tokens still sealed), the user, a usable token.
pub struct Active {
    pub context: store::Context,
    pub principal: Principal,
    pub access: Secret,
}

fn hash(s: &str) -> String {
    crypto::sha256_hex(s.as_bytes())
}

fn random_token() -> Result<Secret, SmartError> {
    crypto::random_bytes::<32>()
        .map(|b| Secret::new(crypto::hex(&b)))
        .map_err(|_| SmartError::Crypto)
}

/// An issuer as compared: no trailing slash.
pub fn normalise_issuer(s: &str) -> &str {
    s.trim().trim_end_matches('/')
}

impl Smart {
    pub fn new(
        config: &Config,
        client_secret: Option<Secret>,
        db: Db,
        keys: Arc<SharedKeyring>,
        clock: SharedClock,
        identity: Identity,
    ) -> anyhow::Result<Self> {
        let client = fhir::Client::new(fhir::Settings::from_config(&config.smart))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.smart.clone(),
                client_secret,
                client,
                db,
                keys,
                clock,
                identity,
                idle_timeout: config.session.idle_timeout.std(),
            }),
        })
    }

    pub fn config(&self) -> &SmartConfig {
        &self.inner.config
    }

    pub fn client(&self) -> &fhir::Client {
        &self.inner.client
    }

    fn now(&self) -> OffsetDateTime {
        self.inner.clock.now()
    }

    /// The allow-listed issuer `iss` names, as a URL; an error otherwise (before any
    /// outbound request).
    pub fn allowed(&self, iss: &str) -> Result<Url, SmartError> {
        if self.inner.config.allowed_issuers.is_empty() {
            return Err(SmartError::Disabled);
        }
        let wanted = normalise_issuer(iss);
        let ok = self
            .inner
            .config
            .allowed_issuers
            .iter()
            .any(|a| normalise_issuer(a) == wanted);
        if !ok {
            return Err(SmartError::IssuerNotAllowed);
        }
        Url::parse(wanted).map_err(|_| SmartError::IssuerNotAllowed)
    }

    fn seal(&self, purpose: &str, row: &str, value: &Secret) -> Result<String, SmartError> {
        crypto::seal(
            &self.inner.keys,
            purpose,
            row.as_bytes(),
            value.expose().as_bytes(),
        )
        .map_err(|_| SmartError::Crypto)
    }

    fn open(&self, purpose: &str, row: &str, sealed: &str) -> Result<Secret, SmartError> {
        let raw = crypto::open(&self.inner.keys, purpose, row.as_bytes(), sealed)
            .map_err(|_| SmartError::Crypto)?;
        String::from_utf8(raw.to_vec())
            .map(Secret::new)
            .map_err(|_| SmartError::Crypto)
    }

    /// Cleans up ended sessions' launches and contexts (called at each launch).
    async fn sweep(&self) {
        let now = self.now();
        let idle = timestamp(now - self.inner.idle_timeout);
        if let Err(e) = store::sweep(&self.inner.db, &timestamp(now), &idle).await {
            tracing::warn!(error = %e, "could not sweep ended SMART launches");
        }
    }

    /// Step 1: a launch by a signed-in user.
    pub async fn start(
        &self,
        principal: &Principal,
        iss: &str,
        launch: Option<&str>,
        redirect_uri: &str,
    ) -> Result<Started, SmartError> {
        let iss_url = self.allowed(iss)?;
        if !principal.has(Permission::RecordsRead) {
            return Err(SmartError::Forbidden);
        }
        let session_id = principal.session_id().ok_or(SmartError::SessionEnded)?;
        self.sweep().await;
        let endpoints = oauth::discover(&self.inner.client, &iss_url).await?;
        let state = random_token()?;
        let binding = random_token()?;
        let verifier = oauth::new_verifier().map_err(|_| SmartError::Crypto)?;
        let state_hash = hash(state.expose());
        let now = self.now();
        let mut scope = self.inner.config.scopes.trim().to_owned();
        if launch.is_none() && !scope.split_whitespace().any(|s| s == "launch/patient") {
            scope.push_str(" launch/patient");
        }
        store::insert_launch(
            &self.inner.db,
            &store::Launch {
                verifier: self.seal(VERIFIER_PURPOSE, &state_hash, &verifier)?,
                state_hash,
                binding_hash: hash(binding.expose()),
                session_id: session_id.to_owned(),
                user_id: principal.user_id.clone(),
                iss: iss_url.as_str().trim_end_matches('/').to_owned(),
                token_endpoint: endpoints.token.to_string(),
                redirect_uri: redirect_uri.to_owned(),
                created_at: timestamp(now),
                expires_at: timestamp(now + self.inner.config.launch_ttl.std()),
            },
        )
        .await?;
        let url = oauth::authorize_url(
            &endpoints.authorize,
            &oauth::AuthorizeRequest {
                client_id: &self.inner.config.client_id,
                redirect_uri,
                scope: &scope,
                state: state.expose(),
                aud: normalise_issuer(iss),
                launch,
                challenge: &oauth::challenge(&verifier),
            },
        );
        Ok(Started {
            authorize_url: url,
            binding,
        })
    }

    fn auth(&self) -> oauth::ClientAuth<'_> {
        oauth::ClientAuth {
            client_id: &self.inner.config.client_id,
            secret: self.inner.client_secret.as_ref(),
        }
    }

    /// Step 2: the callback. Answers the new context's cookie value and the principal.
    pub async fn complete(
        &self,
        state: &str,
        code: &str,
        binding: Option<&str>,
    ) -> Result<(Secret, Principal, String), SmartError> {
        let state_hash = hash(state);
        let launch = store::take_launch(&self.inner.db, &state_hash)
            .await?
            .ok_or(SmartError::LaunchInvalid)?;
        let now = self.now();
        let bound = binding.is_some_and(|b| {
            crypto::constant_time_eq(hash(b).as_bytes(), launch.binding_hash.as_bytes())
        });
        if !bound || launch.expires_at.as_str() <= timestamp(now).as_str() {
            return Err(SmartError::LaunchInvalid);
        }
        let principal = self
            .inner
            .identity
            .authenticate_session_id(&launch.session_id)
            .await
            .map_err(|_| SmartError::SessionEnded)?;
        if principal.user_id != launch.user_id {
            return Err(SmartError::LaunchInvalid);
        }
        if !principal.has(Permission::RecordsRead) {
            return Err(SmartError::Forbidden);
        }
        let verifier = self.open(VERIFIER_PURPOSE, &launch.state_hash, &launch.verifier)?;
        let token_url =
            Url::parse(&launch.token_endpoint).map_err(|_| SmartError::LaunchInvalid)?;
        let tokens = oauth::exchange_code(
            &self.inner.client,
            &token_url,
            &self.auth(),
            code,
            &launch.redirect_uri,
            &verifier,
        )
        .await?;
        let patient = tokens
            .patient
            .clone()
            .filter(|p| !p.is_empty() && p.len() <= 64)
            .ok_or(SmartError::NoPatient)?;
        let id = uuid::Uuid::new_v4().to_string();
        let cookie = random_token()?;
        store::insert_context(
            &self.inner.db,
            &store::Context {
                access_token: self.seal(TOKEN_PURPOSE, &id, &tokens.access)?,
                refresh_token: tokens
                    .refresh
                    .as_ref()
                    .map(|r| self.seal(TOKEN_PURPOSE, &format!("{id}|refresh"), r))
                    .transpose()?,
                id,
                cookie_hash: hash(cookie.expose()),
                session_id: launch.session_id,
                user_id: launch.user_id,
                iss: launch.iss,
                token_endpoint: launch.token_endpoint,
                patient: patient.clone(),
                scope: tokens.scope.clone(),
                access_expires_at: timestamp(now + time::Duration::seconds(tokens.expires_in)),
                created_at: timestamp(now),
            },
        )
        .await?;
        Ok((cookie, principal, patient))
    }

    /// Step 3: the context behind a cookie, with a usable access token (refreshed when
    /// it expires within `smart.refresh_before`).
    pub async fn active(&self, cookie: Option<&str>) -> Result<Active, SmartError> {
        let cookie = cookie.ok_or(SmartError::Relaunch)?;
        let context = store::context_by_cookie(&self.inner.db, &hash(cookie))
            .await?
            .ok_or(SmartError::Relaunch)?;
        let principal = match self
            .inner
            .identity
            .authenticate_session_id(&context.session_id)
            .await
        {
            Ok(p) if p.user_id == context.user_id => p,
            _ => {
                store::delete_context(&self.inner.db, &context.id).await?;
                return Err(SmartError::SessionEnded);
            }
        };
        if !principal.has(Permission::RecordsRead) {
            return Err(SmartError::Forbidden);
        }
        let now = self.now();
        let soon = timestamp(now + self.inner.config.refresh_before.std());
        let access = if context.access_expires_at.as_str() > soon.as_str() {
            self.open(TOKEN_PURPOSE, &context.id, &context.access_token)?
        } else {
            self.refresh(&context, now).await?
        };
        Ok(Active {
            context,
            principal,
            access,
        })
    }

    async fn refresh(
        &self,
        context: &store::Context,
        now: OffsetDateTime,
    ) -> Result<Secret, SmartError> {
        let Some(sealed) = &context.refresh_token else {
            if context.access_expires_at.as_str() > timestamp(now).as_str() {
                return self.open(TOKEN_PURPOSE, &context.id, &context.access_token);
            }
            store::delete_context(&self.inner.db, &context.id).await?;
            return Err(SmartError::Relaunch);
        };
        let refresh_token = self.open(TOKEN_PURPOSE, &format!("{}|refresh", context.id), sealed)?;
        let url = Url::parse(&context.token_endpoint).map_err(|_| SmartError::Relaunch)?;
        let tokens =
            match oauth::refresh(&self.inner.client, &url, &self.auth(), &refresh_token).await {
                Ok(t) => t,
                Err(TokenError::Refused(_)) => {
                    store::delete_context(&self.inner.db, &context.id).await?;
                    return Err(SmartError::Relaunch);
                }
                Err(e) => return Err(e.into()),
            };
        let new_refresh = tokens.refresh.as_ref().unwrap_or(&refresh_token);
        store::update_tokens(
            &self.inner.db,
            &context.id,
            &self.seal(TOKEN_PURPOSE, &context.id, &tokens.access)?,
            Some(&self.seal(
                TOKEN_PURPOSE,
                &format!("{}|refresh", context.id),
                new_refresh,
            )?),
            &timestamp(now + time::Duration::seconds(tokens.expires_in)),
        )
        .await?;
        tracing::info!("SMART access token refreshed");
        Ok(tokens.access)
    }

    /// Reads what the score needs about the context's patient.
    pub async fn fetch(&self, a: &Active) -> Result<inputs::Bundle, SmartError> {
        let base = Url::parse(&a.context.iss).map_err(|_| SmartError::Relaunch)?;
        let c = &self.inner.client;
        let token = &a.access;
        let patient_id = a.context.patient.as_str();
        let patient = c.read(&base, token, "Patient", patient_id).await?;
        let codes = inputs::codes().map_err(SmartError::Internal)?;
        let loinc: Vec<String> = codes
            .observations
            .all()
            .iter()
            .map(|c| format!("{}|{c}", inputs::LOINC))
            .collect();
        let loinc = loinc.join(",");
        let since = format!(
            "ge{}",
            (self.now().date() - time::Duration::days(codes.procedures.major_surgery.within_days))
        );
        let searches: [(&'static str, Vec<(&str, &str)>); 4] = [
            (
                "Observation",
                vec![("code", loinc.as_str()), ("_sort", "-date")],
            ),
            ("Condition", vec![]),
            ("MedicationRequest", vec![("status", "active")]),
            ("Procedure", vec![("date", since.as_str())]),
        ];
        let mut bundle = inputs::Bundle {
            patient,
            ..inputs::Bundle::default()
        };
        // MedicationStatement is read when the granted scopes allow it; a server that
        // refuses or does not offer it leaves a note instead of failing the page.
        let unread = |why: &str| {
            format!(
                "MedicationStatement was not read: {why}. Medications recorded only as \
                 statements were not counted."
            )
        };
        bundle.statements = Some(if scope_allows(&a.context.scope, "MedicationStatement") {
            let params = [
                ("patient", patient_id),
                ("status", "active"),
                ("_count", "100"),
            ];
            match c.search(&base, token, "MedicationStatement", &params).await {
                Ok(found) => {
                    if found.truncated {
                        bundle.truncated.push("MedicationStatement");
                    }
                    if found.withheld {
                        bundle.withheld.push("MedicationStatement");
                    }
                    Ok(found.resources)
                }
                // Refused (403) or not offered (404, or another 4xx such as 400 for an
                // unsupported resource): a note. 401 and outages fail the page as before.
                Err(
                    e @ (FhirError::Forbidden | FhirError::NotFound | FhirError::Status(400..=499)),
                ) => Err(unread(&e.to_string())),
                Err(e) => return Err(e.into()),
            }
        } else {
            Err(unread(
                "the granted scopes do not include patient/MedicationStatement.rs",
            ))
        });
        for (resource, extra) in searches {
            let mut params = vec![("patient", patient_id), ("_count", "100")];
            params.extend(extra);
            let found = c.search(&base, token, resource, &params).await?;
            if found.truncated {
                bundle.truncated.push(resource);
            }
            if found.withheld {
                bundle.withheld.push(resource);
            }
            let into = match resource {
                "Observation" => &mut bundle.observations,
                "Condition" => &mut bundle.conditions,
                "MedicationRequest" => &mut bundle.medications,
                _ => &mut bundle.procedures,
            };
            *into = found.resources;
        }
        Ok(bundle)
    }
}

/// Whether a granted scope string lets the app search `resource` for the patient: SMART v2
/// (`patient/X.rs`, any permission letters including `r` and `s`) or v1 (`patient/X.read`,
/// `patient/X.*`), for the resource or `*`, in the `patient/` or `user/` context.
pub fn scope_allows(granted: &str, resource: &str) -> bool {
    granted.split_whitespace().any(|s| {
        let Some((context, rest)) = s.split_once('/') else {
            return false;
        };
        let Some((kind, perms)) = rest.split_once('.') else {
            return false;
        };
        let perms = perms.split('?').next().unwrap_or_default();
        matches!(context, "patient" | "user")
            && (kind == resource || kind == "*")
            && (perms == "read"
                || perms == "*"
                || (perms.contains('r')
                    && perms.contains('s')
                    && perms.chars().all(|c| "cruds".contains(c))))
    })
}

#[cfg(test)]
mod tests {
    use super::scope_allows;

    #[test]
    fn granted_scopes_are_read_as_smart_v1_and_v2() {
        let m = "MedicationStatement";
        for yes in [
            "launch patient/MedicationStatement.rs",
            "patient/MedicationStatement.read",
            "patient/*.rs",
            "patient/*.*",
            "user/MedicationStatement.cruds",
            "patient/MedicationStatement.rs?category=x",
        ] {
            assert!(scope_allows(yes, m), "{yes}");
        }
        for no in [
            "",
            "launch openid fhirUser patient/MedicationRequest.rs",
            "patient/MedicationStatement.r",
            "patient/MedicationStatement.write",
            "system/MedicationStatement.rs",
            "MedicationStatement.rs",
            "patient/MedicationStatementX.rs",
        ] {
            assert!(!scope_allows(no, m), "{no}");
        }
    }
}
