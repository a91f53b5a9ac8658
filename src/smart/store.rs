//! Server-side state of SMART launches: pending launches (state, sealed PKCE verifier)
//! and launch contexts (sealed tokens tied to a Custodian session).

use sqlx::Row;

use crate::store::{Db, StoreError};

pub struct Launch {
    pub state_hash: String,
    pub binding_hash: String,
    pub session_id: String,
    pub user_id: String,
    pub iss: String,
    pub token_endpoint: String,
    pub verifier: String,
    pub redirect_uri: String,
    pub created_at: String,
    pub expires_at: String,
}

pub struct Context {
    pub id: String,
    pub cookie_hash: String,
    pub session_id: String,
    pub user_id: String,
    pub iss: String,
    pub token_endpoint: String,
    pub patient: String,
    pub scope: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub access_expires_at: String,
    pub created_at: String,
}

pub async fn insert_launch(db: &Db, l: &Launch) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO smart_launches (state_hash, binding_hash, session_id, user_id, iss, \
         token_endpoint, verifier, redirect_uri, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&l.state_hash)
    .bind(&l.binding_hash)
    .bind(&l.session_id)
    .bind(&l.user_id)
    .bind(&l.iss)
    .bind(&l.token_endpoint)
    .bind(&l.verifier)
    .bind(&l.redirect_uri)
    .bind(&l.created_at)
    .bind(&l.expires_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// Takes a launch by its state: returns it and deletes it, so a state works once.
pub async fn take_launch(db: &Db, state_hash: &str) -> Result<Option<Launch>, StoreError> {
    let row = sqlx::query(
        "DELETE FROM smart_launches WHERE state_hash = $1 RETURNING state_hash, binding_hash, \
         session_id, user_id, iss, token_endpoint, verifier, redirect_uri, created_at, expires_at",
    )
    .bind(state_hash)
    .fetch_optional(db.writer())
    .await?;
    row.map(|r| {
        Ok(Launch {
            state_hash: r.try_get("state_hash")?,
            binding_hash: r.try_get("binding_hash")?,
            session_id: r.try_get("session_id")?,
            user_id: r.try_get("user_id")?,
            iss: r.try_get("iss")?,
            token_endpoint: r.try_get("token_endpoint")?,
            verifier: r.try_get("verifier")?,
            redirect_uri: r.try_get("redirect_uri")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
        })
    })
    .transpose()
}

pub async fn insert_context(db: &Db, c: &Context) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO smart_contexts (id, cookie_hash, session_id, user_id, iss, token_endpoint, \
         patient, scope, access_token, refresh_token, access_expires_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&c.id)
    .bind(&c.cookie_hash)
    .bind(&c.session_id)
    .bind(&c.user_id)
    .bind(&c.iss)
    .bind(&c.token_endpoint)
    .bind(&c.patient)
    .bind(&c.scope)
    .bind(&c.access_token)
    .bind(&c.refresh_token)
    .bind(&c.access_expires_at)
    .bind(&c.created_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn context_by_cookie(db: &Db, cookie_hash: &str) -> Result<Option<Context>, StoreError> {
    let row = sqlx::query(
        "SELECT id, cookie_hash, session_id, user_id, iss, token_endpoint, patient, scope, \
         access_token, refresh_token, access_expires_at, created_at \
         FROM smart_contexts WHERE cookie_hash = $1",
    )
    .bind(cookie_hash)
    .fetch_optional(db.writer())
    .await?;
    row.map(|r| {
        Ok(Context {
            id: r.try_get("id")?,
            cookie_hash: r.try_get("cookie_hash")?,
            session_id: r.try_get("session_id")?,
            user_id: r.try_get("user_id")?,
            iss: r.try_get("iss")?,
            token_endpoint: r.try_get("token_endpoint")?,
            patient: r.try_get("patient")?,
            scope: r.try_get("scope")?,
            access_token: r.try_get("access_token")?,
            refresh_token: r.try_get("refresh_token")?,
            access_expires_at: r.try_get("access_expires_at")?,
            created_at: r.try_get("created_at")?,
        })
    })
    .transpose()
}

/// Stores refreshed tokens.
pub async fn update_tokens(
    db: &Db,
    id: &str,
    access: &str,
    refresh: Option<&str>,
    expires_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE smart_contexts SET access_token = $1, refresh_token = $2, access_expires_at = $3 \
         WHERE id = $4",
    )
    .bind(access)
    .bind(refresh)
    .bind(expires_at)
    .bind(id)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn delete_context(db: &Db, id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM smart_contexts WHERE id = $1")
        .bind(id)
        .execute(db.writer())
        .await?;
    Ok(())
}

/// Deletes the launches and contexts of sessions that ended (signed out, revoked, past
/// their absolute lifetime or idle since `idle_before`), and launches past their time.
pub async fn sweep(db: &Db, now: &str, idle_before: &str) -> Result<u64, StoreError> {
    let ended = "SELECT id FROM sessions WHERE revoked_at IS NOT NULL \
                 OR absolute_expires_at <= $1 OR last_used_at <= $2";
    let mut n = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM smart_contexts WHERE session_id IN ({ended}) \
         OR session_id NOT IN (SELECT id FROM sessions)"
    )))
    .bind(now)
    .bind(idle_before)
    .execute(db.writer())
    .await?
    .rows_affected();
    n += sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM smart_launches WHERE expires_at <= $1 OR session_id IN ({ended})"
    )))
    .bind(now)
    .bind(idle_before)
    .execute(db.writer())
    .await?
    .rows_affected();
    Ok(n)
}

/// Deletes everything tied to one session (sign-out).
pub async fn forget_session(db: &Db, session_id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM smart_contexts WHERE session_id = $1")
        .bind(session_id)
        .execute(db.writer())
        .await?;
    sqlx::query("DELETE FROM smart_launches WHERE session_id = $1")
        .bind(session_id)
        .execute(db.writer())
        .await?;
    Ok(())
}

/// Deletes everything tied to a user's sessions (all sessions ended).
pub async fn forget_user(db: &Db, user_id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM smart_contexts WHERE user_id = $1")
        .bind(user_id)
        .execute(db.writer())
        .await?;
    sqlx::query("DELETE FROM smart_launches WHERE user_id = $1")
        .bind(user_id)
        .execute(db.writer())
        .await?;
    Ok(())
}
