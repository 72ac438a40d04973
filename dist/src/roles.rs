//! Key roles: an offline root key names the release and freshness keys in `keys.toml`.
//!
//! ```toml
//! format = 1
//! version = 3                          # grows with every change; hosts refuse a lower one
//! created = "2026-12-01T00:00:00Z"
//! expires = "2027-12-01T00:00:00Z"     # the root re-signs within this (keep it long)
//!
//! [[release]]                          # sign manifests: version, digests, rollout
//! key_id = "3f9c0d2e8a1b4c77"
//! public = "<64 hex digits>"
//! expires = "2027-06-01T00:00:00Z"
//!
//! [[freshness]]                        # sign timestamps only: "this manifest is current"
//! key_id = "9a0b…"
//! public = "<64 hex digits>"
//! expires = "2027-06-01T00:00:00Z"
//! ```
//!
//! Stored at `keys/keys.toml`, signed by root key(s) (domain [`Domain::Keys`]) in
//! `keys/sigs/<BLAKE3 of keys.toml>.sig`. A host trusts only root keys; it learns the other
//! keys from this document, so release and freshness keys rotate by a new signed
//! `keys.toml` while the root key stays offline. A key may hold one role only: the online
//! freshness key must never be able to sign a manifest.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::evolve::{self, EvolveError};
use crate::keys::{KeyId, PublicKey, TrustedKeys};
use crate::signature::{self, Domain, SignatureError};
use crate::verify::is_from_the_future;

pub const FORMAT: u32 = 1;
pub const MAX_KEYS_BYTES: usize = 64 * 1024;
const MAX_KEYS_PER_ROLE: usize = 8;

/// Every field of `keys.toml` this build understands (see `evolve`).
pub const KNOWN_FIELDS: &[&str] = &[
    "format",
    "version",
    "created",
    "expires",
    "critical",
    "release",
    "release.key_id",
    "release.public",
    "release.expires",
    "freshness",
    "freshness.key_id",
    "freshness.public",
    "freshness.expires",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysDoc {
    pub format: u32,
    pub version: u64,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// Fields a reader must understand (see `evolve`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical: Vec<String>,
    #[serde(default)]
    pub release: Vec<RoleKey>,
    #[serde(default)]
    pub freshness: Vec<RoleKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKey {
    pub key_id: KeyId,
    pub public: String,
    pub expires: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Release,
    Freshness,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Release => "release",
            Role::Freshness => "freshness",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error("keys.toml is {0} bytes; the limit is {MAX_KEYS_BYTES}")]
    TooLarge(usize),
    #[error("keys.toml is malformed: {0}")]
    Malformed(String),
    #[error("keys.toml marks field(s) {0:?} as critical and this build does not know them: update the agent first")]
    UnknownCritical(Vec<String>),
    #[error("keys.toml is not signed by a trusted root key: {0}")]
    Signature(#[from] SignatureError),
    #[error("keys.toml expired at {expires} (now {now}); the root key holder must sign a new one")]
    Expired { expires: Timestamp, now: Timestamp },
    #[error(
        "keys.toml version {found} is older than version {seen} this host already accepted: a replay of \
         an old key list (it could bring back a retired key)"
    )]
    Rollback { seen: u64, found: u64 },
    #[error(
        "keys.toml version {0} differs from the version {0} this host already accepted: every new key list \
         needs a higher version (atom-build keys --version), or this is a replay of an old one"
    )]
    SameVersionChanged(u64),
    #[error("keys.toml was created at {created}, after this host's clock ({now}): fix the clock")]
    FromTheFuture { created: Timestamp, now: Timestamp },
    #[error("{role} key {key} expired at {expires} (now {now}); sign with a current {role} key")]
    KeyExpired {
        role: Role,
        key: KeyId,
        expires: Timestamp,
        now: Timestamp,
    },
    #[error("signed by {signed_by:?}, none of them a {role} key in keys.toml ({listed:?})")]
    NotInRole {
        role: Role,
        signed_by: Vec<KeyId>,
        listed: Vec<KeyId>,
    },
}

impl From<EvolveError> for RolesError {
    fn from(e: EvolveError) -> Self {
        match e {
            EvolveError::Syntax(m) | EvolveError::Invalid(m) => RolesError::Malformed(m),
            EvolveError::UnknownCritical(f) => RolesError::UnknownCritical(f),
        }
    }
}

impl KeysDoc {
    pub fn parse(bytes: &[u8]) -> Result<Self, RolesError> {
        if bytes.len() > MAX_KEYS_BYTES {
            return Err(RolesError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| RolesError::Malformed("not UTF-8 text".into()))?;
        let (doc, ignored): (KeysDoc, _) = evolve::parse_tolerant(text).map_err(RolesError::from)?;
        doc.validate()?;
        evolve::check_critical(&doc.critical, KNOWN_FIELDS)?;
        evolve::log_ignored("keys.toml", &ignored);
        Ok(doc)
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Atom keys.toml: which keys may sign manifests (release) and timestamps (freshness).\n\
             # Signed by the root key(s); edit only with `atom-build keys`.\n{}",
            toml::to_string(self).expect("keys.toml serializes")
        )
    }

    fn validate(&self) -> Result<(), RolesError> {
        let bad = |m: String| Err(RolesError::Malformed(m));
        if self.format != FORMAT {
            return bad(format!(
                "format {} is not supported (this build reads format {FORMAT})",
                self.format
            ));
        }
        if self.expires <= self.created {
            return bad(format!(
                "expires ({}) is not after created ({})",
                self.expires, self.created
            ));
        }
        for (role, keys) in [(Role::Release, &self.release), (Role::Freshness, &self.freshness)] {
            if keys.is_empty() || keys.len() > MAX_KEYS_PER_ROLE {
                return bad(format!("{} {role} keys; 1 to {MAX_KEYS_PER_ROLE} expected", keys.len()));
            }
            for k in keys {
                let public = k.public_key().map_err(RolesError::Malformed)?;
                if public.id() != &k.key_id {
                    return bad(format!(
                        "{role} key {} has the id {} by its public key",
                        k.key_id,
                        public.id()
                    ));
                }
            }
        }
        if let Some(k) = self
            .release
            .iter()
            .find(|r| self.freshness.iter().any(|f| f.key_id == r.key_id))
        {
            return bad(format!(
                "key {} is both a release and a freshness key; the online freshness key must not be able to \
                 sign manifests",
                k.key_id
            ));
        }
        Ok(())
    }

    pub fn keys(&self, role: Role) -> &[RoleKey] {
        match role {
            Role::Release => &self.release,
            Role::Freshness => &self.freshness,
        }
    }

    /// Checks that `sig_file` holds a good signature over `document` (of kind `domain`) by an
    /// unexpired key of `role`; returns that key's id.
    pub fn verify_signed(
        &self,
        role: Role,
        domain: Domain,
        document: &[u8],
        sig_file: &[u8],
        now: Timestamp,
    ) -> Result<KeyId, RolesError> {
        let keys = self.keys(role);
        let current = TrustedKeys::new(
            keys.iter()
                .filter(|k| k.expires > now)
                .filter_map(|k| k.public_key().ok()),
        );
        match signature::verify_doc(domain, document, sig_file, &current) {
            Ok(id) => Ok(id),
            Err(SignatureError::UntrustedKey { signed_by, .. }) => {
                // Say which listed key it was, if one signed it and has expired.
                let all = TrustedKeys::new(keys.iter().filter_map(|k| k.public_key().ok()));
                if let Ok(id) = signature::verify_doc(domain, document, sig_file, &all) {
                    let expires = keys.iter().find(|k| k.key_id == id).map_or(now, |k| k.expires);
                    return Err(RolesError::KeyExpired {
                        role,
                        key: id,
                        expires,
                        now,
                    });
                }
                Err(RolesError::NotInRole {
                    role,
                    signed_by,
                    listed: keys.iter().map(|k| k.key_id.clone()).collect(),
                })
            }
            Err(e) => Err(RolesError::Signature(e)),
        }
    }

    /// The soonest expiry in the document: of itself or of any key it names.
    pub fn soonest_expiry(&self) -> Timestamp {
        self.release
            .iter()
            .chain(&self.freshness)
            .map(|k| k.expires)
            .fold(self.expires, Timestamp::min)
    }
}

impl RoleKey {
    pub fn new(key: &PublicKey, expires: Timestamp) -> Self {
        RoleKey {
            key_id: key.id().clone(),
            public: key.to_hex(),
            expires,
        }
    }

    pub fn public_key(&self) -> Result<PublicKey, String> {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(&self.public, &mut raw)
            .map_err(|_| format!("key {}: `public` must be 64 hex digits", self.key_id))?;
        PublicKey::from_bytes(&raw).map_err(|e| format!("key {}: {e}", self.key_id))
    }
}

/// A `keys.toml` whose root signature, expiry and version have been checked.
#[derive(Clone, Debug)]
pub struct VerifiedKeys {
    pub doc: KeysDoc,
    pub signed_by: KeyId,
}

/// Signature first (by a root key), then the contents. `seen` is the highest version this
/// host accepted before, with the digest of that document: a lower version is a rollback
/// to an old key list, and so is another document under the same version.
pub fn verify_keys(
    document: &[u8],
    sig_file: &[u8],
    root: &TrustedKeys,
    now: Timestamp,
    seen: Option<(u64, Digest)>,
) -> Result<VerifiedKeys, RolesError> {
    if document.len() > MAX_KEYS_BYTES {
        return Err(RolesError::TooLarge(document.len()));
    }
    let signed_by = signature::verify_doc(Domain::Keys, document, sig_file, root)?;
    let doc = KeysDoc::parse(document)?;
    if is_from_the_future(doc.created, now) {
        return Err(RolesError::FromTheFuture {
            created: doc.created,
            now,
        });
    }
    if doc.expires <= now {
        return Err(RolesError::Expired {
            expires: doc.expires,
            now,
        });
    }
    if let Some((version, digest)) = seen {
        if doc.version < version {
            return Err(RolesError::Rollback {
                seen: version,
                found: doc.version,
            });
        }
        if doc.version == version && Digest::of(document) != digest {
            return Err(RolesError::SameVersionChanged(version));
        }
    }
    if let Some(k) = doc
        .release
        .iter()
        .chain(&doc.freshness)
        .find(|k| root.get(&k.key_id).is_some())
    {
        return Err(RolesError::Malformed(format!(
            "root key {} is also listed as a release or freshness key; the root key stays offline and signs \
             only keys.toml",
            k.key_id
        )));
    }
    Ok(VerifiedKeys { doc, signed_by })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::SecretKey;

    pub fn doc(release: &SecretKey, freshness: &SecretKey, version: u64) -> KeysDoc {
        let created: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        let expires: Timestamp = "2027-11-01T00:00:00Z".parse().unwrap();
        KeysDoc {
            format: FORMAT,
            version,
            created,
            expires,
            critical: Vec::new(),
            release: vec![RoleKey::new(&release.public(), expires)],
            freshness: vec![RoleKey::new(
                &freshness.public(),
                "2027-01-01T00:00:00Z".parse().unwrap(),
            )],
        }
    }

    fn now() -> Timestamp {
        "2026-12-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn signed_by_root_only_and_never_rolled_back() {
        let (root, release, fresh) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
        let roots = TrustedKeys::new([root.public()]);
        let text = doc(&release, &fresh, 2).to_toml();
        let sig = signature::sign_with(Domain::Keys, text.as_bytes(), &[&root]).unwrap();
        let digest = Digest::of(text.as_bytes());
        let v = verify_keys(text.as_bytes(), sig.as_bytes(), &roots, now(), Some((2, digest))).unwrap();
        assert_eq!(&v.signed_by, root.id());
        assert_eq!(KeysDoc::parse(text.as_bytes()).unwrap(), v.doc);

        assert!(matches!(
            verify_keys(text.as_bytes(), sig.as_bytes(), &roots, now(), Some((3, digest))),
            Err(RolesError::Rollback { seen: 3, found: 2 })
        ));
        // Another list under the version already seen: refused too.
        assert!(matches!(
            verify_keys(
                text.as_bytes(),
                sig.as_bytes(),
                &roots,
                now(),
                Some((2, Digest::of(b"other")))
            ),
            Err(RolesError::SameVersionChanged(2))
        ));
        // Signed by the release key instead of the root: refused.
        let by_release = signature::sign_with(Domain::Keys, text.as_bytes(), &[&release]).unwrap();
        assert!(matches!(
            verify_keys(text.as_bytes(), by_release.as_bytes(), &roots, now(), None),
            Err(RolesError::Signature(SignatureError::UntrustedKey { .. }))
        ));
        // A root signature over a manifest is not a signature over keys.toml.
        let as_manifest = signature::sign(text.as_bytes(), &[&root]);
        assert!(verify_keys(text.as_bytes(), as_manifest.as_bytes(), &roots, now(), None).is_err());
        let late: Timestamp = "2028-01-01T00:00:00Z".parse().unwrap();
        assert!(matches!(
            verify_keys(text.as_bytes(), sig.as_bytes(), &roots, late, None),
            Err(RolesError::Expired { .. })
        ));
    }

    #[test]
    fn hostile_key_lists_are_refused() {
        let (root, release, fresh) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
        let roots = TrustedKeys::new([root.public()]);
        let check = |d: &KeysDoc| {
            let text = d.to_toml();
            let sig = signature::sign_with(Domain::Keys, text.as_bytes(), &[&root]).unwrap();
            verify_keys(text.as_bytes(), sig.as_bytes(), &roots, now(), None)
        };
        let mut both = doc(&release, &fresh, 1);
        both.freshness.push(both.release[0].clone());
        assert!(matches!(check(&both), Err(RolesError::Malformed(m)) if m.contains("both")));

        let mut root_listed = doc(&release, &fresh, 1);
        root_listed
            .release
            .push(RoleKey::new(&root.public(), root_listed.expires));
        assert!(matches!(check(&root_listed), Err(RolesError::Malformed(m)) if m.contains("root key")));

        let mut forged_id = doc(&release, &fresh, 1);
        forged_id.release[0].key_id = fresh.id().clone();
        assert!(matches!(check(&forged_id), Err(RolesError::Malformed(_))));

        let mut no_release = doc(&release, &fresh, 1);
        no_release.release.clear();
        assert!(matches!(check(&no_release), Err(RolesError::Malformed(_))));

        let mut many = doc(&release, &fresh, 1);
        many.release = (0..9)
            .map(|_| RoleKey::new(&SecretKey::generate().public(), many.expires))
            .collect();
        assert!(matches!(check(&many), Err(RolesError::Malformed(_))));

        let mut future = doc(&release, &fresh, 1);
        future.created = "2026-12-02T00:00:00Z".parse().unwrap();
        assert!(matches!(check(&future), Err(RolesError::FromTheFuture { .. })));

        let big = vec![b'#'; MAX_KEYS_BYTES + 1];
        assert!(matches!(
            verify_keys(&big, b"", &roots, now(), None),
            Err(RolesError::TooLarge(_))
        ));
        for garbage in ["", "format = 1", "format = 2\nversion = 1", "\u{0}"] {
            assert!(KeysDoc::parse(garbage.as_bytes()).is_err(), "{garbage:?}");
        }
        // A newer root's fields: optional ones ignored, a critical one refused.
        let text = doc(&release, &fresh, 1).to_toml();
        let newer = format!("threshold = 2\n{text}").replace("[[release]]\n", "[[release]]\nscope = \"stable\"\n");
        assert_eq!(KeysDoc::parse(newer.as_bytes()).unwrap(), doc(&release, &fresh, 1));
        let critical = format!("critical = [\"threshold\"]\n{newer}");
        assert!(matches!(
            KeysDoc::parse(critical.as_bytes()),
            Err(RolesError::UnknownCritical(f)) if f == ["threshold"]
        ));
        let mut full = doc(&release, &fresh, 1);
        full.critical = vec!["release.expires".into()];
        for p in evolve::paths_of(&full.to_toml()) {
            assert!(KNOWN_FIELDS.contains(&p.as_str()), "{p} is missing from KNOWN_FIELDS");
        }
        assert!(KeysDoc::parse(full.to_toml().as_bytes()).is_ok());
    }

    #[test]
    fn role_signatures_name_expired_and_foreign_keys() {
        let (release, fresh) = (SecretKey::generate(), SecretKey::generate());
        let d = doc(&release, &fresh, 1);
        let ts = signature::sign_with(Domain::Timestamp, b"t", &[&fresh]).unwrap();
        assert_eq!(
            &d.verify_signed(Role::Freshness, Domain::Timestamp, b"t", ts.as_bytes(), now())
                .unwrap(),
            fresh.id()
        );
        let after: Timestamp = "2027-02-01T00:00:00Z".parse().unwrap();
        assert!(matches!(
            d.verify_signed(Role::Freshness, Domain::Timestamp, b"t", ts.as_bytes(), after),
            Err(RolesError::KeyExpired {
                role: Role::Freshness,
                ..
            })
        ));
        // The freshness key cannot sign a manifest.
        let m = signature::sign_with(Domain::Manifest, b"m", &[&fresh]).unwrap();
        assert!(matches!(
            d.verify_signed(Role::Release, Domain::Manifest, b"m", m.as_bytes(), now()),
            Err(RolesError::NotInRole {
                role: Role::Release,
                ..
            })
        ));
        assert_eq!(d.soonest_expiry().to_string(), "2027-01-01T00:00:00Z");
    }
}
