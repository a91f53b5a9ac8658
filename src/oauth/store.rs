//! The authorization server's tables (`oauth_*`), and only theirs.

use sqlx::Row;

use crate::store::{Db, StoreError};

#[derive(Clone, Debug)]
pub struct ClientRow {
    pub id: String,
    pub name: String,
    pub confidential: bool,
    pub secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub launch_url: Option<String>,
    pub scopes: String,
    pub builtin: bool,
    pub created_by: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub disabled_at: Option<String>,
}

const CLIENT_COLUMNS: &str = "id, name, confidential, secret_hash, redirect_uris, launch_url, \
scopes, builtin, created_by, created_at, updated_at, disabled_at";

fn client_of(r: &sqlx::any::AnyRow) -> Result<ClientRow, StoreError> {
    let uris: String = r.try_get("redirect_uris")?;
    Ok(ClientRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        confidential: r.try_get::<i64, _>("confidential")? != 0,
        secret_hash: r.try_get("secret_hash")?,
        redirect_uris: uris.split_whitespace().map(str::to_owned).collect(),
        launch_url: r.try_get("launch_url")?,
        scopes: r.try_get("scopes")?,
        builtin: r.try_get::<i64, _>("builtin")? != 0,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        disabled_at: r.try_get("disabled_at")?,
    })
}

pub async fn insert_client(db: &Db, c: &ClientRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_clients (id, name, confidential, secret_hash, redirect_uris, launch_url, \
         scopes, builtin, created_by, created_at, updated_at, disabled_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&c.id)
    .bind(&c.name)
    .bind(i64::from(c.confidential))
    .bind(&c.secret_hash)
    .bind(c.redirect_uris.join(" "))
    .bind(&c.launch_url)
    .bind(&c.scopes)
    .bind(i64::from(c.builtin))
    .bind(&c.created_by)
    .bind(&c.created_at)
    .bind(&c.updated_at)
    .bind(&c.disabled_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// Replaces what an administrator may change of an app.
pub async fn update_client(db: &Db, c: &ClientRow) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE oauth_clients SET name = $1, redirect_uris = $2, launch_url = $3, scopes = $4, \
         updated_at = $5, secret_hash = $6, disabled_at = $7 WHERE id = $8",
    )
    .bind(&c.name)
    .bind(c.redirect_uris.join(" "))
    .bind(&c.launch_url)
    .bind(&c.scopes)
    .bind(&c.updated_at)
    .bind(&c.secret_hash)
    .bind(&c.disabled_at)
    .bind(&c.id)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn client(db: &Db, id: &str) -> Result<Option<ClientRow>, StoreError> {
    let sql = format!("SELECT {CLIENT_COLUMNS} FROM oauth_clients WHERE id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| client_of(&r))
        .transpose()
}

/// Every app not deleted, by name.
pub async fn clients(db: &Db) -> Result<Vec<ClientRow>, StoreError> {
    let sql = format!(
        "SELECT {CLIENT_COLUMNS} FROM oauth_clients WHERE disabled_at IS NULL ORDER BY name, id"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(db.reader())
        .await?
        .iter()
        .map(client_of)
        .collect()
}

#[derive(Clone, Debug)]
pub struct GrantRow {
    pub id: String,
    pub client_id: String,
    pub user_id: String,
    pub patient_id: Option<String>,
    pub scopes: String,
    pub session_id: Option<String>,
    pub ehr_launch: bool,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The app's name (joined).
    pub client_name: String,
    /// The user's name (joined).
    pub username: String,
}

const GRANT_SELECT: &str = "SELECT g.id, g.client_id, g.user_id, g.patient_id, g.scopes, \
g.session_id, g.ehr_launch, g.created_at, g.last_used_at, g.revoked_at, \
COALESCE(c.name, g.client_id) AS client_name, COALESCE(u.username, g.user_id) AS username \
FROM oauth_grants g LEFT JOIN oauth_clients c ON c.id = g.client_id \
LEFT JOIN users u ON u.id = g.user_id";

fn grant_of(r: &sqlx::any::AnyRow) -> Result<GrantRow, StoreError> {
    Ok(GrantRow {
        id: r.try_get("id")?,
        client_id: r.try_get("client_id")?,
        user_id: r.try_get("user_id")?,
        patient_id: r.try_get("patient_id")?,
        scopes: r.try_get("scopes")?,
        session_id: r.try_get("session_id")?,
        ehr_launch: r.try_get::<i64, _>("ehr_launch")? != 0,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked_at: r.try_get("revoked_at")?,
        client_name: r.try_get("client_name")?,
        username: r.try_get("username")?,
    })
}

pub async fn insert_grant(db: &Db, g: &GrantRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_grants (id, client_id, user_id, patient_id, scopes, session_id, \
         ehr_launch, created_at, last_used_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL)",
    )
    .bind(&g.id)
    .bind(&g.client_id)
    .bind(&g.user_id)
    .bind(&g.patient_id)
    .bind(&g.scopes)
    .bind(&g.session_id)
    .bind(i64::from(g.ehr_launch))
    .bind(&g.created_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn grant(db: &Db, id: &str) -> Result<Option<GrantRow>, StoreError> {
    let sql = format!("{GRANT_SELECT} WHERE g.id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| grant_of(&r))
        .transpose()
}

/// Live grants: of one user (`user`), of one app (`client`), or all; newest first.
pub async fn live_grants(
    db: &Db,
    user: Option<&str>,
    client: Option<&str>,
    limit: i64,
) -> Result<Vec<GrantRow>, StoreError> {
    let sql = format!(
        "{GRANT_SELECT} WHERE g.revoked_at IS NULL AND ($1 = '' OR g.user_id = $1) \
         AND ($2 = '' OR g.client_id = $2) ORDER BY g.created_at DESC, g.id LIMIT $3"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(user.unwrap_or(""))
        .bind(client.unwrap_or(""))
        .bind(limit)
        .fetch_all(db.reader())
        .await?
        .iter()
        .map(grant_of)
        .collect()
}

/// Revokes grants (and every token of them) chosen by one column; answers how many.
async fn revoke_where(db: &Db, column: &str, value: &str, now: &str) -> Result<u64, StoreError> {
    let mut tx = db.writer().begin().await?;
    let tokens = format!(
        "UPDATE oauth_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND grant_id IN \
         (SELECT id FROM oauth_grants WHERE {column} = $2 AND revoked_at IS NULL)"
    );
    sqlx::query(sqlx::AssertSqlSafe(tokens))
        .bind(now)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    let grants = format!(
        "UPDATE oauth_grants SET revoked_at = $1 WHERE {column} = $2 AND revoked_at IS NULL"
    );
    let n = sqlx::query(sqlx::AssertSqlSafe(grants))
        .bind(now)
        .bind(value)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(n)
}

pub async fn revoke_grant(db: &Db, id: &str, now: &str) -> Result<u64, StoreError> {
    revoke_where(db, "id", id, now).await
}

pub async fn revoke_client_grants(db: &Db, client_id: &str, now: &str) -> Result<u64, StoreError> {
    revoke_where(db, "client_id", client_id, now).await
}

pub async fn revoke_user_grants(db: &Db, user_id: &str, now: &str) -> Result<u64, StoreError> {
    revoke_where(db, "user_id", user_id, now).await
}

pub async fn revoke_session_grants(
    db: &Db,
    session_id: &str,
    now: &str,
) -> Result<u64, StoreError> {
    revoke_where(db, "session_id", session_id, now).await
}

pub async fn insert_code(
    db: &Db,
    code_hash: &str,
    grant_id: &str,
    redirect_uri: &str,
    challenge: &str,
    expires_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, grant_id, redirect_uri, challenge, expires_at, used_at) \
         VALUES ($1, $2, $3, $4, $5, NULL)",
    )
    .bind(code_hash)
    .bind(grant_id)
    .bind(redirect_uri)
    .bind(challenge)
    .bind(expires_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub struct CodeRow {
    pub grant_id: String,
    pub redirect_uri: String,
    pub challenge: String,
    pub expires_at: String,
    pub used_at: Option<String>,
}

pub async fn code(db: &Db, code_hash: &str) -> Result<Option<CodeRow>, StoreError> {
    sqlx::query(
        "SELECT grant_id, redirect_uri, challenge, expires_at, used_at FROM oauth_codes \
         WHERE code_hash = $1",
    )
    .bind(code_hash)
    .fetch_optional(db.writer())
    .await?
    .map(|r| {
        Ok(CodeRow {
            grant_id: r.try_get("grant_id")?,
            redirect_uri: r.try_get("redirect_uri")?,
            challenge: r.try_get("challenge")?,
            expires_at: r.try_get("expires_at")?,
            used_at: r.try_get("used_at")?,
        })
    })
    .transpose()
}

/// Spends a code; false when it was spent before (a replay).
pub async fn spend_code(
    conn: &mut sqlx::AnyConnection,
    code_hash: &str,
    now: &str,
) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE code_hash = $2 AND used_at IS NULL")
            .bind(now)
            .bind(code_hash)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            == 1,
    )
}

pub struct NewToken<'a> {
    pub id: &'a str,
    pub hash: &'a str,
    pub grant_id: &'a str,
    pub user_id: &'a str,
    pub kind: &'a str,
    pub scopes: &'a str,
    pub created_at: &'a str,
    pub expires_at: &'a str,
}

pub async fn insert_token(
    conn: &mut sqlx::AnyConnection,
    t: &NewToken<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_tokens (id, token_hash, grant_id, user_id, kind, scopes, created_at, \
         expires_at, last_used_at, used_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, NULL)",
    )
    .bind(t.id)
    .bind(t.hash)
    .bind(t.grant_id)
    .bind(t.user_id)
    .bind(t.kind)
    .bind(t.scopes)
    .bind(t.created_at)
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Clone, Debug)]
pub struct TokenRow {
    pub id: String,
    pub grant_id: String,
    pub kind: String,
    pub scopes: String,
    pub expires_at: String,
    pub used_at: Option<String>,
    pub revoked_at: Option<String>,
}

pub async fn token_by_hash(db: &Db, hash: &str) -> Result<Option<TokenRow>, StoreError> {
    sqlx::query(
        "SELECT id, grant_id, kind, scopes, expires_at, used_at, revoked_at FROM oauth_tokens \
         WHERE token_hash = $1",
    )
    .bind(hash)
    .fetch_optional(db.writer())
    .await?
    .map(|r| {
        Ok(TokenRow {
            id: r.try_get("id")?,
            grant_id: r.try_get("grant_id")?,
            kind: r.try_get("kind")?,
            scopes: r.try_get("scopes")?,
            expires_at: r.try_get("expires_at")?,
            used_at: r.try_get("used_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    })
    .transpose()
}

/// Spends a refresh token; false when it was spent before (a replay).
pub async fn spend_refresh(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    now: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "UPDATE oauth_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1)
}

pub async fn revoke_token(db: &Db, id: &str, now: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE oauth_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now)
        .bind(id)
        .execute(db.writer())
        .await?;
    Ok(())
}

pub async fn insert_launch(
    db: &Db,
    hash: &str,
    client_id: &str,
    user_id: &str,
    session_id: &str,
    patient_id: &str,
    expires_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO oauth_launches (launch_hash, client_id, user_id, session_id, patient_id, \
         expires_at, used_at) VALUES ($1, $2, $3, $4, $5, $6, NULL)",
    )
    .bind(hash)
    .bind(client_id)
    .bind(user_id)
    .bind(session_id)
    .bind(patient_id)
    .bind(expires_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub struct LaunchRow {
    pub client_id: String,
    pub user_id: String,
    pub session_id: String,
    pub patient_id: String,
    pub expires_at: String,
}

/// Spends a launch (single use): answers it the first time only.
pub async fn spend_launch(db: &Db, hash: &str, now: &str) -> Result<Option<LaunchRow>, StoreError> {
    let first = sqlx::query(
        "UPDATE oauth_launches SET used_at = $1 WHERE launch_hash = $2 AND used_at IS NULL",
    )
    .bind(now)
    .bind(hash)
    .execute(db.writer())
    .await?
    .rows_affected()
        == 1;
    if !first {
        return Ok(None);
    }
    sqlx::query(
        "SELECT client_id, user_id, session_id, patient_id, expires_at FROM oauth_launches \
         WHERE launch_hash = $1",
    )
    .bind(hash)
    .fetch_optional(db.writer())
    .await?
    .map(|r| {
        Ok(LaunchRow {
            client_id: r.try_get("client_id")?,
            user_id: r.try_get("user_id")?,
            session_id: r.try_get("session_id")?,
            patient_id: r.try_get("patient_id")?,
            expires_at: r.try_get("expires_at")?,
        })
    })
    .transpose()
}

/// Deletes spent and expired codes and launches.
pub async fn sweep(db: &Db, now: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1")
        .bind(now)
        .execute(db.writer())
        .await?;
    sqlx::query("DELETE FROM oauth_launches WHERE expires_at < $1")
        .bind(now)
        .execute(db.writer())
        .await?;
    Ok(())
}
