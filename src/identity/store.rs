//! The identity tables' queries, and only theirs.

use sqlx::{AssertSqlSafe, Row};

use super::model::User;
use crate::store::local::{self, Cols};
use crate::store::{Backend, Db, StoreError};

const USER_COLUMNS: &str = "id, username, email, role, active, password_hash, password_changed_at, \
totp_secret, totp_enabled, totp_last_step, created_at, updated_at, must_change_password, patient_id";

fn user_from_row<R: Cols>(r: &R) -> Result<User, StoreError> {
    user_at(r, 0)
}

/// A user whose [`USER_COLUMNS`] start at column `base` of the row.
fn user_at<R: Cols>(r: &R, base: usize) -> Result<User, StoreError> {
    Ok(User {
        id: r.col_at(base, "id")?,
        username: r.col_at(base + 1, "username")?,
        email: r.col_at(base + 2, "email")?,
        role: r.col_at(base + 3, "role")?,
        active: r.col_at::<i64>(base + 4, "active")? != 0,
        password_hash: r.col_at(base + 5, "password_hash")?,
        password_changed_at: r.col_at(base + 6, "password_changed_at")?,
        totp_secret: r.col_at(base + 7, "totp_secret")?,
        totp_enabled: r.col_at::<i64>(base + 8, "totp_enabled")? != 0,
        totp_last_step: r.col_at(base + 9, "totp_last_step")?,
        created_at: r.col_at(base + 10, "created_at")?,
        updated_at: r.col_at(base + 11, "updated_at")?,
        must_change_password: r.col_at::<i64>(base + 12, "must_change_password")? != 0,
        patient_id: r.col_at(base + 13, "patient_id")?,
    })
}

pub async fn user_by_username(db: &Db, username: &str) -> Result<Option<User>, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
    sqlx::query(AssertSqlSafe(sql))
        .bind(username)
        .fetch_optional(db.reader())
        .await?
        .map(|r| user_from_row(&r))
        .transpose()
}

pub async fn user_by_id(db: &Db, id: &str) -> Result<Option<User>, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
    sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| user_from_row(&r))
        .transpose()
}

/// The account linked to a patient record, if any.
pub async fn user_by_patient(db: &Db, patient_id: &str) -> Result<Option<User>, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE patient_id = $1");
    sqlx::query(AssertSqlSafe(sql))
        .bind(patient_id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| user_from_row(&r))
        .transpose()
}

pub async fn count_users(db: &Db) -> Result<i64, StoreError> {
    Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
        .fetch_one(db.reader())
        .await?
        .try_get("n")?)
}

/// Inserts a user and the first entry of their password history. Returns false when the
/// username is taken.
pub async fn insert_user(db: &Db, u: &User, history_id: &str) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, username, email, role, active, password_hash, password_changed_at, \
         totp_secret, totp_enabled, totp_last_step, created_at, updated_at, must_change_password, patient_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, 0, NULL, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
    )
    .bind(&u.id)
    .bind(&u.username)
    .bind(&u.email)
    .bind(&u.role)
    .bind(i64::from(u.active))
    .bind(&u.password_hash)
    .bind(&u.password_changed_at)
    .bind(&u.created_at)
    .bind(&u.updated_at)
    .bind(i64::from(u.must_change_password))
    .bind(&u.patient_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query("INSERT INTO password_history (id, user_id, password_hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(history_id)
        .bind(&u.id)
        .bind(&u.password_hash)
        .bind(&u.password_changed_at)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

pub async fn role_exists(db: &Db, role: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query("SELECT 1 AS x FROM roles WHERE name = $1")
        .bind(role)
        .fetch_optional(db.reader())
        .await?
        .is_some())
}

pub async fn role_permissions(db: &Db, role: &str) -> Result<Vec<String>, StoreError> {
    let rows =
        sqlx::query("SELECT permission FROM role_permissions WHERE role = $1 ORDER BY permission")
            .bind(role)
            .fetch_all(db.reader())
            .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get("permission"))
        .collect::<Result<_, _>>()?)
}

/// The newest `n` password hashes of a user (current one included).
pub async fn recent_password_hashes(
    db: &Db,
    user_id: &str,
    n: i64,
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT password_hash FROM password_history WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2",
    )
    .bind(user_id)
    .bind(n)
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get("password_hash"))
        .collect::<Result<_, _>>()?)
}

/// Sets a new password (with history) and revokes the user's sessions, except `keep`.
/// `must_change`: whether the user must change it at the next sign-in (an
/// administrator typed it); any other change clears the flag.
pub async fn set_password(
    db: &Db,
    user_id: &str,
    hash: &str,
    now: &str,
    history_id: &str,
    keep_session: Option<&str>,
    must_change: bool,
) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    sqlx::query(
        "UPDATE users SET password_hash = $1, password_changed_at = $2, updated_at = $2, \
         must_change_password = $3 WHERE id = $4",
    )
    .bind(hash)
    .bind(now)
    .bind(i64::from(must_change))
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO password_history (id, user_id, password_hash, created_at) VALUES ($1, $2, $3, $4)")
        .bind(history_id)
        .bind(user_id)
        .bind(hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL AND id <> $3",
    )
    .bind(now)
    .bind(user_id)
    .bind(keep_session.unwrap_or(""))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Replaces the stored hash with one made with current parameters (same password).
pub async fn rehash(db: &Db, user_id: &str, old: &str, new: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2 AND password_hash = $3")
        .bind(new)
        .bind(user_id)
        .bind(old)
        .execute(db.writer())
        .await?;
    Ok(())
}

// ---- TOTP -------------------------------------------------------------------------

pub async fn set_totp_pending(
    db: &Db,
    user_id: &str,
    sealed: &str,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE users SET totp_secret = $1, totp_enabled = 0, totp_last_step = NULL, updated_at = $2 WHERE id = $3",
    )
    .bind(sealed)
    .bind(now)
    .bind(user_id)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// Records that the code of `step` was used, only if it is newer than the last one.
/// Returns false when another request used this step (or a later one) first.
pub async fn claim_totp_step(db: &Db, user_id: &str, step: i64) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE users SET totp_last_step = $1 WHERE id = $2 AND (totp_last_step IS NULL OR totp_last_step < $1)",
    )
    .bind(step)
    .bind(user_id)
    .execute(db.writer())
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Turns TOTP on and stores the recovery codes' keyed hashes (replacing old ones).
pub async fn enable_totp(
    db: &Db,
    user_id: &str,
    code_hashes: &[String],
    now: &str,
) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    sqlx::query("UPDATE users SET totp_enabled = 1, updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    write_recovery_codes(&mut tx, user_id, code_hashes).await?;
    tx.commit().await?;
    Ok(())
}

/// Replaces a user's recovery codes (their hashes) inside a transaction.
async fn write_recovery_codes(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    user_id: &str,
    code_hashes: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    for h in code_hashes {
        sqlx::query(
            "INSERT INTO recovery_codes (user_id, code_hash, used_at) VALUES ($1, $2, NULL)",
        )
        .bind(user_id)
        .bind(h)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub async fn disable_totp(db: &Db, user_id: &str, now: &str) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    sqlx::query(
        "UPDATE users SET totp_secret = NULL, totp_enabled = 0, totp_last_step = NULL, updated_at = $1 WHERE id = $2",
    )
    .bind(now)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    // The recovery codes stay while a passkey needs them.
    sqlx::query(
        "DELETE FROM recovery_codes WHERE user_id = $1 \
         AND NOT EXISTS (SELECT 1 FROM passkeys WHERE user_id = $1)",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes every recovery code of a user.
pub async fn delete_recovery_codes(db: &Db, user_id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(db.writer())
        .await?;
    Ok(())
}

/// Replaces a user's recovery codes (their hashes) with new ones.
pub async fn replace_recovery_codes(
    db: &Db,
    user_id: &str,
    code_hashes: &[String],
) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    write_recovery_codes(&mut tx, user_id, code_hashes).await?;
    tx.commit().await?;
    Ok(())
}

/// Uses a recovery code once. Returns false when it is unknown or already used.
pub async fn use_recovery_code(
    db: &Db,
    user_id: &str,
    code_hash: &str,
    now: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE recovery_codes SET used_at = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .bind(code_hash)
    .execute(db.writer())
    .await?
    .rows_affected();
    Ok(n == 1)
}

// ---- Lockout counters --------------------------------------------------------------

/// Whether `key` is locked at `now`, and until when.
pub async fn locked_until(db: &Db, key: &str, now: &str) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT locked_until FROM lockouts WHERE key = $1")
        .bind(key)
        .fetch_optional(db.reader())
        .await?;
    let until: Option<String> = match row {
        Some(r) => r.try_get("locked_until")?,
        None => None,
    };
    Ok(until.filter(|u| u.as_str() > now))
}

/// Counts one failure for `key` inside a window that starts at the first failure and
/// lasts until `window_end_if_new`… expressed as: failures older than `window_start_min`
/// (or a lock that has ended) start the count again. Returns the count after this one.
pub async fn count_failure(
    db: &Db,
    key: &str,
    now: &str,
    restart_before: &str,
) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "INSERT INTO lockouts (key, failures, window_start, locked_until) VALUES ($1, 1, $2, NULL) \
         ON CONFLICT (key) DO UPDATE SET \
           failures = CASE WHEN lockouts.window_start < $3 OR (lockouts.locked_until IS NOT NULL AND lockouts.locked_until <= $2) \
                      THEN 1 ELSE lockouts.failures + 1 END, \
           window_start = CASE WHEN lockouts.window_start < $3 OR (lockouts.locked_until IS NOT NULL AND lockouts.locked_until <= $2) \
                      THEN $2 ELSE lockouts.window_start END, \
           locked_until = CASE WHEN lockouts.locked_until IS NOT NULL AND lockouts.locked_until <= $2 \
                      THEN NULL ELSE lockouts.locked_until END \
         RETURNING failures",
    )
    .bind(key)
    .bind(now)
    .bind(restart_before)
    .fetch_one(db.writer())
    .await?;
    Ok(row.try_get("failures")?)
}

pub async fn lock(db: &Db, key: &str, until: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE lockouts SET locked_until = $1 WHERE key = $2")
        .bind(until)
        .bind(key)
        .execute(db.writer())
        .await?;
    Ok(())
}

pub async fn clear_failures(db: &Db, key: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM lockouts WHERE key = $1")
        .bind(key)
        .execute(db.writer())
        .await?;
    Ok(())
}

/// Removes every counter whose key starts with `prefix`.
pub async fn clear_failures_with_prefix(db: &Db, prefix: &str) -> Result<(), StoreError> {
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    sqlx::query("DELETE FROM lockouts WHERE key LIKE $1 ESCAPE '\\'")
        .bind(format!("{escaped}%"))
        .execute(db.writer())
        .await?;
    Ok(())
}

// ---- Login history -----------------------------------------------------------------

pub struct Attempt<'a> {
    pub id: &'a str,
    pub at: &'a str,
    pub username: &'a str,
    pub user_id: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub success: bool,
    pub reason: &'a str,
}

pub async fn record_attempt(db: &Db, a: &Attempt<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO login_attempts (id, at, username, user_id, ip, user_agent, success, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(a.id)
    .bind(a.at)
    .bind(a.username)
    .bind(a.user_id)
    .bind(a.ip)
    .bind(a.user_agent)
    .bind(i64::from(a.success))
    .bind(a.reason)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// A user's login attempts, newest first, before `before` (a cursor: `at|id`).
pub async fn attempts(
    db: &Db,
    user_id: &str,
    before: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<AttemptRow>, StoreError> {
    let rows = match before {
        None => sqlx::query(
            "SELECT id, at, ip, user_agent, success, reason FROM login_attempts WHERE user_id = $1 \
                 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(db.reader())
        .await?,
        Some((at, id)) => sqlx::query(
            "SELECT id, at, ip, user_agent, success, reason FROM login_attempts WHERE user_id = $1 \
                 AND (at < $2 OR (at = $2 AND id < $3)) ORDER BY at DESC, id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(db.reader())
        .await?,
    };
    Ok(rows
        .iter()
        .map(|r| {
            Ok(AttemptRow {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                ip: r.try_get("ip")?,
                user_agent: r.try_get("user_agent")?,
                success: r.try_get::<i64, _>("success")? != 0,
                reason: r.try_get("reason")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

pub struct AttemptRow {
    pub id: String,
    pub at: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub success: bool,
    pub reason: String,
}

// ---- Sessions ----------------------------------------------------------------------

pub struct NewSession<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub token_hash: &'a str,
    pub now: &'a str,
    pub absolute_expires_at: &'a str,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// How it was signed in (`password+totp`, `passkey`, …).
    pub method: &'a str,
}

pub async fn insert_session(db: &Db, s: &NewSession<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, token_hash, created_at, last_used_at, absolute_expires_at, revoked_at, ip, user_agent, method) \
         VALUES ($1, $2, $3, $4, $4, $5, NULL, $6, $7, $8)",
    )
    .bind(s.id)
    .bind(s.user_id)
    .bind(s.token_hash)
    .bind(s.now)
    .bind(s.absolute_expires_at)
    .bind(s.ip)
    .bind(s.user_agent)
    .bind(s.method)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// What authenticating a bearer token needs, in one query.
pub struct TokenLookup {
    pub credential_id: String,
    pub last_used_at: Option<String>,
    pub expires_at: String,
    pub revoked_at: Option<String>,
    /// The permissions of the user's role as of this query (read in the same query).
    pub permissions: Vec<String>,
    pub user: User,
    /// How many passkeys the user has (read in the same query: the confinement of
    /// `mfa.phishing_resistant_roles` and `mfa.required` needs it).
    pub passkeys: i64,
    /// A session's sign-in method (`passkey`, `password+totp`, …); None for tokens.
    pub method: Option<String>,
    /// A SMART access token's grant (read in the same query).
    pub smart: Option<SmartGrantRow>,
}

/// What a SMART access token carries from its grant.
#[derive(Clone, Debug)]
pub struct SmartGrantRow {
    pub grant_id: String,
    pub client_id: String,
    pub scopes: String,
    pub patient_id: Option<String>,
}

/// How many columns [`USER_COLUMNS`] names.
fn user_column_count() -> usize {
    USER_COLUMNS.split(", ").count()
}

fn lookup_from_row<R: Cols>(r: &R, smart: bool) -> Result<TokenLookup, StoreError> {
    // In the order of `lookup_sql`'s SELECT, the user's columns after these five, then
    // the passkey count and the session's method.
    let permissions: Option<String> = r.col_at(4, "permissions")?;
    let after_user = 5 + user_column_count();
    let extra = after_user + 2;
    Ok(TokenLookup {
        credential_id: r.col_at(0, "credential_id")?,
        last_used_at: r.col_at(1, "last_used")?,
        expires_at: r.col_at(2, "expires")?,
        revoked_at: r.col_at(3, "revoked")?,
        permissions: permissions
            .as_deref()
            .unwrap_or_default()
            .split(' ')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        user: user_at(r, 5)?,
        passkeys: r.col_at(after_user, "passkeys")?,
        method: r.col_at(after_user + 1, "method")?,
        smart: if smart {
            Some(SmartGrantRow {
                grant_id: r.col_at(extra, "grant_id")?,
                client_id: r.col_at(extra + 1, "client_id")?,
                scopes: r.col_at(extra + 2, "token_scopes")?,
                patient_id: r.col_at(extra + 3, "grant_patient")?,
            })
        } else {
            None
        },
    })
}

/// Where a bearer token is looked up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    SessionByHash,
    SessionById,
    ApiTokenByHash,
    SmartTokenByHash,
}

/// The one query that authenticates a token: the credential, its user and the role's
/// permissions (a sign-in lock is not read: it stops password sign-in only) (space-separated: permission names have no spaces). One
/// round trip instead of two on every authenticated request; the SQL is built once per
/// backend and kind. A SMART access token also reads its grant (a revoked grant finds
/// nothing), and its last use is the grant's.
fn lookup_sql(backend: Backend, kind: Lookup) -> &'static str {
    static SQL: std::sync::OnceLock<[String; 8]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        let user_columns = USER_COLUMNS
            .split(", ")
            .map(|c| format!("u.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let build = |backend: Backend, kind: Lookup| {
            let (table, expires, condition) = match kind {
                Lookup::SessionByHash => ("sessions", "absolute_expires_at", "c.token_hash = $1"),
                Lookup::SessionById => ("sessions", "absolute_expires_at", "c.id = $1"),
                Lookup::ApiTokenByHash => ("api_tokens", "expires_at", "c.token_hash = $1"),
                Lookup::SmartTokenByHash => (
                    "oauth_tokens",
                    "expires_at",
                    "c.token_hash = $1 AND c.kind = 'access'",
                ),
            };
            let aggregate = match backend {
                Backend::Sqlite => "group_concat(rp.permission, ' ')",
                Backend::Postgres => "string_agg(rp.permission, ' ')",
            };
            let method = match kind {
                Lookup::SessionByHash | Lookup::SessionById => "c.method",
                Lookup::ApiTokenByHash | Lookup::SmartTokenByHash => "CAST(NULL AS TEXT)",
            };
            let (last_used, extra, join) = if kind == Lookup::SmartTokenByHash {
                (
                    "g.last_used_at",
                    ", g.id AS grant_id, g.client_id AS client_id, c.scopes AS token_scopes, \
                     g.patient_id AS grant_patient",
                    " JOIN oauth_grants g ON g.id = c.grant_id AND g.revoked_at IS NULL",
                )
            } else {
                ("c.last_used_at", "", "")
            };
            format!(
                "SELECT c.id AS credential_id, {last_used} AS last_used, c.{expires} AS expires, \
                 c.revoked_at AS revoked, \
                 (SELECT {aggregate} FROM role_permissions rp WHERE rp.role = u.role) AS permissions, \
                 {user_columns}, \
                 (SELECT COUNT(*) FROM passkeys pk WHERE pk.user_id = u.id) AS passkeys, \
                 {method} AS method{extra} FROM {table} c{join} JOIN users u ON u.id = c.user_id WHERE {condition}"
            )
        };
        let kinds = [
            Lookup::SessionByHash,
            Lookup::SessionById,
            Lookup::ApiTokenByHash,
            Lookup::SmartTokenByHash,
        ];
        let mut out: Vec<String> = Vec::new();
        for b in [Backend::Sqlite, Backend::Postgres] {
            for k in kinds {
                out.push(build(b, k));
            }
        }
        std::array::from_fn(|i| out[i].clone())
    });
    let b = match backend {
        Backend::Sqlite => 0,
        Backend::Postgres => 4,
    };
    &all[b + kind as usize]
}

/// A SMART access token's lookup (`oauth_tokens`), the same checks as the others.
pub async fn smart_token_by_hash(db: &Db, hash: &str) -> Result<Option<TokenLookup>, StoreError> {
    lookup(db, Lookup::SmartTokenByHash, hash).await
}

/// Marks a SMART grant used now (its "last used" on the connected-apps pages).
pub async fn touch_grant(db: &Db, id: &str, now: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE oauth_grants SET last_used_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(db.writer())
        .await?;
    Ok(())
}

async fn lookup(db: &Db, kind: Lookup, value: &str) -> Result<Option<TokenLookup>, StoreError> {
    let sql = lookup_sql(db.backend(), kind);
    if let Some(local) = db.local() {
        // In place: the one query every authenticated request makes (store/local.rs).
        let smart = kind == Lookup::SmartTokenByHash;
        let rows =
            local.read(|c| local::query(c, sql, &[&value], |r| lookup_from_row(r, smart)))?;
        return Ok(rows.into_iter().next());
    }
    sqlx::query(AssertSqlSafe(sql))
        .bind(value)
        .fetch_optional(db.reader())
        .await?
        .map(|r| lookup_from_row(&r, kind == Lookup::SmartTokenByHash))
        .transpose()
}

pub async fn session_by_hash(db: &Db, hash: &str) -> Result<Option<TokenLookup>, StoreError> {
    lookup(db, Lookup::SessionByHash, hash).await
}

pub async fn session_by_id(db: &Db, id: &str) -> Result<Option<TokenLookup>, StoreError> {
    lookup(db, Lookup::SessionById, id).await
}

pub async fn api_token_by_hash(db: &Db, hash: &str) -> Result<Option<TokenLookup>, StoreError> {
    lookup(db, Lookup::ApiTokenByHash, hash).await
}

/// When a session was signed in.
pub async fn session_created_at(db: &Db, id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query("SELECT created_at FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| r.try_get("created_at"))
        .transpose()?)
}

/// Revokes every live personal API token of a user.
pub async fn revoke_api_tokens(db: &Db, user_id: &str, now: &str) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "UPDATE api_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(db.writer())
    .await?
    .rows_affected())
}

pub async fn touch_session(db: &Db, id: &str, now: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE sessions SET last_used_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now)
        .bind(id)
        .execute(db.writer())
        .await?;
    Ok(())
}

pub async fn touch_api_token(db: &Db, id: &str, now: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(db.writer())
        .await?;
    Ok(())
}

pub async fn revoke_session(db: &Db, id: &str, now: &str) -> Result<bool, StoreError> {
    let n = sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now)
        .bind(id)
        .execute(db.writer())
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Revokes every session of a user; with `tokens`, their API tokens too.
pub async fn revoke_all(
    db: &Db,
    user_id: &str,
    now: &str,
    tokens: bool,
) -> Result<u64, StoreError> {
    let mut n = sqlx::query(
        "UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(db.writer())
    .await?
    .rows_affected();
    if tokens {
        n += revoke_api_tokens(db, user_id, now).await?;
    }
    Ok(n)
}

pub struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub username: String,
    pub created_at: String,
    pub last_used_at: String,
    pub absolute_expires_at: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

const SESSION_SELECT: &str = "SELECT s.id AS id, s.user_id AS user_id, u.username AS username, \
    s.created_at AS created_at, s.last_used_at AS last_used_at, \
    s.absolute_expires_at AS absolute_expires_at, s.ip AS ip, s.user_agent AS user_agent \
    FROM sessions s JOIN users u ON u.id = s.user_id \
    WHERE s.revoked_at IS NULL AND s.absolute_expires_at > $1";

fn session_rows(rows: &[sqlx::any::AnyRow]) -> Result<Vec<SessionRow>, StoreError> {
    Ok(rows
        .iter()
        .map(|r| {
            Ok(SessionRow {
                id: r.try_get("id")?,
                user_id: r.try_get("user_id")?,
                username: r.try_get("username")?,
                created_at: r.try_get("created_at")?,
                last_used_at: r.try_get("last_used_at")?,
                absolute_expires_at: r.try_get("absolute_expires_at")?,
                ip: r.try_get("ip")?,
                user_agent: r.try_get("user_agent")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

/// Sessions not revoked and not past their absolute end (idle ones are filtered by the caller).
pub async fn live_sessions(
    db: &Db,
    user_id: Option<&str>,
    now: &str,
) -> Result<Vec<SessionRow>, StoreError> {
    let rows = match user_id {
        Some(u) => {
            sqlx::query(AssertSqlSafe(format!(
                "{SESSION_SELECT} AND s.user_id = $2 ORDER BY s.created_at DESC"
            )))
            .bind(now)
            .bind(u)
            .fetch_all(db.reader())
            .await?
        }
        None => {
            sqlx::query(AssertSqlSafe(format!(
                "{SESSION_SELECT} ORDER BY s.created_at DESC"
            )))
            .bind(now)
            .fetch_all(db.reader())
            .await?
        }
    };
    session_rows(&rows)
}

/// A `LIKE` pattern for a part of a username (`%`, `_` and `\` dropped), or "" for any.
fn username_pattern(q: Option<&str>) -> String {
    q.map(|q| format!("%{}%", q.to_lowercase().replace(['%', '_', '\\'], "")))
        .filter(|p| p != "%%")
        .unwrap_or_default()
}

/// Live sessions of every user whose username contains `q` (all users without it), newest
/// first, at most `limit` (idle ones are filtered by the caller).
pub async fn sessions_of_users(
    db: &Db,
    q: Option<&str>,
    now: &str,
    limit: i64,
) -> Result<Vec<SessionRow>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "{SESSION_SELECT} AND ($2 = '' OR u.username LIKE $2) ORDER BY s.created_at DESC LIMIT $3"
    )))
    .bind(now)
    .bind(username_pattern(q))
    .bind(limit)
    .fetch_all(db.reader())
    .await?;
    session_rows(&rows)
}

/// A user's live personal API token, with the username (an administrator's list).
pub struct UserTokenRow {
    pub token: TokenRow,
    pub username: String,
}

/// Live API tokens of every user whose username contains `q` (all users without it),
/// newest first, at most `limit`.
pub async fn tokens_of_users(
    db: &Db,
    q: Option<&str>,
    now: &str,
    limit: i64,
) -> Result<Vec<UserTokenRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT t.id AS id, t.user_id AS user_id, u.username AS username, t.name AS name, \
         t.created_at AS created_at, t.expires_at AS expires_at, t.last_used_at AS last_used_at \
         FROM api_tokens t JOIN users u ON u.id = t.user_id \
         WHERE t.revoked_at IS NULL AND t.expires_at > $1 AND ($2 = '' OR u.username LIKE $2) \
         ORDER BY t.created_at DESC LIMIT $3",
    )
    .bind(now)
    .bind(username_pattern(q))
    .bind(limit)
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(UserTokenRow {
                username: r.try_get("username")?,
                token: TokenRow {
                    id: r.try_get("id")?,
                    user_id: r.try_get("user_id")?,
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                },
            })
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

/// The usernames of the users among `ids` (ids that name no user are left out).
pub async fn usernames(
    db: &Db,
    ids: &[String],
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let mut out = std::collections::HashMap::new();
    // Bounded pages of placeholders, so any number of ids stays one short query each.
    for chunk in ids.chunks(100) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id, username FROM users WHERE id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id);
        }
        for r in query.fetch_all(db.reader()).await? {
            out.insert(r.try_get("id")?, r.try_get("username")?);
        }
    }
    Ok(out)
}

// ---- API tokens --------------------------------------------------------------------

pub struct TokenRow {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub created_at: String,
    pub expires_at: String,
    pub last_used_at: Option<String>,
}

pub async fn insert_api_token(db: &Db, t: &TokenRow, hash: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at, last_used_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)",
    )
    .bind(&t.id)
    .bind(&t.user_id)
    .bind(&t.name)
    .bind(hash)
    .bind(&t.created_at)
    .bind(&t.expires_at)
    .execute(db.writer())
    .await?;
    Ok(())
}

/// The user's tokens that are neither revoked nor expired.
pub async fn api_tokens(db: &Db, user_id: &str, now: &str) -> Result<Vec<TokenRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, user_id, name, created_at, expires_at, last_used_at FROM api_tokens \
         WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC",
    )
    .bind(user_id)
    .bind(now)
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(TokenRow {
                id: r.try_get("id")?,
                user_id: r.try_get("user_id")?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
                last_used_at: r.try_get("last_used_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

/// Revokes one of the user's live tokens. Returns false when there is none with that id.
pub async fn revoke_api_token(
    db: &Db,
    user_id: &str,
    id: &str,
    now: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(id)
    .bind(user_id)
    .execute(db.writer())
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Replaces a live token by a new one with the same name and expiry, in one transaction.
/// Returns the old row, or None when there is no such live token.
pub async fn rotate_api_token(
    db: &Db,
    user_id: &str,
    id: &str,
    new: &TokenRow,
    new_hash: &str,
    now: &str,
) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    let n = sqlx::query(
        "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at, last_used_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)",
    )
    .bind(&new.id)
    .bind(&new.user_id)
    .bind(&new.name)
    .bind(new_hash)
    .bind(&new.created_at)
    .bind(&new.expires_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub async fn api_token_row(
    db: &Db,
    user_id: &str,
    id: &str,
    now: &str,
) -> Result<Option<TokenRow>, StoreError> {
    Ok(api_tokens(db, user_id, now)
        .await?
        .into_iter()
        .find(|t| t.id == id))
}

// ---- Administration ----------------------------------------------------------------

/// Users ordered by username, after `after` (a username cursor), optionally matching `q`
/// (a substring of the username or email).
pub async fn list_users(
    db: &Db,
    q: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<User>, StoreError> {
    let pattern = q.map(|q| format!("%{}%", q.to_lowercase().replace(['%', '_', '\\'], "")));
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM users WHERE ($1 = '' OR username LIKE $1 OR LOWER(COALESCE(email, '')) LIKE $1) \
         AND username > $2 ORDER BY username LIMIT $3"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(pattern.unwrap_or_default())
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(db.reader())
        .await?;
    rows.iter().map(user_from_row).collect::<Result<_, _>>()
}

/// Changes role, email and/or the active flag.
pub async fn update_user(
    db: &Db,
    id: &str,
    role: Option<&str>,
    email: Option<Option<&str>>,
    active: Option<bool>,
    now: &str,
) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    if let Some(r) = role {
        sqlx::query("UPDATE users SET role = $1, updated_at = $2 WHERE id = $3")
            .bind(r)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(e) = email {
        sqlx::query("UPDATE users SET email = $1, updated_at = $2 WHERE id = $3")
            .bind(e)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // Every outstanding link of the account (password reset, email verification)
        // dies with the address it was sent to, in the same transaction.
        sqlx::query(
            "UPDATE account_tokens SET revoked_at = $1 WHERE user_id = $2 AND used_at IS NULL \
             AND revoked_at IS NULL AND (email IS NULL OR lower(email) <> lower($3))",
        )
        .bind(now)
        .bind(id)
        .bind(e.unwrap_or(""))
        .execute(&mut *tx)
        .await?;
    }
    if let Some(a) = active {
        sqlx::query("UPDATE users SET active = $1, updated_at = $2 WHERE id = $3")
            .bind(i64::from(a))
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Active users whose role holds `permission`, other than `except`.
pub async fn count_active_holders(
    db: &Db,
    permission: &str,
    except: &str,
) -> Result<i64, StoreError> {
    Ok(sqlx::query(
        "SELECT COUNT(*) AS n FROM users u JOIN role_permissions rp ON rp.role = u.role \
         WHERE rp.permission = $1 AND u.active = 1 AND u.id <> $2",
    )
    .bind(permission)
    .bind(except)
    .fetch_one(db.reader())
    .await?
    .try_get("n")?)
}

pub async fn role_has(db: &Db, role: &str, permission: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("SELECT 1 AS x FROM role_permissions WHERE role = $1 AND permission = $2")
            .bind(role)
            .bind(permission)
            .fetch_optional(db.reader())
            .await?
            .is_some(),
    )
}

pub struct RoleRow {
    pub name: String,
    pub builtin: bool,
    pub permissions: Vec<String>,
}

pub async fn roles(db: &Db) -> Result<Vec<RoleRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT r.name AS name, r.builtin AS builtin, rp.permission AS permission FROM roles r \
         LEFT JOIN role_permissions rp ON rp.role = r.name ORDER BY r.name, rp.permission",
    )
    .fetch_all(db.reader())
    .await?;
    let mut out: Vec<RoleRow> = Vec::new();
    for r in rows {
        let name: String = r.try_get("name")?;
        let builtin = r.try_get::<i64, _>("builtin")? != 0;
        let permission: Option<String> = r.try_get("permission")?;
        if out.last().is_none_or(|l| l.name != name) {
            out.push(RoleRow {
                name: name.clone(),
                builtin,
                permissions: Vec::new(),
            });
        }
        if let (Some(p), Some(last)) = (permission, out.last_mut()) {
            last.permissions.push(p);
        }
    }
    Ok(out)
}

pub async fn session_user(db: &Db, session_id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query("SELECT user_id FROM sessions WHERE id = $1")
        .bind(session_id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| r.try_get("user_id"))
        .transpose()?)
}

/// Creates a role with its permissions. Returns false when the name is taken.
pub async fn insert_role(
    db: &Db,
    name: &str,
    permissions: &[&str],
    now: &str,
) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    let n = sqlx::query("INSERT INTO roles (name, builtin, created_at) VALUES ($1, 0, $2) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    for p in permissions {
        sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
            .bind(name)
            .bind(*p)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Replaces a role's permissions.
pub async fn set_role_permissions(
    db: &Db,
    name: &str,
    permissions: &[&str],
) -> Result<(), StoreError> {
    let mut tx = db.writer().begin().await?;
    sqlx::query("DELETE FROM role_permissions WHERE role = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    for p in permissions {
        sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
            .bind(name)
            .bind(*p)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn role(db: &Db, name: &str) -> Result<Option<RoleRow>, StoreError> {
    Ok(roles(db).await?.into_iter().find(|r| r.name == name))
}

pub async fn users_with_role(db: &Db, name: &str) -> Result<i64, StoreError> {
    Ok(
        sqlx::query("SELECT COUNT(*) AS n FROM users WHERE role = $1")
            .bind(name)
            .fetch_one(db.reader())
            .await?
            .try_get("n")?,
    )
}

/// Active users holding `permission` through a role other than `role`.
pub async fn active_holders_outside(
    db: &Db,
    permission: &str,
    role: &str,
) -> Result<i64, StoreError> {
    Ok(sqlx::query(
        "SELECT COUNT(*) AS n FROM users u JOIN role_permissions rp ON rp.role = u.role \
         WHERE rp.permission = $1 AND u.active = 1 AND u.role <> $2",
    )
    .bind(permission)
    .bind(role)
    .fetch_one(db.reader())
    .await?
    .try_get("n")?)
}

pub async fn delete_role(db: &Db, name: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("DELETE FROM roles WHERE name = $1 AND builtin = 0")
            .bind(name)
            .execute(db.writer())
            .await?
            .rows_affected()
            == 1,
    )
}
