//! Passkeys (WebAuthn, through kanidm's `webauthn-rs`): several per user, each usable as
//! the second factor after the password, or alone (a discoverable credential with user
//! verification). No HTTP here.
//!
//! The library checks signatures, origins, the relying-party id hash, user verification,
//! counters and backup flags; it leaves single use and expiry of a challenge to its
//! caller. Here a ceremony's state lives in `passkey_ceremonies`, found by the SHA-256
//! of a random id given to the client, taken with `DELETE … RETURNING` (so two answers
//! to one challenge cannot both pass), bound to its purpose and to its user or session,
//! and valid for `passkeys.challenge_ttl`.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use time::OffsetDateTime;
use webauthn_rs::prelude::{
    DiscoverableAuthentication, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, Url, Uuid,
};
use webauthn_rs::{Webauthn, WebauthnBuilder};

use super::model::{AttemptReason, User};
use super::service::{
    AddressCheck, AttemptFacts, FailureKeys, Identity, IdentityError, NewLogin, Origin,
};
use super::{store, totp};
use crate::clock::timestamp;
use crate::config::Config;
use crate::crypto;
use crate::store::{Db, StoreError};

/// Passkeys one account may hold.
pub const MAX_PASSKEYS: i64 = 10;
/// Longest passkey name.
pub const MAX_NAME: usize = 64;
/// Sign-in challenges open at once (across every address) before new ones wait.
pub const MAX_OPEN_SIGN_INS: i64 = 10_000;
/// Longest answer accepted from a client (a credential with its attestation).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
const CEREMONY_PREFIX: &str = "pkc_";

/// The relying party for a configuration (`passkeys.*`, defaults from `mail.base_url`;
/// dev without one: `localhost` on any port).
pub fn relying_party(config: &Config) -> anyhow::Result<Webauthn> {
    let (origin, any_port) = match config.passkeys.effective_origin(config) {
        Some(o) => o,
        // Outside dev without an address (prod refuses to start): passkeys answer for
        // localhost only, so nothing can be registered for the wrong site.
        None => (Url::parse("http://localhost")?, false),
    };
    let rp_id = config
        .passkeys
        .effective_rp_id(config)
        .unwrap_or_else(|| "localhost".into());
    let mut b = WebauthnBuilder::new(&rp_id, &origin)
        .map_err(|e| anyhow::anyhow!("passkeys: relying party `{rp_id}` at {origin}: {e}"))?
        .rp_name(&config.passkeys.rp_name)
        .timeout(config.passkeys.challenge_ttl.std());
    if any_port {
        b = b.allow_any_port(true);
    }
    b.build()
        .map_err(|e| anyhow::anyhow!("passkeys: relying party `{rp_id}` at {origin}: {e}"))
}

/// What a ceremony is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Adding a passkey to the signed-in user (bound to the session).
    Register,
    /// The second factor after a right password (bound to the user).
    SecondFactor,
    /// Signing in with a passkey alone (bound to nothing: the passkey names its user).
    SignIn,
}

impl Purpose {
    const fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::SecondFactor => "second_factor",
            Purpose::SignIn => "sign_in",
        }
    }
}

/// A challenge for the client: the ceremony id to send back, and the options for
/// `navigator.credentials.create()` / `.get()` (`{"publicKey": …}`, binary fields in
/// base64url).
#[derive(Clone, Debug, Serialize)]
pub struct Challenge {
    pub ceremony: String,
    #[serde(rename = "publicKey")]
    pub public_key: serde_json::Value,
}

impl Challenge {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// A passkey as its owner and administrators see it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PasskeyView {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A registration's outcome: the passkey, and recovery codes when the account had none
/// (shown once).
pub struct Registered {
    pub passkey: PasskeyView,
    pub recovery_codes: Option<Vec<String>>,
}

/// The registration state with the user handle it was started with.
#[derive(Serialize, Deserialize)]
struct RegisterState {
    handle: Uuid,
    state: PasskeyRegistration,
}

struct CeremonyRow {
    purpose: String,
    user_id: Option<String>,
    session_id: Option<String>,
    state: String,
    expires_at: String,
}

struct PasskeyRow {
    id: String,
    user_id: String,
    user_handle: String,
    credential: String,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The options of a challenge as JSON, without the `mediation` the library sets for a
/// conditional (autofill) sign-in: the pages start it from a button.
fn options_json<T: Serialize>(options: &T) -> Result<serde_json::Value, IdentityError> {
    let mut v = serde_json::to_value(options)
        .map_err(|e| IdentityError::Internal(format!("passkey options: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("mediation");
    }
    Ok(v.get("publicKey").cloned().unwrap_or(v))
}

impl Identity {
    pub fn relying_party(&self) -> &Webauthn {
        &self.webauthn
    }

    /// Stores a ceremony; returns the id the client sends back.
    async fn new_ceremony(
        &self,
        purpose: Purpose,
        user_id: Option<&str>,
        session_id: Option<&str>,
        state: &impl Serialize,
    ) -> Result<String, IdentityError> {
        let (id, hash) = crypto::new_token(CEREMONY_PREFIX)?;
        let now = self.now_at();
        let state = serde_json::to_string(state)
            .map_err(|e| IdentityError::Internal(format!("passkey state: {e}")))?;
        let expires = timestamp(now + time::Duration::seconds(self.challenge_ttl_secs()));
        let db = self.db();
        // Ceremonies never answered go when the next one starts.
        sqlx::query("DELETE FROM passkey_ceremonies WHERE expires_at <= $1")
            .bind(timestamp(now))
            .execute(db.writer())
            .await
            .map_err(StoreError::from)?;
        sqlx::query(
            "INSERT INTO passkey_ceremonies (id_hash, purpose, user_id, session_id, state, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(user_id)
        .bind(session_id)
        .bind(state)
        .bind(expires)
        .execute(db.writer())
        .await
        .map_err(StoreError::from)?;
        Ok(id)
    }

    /// Takes a ceremony once: its state when it exists, is for `purpose`, is bound to
    /// this user and session (when given) and has not expired; else `InvalidPasskey`.
    async fn take_ceremony(
        &self,
        id: &str,
        purpose: Purpose,
        user_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<String, IdentityError> {
        if !id.starts_with(CEREMONY_PREFIX) || id.len() > 128 {
            return Err(IdentityError::InvalidPasskey);
        }
        let hash = crypto::sha256_hex(id.as_bytes());
        let row = sqlx::query(
            "DELETE FROM passkey_ceremonies WHERE id_hash = $1 \
             RETURNING purpose, user_id, session_id, state, expires_at",
        )
        .bind(hash)
        .fetch_optional(self.db().writer())
        .await
        .map_err(StoreError::from)?
        .map(|r| {
            Ok::<_, sqlx::Error>(CeremonyRow {
                purpose: r.try_get("purpose")?,
                user_id: r.try_get("user_id")?,
                session_id: r.try_get("session_id")?,
                state: r.try_get("state")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
        .map_err(StoreError::from)?;
        let Some(row) = row else {
            return Err(IdentityError::InvalidPasskey);
        };
        let now = timestamp(self.now_at());
        let bound = row.purpose == purpose.as_str()
            && (user_id.is_none() || row.user_id.as_deref() == user_id)
            && (session_id.is_none() || row.session_id.as_deref() == session_id);
        if !bound || row.expires_at.as_str() <= now.as_str() {
            return Err(IdentityError::InvalidPasskey);
        }
        Ok(row.state)
    }

    fn challenge_ttl_secs(&self) -> i64 {
        i64::try_from(self.settings().challenge_ttl.as_secs()).unwrap_or(300)
    }

    fn now_at(&self) -> OffsetDateTime {
        self.clock().now()
    }

    // ---- listing ---------------------------------------------------------------

    /// A user's passkeys, oldest first.
    pub async fn passkeys(&self, user_id: &str) -> Result<Vec<PasskeyView>, IdentityError> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at FROM passkeys WHERE user_id = $1 \
             ORDER BY created_at, id",
        )
        .bind(user_id)
        .fetch_all(self.db().reader())
        .await
        .map_err(StoreError::from)?;
        rows.iter()
            .map(|r| {
                Ok(PasskeyView {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| StoreError::from(e).into())
    }

    /// How many passkeys a user has.
    pub async fn passkey_count(&self, user_id: &str) -> Result<i64, IdentityError> {
        Ok(passkey_count(self.db(), user_id).await?)
    }

    async fn passkey_rows(&self, user_id: &str) -> Result<Vec<PasskeyRow>, IdentityError> {
        let rows = sqlx::query(
            "SELECT id, user_id, user_handle, credential FROM passkeys WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_all(self.db().reader())
        .await
        .map_err(StoreError::from)?;
        rows.iter()
            .map(row_of)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| StoreError::from(e).into())
    }

    // ---- registration ----------------------------------------------------------

    /// Starts adding a passkey for `user` in session `session_id` (which the caller
    /// has confirmed is fresh). The authenticator is asked for a discoverable
    /// credential with user verification, so that it can also sign in alone.
    pub async fn passkey_register_start(
        &self,
        user: &User,
        session_id: &str,
    ) -> Result<Challenge, IdentityError> {
        let rows = self.passkey_rows(&user.id).await?;
        self.may_change_passkeys(user, session_id, !rows.is_empty())
            .await?;
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= MAX_PASSKEYS {
            return Err(IdentityError::Conflict(
                "This account has the most passkeys allowed (10): remove one first.",
            ));
        }
        let handle = match rows.first() {
            Some(r) => Uuid::parse_str(&r.user_handle)
                .map_err(|_| IdentityError::Internal("stored user handle is malformed".into()))?,
            None => Uuid::new_v4(),
        };
        let existing = rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Passkey>(&r.credential).ok())
            .map(|p| p.cred_id().clone())
            .collect::<Vec<_>>();
        let (mut ccr, state) = self
            .webauthn
            .start_passkey_registration(handle, &user.username, &user.username, Some(existing))
            .map_err(|e| IdentityError::Internal(format!("passkey registration: {e}")))?;
        // A passkey that can sign in alone: a discoverable (resident) credential.
        if let Some(sel) = ccr.public_key.authenticator_selection.as_mut() {
            sel.require_resident_key = true;
            sel.resident_key = Some(webauthn_rs_proto::ResidentKeyRequirement::Required);
        }
        let public_key = options_json(&ccr)?;
        let ceremony = self
            .new_ceremony(
                Purpose::Register,
                Some(&user.id),
                Some(session_id),
                &RegisterState { handle, state },
            )
            .await?;
        Ok(Challenge {
            ceremony,
            public_key,
        })
    }

    /// Finishes adding a passkey: the answer must verify against the ceremony this
    /// session started. Returns the passkey, and ten recovery codes when the account had
    /// none (no TOTP): the way back if the passkey is lost.
    pub async fn passkey_register_finish(
        &self,
        user: &User,
        session_id: &str,
        ceremony: &str,
        name: &str,
        answer: &serde_json::Value,
    ) -> Result<Registered, IdentityError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(IdentityError::Invalid(
                "name",
                "must be 1 to 64 characters, without control characters",
            ));
        }
        let state = self
            .take_ceremony(
                ceremony,
                Purpose::Register,
                Some(&user.id),
                Some(session_id),
            )
            .await?;
        let RegisterState { handle, state } =
            serde_json::from_str(&state).map_err(|_| IdentityError::InvalidPasskey)?;
        let answer: RegisterPublicKeyCredential =
            serde_json::from_value(answer.clone()).map_err(|_| IdentityError::InvalidPasskey)?;
        let passkey = self
            .webauthn
            .finish_passkey_registration(&answer, &state)
            .map_err(|e| {
                tracing::info!(error = %e, "passkey registration refused");
                IdentityError::InvalidPasskey
            })?;
        self.may_change_passkeys(
            user,
            session_id,
            passkey_count(self.db(), &user.id).await? > 0,
        )
        .await?;
        let credential = serde_json::to_string(&passkey)
            .map_err(|e| IdentityError::Internal(format!("passkey: {e}")))?;
        let id = uuid::Uuid::now_v7().to_string();
        let now = timestamp(self.now_at());
        // Counted and inserted under the user's row lock (PostgreSQL) or the one writer
        // (SQLite): two registrations finishing at once cannot pass the limit together.
        let mut tx = self.db().writer().begin().await.map_err(StoreError::from)?;
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(&user.id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM passkeys WHERE user_id = $1")
            .bind(&user.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .try_get("n")
            .map_err(StoreError::from)?;
        if count >= MAX_PASSKEYS {
            return Err(IdentityError::Conflict(
                "This account has the most passkeys allowed (10): remove one first.",
            ));
        }
        let inserted = sqlx::query(
            "INSERT INTO passkeys (id, user_id, credential_id, user_handle, name, credential, created_at, last_used_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) ON CONFLICT (credential_id) DO NOTHING",
        )
        .bind(&id)
        .bind(&user.id)
        .bind(b64(passkey.cred_id().as_ref()))
        .bind(handle.to_string())
        .bind(name)
        .bind(credential)
        .bind(&now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?
        .rows_affected();
        if inserted != 1 {
            return Err(IdentityError::Conflict(
                "This passkey is already registered.",
            ));
        }
        tx.commit().await.map_err(StoreError::from)?;
        // The session proved the new authenticator (with user verification).
        set_session_method(self.db(), session_id, "passkey_registered").await?;
        let recovery_codes = if user.totp_enabled || has_recovery_codes(self.db(), &user.id).await?
        {
            None
        } else {
            Some(self.new_recovery_codes(&user.id).await?)
        };
        Ok(Registered {
            passkey: PasskeyView {
                id,
                name: name.to_owned(),
                created_at: now,
                last_used_at: None,
            },
            recovery_codes,
        })
    }

    async fn new_recovery_codes(&self, user_id: &str) -> Result<Vec<String>, IdentityError> {
        let codes = totp::recovery_codes()
            .map_err(|_| IdentityError::Internal("random source failed".into()))?;
        let hashes = codes
            .iter()
            .map(|c| {
                let n = totp::normalize_recovery_code(c).unwrap_or_default();
                self.recovery_code_hash(user_id, &n)
            })
            .collect::<Result<Vec<_>, _>>()?;
        store::replace_recovery_codes(self.db(), user_id, &hashes).await?;
        Ok(codes)
    }

    /// Removes one of a user's passkeys, in session `session_id` (the caller checked a
    /// fresh sign-in); returns its name. With the last passkey gone and TOTP off, the
    /// recovery codes go too.
    pub async fn passkey_remove(
        &self,
        user: &User,
        session_id: &str,
        id: &str,
    ) -> Result<String, IdentityError> {
        self.may_change_passkeys(user, session_id, true).await?;
        let user_id = user.id.as_str();
        let name: Option<String> =
            sqlx::query("DELETE FROM passkeys WHERE id = $1 AND user_id = $2 RETURNING name")
                .bind(id)
                .bind(user_id)
                .fetch_optional(self.db().writer())
                .await
                .map_err(StoreError::from)?
                .map(|r| r.try_get("name"))
                .transpose()
                .map_err(StoreError::from)?;
        let Some(name) = name else {
            return Err(IdentityError::NotFound);
        };
        self.forget_orphan_recovery_codes(user_id).await?;
        Ok(name)
    }

    /// Removes every passkey of a user (an administrator's reset); returns how many.
    pub async fn passkeys_remove_all(&self, user_id: &str) -> Result<u64, IdentityError> {
        let n = sqlx::query("DELETE FROM passkeys WHERE user_id = $1")
            .bind(user_id)
            .execute(self.db().writer())
            .await
            .map_err(StoreError::from)?
            .rows_affected();
        self.forget_orphan_recovery_codes(user_id).await?;
        Ok(n)
    }

    async fn forget_orphan_recovery_codes(&self, user_id: &str) -> Result<(), IdentityError> {
        sqlx::query(
            "DELETE FROM recovery_codes WHERE user_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM passkeys WHERE user_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM users WHERE id = $1 AND totp_enabled = 1)",
        )
        .bind(user_id)
        .execute(self.db().writer())
        .await
        .map_err(StoreError::from)?;
        Ok(())
    }

    // ---- second factor ---------------------------------------------------------

    /// A challenge for the second factor of `user`, who just gave the right password;
    /// None when the user has no passkey.
    pub async fn passkey_second_factor_start(
        &self,
        user_id: &str,
    ) -> Result<Option<Challenge>, IdentityError> {
        let passkeys = self
            .passkey_rows(user_id)
            .await?
            .iter()
            .filter_map(|r| serde_json::from_str::<Passkey>(&r.credential).ok())
            .collect::<Vec<_>>();
        if passkeys.is_empty() {
            return Ok(None);
        }
        let (rcr, state) = self
            .webauthn
            .start_passkey_authentication(&passkeys)
            .map_err(|e| IdentityError::Internal(format!("passkey authentication: {e}")))?;
        let public_key = options_json(&rcr)?;
        let ceremony = self
            .new_ceremony(Purpose::SecondFactor, Some(user_id), None, &state)
            .await?;
        Ok(Some(Challenge {
            ceremony,
            public_key,
        }))
    }

    /// Checks a passkey answer as the second factor of `user`: true when it verifies
    /// against a challenge issued to this user, and the passkey's counter and flags are
    /// kept.
    pub(super) async fn passkey_second_factor_ok(
        &self,
        user: &User,
        ceremony: &str,
        answer: &serde_json::Value,
    ) -> Result<bool, IdentityError> {
        let state = match self
            .take_ceremony(ceremony, Purpose::SecondFactor, Some(&user.id), None)
            .await
        {
            Ok(s) => s,
            Err(IdentityError::InvalidPasskey) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Ok(state) = serde_json::from_str::<PasskeyAuthentication>(&state) else {
            return Ok(false);
        };
        let Ok(answer) = serde_json::from_value::<PublicKeyCredential>(answer.clone()) else {
            return Ok(false);
        };
        let result = match self.webauthn.finish_passkey_authentication(&answer, &state) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "passkey second factor refused");
                return Ok(false);
            }
        };
        let cred_id = b64(result.cred_id().as_ref());
        match self.passkey_used(&user.id, &cred_id, &result).await {
            Ok(()) => Ok(true),
            Err(IdentityError::InvalidPasskey) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Keeps what an authentication taught about a passkey: its counter and backup
    /// flags, and when it was last used.
    async fn passkey_used(
        &self,
        user_id: &str,
        cred_id: &str,
        result: &webauthn_rs::prelude::AuthenticationResult,
    ) -> Result<(), IdentityError> {
        let row = sqlx::query(
            "SELECT id, user_id, user_handle, credential FROM passkeys \
             WHERE credential_id = $1 AND user_id = $2",
        )
        .bind(cred_id)
        .bind(user_id)
        .fetch_optional(self.db().writer())
        .await
        .map_err(StoreError::from)?
        .map(|r| row_of(&r))
        .transpose()
        .map_err(StoreError::from)?
        .ok_or(IdentityError::InvalidPasskey)?;
        let mut passkey: Passkey = serde_json::from_str(&row.credential)
            .map_err(|_| IdentityError::Internal("stored passkey is malformed".into()))?;
        // The counter as stored now, not as the challenge's state saw it: a clone that
        // replays a count already used (while a challenge was open, or in a race) is
        // refused. An authenticator without a counter sends 0 every time.
        let stored = serde_json::from_str::<serde_json::Value>(&row.credential)
            .ok()
            .and_then(|v| v["cred"]["counter"].as_u64())
            .unwrap_or(0);
        let got = u64::from(result.counter());
        if (got > 0 || stored > 0) && got <= stored {
            tracing::info!("passkey refused: its signature counter did not grow");
            return Err(IdentityError::InvalidPasskey);
        }
        let now = timestamp(self.now_at());
        let credential = if passkey.update_credential(result) == Some(true) {
            Some(
                serde_json::to_string(&passkey)
                    .map_err(|e| IdentityError::Internal(format!("passkey: {e}")))?,
            )
        } else {
            None
        };
        // Only over the row as read: of two answers racing with counts above it, one
        // passes.
        let n = sqlx::query(
            "UPDATE passkeys SET last_used_at = $1, credential = COALESCE($2, credential) \
             WHERE id = $3 AND credential = $4",
        )
        .bind(now)
        .bind(credential)
        .bind(&row.id)
        .bind(&row.credential)
        .execute(self.db().writer())
        .await
        .map_err(StoreError::from)?
        .rows_affected();
        if n != 1 {
            return Err(IdentityError::InvalidPasskey);
        }
        Ok(())
    }

    // ---- sign-in with a passkey alone --------------------------------------------

    /// A challenge for signing in with a passkey alone (any account: the passkey names
    /// its user).
    pub async fn passkey_sign_in_start(&self) -> Result<Challenge, IdentityError> {
        // Anyone may ask: the open challenges are capped, so that many addresses cannot
        // fill the table (each address is also rate-limited).
        let open: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM passkey_ceremonies WHERE purpose = $1 AND expires_at > $2",
        )
        .bind(Purpose::SignIn.as_str())
        .bind(timestamp(self.now_at()))
        .fetch_one(self.db().writer())
        .await
        .map_err(StoreError::from)?
        .try_get("n")
        .map_err(StoreError::from)?;
        if open >= MAX_OPEN_SIGN_INS {
            return Err(IdentityError::TooBusy);
        }
        let (rcr, state) = self
            .webauthn
            .start_discoverable_authentication()
            .map_err(|e| IdentityError::Internal(format!("passkey authentication: {e}")))?;
        let public_key = options_json(&rcr)?;
        let ceremony = self
            .new_ceremony(Purpose::SignIn, None, None, &state)
            .await?;
        Ok(Challenge {
            ceremony,
            public_key,
        })
    }

    /// Signs in with a passkey alone. The address throttles hold and each failure counts
    /// like a failed password; the account's lock from failed passwords does not apply
    /// (it stops password sign-in only). Returns the facts to record, as `login` does.
    pub async fn passkey_sign_in(
        &self,
        ceremony: &str,
        answer: &serde_json::Value,
        origin: &Origin,
    ) -> (Result<NewLogin, IdentityError>, AttemptFacts) {
        let mut facts = AttemptFacts {
            username: String::new(),
            user_id: None,
            reason: AttemptReason::BadPasskey,
            locked_now: false,
        };
        let result = self
            .passkey_sign_in_inner(ceremony, answer, origin, &mut facts)
            .await;
        (result, facts)
    }

    async fn passkey_sign_in_inner(
        &self,
        ceremony: &str,
        answer: &serde_json::Value,
        origin: &Origin,
        facts: &mut AttemptFacts,
    ) -> Result<NewLogin, IdentityError> {
        let now = self.now_at();
        let anonymous = FailureKeys::new("", origin);
        self.gate_address(&anonymous, now, facts, AddressCheck::AcrossUsernames)
            .await?;
        // Who the answer claims to be, before anything is verified.
        let parsed = serde_json::from_value::<PublicKeyCredential>(answer.clone()).ok();
        let claimed = match &parsed {
            Some(p) => match self.webauthn.identify_discoverable_authentication(p) {
                Ok((handle, cred_id)) => self
                    .passkey_by_credential(&b64(cred_id))
                    .await?
                    .filter(|row| Uuid::parse_str(&row.user_handle).is_ok_and(|h| h == handle)),
                Err(_) => None,
            },
            None => None,
        };
        let user = match &claimed {
            Some(row) => store::user_by_id(self.db(), &row.user_id).await?,
            None => None,
        };
        if let Some(u) = &user {
            facts.username = u.username.clone();
            facts.user_id = Some(u.id.clone());
        }
        let keys = FailureKeys::new(&facts.username, origin);
        if user.is_some() {
            self.gate_address(&keys, now, facts, AddressCheck::ThisUsername)
                .await?;
        }
        // The challenge is spent whatever happens next.
        let state = self
            .take_ceremony(ceremony, Purpose::SignIn, None, None)
            .await;
        let (Some(parsed), Some(row), Some(user), Ok(state)) = (parsed, claimed, user, state)
        else {
            facts.reason = AttemptReason::BadPasskey;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidPasskey);
        };
        let verified = serde_json::from_str::<DiscoverableAuthentication>(&state)
            .ok()
            .zip(serde_json::from_str::<Passkey>(&row.credential).ok())
            .map(|(state, passkey)| {
                self.webauthn
                    .finish_discoverable_authentication_v2(&parsed, state, &passkey)
            });
        let result = match verified {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::info!(error = %e, "passkey sign-in refused");
                facts.reason = AttemptReason::BadPasskey;
                self.count_failure(&keys, now, facts).await?;
                return Err(IdentityError::InvalidPasskey);
            }
            None => {
                facts.reason = AttemptReason::BadPasskey;
                self.count_failure(&keys, now, facts).await?;
                return Err(IdentityError::InvalidPasskey);
            }
        };
        if !user.active {
            facts.reason = AttemptReason::Inactive;
            self.count_failure(&keys, now, facts).await?;
            return Err(IdentityError::InvalidCredentials);
        }
        match self
            .passkey_used(&user.id, &b64(result.cred_id().as_ref()), &result)
            .await
        {
            Ok(()) => {}
            Err(IdentityError::InvalidPasskey) => {
                facts.reason = AttemptReason::BadPasskey;
                self.count_failure(&keys, now, facts).await?;
                return Err(IdentityError::InvalidPasskey);
            }
            Err(e) => return Err(e),
        }
        // Not the username's count: that is the password's, and a passkey proves
        // nothing about who tried the password. This address's count on it starts again.
        if let Some(k) = &keys.pair {
            store::clear_failures(self.db(), k).await?;
        }
        facts.reason = AttemptReason::Success;
        self.open_session(user, origin, "passkey", false).await
    }

    async fn passkey_by_credential(
        &self,
        credential_id: &str,
    ) -> Result<Option<PasskeyRow>, IdentityError> {
        Ok(sqlx::query(
            "SELECT id, user_id, user_handle, credential FROM passkeys WHERE credential_id = $1",
        )
        .bind(credential_id)
        .fetch_optional(self.db().reader())
        .await
        .map_err(StoreError::from)?
        .map(|r| row_of(&r))
        .transpose()
        .map_err(StoreError::from)?)
    }

    /// A role that must use a passkey, with one already: only a session signed in with a
    /// passkey, or with a recovery code (the way back from a lost passkey), may add or
    /// remove passkeys. A phisher holding the password and a TOTP code would otherwise
    /// remove the owner's passkeys, or add one of their own, and leave confinement.
    async fn may_change_passkeys(
        &self,
        user: &User,
        session_id: &str,
        has_passkeys: bool,
    ) -> Result<(), IdentityError> {
        if self.requires_passkey(&user.role)
            && has_passkeys
            && !self.session_may_add_passkey(session_id).await?
        {
            return Err(IdentityError::Forbidden(
                "Your role signs in with a passkey: sign in with one (or with a recovery code, if you lost it) to add or remove passkeys.".into(),
            ));
        }
        Ok(())
    }

    /// Whether a session of a role that must use a passkey may change its passkeys:
    /// signed in with a passkey, or with a recovery code.
    async fn session_may_add_passkey(&self, session_id: &str) -> Result<bool, IdentityError> {
        Ok(self.session_method(session_id).await?.is_some_and(|m| {
            matches!(
                m.as_str(),
                "passkey" | "password+passkey" | "passkey_registered" | "password+recovery_code"
            )
        }))
    }

    async fn session_method(&self, session_id: &str) -> Result<Option<String>, IdentityError> {
        let method: Option<Option<String>> =
            sqlx::query("SELECT method FROM sessions WHERE id = $1")
                .bind(session_id)
                .fetch_optional(self.db().reader())
                .await
                .map_err(StoreError::from)?
                .map(|r| r.try_get("method"))
                .transpose()
                .map_err(StoreError::from)?;
        Ok(method.flatten())
    }
}

/// Whether a session's sign-in method proved a passkey (signed in with one, or
/// registered one).
pub fn signed_in_with_passkey(method: Option<&str>) -> bool {
    matches!(
        method,
        Some("passkey" | "password+passkey" | "passkey_registered")
    )
}

fn row_of(r: &sqlx::any::AnyRow) -> Result<PasskeyRow, sqlx::Error> {
    Ok(PasskeyRow {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        user_handle: r.try_get("user_handle")?,
        credential: r.try_get("credential")?,
    })
}

pub async fn passkey_count(db: &Db, user_id: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query("SELECT COUNT(*) AS n FROM passkeys WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(db.reader())
            .await?
            .try_get("n")?,
    )
}

async fn has_recovery_codes(db: &Db, user_id: &str) -> Result<bool, StoreError> {
    let n: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL",
    )
    .bind(user_id)
    .fetch_one(db.reader())
    .await?
    .try_get("n")?;
    Ok(n > 0)
}

async fn set_session_method(db: &Db, session_id: &str, method: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE sessions SET method = $1 WHERE id = $2")
        .bind(method)
        .bind(session_id)
        .execute(db.writer())
        .await?;
    Ok(())
}
