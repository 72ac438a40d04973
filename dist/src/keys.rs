//! Signing keys and the set of keys a host or publisher trusts.
//!
//! Key files are small TOML documents so an operator can tell at a glance what a file is:
//!
//! ```toml
//! kind = "atom-public-key"      # or "atom-signing-key"
//! key_id = "3f9c0d2e8a1b4c77"   # first 8 bytes of BLAKE3(public key), hex
//! public = "<64 hex digits>"    # signing keys carry `secret` instead
//! ```
//!
//! The key id is derived, never trusted: a file whose `key_id` does not match its key is
//! rejected, so a renamed or edited key file cannot impersonate another key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Key files are tiny; anything larger is not a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;
pub const SIGNING_KEY_KIND: &str = "atom-signing-key";
pub const PUBLIC_KEY_KIND: &str = "atom-public-key";

/// Short, stable name of a public key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct KeyId(String);

/// Only the 16 hex digits `of` makes: an id read from a signature file is printed in
/// errors, so it must not be able to carry arbitrary text.
impl TryFrom<String> for KeyId {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            Ok(KeyId(s))
        } else {
            Err("a key id is 16 lowercase hex digits")
        }
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        KeyId(hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key file {path} is {size} bytes; a key file is at most {MAX_KEY_FILE_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("key file {path} is not a valid Atom key file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("key file {path} says key id {claimed} but the key's id is {actual}")]
    IdMismatch {
        path: PathBuf,
        claimed: String,
        actual: KeyId,
    },
    #[error("signing key {path} is not private: {why}")]
    Unprotected { path: PathBuf, why: String },
    #[error("no trusted public keys (*.pub) found in {0}")]
    NoTrustedKeys(PathBuf),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningKeyFile {
    kind: String,
    key_id: String,
    secret: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyFile {
    kind: String,
    key_id: String,
    public: String,
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_KEY_FILE_BYTES {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    String::from_utf8(bytes).map_err(|_| KeyError::Malformed {
        path: path.to_owned(),
        reason: "not UTF-8 text".into(),
    })
}

/// Refuses a secret file others may read or write, or that another user owns.
pub fn check_private(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = m.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Unprotected {
            path: path.to_owned(),
            why: format!(
                "mode {mode:04o} lets others read or write it; `chmod 600 {}`",
                path.display()
            ),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me && m.uid() != 0 {
        return Err(KeyError::Unprotected {
            path: path.to_owned(),
            why: format!("it belongs to user id {}, not to this user ({me}) or root", m.uid()),
        });
    }
    Ok(())
}

fn decode_32(path: &Path, field: &str, text: &str) -> Result<[u8; 32], KeyError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|_| KeyError::Malformed {
        path: path.to_owned(),
        reason: format!("`{field}` must be 64 hex digits"),
    })?;
    Ok(out)
}

fn check_kind(path: &Path, found: &str, wanted: &str) -> Result<(), KeyError> {
    if found == wanted {
        Ok(())
    } else {
        Err(KeyError::Malformed {
            path: path.to_owned(),
            reason: format!("kind is {found:?}, expected {wanted:?}"),
        })
    }
}

fn check_id(path: &Path, claimed: &str, key: &VerifyingKey) -> Result<KeyId, KeyError> {
    let actual = KeyId::of(key);
    if actual.as_str() != claimed {
        return Err(KeyError::IdMismatch {
            path: path.to_owned(),
            claimed: claimed.to_owned(),
            actual,
        });
    }
    Ok(actual)
}

/// A private signing key (publisher side only).
pub struct SecretKey {
    key: SigningKey,
    id: KeyId,
}

impl SecretKey {
    pub fn generate() -> Self {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let id = KeyId::of(&key.verifying_key());
        SecretKey { key, id }
    }

    /// Loads a signing key, refusing (like ssh) a file others may read or write, or that
    /// belongs to another user: whoever can read it can sign updates for the whole fleet.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = Self::read_private_file(path)?;
        Self::from_file_text(path, &text)
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// A key from its 32 secret bytes (a decrypted key file's).
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let id = KeyId::of(&key.verifying_key());
        SecretKey { key, id }
    }

    /// The 32 secret bytes, for a key file that encrypts them; nothing else needs them.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Parses a plain key file's text (the caller checked the file is private).
    pub fn from_file_text(path: &Path, text: &str) -> Result<Self, KeyError> {
        let file: SigningKeyFile = toml::from_str(text).map_err(|e| KeyError::Malformed {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        check_kind(path, &file.kind, SIGNING_KEY_KIND)?;
        let key = SigningKey::from_bytes(&decode_32(path, "secret", &file.secret)?);
        let id = check_id(path, &file.key_id, &key.verifying_key())?;
        Ok(SecretKey { key, id })
    }

    /// Reads a key file's text, refusing (like ssh) a file others may read or write.
    pub fn read_private_file(path: &Path) -> Result<String, KeyError> {
        check_private(path)?;
        read_small(path)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
            id: self.id.clone(),
        }
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The file's text. The caller writes it with mode 0600.
    pub fn to_file_text(&self) -> String {
        let body = toml::to_string(&SigningKeyFile {
            kind: SIGNING_KEY_KIND.into(),
            key_id: self.id.to_string(),
            secret: hex::encode(self.key.to_bytes()),
        })
        .expect("a flat struct of strings always serializes");
        format!("# Atom signing key. Keep this file secret (mode 0600).\n{body}")
    }
}

/// A public verification key.
#[derive(Clone, Debug)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_small(path)?;
        let file: PublicKeyFile = toml::from_str(&text).map_err(|e| KeyError::Malformed {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        check_kind(path, &file.kind, PUBLIC_KEY_KIND)?;
        let key =
            VerifyingKey::from_bytes(&decode_32(path, "public", &file.public)?).map_err(|_| KeyError::Malformed {
                path: path.to_owned(),
                reason: "not a valid ed25519 public key".into(),
            })?;
        if key.is_weak() {
            return Err(KeyError::Malformed {
                path: path.to_owned(),
                reason: "weak (small-order) public key".into(),
            });
        }
        let id = check_id(path, &file.key_id, &key)?;
        Ok(PublicKey { key, id })
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// A key from its 32 raw bytes (a hardware token's, or a `keys.toml` entry's).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, String> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| "not a valid ed25519 public key".to_owned())?;
        if key.is_weak() {
            return Err("weak (small-order) public key".into());
        }
        Ok(PublicKey {
            id: KeyId::of(&key),
            key,
        })
    }

    /// The key as 64 hex digits, as key files and `keys.toml` hold it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }

    pub fn to_file_text(&self) -> String {
        let body = toml::to_string(&PublicKeyFile {
            kind: PUBLIC_KEY_KIND.into(),
            key_id: self.id.to_string(),
            public: hex::encode(self.key.as_bytes()),
        })
        .expect("a flat struct of strings always serializes");
        format!("# Atom public key: install into /etc/atom/keys/ on hosts that trust it.\n{body}")
    }
}

/// The keys a verifier accepts. Several at once allow rotation: ship the new key to the
/// fleet, sign with both for a while, then retire the old one.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        }
    }

    /// Every `*.pub` file in a directory (e.g. `/etc/atom/keys/`). A malformed key file is an
    /// error rather than skipped, so a typo is noticed when it is made, not at update time.
    pub fn load_dir(dir: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        paths.retain(|p| p.extension().is_some_and(|e| e == "pub"));
        paths.sort();
        let keys = paths
            .iter()
            .map(|p| PublicKey::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError::NoTrustedKeys(dir.to_owned()));
        }
        Ok(Self::new(keys))
    }

    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate();
        std::fs::write(dir.path().join("a.key"), sk.to_file_text()).unwrap();
        private(&dir.path().join("a.key"));
        std::fs::write(dir.path().join("a.pub"), sk.public().to_file_text()).unwrap();
        let sk2 = SecretKey::load(&dir.path().join("a.key")).unwrap();
        assert_eq!(sk2.id(), sk.id());
        let pk = PublicKey::load(&dir.path().join("a.pub")).unwrap();
        assert_eq!(pk.id(), sk.id());
        let trusted = TrustedKeys::load_dir(dir.path()).unwrap();
        assert!(trusted.get(sk.id()).is_some());
    }

    /// Signing keys must be private to be loaded at all.
    fn private(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn corrupt_key_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let sk = SecretKey::generate();
        std::fs::write(&p, "").unwrap();
        private(&p);

        std::fs::write(&p, "garbage = [").unwrap();
        assert!(matches!(SecretKey::load(&p), Err(KeyError::Malformed { .. })));

        std::fs::write(&p, sk.public().to_file_text()).unwrap();
        assert!(
            matches!(SecretKey::load(&p), Err(KeyError::Malformed { .. })),
            "public key is not a signing key"
        );

        let forged = sk.to_file_text().replace(sk.id().as_str(), "0000000000000000");
        std::fs::write(&p, forged).unwrap();
        assert!(matches!(SecretKey::load(&p), Err(KeyError::IdMismatch { .. })));

        std::fs::write(&p, vec![b'#'; 5000]).unwrap();
        assert!(matches!(SecretKey::load(&p), Err(KeyError::TooLarge { .. })));

        assert!(matches!(
            SecretKey::load(&dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn empty_key_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TrustedKeys::load_dir(dir.path()),
            Err(KeyError::NoTrustedKeys(_))
        ));
    }
}
