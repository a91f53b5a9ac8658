//! Envelope encryption of patient data, and blind indexes for searching it.
//!
//! - Each patient has a **data key** (256 random bits). It is stored only wrapped:
//!   sealed with AES-256-GCM under a key-encryption key derived from the keyring's
//!   current version, bound to the patient id (`v<version>.…`). Rotating the keyring
//!   adds a version; `custodian keys rewrap` re-wraps every data key under the newest
//!   one; `keys.min_decryption_version` retires older versions.
//! - Each field is sealed with the patient's data key, with a fresh nonce, bound to the
//!   table, column and row id: a ciphertext copied to another row or column does not
//!   open. Format: `f1.<base64url(nonce | ciphertext | tag)>` (the `f1` header names the
//!   format, so it can change later).
//! - A **blind index** is HMAC-SHA256 of a normalised value under a key of its own per
//!   column (derived from key version 1, so it survives rotations), truncated to 128 bits.
//!   Equal values give equal indexes: an index reveals which rows share a value (and how
//!   many), never the value itself; it is only as strong as the value is unguessable
//!   (a birth date alone has few values — it is only ever matched, never listed).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, SharedKeyring};

const KEK_PURPOSE: &str = "custodian/phi/kek/v1";

/// A patient's data key; wiped on drop, never printed. It is made ready for AES-GCM
/// once, when generated or unwrapped, and every field of the row is sealed or opened
/// with that one prepared key.
pub struct DataKey {
    raw: Zeroizing<[u8; 32]>,
    aead: crypto::AeadKey,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

impl DataKey {
    pub fn generate() -> Result<Self, CryptoError> {
        Self::from_raw(Zeroizing::new(crypto::random_bytes::<32>()?))
    }

    fn from_raw(raw: Zeroizing<[u8; 32]>) -> Result<Self, CryptoError> {
        let aead = crypto::AeadKey::new(&raw)?;
        Ok(Self { raw, aead })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(
        "the data key is wrapped with key version {0}, which is retired (keys.min_decryption_version)"
    )]
    Retired(u32),
    #[error("the patient's data key was destroyed")]
    Shredded,
}

fn wrap_aad(patient_id: &str) -> Vec<u8> {
    format!("custodian-dek|{patient_id}").into_bytes()
}

/// Wraps a data key under the newest key version. Returns the wrapped text and version.
pub fn wrap(
    keys: &SharedKeyring,
    patient_id: &str,
    key: &DataKey,
) -> Result<(String, u32), EnvelopeError> {
    let wrapped = crypto::seal(keys, KEK_PURPOSE, &wrap_aad(patient_id), key.raw.as_ref())?;
    let version = crypto::sealed_version(&wrapped).unwrap_or(0);
    Ok((wrapped, version))
}

/// Unwraps a data key; versions below `min_version` are refused.
pub fn unwrap(
    keys: &SharedKeyring,
    patient_id: &str,
    wrapped: &str,
    min_version: u32,
) -> Result<DataKey, EnvelopeError> {
    let version = crypto::sealed_version(wrapped).ok_or(CryptoError::Malformed)?;
    if version < min_version {
        return Err(EnvelopeError::Retired(version));
    }
    let raw = crypto::open(keys, KEK_PURPOSE, &wrap_aad(patient_id), wrapped)?;
    let arr: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| CryptoError::Malformed)?;
    Ok(DataKey::from_raw(Zeroizing::new(arr))?)
}

fn field_aad(table: &str, column: &str, row_id: &str) -> Vec<u8> {
    format!("custodian-field-v1|{table}|{column}|{row_id}").into_bytes()
}

/// Seals one field value.
pub fn seal_field(
    key: &DataKey,
    table: &str,
    column: &str,
    row_id: &str,
    value: &str,
) -> Result<String, EnvelopeError> {
    let out = key
        .aead
        .seal(&field_aad(table, column, row_id), value.as_bytes())?;
    Ok(format!("f1.{}", URL_SAFE_NO_PAD.encode(out)))
}

/// Opens one field value sealed for exactly this table, column and row.
pub fn open_field(
    key: &DataKey,
    table: &str,
    column: &str,
    row_id: &str,
    sealed: &str,
) -> Result<Zeroizing<String>, EnvelopeError> {
    let body = sealed.strip_prefix("f1.").ok_or(CryptoError::Malformed)?;
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| CryptoError::Malformed)?;
    let plain = key.aead.open(&field_aad(table, column, row_id), &raw)?;
    String::from_utf8(plain.to_vec())
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Malformed.into())
}

/// The blind index of a normalised value in `column`.
pub fn blind_index(
    keys: &SharedKeyring,
    column: &str,
    normalised: &str,
) -> Result<String, EnvelopeError> {
    let key = keys
        .derive(1, &format!("custodian/phi/blind-index/{column}/v1"))
        .map_err(CryptoError::from)?;
    let tag = crypto::hmac_sha256(&key, &[normalised.as_bytes()]);
    Ok(crypto::hex(tag.get(..16).unwrap_or(&tag)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;

    fn keys() -> (tempfile::TempDir, SharedKeyring) {
        let d = tempfile::tempdir().unwrap();
        let k = Keyring::create(&d.path().join("k"), "now").unwrap();
        (d, SharedKeyring::new(k))
    }

    #[test]
    fn fields_open_only_in_their_row_and_column() {
        let (_d, _k) = keys();
        let dek = DataKey::generate().unwrap();
        let s = seal_field(&dek, "patients", "ssn", "p1", "123-45-6789").unwrap();
        assert!(s.starts_with("f1.") && !s.contains("6789"));
        assert_eq!(
            &*open_field(&dek, "patients", "ssn", "p1", &s).unwrap(),
            "123-45-6789"
        );
        assert!(
            open_field(&dek, "patients", "ssn", "p2", &s).is_err(),
            "moved to another row"
        );
        assert!(
            open_field(&dek, "patients", "email", "p1", &s).is_err(),
            "moved to another column"
        );
        assert!(
            open_field(&dek, "records", "ssn", "p1", &s).is_err(),
            "moved to another table"
        );
        assert!(
            open_field(&DataKey::generate().unwrap(), "patients", "ssn", "p1", &s).is_err(),
            "another key"
        );
        assert_ne!(
            s,
            seal_field(&dek, "patients", "ssn", "p1", "123-45-6789").unwrap(),
            "fresh nonce"
        );
    }

    #[test]
    fn wrapping_follows_key_versions_and_retirement() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k");
        let mut ring = Keyring::create(&path, "now").unwrap();
        let keys = SharedKeyring::new(Keyring::load(&path).unwrap());
        let dek = DataKey::generate().unwrap();
        let (w1, v1) = wrap(&keys, "p1", &dek).unwrap();
        assert_eq!(v1, 1);
        let sealed = seal_field(&dek, "patients", "given_name", "p1", "Ada").unwrap();
        ring.rotate("later").unwrap();
        keys.reload().unwrap();
        let back = unwrap(&keys, "p1", &w1, 1).unwrap();
        let (w2, v2) = wrap(&keys, "p1", &back).unwrap();
        assert_eq!(v2, 2);
        let again = unwrap(&keys, "p1", &w2, 2).unwrap();
        assert_eq!(
            &*open_field(&again, "patients", "given_name", "p1", &sealed).unwrap(),
            "Ada"
        );
        assert!(matches!(
            unwrap(&keys, "p1", &w1, 2),
            Err(EnvelopeError::Retired(1))
        ));
        assert!(unwrap(&keys, "p2", &w2, 1).is_err(), "bound to the patient");
    }

    #[test]
    fn blind_indexes_are_per_column_and_stable() {
        let (_d, k) = keys();
        let a = blind_index(&k, "family_name", "smith").unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(a, blind_index(&k, "family_name", "smith").unwrap());
        assert_ne!(a, blind_index(&k, "given_name", "smith").unwrap());
        assert_ne!(a, blind_index(&k, "family_name", "smyth").unwrap());
        assert!(!format!("{:?}", DataKey::generate().unwrap()).contains('0'));
    }
}
