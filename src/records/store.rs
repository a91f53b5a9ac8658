//! The patients and records tables' queries, and only theirs. Everything here is
//! ciphertext, blind indexes, ids and times.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::store::local::{self, Cols};
use crate::store::{Db, StoreError};

/// A stored patient: sealed fields.
#[derive(Clone, Debug)]
pub struct PatientRow {
    pub id: String,
    pub data_key: Option<String>,
    pub kek_version: i64,
    pub mrn: String,
    pub given_name: String,
    pub family_name: String,
    pub birth_date: String,
    pub sex: Option<String>,
    pub ssn: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub bi_mrn: String,
    pub bi_ssn: Option<String>,
    pub bi_birth_date: Option<String>,
    pub bi_given_name: Option<String>,
    pub bi_family_name: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub deleted_at: Option<String>,
    /// The name search tags of this row's name (`patient_terms`): filled when the row is
    /// sealed for a write, empty when it was read.
    pub terms: Vec<String>,
}

const PATIENT_COLUMNS: &str = "id, data_key, kek_version, mrn, given_name, family_name, birth_date, sex, ssn, \
email, phone, address, bi_mrn, bi_ssn, bi_birth_date, bi_given_name, bi_family_name, version, created_at, \
updated_at, deleted_at";

fn patient<R: Cols>(r: &R) -> Result<PatientRow, StoreError> {
    Ok(PatientRow {
        id: r.col_at(0, "id")?,
        data_key: r.col_at(1, "data_key")?,
        kek_version: r.col_at(2, "kek_version")?,
        mrn: r.col_at(3, "mrn")?,
        given_name: r.col_at(4, "given_name")?,
        family_name: r.col_at(5, "family_name")?,
        birth_date: r.col_at(6, "birth_date")?,
        sex: r.col_at(7, "sex")?,
        ssn: r.col_at(8, "ssn")?,
        email: r.col_at(9, "email")?,
        phone: r.col_at(10, "phone")?,
        address: r.col_at(11, "address")?,
        bi_mrn: r.col_at(12, "bi_mrn")?,
        bi_ssn: r.col_at(13, "bi_ssn")?,
        bi_birth_date: r.col_at(14, "bi_birth_date")?,
        bi_given_name: r.col_at(15, "bi_given_name")?,
        bi_family_name: r.col_at(16, "bi_family_name")?,
        version: r.col_at(17, "version")?,
        created_at: r.col_at(18, "created_at")?,
        updated_at: r.col_at(19, "updated_at")?,
        deleted_at: r.col_at(20, "deleted_at")?,
        terms: Vec::new(),
    })
}

/// The version of the name search tags that writes give a row (`patients.terms_version`).
pub const TERMS_VERSION: i64 = 1;

/// Replaces a patient's name search tags inside `tx`.
async fn write_terms_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    patient_id: &str,
    terms: &[String],
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM patient_terms WHERE patient_id = $1")
        .bind(patient_id)
        .execute(&mut **tx)
        .await?;
    for chunk in terms.chunks(100) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = format!(
            "INSERT INTO patient_terms (tag, patient_id) VALUES {} ON CONFLICT DO NOTHING",
            values.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for t in chunk {
            q = q.bind(t).bind(patient_id);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Writes a patient inside `tx`: inserts it (`expected` is `None`) or replaces its
/// sealed fields if its version is still `expected`. Returns false when the MRN or the
/// id is taken (an insert), or someone changed the patient first (an update).
pub async fn write_patient_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    p: &PatientRow,
    expected: Option<i64>,
) -> Result<bool, StoreError> {
    let n = match expected {
        None => sqlx::query(
            "INSERT INTO patients (id, data_key, kek_version, mrn, given_name, family_name, birth_date, sex, ssn, email, \
             phone, address, bi_mrn, bi_ssn, bi_birth_date, bi_given_name, bi_family_name, version, created_at, updated_at, \
             terms_version) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21) ON CONFLICT DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.data_key)
        .bind(p.kek_version)
        .bind(&p.mrn)
        .bind(&p.given_name)
        .bind(&p.family_name)
        .bind(&p.birth_date)
        .bind(&p.sex)
        .bind(&p.ssn)
        .bind(&p.email)
        .bind(&p.phone)
        .bind(&p.address)
        .bind(&p.bi_mrn)
        .bind(&p.bi_ssn)
        .bind(&p.bi_birth_date)
        .bind(&p.bi_given_name)
        .bind(&p.bi_family_name)
        .bind(p.version)
        .bind(&p.created_at)
        .bind(&p.updated_at)
        .bind(TERMS_VERSION)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        Some(expected) => sqlx::query(
            "UPDATE patients SET mrn=$1, given_name=$2, family_name=$3, birth_date=$4, sex=$5, ssn=$6, email=$7, phone=$8, \
             address=$9, bi_mrn=$10, bi_ssn=$11, bi_birth_date=$12, bi_given_name=$13, bi_family_name=$14, version=$15, \
             updated_at=$16, terms_version=$19 WHERE id=$17 AND version=$18 AND deleted_at IS NULL",
        )
        .bind(&p.mrn)
        .bind(&p.given_name)
        .bind(&p.family_name)
        .bind(&p.birth_date)
        .bind(&p.sex)
        .bind(&p.ssn)
        .bind(&p.email)
        .bind(&p.phone)
        .bind(&p.address)
        .bind(&p.bi_mrn)
        .bind(&p.bi_ssn)
        .bind(&p.bi_birth_date)
        .bind(&p.bi_given_name)
        .bind(&p.bi_family_name)
        .bind(p.version)
        .bind(&p.updated_at)
        .bind(&p.id)
        .bind(expected)
        .bind(TERMS_VERSION)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
    };
    if n != 1 {
        return Ok(false);
    }
    write_terms_in(tx, &p.id, &p.terms).await?;
    Ok(true)
}

/// Keeps one version of a patient's fields (sealed), for FHIR vread; `None` for a
/// deletion.
pub async fn insert_patient_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    patient_id: &str,
    version: i64,
    fields: Option<&str>,
    at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO patient_versions (patient_id, version, fields, at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (patient_id, version) DO NOTHING",
    )
    .bind(patient_id)
    .bind(version)
    .bind(fields)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes a patient and its version row in one transaction ([`write_patient_in`]).
pub async fn write_patient(
    db: &Db,
    p: &PatientRow,
    expected: Option<i64>,
    fields: &str,
) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    if !write_patient_in(&mut tx, p, expected).await? {
        tx.rollback().await?;
        return Ok(false);
    }
    insert_patient_version(&mut tx, &p.id, p.version, Some(fields), &p.updated_at).await?;
    tx.commit().await?;
    Ok(true)
}

/// Whether a patient id is taken (by a live or a deleted patient).
pub async fn patient_exists(db: &Db, id: &str) -> Result<Option<bool>, StoreError> {
    let row = sqlx::query("SELECT deleted_at FROM patients WHERE id = $1")
        .bind(id)
        .fetch_optional(db.reader())
        .await?;
    row.map(|r| Ok(r.col::<Option<String>>("deleted_at")?.is_some()))
        .transpose()
}

pub async fn mrn_taken(db: &Db, bi_mrn: &str, except: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("SELECT 1 AS x FROM patients WHERE bi_mrn = $1 AND id <> $2")
            .bind(bi_mrn)
            .bind(except)
            .fetch_optional(db.reader())
            .await?
            .is_some(),
    )
}

/// A patient's row, deleted or not (a deleted patient's versions stay readable).
pub async fn patient_row_any(db: &Db, id: &str) -> Result<Option<PatientRow>, StoreError> {
    let sql = format!("SELECT {PATIENT_COLUMNS} FROM patients WHERE id = $1");
    sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| patient(&r))
        .transpose()
}

/// A patient's version: `(fields, at)`; the fields are `None` for a deletion.
pub async fn patient_version(
    db: &Db,
    patient_id: &str,
    version: i64,
) -> Result<Option<(Option<String>, String)>, StoreError> {
    let row = sqlx::query(
        "SELECT fields, at FROM patient_versions WHERE patient_id = $1 AND version = $2",
    )
    .bind(patient_id)
    .bind(version)
    .fetch_optional(db.reader())
    .await?;
    row.map(|r| Ok((r.col("fields")?, r.col("at")?)))
        .transpose()
}

pub async fn patient_by_id(db: &Db, id: &str) -> Result<Option<PatientRow>, StoreError> {
    let sql =
        format!("SELECT {PATIENT_COLUMNS} FROM patients WHERE id = $1 AND deleted_at IS NULL");
    if let Some(local) = db.local() {
        let rows = local.read(|c| local::query(c, &sql, &[&id], |r| patient(r)))?;
        return Ok(rows.into_iter().next());
    }
    sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| patient(&r))
        .transpose()
}

/// Patients matching any of the blind indexes given (or all when none), by id, after `after`.
pub async fn search(
    db: &Db,
    index: Option<&SearchIndex>,
    after: &str,
    limit: i64,
) -> Result<Vec<PatientRow>, StoreError> {
    // The page size is written into the SQL, not bound: SQLite plans `ORDER BY … LIMIT`
    // with the bound value and so prepared the statement anew at every run (its whole
    // compile, for the union, at every search). An integer, clamped here.
    let limit = limit.clamp(1, 1000);
    let sql = match index {
        None => format!(
            "SELECT {PATIENT_COLUMNS} FROM patients WHERE deleted_at IS NULL AND id > $1 ORDER BY id LIMIT {limit}"
        ),
        Some(_) => {
            // One page from each blind index, in id order through its (value, id)
            // index, then the first page of their union: the first `limit` matches
            // after the cursor are among them, and no index is read further than a
            // page, however many patients share a value.
            let branch = |column: &str, param: u8, alias: &str| {
                format!(
                    "SELECT id FROM (SELECT id FROM patients WHERE {column} = ${param} \
                     AND deleted_at IS NULL AND id > $1 ORDER BY id LIMIT {limit}) AS {alias}"
                )
            };
            let union = [
                branch("bi_mrn", 2, "m"),
                branch("bi_ssn", 3, "s"),
                branch("bi_birth_date", 4, "b"),
            ]
            .join(" UNION ");
            format!(
                "SELECT {PATIENT_COLUMNS} FROM patients WHERE id IN ({union}) ORDER BY id LIMIT {limit}"
            )
        }
    };
    if let Some(local) = db.local() {
        // In place: at most a page from each index (store/local.rs).
        return local.read(|c| match index {
            None => local::query(c, &sql, &[&after], |r| patient(r)),
            Some(ix) => local::query(c, &sql, &[&after, &ix.mrn, &ix.ssn, &ix.birth_date], |r| {
                patient(r)
            }),
        });
    }
    let q = sqlx::query(AssertSqlSafe(sql)).bind(after);
    let q = match index {
        None => q,
        Some(ix) => q.bind(&ix.mrn).bind(&ix.ssn).bind(&ix.birth_date),
    };
    let rows = q.fetch_all(db.reader()).await?;
    rows.iter().map(patient).collect()
}

/// How many live patients match any of the blind indexes given: one count through each
/// index's (value, id) index, their union deduplicated.
pub async fn count_index(db: &Db, ix: &SearchIndex) -> Result<i64, StoreError> {
    const SQL: &str = "SELECT '' AS id, COUNT(*) AS n FROM (\
        SELECT id FROM patients WHERE bi_mrn = $1 AND deleted_at IS NULL \
        UNION SELECT id FROM patients WHERE bi_ssn = $2 AND deleted_at IS NULL \
        UNION SELECT id FROM patients WHERE bi_birth_date = $3 AND deleted_at IS NULL) AS matches";
    let rows = ids_and_numbers(db, SQL.to_owned(), &[&ix.mrn, &ix.ssn, &ix.birth_date]).await?;
    Ok(rows.first().map_or(0, |(_, n)| *n))
}

/// The blind indexes an identifier or a birth date may match (a column's index, or a
/// value that matches nothing when the term cannot be that kind of value).
pub struct SearchIndex {
    pub mrn: String,
    pub ssn: String,
    pub birth_date: String,
}

/// Runs a read whose rows are `(id, n)`: a text column `id` and an integer column `n`.
/// In place on a SQLite file, through the pool elsewhere. Every parameter is text.
async fn ids_and_numbers(
    db: &Db,
    sql: String,
    params: &[&str],
) -> Result<Vec<(String, i64)>, StoreError> {
    if let Some(local) = db.local() {
        let p: Vec<&dyn rusqlite::ToSql> =
            params.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        return local.read(|c| local::query(c, &sql, &p, |r| Ok((r.col("id")?, r.col("n")?))));
    }
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in params {
        q = q.bind(*v);
    }
    q.fetch_all(db.reader())
        .await?
        .iter()
        .map(|r| Ok((r.col("id")?, r.col("n")?)))
        .collect()
}

/// `$first, $first+1, …` for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first `limit` patient ids (after `after`) having any of the tags `$2, $3, …`:
/// one page from each tag's (tag, patient) index, never more, then the first page of
/// their union.
fn tag_union(n_tags: usize, limit: i64) -> String {
    let union = (0..n_tags)
        .map(|i| {
            format!(
                "SELECT patient_id FROM (SELECT patient_id FROM patient_terms WHERE tag = ${} \
                 AND patient_id > $1 ORDER BY patient_id LIMIT {limit}) AS t{i}",
                i + 2
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ");
    format!("SELECT patient_id FROM ({union}) AS u ORDER BY patient_id LIMIT {limit}")
}

/// The live patients with any of `tags`, at most `limit` of them, lowest ids first.
pub async fn ids_with_any_tag(
    db: &Db,
    tags: &[&str],
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let limit = limit.clamp(1, 10_000);
    let sql = format!(
        "SELECT patient_id AS id, CAST(0 AS BIGINT) AS n FROM ({}) AS page",
        tag_union(tags.len(), limit)
    );
    let mut params: Vec<&str> = vec![after];
    params.extend_from_slice(tags);
    Ok(ids_and_numbers(db, sql, &params)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// The patients having any of `tags`: at most `per_tag` from each tag's index, lowest
/// ids first there, as they come (each id once per tag; callers deduplicate and order).
pub async fn ids_under_tags(
    db: &Db,
    tags: &[&str],
    per_tag: i64,
) -> Result<Vec<String>, StoreError> {
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let per_tag = per_tag.clamp(1, 10_000);
    let sql = (0..tags.len())
        .map(|i| {
            format!(
                "SELECT id, CAST(0 AS BIGINT) AS n FROM (SELECT patient_id AS id FROM patient_terms \
                 WHERE tag = ${} ORDER BY patient_id LIMIT {per_tag}) AS t{i}",
                i + 1
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    Ok(ids_and_numbers(db, sql, tags)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// Where the candidates of a search come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The patients having any of these name tags.
    Tags(&'a [&'a str]),
    /// The patients born on the day of this blind index.
    BirthDate(&'a str),
}

/// At most `limit` candidates of a search, as [`NameRow`]s, in one query: the ids from
/// their index and what ranking reads of each.
pub async fn candidates(
    db: &Db,
    source: Source<'_>,
    limit: i64,
) -> Result<Vec<NameRow>, StoreError> {
    let limit = limit.clamp(1, 10_000);
    const COLUMNS: &str = "id, data_key, given_name, family_name, bi_birth_date";
    let (sql, params): (String, Vec<&str>) = match source {
        Source::Tags([]) => return Ok(Vec::new()),
        Source::Tags(tags) => {
            let mut p = vec![""];
            p.extend_from_slice(tags);
            (
                format!(
                    "SELECT {COLUMNS} FROM patients WHERE id IN ({}) AND deleted_at IS NULL",
                    tag_union(tags.len(), limit)
                ),
                p,
            )
        }
        Source::BirthDate(b) => (
            format!(
                "SELECT {COLUMNS} FROM patients WHERE bi_birth_date = $1 AND deleted_at IS NULL \
                 ORDER BY id LIMIT {limit}"
            ),
            vec![b],
        ),
    };
    name_rows_of(db, sql, &params).await
}

/// How many live patients have any of `tags`.
pub async fn count_with_any_tag(db: &Db, tags: &[&str]) -> Result<i64, StoreError> {
    if tags.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "SELECT '' AS id, COUNT(DISTINCT patient_id) AS n FROM patient_terms WHERE tag IN ({})",
        placeholders(1, tags.len())
    );
    let rows = ids_and_numbers(db, sql, tags).await?;
    Ok(rows.first().map_or(0, |(_, n)| *n))
}

/// The live patients whose MRN blind index is one of `mrns`, or whose SSN blind index is
/// `ssn`: one indexed lookup each (a single OR over both columns would scan the table on
/// SQLite).
pub async fn ids_by_identifier(
    db: &Db,
    mrns: &[&str],
    ssn: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let mut branches: Vec<String> = (1..=mrns.len())
        .map(|i| format!("SELECT id FROM patients WHERE bi_mrn = ${i} AND deleted_at IS NULL"))
        .collect();
    let mut params: Vec<&str> = mrns.to_vec();
    if let Some(ssn) = ssn {
        params.push(ssn);
        branches.push(format!(
            "SELECT id FROM patients WHERE bi_ssn = ${} AND deleted_at IS NULL",
            params.len()
        ));
    }
    if branches.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id, CAST(0 AS BIGINT) AS n FROM ({}) AS found ORDER BY id LIMIT 100",
        branches.join(" UNION ")
    );
    Ok(ids_and_numbers(db, sql, &params)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// Live patients by id, in the order given (ids not found are left out).
pub async fn patients_by_ids(db: &Db, ids: &[String]) -> Result<Vec<PatientRow>, StoreError> {
    let mut out: Vec<PatientRow> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT {PATIENT_COLUMNS} FROM patients WHERE id IN ({}) AND deleted_at IS NULL",
            placeholders(1, chunk.len())
        );
        let rows: Vec<PatientRow> = if let Some(local) = db.local() {
            let p: Vec<&dyn rusqlite::ToSql> =
                chunk.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
            local.read(|c| local::query(c, &sql, &p, |r| patient(r)))?
        } else {
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for v in chunk {
                q = q.bind(v);
            }
            q.fetch_all(db.reader())
                .await?
                .iter()
                .map(patient)
                .collect::<Result<_, _>>()?
        };
        out.extend(rows);
    }
    let order: std::collections::HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    out.sort_by_key(|r| order.get(r.id.as_str()).copied().unwrap_or(usize::MAX));
    Ok(out)
}

/// What a search reads of a candidate: enough to open its name and check its birth date.
pub struct NameRow {
    pub id: String,
    pub data_key: Option<String>,
    pub given_name: String,
    pub family_name: String,
    pub bi_birth_date: Option<String>,
}

fn name_row<R: Cols>(r: &R) -> Result<NameRow, StoreError> {
    Ok(NameRow {
        id: r.col_at(0, "id")?,
        data_key: r.col_at(1, "data_key")?,
        given_name: r.col_at(2, "given_name")?,
        family_name: r.col_at(3, "family_name")?,
        bi_birth_date: r.col_at(4, "bi_birth_date")?,
    })
}

async fn name_rows_of(db: &Db, sql: String, params: &[&str]) -> Result<Vec<NameRow>, StoreError> {
    if let Some(local) = db.local() {
        let p: Vec<&dyn rusqlite::ToSql> =
            params.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        return local.read(|c| local::query(c, &sql, &p, |r| name_row(r)));
    }
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in params {
        q = q.bind(*v);
    }
    q.fetch_all(db.reader())
        .await?
        .iter()
        .map(name_row)
        .collect()
}

/// The [`NameRow`]s of live patients by id (ids not found are left out; any order).
pub async fn name_rows(db: &Db, ids: &[String]) -> Result<Vec<NameRow>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT id, data_key, given_name, family_name, bi_birth_date FROM patients \
             WHERE id IN ({}) AND deleted_at IS NULL",
            placeholders(1, chunk.len())
        );
        let params: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(name_rows_of(db, sql, &params).await?);
    }
    Ok(out)
}

/// Live patients whose name search tags are older than [`TERMS_VERSION`] (written before
/// the tags existed), a batch at a time.
pub async fn patients_without_terms(db: &Db, limit: i64) -> Result<Vec<PatientRow>, StoreError> {
    let sql = format!(
        "SELECT {PATIENT_COLUMNS} FROM patients WHERE terms_version < $1 AND deleted_at IS NULL \
         AND data_key IS NOT NULL ORDER BY id LIMIT {}",
        limit.clamp(1, 1000)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(TERMS_VERSION)
        .fetch_all(db.reader())
        .await?
        .iter()
        .map(patient)
        .collect()
}

/// Writes the name search tags of a patient read at `version` (false: it changed since,
/// and its writer wrote them).
pub async fn write_terms(
    db: &Db,
    id: &str,
    version: i64,
    terms: &[String],
) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    let n = sqlx::query(
        "UPDATE patients SET terms_version = $1 WHERE id = $2 AND version = $3 AND deleted_at IS NULL",
    )
    .bind(TERMS_VERSION)
    .bind(id)
    .bind(version)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    write_terms_in(&mut tx, id, terms).await?;
    tx.commit().await?;
    Ok(true)
}

/// Soft-deletes a live patient: a new version, marked deleted, and its version row.
pub async fn soft_delete_patient(db: &Db, id: &str, now: &str) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    let n = sqlx::query(
        "UPDATE patients SET deleted_at = $1, version = version + 1 WHERE id = $2 AND deleted_at IS NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    let version: i64 = sqlx::query("SELECT version FROM patients WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .col("version")?;
    // A deleted patient is found by no search.
    write_terms_in(&mut tx, id, &[]).await?;
    insert_patient_version(&mut tx, id, version, None, now).await?;
    tx.commit().await?;
    Ok(true)
}

/// Data keys wrapped under a version older than `current`, a batch at a time.
pub async fn stale_keys(
    db: &Db,
    current: i64,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, data_key FROM patients WHERE kek_version < $1 AND data_key IS NOT NULL ORDER BY id LIMIT $2",
    )
    .bind(current)
    .bind(limit)
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("data_key")?)))
        .collect::<Result<_, sqlx::Error>>()?)
}

/// Replaces a wrapped key only if it is still the one read (another rewrap may race).
pub async fn rewrap(
    db: &Db,
    id: &str,
    old: &str,
    new: &str,
    version: i64,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "UPDATE patients SET data_key = $1, kek_version = $2 WHERE id = $3 AND data_key = $4",
    )
    .bind(new)
    .bind(version)
    .bind(id)
    .bind(old)
    .execute(db.writer())
    .await?
    .rows_affected()
        == 1)
}

/// How many live patients there are.
pub async fn count_live(db: &Db) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM patients WHERE deleted_at IS NULL")
        .fetch_one(db.reader())
        .await?;
    Ok(row.try_get("n")?)
}

pub async fn count_by_version(db: &Db) -> Result<Vec<(i64, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT kek_version, COUNT(*) AS n FROM patients WHERE data_key IS NOT NULL GROUP BY kek_version ORDER BY kek_version",
    )
    .fetch_all(db.reader())
    .await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.try_get("kek_version")?, r.try_get("n")?)))
        .collect::<Result<_, sqlx::Error>>()?)
}

// ---- records -----------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RecordRow {
    pub id: String,
    pub patient_id: String,
    pub diagnosis: String,
    pub treatment: Option<String>,
    pub notes: Option<String>,
    pub recorded_at: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// The sealed sensitivity labels (comma-separated codes), if any.
    pub labels: Option<String>,
}

const RECORD_COLUMNS: &str = "id, patient_id, diagnosis, treatment, notes, recorded_at, version, created_at, updated_at, labels";

fn record(r: &AnyRow) -> Result<RecordRow, sqlx::Error> {
    Ok(RecordRow {
        id: r.try_get("id")?,
        patient_id: r.try_get("patient_id")?,
        diagnosis: r.try_get("diagnosis")?,
        treatment: r.try_get("treatment")?,
        notes: r.try_get("notes")?,
        recorded_at: r.try_get("recorded_at")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        labels: r.try_get("labels")?,
    })
}

pub async fn insert_record(db: &Db, r: &RecordRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO records (id, patient_id, diagnosis, treatment, notes, recorded_at, version, created_at, updated_at, labels) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
    )
    .bind(&r.id)
    .bind(&r.patient_id)
    .bind(&r.diagnosis)
    .bind(&r.treatment)
    .bind(&r.notes)
    .bind(&r.recorded_at)
    .bind(r.version)
    .bind(&r.created_at)
    .bind(&r.updated_at)
    .bind(&r.labels)
    .execute(db.writer())
    .await?;
    Ok(())
}

pub async fn record_by_id(db: &Db, id: &str) -> Result<Option<RecordRow>, StoreError> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM records WHERE id = $1 AND deleted_at IS NULL");
    Ok(sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r| record(&r))
        .transpose()?)
}

pub async fn records_of(
    db: &Db,
    patient_id: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<RecordRow>, StoreError> {
    let sql = format!(
        "SELECT {RECORD_COLUMNS} FROM records WHERE patient_id = $1 AND deleted_at IS NULL AND id > $2 ORDER BY id LIMIT $3"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(patient_id)
        .bind(after)
        .bind(limit)
        .fetch_all(db.reader())
        .await?;
    Ok(rows.iter().map(record).collect::<Result<_, _>>()?)
}

pub async fn update_record(db: &Db, r: &RecordRow, expected: i64) -> Result<bool, StoreError> {
    Ok(sqlx::query(
        "UPDATE records SET diagnosis=$1, treatment=$2, notes=$3, recorded_at=$4, version=$5, updated_at=$6, labels=$7 \
         WHERE id=$8 AND version=$9 AND deleted_at IS NULL",
    )
    .bind(&r.diagnosis)
    .bind(&r.treatment)
    .bind(&r.notes)
    .bind(&r.recorded_at)
    .bind(r.version)
    .bind(&r.updated_at)
    .bind(&r.labels)
    .bind(&r.id)
    .bind(expected)
    .execute(db.writer())
    .await?
    .rows_affected()
        == 1)
}

pub async fn soft_delete_record(db: &Db, id: &str, now: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("UPDATE records SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(db.writer())
            .await?
            .rows_affected()
            == 1,
    )
}

/// Destroys the data keys of patients deleted before `before` (crypto-shredding): their
/// sealed fields can never be opened again. Blind indexes are cleared too.
pub async fn shred(db: &Db, before: &str, now: &str) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT id FROM patients WHERE deleted_at IS NOT NULL AND deleted_at < $1 AND data_key IS NOT NULL ORDER BY id",
    )
    .bind(before)
    .fetch_all(db.reader())
    .await?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        sqlx::query(
            "UPDATE patients SET data_key = NULL, shredded_at = $1, bi_mrn = $2, bi_ssn = NULL, bi_birth_date = NULL, \
             bi_given_name = NULL, bi_family_name = NULL WHERE id = $3 AND data_key IS NOT NULL",
        )
        .bind(now)
        .bind(format!("shredded:{id}"))
        .bind(id)
        .execute(db.writer())
        .await?;
        sqlx::query("DELETE FROM patient_terms WHERE patient_id = $1")
            .bind(id)
            .execute(db.writer())
            .await?;
    }
    Ok(ids)
}
