//! Cryptography: the keyring and purpose keys, keyed hashes. Nothing outside this
//! module touches key material.

pub mod keyring;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub use keyring::{Key, KeySource, Keyring, KeyringError};

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// HMAC-SHA256 of `parts`, each prefixed by its length so that no two different lists
/// give the same input.
pub fn hmac_sha256(key: &Key, parts: &[&[u8]]) -> [u8; 32] {
    // A 32-byte key is always a valid HMAC key; fall back to an all-zero tag otherwise.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key.bytes()) else {
        return [0; 32];
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Compares two byte strings in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The keyring shared by a running process: read often, reloaded from its file when a
/// version it does not know is asked for (another process rotated it).
pub struct SharedKeyring {
    inner: std::sync::RwLock<Keyring>,
}

impl std::fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKeyring")
    }
}

impl SharedKeyring {
    pub fn new(k: Keyring) -> Self {
        Self {
            inner: std::sync::RwLock::new(k),
        }
    }

    pub fn current_version(&self) -> u32 {
        self.inner.read().map_or(0, |k| k.current_version())
    }

    /// A purpose key of `version`, reloading the file once if the version is unknown.
    pub fn derive(&self, version: u32, purpose: &str) -> Result<Key, KeyringError> {
        let first = match self.inner.read() {
            Ok(k) => k.derive(version, purpose),
            Err(_) => Err(KeyringError::UnknownVersion(version)),
        };
        match first {
            Err(KeyringError::UnknownVersion(_)) => {
                self.reload()?;
                match self.inner.read() {
                    Ok(k) => k.derive(version, purpose),
                    Err(_) => Err(KeyringError::UnknownVersion(version)),
                }
            }
            other => other,
        }
    }

    /// Re-reads the keyring file (picks up versions added by `custodian keys rotate`).
    pub fn reload(&self) -> Result<(), KeyringError> {
        let path = match self.inner.read() {
            Ok(k) => k.path().to_owned(),
            Err(_) => return Err(KeyringError::UnknownVersion(0)),
        };
        let fresh = Keyring::load(&path)?;
        if let Ok(mut k) = self.inner.write() {
            *k = fresh;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hmac_is_length_prefixed() {
        let k = Key::random().unwrap();
        assert_ne!(
            hmac_sha256(&k, &[b"ab", b"c"]),
            hmac_sha256(&k, &[b"a", b"bc"])
        );
        assert_eq!(hmac_sha256(&k, &[b"x"]), hmac_sha256(&k, &[b"x"]));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
