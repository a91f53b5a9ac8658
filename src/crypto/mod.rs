//! Cryptography: the keyring and purpose keys, keyed hashes. Nothing outside this
//! module touches key material.

pub mod keyring;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub use keyring::{Key, KeySource, Keyring, KeyringError};

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
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

/// Errors of sealing and opening. They never carry key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value does not open (wrong key, wrong place, or altered)")]
    Open,
    #[error("the operating system's random source failed")]
    Random,
}

/// Bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| CryptoError::Random)?;
    Ok(b)
}

/// A bearer token `<prefix><43 chars>` (256 random bits, base64url) and its SHA-256 hex,
/// which is all that is stored.
pub fn new_token(prefix: &str) -> Result<(String, String), CryptoError> {
    use base64::Engine;
    let raw = zeroize::Zeroizing::new(random_bytes::<32>()?);
    let token = format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref())
    );
    let hash = sha256_hex(token.as_bytes());
    Ok((token, hash))
}

/// An AES-256-GCM key made ready once (its round keys and GHASH table computed) for
/// several seals or opens: a patient's fields are opened with one, instead of
/// preparing the same key again for every field (docs/performance.md).
pub struct AeadKey(ring::aead::LessSafeKey);

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey([REDACTED])")
    }
}

impl AeadKey {
    pub fn new(key: &[u8; 32]) -> Result<Self, CryptoError> {
        use ring::aead;
        let unbound =
            aead::UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| CryptoError::Open)?;
        Ok(Self(aead::LessSafeKey::new(unbound)))
    }

    /// Seals with a fresh random nonce: `nonce | ciphertext | tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        use ring::aead;
        let nonce_bytes = random_bytes::<12>()?;
        let mut buf = zeroize::Zeroizing::new(plaintext.to_vec());
        self.0
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(aad),
                &mut *buf,
            )
            .map_err(|_| CryptoError::Open)?;
        let mut out = Vec::with_capacity(12 + buf.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens what [`AeadKey::seal`] made with the same key and `aad`.
    pub fn open(
        &self,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
        use ring::aead;
        if sealed.len() < 12 + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = sealed.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        let mut buf = zeroize::Zeroizing::new(ct.to_vec());
        let plain_len = self
            .0
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError::Open)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

/// AES-256-GCM with a fresh random nonce: `nonce | ciphertext | tag`.
pub fn aead_seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    AeadKey::new(key)?.seal(aad, plaintext)
}

/// Opens what [`aead_seal`] made with the same key and `aad`.
pub fn aead_open(
    key: &[u8; 32],
    aad: &[u8],
    sealed: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
    AeadKey::new(key)?.open(aad, sealed)
}

/// Seals `plaintext` with AES-256-GCM under the current key version's `purpose` key,
/// bound to `aad` (e.g. the row id it belongs to): `v<version>.<base64url(nonce|ciphertext)>`.
pub fn seal(
    keys: &SharedKeyring,
    purpose: &str,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<String, CryptoError> {
    use base64::Engine;
    let version = keys.current_version();
    let key = keys.derive(version, purpose)?;
    let out = aead_seal(key.bytes(), aad, plaintext)?;
    Ok(format!(
        "v{version}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    ))
}

/// The key version a [`seal`]ed value was made with.
pub fn sealed_version(sealed: &str) -> Option<u32> {
    sealed.strip_prefix('v')?.split_once('.')?.0.parse().ok()
}

/// Opens what [`seal`] made with the same `purpose` and `aad`.
pub fn open(
    keys: &SharedKeyring,
    purpose: &str,
    aad: &[u8],
    sealed: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
    use base64::Engine;
    let (version, body) = sealed
        .strip_prefix('v')
        .and_then(|r| r.split_once('.'))
        .ok_or(CryptoError::Malformed)?;
    let version: u32 = version.parse().map_err(|_| CryptoError::Malformed)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| CryptoError::Malformed)?;
    let key = keys.derive(version, purpose)?;
    aead_open(key.bytes(), aad, &raw)
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
    /// Purpose keys already derived, by (version, purpose): a patient read unwraps its
    /// data key under the key-encryption key, and a search derives five blind-index
    /// keys; deriving each (HKDF) anew cost more than using it. The keys are wiped when
    /// the cache is cleared (on reload) or dropped, like the root keys they come from.
    derived: std::sync::RwLock<DerivedKeys>,
}

type DerivedKeys = std::collections::HashMap<u32, std::collections::HashMap<String, Key>>;

/// Purpose keys kept at most; past that the cache starts over (purposes are a fixed
/// handful of strings, versions a few).
const DERIVED_MAX: usize = 256;

impl std::fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKeyring")
    }
}

impl SharedKeyring {
    pub fn new(k: Keyring) -> Self {
        Self {
            inner: std::sync::RwLock::new(k),
            derived: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    pub fn current_version(&self) -> u32 {
        self.inner.read().map_or(0, |k| k.current_version())
    }

    /// How many key versions the keyring holds (old ones still decrypt).
    pub fn version_count(&self) -> usize {
        self.inner.read().map_or(0, |k| k.versions().len())
    }

    /// A purpose key of `version`, reloading the file once if the version is unknown.
    pub fn derive(&self, version: u32, purpose: &str) -> Result<Key, KeyringError> {
        if let Ok(cache) = self.derived.read()
            && let Some(k) = cache.get(&version).and_then(|m| m.get(purpose))
        {
            return Ok(k.clone());
        }
        let key = self.derive_uncached(version, purpose)?;
        if let Ok(mut cache) = self.derived.write() {
            if cache
                .values()
                .map(std::collections::HashMap::len)
                .sum::<usize>()
                >= DERIVED_MAX
            {
                cache.clear();
            }
            cache
                .entry(version)
                .or_default()
                .insert(purpose.to_owned(), key.clone());
        }
        Ok(key)
    }

    fn derive_uncached(&self, version: u32, purpose: &str) -> Result<Key, KeyringError> {
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
        if let Ok(mut cache) = self.derived.write() {
            cache.clear();
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
    fn derived_keys_are_cached_and_follow_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let mut ring = Keyring::create(&path, "now").unwrap();
        let keys = SharedKeyring::new(Keyring::load(&path).unwrap());
        let direct = Keyring::load(&path).unwrap().derive(1, "p").unwrap();
        // The cached key is the derived key, per version and purpose.
        for _ in 0..2 {
            assert_eq!(keys.derive(1, "p").unwrap().bytes(), direct.bytes());
        }
        assert_ne!(keys.derive(1, "q").unwrap().bytes(), direct.bytes());
        // A version added by another process is found (reload) and cached apart.
        ring.rotate("later").unwrap();
        let v2 = keys.derive(2, "p").unwrap();
        assert_ne!(v2.bytes(), direct.bytes());
        assert_eq!(keys.derive(1, "p").unwrap().bytes(), direct.bytes());
        assert!(keys.derive(3, "p").is_err());
    }

    #[test]
    fn sealed_values_open_only_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::create(&dir.path().join("k"), "now").unwrap();
        let keys = SharedKeyring::new(ring);
        let sealed = seal(&keys, "p", b"user-1", b"JBSWY3DPEHPK3PXP").unwrap();
        assert!(sealed.starts_with("v1."));
        assert!(!sealed.contains("JBSWY3DP"));
        assert_eq!(
            &*open(&keys, "p", b"user-1", &sealed).unwrap(),
            b"JBSWY3DPEHPK3PXP"
        );
        assert!(matches!(
            open(&keys, "p", b"user-2", &sealed),
            Err(CryptoError::Open)
        ));
        assert!(matches!(
            open(&keys, "q", b"user-1", &sealed),
            Err(CryptoError::Open)
        ));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(open(&keys, "p", b"user-1", &tampered).is_err());
        assert!(matches!(
            open(&keys, "p", b"user-1", "garbage"),
            Err(CryptoError::Malformed)
        ));
        assert_ne!(
            seal(&keys, "p", b"user-1", b"x").unwrap(),
            seal(&keys, "p", b"user-1", b"x").unwrap()
        );
    }

    #[test]
    fn tokens_are_long_random_and_stored_hashed() {
        let (a, ha) = new_token("cst_").unwrap();
        let (b, _) = new_token("cst_").unwrap();
        assert!(a.starts_with("cst_") && a.len() == 4 + 43);
        assert_ne!(a, b);
        assert_eq!(ha, sha256_hex(a.as_bytes()));
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
