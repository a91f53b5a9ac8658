//! Custodian as a SMART App Launch 2.x authorization server (`docs/smart-server.md`).
//!
//! - [`scopes`]: the one scope parser (v1, v2, granular) and what a scope permits.
//! - [`store`]: the `oauth_*` tables.
//! - [`routes`]: discovery, `/oauth/token`, `/oauth/introspect`, `/oauth/revoke`, and
//!   the apps and grants API.
//! - [`pages`]: `/oauth/authorize` (sign-in, patient picker, consent), the EHR launch
//!   from a chart, "Connected apps" and the admin apps page.
//!
//! Every secret this server hands out (client secret, code, launch, access and refresh
//! token) is 256 random bits from the OS, stored as its SHA-256 only. A grant is what a
//! person allowed an app; the tokens of a grant carry its scopes, and every FHIR request
//! made with one is checked against those scopes *and* the person's role as of that
//! request (`fhir::routes::app_scope`).

pub mod pages;
pub mod routes;
pub mod scopes;
pub mod store;

use std::sync::Arc;

use time::OffsetDateTime;
use url::Url;

use crate::clock::{SharedClock, timestamp};
use crate::config::{OAuthConfig, Secret};
use crate::crypto;
use crate::http::FieldError;
use crate::identity::Identity;
use crate::store::{Db, StoreError};
use scopes::Scopes;
use store::{ClientRow, GrantRow};

pub const ACCESS_PREFIX: &str = crate::identity::service::SMART_TOKEN_PREFIX;
pub const REFRESH_PREFIX: &str = "srt_";
pub const CODE_PREFIX: &str = "sac_";
pub const SECRET_PREFIX: &str = "scs_";
pub const LAUNCH_PREFIX: &str = "sal_";

/// Why an OAuth step failed, as RFC 6749 names it (safe to show and to log: no secret,
/// no PHI).
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("invalid_request: {0}")]
    InvalidRequest(&'static str),
    #[error("invalid_client")]
    InvalidClient,
    #[error("invalid_grant: {0}")]
    InvalidGrant(&'static str),
    /// A spent code or refresh token presented again: its grant was revoked.
    #[error("invalid_grant: replayed")]
    Replayed {
        grant_id: String,
        what: &'static str,
    },
    #[error("invalid_scope")]
    InvalidScope,
    #[error("unsupported_grant_type")]
    UnsupportedGrantType,
    #[error("the app could not be saved")]
    Invalid(Vec<FieldError>),
    #[error("no such app or grant")]
    NotFound,
    #[error("a random value could not be made")]
    Crypto,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OAuthError {
    /// The RFC 6749 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) | OAuthError::Invalid(_) => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidGrant(_) | OAuthError::Replayed { .. } => "invalid_grant",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::NotFound => "invalid_request",
            OAuthError::Crypto | OAuthError::Store(_) => "server_error",
        }
    }

    pub fn description(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(m) | OAuthError::InvalidGrant(m) => m,
            OAuthError::Replayed { what, .. } => what,
            OAuthError::InvalidClient => "the client is unknown or its authentication failed",
            OAuthError::InvalidScope => "none of the scopes asked for can be granted",
            OAuthError::UnsupportedGrantType => {
                "grant_type must be authorization_code or refresh_token"
            }
            OAuthError::Invalid(_) => "the app's registration is not valid",
            OAuthError::NotFound => "no such app or grant",
            OAuthError::Crypto | OAuthError::Store(_) => "the server could not answer",
        }
    }
}

fn random(prefix: &str) -> Result<Secret, OAuthError> {
    crypto::random_bytes::<32>()
        .map(|b| Secret::new(format!("{prefix}{}", crypto::hex(&b))))
        .map_err(|_| OAuthError::Crypto)
}

fn new_id(prefix: &str) -> Result<String, OAuthError> {
    crypto::random_bytes::<12>()
        .map(|b| format!("{prefix}{}", crypto::hex(&b)))
        .map_err(|_| OAuthError::Crypto)
}

pub fn hash(s: &str) -> String {
    crypto::sha256_hex(s.as_bytes())
}

/// PKCE S256 of a verifier (RFC 7636), base64url without padding.
pub fn s256(verifier: &str) -> String {
    crate::smart::oauth::challenge(&Secret::new(verifier.to_owned()))
}

/// A verifier as RFC 7636 allows: 43–128 unreserved characters.
fn verifier_ok(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// A redirect or launch URL an app may register: absolute, no fragment, no wildcard,
/// https, or http to a loopback host only.
pub fn check_app_url(raw: &str) -> Result<Url, &'static str> {
    if raw.contains('*') {
        return Err("may not hold a wildcard: register each URL exactly");
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("may not hold spaces or control characters");
    }
    if raw.len() > 512 {
        return Err("must be at most 512 characters");
    }
    let u = Url::parse(raw).map_err(|_| "must be an absolute URL")?;
    if u.fragment().is_some() {
        return Err("may not hold a fragment (#…)");
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("may not hold a user name or password");
    }
    let loopback = matches!(
        u.host(),
        Some(url::Host::Domain("localhost"))
            | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
            | Some(url::Host::Ipv6(std::net::Ipv6Addr::LOCALHOST))
    );
    match u.scheme() {
        "https" => Ok(u),
        "http" if loopback => Ok(u),
        _ => Err("must use https (http only to localhost, 127.0.0.1 or [::1])"),
    }
}

/// A new app as an administrator registers it.
#[derive(Clone, Debug)]
pub struct NewApp {
    pub name: String,
    pub confidential: bool,
    pub redirect_uris: Vec<String>,
    pub launch_url: Option<String>,
    pub scopes: String,
}

/// Checks a registration; answers it tidied, or the errors by field.
fn check_app(a: &NewApp) -> Result<NewApp, OAuthError> {
    let mut errors = Vec::new();
    let name = a.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        errors.push(FieldError::new("name", "must be 1 to 100 characters"));
    }
    if a.redirect_uris.is_empty() || a.redirect_uris.len() > 10 {
        errors.push(FieldError::new("redirect_uris", "must list 1 to 10 URLs"));
    }
    let mut uris = Vec::new();
    for (i, u) in a.redirect_uris.iter().enumerate() {
        match check_app_url(u.trim()) {
            Ok(_) => uris.push(u.trim().to_owned()),
            Err(m) => errors.push(FieldError::new(format!("redirect_uris[{i}]"), m)),
        }
    }
    let launch_url = match a.launch_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(l) => match check_app_url(l) {
            Ok(_) => Some(l.to_owned()),
            Err(m) => {
                errors.push(FieldError::new("launch_url", m));
                None
            }
        },
    };
    let (parsed, unknown) = Scopes::parse(&a.scopes);
    if !unknown.is_empty() {
        errors.push(FieldError::new(
            "scopes",
            format!(
                "this server does not grant {}: list only launch, launch/patient, offline_access, online_access and patient/ or user/ resource scopes",
                unknown.join(", ")
            ),
        ));
    } else if parsed.resources.is_empty() {
        errors.push(FieldError::new(
            "scopes",
            "must allow at least one resource scope (e.g. patient/Observation.rs)",
        ));
    }
    if errors.is_empty() {
        Ok(NewApp {
            name,
            confidential: a.confidential,
            redirect_uris: uris,
            launch_url,
            scopes: parsed.to_string(),
        })
    } else {
        Err(OAuthError::Invalid(errors))
    }
}

/// What the token endpoint answers.
pub struct Issued {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub expires_in: i64,
    pub scope: String,
    pub patient: Option<String>,
    pub ehr_launch: bool,
    pub grant: GrantRow,
}

/// An introspection answer (RFC 7662).
pub struct Introspection {
    pub active: bool,
    pub scope: String,
    pub client_id: String,
    pub username: String,
    pub exp: i64,
    pub patient: Option<String>,
    pub token_type: &'static str,
}

impl Introspection {
    fn inactive() -> Self {
        Self {
            active: false,
            scope: String::new(),
            client_id: String::new(),
            username: String::new(),
            exp: 0,
            patient: None,
            token_type: "",
        }
    }
}

/// An authorization request after its checks: what the consent page offers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Approved {
    pub client_id: String,
    pub redirect_uri: String,
    /// The authorization request named `redirect_uri` (then the token request must
    /// name the same; RFC 6749 §4.1.3).
    #[serde(default)]
    pub redirect_given: bool,
    pub state: Option<String>,
    pub challenge: String,
    /// The scopes offered (what was asked, within the app's registration).
    pub scope: String,
    /// The patient of an EHR launch.
    pub launch_patient: Option<String>,
    pub ehr_launch: bool,
}

/// The authorization server, built once.
#[derive(Clone)]
pub struct OAuth {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    clock: SharedClock,
    config: OAuthConfig,
    identity: Identity,
}

impl OAuth {
    pub fn new(db: Db, clock: SharedClock, config: OAuthConfig, identity: Identity) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                clock,
                config,
                identity,
            }),
        }
    }

    fn now(&self) -> OffsetDateTime {
        self.inner.clock.now()
    }

    fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn config(&self) -> &OAuthConfig {
        &self.inner.config
    }

    // ---- apps -------------------------------------------------------------------

    /// Registers an app; answers it and, for a confidential one, its secret (shown once).
    pub async fn register(
        &self,
        by: &str,
        app: &NewApp,
    ) -> Result<(ClientRow, Option<Secret>), OAuthError> {
        let app = check_app(app)?;
        let secret = if app.confidential {
            Some(random(SECRET_PREFIX)?)
        } else {
            None
        };
        let now = timestamp(self.now());
        let row = ClientRow {
            id: new_id("app_")?,
            name: app.name,
            confidential: app.confidential,
            secret_hash: secret.as_ref().map(|s| hash(s.expose())),
            redirect_uris: app.redirect_uris,
            launch_url: app.launch_url,
            scopes: app.scopes,
            builtin: false,
            created_by: Some(by.to_owned()),
            created_at: now.clone(),
            updated_at: now,
            disabled_at: None,
        };
        store::insert_client(self.db(), &row).await?;
        Ok((row, secret))
    }

    /// Changes an app's name, URLs and scopes. Narrower scopes apply to its live
    /// grants at their next refresh (and the role check on every request).
    pub async fn update(&self, id: &str, app: &NewApp) -> Result<ClientRow, OAuthError> {
        let mut row = self.app(id).await?;
        let app = check_app(&NewApp {
            confidential: row.confidential,
            ..app.clone()
        })?;
        row.name = app.name;
        row.redirect_uris = app.redirect_uris;
        row.launch_url = app.launch_url;
        row.scopes = app.scopes;
        row.updated_at = timestamp(self.now());
        store::update_client(self.db(), &row).await?;
        Ok(row)
    }

    /// Deletes an app: it can no longer sign anyone in, and every grant made to it is
    /// revoked (its tokens stop working on their next request).
    pub async fn delete(&self, id: &str) -> Result<u64, OAuthError> {
        let mut row = self.app(id).await?;
        let now = timestamp(self.now());
        row.disabled_at = Some(now.clone());
        row.updated_at = now.clone();
        store::update_client(self.db(), &row).await?;
        Ok(store::revoke_client_grants(self.db(), id, &now).await?)
    }

    /// A live app by id.
    pub async fn app(&self, id: &str) -> Result<ClientRow, OAuthError> {
        match store::client(self.db(), id).await? {
            Some(c) if c.disabled_at.is_none() => Ok(c),
            _ => Err(OAuthError::NotFound),
        }
    }

    pub async fn apps(&self) -> Result<Vec<ClientRow>, OAuthError> {
        Ok(store::clients(self.db()).await?)
    }

    /// Registers (or brings up to date) this server's own PRECISE-HBR app: a public
    /// client whose redirect URIs are this server's `/smart/callback`.
    pub async fn ensure_builtin(
        &self,
        client_id: &str,
        redirect_uris: Vec<String>,
        launch_url: Option<String>,
        scopes: &str,
    ) -> Result<(), OAuthError> {
        let now = timestamp(self.now());
        let (parsed, _) = Scopes::parse(scopes);
        let mut granted = parsed;
        granted.launch = true;
        granted.launch_patient = true;
        granted.online_access = true;
        let row = ClientRow {
            id: client_id.to_owned(),
            name: "PRECISE-HBR (built in)".into(),
            confidential: false,
            secret_hash: None,
            redirect_uris,
            launch_url,
            scopes: granted.to_string(),
            builtin: true,
            created_by: None,
            created_at: now.clone(),
            updated_at: now,
            disabled_at: None,
        };
        match store::client(self.db(), client_id).await? {
            None => store::insert_client(self.db(), &row).await?,
            Some(old) => {
                store::update_client(
                    self.db(),
                    &ClientRow {
                        created_at: old.created_at,
                        ..row
                    },
                )
                .await?
            }
        }
        Ok(())
    }

    /// The app of an authorization request, and its redirect URI exactly as registered.
    /// Either unknown → the caller shows an error page (never a redirect).
    pub async fn app_and_redirect(
        &self,
        client_id: &str,
        redirect_uri: Option<&str>,
    ) -> Result<(ClientRow, String), OAuthError> {
        let app = self
            .app(client_id)
            .await
            .map_err(|_| OAuthError::InvalidClient)?;
        let uri = match redirect_uri {
            Some(u) if app.redirect_uris.iter().any(|r| r == u) => u.to_owned(),
            // Only one registered: it may be left out (RFC 6749 §3.1.2.3).
            None if app.redirect_uris.len() == 1 => app.redirect_uris[0].clone(),
            _ => return Err(OAuthError::InvalidRequest("redirect_uri is not registered")),
        };
        Ok((app, uri))
    }

    /// Authenticates a client at the token, introspection and revocation endpoints: a
    /// confidential client by its secret (compared as hashes, in constant time), a
    /// public client by its id alone.
    pub async fn authenticate_client(
        &self,
        client_id: &str,
        secret: Option<&str>,
    ) -> Result<ClientRow, OAuthError> {
        let app = self
            .app(client_id)
            .await
            .map_err(|_| OAuthError::InvalidClient)?;
        match (&app.secret_hash, secret) {
            (Some(h), Some(s)) if crypto::constant_time_eq(h.as_bytes(), hash(s).as_bytes()) => {
                Ok(app)
            }
            (None, None) if !app.confidential => Ok(app),
            _ => Err(OAuthError::InvalidClient),
        }
    }

    // ---- launches ---------------------------------------------------------------

    /// A new EHR launch of `client_id` by a user in a session for a patient: the
    /// single-use `launch` value the app gets.
    pub async fn new_launch(
        &self,
        client_id: &str,
        user_id: &str,
        session_id: &str,
        patient_id: &str,
    ) -> Result<Secret, OAuthError> {
        let launch = random(LAUNCH_PREFIX)?;
        let now = self.now();
        let _ = store::sweep(self.db(), &timestamp(now)).await;
        store::insert_launch(
            self.db(),
            &hash(launch.expose()),
            client_id,
            user_id,
            session_id,
            patient_id,
            &timestamp(now + self.inner.config.launch_ttl.std()),
        )
        .await?;
        Ok(launch)
    }

    /// Spends a launch for this app and user; answers its patient.
    pub async fn spend_launch(
        &self,
        launch: &str,
        client_id: &str,
        user_id: &str,
    ) -> Result<String, OAuthError> {
        let bad = OAuthError::InvalidRequest(
            "the launch is unknown, expired, already used, or for another app or user",
        );
        if launch.len() > 128 {
            return Err(bad);
        }
        let now = timestamp(self.now());
        let row = store::spend_launch(self.db(), &hash(launch), &now)
            .await?
            .ok_or(OAuthError::InvalidRequest(
                "the launch is unknown, expired, already used, or for another app or user",
            ))?;
        if row.expires_at.as_str() <= now.as_str()
            || row.client_id != client_id
            || row.user_id != user_id
        {
            return Err(bad);
        }
        let _ = row.session_id;
        Ok(row.patient_id)
    }

    // ---- codes and tokens -------------------------------------------------------

    /// After consent: the grant and its code.
    pub async fn grant_and_code(
        &self,
        a: &Approved,
        user_id: &str,
        session_id: &str,
        granted: &Scopes,
        patient: Option<&str>,
    ) -> Result<(GrantRow, Secret), OAuthError> {
        let now = self.now();
        let online_only = granted.online_access && !granted.offline_access;
        let grant = GrantRow {
            id: new_id("grt_")?,
            client_id: a.client_id.clone(),
            user_id: user_id.to_owned(),
            patient_id: patient.map(str::to_owned),
            scopes: granted.to_string(),
            session_id: online_only.then(|| session_id.to_owned()),
            ehr_launch: a.ehr_launch,
            created_at: timestamp(now),
            last_used_at: None,
            revoked_at: None,
            client_name: String::new(),
            username: String::new(),
        };
        store::insert_grant(self.db(), &grant).await?;
        let code = random(CODE_PREFIX)?;
        store::insert_code(
            self.db(),
            &hash(code.expose()),
            &grant.id,
            if a.redirect_given {
                &a.redirect_uri
            } else {
                ""
            },
            &a.challenge,
            &timestamp(now + self.inner.config.code_ttl.std()),
        )
        .await?;
        Ok((grant, code))
    }

    /// The tokens of a grant, written on `conn` (the caller's transaction, which also
    /// spent the code or refresh token: one commit).
    async fn issue(
        &self,
        conn: &mut sqlx::AnyConnection,
        grant: GrantRow,
        scopes: &Scopes,
        with_refresh: bool,
    ) -> Result<Issued, OAuthError> {
        let now = self.now();
        let scope = scopes.to_string();
        let access = random(ACCESS_PREFIX)?;
        let ttl = self.inner.config.access_ttl.std();
        let created = timestamp(now);
        store::insert_token(
            &mut *conn,
            &store::NewToken {
                id: &new_id("tok_")?,
                hash: &hash(access.expose()),
                grant_id: &grant.id,
                user_id: &grant.user_id,
                kind: "access",
                scopes: &scope,
                created_at: &created,
                expires_at: &timestamp(now + ttl),
            },
        )
        .await?;
        let refresh = if with_refresh {
            let r = random(REFRESH_PREFIX)?;
            store::insert_token(
                &mut *conn,
                &store::NewToken {
                    id: &new_id("tok_")?,
                    hash: &hash(r.expose()),
                    grant_id: &grant.id,
                    user_id: &grant.user_id,
                    kind: "refresh",
                    scopes: &scope,
                    created_at: &created,
                    expires_at: &timestamp(now + self.inner.config.refresh_ttl.std()),
                },
            )
            .await?;
            Some(r)
        } else {
            None
        };
        Ok(Issued {
            access_token: access,
            refresh_token: refresh,
            expires_in: i64::try_from(ttl.as_secs()).unwrap_or(3600),
            scope,
            patient: grant.patient_id.clone(),
            ehr_launch: grant.ehr_launch,
            grant,
        })
    }

    /// A live grant whose user may still sign in.
    async fn live_grant(&self, id: &str) -> Result<GrantRow, OAuthError> {
        let g = store::grant(self.db(), id)
            .await?
            .filter(|g| g.revoked_at.is_none())
            .ok_or(OAuthError::InvalidGrant("the grant was revoked"))?;
        let user = self
            .inner
            .identity
            .user(&g.user_id)
            .await
            .map_err(|_| OAuthError::InvalidGrant("the account is gone"))?;
        if !user.active {
            return Err(OAuthError::InvalidGrant("the account is deactivated"));
        }
        if let Some(s) = &g.session_id
            && !self
                .inner
                .identity
                .session_is_live(s)
                .await
                .map_err(|_| OAuthError::InvalidGrant("the session could not be checked"))?
        {
            return Err(OAuthError::InvalidGrant(
                "online access ended with the session that granted it",
            ));
        }
        Ok(g)
    }

    /// `grant_type=authorization_code`. The code is spent and the tokens written in one
    /// transaction (one commit); everything that reads other rows is checked before it.
    pub async fn exchange_code(
        &self,
        client: &ClientRow,
        code: &str,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        if code.len() > 128 {
            return Err(OAuthError::InvalidGrant("the code is not valid"));
        }
        let now = timestamp(self.now());
        let code_hash = hash(code);
        let row = store::code(self.db(), &code_hash)
            .await?
            .ok_or(OAuthError::InvalidGrant("the code is not valid"))?;
        let replayed = || async {
            // A replayed code: someone else may hold it. Everything of the grant ends.
            store::revoke_grant(self.db(), &row.grant_id, &now).await?;
            Err(OAuthError::Replayed {
                grant_id: row.grant_id.clone(),
                what: "the code was used before; every token of its grant is revoked",
            })
        };
        if row.used_at.is_some() {
            return replayed().await;
        }
        let grant = self.live_grant(&row.grant_id).await;
        let checked = grant.and_then(|grant| {
            if grant.client_id != client.id {
                return Err(OAuthError::InvalidGrant(
                    "the code was issued to another client",
                ));
            }
            if row.expires_at.as_str() <= now.as_str() {
                return Err(OAuthError::InvalidGrant("the code expired"));
            }
            let redirect_ok = match (row.redirect_uri.as_str(), redirect_uri) {
                // Left out of the authorization request: may be left out here too, or
                // be the registered one.
                ("", None) => true,
                ("", Some(u)) => client.redirect_uris.iter().any(|r| r == u),
                (named, given) => given == Some(named),
            };
            if !redirect_ok {
                return Err(OAuthError::InvalidGrant(
                    "redirect_uri is not the one of the authorization request",
                ));
            }
            let Some(v) = verifier.filter(|v| verifier_ok(v)) else {
                return Err(OAuthError::InvalidGrant(
                    "code_verifier is missing or not a PKCE verifier",
                ));
            };
            if !crypto::constant_time_eq(s256(v).as_bytes(), row.challenge.as_bytes()) {
                return Err(OAuthError::InvalidGrant(
                    "code_verifier does not match the code_challenge",
                ));
            }
            Ok(grant)
        });
        let mut tx = self.db().writer().begin().await.map_err(StoreError::from)?;
        if !store::spend_code(&mut tx, &code_hash, &now).await? {
            tx.commit().await.map_err(StoreError::from)?;
            return replayed().await;
        }
        let grant = match checked {
            Ok(g) => g,
            Err(e) => {
                // A failed exchange spends the code too.
                tx.commit().await.map_err(StoreError::from)?;
                return Err(e);
            }
        };
        // Within the app's registration as it is now (an administrator may have
        // narrowed it since the consent).
        let scopes = Scopes::parse(&grant.scopes)
            .0
            .within(&Scopes::parse(&client.scopes).0);
        let refresh = scopes.offline_access || scopes.online_access;
        let issued = self.issue(&mut tx, grant, &scopes, refresh).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(issued)
    }

    /// `grant_type=refresh_token`: rotated on every use; a replay revokes the grant; a
    /// `scope` narrows (never widens).
    pub async fn refresh(
        &self,
        client: &ClientRow,
        token: &str,
        scope: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        let bad = OAuthError::InvalidGrant("the refresh token is not valid");
        if !token.starts_with(REFRESH_PREFIX) || token.len() > 128 {
            return Err(bad);
        }
        let now = timestamp(self.now());
        let row = store::token_by_hash(self.db(), &hash(token))
            .await?
            .filter(|t| t.kind == "refresh")
            .ok_or(OAuthError::InvalidGrant("the refresh token is not valid"))?;
        let grant = store::grant(self.db(), &row.grant_id)
            .await?
            .ok_or(OAuthError::InvalidGrant("the refresh token is not valid"))?;
        if grant.client_id != client.id {
            return Err(OAuthError::InvalidGrant(
                "the refresh token was issued to another client",
            ));
        }
        if row.revoked_at.is_some() {
            return Err(bad);
        }
        // What the token held, within the app's registration as it is now.
        let held = Scopes::parse(&row.scopes)
            .0
            .within(&Scopes::parse(&client.scopes).0);
        let scopes = match scope.map(str::trim).filter(|s| !s.is_empty()) {
            None => held,
            Some(s) => {
                let (asked, unknown) = Scopes::parse(s);
                if !unknown.is_empty() || !asked.subset_of(&held) {
                    return Err(OAuthError::InvalidScope);
                }
                asked
            }
        };
        let replayed = || async {
            store::revoke_grant(self.db(), &grant.id, &now).await?;
            Err(OAuthError::Replayed {
                grant_id: grant.id.clone(),
                what: "the refresh token was used before; every token of its grant is revoked",
            })
        };
        if row.used_at.is_some() {
            return replayed().await;
        }
        let live = self.live_grant(&grant.id).await;
        // Spent and replaced in one transaction (one commit).
        let mut tx = self.db().writer().begin().await.map_err(StoreError::from)?;
        if !store::spend_refresh(&mut tx, &row.id, &now).await? {
            tx.commit().await.map_err(StoreError::from)?;
            return replayed().await;
        }
        let checked = live.and_then(|g| {
            if row.expires_at.as_str() <= now.as_str() {
                Err(OAuthError::InvalidGrant("the refresh token expired"))
            } else {
                Ok(g)
            }
        });
        let live = match checked {
            Ok(g) => g,
            Err(e) => {
                tx.commit().await.map_err(StoreError::from)?;
                return Err(e);
            }
        };
        let refresh = scopes.offline_access || scopes.online_access;
        let issued = self.issue(&mut tx, live, &scopes, refresh).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(issued)
    }

    /// RFC 7662: what a token is, to the client it was issued to.
    pub async fn introspect(&self, client: &ClientRow, token: &str) -> Introspection {
        match self.introspect_inner(client, token).await {
            Ok(Some(i)) => i,
            Ok(None) => Introspection::inactive(),
            Err(e) => {
                tracing::warn!(error = %e, "introspection failed; answered inactive");
                Introspection::inactive()
            }
        }
    }

    async fn introspect_inner(
        &self,
        client: &ClientRow,
        token: &str,
    ) -> Result<Option<Introspection>, OAuthError> {
        if token.len() > 128 {
            return Ok(None);
        }
        let Some(row) = store::token_by_hash(self.db(), &hash(token)).await? else {
            return Ok(None);
        };
        let now = timestamp(self.now());
        if row.revoked_at.is_some()
            || row.used_at.is_some()
            || row.expires_at.as_str() <= now.as_str()
        {
            return Ok(None);
        }
        let Ok(grant) = self.live_grant(&row.grant_id).await else {
            return Ok(None);
        };
        if grant.client_id != client.id {
            return Ok(None);
        }
        let exp = OffsetDateTime::parse(
            &row.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map(OffsetDateTime::unix_timestamp)
        .unwrap_or(0);
        Ok(Some(Introspection {
            active: true,
            scope: row.scopes,
            client_id: grant.client_id,
            username: grant.username,
            exp,
            patient: grant.patient_id,
            token_type: if row.kind == "access" {
                "Bearer"
            } else {
                "refresh_token"
            },
        }))
    }

    /// RFC 7009: revokes a token of this client (a refresh token takes its whole grant
    /// with it). Unknown tokens are not an error. Answers the grant touched.
    pub async fn revoke_token(
        &self,
        client: &ClientRow,
        token: &str,
    ) -> Result<Option<String>, OAuthError> {
        if token.len() > 128 {
            return Ok(None);
        }
        let Some(row) = store::token_by_hash(self.db(), &hash(token)).await? else {
            return Ok(None);
        };
        let Some(grant) = store::grant(self.db(), &row.grant_id).await? else {
            return Ok(None);
        };
        if grant.client_id != client.id {
            return Ok(None);
        }
        let now = timestamp(self.now());
        if row.kind == "refresh" {
            store::revoke_grant(self.db(), &grant.id, &now).await?;
        } else {
            store::revoke_token(self.db(), &row.id, &now).await?;
        }
        Ok(Some(grant.id))
    }

    // ---- grants -----------------------------------------------------------------

    pub async fn grants(
        &self,
        user: Option<&str>,
        client: Option<&str>,
    ) -> Result<Vec<GrantRow>, OAuthError> {
        Ok(store::live_grants(self.db(), user, client, 500).await?)
    }

    /// Revokes one grant; `owner` limits it to a user's own.
    pub async fn revoke_grant(&self, id: &str, owner: Option<&str>) -> Result<(), OAuthError> {
        let g = store::grant(self.db(), id)
            .await?
            .filter(|g| g.revoked_at.is_none())
            .filter(|g| owner.is_none_or(|o| o == g.user_id))
            .ok_or(OAuthError::NotFound)?;
        store::revoke_grant(self.db(), &g.id, &timestamp(self.now())).await?;
        Ok(())
    }

    /// Revokes every grant of a user (sign-out everywhere, deactivation, password
    /// change by an administrator).
    pub async fn revoke_user(&self, user_id: &str) -> Result<u64, OAuthError> {
        Ok(store::revoke_user_grants(self.db(), user_id, &timestamp(self.now())).await?)
    }

    /// Revokes every grant of an app.
    pub async fn revoke_app(&self, client_id: &str) -> Result<u64, OAuthError> {
        self.app(client_id).await?;
        Ok(store::revoke_client_grants(self.db(), client_id, &timestamp(self.now())).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_known_answer() {
        // RFC 7636, appendix B.
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(verifier_ok("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert!(!verifier_ok("short"));
        assert!(!verifier_ok(&"a b".repeat(20)));
    }

    #[test]
    fn app_urls() {
        assert!(check_app_url("https://app.example/cb").is_ok());
        assert!(check_app_url("http://127.0.0.1:9000/cb").is_ok());
        assert!(check_app_url("http://localhost/cb").is_ok());
        assert!(check_app_url("http://[::1]:8/cb").is_ok());
        for bad in [
            "http://app.example/cb",
            "https://*.example/cb",
            "https://app.example/cb#x",
            "/cb",
            "javascript:alert(1)",
            "https://user:pw@app.example/cb",
            "http://localhost.evil.example/cb",
            "https://app.example/cb http://evil.example/cb",
        ] {
            assert!(check_app_url(bad).is_err(), "{bad}");
        }
    }
}
