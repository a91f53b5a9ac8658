//! The FHIR tables' queries, and only theirs: ciphertexts, ids, versions and times.

use sqlx::any::AnyRow;

use crate::records::store as patients;
use crate::store::local::{self, Cols};
use crate::store::{Db, StoreError};

/// The current version of a stored resource.
#[derive(Clone, Debug)]
pub struct ResourceRow {
    pub resource_type: String,
    pub id: String,
    pub patient_id: String,
    pub version: i64,
    pub body: String,
    pub created_at: String,
    pub updated_at: String,
    pub deleted_at: Option<String>,
}

fn resource<R: Cols>(r: &R) -> Result<ResourceRow, StoreError> {
    Ok(ResourceRow {
        resource_type: r.col_at(0, "resource_type")?,
        id: r.col_at(1, "id")?,
        patient_id: r.col_at(2, "patient_id")?,
        version: r.col_at(3, "version")?,
        body: r.col_at(4, "body")?,
        created_at: r.col_at(5, "created_at")?,
        updated_at: r.col_at(6, "updated_at")?,
        deleted_at: r.col_at(7, "deleted_at")?,
    })
}

/// One resource, deleted or not.
pub async fn by_id(db: &Db, t: &str, id: &str) -> Result<Option<ResourceRow>, StoreError> {
    const SQL: &str = "SELECT resource_type, id, patient_id, version, body, created_at, updated_at, deleted_at \
                       FROM fhir_resources WHERE resource_type = $1 AND id = $2";
    if let Some(l) = db.local() {
        return Ok(l
            .read(|c| local::query(c, SQL, &[&t, &id], |r| resource(r)))?
            .into_iter()
            .next());
    }
    sqlx::query(SQL)
        .bind(t)
        .bind(id)
        .fetch_optional(db.reader())
        .await?
        .map(|r: AnyRow| resource(&r))
        .transpose()
}

/// The live resources of one type in a patient's compartment.
pub async fn compartment(
    db: &Db,
    patient_id: &str,
    t: &str,
) -> Result<Vec<ResourceRow>, StoreError> {
    const SQL: &str = "SELECT resource_type, id, patient_id, version, body, created_at, updated_at, deleted_at \
                       FROM fhir_resources WHERE patient_id = $1 AND resource_type = $2 AND deleted_at IS NULL";
    if let Some(l) = db.local() {
        return l.read(|c| local::query(c, SQL, &[&patient_id, &t], |r| resource(r)));
    }
    let rows = sqlx::query(SQL)
        .bind(patient_id)
        .bind(t)
        .fetch_all(db.reader())
        .await?;
    rows.iter().map(resource).collect()
}

/// One version: `(patient_id, body)`; the body is `None` for a deletion.
pub async fn version(
    db: &Db,
    t: &str,
    id: &str,
    version: i64,
) -> Result<Option<(String, Option<String>, String)>, StoreError> {
    let row = sqlx::query(
        "SELECT patient_id, body, at FROM fhir_versions WHERE resource_type = $1 AND id = $2 AND version = $3",
    )
    .bind(t)
    .bind(id)
    .bind(version)
    .fetch_optional(db.reader())
    .await?;
    row.map(|r| Ok((r.col("patient_id")?, r.col("body")?, r.col("at")?)))
        .transpose()
}

/// A write of one resource: its new current row and the version row beside it.
pub struct Write {
    pub row: ResourceRow,
    /// The version the stored row must still have (`None`: the resource is new).
    pub expected: Option<i64>,
}

/// Applies writes in one transaction: all of them or none. Returns false (and writes
/// nothing) when a resource changed since it was read, or a new one exists already.
pub async fn apply(
    db: &Db,
    writes: &[Write],
    patients: &[PatientWrite],
) -> Result<bool, StoreError> {
    let mut tx = db.writer().begin().await?;
    for p in patients {
        if !patients::write_patient_in(&mut tx, &p.row, p.expected).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        patients::insert_patient_version(
            &mut tx,
            &p.row.id,
            p.row.version,
            p.fields.as_deref(),
            &p.row.updated_at,
        )
        .await?;
    }
    for w in writes {
        let r = &w.row;
        let n = match w.expected {
            None => sqlx::query(
                "INSERT INTO fhir_resources (resource_type, id, patient_id, version, body, created_at, updated_at, deleted_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (resource_type, id) DO NOTHING",
            )
            .bind(&r.resource_type)
            .bind(&r.id)
            .bind(&r.patient_id)
            .bind(r.version)
            .bind(&r.body)
            .bind(&r.created_at)
            .bind(&r.updated_at)
            .bind(&r.deleted_at)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            Some(expected) => sqlx::query(
                "UPDATE fhir_resources SET version = $1, body = $2, updated_at = $3, deleted_at = $4 \
                 WHERE resource_type = $5 AND id = $6 AND version = $7 AND patient_id = $8",
            )
            .bind(r.version)
            .bind(&r.body)
            .bind(&r.updated_at)
            .bind(&r.deleted_at)
            .bind(&r.resource_type)
            .bind(&r.id)
            .bind(expected)
            .bind(&r.patient_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
        if n != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        let body = r.deleted_at.is_none().then_some(r.body.as_str());
        sqlx::query(
            "INSERT INTO fhir_versions (resource_type, id, version, patient_id, body, at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&r.resource_type)
        .bind(&r.id)
        .bind(r.version)
        .bind(&r.patient_id)
        .bind(body)
        .bind(&r.updated_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// A write of one patient within [`apply`].
pub struct PatientWrite {
    pub row: patients::PatientRow,
    pub expected: Option<i64>,
    /// The sealed fields of this version, for vread.
    pub fields: Option<String>,
}
