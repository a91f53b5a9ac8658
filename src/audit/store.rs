//! The audit tables' queries, and only theirs.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::model::{AuditEvent, GENESIS, NewEvent};
use crate::store::{Backend, Db, StoreError};

const COLUMNS: &str = "seq, id, at, actor_id, actor, action, resource_type, resource_id, patient_id, \
method, path, status, ip, user_agent, request_id, outcome, break_glass, reason, context, prev_hash, hash, \
client_request_id";
const NCOLS: usize = 22;
/// Rows per INSERT statement (22 parameters each; well under both backends' limits).
const ROWS_PER_INSERT: usize = 64;

/// The signed head of the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
    pub key_version: i64,
    pub mac: String,
}

/// A retention anchor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub purged: i64,
    pub at: String,
    pub key_version: i64,
    pub mac: String,
}

fn event_from_row(r: &AnyRow) -> Result<AuditEvent, sqlx::Error> {
    Ok(AuditEvent {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        actor_id: r.try_get("actor_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        resource_type: r.try_get("resource_type")?,
        resource_id: r.try_get("resource_id")?,
        patient_id: r.try_get("patient_id")?,
        method: r.try_get("method")?,
        path: r.try_get("path")?,
        status: r.try_get("status")?,
        ip: r.try_get("ip")?,
        user_agent: r.try_get("user_agent")?,
        request_id: r.try_get("request_id")?,
        outcome: r.try_get("outcome")?,
        break_glass: r.try_get::<i64, _>("break_glass")? != 0,
        reason: r.try_get("reason")?,
        context: r.try_get("context")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
        client_request_id: r.try_get("client_request_id")?,
    })
}

fn head_from_row(r: &AnyRow) -> Result<Head, sqlx::Error> {
    Ok(Head {
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        key_version: r.try_get("key_version")?,
        mac: r.try_get("mac")?,
    })
}

/// `events` placed in the chain after (`seq`, `prev`), which move to the last of them.
fn chain(events: &[NewEvent], seq: &mut i64, prev: &mut String) -> Vec<AuditEvent> {
    let mut chained = Vec::with_capacity(events.len());
    for e in events {
        *seq += 1;
        let c = AuditEvent::chained(e, *seq, prev);
        prev.clone_from(&c.hash);
        chained.push(c);
    }
    chained
}

/// Appends `events` after the current head, in one transaction that also moves the
/// signed head. Appends from every process are serialised by the database (the head
/// row lock on PostgreSQL, the write lock on SQLite), so the chain stays one chain.
pub async fn append(
    db: &Db,
    events: &[NewEvent],
    sign: &(dyn Fn(i64, &str) -> (i64, String) + Send + Sync),
    now: &str,
) -> Result<Vec<AuditEvent>, StoreError> {
    let mut conn = db.writer().acquire().await?;
    let mut tx = match db.backend() {
        Backend::Sqlite => sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
        Backend::Postgres => sqlx::Connection::begin(&mut *conn).await?,
    };
    let head_sql = match db.backend() {
        Backend::Sqlite => "SELECT seq, hash, key_version, mac FROM audit_head WHERE id = 1",
        Backend::Postgres => {
            "SELECT seq, hash, key_version, mac FROM audit_head WHERE id = 1 FOR UPDATE"
        }
    };
    let head = sqlx::query(head_sql)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| head_from_row(&r))
        .transpose()?;
    let (mut seq, mut prev) = head.map_or((0, GENESIS.to_owned()), |h| (h.seq, h.hash));
    let chained = chain(events, &mut seq, &mut prev);
    for chunk in chained.chunks(ROWS_PER_INSERT) {
        let sql = insert_sql(chunk.len());
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for e in chunk {
            q = bind_event(q, e);
        }
        q.execute(&mut *tx).await?;
    }
    let (key_version, mac) = sign(seq, &prev);
    sqlx::query(
        "UPDATE audit_head SET seq = $1, hash = $2, key_version = $3, mac = $4, updated_at = $5 WHERE id = 1",
    )
    .bind(seq)
    .bind(prev)
    .bind(key_version)
    .bind(mac)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(chained)
}

/// SQLite in place (`store/local.rs`), on the audit writer's own connection: the same
/// transaction as [`append`] (the head read and moved under SQLite's write lock, taken
/// at `BEGIN IMMEDIATE`, so every process appends to one chain), with no hand-off to
/// another thread and one cached single-row INSERT per event.
///
/// `expected` is where this writer last left the chain; the answer says whether the head
/// had moved from there (another process appended), for the writer's counters.
pub fn append_local(
    conn: &mut rusqlite::Connection,
    expected: Option<&Tail>,
    events: &[NewEvent],
    sign: &(dyn Fn(i64, &str) -> (i64, String) + Send + Sync),
    now: &str,
) -> Result<(Vec<AuditEvent>, bool), StoreError> {
    use rusqlite::{OptionalExtension, params};
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let head: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (mut seq, mut prev) = head.unwrap_or((0, GENESIS.to_owned()));
    let moved = expected.is_some_and(|t| t.seq != seq || t.hash != prev);
    let chained = chain(events, &mut seq, &mut prev);
    {
        let mut insert = tx.prepare_cached(&INSERT_ONE)?;
        for e in &chained {
            insert.execute(params![
                e.seq,
                e.id,
                e.at,
                e.actor_id,
                e.actor,
                e.action,
                e.resource_type,
                e.resource_id,
                e.patient_id,
                e.method,
                e.path,
                e.status,
                e.ip,
                e.user_agent,
                e.request_id,
                e.outcome,
                i64::from(e.break_glass),
                e.reason,
                e.context,
                e.prev_hash,
                e.hash,
                e.client_request_id,
            ])?;
        }
    }
    let (key_version, mac) = sign(seq, &prev);
    tx.prepare_cached(
        "UPDATE audit_head SET seq = ?1, hash = ?2, key_version = ?3, mac = ?4, updated_at = ?5 WHERE id = 1",
    )?
    .execute(params![seq, prev, key_version, mac, now])?;
    tx.commit()?;
    Ok((chained, moved))
}

/// One event's INSERT, `?1` to `?22` in [`COLUMNS`] order.
static INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let params: Vec<String> = (1..=NCOLS).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO audit_events ({COLUMNS}) VALUES ({})",
        params.join(",")
    )
});

/// Where the writer believes the chain ends: the last committed `seq` and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    pub seq: i64,
    pub hash: String,
}

impl AuditEvent {
    fn tail(&self) -> Tail {
        Tail {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// The most rows the one-statement append takes (PostgreSQL allows 65,535 parameters
/// per statement: 7 for the head and 22 per row); bigger batches go through [`append`].
pub const FAST_MAX_ROWS: usize = 2900;

/// What [`append_after`] did.
pub enum Appended {
    /// Committed; the chain now ends at the last event.
    Done(Vec<AuditEvent>),
    /// The chain did not end at `tail` (another process appended): nothing was written.
    Moved,
}

/// Appends `events` after `tail`, the end of the chain as this writer last committed
/// it, in one round trip: the events and the head move together, only if the head is
/// still at `tail`, and nothing is written otherwise.
///
/// - SQLite: one multi-statement script, `BEGIN IMMEDIATE; INSERT…; UPDATE audit_head
///   … WHERE seq = tail; <fail unless that changed a row>; COMMIT`. An event whose
///   `seq` exists (another process appended) fails the primary key.
/// - PostgreSQL: one statement, `WITH h AS (UPDATE audit_head … WHERE seq = tail
///   RETURNING 1) INSERT … SELECT … WHERE EXISTS (SELECT 1 FROM h)`, atomic on its own.
///
/// [`append`] (head read and locked in a transaction) is the general path; this one
/// saves four of its five round trips, which matters because every audited request
/// waits for its batch.
pub async fn append_after(
    db: &Db,
    tail: &Tail,
    events: &[NewEvent],
    sign: &(dyn Fn(i64, &str) -> (i64, String) + Send + Sync),
    now: &str,
) -> Result<Appended, StoreError> {
    let mut prev = tail.hash.clone();
    let mut seq = tail.seq;
    let chained = chain(events, &mut seq, &mut prev);
    if chained.is_empty() || chained.len() > FAST_MAX_ROWS {
        return Ok(Appended::Moved);
    }
    let (key_version, mac) = sign(seq, &prev);
    // Head parameters come first: $1 new seq, $2 hash, $3 key version, $4 mac,
    // $5 updated_at, $6 expected seq, $7 expected hash; the rows follow from $8.
    const HEAD_PARAMS: usize = 7;
    let sql = match db.backend() {
        Backend::Sqlite => {
            let mut sql = String::from("BEGIN IMMEDIATE;");
            for (i, chunk) in chained.chunks(ROWS_PER_INSERT).enumerate() {
                sql.push_str(&format!("INSERT INTO audit_events ({COLUMNS}) VALUES "));
                sql.push_str(&values_sql(
                    chunk.len(),
                    HEAD_PARAMS + i * ROWS_PER_INSERT * NCOLS,
                ));
                sql.push(';');
            }
            sql.push_str(
                "UPDATE audit_head SET seq = $1, hash = $2, key_version = $3, mac = $4, updated_at = $5 \
                 WHERE id = 1 AND seq = $6 AND hash = $7;\
                 INSERT INTO audit_head (id, seq, hash, key_version, mac, updated_at) \
                 SELECT 1, 0, '', 0, '', '' WHERE changes() = 0;\
                 COMMIT;",
            );
            sql
        }
        Backend::Postgres => format!(
            "WITH h AS (UPDATE audit_head SET seq = $1, hash = $2, key_version = $3, mac = $4, updated_at = $5 \
             WHERE id = 1 AND seq = $6 AND hash = $7 RETURNING 1) \
             INSERT INTO audit_events ({COLUMNS}) SELECT * FROM (VALUES {}) AS v \
             WHERE EXISTS (SELECT 1 FROM h)",
            values_sql(chained.len(), HEAD_PARAMS)
        ),
    };
    let mut conn = db.writer().acquire().await?;
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(seq)
        .bind(prev)
        .bind(key_version)
        .bind(mac)
        .bind(now.to_owned())
        .bind(tail.seq)
        .bind(tail.hash.clone());
    for e in &chained {
        q = bind_event(q, e);
    }
    match q.execute(&mut *conn).await {
        Ok(done) => {
            // PostgreSQL inserts nothing when the head moved; SQLite fails instead.
            if db.backend() == Backend::Postgres && done.rows_affected() != chained.len() as u64 {
                return Ok(Appended::Moved);
            }
            Ok(Appended::Done(chained))
        }
        Err(e) => {
            if db.backend() == Backend::Sqlite {
                // The script stopped at the failing statement: end its transaction.
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                if is_constraint(&e) {
                    return Ok(Appended::Moved);
                }
            } else if is_constraint(&e) {
                return Ok(Appended::Moved);
            }
            Err(e.into())
        }
    }
}

fn is_constraint(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Tail {
    /// The end of the chain after `chained`, or `None` for an empty batch.
    pub fn after(chained: &[AuditEvent]) -> Option<Self> {
        chained.last().map(AuditEvent::tail)
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

fn bind_event<'q>(q: AnyQuery<'q>, e: &AuditEvent) -> AnyQuery<'q> {
    q.bind(e.seq)
        .bind(e.id.clone())
        .bind(e.at.clone())
        .bind(e.actor_id.clone())
        .bind(e.actor.clone())
        .bind(e.action.clone())
        .bind(e.resource_type.clone())
        .bind(e.resource_id.clone())
        .bind(e.patient_id.clone())
        .bind(e.method.clone())
        .bind(e.path.clone())
        .bind(e.status)
        .bind(e.ip.clone())
        .bind(e.user_agent.clone())
        .bind(e.request_id.clone())
        .bind(e.outcome.clone())
        .bind(i64::from(e.break_glass))
        .bind(e.reason.clone())
        .bind(e.context.clone())
        .bind(e.prev_hash.clone())
        .bind(e.hash.clone())
        .bind(e.client_request_id.clone())
}

fn insert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO audit_events ({COLUMNS}) VALUES {}",
        values_sql(rows, 0)
    )
}

/// `($n+1,…,$n+22),(…)` for `rows` rows of the audit columns, numbered after `first`.
fn values_sql(rows: usize, first: usize) -> String {
    let mut sql = String::new();
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..NCOLS {
            if c > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&(first + r * NCOLS + c + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

pub async fn head(db: &Db) -> Result<Option<Head>, StoreError> {
    Ok(
        sqlx::query("SELECT seq, hash, key_version, mac FROM audit_head WHERE id = 1")
            .fetch_optional(db.reader())
            .await?
            .map(|r| head_from_row(&r))
            .transpose()?,
    )
}

pub async fn latest_checkpoint(db: &Db) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT seq, hash, purged, at, key_version, mac FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(db.reader())
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Checkpoint {
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        purged: r.try_get("purged")?,
        at: r.try_get("at")?,
        key_version: r.try_get("key_version")?,
        mac: r.try_get("mac")?,
    }))
}

/// Events after `after_seq`, oldest first.
pub async fn page_ascending(
    db: &Db,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<AuditEvent>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(db.reader())
        .await?;
    Ok(rows.iter().map(event_from_row).collect::<Result<_, _>>()?)
}

/// The patient index rows `(seq, patient_id)` with `after < seq <= upto`, in order.
pub async fn patients_named(
    db: &Db,
    after: i64,
    upto: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, patient_id FROM audit_event_patients WHERE seq > $1 AND seq <= $2 \
         ORDER BY seq, patient_id",
    )
    .bind(after)
    .bind(upto)
    .fetch_all(db.reader())
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("seq")?, r.try_get("patient_id")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Whether the patient index has rows with `seq > after` whose event does not exist.
pub async fn index_orphans(db: &Db, after: i64) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM audit_event_patients p WHERE p.seq > $1 \
         AND NOT EXISTS (SELECT 1 FROM audit_events e WHERE e.seq = p.seq)",
    )
    .bind(after)
    .fetch_one(db.reader())
    .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}

/// Filters of the events query. Times are in the stored fixed-width form.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub actor: Option<String>,
    pub patient_id: Option<String>,
    pub action: Option<String>,
    /// `success`, `failure`, `denied` or `error`.
    pub outcome: Option<String>,
    /// The HTTP status sent.
    pub status: Option<i64>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only events with `seq` below this (the cursor).
    pub before_seq: Option<i64>,
    /// Only events with `seq` above this (for exports, oldest first).
    pub after_seq: Option<i64>,
    /// Only the events that disclosed data (the accounting of disclosures): successful
    /// reads, exports, searches, break-glass accesses, creates and updates, not the
    /// grants and tokens of apps (their reads are the disclosures). In the query, so
    /// that a page is full however many other events lie between.
    pub disclosed_only: bool,
    /// Leaves out what this user did themselves without an app (a patient's accounting
    /// does not list the patient's own reads; what their apps read stays in it).
    pub exclude_own: Option<String>,
}

/// Events matching `f`, newest first (or oldest first when `ascending`).
pub async fn query(
    db: &Db,
    f: &Filter,
    limit: i64,
    ascending: bool,
) -> Result<Vec<AuditEvent>, StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM audit_events WHERE 1 = 1");
    let mut binds: Vec<Bind> = Vec::new();
    let mut add = |clause: &str, b: Bind| {
        binds.push(b);
        sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
    };
    if let Some(a) = &f.actor {
        add(" AND (actor_id = ? ", Bind::Text(a.clone()));
        add("OR actor = ?)", Bind::Text(a.clone()));
    }
    if let Some(p) = &f.patient_id {
        // Every event naming the patient, in `patient_id` or in a search's list.
        add(
            " AND seq IN (SELECT seq FROM audit_event_patients WHERE patient_id = ?)",
            Bind::Text(p.clone()),
        );
    }
    if let Some(a) = &f.action {
        add(" AND action = ?", Bind::Text(a.clone()));
    }
    if let Some(o) = &f.outcome {
        add(" AND outcome = ?", Bind::Text(o.clone()));
    }
    if let Some(s) = f.status {
        add(" AND status = ?", Bind::Int(s));
    }
    if let Some(s) = &f.since {
        add(" AND at >= ?", Bind::Text(s.clone()));
    }
    if let Some(u) = &f.until {
        add(" AND at < ?", Bind::Text(u.clone()));
    }
    if let Some(c) = f.before_seq {
        add(" AND seq < ?", Bind::Int(c));
    }
    if let Some(c) = f.after_seq {
        add(" AND seq > ?", Bind::Int(c));
    }
    if f.disclosed_only {
        add(
            " AND outcome = ? \
             AND action IN ('read', 'export', 'search', 'break_glass', 'update', 'create') \
             AND (resource_type IS NULL OR substr(resource_type, 1, 6) <> 'oauth_')",
            Bind::Text("success".into()),
        );
    }
    if let Some(u) = &f.exclude_own {
        add(
            " AND NOT (COALESCE(actor_id, '') = ? AND context NOT LIKE '%\"client_id\":%')",
            Bind::Text(u.clone()),
        );
    }
    add(
        if ascending {
            " ORDER BY seq ASC LIMIT ?"
        } else {
            " ORDER BY seq DESC LIMIT ?"
        },
        Bind::Int(limit),
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
        };
    }
    let rows = q.fetch_all(db.reader()).await?;
    Ok(rows.iter().map(event_from_row).collect::<Result<_, _>>()?)
}

enum Bind {
    Text(String),
    Int(i64),
}

/// Deletes events up to and including `up_to_seq` and leaves a signed checkpoint in
/// their place, in one transaction. The delete triggers allow it only while the guard
/// row says a purge is running, inside this transaction.
pub async fn purge(db: &Db, up_to_seq: i64, checkpoint: &Checkpoint) -> Result<u64, StoreError> {
    let mut conn = db.writer().acquire().await?;
    let mut tx = match db.backend() {
        Backend::Sqlite => sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
        Backend::Postgres => sqlx::Connection::begin(&mut *conn).await?,
    };
    sqlx::query("UPDATE audit_guard SET purging = 1 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
        .bind(up_to_seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM audit_event_patients WHERE seq <= $1")
        .bind(up_to_seq)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE audit_guard SET purging = 0 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, purged, at, key_version, mac) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(checkpoint.seq)
    .bind(checkpoint.hash.clone())
    .bind(checkpoint.purged)
    .bind(checkpoint.at.clone())
    .bind(checkpoint.key_version)
    .bind(checkpoint.mac.clone())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted)
}

/// The event with the given seq, if stored.
pub async fn by_seq(db: &Db, seq: i64) -> Result<Option<AuditEvent>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE seq = $1");
    Ok(sqlx::query(AssertSqlSafe(sql))
        .bind(seq)
        .fetch_optional(db.reader())
        .await?
        .map(|r| event_from_row(&r))
        .transpose()?)
}

/// The newest event at or before `at` (for the retention cut).
pub async fn last_seq_before(db: &Db, at: &str) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query("SELECT MAX(seq) AS s FROM audit_events WHERE at < $1")
        .bind(at)
        .fetch_one(db.reader())
        .await?;
    Ok(row.try_get("s")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_sql_numbers_every_parameter() {
        let sql = insert_sql(2);
        assert!(sql.contains("($1,$2,"));
        assert!(sql.contains(",$22),($23,"));
        assert!(sql.ends_with(",$44)"));
    }
}
