//! The keyring: versioned root keys in a file of their own (never in the database).
//!
//! Format (JSON, mode 0600):
//! `{"format":"custodian-keyring-v1","keys":[{"version":1,"created_at":"…","key":"<base64 32 bytes>"}]}`.
//! Each purpose (the audit chain head, later envelope encryption and blind indexes)
//! uses its own key derived with HKDF-SHA256 from a root key and the purpose's label,
//! so one root key never serves two purposes. The newest version is used for new
//! work; older versions stay for verifying and decrypting what they made.
//!
//! The `KeySource` trait is the seam for an external KMS: a Vault transit or cloud KMS
//! backend would hold the root keys and answer `derive` (see docs/keys.md).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

const FORMAT: &str = "custodian-keyring-v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring {path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("keyring {path}: not a keyring file ({reason})")]
    Format { path: String, reason: String },
    #[error("keyring {path}: cannot write: {reason}")]
    Write { path: String, reason: String },
    #[error("keyring {path} already exists")]
    Exists { path: String },
    #[error("the keyring has no key version {0}")]
    UnknownVersion(u32),
    #[error("the operating system's random source failed")]
    Random,
}

/// A 256-bit key; wiped on drop, never printed.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh key from the OS CSPRNG.
    pub fn random() -> Result<Self, KeyringError> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(k.as_mut()).map_err(|_| KeyringError::Random)?;
        Ok(Self(k))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key([REDACTED])")
    }
}

/// Where root keys come from: this file, or (later) an external KMS.
pub trait KeySource: Send + Sync {
    /// The version used for new work.
    fn current_version(&self) -> u32;
    /// A purpose key derived from root key `version`.
    fn derive(&self, version: u32, purpose: &str) -> Result<Key, KeyringError>;
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    format: String,
    keys: Vec<FileKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    version: u32,
    created_at: String,
    key: String,
}

impl Drop for FileKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// The file-backed keyring.
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<u32, (String, Key)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Reads a keyring file.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let shown = path.display().to_string();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| KeyringError::Read {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?,
            );
        let bad = |reason: String| KeyringError::Format {
            path: shown.clone(),
            reason,
        };
        // serde's message could quote key material: say only what kind of problem it is.
        let file: FileFormat = serde_json::from_str(&text)
            .map_err(|_| bad("invalid JSON, or unknown fields".into()))?;
        if file.format != FORMAT {
            return Err(bad(format!("format is not {FORMAT}")));
        }
        let mut keys = BTreeMap::new();
        for k in &file.keys {
            let raw = Zeroizing::new(
                STANDARD
                    .decode(k.key.as_bytes())
                    .map_err(|_| bad(format!("key version {} is not base64", k.version)))?,
            );
            let arr: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("key version {} is not 32 bytes", k.version)))?;
            if k.version == 0
                || keys
                    .insert(k.version, (k.created_at.clone(), Key(Zeroizing::new(arr))))
                    .is_some()
            {
                return Err(bad(format!(
                    "key version {} is zero or repeated",
                    k.version
                )));
            }
        }
        if keys.is_empty() {
            return Err(bad("it holds no key".into()));
        }
        Ok(Self {
            path: path.to_owned(),
            keys,
        })
    }

    /// Creates a new keyring with one key version (mode 0600); refuses to overwrite.
    pub fn create(path: &Path, now: &str) -> Result<Self, KeyringError> {
        if path.exists() {
            return Err(KeyringError::Exists {
                path: path.display().to_string(),
            });
        }
        let mut keys = BTreeMap::new();
        keys.insert(1, (now.to_owned(), Key::random()?));
        let ring = Self {
            path: path.to_owned(),
            keys,
        };
        ring.save()?;
        Ok(ring)
    }

    /// Loads the keyring, creating it first when absent and `create_if_missing`.
    pub fn open(
        path: &Path,
        create_if_missing: bool,
        now: &str,
    ) -> Result<(Self, bool), KeyringError> {
        if create_if_missing && !path.exists() {
            return Self::create(path, now).map(|k| (k, true));
        }
        Self::load(path).map(|k| (k, false))
    }

    /// Adds a new version, used for new work from now on. Returns it.
    pub fn rotate(&mut self, now: &str) -> Result<u32, KeyringError> {
        let next = self.current_version() + 1;
        self.keys.insert(next, (now.to_owned(), Key::random()?));
        if let Err(e) = self.save() {
            self.keys.remove(&next);
            return Err(e);
        }
        Ok(next)
    }

    pub fn versions(&self) -> Vec<(u32, String)> {
        self.keys
            .iter()
            .map(|(v, (at, _))| (*v, at.clone()))
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes atomically: a private temporary file in the same directory, then rename.
    fn save(&self) -> Result<(), KeyringError> {
        let shown = self.path.display().to_string();
        let fail = |e: std::io::Error| KeyringError::Write {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let file = FileFormat {
            format: FORMAT.into(),
            keys: self
                .keys
                .iter()
                .map(|(v, (at, k))| FileKey {
                    version: *v,
                    created_at: at.clone(),
                    key: STANDARD.encode(k.bytes()),
                })
                .collect(),
        };
        let text = Zeroizing::new(
            serde_json::to_string_pretty(&file).map_err(|e| fail(std::io::Error::other(e)))?,
        );
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(dir).map_err(fail)?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let result = (|| {
            let mut f = o.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(fail)
    }
}

impl KeySource for Keyring {
    fn current_version(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    fn derive(&self, version: u32, purpose: &str) -> Result<Key, KeyringError> {
        let (_, root) = self
            .keys
            .get(&version)
            .ok_or(KeyringError::UnknownVersion(version))?;
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"custodian-keyring-v1"), root.bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(purpose.as_bytes(), out.as_mut())
            .map_err(|_| KeyringError::UnknownVersion(version))?;
        Ok(Key(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_load_rotate_derive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/keyring");
        let ring = Keyring::create(&path, "2026-01-01T00:00:00Z").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ring.current_version(), 1);
        let a = ring.derive(1, "audit-head").unwrap();
        let b = ring.derive(1, "blind-index:ssn").unwrap();
        assert_ne!(a.bytes(), b.bytes(), "purposes get different keys");

        let mut again = Keyring::load(&path).unwrap();
        assert_eq!(again.derive(1, "audit-head").unwrap().bytes(), a.bytes());
        assert_eq!(again.rotate("2026-02-01T00:00:00Z").unwrap(), 2);
        let reloaded = Keyring::load(&path).unwrap();
        assert_eq!(reloaded.current_version(), 2);
        assert_eq!(reloaded.derive(1, "audit-head").unwrap().bytes(), a.bytes());
        assert_ne!(reloaded.derive(2, "audit-head").unwrap().bytes(), a.bytes());
        assert!(matches!(
            reloaded.derive(3, "x"),
            Err(KeyringError::UnknownVersion(3))
        ));
        assert!(Keyring::create(&path, "x").is_err(), "never overwrites");
    }

    #[test]
    fn key_material_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let ring = Keyring::create(&path, "now").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let material = text
            .split("\"key\": \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        assert!(!format!("{ring:?}").contains(&material));
        assert!(!format!("{:?}", ring.derive(1, "x").unwrap()).contains("0"));
    }

    #[test]
    fn malformed_files_are_refused_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        for text in [
            "not json SECRET",
            r#"{"format":"other","keys":[]}"#,
            r#"{"format":"custodian-keyring-v1","keys":[]}"#,
            r#"{"format":"custodian-keyring-v1","keys":[{"version":1,"created_at":"x","key":"c2hvcnQ="}]}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Keyring::load(&path).unwrap_err().to_string();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(e.contains("keyring"), "{e}");
        }
    }
}
