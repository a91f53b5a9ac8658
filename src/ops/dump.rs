//! A logical copy of Custodian's tables: every row of every table, in an order that
//! satisfies the foreign keys, read in one consistent snapshot. The same stream feeds an
//! encrypted backup file ([`super::backup`]) or another database (`migrate-db`).
//!
//! Every column of the schema is TEXT or BIGINT on both backends, so a row is a list of
//! JSON nulls, integers and strings, and a dump made on SQLite loads into PostgreSQL and
//! back. Ciphertexts, blind indexes and the audit chain are copied as they are.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Row};

use crate::store::{Backend, Db, StoreError};

/// The tables copied, parents before children. A test checks that this list and
/// [`SKIPPED`] together name every table of the schema.
pub const TABLES: &[&str] = &[
    "meta",
    "audit_events",
    "audit_head",
    "audit_checkpoints",
    "audit_guard",
    "roles",
    "role_permissions",
    "users",
    "password_history",
    "recovery_codes",
    "passkeys",
    "sessions",
    "api_tokens",
    "login_attempts",
    "lockouts",
    "patients",
    "patient_terms",
    "records",
    "fhir_resources",
    "fhir_versions",
    "patient_versions",
    "security_events",
    "account_tokens",
    "email_verifications",
    "oauth_clients",
    "oauth_grants",
    "oauth_tokens",
    "consents",
    "amendments",
];

/// Tables not copied, and why.
pub const SKIPPED: &[(&str, &str)] = &[
    (
        "schema_migrations",
        "the target is migrated by this binary; the schema versions must match",
    ),
    (
        "audit_event_patients",
        "derived: the target's trigger fills it again as the audit events are loaded, and audit verify checks it",
    ),
    (
        "smart_launches",
        "launches in progress: short-lived, useless elsewhere",
    ),
    (
        "mail_outbox",
        "mails queued or sent: their links are single-use and short-lived",
    ),
    (
        "oauth_codes",
        "authorization codes: single-use, valid for two minutes",
    ),
    (
        "oauth_launches",
        "EHR launches: single-use, valid for five minutes",
    ),
    (
        "passkey_ceremonies",
        "passkey challenges in progress: single-use, valid for minutes",
    ),
    (
        "smart_contexts",
        "EHR access tokens tied to sessions: a restored copy must launch again",
    ),
];

/// Tables whose rows a fresh migration seeds (they are replaced, not added to).
const SEEDED: &[&str] = &[
    "meta",
    "audit_head",
    "audit_guard",
    "roles",
    "role_permissions",
];

/// Tables that must be empty for a database to count as empty.
const MUST_BE_EMPTY: &[&str] = &["users", "patients", "records", "audit_events"];

/// A column and whether it holds integers (BIGINT) or text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub int: bool,
}

/// The columns of a table, in their declared order.
pub async fn columns(db: &Db, table: &str) -> Result<Vec<Column>, StoreError> {
    let rows = match db.backend() {
        Backend::Sqlite => {
            sqlx::query("SELECT name AS n, type AS t FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(db.reader())
                .await?
        }
        Backend::Postgres => {
            sqlx::query(
                "SELECT column_name::text AS n, data_type::text AS t FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(db.reader())
            .await?
        }
    };
    rows.iter()
        .map(|r| {
            let name: String = r.try_get("n")?;
            let t: String = r.try_get("t")?;
            Ok(Column {
                name,
                int: t.to_ascii_uppercase().contains("INT"),
            })
        })
        .collect()
}

fn quote(name: &str) -> Result<&str, StoreError> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(name)
    } else {
        Err(StoreError::Schema(format!(
            "unexpected identifier `{name}`"
        )))
    }
}

/// One item of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Table { name: String, columns: Vec<Column> },
    Row(Vec<Value>),
    EndTable { name: String, rows: u64 },
}

/// Where the items go.
pub trait Sink {
    fn item(&mut self, item: Item) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// The schema version recorded in a database.
pub async fn schema_version(db: &Db) -> Result<i64, StoreError> {
    let v: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations")
        .fetch_one(db.reader())
        .await?
        .try_get("v")?;
    Ok(v.unwrap_or(0))
}

/// Reads every table of [`TABLES`] in one snapshot (SQLite: one read transaction;
/// PostgreSQL: REPEATABLE READ, READ ONLY) and hands each row to `sink`. Answers the row
/// count of each table.
pub async fn export<S: Sink + Send>(db: &Db, sink: &mut S) -> anyhow::Result<Vec<(String, u64)>> {
    use futures_util::TryStreamExt;
    let mut layouts = Vec::new();
    for t in TABLES {
        layouts.push((*t, columns(db, t).await?));
    }
    let mut tx = db.reader().begin().await?;
    if db.backend() == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
    }
    let mut counts = Vec::new();
    for (table, cols) in layouts {
        if cols.is_empty() {
            anyhow::bail!("the database has no table `{table}`: is it migrated?");
        }
        let list = cols
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Result<Vec<_>, _>>()?
            .join(", ");
        sink.item(Item::Table {
            name: (*table).to_owned(),
            columns: cols.clone(),
        })
        .await?;
        let sql = format!("SELECT {list} FROM {} ORDER BY 1", quote(table)?);
        let mut n = 0u64;
        let mut rows = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *tx);
        while let Some(r) = rows.try_next().await? {
            let mut values = Vec::with_capacity(cols.len());
            for (i, c) in cols.iter().enumerate() {
                let v = if c.int {
                    r.try_get::<Option<i64>, _>(i)?
                        .map_or(Value::Null, |x| Value::Number(x.into()))
                } else {
                    r.try_get::<Option<String>, _>(i)?
                        .map_or(Value::Null, Value::String)
                };
                values.push(v);
            }
            sink.item(Item::Row(values)).await?;
            n += 1;
        }
        drop(rows);
        sink.item(Item::EndTable {
            name: (*table).to_owned(),
            rows: n,
        })
        .await?;
        counts.push(((*table).to_owned(), n));
    }
    tx.commit().await?;
    Ok(counts)
}

/// Whether a (migrated) database holds no users, patients, records or audit events.
pub async fn is_empty(db: &Db) -> Result<bool, StoreError> {
    for t in MUST_BE_EMPTY {
        let sql = format!("SELECT COUNT(*) AS n FROM {}", quote(t)?);
        let n: i64 = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(db.reader())
            .await?
            .try_get("n")?;
        if n > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Loads a stream of items into `db` (migrated, empty), in one transaction: nothing is
/// kept unless everything loads. Checks each table's columns against the target's and
/// each table's row count against the stream's.
pub struct Loader {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    db: Db,
    table: Option<(String, Vec<Column>)>,
    pending: Vec<Vec<Value>>,
    loaded: u64,
    pub counts: Vec<(String, u64)>,
}

impl Loader {
    pub async fn begin(db: &Db) -> anyhow::Result<Self> {
        if !is_empty(db).await? {
            anyhow::bail!(
                "the target database is not empty (it has users, patients, records or audit events); use a new, empty database"
            );
        }
        let tx = db.writer().begin().await?;
        Ok(Self {
            tx,
            db: db.clone(),
            table: None,
            pending: Vec::new(),
            loaded: 0,
            counts: Vec::new(),
        })
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let Some((table, cols)) = &self.table else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let names = cols
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Result<Vec<_>, _>>()?
            .join(", ");
        let mut sql = format!("INSERT INTO {} ({names}) VALUES ", quote(table)?);
        let mut p = 0;
        for (i, _) in self.pending.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for j in 0..cols.len() {
                if j > 0 {
                    sql.push_str(", ");
                }
                p += 1;
                sql.push_str(&format!("${p}"));
            }
            sql.push(')');
        }
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for row in &self.pending {
            for (c, v) in cols.iter().zip(row) {
                q = if c.int {
                    q.bind(v.as_i64())
                } else {
                    q.bind(v.as_str().map(str::to_owned))
                };
            }
        }
        q.execute(&mut *self.tx).await?;
        self.loaded += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    pub async fn commit(self) -> anyhow::Result<Vec<(String, u64)>> {
        if self.table.is_some() {
            anyhow::bail!("the copy ended in the middle of a table");
        }
        self.tx.commit().await?;
        Ok(self.counts)
    }
}

impl Sink for Loader {
    async fn item(&mut self, item: Item) -> anyhow::Result<()> {
        match item {
            Item::Table {
                name,
                columns: cols,
            } => {
                if self.table.is_some() {
                    anyhow::bail!("a table began before the previous one ended");
                }
                if !TABLES.contains(&name.as_str()) {
                    anyhow::bail!("the copy holds an unknown table `{name}`");
                }
                let here = columns(&self.db, &name).await?;
                if here != cols {
                    anyhow::bail!(
                        "table `{name}` has other columns here than in the copy: the schema versions differ"
                    );
                }
                if SEEDED.contains(&name.as_str()) {
                    let sql = format!("DELETE FROM {}", quote(&name)?);
                    sqlx::query(AssertSqlSafe(sql))
                        .execute(&mut *self.tx)
                        .await?;
                }
                self.loaded = 0;
                self.table = Some((name, cols));
            }
            Item::Row(values) => {
                let Some((_, cols)) = &self.table else {
                    anyhow::bail!("a row outside a table");
                };
                if values.len() != cols.len() {
                    anyhow::bail!(
                        "a row has {} values for {} columns",
                        values.len(),
                        cols.len()
                    );
                }
                for (c, v) in cols.iter().zip(&values) {
                    let ok = v.is_null() || if c.int { v.is_i64() } else { v.is_string() };
                    if !ok {
                        anyhow::bail!("a value of column `{}` has the wrong type", c.name);
                    }
                }
                self.pending.push(values);
                let batch = (800 / cols.len().max(1)).max(1);
                if self.pending.len() >= batch {
                    self.flush().await?;
                }
            }
            Item::EndTable { name, rows } => {
                self.flush().await?;
                match &self.table {
                    Some((t, _)) if *t == name => {}
                    _ => anyhow::bail!("table `{name}` ended without beginning"),
                }
                if rows != self.loaded {
                    anyhow::bail!(
                        "table `{name}`: {} rows loaded, the copy says {rows}",
                        self.loaded
                    );
                }
                self.counts.push((name, rows));
                self.table = None;
            }
        }
        Ok(())
    }
}
