//! The PHI rules: sealing and opening patients and records, search by blind index,
//! optimistic concurrency, soft delete, key rewrapping. No HTTP here.

use std::sync::Arc;

use super::model::{
    Checks, NewPatient, NewRecord, PatientFields, PatientPatch, RecordPatch, parse_date,
};
use super::search::{self, BOTH, Part, Query, Tags, TermTags};
use super::store::{self, PatientRow, RecordRow, SearchIndex, Source};
use crate::clock::{SharedClock, timestamp};
use crate::crypto::{self, SharedKeyring};
use crate::http::FieldError;
use crate::phi::envelope::{self, DataKey, EnvelopeError};
use crate::store::{Db, StoreError};
use zeroize::Zeroizing;

const PATIENTS: &str = "patients";
const RECORDS: &str = "records";
/// The purpose of the key that seals de-identified cursors (and ranked search pages).
const DEID_CURSOR: &str = "custodian/phi/deid-cursor/v1";
/// Most patients a search answers: a search is for finding a person, not for walking
/// the population. Beyond it the answer says so, and asks for more of the name or the
/// birth date.
pub const MAX_MATCHES: usize = 100;
/// Most candidates a search of several words reads (from the pair tag of its first two
/// words, or from a birth date) before checking each against its opened name.
pub const CANDIDATES: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PhiError {
    #[error("not found")]
    NotFound,
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    #[error("conflict: {0}")]
    Conflict(&'static str),
    #[error("the resource changed since it was read")]
    PreconditionFailed,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed value did not open: never answered with data, always a 500 and a
    /// security event.
    #[error("decryption failed: {0}")]
    Envelope(#[from] EnvelopeError),
}

/// One page of a ranked search.
#[derive(Debug, Default)]
pub struct Found {
    pub patients: Vec<Patient>,
    /// Where the next page starts (`None`: this is the last).
    pub next_offset: Option<usize>,
    /// More than [`MAX_MATCHES`] patients matched: only the best were ranked.
    pub truncated: bool,
    /// A name word had fewer than 3 letters, so it matched whole names only.
    pub short_terms: bool,
}

/// A patient in the clear (only in memory, only for the response).
#[derive(Debug)]
pub struct Patient {
    pub id: String,
    pub fields: PatientFields,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug)]
pub struct Record {
    pub id: String,
    pub patient_id: String,
    pub diagnosis: String,
    pub treatment: Option<String>,
    pub notes: Option<String>,
    pub recorded_at: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Sensitivity labels (codes of `privacy::SENSITIVE`).
    pub labels: Vec<String>,
}

/// Which blind index a FHIR patient search reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Identifier,
    BirthDate,
    Name,
    Given,
    Family,
}

/// A patient write checked and sealed, not yet applied (the FHIR transactions apply
/// several in one database transaction).
pub struct PreparedPatient {
    pub row: PatientRow,
    /// The version the stored row must still have (`None`: a new patient).
    pub expected: Option<i64>,
    /// This version's fields, sealed for `patient_versions`.
    pub sealed_fields: String,
    fields: PatientFields,
    assigned_mrn: bool,
    key: DataKey,
}

#[derive(Clone)]
pub struct Patients {
    db: Db,
    keys: Arc<SharedKeyring>,
    clock: SharedClock,
    min_version: u32,
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Patients {
    pub fn new(db: Db, keys: Arc<SharedKeyring>, clock: SharedClock, min_version: u32) -> Self {
        Self {
            db,
            keys,
            clock,
            min_version,
        }
    }

    fn now(&self) -> String {
        timestamp(self.clock.now())
    }

    fn today(&self) -> time::Date {
        self.clock.now().date()
    }

    fn bi(&self, column: &str, value: &str) -> Result<String, PhiError> {
        Ok(envelope::blind_index(&self.keys, column, value)?)
    }

    fn data_key(&self, row: &PatientRow) -> Result<DataKey, PhiError> {
        let wrapped = row.data_key.as_deref().ok_or(EnvelopeError::Shredded)?;
        Ok(envelope::unwrap(
            &self.keys,
            &row.id,
            wrapped,
            self.min_version,
        )?)
    }

    /// A stable pseudonym for the de-identified view: a keyed HMAC of the id, so it is
    /// derivable from neither the MRN nor the SSN, and not reversible without the keyring.
    pub fn pseudonym(&self, id: &str) -> String {
        match self.keys.derive(1, "custodian/phi/pseudonym/v1") {
            Ok(k) => format!(
                "anon-{}",
                crypto::hex(
                    crypto::hmac_sha256(&k, &[id.as_bytes()])
                        .get(..12)
                        .unwrap_or(&[])
                )
            ),
            Err(_) => "anon".into(),
        }
    }

    /// The cursor of a de-identified page: the id of its last row sealed (AES-256-GCM
    /// under a key of its own, bound to `scope`, what the page lists), so that neither the
    /// answer nor its cursor carries a real id. Only a page of the same scope opens it.
    pub fn deid_cursor(&self, scope: &str, id: &str) -> Result<String, PhiError> {
        crypto::seal(&self.keys, DEID_CURSOR, scope.as_bytes(), id.as_bytes())
            .map_err(|e| PhiError::Envelope(e.into()))
    }

    /// The id a [`Patients::deid_cursor`] of `scope` carries; `None` for anything else
    /// (a real id, another scope's cursor, a forged one).
    pub fn open_deid_cursor(&self, scope: &str, cursor: &str) -> Option<String> {
        let id = crypto::open(&self.keys, DEID_CURSOR, scope.as_bytes(), cursor).ok()?;
        String::from_utf8(id.to_vec()).ok()
    }

    fn seal_row(&self, id: &str, key: &DataKey, f: &PatientFields) -> Result<PatientRow, PhiError> {
        let seal = |column: &str, v: &str| envelope::seal_field(key, PATIENTS, column, id, v);
        let opt =
            |column: &str, v: &Option<String>| v.as_deref().map(|x| seal(column, x)).transpose();
        Ok(PatientRow {
            id: id.to_owned(),
            data_key: None,
            kek_version: 0,
            mrn: seal("mrn", &f.mrn)?,
            given_name: seal("given_name", &f.given_name)?,
            family_name: seal("family_name", &f.family_name)?,
            birth_date: seal("birth_date", &f.birth_date)?,
            sex: f.sex.clone(),
            ssn: opt("ssn", &f.ssn)?,
            email: opt("email", &f.email)?,
            phone: opt("phone", &f.phone)?,
            address: opt("address", &f.address)?,
            bi_mrn: self.bi("mrn", &f.mrn)?,
            bi_ssn: f
                .ssn
                .as_deref()
                .map(|s| self.bi("ssn", &s.replace('-', "")))
                .transpose()?,
            bi_birth_date: Some(self.bi("birth_date", &f.birth_date)?),
            // Superseded by the name search tags (`terms`).
            bi_given_name: None,
            bi_family_name: None,
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
            deleted_at: None,
            terms: Tags::new(&self.keys).of_name(&f.given_name, &f.family_name)?,
        })
    }

    fn open_row(&self, row: &PatientRow) -> Result<Patient, PhiError> {
        let key = self.data_key(row)?;
        let open = |column: &str, v: &str| {
            envelope::open_field(&key, PATIENTS, column, &row.id, v).map(|s| s.to_string())
        };
        let opt =
            |column: &str, v: &Option<String>| v.as_deref().map(|x| open(column, x)).transpose();
        Ok(Patient {
            id: row.id.clone(),
            fields: PatientFields {
                mrn: open("mrn", &row.mrn)?,
                given_name: open("given_name", &row.given_name)?,
                family_name: open("family_name", &row.family_name)?,
                birth_date: open("birth_date", &row.birth_date)?,
                sex: row.sex.clone(),
                ssn: opt("ssn", &row.ssn)?,
                email: opt("email", &row.email)?,
                phone: opt("phone", &row.phone)?,
                address: opt("address", &row.address)?,
            },
            version: row.version,
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
        })
    }

    fn new_mrn() -> Result<String, PhiError> {
        let b = crypto::random_bytes::<8>().map_err(|e| PhiError::Envelope(e.into()))?;
        // 12 digits: collisions stay rare in any realistic population, and an assigned
        // MRN that is taken is drawn again (see `create`).
        let n = u64::from_be_bytes(b) % 1_000_000_000_000;
        Ok(format!("MRN-{n:012}"))
    }

    /// A version of a patient's fields, sealed for `patient_versions` (FHIR vread).
    fn seal_version(
        &self,
        key: &DataKey,
        id: &str,
        version: i64,
        f: &PatientFields,
    ) -> Result<String, PhiError> {
        let json = Zeroizing::new(serde_json::to_string(f).unwrap_or_default());
        Ok(envelope::seal_field(
            key,
            "patient_versions",
            "fields",
            &format!("{id}/{version}"),
            &json,
        )?)
    }

    /// Checks and seals a new patient (id `id`, or a new one), without writing it.
    pub fn prepare_create(
        &self,
        id: Option<&str>,
        input: NewPatient,
    ) -> Result<PreparedPatient, PhiError> {
        let mut c = Checks::default();
        let today = self.today();
        let mut f = PatientFields {
            given_name: c.name("given_name", &input.given_name),
            family_name: c.name("family_name", &input.family_name),
            birth_date: c.birth_date(&input.birth_date, today),
            sex: input.sex.as_deref().map(|s| c.sex(s)),
            ssn: input.ssn.as_deref().map(|s| c.ssn(s)),
            email: input.email.as_deref().map(|s| c.email(s)),
            phone: input.phone.as_deref().map(|s| c.phone(s)),
            address: input.address.as_deref().map(|s| c.address(s)),
            mrn: String::new(),
        };
        let assigned = input.mrn.is_none();
        f.mrn = match input.mrn.as_deref() {
            Some(m) => c.mrn(m),
            None => Self::new_mrn()?,
        };
        c.done().map_err(PhiError::Invalid)?;
        let id = id.map_or_else(new_id, str::to_owned);
        let key = DataKey::generate().map_err(|e| PhiError::Envelope(e.into()))?;
        let (wrapped, version) = envelope::wrap(&self.keys, &id, &key)?;
        let mut row = self.seal_row(&id, &key, &f)?;
        row.data_key = Some(wrapped);
        row.kek_version = i64::from(version);
        let now = self.now();
        row.created_at.clone_from(&now);
        row.updated_at = now;
        let sealed = self.seal_version(&key, &id, 1, &f)?;
        Ok(PreparedPatient {
            row,
            expected: None,
            sealed_fields: sealed,
            fields: f,
            assigned_mrn: assigned,
            key,
        })
    }

    pub async fn create(&self, input: NewPatient) -> Result<Patient, PhiError> {
        self.create_as(None, input).await
    }

    /// Creates a patient with the id `id` (FHIR update-as-create) or a new one.
    pub async fn create_as(
        &self,
        id: Option<&str>,
        input: NewPatient,
    ) -> Result<Patient, PhiError> {
        let mut p = self.prepare_create(id, input)?;
        let mut tries = 0;
        while !store::write_patient(&self.db, &p.row, None, &p.sealed_fields).await? {
            if id.is_some() && store::patient_exists(&self.db, &p.row.id).await?.is_some() {
                return Err(PhiError::Conflict("a patient with this id exists"));
            }
            tries += 1;
            if !p.assigned_mrn || tries > 5 {
                return Err(PhiError::Conflict("a patient with this MRN exists"));
            }
            // The MRN we drew is taken: draw another.
            p.fields.mrn = Self::new_mrn()?;
            let id = p.row.id.clone();
            p.row.mrn = envelope::seal_field(&p.key, PATIENTS, "mrn", &id, &p.fields.mrn)?;
            p.row.bi_mrn = self.bi("mrn", &p.fields.mrn)?;
            p.sealed_fields = self.seal_version(&p.key, &id, 1, &p.fields)?;
        }
        self.open_row(&p.row)
    }

    pub async fn get(&self, id: &str) -> Result<Patient, PhiError> {
        let row = store::patient_by_id(&self.db, id)
            .await?
            .ok_or(PhiError::NotFound)?;
        self.open_row(&row)
    }

    /// A patient's fields as of `version` (kept since FHIR came; older versions are not).
    pub async fn version(
        &self,
        id: &str,
        version: i64,
    ) -> Result<Option<(Option<PatientFields>, String)>, PhiError> {
        let Some(row) = store::patient_row_any(&self.db, id).await? else {
            return Ok(None);
        };
        let Some((sealed, at)) = store::patient_version(&self.db, id, version).await? else {
            return Ok(None);
        };
        let Some(sealed) = sealed else {
            return Ok(Some((None, at)));
        };
        let key = self.data_key(&row)?;
        let json = envelope::open_field(
            &key,
            "patient_versions",
            "fields",
            &format!("{id}/{version}"),
            &sealed,
        )?;
        let f: PatientFields = serde_json::from_str(&json)
            .map_err(|_| PhiError::Envelope(crypto::CryptoError::Malformed.into()))?;
        Ok(Some((Some(f), at)))
    }

    /// Checks and seals a change of a patient, without writing it.
    pub async fn prepare_update(
        &self,
        id: &str,
        patch: PatientPatch,
        if_match: Option<i64>,
    ) -> Result<PreparedPatient, PhiError> {
        let row = store::patient_by_id(&self.db, id)
            .await?
            .ok_or(PhiError::NotFound)?;
        if if_match.is_some_and(|v| v != row.version) {
            return Err(PhiError::PreconditionFailed);
        }
        let mut current = self.open_row(&row)?;
        let mut c = Checks::default();
        let today = self.today();
        let f = &mut current.fields;
        if let Some(v) = &patch.given_name {
            f.given_name = c.name("given_name", v);
        }
        if let Some(v) = &patch.family_name {
            f.family_name = c.name("family_name", v);
        }
        if let Some(v) = &patch.birth_date {
            f.birth_date = c.birth_date(v, today);
        }
        if let Some(v) = &patch.mrn {
            f.mrn = c.mrn(v);
        }
        if let Some(v) = &patch.sex {
            f.sex = v.as_deref().map(|s| c.sex(s));
        }
        if let Some(v) = &patch.ssn {
            f.ssn = v.as_deref().map(|s| c.ssn(s));
        }
        if let Some(v) = &patch.email {
            f.email = v.as_deref().map(|s| c.email(s));
        }
        if let Some(v) = &patch.phone {
            f.phone = v.as_deref().map(|s| c.phone(s));
        }
        if let Some(v) = &patch.address {
            f.address = v.as_deref().map(|s| c.address(s));
        }
        c.done().map_err(PhiError::Invalid)?;
        let key = self.data_key(&row)?;
        let mut new = self.seal_row(id, &key, &current.fields)?;
        if store::mrn_taken(&self.db, &new.bi_mrn, id).await? {
            return Err(PhiError::Conflict("a patient with this MRN exists"));
        }
        new.version = row.version + 1;
        new.created_at.clone_from(&row.created_at);
        new.updated_at = self.now();
        new.data_key.clone_from(&row.data_key);
        new.kek_version = row.kek_version;
        let sealed = self.seal_version(&key, id, new.version, &current.fields)?;
        Ok(PreparedPatient {
            row: new,
            expected: Some(row.version),
            sealed_fields: sealed,
            fields: current.fields,
            assigned_mrn: false,
            key,
        })
    }

    pub async fn update(
        &self,
        id: &str,
        patch: PatientPatch,
        if_match: Option<i64>,
    ) -> Result<Patient, PhiError> {
        let p = self.prepare_update(id, patch, if_match).await?;
        if !store::write_patient(&self.db, &p.row, p.expected, &p.sealed_fields).await? {
            return Err(PhiError::PreconditionFailed);
        }
        self.get(id).await
    }

    /// The data key of a prepared patient (to seal the resources written with it).
    pub fn prepared_key<'a>(&self, p: &'a PreparedPatient) -> &'a DataKey {
        &p.key
    }

    /// Opens a prepared patient (what it will read as once written).
    pub fn open_prepared(&self, p: &PreparedPatient) -> Result<Patient, PhiError> {
        self.open_row(&p.row)
    }

    pub async fn delete(&self, id: &str) -> Result<(), PhiError> {
        if store::soft_delete_patient(&self.db, id, &self.now()).await? {
            Ok(())
        } else {
            Err(PhiError::NotFound)
        }
    }

    /// Every live patient, a page at a time in id order (after `after`).
    pub async fn list(&self, after: &str, limit: i64) -> Result<Vec<Patient>, PhiError> {
        let rows = store::search(&self.db, None, after, limit).await?;
        rows.iter().map(|r| self.open_row(r)).collect()
    }

    /// The given and family names of a candidate, and nothing else opened.
    fn open_names(&self, row: &store::NameRow) -> Result<(String, String), PhiError> {
        self.open_name_fields(
            &row.id,
            row.data_key.as_deref(),
            &row.given_name,
            &row.family_name,
        )
    }

    fn open_name_fields(
        &self,
        id: &str,
        data_key: Option<&str>,
        given: &str,
        family: &str,
    ) -> Result<(String, String), PhiError> {
        let wrapped = data_key.ok_or(EnvelopeError::Shredded)?;
        let key = envelope::unwrap(&self.keys, id, wrapped, self.min_version)?;
        let open = |column: &str, v: &str| {
            envelope::open_field(&key, PATIENTS, column, id, v).map(|s| s.to_string())
        };
        Ok((open("given_name", given)?, open("family_name", family)?))
    }

    /// A search box's text, answered a page at a time, by relevance then name: an MRN
    /// (or, with `by_ssn`, an SSN) given whole first; then patients matching every name
    /// word and the birth date — 2 points a word that is a word of the name, 1 a word
    /// that begins one, 2 the birth date.
    ///
    /// At most [`MAX_MATCHES`] patients are paged through. When more match, the answer is
    /// one page, `truncated`: a search is for finding a person, and paging through an
    /// arbitrary hundred of thousands helps nobody — it asks for more of the name.
    ///
    /// Read from keyed tags and blind indexes only. One name word: its tags give the
    /// ids, whole-word matches before prefix matches, a page at most from each index;
    /// only the names that are ranked are opened. Several words: the pair tag of the
    /// first two (the patients having both), or a birth date's index with one word, at
    /// most [`CANDIDATES`], whose names are opened to check every word. The patients of
    /// the page alone are opened whole. De-identified (`anonymize`), ties are ordered
    /// by pseudonym, so the order tells nothing of the names.
    pub async fn find(
        &self,
        text: &str,
        by_ssn: bool,
        anonymize: bool,
        offset: usize,
        limit: usize,
    ) -> Result<Found, PhiError> {
        let q = Query::parse(text, self.today());
        let mut found = Found {
            short_terms: q.short_terms,
            ..Found::default()
        };
        if q.whole.is_empty() {
            return Ok(found);
        }
        let cap = i64::try_from(MAX_MATCHES + 1).unwrap_or(101);
        // Identifiers given whole: an MRN (the value, or a word with digits), an SSN.
        let mut mrns = vec![self.bi("mrn", &q.whole.to_ascii_uppercase())?];
        for w in &q.identifiers {
            mrns.push(self.bi("mrn", w)?);
        }
        let ssn = if by_ssn && super::model::valid_ssn(&q.whole) {
            Some(self.bi("ssn", &q.whole.replace('-', ""))?)
        } else {
            None
        };
        let mrn_refs: Vec<&str> = mrns.iter().map(String::as_str).collect();
        // (id, score) of every match found.
        let mut scored: Vec<(String, i64)> =
            store::ids_by_identifier(&self.db, &mrn_refs, ssn.as_deref())
                .await?
                .into_iter()
                .map(|id| (id, 100))
                .collect();
        // The names opened so far, by id.
        let mut opened: std::collections::HashMap<String, (String, String)> =
            std::collections::HashMap::new();
        let birth = match q.birth_date {
            Some(d) => Some(self.bi("birth_date", &super::model::format_date(d))?),
            None => None,
        };
        let tags = Tags::new(&self.keys);
        match (q.names.as_slice(), birth.as_deref()) {
            ([], None) => {}
            ([], Some(b)) => {
                for row in store::candidates(&self.db, Source::BirthDate(b), cap).await? {
                    scored.push((row.id.clone(), 2));
                    let names = self.open_names(&row)?;
                    opened.insert(row.id, names);
                }
            }
            ([one], None) => {
                // One word: whole-word matches first, then prefix matches; ids only.
                let t = tags.of_term(&one.text, one.parts)?;
                let exact: Vec<&str> = t.exact.iter().map(String::as_str).collect();
                let whole = store::ids_under_tags(&self.db, &exact, cap).await?;
                let n = whole.len();
                scored.extend(whole.into_iter().map(|id| (id, 2)));
                if n < MAX_MATCHES + 1 {
                    let prefix: Vec<&str> = t.prefix.iter().map(String::as_str).collect();
                    let begun = store::ids_under_tags(&self.db, &prefix, cap).await?;
                    scored.extend(begun.into_iter().map(|id| (id, 1)));
                }
            }
            (names, birth) => {
                let limit = i64::try_from(CANDIDATES).unwrap_or(1000);
                let pair = match names {
                    [a, b, ..] => tags.of_pair(&a.text, &b.text)?,
                    _ => None,
                };
                let first = match names.first() {
                    Some(f) => Some(tags.of_term(&f.text, f.parts)?),
                    None => None,
                };
                let first_tags: Vec<&str> = first.as_ref().map(|t| t.all()).unwrap_or_default();
                let pair_tag: Vec<&str> = pair.iter().map(String::as_str).collect();
                // The most selective driver at hand: a birth date with one word, else
                // the pair of the first two words, else the date, else the first word.
                let source = match (pair_tag.is_empty(), birth) {
                    (_, Some(b)) if names.len() == 1 => Source::BirthDate(b),
                    (false, _) => Source::Tags(&pair_tag),
                    (true, Some(b)) => Source::BirthDate(b),
                    (true, None) => Source::Tags(&first_tags),
                };
                let rows = store::candidates(&self.db, source, limit).await?;
                if rows.len() >= CANDIDATES {
                    // More candidates than read: some matches may be missing.
                    found.truncated = true;
                }
                for row in rows {
                    if birth.is_some() && row.bi_birth_date.as_deref() != birth {
                        continue;
                    }
                    let (given, family) = self.open_names(&row)?;
                    let Some(s) = search::score(&q.names, &given, &family) else {
                        continue;
                    };
                    scored.push((row.id.clone(), s + if birth.is_some() { 2 } else { 0 }));
                    opened.insert(row.id, (given, family));
                }
            }
        }
        // Each patient once, at its best score; best first, then by id.
        scored.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut seen = std::collections::HashSet::new();
        scored.retain(|(id, _)| seen.insert(id.clone()));
        if scored.len() > MAX_MATCHES {
            found.truncated = true;
        }
        // What is ranked by name: every match, or — one page only when there are too
        // many — those already opened and the best not opened, up to a page.
        let ranked: Vec<(String, i64)> = if found.truncated {
            let mut extra = 0;
            scored
                .into_iter()
                .filter(|(id, _)| {
                    opened.contains_key(id) || {
                        extra += 1;
                        extra <= limit
                    }
                })
                .collect()
        } else {
            scored
        };
        let missing: Vec<String> = ranked
            .iter()
            .filter(|(id, _)| !opened.contains_key(id))
            .map(|(id, _)| id.clone())
            .collect();
        // Patients opened whole, by id: when no more are to be ranked than a page holds
        // (a truncated answer, a few matches), they are read whole at once, ranked by
        // the names they hold, and answered without a second read.
        let mut whole: std::collections::HashMap<String, Patient> =
            std::collections::HashMap::new();
        if missing.len() <= limit {
            for row in store::patients_by_ids(&self.db, &missing).await? {
                let p = self.open_row(&row)?;
                let names = (p.fields.given_name.clone(), p.fields.family_name.clone());
                opened.insert(p.id.clone(), names);
                whole.insert(p.id.clone(), p);
            }
        } else {
            for row in store::name_rows(&self.db, &missing).await? {
                let names = self.open_names(&row)?;
                opened.insert(row.id, names);
            }
        }
        // A word longer than its prefix tag is checked against the name itself.
        let words: Vec<String> = q.names.iter().map(|n| n.text.clone()).collect();
        let loose = q
            .names
            .iter()
            .any(|n| n.text.chars().count() > search::MAX_PREFIX);
        let mut keyed: Vec<(i64, String, String, String)> = Vec::new();
        for (id, s) in ranked {
            let Some((given, family)) = opened.remove(&id) else {
                continue;
            };
            if loose && s < 100 && !search::name_matches(&words, &given, &family, BOTH) {
                continue;
            }
            keyed.push(if anonymize {
                (-s, self.pseudonym(&id), String::new(), id)
            } else {
                (-s, search::fold(&family), search::fold(&given), id)
            });
        }
        keyed.sort();
        let (start, end) = if found.truncated {
            (0, limit.min(keyed.len()))
        } else {
            let end = offset.saturating_add(limit).min(keyed.len());
            if end < keyed.len() {
                found.next_offset = Some(end);
            }
            (offset.min(end), end)
        };
        // The page alone, opened whole, in its order.
        let page: Vec<String> = keyed
            .get(start..end)
            .unwrap_or(&[])
            .iter()
            .map(|k| k.3.clone())
            .collect();
        let unread: Vec<String> = page
            .iter()
            .filter(|id| !whole.contains_key(*id))
            .cloned()
            .collect();
        for row in store::patients_by_ids(&self.db, &unread).await? {
            let p = self.open_row(&row)?;
            whole.insert(p.id.clone(), p);
        }
        found.patients = page.iter().filter_map(|id| whole.remove(id)).collect();
        Ok(found)
    }

    /// The tags a FHIR name probe reads: each word of `value`, in the parts the
    /// parameter names. `None` for a probe that is not a name.
    fn name_probe(&self, probe: Probe, value: &str) -> Result<Option<Vec<TermTags>>, PhiError> {
        let parts: &[Part] = match probe {
            Probe::Name => BOTH,
            Probe::Given => &[Part::Given],
            Probe::Family => &[Part::Family],
            Probe::Identifier | Probe::BirthDate => return Ok(None),
        };
        let tags = Tags::new(&self.keys);
        Ok(Some(
            search::tokens(value)
                .iter()
                .map(|t| tags.of_term(t, parts))
                .collect::<Result<_, _>>()?,
        ))
    }

    /// The blind indexes a FHIR identifier or birth-date probe reads (the others match
    /// nothing).
    fn probe_index(
        &self,
        probe: Probe,
        value: &str,
        by_ssn: bool,
    ) -> Result<SearchIndex, PhiError> {
        let none = || "-".to_owned();
        Ok(SearchIndex {
            mrn: match probe {
                Probe::Identifier => self.bi("mrn", &value.trim().to_ascii_uppercase())?,
                _ => none(),
            },
            ssn: match probe {
                Probe::Identifier if by_ssn && super::model::valid_ssn(value.trim()) => {
                    self.bi("ssn", &value.trim().replace('-', ""))?
                }
                _ => none(),
            },
            birth_date: match probe {
                Probe::BirthDate if parse_date(value.trim()).is_some() => {
                    self.bi("birth_date", value.trim())?
                }
                _ => none(),
            },
        })
    }

    /// Whether a name probe can be answered a page at a time straight from the tags:
    /// one word, short enough to have a tag of its own.
    pub fn pages_from_tags(&self, probe: Probe, value: &str) -> bool {
        let words = search::tokens(value);
        matches!(probe, Probe::Name | Probe::Given | Probe::Family)
            && words.len() == 1
            && words
                .iter()
                .all(|w| w.chars().count() <= search::MAX_PREFIX)
    }

    /// One page (by id, after `after`) of the live patients matching one probe, and how
    /// many there are in all: a search with that one criterion, no patient opened but the
    /// page's. For a name, only a probe [`Patients::pages_from_tags`] accepts.
    pub async fn search_index_page(
        &self,
        probe: Probe,
        value: &str,
        after: &str,
        limit: i64,
    ) -> Result<(i64, Vec<Patient>), PhiError> {
        let (total, rows) = match self.name_probe(probe, value)? {
            Some(terms) => {
                let [term] = terms.as_slice() else {
                    return Ok((0, Vec::new()));
                };
                let tags = term.all();
                let total = store::count_with_any_tag(&self.db, &tags).await?;
                let ids = store::ids_with_any_tag(&self.db, &tags, after, limit).await?;
                (total, store::patients_by_ids(&self.db, &ids).await?)
            }
            None => {
                let ix = self.probe_index(probe, value, false)?;
                let total = store::count_index(&self.db, &ix).await?;
                (
                    total,
                    store::search(&self.db, Some(&ix), after, limit).await?,
                )
            }
        };
        Ok((
            total,
            rows.iter()
                .map(|r| self.open_row(r))
                .collect::<Result<_, _>>()?,
        ))
    }

    /// Every live patient matching one probe, in id order: the candidates of a FHIR
    /// search, filtered by the caller. A name probe reads the tags of its first word (the
    /// caller checks every word against the opened names).
    pub async fn search_index(
        &self,
        probe: Probe,
        value: &str,
        by_ssn: bool,
    ) -> Result<Vec<Patient>, PhiError> {
        let mut out: Vec<Patient> = Vec::new();
        let mut after = String::new();
        let name = self.name_probe(probe, value)?;
        loop {
            let rows = match &name {
                Some(terms) => {
                    let Some(first) = terms.first() else {
                        return Ok(out);
                    };
                    let ids = store::ids_with_any_tag(&self.db, &first.all(), &after, 1000).await?;
                    store::patients_by_ids(&self.db, &ids).await?
                }
                None => {
                    let ix = self.probe_index(probe, value, by_ssn)?;
                    store::search(&self.db, Some(&ix), &after, 1000).await?
                }
            };
            let full = rows.len() == 1000;
            for r in &rows {
                out.push(self.open_row(r)?);
            }
            match rows.last() {
                Some(last) if full => after.clone_from(&last.id),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Builds the name search tags of patients written before they existed (at start,
    /// after migrating). Idempotent; a patient changed meanwhile keeps what its own
    /// write made. Returns how many were indexed.
    pub async fn build_name_terms(&self) -> Result<u64, PhiError> {
        let tags = Tags::new(&self.keys);
        let mut done = 0u64;
        loop {
            let rows = store::patients_without_terms(&self.db, 500).await?;
            if rows.is_empty() {
                return Ok(done);
            }
            let mut progressed = false;
            for row in &rows {
                let (given, family) = self.open_name_fields(
                    &row.id,
                    row.data_key.as_deref(),
                    &row.given_name,
                    &row.family_name,
                )?;
                let terms = tags.of_name(&given, &family)?;
                if store::write_terms(&self.db, &row.id, row.version, &terms).await? {
                    done += 1;
                    progressed = true;
                }
            }
            if !progressed {
                // Every row changed under us: their writers made their tags.
                return Ok(done);
            }
        }
    }

    // ---- records ---------------------------------------------------------------------

    fn record_fields(
        &self,
        c: &mut Checks,
        diagnosis: &str,
        treatment: Option<&str>,
        notes: Option<&str>,
    ) -> (String, Option<String>, Option<String>) {
        (
            c.text("diagnosis", diagnosis, 2000),
            treatment.map(|t| c.text("treatment", t, 2000)),
            notes.map(|n| c.text("notes", n, 10_000)),
        )
    }

    fn recorded_at(&self, c: &mut Checks, v: Option<&str>) -> String {
        match v {
            None => self.now(),
            Some(s) => crate::clock::parse_rfc3339(s).unwrap_or_else(|| {
                c.0.push(FieldError::new("recorded_at", "must be an RFC 3339 time"));
                String::new()
            }),
        }
    }

    fn seal_record(&self, key: &DataKey, r: &Record) -> Result<RecordRow, PhiError> {
        let seal = |column: &str, v: &str| envelope::seal_field(key, RECORDS, column, &r.id, v);
        Ok(RecordRow {
            id: r.id.clone(),
            patient_id: r.patient_id.clone(),
            diagnosis: seal("diagnosis", &r.diagnosis)?,
            treatment: r
                .treatment
                .as_deref()
                .map(|t| seal("treatment", t))
                .transpose()?,
            notes: r.notes.as_deref().map(|n| seal("notes", n)).transpose()?,
            recorded_at: r.recorded_at.clone(),
            version: r.version,
            created_at: r.created_at.clone(),
            updated_at: r.updated_at.clone(),
            labels: if r.labels.is_empty() {
                None
            } else {
                Some(seal("labels", &r.labels.join(","))?)
            },
        })
    }

    fn open_record(&self, key: &DataKey, r: &RecordRow) -> Result<Record, PhiError> {
        let open = |column: &str, v: &str| {
            envelope::open_field(key, RECORDS, column, &r.id, v).map(|s| s.to_string())
        };
        Ok(Record {
            id: r.id.clone(),
            patient_id: r.patient_id.clone(),
            diagnosis: open("diagnosis", &r.diagnosis)?,
            treatment: r
                .treatment
                .as_deref()
                .map(|t| open("treatment", t))
                .transpose()?,
            notes: r.notes.as_deref().map(|n| open("notes", n)).transpose()?,
            recorded_at: r.recorded_at.clone(),
            version: r.version,
            created_at: r.created_at.clone(),
            updated_at: r.updated_at.clone(),
            labels: match r.labels.as_deref() {
                None => Vec::new(),
                Some(l) => open("labels", l)?
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
            },
        })
    }

    /// A patient's data key from its wrapped form, read by a query of another module
    /// that joined the patient row (one round trip instead of two).
    pub fn unwrap_key(&self, patient_id: &str, wrapped: Option<&str>) -> Result<DataKey, PhiError> {
        let wrapped = wrapped.ok_or(EnvelopeError::Shredded)?;
        Ok(envelope::unwrap(
            &self.keys,
            patient_id,
            wrapped,
            self.min_version,
        )?)
    }

    pub async fn patient_key(&self, patient_id: &str) -> Result<DataKey, PhiError> {
        let row = store::patient_by_id(&self.db, patient_id)
            .await?
            .ok_or(PhiError::NotFound)?;
        self.data_key(&row)
    }

    pub async fn add_record(&self, patient_id: &str, input: NewRecord) -> Result<Record, PhiError> {
        let key = self.patient_key(patient_id).await?;
        let mut c = Checks::default();
        let (diagnosis, treatment, notes) = self.record_fields(
            &mut c,
            &input.diagnosis,
            input.treatment.as_deref(),
            input.notes.as_deref(),
        );
        let recorded_at = self.recorded_at(&mut c, input.recorded_at.as_deref());
        let labels = labels(&mut c, input.labels.as_deref());
        c.done().map_err(PhiError::Invalid)?;
        let now = self.now();
        let r = Record {
            labels,
            id: new_id(),
            patient_id: patient_id.to_owned(),
            diagnosis,
            treatment,
            notes,
            recorded_at,
            version: 1,
            created_at: now.clone(),
            updated_at: now,
        };
        store::insert_record(&self.db, &self.seal_record(&key, &r)?).await?;
        Ok(r)
    }

    pub async fn record(&self, id: &str) -> Result<Record, PhiError> {
        let row = store::record_by_id(&self.db, id)
            .await?
            .ok_or(PhiError::NotFound)?;
        let key = self.patient_key(&row.patient_id).await?;
        self.open_record(&key, &row)
    }

    /// The patient a record belongs to (to name it in the audit trail before opening it).
    pub async fn record_patient(&self, id: &str) -> Result<String, PhiError> {
        Ok(store::record_by_id(&self.db, id)
            .await?
            .ok_or(PhiError::NotFound)?
            .patient_id)
    }

    pub async fn records(
        &self,
        patient_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Record>, PhiError> {
        let key = self.patient_key(patient_id).await?;
        let rows = store::records_of(&self.db, patient_id, after, limit).await?;
        rows.iter().map(|r| self.open_record(&key, r)).collect()
    }

    pub async fn update_record(
        &self,
        id: &str,
        patch: RecordPatch,
        if_match: Option<i64>,
    ) -> Result<Record, PhiError> {
        let row = store::record_by_id(&self.db, id)
            .await?
            .ok_or(PhiError::NotFound)?;
        if if_match.is_some_and(|v| v != row.version) {
            return Err(PhiError::PreconditionFailed);
        }
        let key = self.patient_key(&row.patient_id).await?;
        let mut r = self.open_record(&key, &row)?;
        let mut c = Checks::default();
        if let Some(d) = &patch.diagnosis {
            r.diagnosis = c.text("diagnosis", d, 2000);
        }
        if let Some(t) = &patch.treatment {
            r.treatment = t.as_deref().map(|t| c.text("treatment", t, 2000));
        }
        if let Some(n) = &patch.notes {
            r.notes = n.as_deref().map(|n| c.text("notes", n, 10_000));
        }
        if let Some(at) = &patch.recorded_at {
            r.recorded_at = self.recorded_at(&mut c, Some(at));
        }
        if patch.labels.is_some() {
            r.labels = labels(&mut c, patch.labels.as_deref());
        }
        c.done().map_err(PhiError::Invalid)?;
        r.version = row.version + 1;
        r.updated_at = self.now();
        if !store::update_record(&self.db, &self.seal_record(&key, &r)?, row.version).await? {
            return Err(PhiError::PreconditionFailed);
        }
        Ok(r)
    }

    pub async fn delete_record(&self, id: &str) -> Result<(), PhiError> {
        if store::soft_delete_record(&self.db, id, &self.now()).await? {
            Ok(())
        } else {
            Err(PhiError::NotFound)
        }
    }

    /// Re-wraps every data key under the newest key version, `batch` at a time, while
    /// the server runs (each row is swapped only if unchanged). Returns how many.
    pub async fn rewrap_all(&self, batch: i64) -> Result<u64, PhiError> {
        self.keys
            .reload()
            .map_err(|e| PhiError::Envelope(crypto::CryptoError::from(e).into()))?;
        let current = i64::from(self.keys.current_version());
        let mut done = 0;
        loop {
            let stale = store::stale_keys(&self.db, current, batch).await?;
            if stale.is_empty() {
                break;
            }
            for (id, wrapped) in stale {
                let key = envelope::unwrap(&self.keys, &id, &wrapped, 0)?;
                let (new, version) = envelope::wrap(&self.keys, &id, &key)?;
                if store::rewrap(&self.db, &id, &wrapped, &new, i64::from(version)).await? {
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Crypto-shredding: destroys the data keys of patients deleted before `before`
    /// (RFC 3339). Returns their ids (for the audit trail).
    pub async fn shred_deleted_before(&self, before: &str) -> Result<Vec<String>, PhiError> {
        let before = crate::clock::parse_rfc3339(before).ok_or_else(|| {
            PhiError::Invalid(vec![FieldError::new(
                "deleted_before",
                "must be an RFC 3339 time",
            )])
        })?;
        Ok(store::shred(&self.db, &before, &self.now()).await?)
    }

    /// How many live patients there are (the `total` of an unfiltered FHIR list).
    pub async fn count(&self) -> Result<i64, PhiError> {
        Ok(store::count_live(&self.db).await?)
    }

    pub async fn key_versions(&self) -> Result<Vec<(i64, i64)>, PhiError> {
        Ok(store::count_by_version(&self.db).await?)
    }
}

/// Sensitivity labels as given (none when absent); unknown codes are a field error.
fn labels(c: &mut Checks, raw: Option<&[String]>) -> Vec<String> {
    match raw.map(crate::privacy::parse_labels) {
        None => Vec::new(),
        Some(Ok(l)) => l,
        Some(Err(m)) => {
            c.0.push(FieldError::new("labels", m));
            Vec::new()
        }
    }
}
