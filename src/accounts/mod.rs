//! Account lifecycle by email (`docs/accounts.md`): invitations, email verification,
//! password reset, optional self-registration, and the mail outbox that carries them.
//!
//! Every link holds a single-use token: 256 random bits, stored only as its SHA-256,
//! bound to one purpose (`invite`, `verify_email`, `reset_password`), expiring, and
//! spent when used (or revoked when superseded).

pub mod mail;
pub mod pages;
pub mod routes;

use std::sync::Arc;

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::access::Principal;
use crate::clock::{SharedClock, timestamp};
use crate::config::{AccountsConfig, Config, Secret};
use crate::crypto;
use crate::identity::model::User;
use crate::identity::roles::PATIENT_ROLE;
use crate::identity::service::Origin;
use crate::identity::{Grantor, Identity, IdentityError};
use crate::store::{Db, StoreError};
use mail::Outbox;

pub const INVITE: &str = "invite";
pub const VERIFY: &str = "verify_email";
pub const RESET: &str = "reset_password";
/// Marks a verification that also activates a self-registered account.
const ACTIVATES: &str = "activate";

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("the link is unknown, expired or already used")]
    InvalidLink,
    #[error("this is turned off")]
    Disabled,
    #[error("no mail can be sent: mail.smtp_host is not configured")]
    MailUnavailable,
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AccountsError {
    fn from(e: sqlx::Error) -> Self {
        AccountsError::Store(e.into())
    }
}

/// A pending invitation as listed to administrators (never its token).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Invitation {
    pub id: String,
    pub email: String,
    pub role: String,
    pub created_by: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    /// A patient invitation's patient record (the account is linked to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
}

const TOKEN_COLUMNS: &str =
    "id, user_id, email, role, created_by, created_at, expires_at, patient_id";

struct TokenRow {
    id: String,
    user_id: Option<String>,
    email: Option<String>,
    role: Option<String>,
    created_by: Option<String>,
    created_at: String,
    expires_at: String,
    patient_id: Option<String>,
}

#[derive(Clone)]
pub struct Accounts {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    clock: SharedClock,
    identity: Identity,
    outbox: Outbox,
    cfg: AccountsConfig,
    base_url: String,
}

impl TokenRow {
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            user_id: r.try_get("user_id")?,
            email: r.try_get("email")?,
            role: r.try_get("role")?,
            created_by: r.try_get("created_by")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            patient_id: r.try_get("patient_id")?,
        })
    }
}

fn new_token() -> Result<Secret, AccountsError> {
    crypto::random_bytes::<32>()
        .map(|b| Secret::new(crypto::hex(&b)))
        .map_err(|e| AccountsError::Identity(IdentityError::Crypto(e)))
}

fn hash(token: &str) -> String {
    crypto::sha256_hex(token.as_bytes())
}

/// A normalised (lower-case) email address, or why it is not one. No whitespace or
/// control character can pass, so an address cannot inject a mail header.
pub fn parse_email(s: &str) -> Result<String, &'static str> {
    crate::identity::model::parse_email(s).map(|e| e.to_lowercase())
}

impl Accounts {
    pub fn new(
        c: &Config,
        smtp_password: Option<Secret>,
        db: Db,
        keys: Arc<crypto::SharedKeyring>,
        clock: SharedClock,
        identity: Identity,
    ) -> anyhow::Result<Self> {
        let outbox = Outbox::new(c, smtp_password, db.clone(), keys, clock.clone())?;
        outbox.spawn();
        let base_url = c
            .mail
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", c.server.listen))
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                clock,
                identity,
                outbox,
                cfg: c.accounts.clone(),
                base_url,
            }),
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    pub fn config(&self) -> &AccountsConfig {
        &self.inner.cfg
    }

    fn now(&self) -> String {
        timestamp(self.inner.clock.now())
    }

    fn link(&self, kind: &str, token: &Secret) -> String {
        format!("{}/accounts/{kind}/{}", self.inner.base_url, token.expose())
    }

    fn require_mail(&self) -> Result<(), AccountsError> {
        if self.inner.outbox.can_send() {
            Ok(())
        } else {
            Err(AccountsError::MailUnavailable)
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue(
        &self,
        purpose: &str,
        user_id: Option<&str>,
        email: Option<&str>,
        role: Option<&str>,
        created_by: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<(String, Secret, String), AccountsError> {
        self.issue_for(purpose, user_id, email, role, created_by, ttl, None)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue_for(
        &self,
        purpose: &str,
        user_id: Option<&str>,
        email: Option<&str>,
        role: Option<&str>,
        created_by: Option<&str>,
        ttl: std::time::Duration,
        patient_id: Option<&str>,
    ) -> Result<(String, Secret, String), AccountsError> {
        let token = new_token()?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = self.inner.clock.now();
        let expires = timestamp(now + ttl);
        sqlx::query(
            "INSERT INTO account_tokens (id, token_hash, purpose, user_id, email, role, created_by, created_at, expires_at, patient_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&id)
        .bind(hash(token.expose()))
        .bind(purpose)
        .bind(user_id)
        .bind(email)
        .bind(role)
        .bind(created_by)
        .bind(timestamp(now))
        .bind(&expires)
        .bind(patient_id)
        .execute(self.inner.db.writer())
        .await?;
        Ok((id, token, expires))
    }

    /// A usable token of `purpose` (not used, not revoked, not expired).
    async fn find(&self, purpose: &str, token: &str) -> Result<TokenRow, AccountsError> {
        if token.len() != 64 || !token.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(AccountsError::InvalidLink);
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM account_tokens \
             WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $3"
        )))
        .bind(hash(token))
        .bind(purpose)
        .bind(self.now())
        .fetch_optional(self.inner.db.reader())
        .await?
        .ok_or(AccountsError::InvalidLink)?;
        Ok(TokenRow::from_row(&row)?)
    }

    /// Spends a token; false when another request spent it first.
    async fn consume(&self, id: &str) -> Result<bool, AccountsError> {
        let now = self.now();
        let n = sqlx::query(
            "UPDATE account_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1",
        )
        .bind(&now)
        .bind(id)
        .execute(self.inner.db.writer())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn revoke_where(&self, sql: &'static str, value: &str) -> Result<u64, AccountsError> {
        Ok(sqlx::query(sql)
            .bind(self.now())
            .bind(value)
            .execute(self.inner.db.writer())
            .await?
            .rows_affected())
    }

    // ---- invitations -------------------------------------------------------------------

    fn invitation_of(t: TokenRow) -> Invitation {
        Invitation {
            id: t.id,
            email: t.email.unwrap_or_default(),
            role: t.role.unwrap_or_default(),
            created_by: t.created_by,
            created_at: t.created_at,
            expires_at: t.expires_at,
            patient_id: t.patient_id,
        }
    }

    async fn send_invitation(
        &self,
        email: &str,
        role: &str,
        token: &Secret,
        expires: &str,
    ) -> Result<(), AccountsError> {
        if role == PATIENT_ROLE {
            // No name, no record detail: a mail is not a safe place for PHI.
            let body = format!(
                "You are invited to open your patient account: you will see your health record, \
                 download it, see who accessed it, and ask for corrections.\n\n\
                 Choose your username and password here (the link works once, until {expires} UTC):\n\n{}\n\n\
                 If you did not expect this invitation, ignore this mail.\n",
                self.link("invite", token)
            );
            self.inner
                .outbox
                .enqueue(email, "Your patient account", &body)
                .await?;
            return Ok(());
        }
        let body = format!(
            "You are invited to a Custodian account with the role \"{role}\".\n\n\
             Choose your username and password here (the link works once, until {expires} UTC):\n\n{}\n\n\
             If you did not expect this invitation, ignore this mail.\n",
            self.link("invite", token)
        );
        self.inner
            .outbox
            .enqueue(email, "Your invitation to Custodian", &body)
            .await?;
        Ok(())
    }

    /// Invites `email` to an account with `role`.
    pub async fn invite(
        &self,
        email: &str,
        role: &str,
        by: &Principal,
    ) -> Result<Invitation, AccountsError> {
        let email = parse_email(email).map_err(|m| IdentityError::Invalid("email", m))?;
        if role == PATIENT_ROLE {
            return Err(IdentityError::Invalid(
                "role",
                "is given only by a patient invitation, made from the patient's record",
            )
            .into());
        }
        if !crate::identity::store::role_exists(&self.inner.db, role).await? {
            return Err(IdentityError::Invalid("role", "is not a role").into());
        }
        // Nobody invites into a role holding more than they hold.
        Grantor::user(by).covers_role(&self.inner.db, role).await?;
        self.require_mail()?;
        let (id, token, expires) = self
            .issue(
                INVITE,
                None,
                Some(&email),
                Some(role),
                Some(&by.username),
                self.inner.cfg.invite_ttl.std(),
            )
            .await?;
        self.send_invitation(&email, role, &token, &expires).await?;
        Ok(Invitation {
            id,
            email,
            role: role.to_owned(),
            created_by: Some(by.username.clone()),
            created_at: self.now(),
            expires_at: expires,
            patient_id: None,
        })
    }

    /// Invites `email` to the patient account of `patient_id` (which must exist, and
    /// have no account yet). Pending patient invitations of the same record are revoked:
    /// one link at a time per record.
    pub async fn invite_patient(
        &self,
        patient_id: &str,
        email: &str,
        by: &Principal,
    ) -> Result<Invitation, AccountsError> {
        let email = parse_email(email).map_err(|m| IdentityError::Invalid("email", m))?;
        if crate::identity::store::user_by_patient(&self.inner.db, patient_id)
            .await?
            .is_some()
        {
            return Err(
                IdentityError::Conflict("this patient record has an account already").into(),
            );
        }
        self.require_mail()?;
        self.revoke_where(
            "UPDATE account_tokens SET revoked_at = $1 WHERE patient_id = $2 AND purpose = 'invite' AND used_at IS NULL AND revoked_at IS NULL",
            patient_id,
        )
        .await?;
        let (id, token, expires) = self
            .issue_for(
                INVITE,
                None,
                Some(&email),
                Some(PATIENT_ROLE),
                Some(&by.username),
                self.inner.cfg.invite_ttl.std(),
                Some(patient_id),
            )
            .await?;
        self.send_invitation(&email, PATIENT_ROLE, &token, &expires)
            .await?;
        Ok(Invitation {
            id,
            email,
            role: PATIENT_ROLE.to_owned(),
            created_by: Some(by.username.clone()),
            created_at: self.now(),
            expires_at: expires,
            patient_id: Some(patient_id.to_owned()),
        })
    }

    /// Pending invitations, newest first (for administrators: no patient ids).
    pub async fn invitations(&self) -> Result<Vec<Invitation>, AccountsError> {
        let mut list = self.pending_invitations().await?;
        // The list is for account administrators: a patient invitation says `patient`
        // as its role, not which record (that is the patients' staff's to know).
        for i in &mut list {
            i.patient_id = None;
        }
        Ok(list)
    }

    async fn pending_invitations(&self) -> Result<Vec<Invitation>, AccountsError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM account_tokens \
             WHERE purpose = $1 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $2 \
             ORDER BY created_at DESC LIMIT 500"
        )))
        .bind(INVITE)
        .bind(self.now())
        .fetch_all(self.inner.db.reader())
        .await?;
        rows.iter()
            .map(|r| Ok(Self::invitation_of(TokenRow::from_row(r)?)))
            .collect()
    }

    pub async fn revoke_invitation(&self, id: &str) -> Result<(), AccountsError> {
        let n = self
            .revoke_where(
                "UPDATE account_tokens SET revoked_at = $1 WHERE id = $2 AND purpose = 'invite' AND used_at IS NULL AND revoked_at IS NULL",
                id,
            )
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(IdentityError::NotFound.into())
        }
    }

    /// Revokes the invitation's link and sends a new one.
    pub async fn resend_invitation(
        &self,
        id: &str,
        by: &Principal,
    ) -> Result<Invitation, AccountsError> {
        self.require_mail()?;
        let pending = self.pending_invitations().await?;
        let old = pending
            .into_iter()
            .find(|i| i.id == id)
            .ok_or(IdentityError::NotFound)?;
        // Checked before the old link is revoked: a refused resend leaves it as it was.
        Grantor::user(by)
            .covers_role(&self.inner.db, &old.role)
            .await?;
        if let Some(patient) = &old.patient_id {
            // A patient invitation stays one: the same record, the same role.
            return self.invite_patient(patient, &old.email, by).await;
        }
        self.revoke_invitation(id).await?;
        self.invite(&old.email, &old.role, by).await
    }

    /// What an invitation link offers (for its page).
    pub async fn invitation(&self, token: &str) -> Result<Invitation, AccountsError> {
        Ok(Self::invitation_of(self.find(INVITE, token).await?))
    }

    /// Creates the invited account. Its email counts as verified (the link reached it).
    pub async fn accept_invitation(
        &self,
        token: &str,
        username: &str,
        password: &Secret,
    ) -> Result<User, AccountsError> {
        let t = self.find(INVITE, token).await?;
        let email = t.email.clone().unwrap_or_default();
        let role = t.role.clone().unwrap_or_default();
        let user = match &t.patient_id {
            Some(patient) => {
                let live = crate::records::store::patient_exists(&self.inner.db, patient).await?
                    == Some(false);
                if !live {
                    // The record was erased since: the link leads nowhere.
                    return Err(AccountsError::InvalidLink);
                }
                self.inner
                    .identity
                    .create_patient_user(username, Some(&email), password, patient)
                    .await?
            }
            // A patient role without a record cannot come from a link we issued.
            None if role == PATIENT_ROLE => return Err(AccountsError::InvalidLink),
            None => {
                self.inner
                    .identity
                    .create_user(Grantor::Operator, username, Some(&email), &role, password)
                    .await?
            }
        };
        if !self.consume(&t.id).await? {
            // Spent by a concurrent request: undo this account.
            self.inner
                .identity
                .update_active(Grantor::Operator, &user.id, false)
                .await?;
            return Err(AccountsError::InvalidLink);
        }
        self.mark_verified(&user.id, &email).await?;
        Ok(user)
    }

    // ---- email verification ------------------------------------------------------------

    async fn mark_verified(&self, user_id: &str, email: &str) -> Result<(), AccountsError> {
        sqlx::query(
            "INSERT INTO email_verifications (user_id, email, verified_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, verified_at = excluded.verified_at",
        )
        .bind(user_id)
        .bind(email)
        .bind(self.now())
        .execute(self.inner.db.writer())
        .await?;
        Ok(())
    }

    /// Whether the user's current email is the verified one.
    pub async fn is_verified(&self, user: &User) -> Result<bool, AccountsError> {
        email_verified(&self.inner.db, user).await
    }

    /// Tells a user by mail that an administrator reset their second factor (see
    /// [`totp_reset_notice`]). Answers whether a mail was queued.
    pub async fn notify_totp_reset(&self, user: &User) -> Result<bool, AccountsError> {
        totp_reset_notice(&self.inner.db, &self.inner.outbox, user, &self.now()).await
    }

    /// Tells a user by mail (at a verified address, when mail can be sent) that a passkey
    /// was added to or removed from their account: a new way in that they did not make
    /// themselves is something to act on. Answers whether a mail was queued.
    pub async fn notify_passkey_change(
        &self,
        user: &User,
        added: bool,
        name: &str,
    ) -> Result<bool, AccountsError> {
        let Some(email) = &user.email else {
            return Ok(false);
        };
        if !self.inner.outbox.can_send() || !email_verified(&self.inner.db, user).await? {
            return Ok(false);
        }
        let (what, subject) = if added {
            ("added to", "A passkey was added to your Custodian account")
        } else {
            (
                "removed from",
                "A passkey was removed from your Custodian account",
            )
        };
        let body = format!(
            "A passkey named \"{name}\" was {what} the Custodian account \"{}\" at {} UTC.\n\n\
             If you did not do this, tell your administrator now: they can remove every passkey \
             of the account and end its sessions.\n",
            user.username,
            self.now()
        );
        self.inner.outbox.enqueue(email, subject, &body).await?;
        Ok(true)
    }

    async fn send_verification_marked(
        &self,
        user: &User,
        marker: Option<&str>,
    ) -> Result<bool, AccountsError> {
        let Some(email) = &user.email else {
            return Ok(false);
        };
        if self.is_verified(user).await? {
            return Ok(false);
        }
        self.require_mail()?;
        // Older links for this user stop working.
        self.revoke_where(
            "UPDATE account_tokens SET revoked_at = $1 WHERE user_id = $2 AND purpose = 'verify_email' AND used_at IS NULL AND revoked_at IS NULL",
            &user.id,
        )
        .await?;
        let (_, token, expires) = self
            .issue(
                VERIFY,
                Some(&user.id),
                Some(email),
                marker,
                None,
                self.inner.cfg.verify_ttl.std(),
            )
            .await?;
        let body = format!(
            "Confirm that this address belongs to the Custodian account \"{}\" (the link works once, until {expires} UTC):\n\n{}\n\n\
             If you do not know this account, ignore this mail.\n",
            user.username,
            self.link("verify", &token)
        );
        self.inner
            .outbox
            .enqueue(email, "Confirm your email address for Custodian", &body)
            .await?;
        Ok(true)
    }

    /// Sends a verification link to the user's current email, unless it is verified.
    /// Answers whether a mail was queued.
    pub async fn send_verification(&self, user: &User) -> Result<bool, AccountsError> {
        self.send_verification_marked(user, None).await
    }

    /// Verifies the address the link was sent to, if it is still the user's.
    pub async fn verify_email(&self, token: &str) -> Result<User, AccountsError> {
        let t = self.find(VERIFY, token).await?;
        let user_id = t.user_id.clone().ok_or(AccountsError::InvalidLink)?;
        let user = self.inner.identity.user(&user_id).await?;
        let email = t.email.clone().unwrap_or_default();
        if !user
            .email
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(&email))
        {
            // The address changed since: this link is for the old one.
            return Err(AccountsError::InvalidLink);
        }
        if !self.consume(&t.id).await? {
            return Err(AccountsError::InvalidLink);
        }
        self.mark_verified(&user.id, &email).await?;
        if t.role.as_deref() == Some(ACTIVATES) && !user.active {
            self.inner
                .identity
                .update_active(Grantor::Operator, &user.id, true)
                .await?;
        }
        Ok(self.inner.identity.user(&user_id).await?)
    }

    // ---- password reset ----------------------------------------------------------------

    /// Starts a reset for `who` (username or email). Always succeeds from the caller's
    /// point of view: the lookup and the mail happen in the background, so that the
    /// answer (status, body and time) is the same whether or not an account matches.
    pub fn request_reset(&self, who: &str) {
        let me = self.clone();
        let who = who.trim().chars().take(254).collect::<String>();
        tokio::spawn(async move {
            if let Err(e) = me.reset_in_background(&who).await {
                tracing::warn!(error = %e, "password reset: could not queue the mail");
            }
        });
    }

    async fn reset_in_background(&self, who: &str) -> Result<(), AccountsError> {
        let user = match self.inner.identity.user_by_username(who).await? {
            Some(u) => Some(u),
            None => match parse_email(who) {
                Ok(email) => {
                    let ids: Vec<String> =
                        sqlx::query("SELECT id FROM users WHERE lower(email) = $1 LIMIT 2")
                            .bind(&email)
                            .fetch_all(self.inner.db.reader())
                            .await?
                            .iter()
                            .map(|r| r.try_get("id"))
                            .collect::<Result<_, _>>()?;
                    // Two accounts sharing the address: neither is chosen by it.
                    let id = match ids.as_slice() {
                        [only] => Some(only.clone()),
                        _ => None,
                    };
                    match id {
                        Some(id) => Some(self.inner.identity.user(&id).await?),
                        None => None,
                    }
                }
                Err(_) => None,
            },
        };
        let Some(user) = user else { return Ok(()) };
        // Deactivated accounts get nothing; locked ones may reset (a lock must not
        // become a denial of service with no way back).
        if !user.active || !self.is_verified(&user).await? || !self.inner.outbox.can_send() {
            return Ok(());
        }
        let Some(email) = user.email.clone() else {
            return Ok(());
        };
        self.revoke_where(
            "UPDATE account_tokens SET revoked_at = $1 WHERE user_id = $2 AND purpose = 'reset_password' AND used_at IS NULL AND revoked_at IS NULL",
            &user.id,
        )
        .await?;
        let (_, token, expires) = self
            .issue(
                RESET,
                Some(&user.id),
                Some(&email),
                None,
                None,
                self.inner.cfg.reset_ttl.std(),
            )
            .await?;
        let body = format!(
            "Someone asked to reset the password of the Custodian account \"{}\".\n\n\
             Choose a new password here (the link works once, until {expires} UTC):\n\n{}\n\n\
             If it was not you, ignore this mail: the password stays as it is.\n",
            user.username,
            self.link("reset", &token)
        );
        self.inner
            .outbox
            .enqueue(&email, "Reset your Custodian password", &body)
            .await?;
        Ok(())
    }

    /// A live reset link and its account. The link is bound to the address it was sent
    /// to: once the account's email is another (an administrator changed it), the link
    /// is dead, even if it somehow escaped revocation.
    async fn reset_link(&self, token: &str) -> Result<(TokenRow, User), AccountsError> {
        let t = self.find(RESET, token).await?;
        let user = self
            .inner
            .identity
            .user(t.user_id.as_deref().unwrap_or(""))
            .await
            .map_err(|_| AccountsError::InvalidLink)?;
        let same_address = match (&t.email, &user.email) {
            (Some(sent_to), Some(now)) => sent_to.eq_ignore_ascii_case(now),
            _ => false,
        };
        if !same_address {
            return Err(AccountsError::InvalidLink);
        }
        Ok((t, user))
    }

    /// The account a reset link is for, and whether it needs a TOTP or recovery code.
    pub async fn reset_target(&self, token: &str) -> Result<(User, bool), AccountsError> {
        let (_, user) = self.reset_link(token).await?;
        let totp = user.totp_enabled;
        Ok((user, totp))
    }

    /// Sets a new password through a reset link: the policy and history apply, a TOTP
    /// or recovery code is needed when TOTP is on (a wrong one counts like a failed
    /// sign-in, so a link cannot be used to guess codes), every session ends, a lock is
    /// lifted, and the address the link went to is told by mail.
    pub async fn confirm_reset(
        &self,
        token: &str,
        new: &Secret,
        code: Option<&str>,
        revoke_tokens: bool,
        origin: &Origin,
    ) -> Result<User, AccountsError> {
        let (t, user) = self.reset_link(token).await?;
        if !user.active {
            return Err(AccountsError::InvalidLink);
        }
        if user.totp_enabled {
            let code = code
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .ok_or(IdentityError::MfaRequired)?;
            if let Err(e) = self
                .inner
                .identity
                .second_factor_counted(&user, code, origin)
                .await
            {
                if matches!(e, IdentityError::InvalidTotp) {
                    self.spend_code_budget(&t.id).await?;
                }
                return Err(e.into());
            }
        }
        self.inner.identity.set_password(&user, new, None).await?;
        if !self.consume(&t.id).await? {
            return Err(AccountsError::InvalidLink);
        }
        if revoke_tokens {
            self.inner.identity.revoke_tokens(&user.id).await?;
        }
        self.inner
            .identity
            .unlock(Grantor::Operator, &user.id)
            .await?;
        // To the address the link reached (the account's, checked above).
        if let Some(email) = &t.email {
            let body = format!(
                "The password of the Custodian account \"{}\" was changed at {} UTC through a reset link, and every session of the account was ended.\n\n\
                 If it was not you, tell your administrator now.\n",
                user.username,
                self.now()
            );
            self.inner
                .outbox
                .enqueue(email, "Your Custodian password was changed", &body)
                .await?;
        }
        Ok(user)
    }

    /// Tells the verified address an account had until now that an administrator
    /// replaced it (so a takeover by address change does not go unnoticed). Nothing is
    /// sent when that address was never verified or mail is off.
    pub async fn notify_email_changed(&self, before: &User) -> Result<(), AccountsError> {
        if !self.is_verified(before).await? || !self.inner.outbox.can_send() {
            return Ok(());
        }
        let Some(old) = &before.email else {
            return Ok(());
        };
        let body = format!(
            "The email address of the Custodian account \"{}\" was changed by an administrator at {} UTC. \
             Mail for the account, including password-reset links, now goes to the new address, and every \
             link sent here before has stopped working.\n\n\
             If you did not expect this, tell your administrator now.\n",
            before.username,
            self.now()
        );
        self.inner
            .outbox
            .enqueue(
                old,
                "The email address of your Custodian account was changed",
                &body,
            )
            .await?;
        Ok(())
    }

    /// A reset link survives a few wrong codes (a typo), then dies: a link cannot be
    /// used to guess the second factor.
    async fn spend_code_budget(&self, link_id: &str) -> Result<(), AccountsError> {
        const WRONG_CODES_PER_LINK: i64 = 3;
        let key = format!("link:{link_id}");
        let now = self.now();
        let n = crate::identity::store::count_failure(&self.inner.db, &key, &now, "").await?;
        if n >= WRONG_CODES_PER_LINK {
            self.revoke_where(
                "UPDATE account_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                link_id,
            )
            .await?;
            crate::identity::store::clear_failures(&self.inner.db, &key).await?;
        }
        Ok(())
    }

    // ---- self-registration -------------------------------------------------------------

    /// Creates an inactive account with the registration role and sends the verification
    /// that activates it. Off unless `accounts.self_registration`.
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &Secret,
    ) -> Result<(), AccountsError> {
        if !self.inner.cfg.self_registration {
            return Err(AccountsError::Disabled);
        }
        self.require_mail()?;
        let role = &self.inner.cfg.self_registration_role;
        let perms = crate::identity::store::role_permissions(&self.inner.db, role).await?;
        if perms.iter().any(|p| {
            p.starts_with("patients:")
                || p.starts_with("records:")
                || p.starts_with("phi:")
                || p.starts_with("amendments:")
                || p == "audit:read"
                || p == "breakglass"
        }) {
            tracing::error!(role = %role, "accounts.self_registration_role holds PHI permissions; registration refused");
            return Err(AccountsError::Refused(
                "registration is misconfigured: the registration role must hold no PHI permission",
            ));
        }
        let email = parse_email(email).map_err(|m| IdentityError::Invalid("email", m))?;
        // An address already in use gets nothing new (and the answer does not say so).
        let taken = sqlx::query("SELECT 1 AS x FROM users WHERE lower(email) = $1")
            .bind(&email)
            .fetch_optional(self.inner.db.reader())
            .await?
            .is_some();
        if taken {
            return Ok(());
        }
        let user = self
            .inner
            .identity
            .create_user(Grantor::Operator, username, Some(&email), role, password)
            .await?;
        self.inner
            .identity
            .update_active(Grantor::Operator, &user.id, false)
            .await?;
        let user = self.inner.identity.user(&user.id).await?;
        self.send_verification_marked(&user, Some(ACTIVATES))
            .await?;
        Ok(())
    }
}

/// Whether the user's current email is the verified one.
pub async fn email_verified(db: &Db, user: &User) -> Result<bool, AccountsError> {
    let Some(email) = &user.email else {
        return Ok(false);
    };
    let row = sqlx::query("SELECT email FROM email_verifications WHERE user_id = $1")
        .bind(&user.id)
        .fetch_optional(db.reader())
        .await?;
    Ok(match row {
        Some(r) => r.try_get::<String, _>("email")?.eq_ignore_ascii_case(email),
        None => false,
    })
}

/// Queues the mail telling `user` that their second factor (authenticator app and
/// recovery codes) was reset by an administrator at `now`, so that a reset nobody asked
/// for does not go unnoticed. Like every mail other than a verification, it goes only to
/// a verified address; nothing is queued without one or when no mail can be sent. The
/// outbox delivers it (from the command line: the next server that polls the outbox).
/// Answers whether a mail was queued.
pub async fn totp_reset_notice(
    db: &Db,
    outbox: &Outbox,
    user: &User,
    now: &str,
) -> Result<bool, AccountsError> {
    let Some(email) = &user.email else {
        return Ok(false);
    };
    if !outbox.can_send() || !email_verified(db, user).await? {
        return Ok(false);
    }
    let body = format!(
        "The second factor of the Custodian account \"{}\" (its authenticator app, its passkeys and its recovery codes) was reset by an administrator at {now} UTC, \
         and every session of the account was ended.\n\n\
         At your next sign-in you set up an authenticator app or a passkey again.\n\n\
         If you did not ask for this, tell your administrator now.\n",
        user.username
    );
    outbox
        .enqueue(
            email,
            "The second factor of your Custodian account was reset",
            &body,
        )
        .await?;
    Ok(true)
}
