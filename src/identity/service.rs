//! The identity rules: accounts, sign-in with lockout, sessions, TOTP, API tokens.
//! No HTTP here; time comes from the clock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::delegation::Grantor;
use super::model::{AttemptReason, User, Username, parse_email};
use super::password::{self, Hasher, Policy};
use super::store::{self, Attempt, NewSession, TokenLookup, TokenRow};
use super::totp;
use crate::access::{Credential, Permission, Principal};
use crate::clock::{SharedClock, timestamp};
use crate::config::{Config, Secret};
use crate::crypto::{self, CryptoError, SharedKeyring};
use crate::http::client_ip::network_key_of;
use crate::store::{Db, StoreError};

pub const SESSION_PREFIX: &str = "cst_";
pub const API_TOKEN_PREFIX: &str = "cat_";
/// A SMART app's access token (`src/oauth`).
pub const SMART_TOKEN_PREFIX: &str = "sat_";
const TOTP_PURPOSE: &str = "custodian/identity/totp/v1";
const RECOVERY_PURPOSE: &str = "custodian/identity/recovery-codes/v1";

/// Errors of the identity layer; `routes.rs` maps them to problems in one place.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("unauthorized")]
    Unauthorized,
    /// A session that was valid has ended by time: idle too long, or past its absolute
    /// lifetime (still a 401 `unauthorized`, with a `detail` that says so).
    #[error("session expired")]
    SessionExpired(Expiry),
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("TOTP code required")]
    MfaRequired,
    #[error("invalid TOTP code")]
    InvalidTotp,
    /// A passkey answer that did not verify, or a ceremony unknown, used or expired.
    #[error("passkey not accepted")]
    InvalidPasskey,
    #[error("account locked")]
    Locked { retry_after: u64 },
    #[error("too many failures from this address")]
    RateLimited { retry_after: u64 },
    /// The password is past `password.max_age`, or an administrator set it and the
    /// user must change it (`set_by_admin`).
    #[error("password expired")]
    PasswordExpired { set_by_admin: bool },
    #[error("password policy")]
    Policy(Vec<&'static str>),
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, &'static str),
    #[error("conflict: {0}")]
    Conflict(&'static str),
    #[error("not found")]
    NotFound,
    /// Beyond what the caller holds (delegation); the text says which permissions.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A change to the caller's own credentials needs the current password (and second
    /// factor) again.
    #[error("reauthentication required")]
    ReauthenticationRequired,
    #[error("busy")]
    Busy,
    /// Too many passkey sign-ins open at once (`passkeys::MAX_OPEN_SIGN_INS`).
    #[error("too many sign-ins in progress")]
    TooBusy,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Internal(String),
}

impl From<password::PasswordError> for IdentityError {
    fn from(e: password::PasswordError) -> Self {
        match e {
            password::PasswordError::Busy => IdentityError::Busy,
            other => IdentityError::Internal(other.to_string()),
        }
    }
}

/// Why a session ended by time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Unused for longer than `session.idle_timeout`.
    Idle,
    /// Older than `session.absolute_timeout`.
    Absolute,
}

/// The numbers the rules use, from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub max_failures: u32,
    pub lock_duration: Duration,
    pub ip_max_failures: u32,
    pub address_max_failures: u32,
    pub address_window: Duration,
    pub reauth_window: Duration,
    pub mfa_required: bool,
    /// Roles that must sign in with a passkey.
    pub phishing_resistant_roles: Vec<String>,
    pub challenge_ttl: Duration,
    pub token_max_lifetime: Duration,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            policy: Policy::from_config(&c.password),
            idle_timeout: c.session.idle_timeout.std(),
            absolute_timeout: c.session.absolute_timeout.std(),
            max_failures: c.lockout.max_failures,
            lock_duration: c.lockout.duration.std(),
            ip_max_failures: c.lockout.ip_max_failures,
            address_max_failures: c.lockout.address_max_failures,
            address_window: c.lockout.address_window.std(),
            reauth_window: c.session.reauth_window.std(),
            mfa_required: c.mfa.required,
            phishing_resistant_roles: c.mfa.phishing_resistant_roles.clone(),
            challenge_ttl: c.passkeys.challenge_ttl.std(),
            token_max_lifetime: c.api_tokens.max_lifetime.std(),
        }
    }
}

/// Who is signing in, from where.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// The identity service.
#[derive(Clone)]
pub struct Identity {
    db: Db,
    hasher: Hasher,
    clock: SharedClock,
    keys: Arc<SharedKeyring>,
    settings: Arc<Settings>,
    pub(super) webauthn: Arc<webauthn_rs::Webauthn>,
}

/// A change of one's own password: what the person sends, and what else ends.
pub struct PasswordChange<'a> {
    pub current: &'a Secret,
    /// The TOTP or recovery code, needed when TOTP is on.
    pub code: Option<&'a str>,
    pub new: &'a Secret,
    /// The session making the change, which stays (None: every session ends).
    pub keep_session: Option<&'a str>,
    /// Also revoke every personal API token of the account.
    pub revoke_tokens: bool,
}

/// A new session's token (shown once).
pub struct NewLogin {
    pub token: Secret,
    pub expires_in: u64,
    pub user: User,
    pub permissions: Vec<String>,
    pub password_expires_at: Option<String>,
    pub used_recovery_code: bool,
    /// How it signed in (`password+totp`, `passkey`, …).
    pub method: String,
}

/// The second factor sent with a password: a TOTP or recovery code, or the answer to a
/// passkey challenge (`ceremony`, the credential).
#[derive(Clone, Copy, Default)]
pub struct SecondFactorAnswer<'a> {
    pub code: Option<&'a str>,
    pub passkey: Option<(&'a str, &'a serde_json::Value)>,
}

/// What the audit trail and the login history learn about an attempt.
#[derive(Clone, Debug)]
pub struct AttemptFacts {
    pub username: String,
    pub user_id: Option<String>,
    pub reason: AttemptReason,
    /// This failure locked the account.
    pub locked_now: bool,
}

#[derive(Clone, Copy)]
pub(super) enum AddressCheck {
    AcrossUsernames,
    ThisUsername,
}

/// The failure counters an attempt touches: the username's (its lock), the address's
/// across usernames, and the address's on this username.
pub(super) struct FailureKeys {
    user: String,
    ip: Option<String>,
    pub(super) pair: Option<String>,
}

impl FailureKeys {
    pub(super) fn new(username: &str, origin: &Origin) -> Self {
        Self {
            user: user_key(username),
            // Counted per network (an IPv6 /64 as one), so that the addresses of one
            // subscriber's network do not each get a fresh count.
            ip: origin
                .ip
                .as_deref()
                .map(|ip| format!("ip:{}", network_key_of(ip))),
            pair: origin
                .ip
                .as_deref()
                .map(|ip| format!("{}{}", pair_prefix(username), network_key_of(ip))),
        }
    }
}

/// The lock key of a (normalised) username.
pub fn user_key(username: &str) -> String {
    format!("user:{username}")
}

/// The start of the keys counting one username's failures per address.
fn pair_prefix(username: &str) -> String {
    format!("pair:{username}|")
}

fn add(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t.checked_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
        .unwrap_or(t)
}

fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Identity {
    pub fn new(
        db: Db,
        hasher: Hasher,
        clock: SharedClock,
        keys: Arc<SharedKeyring>,
        settings: Settings,
        webauthn: webauthn_rs::Webauthn,
    ) -> Self {
        Self {
            db,
            hasher,
            clock,
            keys,
            settings: Arc::new(settings),
            webauthn: Arc::new(webauthn),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub(super) fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// When a password set at `changed_at` expires, if the policy expires passwords.
    pub fn password_expires_at(&self, changed_at: &str) -> Option<OffsetDateTime> {
        let max_age = self.settings.policy.max_age?;
        parse_ts(changed_at).map(|t| add(t, max_age))
    }

    fn check_policy(
        &self,
        password: &Secret,
        username: &str,
        email: Option<&str>,
    ) -> Result<(), IdentityError> {
        let v = self
            .settings
            .policy
            .check(password.expose(), username, email);
        if v.is_empty() {
            Ok(())
        } else {
            Err(IdentityError::Policy(v))
        }
    }

    // ---- accounts --------------------------------------------------------------

    /// Creates an account (admin API, `custodian user create`, the dev bootstrap). A
    /// user creating it must hold every permission of `role`.
    pub async fn create_user(
        &self,
        by: Grantor<'_>,
        username: &str,
        email: Option<&str>,
        role: &str,
        password: &Secret,
    ) -> Result<User, IdentityError> {
        self.create_user_with(by, username, email, role, password, false)
            .await
    }

    /// [`Self::create_user`], and with `must_change_password` the user must change the
    /// password at the first sign-in (an administrator typed it).
    pub async fn create_user_with(
        &self,
        by: Grantor<'_>,
        username: &str,
        email: Option<&str>,
        role: &str,
        password: &Secret,
        must_change_password: bool,
    ) -> Result<User, IdentityError> {
        if role == super::roles::PATIENT_ROLE {
            return Err(IdentityError::Invalid(
                "role",
                "is given only by a patient invitation, made from the patient's record",
            ));
        }
        self.insert_user(
            by,
            username,
            email,
            role,
            password,
            must_change_password,
            None,
        )
        .await
    }

    /// Creates a patient account linked to `patient_id` (the acceptance of a patient
    /// invitation): the `patient` role, never anything else. One account per patient
    /// record (409).
    pub async fn create_patient_user(
        &self,
        username: &str,
        email: Option<&str>,
        password: &Secret,
        patient_id: &str,
    ) -> Result<User, IdentityError> {
        if store::user_by_patient(&self.db, patient_id)
            .await?
            .is_some()
        {
            return Err(IdentityError::Conflict(
                "this patient record has an account already",
            ));
        }
        self.insert_user(
            Grantor::Operator,
            username,
            email,
            super::roles::PATIENT_ROLE,
            password,
            false,
            Some(patient_id),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_user(
        &self,
        by: Grantor<'_>,
        username: &str,
        email: Option<&str>,
        role: &str,
        password: &Secret,
        must_change_password: bool,
        patient_id: Option<&str>,
    ) -> Result<User, IdentityError> {
        let username =
            Username::parse(username).map_err(|m| IdentityError::Invalid("username", m))?;
        let email = email
            .map(parse_email)
            .transpose()
            .map_err(|m| IdentityError::Invalid("email", m))?;
        if password.expose().chars().count() > super::model::MAX_PASSWORD {
            return Err(IdentityError::Policy(vec![password::TOO_LONG]));
        }
        if !store::role_exists(&self.db, role).await? {
            return Err(IdentityError::Invalid("role", "is not a role"));
        }
        by.covers_role(&self.db, role).await?;
        self.check_policy(password, username.as_str(), email.as_deref())?;
        let hash = self.hasher.hash(password).await?;
        let now = timestamp(self.now());
        let user = User {
            id: new_id(),
            username: username.as_str().to_owned(),
            email,
            role: role.to_owned(),
            active: true,
            password_hash: hash,
            password_changed_at: now.clone(),
            totp_secret: None,
            totp_enabled: false,
            totp_last_step: None,
            created_at: now.clone(),
            updated_at: now,
            must_change_password,
            patient_id: patient_id.map(str::to_owned),
        };
        if !store::insert_user(&self.db, &user, &new_id()).await? {
            if let Some(p) = patient_id
                && store::user_by_patient(&self.db, p).await?.is_some()
            {
                return Err(IdentityError::Conflict(
                    "this patient record has an account already",
                ));
            }
            return Err(IdentityError::Conflict("the username is taken"));
        }
        Ok(user)
    }

    pub async fn count_users(&self) -> Result<i64, IdentityError> {
        Ok(store::count_users(&self.db).await?)
    }

    // ---- sign-in ---------------------------------------------------------------

    /// Signs in. Every outcome comes back with the facts to record; the caller writes
    /// the login history row (through [`Identity::record_attempt`]) and the audit event.
    pub async fn login(
        &self,
        username_raw: &str,
        password: &Secret,
        totp_code: Option<&str>,
        origin: &Origin,
    ) -> (Result<NewLogin, IdentityError>, AttemptFacts) {
        self.login_with(
            username_raw,
            password,
            SecondFactorAnswer {
                code: totp_code,
                passkey: None,
            },
            origin,
        )
        .await
    }

    /// [`Self::login`] with the second factor as a code or a passkey answer.
    pub async fn login_with(
        &self,
        username_raw: &str,
        password: &Secret,
        second: SecondFactorAnswer<'_>,
        origin: &Origin,
    ) -> (Result<NewLogin, IdentityError>, AttemptFacts) {
        let username = Username::normalise(username_raw);
        let mut facts = AttemptFacts {
            username: username.clone(),
            user_id: None,
            reason: AttemptReason::BadPassword,
            locked_now: false,
        };
        let result = self
            .login_inner(&username, password, second, origin, &mut facts)
            .await;
        (result, facts)
    }

    async fn login_inner(
        &self,
        username: &str,
        password: &Secret,
        second: SecondFactorAnswer<'_>,
        origin: &Origin,
        facts: &mut AttemptFacts,
    ) -> Result<NewLogin, IdentityError> {
        let now = self.now();
        let keys = FailureKeys::new(username, origin);

        let user = store::user_by_username(&self.db, username).await?;
        facts.user_id = user.as_ref().map(|u| u.id.clone());
        self.gate(&keys, now, facts).await?;

        // Unknown users are checked against a dummy hash, so the time is the same.
        let verified = self
            .hasher
            .verify(password, user.as_ref().map(|u| u.password_hash.as_str()))
            .await?;
        let Some(user) = user else {
            facts.reason = AttemptReason::UnknownUser;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidCredentials);
        };
        if !verified.ok {
            facts.reason = AttemptReason::BadPassword;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidCredentials);
        }
        if !user.active {
            facts.reason = AttemptReason::Inactive;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidCredentials);
        }

        let mut used_recovery_code = false;
        let mut method = "password";
        let has_passkey = super::passkeys::passkey_count(&self.db, &user.id).await? > 0;
        if user.totp_enabled || has_passkey {
            let code = second.code.map(str::trim).filter(|c| !c.is_empty());
            if let Some((ceremony, answer)) = second.passkey.filter(|_| has_passkey) {
                if !self
                    .passkey_second_factor_ok(&user, ceremony, answer)
                    .await?
                {
                    facts.reason = AttemptReason::BadPasskey;
                    self.count_failure(&keys, now, facts).await?;
                    return Err(IdentityError::InvalidPasskey);
                }
                method = "password+passkey";
            } else if let Some(code) = code {
                match self.check_second_factor(&user, code, now).await? {
                    SecondFactor::Totp => method = "password+totp",
                    SecondFactor::RecoveryCode => {
                        used_recovery_code = true;
                        method = "password+recovery_code";
                    }
                    SecondFactor::Wrong => {
                        facts.reason = AttemptReason::BadTotp;
                        self.count_failure(&keys, now, facts).await?;
                        return Err(IdentityError::InvalidTotp);
                    }
                }
            } else {
                facts.reason = AttemptReason::MfaRequired;
                return Err(IdentityError::MfaRequired);
            }
        }

        // The password and second factor are right: the failure count starts again.
        self.count_success(&keys).await?;
        if verified.needs_rehash
            && let Ok(new_hash) = self.hasher.hash(password).await
        {
            store::rehash(&self.db, &user.id, &user.password_hash, &new_hash).await?;
        }
        let expires_at = self.password_expires_at(&user.password_changed_at);
        if user.must_change_password || expires_at.is_some_and(|t| t <= now) {
            facts.reason = AttemptReason::Expired;
            return Err(IdentityError::PasswordExpired {
                set_by_admin: user.must_change_password,
            });
        }

        facts.reason = AttemptReason::Success;
        self.open_session(user, origin, method, used_recovery_code)
            .await
    }

    /// A new session for `user`, signed in by `method`.
    pub(super) async fn open_session(
        &self,
        user: User,
        origin: &Origin,
        method: &str,
        used_recovery_code: bool,
    ) -> Result<NewLogin, IdentityError> {
        let now = self.now();
        let now_s = timestamp(now);
        let (token, hash) = crypto::new_token(SESSION_PREFIX)?;
        let absolute = add(now, self.settings.absolute_timeout);
        store::insert_session(
            &self.db,
            &NewSession {
                id: &new_id(),
                user_id: &user.id,
                token_hash: &hash,
                now: &now_s,
                absolute_expires_at: &timestamp(absolute),
                ip: origin.ip.as_deref(),
                user_agent: origin.user_agent.as_deref(),
                method,
            },
        )
        .await?;
        let permissions = store::role_permissions(&self.db, &user.role).await?;
        Ok(NewLogin {
            token: Secret::new(token),
            expires_in: self.settings.idle_timeout.as_secs(),
            permissions,
            password_expires_at: self
                .password_expires_at(&user.password_changed_at)
                .map(crate::clock::rfc3339),
            user,
            used_recovery_code,
            method: method.to_owned(),
        })
    }

    /// The checks before any password is verified, in order: the address's throttle
    /// across usernames (429), the username's lock (423, even with the right password),
    /// and the address's throttle on this username (429). An attempt they stop is not
    /// verified and counts nowhere.
    async fn gate(
        &self,
        keys: &FailureKeys,
        now: OffsetDateTime,
        facts: &mut AttemptFacts,
    ) -> Result<(), IdentityError> {
        let now_s = timestamp(now);
        self.gate_address(keys, now, facts, AddressCheck::AcrossUsernames)
            .await?;
        if let Some(until) = store::locked_until(&self.db, &keys.user, &now_s).await? {
            facts.reason = AttemptReason::Locked;
            return Err(IdentityError::Locked {
                retry_after: seconds_until(now, &until),
            });
        }
        // One address that keeps failing on one username (it locked the account once
        // already, or twice) may not go on: it cannot lock the account again and again.
        self.gate_address(keys, now, facts, AddressCheck::ThisUsername)
            .await
    }

    /// The address's throttles: across usernames (password spraying), or on this
    /// username.
    pub(super) async fn gate_address(
        &self,
        keys: &FailureKeys,
        now: OffsetDateTime,
        facts: &mut AttemptFacts,
        which: AddressCheck,
    ) -> Result<(), IdentityError> {
        let now_s = timestamp(now);
        let key = match which {
            AddressCheck::AcrossUsernames => &keys.ip,
            AddressCheck::ThisUsername => &keys.pair,
        };
        if let Some(k) = key
            && let Some(until) = store::locked_until(&self.db, k, &now_s).await?
        {
            facts.reason = AttemptReason::RateLimited;
            return Err(IdentityError::RateLimited {
                retry_after: seconds_until(now, &until),
            });
        }
        Ok(())
    }

    pub(super) async fn count_failure(
        &self,
        keys: &FailureKeys,
        now: OffsetDateTime,
        facts: &mut AttemptFacts,
    ) -> Result<(), IdentityError> {
        let now_s = timestamp(now);
        let settings = &self.settings;
        let until = timestamp(add(now, settings.lock_duration));
        // Consecutive failures of a username never expire by themselves (only a success,
        // an admin unlock or the end of a lock starts them again).
        let n = store::count_failure(&self.db, &keys.user, &now_s, "").await?;
        if settings.max_failures > 0 && n >= i64::from(settings.max_failures) {
            store::lock(&self.db, &keys.user, &until).await?;
            facts.locked_now = true;
        }
        let windowed = |key: &str, window: Duration, max: u32| {
            let db = self.db.clone();
            let key = key.to_owned();
            let now_s = now_s.clone();
            async move {
                let start = timestamp(
                    now - time::Duration::try_from(window).unwrap_or(time::Duration::ZERO),
                );
                let n = store::count_failure(&db, &key, &now_s, &start).await?;
                if max > 0 && n >= i64::from(max) {
                    store::lock(&db, &key, &timestamp(add(now, window))).await?;
                }
                Ok::<_, StoreError>(())
            }
        };
        if let Some(k) = &keys.ip {
            windowed(k, settings.lock_duration, settings.ip_max_failures).await?;
        }
        if let Some(k) = &keys.pair {
            windowed(k, settings.address_window, settings.address_max_failures).await?;
        }
        Ok(())
    }

    /// A right password (and second factor): the username's and this address's counts
    /// on it start again.
    async fn count_success(&self, keys: &FailureKeys) -> Result<(), IdentityError> {
        store::clear_failures(&self.db, &keys.user).await?;
        if let Some(k) = &keys.pair {
            store::clear_failures(&self.db, k).await?;
        }
        Ok(())
    }

    /// Writes the login-history row of an attempt.
    pub async fn record_attempt(
        &self,
        facts: &AttemptFacts,
        origin: &Origin,
    ) -> Result<(), IdentityError> {
        store::record_attempt(
            &self.db,
            &Attempt {
                // Time-ordered, so attempts in the same microsecond keep their order.
                id: &uuid::Uuid::now_v7().to_string(),
                at: &timestamp(self.now()),
                username: &facts.username,
                user_id: facts.user_id.as_deref(),
                ip: origin.ip.as_deref(),
                user_agent: origin.user_agent.as_deref(),
                success: facts.reason == AttemptReason::Success,
                reason: facts.reason.as_str(),
            },
        )
        .await?;
        Ok(())
    }

    /// Re-authentication before a change to the caller's own credentials (password,
    /// second factor): the current password and, when TOTP is on, a TOTP or recovery
    /// code, behind the same throttles and lock as sign-in. Every failure counts like a
    /// failed sign-in and is written to the login history. Returns the facts for the
    /// request's audit event.
    pub async fn reauthenticate(
        &self,
        user: &User,
        password: &Secret,
        code: Option<&str>,
        origin: &Origin,
    ) -> (Result<(), IdentityError>, AttemptFacts) {
        let mut facts = AttemptFacts {
            username: user.username.clone(),
            user_id: Some(user.id.clone()),
            reason: AttemptReason::BadPassword,
            locked_now: false,
        };
        let result = self
            .reauth_inner(user, password, code, origin, &mut facts)
            .await;
        if result.is_err()
            && let Err(e) = self.record_attempt(&facts, origin).await
        {
            return (Err(e), facts);
        }
        (result, facts)
    }

    async fn reauth_inner(
        &self,
        user: &User,
        password: &Secret,
        code: Option<&str>,
        origin: &Origin,
        facts: &mut AttemptFacts,
    ) -> Result<(), IdentityError> {
        if password.expose().chars().count() > super::model::MAX_PASSWORD {
            return Err(IdentityError::Invalid(
                "password",
                "must be at most 1024 characters",
            ));
        }
        let now = self.now();
        let keys = FailureKeys::new(&user.username, origin);
        self.gate(&keys, now, facts).await?;
        let verified = self
            .hasher
            .verify(password, Some(&user.password_hash))
            .await?;
        if !verified.ok {
            facts.reason = AttemptReason::BadPassword;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidCredentials);
        }
        if user.totp_enabled {
            let Some(code) = code.map(str::trim).filter(|c| !c.is_empty()) else {
                facts.reason = AttemptReason::MfaRequired;
                return Err(IdentityError::MfaRequired);
            };
            if let SecondFactor::Wrong = self.check_second_factor(user, code, now).await? {
                facts.reason = AttemptReason::BadTotp;
                self.count_failure(&keys, now, facts).await?;
                return Err(IdentityError::InvalidTotp);
            }
        }
        self.count_success(&keys).await?;
        facts.reason = AttemptReason::Success;
        Ok(())
    }

    /// Whether a session was signed in with a password within `session.reauth_window`.
    pub async fn session_is_fresh(&self, session_id: &str) -> Result<bool, IdentityError> {
        let created = store::session_created_at(&self.db, session_id).await?;
        let now = self.now();
        Ok(created
            .as_deref()
            .and_then(parse_ts)
            .is_some_and(|t| t <= now && add(t, self.settings.reauth_window) > now))
    }

    /// Checks a second factor outside sign-in (a password-reset link's code): a wrong
    /// one counts like a failed sign-in and is written to the login history.
    pub async fn second_factor_counted(
        &self,
        user: &User,
        code: &str,
        origin: &Origin,
    ) -> Result<(), IdentityError> {
        let mut facts = AttemptFacts {
            username: user.username.clone(),
            user_id: Some(user.id.clone()),
            reason: AttemptReason::BadTotp,
            locked_now: false,
        };
        let now = self.now();
        let keys = FailureKeys::new(&user.username, origin);
        let result = async {
            // Not the account's lock: a reset link is the way back from a lock. The
            // address throttles hold, each failure counts, and the link has a budget
            // of its own (accounts).
            self.gate_address(&keys, now, &mut facts, AddressCheck::AcrossUsernames)
                .await?;
            self.gate_address(&keys, now, &mut facts, AddressCheck::ThisUsername)
                .await?;
            match self.check_second_factor(user, code, now).await? {
                SecondFactor::Wrong => {
                    facts.reason = AttemptReason::BadTotp;
                    self.count_failure(&keys, now, &mut facts).await?;
                    Err(IdentityError::InvalidTotp)
                }
                _ => Ok(()),
            }
        }
        .await;
        if result.is_err() {
            self.record_attempt(&facts, origin).await?;
        }
        result
    }

    /// An administrator ends a lock early (not of an account holding more than they do:
    /// that would let them go on guessing its password).
    pub async fn unlock(&self, by: Grantor<'_>, user_id: &str) -> Result<(), IdentityError> {
        let user = store::user_by_id(&self.db, user_id)
            .await?
            .ok_or(IdentityError::NotFound)?;
        by.may_manage(&self.db, &user.role).await?;
        store::clear_failures(&self.db, &user_key(&user.username)).await?;
        // An administrator's unlock also forgives the addresses that failed on it.
        store::clear_failures_with_prefix(&self.db, &pair_prefix(&user.username)).await?;
        Ok(())
    }

    // ---- bearer tokens ---------------------------------------------------------

    /// Authenticates a bearer token (`cst_…` or `cat_…`) and builds the principal with
    /// the permissions of the user's role as of now. Every check runs on every request,
    /// against the database, so a revocation, deactivation, lock or role change holds on
    /// the very next request on every instance.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, IdentityError> {
        let is_session = token.starts_with(SESSION_PREFIX);
        if !(is_session || token.starts_with(API_TOKEN_PREFIX)) || token.len() > 128 {
            return Err(IdentityError::Unauthorized);
        }
        let hash = crypto::sha256_hex(token.as_bytes());
        let found = if is_session {
            store::session_by_hash(&self.db, &hash).await?
        } else {
            store::api_token_by_hash(&self.db, &hash).await?
        };
        self.principal_of(found, is_session, true).await
    }

    /// Authenticates a SMART app's access token (`sat_…`): the same checks as
    /// [`Self::authenticate`] on the token and its user (active, role as of now), and
    /// its grant not revoked. Only `/fhir` calls this.
    pub async fn authenticate_smart(&self, token: &str) -> Result<Principal, IdentityError> {
        if !token.starts_with(SMART_TOKEN_PREFIX) || token.len() > 128 {
            return Err(IdentityError::Unauthorized);
        }
        let hash = crypto::sha256_hex(token.as_bytes());
        let found = store::smart_token_by_hash(&self.db, &hash).await?;
        self.principal_of(found, false, true).await
    }

    /// The principal of a session known by its id (the SMART app's pages, whose own
    /// cookie names a launch tied to a session): the same checks as [`Self::authenticate`].
    pub async fn authenticate_session_id(
        &self,
        session_id: &str,
    ) -> Result<Principal, IdentityError> {
        let found = store::session_by_id(&self.db, session_id).await?;
        self.principal_of(found, true, true).await
    }

    /// Whether a session is still live (not revoked, expired or idle, its user active),
    /// without counting this question as a use: an app's online access must not keep
    /// its person's session from idling out.
    pub async fn session_is_live(&self, session_id: &str) -> Result<bool, IdentityError> {
        let found = store::session_by_id(&self.db, session_id).await?;
        match self.principal_of(found, true, false).await {
            Ok(_) => Ok(true),
            Err(IdentityError::Unauthorized | IdentityError::SessionExpired(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn principal_of(
        &self,
        found: Option<TokenLookup>,
        is_session: bool,
        touch: bool,
    ) -> Result<Principal, IdentityError> {
        let Some(TokenLookup {
            credential_id,
            last_used_at,
            expires_at,
            revoked_at,
            permissions,
            user,
            passkeys,
            method,
            smart,
        }) = found
        else {
            return Err(IdentityError::Unauthorized);
        };
        let now = self.now();
        let now_s = timestamp(now);
        if revoked_at.is_some() || !user.active {
            return Err(IdentityError::Unauthorized);
        }
        // A session that ended by time says so (its holder signs in again); an API
        // token past its expiry is simply not valid any more.
        if expires_at.as_str() <= now_s.as_str() {
            return Err(if is_session {
                IdentityError::SessionExpired(Expiry::Absolute)
            } else {
                IdentityError::Unauthorized
            });
        }
        if is_session {
            let last = last_used_at
                .as_deref()
                .and_then(parse_ts)
                .ok_or(IdentityError::Unauthorized)?;
            if add(last, self.settings.idle_timeout) <= now {
                return Err(IdentityError::SessionExpired(Expiry::Idle));
            }
        }
        // A lock from failed sign-ins is not checked here: it stops password sign-in
        // only, so an outsider who knows a username cannot end its owner's work.
        // Last-use writes are throttled: at most one per tenth of the idle timeout
        // (30 s at most), so a busy client does not turn every read into a write.
        let throttle = (self.settings.idle_timeout / 10).min(Duration::from_secs(30));
        let due = touch
            && last_used_at
                .as_deref()
                .and_then(parse_ts)
                .is_none_or(|last| add(last, throttle) <= now);
        if due {
            if let Some(g) = &smart {
                store::touch_grant(&self.db, &g.grant_id, &now_s).await?;
            } else if is_session {
                store::touch_session(&self.db, &credential_id, &now_s).await?;
            } else {
                store::touch_api_token(&self.db, &credential_id, &now_s).await?;
            }
        }
        let mut permissions: BTreeSet<Permission> = permissions
            .iter()
            .filter_map(|p| Permission::parse(p))
            .collect();
        // A patient account holds no permission whatever its role says: it reaches its
        // own record through the self-scope of each door, and nothing else.
        let patient = user.patient_id.clone();
        if patient.is_some() {
            permissions.clear();
        }
        if smart.is_some() {
            // Minimum necessary for apps: never the SSN in full, never break-glass.
            permissions.remove(&Permission::PhiSsn);
            permissions.remove(&Permission::BreakGlass);
        }
        let mfa_enrollment_pending =
            self.enrolment_pending(&user, passkeys > 0, is_session.then_some(method.as_deref()));
        Ok(Principal {
            mfa_enrollment_pending,
            password_expires_at: self
                .password_expires_at(&user.password_changed_at)
                .map(crate::clock::rfc3339),
            user_id: user.id,
            username: user.username,
            email: user.email,
            role: user.role,
            permissions,
            credential: if let Some(g) = smart {
                Credential::Smart(Box::new(crate::access::SmartAccess {
                    token_id: credential_id,
                    grant_id: g.grant_id,
                    client_id: g.client_id,
                    scopes: crate::oauth::scopes::Scopes::parse_cached(&g.scopes),
                    patient: g.patient_id,
                }))
            } else if is_session {
                Credential::Session(credential_id)
            } else {
                Credential::ApiToken(credential_id)
            },
            mfa_enabled: user.totp_enabled,
            patient,
        })
    }

    /// Whether a user may only enrol a second factor: `mfa.required` and neither TOTP
    /// nor a passkey; or a role under `mfa.phishing_resistant_roles` without a passkey,
    /// or (for a session, `session` being its sign-in method) a session not signed in
    /// with one. What it reads comes with the token's one lookup query.
    fn enrolment_pending(
        &self,
        user: &User,
        has_passkey: bool,
        session: Option<Option<&str>>,
    ) -> bool {
        if self.requires_passkey(&user.role) {
            if !has_passkey {
                return true;
            }
            return session.is_some_and(|m| !super::passkeys::signed_in_with_passkey(m));
        }
        self.settings.mfa_required && !user.totp_enabled && !has_passkey
    }

    /// Whether users of `role` must sign in with a passkey.
    pub fn requires_passkey(&self, role: &str) -> bool {
        self.settings
            .phishing_resistant_roles
            .iter()
            .any(|r| r == role)
    }

    /// Marks a session used now (the pages' "stay signed in").
    pub async fn touch_session(&self, session_id: &str) -> Result<(), IdentityError> {
        store::touch_session(&self.db, session_id, &timestamp(self.now())).await?;
        Ok(())
    }

    pub async fn logout(&self, session_id: &str) -> Result<(), IdentityError> {
        let now = timestamp(self.now());
        store::revoke_session(&self.db, session_id, &now).await?;
        // Online access (`online_access` without `offline_access`) ends with its session.
        crate::oauth::store::revoke_session_grants(&self.db, session_id, &now).await?;
        crate::smart::store::forget_session(&self.db, session_id).await?;
        Ok(())
    }

    /// Revokes every session and SMART app grant of a user (and their API tokens when
    /// `tokens`).
    pub async fn revoke_all(&self, user_id: &str, tokens: bool) -> Result<u64, IdentityError> {
        let now = timestamp(self.now());
        let n = store::revoke_all(&self.db, user_id, &now, tokens).await?;
        crate::smart::store::forget_user(&self.db, user_id).await?;
        // Apps hold the user's access too: ending every session ends their grants.
        crate::oauth::store::revoke_user_grants(&self.db, user_id, &now).await?;
        Ok(n)
    }

    // ---- passwords -------------------------------------------------------------

    /// Changes a password after re-authentication ([`Self::reauthenticate`]: the
    /// current password, and the second factor when TOTP is on). Applies the policy and
    /// the history, and revokes the user's other sessions (all of them when `keep` is
    /// None), and their API tokens too when `revoke_tokens`.
    pub async fn change_password(
        &self,
        user: &User,
        change: &PasswordChange<'_>,
        origin: &Origin,
    ) -> (Result<(), IdentityError>, AttemptFacts) {
        let (auth, facts) = self
            .reauthenticate(user, change.current, change.code, origin)
            .await;
        if auth.is_err() {
            return (auth, facts);
        }
        let mut result = self
            .set_password(user, change.new, change.keep_session)
            .await;
        if result.is_ok() && change.revoke_tokens {
            result = self.revoke_tokens(&user.id).await;
        }
        (result, facts)
    }

    /// Revokes every personal API token of a user.
    pub async fn revoke_tokens(&self, user_id: &str) -> Result<(), IdentityError> {
        store::revoke_api_tokens(&self.db, user_id, &timestamp(self.now())).await?;
        Ok(())
    }

    /// Sets a password without the current one (the user's own change after checks made
    /// elsewhere, a reset link): policy and history apply, and the "must change" flag is
    /// cleared.
    pub async fn set_password(
        &self,
        user: &User,
        new: &Secret,
        keep_session: Option<&str>,
    ) -> Result<(), IdentityError> {
        self.store_password(user, new, keep_session, false).await
    }

    async fn store_password(
        &self,
        user: &User,
        new: &Secret,
        keep_session: Option<&str>,
        must_change: bool,
    ) -> Result<(), IdentityError> {
        if new.expose().chars().count() > super::model::MAX_PASSWORD {
            return Err(IdentityError::Policy(vec![password::TOO_LONG]));
        }
        let mut violations =
            self.settings
                .policy
                .check(new.expose(), &user.username, user.email.as_deref());
        // The current password and the `history` before it may not come back.
        let n = i64::from(self.settings.policy.history) + 1;
        let recent = store::recent_password_hashes(&self.db, &user.id, n).await?;
        let mut recent = recent;
        if !recent.contains(&user.password_hash) {
            recent.push(user.password_hash.clone());
        }
        if self.hasher.matches_any(new, &recent).await? {
            violations.push(password::REUSED);
        }
        if !violations.is_empty() {
            return Err(IdentityError::Policy(violations));
        }
        let hash = self.hasher.hash(new).await?;
        store::set_password(
            &self.db,
            &user.id,
            &hash,
            &timestamp(self.now()),
            &new_id(),
            keep_session,
            must_change,
        )
        .await?;
        Ok(())
    }

    /// Changes a user's role, email and/or active flag. Someone must always be able to
    /// manage users: the last active holder of `users:manage` cannot be deactivated or
    /// given a role without it. Deactivation ends every session and API token at once.
    /// `by` must hold every permission of the user's role and of the new role. A new
    /// email kills every account link (password reset, verification) sent to another
    /// address.
    pub async fn update_user(
        &self,
        by: Grantor<'_>,
        id: &str,
        role: Option<&str>,
        email: Option<Option<&str>>,
        active: Option<bool>,
    ) -> Result<User, IdentityError> {
        let user = self.user(id).await?;
        by.may_manage(&self.db, &user.role).await?;
        if email.is_some() {
            patient_credentials(&by, &user)?;
        }
        if let Some(r) = role {
            // A patient account keeps the patient role, and nobody else gets it: the link
            // to a record is what it is for, and staff permissions never reach it.
            let patient = super::roles::PATIENT_ROLE;
            if user.patient_id.is_some() && r != patient {
                return Err(IdentityError::Conflict(
                    "a patient account keeps the patient role",
                ));
            }
            if user.patient_id.is_none() && r == patient {
                return Err(IdentityError::Invalid(
                    "role",
                    "is given only by a patient invitation, made from the patient's record",
                ));
            }
            if !store::role_exists(&self.db, r).await? {
                return Err(IdentityError::Invalid("role", "is not a role"));
            }
            by.covers_role(&self.db, r).await?;
        }
        let email = match email {
            Some(Some(e)) => Some(Some(
                parse_email(e).map_err(|m| IdentityError::Invalid("email", m))?,
            )),
            Some(None) => Some(None),
            None => None,
        };
        let manage = Permission::UsersManage.as_str();
        let loses_manage = match role {
            Some(r) => !store::role_has(&self.db, r, manage).await?,
            None => false,
        } || active == Some(false);
        if loses_manage
            && user.active
            && store::role_has(&self.db, &user.role, manage).await?
            && store::count_active_holders(&self.db, manage, &user.id).await? == 0
        {
            return Err(IdentityError::Conflict(
                "This is the last active user who can manage users; give the permission to someone else first.",
            ));
        }
        let now = timestamp(self.now());
        store::update_user(
            &self.db,
            id,
            role,
            email.as_ref().map(|e| e.as_deref()),
            active,
            &now,
        )
        .await?;
        if active == Some(false) {
            self.revoke_all(id, true).await?;
        }
        self.user(id).await
    }

    /// Activates or deactivates an account (deactivating ends its sessions and tokens).
    pub async fn update_active(
        &self,
        by: Grantor<'_>,
        id: &str,
        active: bool,
    ) -> Result<(), IdentityError> {
        self.update_user(by, id, None, None, Some(active))
            .await
            .map(|_| ())
    }

    /// An administrator sets a user's password (the usual answer to a suspected
    /// compromise): the policy and history apply, and every credential of the account
    /// ends — sessions, personal API tokens and app grants. With `must_change` the user
    /// must change it at the next sign-in.
    pub async fn admin_reset_password(
        &self,
        by: Grantor<'_>,
        id: &str,
        new: &Secret,
        must_change: bool,
    ) -> Result<(), IdentityError> {
        let user = self.user(id).await?;
        by.may_manage(&self.db, &user.role).await?;
        patient_credentials(&by, &user)?;
        self.store_password(&user, new, None, must_change).await?;
        self.revoke_all(&user.id, true).await?;
        Ok(())
    }

    /// An administrator ends every credential of a user: sessions, personal API tokens
    /// and app grants. Returns how many sessions and tokens ended.
    pub async fn end_credentials(&self, by: Grantor<'_>, id: &str) -> Result<u64, IdentityError> {
        let user = self.user(id).await?;
        by.may_manage(&self.db, &user.role).await?;
        self.revoke_all(&user.id, true).await
    }

    /// An administrator ends one session; returns its owner's id.
    pub async fn end_session(
        &self,
        by: Grantor<'_>,
        session_id: &str,
    ) -> Result<String, IdentityError> {
        let owner = store::session_user(&self.db, session_id)
            .await?
            .ok_or(IdentityError::NotFound)?;
        let user = self.user(&owner).await?;
        by.may_manage(&self.db, &user.role).await?;
        self.logout(session_id).await?;
        Ok(owner)
    }

    /// An administrator resets a user's second factor (a lost authenticator): the TOTP
    /// secret and every recovery code are removed, and the user's sessions and app
    /// grants end (their API tokens stay; with `mfa.required` they are refused until
    /// the user enrols again). The user then signs in with the password alone and, with
    /// `mfa.required`, can do nothing but enrol. Nobody resets their own second factor
    /// this way (`DELETE /api/v1/auth/totp` needs the password and a code), nor that of
    /// an account holding more than they do. Returns the account as it was.
    pub async fn reset_totp(&self, by: Grantor<'_>, id: &str) -> Result<User, IdentityError> {
        let user = self.user(id).await?;
        if let Grantor::User(p) = by
            && p.user_id == user.id
        {
            return Err(IdentityError::Forbidden(
                "You cannot reset your own second factor here: turn it off with your password and a code, or ask another administrator.".into(),
            ));
        }
        by.may_manage(&self.db, &user.role).await?;
        patient_credentials(&by, &user)?;
        let passkeys = super::passkeys::passkey_count(&self.db, &user.id).await?;
        if !user.totp_enabled && user.totp_secret.is_none() && passkeys == 0 {
            return Err(IdentityError::Conflict(
                "This user has no second factor to reset.",
            ));
        }
        store::disable_totp(&self.db, &user.id, &timestamp(self.now())).await?;
        self.passkeys_remove_all(&user.id).await?;
        store::delete_recovery_codes(&self.db, &user.id).await?;
        self.revoke_all(&user.id, false).await?;
        Ok(user)
    }

    /// The live personal API tokens of a user (an administrator's view; never secrets).
    pub async fn user_tokens(&self, user_id: &str) -> Result<Vec<TokenRow>, IdentityError> {
        let user = self.user(user_id).await?;
        self.tokens(&user.id).await
    }

    /// An administrator revokes one personal API token of a user (not of an account
    /// holding more than they do). `NotFound` when the user has no such live token.
    pub async fn admin_revoke_token(
        &self,
        by: Grantor<'_>,
        user_id: &str,
        token_id: &str,
    ) -> Result<(), IdentityError> {
        let user = self.user(user_id).await?;
        by.may_manage(&self.db, &user.role).await?;
        self.revoke_token(&user.id, token_id).await
    }

    /// Whether a session last used at `last_used_at` has been idle too long by now.
    pub fn session_idle(&self, last_used_at: &str) -> bool {
        parse_ts(last_used_at).is_none_or(|t| add(t, self.settings.idle_timeout) <= self.now())
    }

    /// Checks a TOTP or recovery code of `user` (spending it); `InvalidTotp` when wrong.
    pub async fn second_factor(&self, user: &User, code: &str) -> Result<(), IdentityError> {
        match self.check_second_factor(user, code, self.now()).await? {
            SecondFactor::Wrong => Err(IdentityError::InvalidTotp),
            _ => Ok(()),
        }
    }

    pub async fn user(&self, id: &str) -> Result<User, IdentityError> {
        store::user_by_id(&self.db, id)
            .await?
            .ok_or(IdentityError::NotFound)
    }

    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, IdentityError> {
        Ok(store::user_by_username(&self.db, &Username::normalise(username)).await?)
    }

    // ---- TOTP ------------------------------------------------------------------

    async fn check_second_factor(
        &self,
        user: &User,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<SecondFactor, IdentityError> {
        if let Some(normalised) = totp::normalize_recovery_code(code) {
            let hash = self.recovery_hash(&user.id, &normalised)?;
            let ok = store::use_recovery_code(&self.db, &user.id, &hash, &timestamp(now)).await?;
            return Ok(if ok {
                SecondFactor::RecoveryCode
            } else {
                SecondFactor::Wrong
            });
        }
        let Some(secret) = self.totp_secret(user)? else {
            return Ok(SecondFactor::Wrong);
        };
        let last = user.totp_last_step.and_then(|s| u64::try_from(s).ok());
        match totp::verify(&secret, code, now.unix_timestamp(), last) {
            Some(step) => {
                let step = i64::try_from(step).unwrap_or(i64::MAX);
                // Claimed atomically: two requests with the same code cannot both pass.
                if store::claim_totp_step(&self.db, &user.id, step).await? {
                    Ok(SecondFactor::Totp)
                } else {
                    Ok(SecondFactor::Wrong)
                }
            }
            None => Ok(SecondFactor::Wrong),
        }
    }

    fn totp_secret(&self, user: &User) -> Result<Option<totp::TotpSecret>, IdentityError> {
        let Some(sealed) = &user.totp_secret else {
            return Ok(None);
        };
        let raw = crypto::open(&self.keys, TOTP_PURPOSE, user.id.as_bytes(), sealed)?;
        totp::TotpSecret::from_bytes(&raw)
            .map(Some)
            .map_err(|_| IdentityError::Internal("stored TOTP secret is malformed".into()))
    }

    pub(super) fn recovery_code_hash(
        &self,
        user_id: &str,
        normalised: &str,
    ) -> Result<String, IdentityError> {
        self.recovery_hash(user_id, normalised)
    }

    fn recovery_hash(&self, user_id: &str, normalised: &str) -> Result<String, IdentityError> {
        let version = self.keys.current_version();
        let _ = version;
        // Recovery codes are hashed with key version 1's purpose key so that a rotation
        // does not invalidate them; they hold 80 random bits and the key is never in the
        // database, so the stored hashes cannot be searched offline.
        let key = self
            .keys
            .derive(1, RECOVERY_PURPOSE)
            .map_err(CryptoError::from)?;
        Ok(crypto::hex(&crypto::hmac_sha256(
            &key,
            &[user_id.as_bytes(), normalised.as_bytes()],
        )))
    }

    /// Starts TOTP enrolment: a new secret, kept sealed until confirmed.
    pub async fn totp_enroll(&self, user: &User) -> Result<Enrollment, IdentityError> {
        if user.totp_enabled {
            return Err(IdentityError::Conflict(
                "TOTP is already on; turn it off first",
            ));
        }
        let secret = totp::TotpSecret::generate()
            .map_err(|_| IdentityError::Internal("random source failed".into()))?;
        let sealed = crypto::seal(&self.keys, TOTP_PURPOSE, user.id.as_bytes(), secret.bytes())?;
        store::set_totp_pending(&self.db, &user.id, &sealed, &timestamp(self.now())).await?;
        let uri = totp::otpauth_uri(&secret, "Custodian", &user.username);
        let qr_svg = totp::qr_svg(&uri)
            .map_err(|_| IdentityError::Internal("QR rendering failed".into()))?;
        Ok(Enrollment {
            secret: Secret::new(secret.to_base32()),
            otpauth_uri: Secret::new(uri),
            qr_svg,
        })
    }

    /// Confirms enrolment with a code from the app; returns ten recovery codes (shown once).
    pub async fn totp_confirm(
        &self,
        user: &User,
        code: &str,
    ) -> Result<Vec<String>, IdentityError> {
        if user.totp_enabled {
            return Err(IdentityError::Conflict("TOTP is already on"));
        }
        let Some(secret) = self.totp_secret(user)? else {
            return Err(IdentityError::Conflict(
                "start with POST /api/v1/auth/totp/enroll",
            ));
        };
        let now = self.now();
        let last = user.totp_last_step.and_then(|s| u64::try_from(s).ok());
        let Some(step) = totp::verify(&secret, code, now.unix_timestamp(), last) else {
            return Err(IdentityError::InvalidTotp);
        };
        if !store::claim_totp_step(&self.db, &user.id, i64::try_from(step).unwrap_or(i64::MAX))
            .await?
        {
            return Err(IdentityError::InvalidTotp);
        }
        let codes = totp::recovery_codes()
            .map_err(|_| IdentityError::Internal("random source failed".into()))?;
        let hashes = codes
            .iter()
            .map(|c| {
                let n = totp::normalize_recovery_code(c).unwrap_or_default();
                self.recovery_hash(&user.id, &n)
            })
            .collect::<Result<Vec<_>, _>>()?;
        store::enable_totp(&self.db, &user.id, &hashes, &timestamp(now)).await?;
        Ok(codes)
    }

    /// Turns TOTP off after re-authentication with the password and a current code
    /// (counted like sign-in).
    pub async fn totp_disable(
        &self,
        user: &User,
        password: &Secret,
        code: &str,
        origin: &Origin,
    ) -> (Result<(), IdentityError>, Option<AttemptFacts>) {
        if self.settings.mfa_required {
            return (
                Err(IdentityError::Conflict(
                    "TOTP is required for every user (mfa.required)",
                )),
                None,
            );
        }
        if !user.totp_enabled {
            return (Err(IdentityError::Conflict("TOTP is not on")), None);
        }
        let (auth, facts) = self
            .reauthenticate(user, password, Some(code), origin)
            .await;
        if auth.is_err() {
            return (auth, Some(facts));
        }
        let done = store::disable_totp(&self.db, &user.id, &timestamp(self.now()))
            .await
            .map_err(IdentityError::from);
        (done, Some(facts))
    }

    // ---- API tokens ------------------------------------------------------------

    pub async fn tokens(&self, user_id: &str) -> Result<Vec<TokenRow>, IdentityError> {
        Ok(store::api_tokens(&self.db, user_id, &timestamp(self.now())).await?)
    }

    /// Creates a token; its lifetime is capped by `api_tokens.max_lifetime`.
    pub async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        expires_in: Option<u64>,
    ) -> Result<(TokenRow, Secret), IdentityError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(IdentityError::Invalid(
                "name",
                "must be 1 to 100 characters",
            ));
        }
        let max = self.settings.token_max_lifetime;
        let lifetime = expires_in.map_or(max, |s| Duration::from_secs(s).min(max));
        if lifetime.is_zero() {
            return Err(IdentityError::Invalid(
                "expires_in",
                "must be at least 1 second",
            ));
        }
        let now = self.now();
        let (token, hash) = crypto::new_token(API_TOKEN_PREFIX)?;
        let row = TokenRow {
            id: new_id(),
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            created_at: timestamp(now),
            expires_at: timestamp(add(now, lifetime)),
            last_used_at: None,
        };
        store::insert_api_token(&self.db, &row, &hash).await?;
        Ok((row, Secret::new(token)))
    }

    /// A new secret for a token: same name and expiry; the old secret dies at once.
    pub async fn rotate_token(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<(TokenRow, Secret), IdentityError> {
        let now = timestamp(self.now());
        let old = store::api_token_row(&self.db, user_id, id, &now)
            .await?
            .ok_or(IdentityError::NotFound)?;
        let (token, hash) = crypto::new_token(API_TOKEN_PREFIX)?;
        let row = TokenRow {
            id: new_id(),
            user_id: user_id.to_owned(),
            name: old.name,
            created_at: now.clone(),
            expires_at: old.expires_at,
            last_used_at: None,
        };
        if !store::rotate_api_token(&self.db, user_id, id, &row, &hash, &now).await? {
            return Err(IdentityError::NotFound);
        }
        Ok((row, Secret::new(token)))
    }

    pub async fn revoke_token(&self, user_id: &str, id: &str) -> Result<(), IdentityError> {
        if store::revoke_api_token(&self.db, user_id, id, &timestamp(self.now())).await? {
            Ok(())
        } else {
            Err(IdentityError::NotFound)
        }
    }

    /// Whether a token expires within a day (flagged in the list).
    pub fn expires_soon(&self, expires_at: &str) -> bool {
        parse_ts(expires_at).is_some_and(|t| t <= add(self.now(), Duration::from_secs(86_400)))
    }

    pub fn now_timestamp(&self) -> String {
        timestamp(self.now())
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

enum SecondFactor {
    Totp,
    RecoveryCode,
    Wrong,
}

/// What enrolment shows the user once.
pub struct Enrollment {
    pub secret: Secret,
    pub otpauth_uri: Secret,
    pub qr_svg: String,
}

/// A random 24-character password with upper and lower case letters, digits and
/// symbols (it meets every policy), from the OS CSPRNG.
pub fn generate_password() -> Result<Secret, CryptoError> {
    const SETS: [&[u8]; 4] = [
        b"ABCDEFGHJKLMNPQRSTUVWXYZ",
        b"abcdefghijkmnopqrstuvwxyz",
        b"23456789",
        b"!#%+-=?@^_~",
    ];
    let raw = crypto::random_bytes::<24>()?;
    let mut out = String::with_capacity(24);
    for (i, b) in raw.iter().enumerate() {
        // The first four characters take one from each set; the rest from all of them.
        let set: &[u8] = match SETS.get(i) {
            Some(s) => s,
            None => SETS.get(usize::from(*b) % 4).copied().unwrap_or(SETS[0]),
        };
        let c = set
            .get(usize::from(*b) % set.len())
            .copied()
            .unwrap_or(b'x');
        out.push(char::from(c));
    }
    Ok(Secret::new(out))
}

/// A sentence for a person (the command line) about an identity error; never a value.
pub fn describe(e: &IdentityError) -> String {
    match e {
        IdentityError::Invalid(field, message) => format!("{field} {message}"),
        IdentityError::Conflict(m) => (*m).to_owned(),
        IdentityError::Forbidden(d) => d.clone(),
        IdentityError::Policy(v) => {
            format!("the password does not meet the policy: {}", v.join(", "))
        }
        other => other.to_string(),
    }
}

fn seconds_until(now: OffsetDateTime, until: &str) -> u64 {
    parse_ts(until)
        .map(|u| (u - now).whole_seconds().max(1))
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(1)
}

/// A patient account's credentials (password, email, second factor) are the patient's:
/// no staff member sets them, whatever their permissions — otherwise `users:manage`
/// alone would open any patient's record, unflagged, as the patient. A forgotten
/// password is reset by mail from the sign-in page; a lost second factor by an
/// operator on the server (`custodian user reset-totp`) after checking who asks.
fn patient_credentials(by: &Grantor<'_>, user: &User) -> Result<(), IdentityError> {
    if user.patient_id.is_some() && matches!(by, Grantor::User(_)) {
        return Err(IdentityError::Conflict(
            "a patient account's password, email and second factor are the patient's: the patient resets the password by mail; an operator resets a lost second factor (custodian user reset-totp)",
        ));
    }
    Ok(())
}
