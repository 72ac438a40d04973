//! Everything a client checks about a manifest before it believes it.

use jiff::Timestamp;
use semver::Version;

use crate::keys::{KeyId, TrustedKeys};
use crate::manifest::{Manifest, ManifestError};
use crate::roles::{self, Role, RolesError, VerifiedKeys};
use crate::signature::{self, Domain, SignatureError};
use crate::timestamp::{TimestampDoc, TimestampError};

/// What the verifier holds the manifest against.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    /// Keys that sign manifests directly; under key roles ([`verify_chain`]) the root keys.
    pub trusted: &'a TrustedKeys,
    /// The clock, passed in so tests (and offline audits) can choose it.
    pub now: Timestamp,
    /// The host's board string; `None` only for repository audits.
    pub board: Option<&'a str>,
    /// The channel the client asked for; a manifest for another channel is a substitution.
    pub channel: Option<&'a str>,
    /// The verifying agent's version, held against the manifest's `min_agent`; `None` for
    /// publishers and audits.
    pub agent: Option<&'a Version>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest expired at {expires} (now {now}); the publisher must re-sign the channel")]
    Expired { expires: Timestamp, now: Timestamp },
    #[error("manifest is for board {found:?}, this host is {expected:?}")]
    WrongBoard { expected: String, found: String },
    #[error("manifest is for channel {found:?}, requested {expected:?}")]
    WrongChannel { expected: String, found: String },
    #[error(
        "manifest was created at {created}, after this host's clock ({now}) plus the {}-minute skew allowed: \
         refused (a manifest from the future would lock the channel as a replay watermark); if the host's clock \
         is wrong, fix it (timedatectl)", MAX_CLOCK_SKEW.as_secs() / 60
    )]
    FromTheFuture { created: Timestamp, now: Timestamp },
    #[error(
        "manifest {version} needs agent {min_agent} or newer, this agent is {agent}: update the agent first \
         (an image with a newer agent must be installed before this one)"
    )]
    AgentTooOld {
        version: Version,
        min_agent: Version,
        agent: Version,
    },
    #[error(transparent)]
    Roles(#[from] RolesError),
    #[error(transparent)]
    Timestamp(#[from] TimestampError),
    #[error(
        "timestamp expired at {expires} (now {now}): the mirror is stale or the freshness timer stopped (atom-build refresh)"
    )]
    TimestampExpired { expires: Timestamp, now: Timestamp },
    #[error(
        "timestamp created {created} is older than one this host already accepted ({seen}): a replay or a stale mirror"
    )]
    StaleTimestamp { created: Timestamp, seen: Timestamp },
    #[error(
        "keys.toml version {keys} is older than the version {timestamp} the timestamp was signed under: a \
         stale or mixed-up mirror"
    )]
    KeysOlderThanTimestamp { keys: u64, timestamp: u64 },
    #[error("the manifest is not the one the timestamp names ({0}): a mirror in the middle of an update, or tampering")]
    TimestampMismatch(String),
}

/// How far a manifest's `created` may be ahead of the verifier's clock.
pub const MAX_CLOCK_SKEW: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

/// `Policy::now` for audits of history: neither expiry nor the clock apply.
pub const AUDIT_HISTORY: Timestamp = Timestamp::MIN;

/// Whether `t` is more than the allowed skew ahead of `now`.
pub fn is_from_the_future(t: Timestamp, now: Timestamp) -> bool {
    now != AUDIT_HISTORY && now.checked_add(MAX_CLOCK_SKEW).is_ok_and(|limit| t > limit)
}

/// A manifest whose signature, expiry, board and channel have been checked.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub signed_by: KeyId,
}

/// Signature first: nothing in an unauthenticated manifest is looked at beyond its size.
pub fn verify_manifest(manifest: &[u8], sig_file: &[u8], policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    let signed_by = signature::verify(manifest, sig_file, policy.trusted)?;
    check_contents(manifest, signed_by, policy)
}

/// What a repository with key roles serves for a channel, as fetched.
#[derive(Clone, Copy, Debug)]
pub struct RoleDocs<'a> {
    pub keys: &'a [u8],
    pub keys_sig: &'a [u8],
    pub timestamp: &'a [u8],
    pub timestamp_sig: &'a [u8],
    pub manifest: &'a [u8],
    pub manifest_sig: &'a [u8],
}

/// What a host accepted before: nothing older is taken again.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// The highest keys.toml version accepted, and that document's digest.
    pub keys: Option<(u64, crate::Digest)>,
    pub timestamp: Option<Timestamp>,
}

/// A manifest verified through the whole chain root → keys.toml → timestamp → manifest.
#[derive(Clone, Debug)]
pub struct VerifiedChain {
    pub verified: Verified,
    pub keys: VerifiedKeys,
    pub timestamp: TimestampDoc,
    pub timestamp_signed_by: KeyId,
}

/// Verifies a channel under key roles: `policy.trusted` holds the root keys; the release
/// and freshness keys come from the root-signed `keys.toml`. All three signatures are
/// required: each document is authenticated before anything in it is used.
pub fn verify_chain(docs: &RoleDocs<'_>, policy: &Policy<'_>, seen: Seen) -> Result<VerifiedChain, VerifyError> {
    let now = policy.now;
    let keys = roles::verify_keys(docs.keys, docs.keys_sig, policy.trusted, now, seen.keys)?;
    if docs.timestamp.len() > crate::timestamp::MAX_TIMESTAMP_BYTES {
        return Err(TimestampError::TooLarge(docs.timestamp.len()).into());
    }
    let timestamp_signed_by = keys.doc.verify_signed(
        Role::Freshness,
        Domain::Timestamp,
        docs.timestamp,
        docs.timestamp_sig,
        now,
    )?;
    let timestamp = TimestampDoc::parse(docs.timestamp)?;
    if let Some(channel) = policy.channel.filter(|c| *c != timestamp.channel) {
        return Err(VerifyError::WrongChannel {
            expected: channel.into(),
            found: timestamp.channel,
        });
    }
    if keys.doc.version < timestamp.keys_version {
        return Err(VerifyError::KeysOlderThanTimestamp {
            keys: keys.doc.version,
            timestamp: timestamp.keys_version,
        });
    }
    if is_from_the_future(timestamp.created, now) {
        return Err(VerifyError::FromTheFuture {
            created: timestamp.created,
            now,
        });
    }
    if timestamp.expires <= now {
        return Err(VerifyError::TimestampExpired {
            expires: timestamp.expires,
            now,
        });
    }
    if let Some(seen) = seen.timestamp.filter(|t| timestamp.created < *t) {
        return Err(VerifyError::StaleTimestamp {
            created: timestamp.created,
            seen,
        });
    }
    if !timestamp.names(docs.manifest) {
        return Err(VerifyError::TimestampMismatch(format!(
            "it names {} of {} bytes for version {}",
            timestamp.manifest, timestamp.manifest_size, timestamp.version
        )));
    }
    let signed_by = keys
        .doc
        .verify_signed(Role::Release, Domain::Manifest, docs.manifest, docs.manifest_sig, now)?;
    let verified = check_contents(docs.manifest, signed_by, policy)?;
    Ok(VerifiedChain {
        verified,
        keys,
        timestamp,
        timestamp_signed_by,
    })
}

/// Everything after the signature: format, dates, agent version, board, channel.
fn check_contents(manifest: &[u8], signed_by: KeyId, policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    let manifest = Manifest::parse(manifest)?;
    if let (Some(agent), Some(min)) = (policy.agent, &manifest.min_agent)
        && agent < min
    {
        return Err(VerifyError::AgentTooOld {
            version: manifest.version,
            min_agent: min.clone(),
            agent: agent.clone(),
        });
    }
    if is_from_the_future(manifest.created, policy.now) {
        return Err(VerifyError::FromTheFuture {
            created: manifest.created,
            now: policy.now,
        });
    }
    if manifest.expires <= policy.now {
        return Err(VerifyError::Expired {
            expires: manifest.expires,
            now: policy.now,
        });
    }
    if let Some(board) = policy.board.filter(|b| *b != manifest.board) {
        return Err(VerifyError::WrongBoard {
            expected: board.into(),
            found: manifest.board,
        });
    }
    if let Some(channel) = policy.channel.filter(|c| *c != manifest.channel) {
        return Err(VerifyError::WrongChannel {
            expected: channel.into(),
            found: manifest.channel,
        });
    }
    Ok(Verified { manifest, signed_by })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::manifest::tests::sample;

    fn setup() -> (SecretKey, TrustedKeys, Vec<u8>, String) {
        let key = SecretKey::generate();
        let trusted = TrustedKeys::new([key.public()]);
        let bytes = sample().to_toml().into_bytes();
        let sig = signature::sign(&bytes, &[&key]);
        (key, trusted, bytes, sig)
    }

    fn policy(trusted: &TrustedKeys) -> Policy<'_> {
        Policy {
            trusted,
            now: "2026-11-15T00:00:00Z".parse().unwrap(),
            board: Some("x86_64-generic"),
            channel: Some("stable"),
            agent: None,
        }
    }

    #[test]
    fn good_manifest_verifies() {
        let (key, trusted, bytes, sig) = setup();
        let v = verify_manifest(&bytes, sig.as_bytes(), &policy(&trusted)).unwrap();
        assert_eq!(&v.signed_by, key.id());
        assert_eq!(v.manifest, sample());
    }

    #[test]
    fn every_byte_flip_is_rejected() {
        let (_, trusted, bytes, sig) = setup();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                verify_manifest(&t, sig.as_bytes(), &policy(&trusted)).is_err(),
                "flip at byte {i}"
            );
        }
    }

    #[test]
    fn expired_wrong_board_wrong_channel() {
        let (_, trusted, bytes, sig) = setup();
        let mut p = policy(&trusted);
        p.now = "2027-01-01T00:00:00Z".parse().unwrap();
        assert!(matches!(
            verify_manifest(&bytes, sig.as_bytes(), &p),
            Err(VerifyError::Expired { .. })
        ));

        let mut p = policy(&trusted);
        p.board = Some("aarch64-rpi4");
        assert!(matches!(
            verify_manifest(&bytes, sig.as_bytes(), &p),
            Err(VerifyError::WrongBoard { .. })
        ));

        let mut p = policy(&trusted);
        p.channel = Some("beta");
        assert!(matches!(
            verify_manifest(&bytes, sig.as_bytes(), &p),
            Err(VerifyError::WrongChannel { .. })
        ));
    }

    #[test]
    fn signature_from_another_manifest_is_rejected() {
        let (key, trusted, bytes, _) = setup();
        let mut other = sample();
        other.version = semver::Version::new(9, 0, 0);
        let other_sig = signature::sign(other.to_toml().as_bytes(), &[&key]);
        assert!(matches!(
            verify_manifest(&bytes, other_sig.as_bytes(), &policy(&trusted)),
            Err(VerifyError::Signature(SignatureError::BadSignature(_)))
        ));
    }

    struct Chain {
        root: SecretKey,
        release: SecretKey,
        fresh: SecretKey,
        keys: String,
        keys_sig: String,
        ts: String,
        ts_sig: String,
        manifest: String,
        manifest_sig: String,
    }

    impl Chain {
        fn new() -> Self {
            let (root, release, fresh) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
            let mut c = Chain {
                keys: String::new(),
                keys_sig: String::new(),
                ts: String::new(),
                ts_sig: String::new(),
                manifest: sample().to_toml(),
                manifest_sig: String::new(),
                root,
                release,
                fresh,
            };
            c.set_keys(crate::roles::tests::doc(&c.release, &c.fresh, 1));
            c.manifest_sig = signature::sign(c.manifest.as_bytes(), &[&c.release]);
            c.stamp("2026-11-14T00:00:00Z", "2026-11-21T00:00:00Z");
            c
        }

        fn set_keys(&mut self, doc: crate::roles::KeysDoc) {
            self.keys = doc.to_toml();
            self.keys_sig = signature::sign_with(Domain::Keys, self.keys.as_bytes(), &[&self.root]).unwrap();
        }

        fn stamp(&mut self, created: &str, expires: &str) {
            self.ts = TimestampDoc {
                format: 1,
                channel: "stable".into(),
                version: Version::new(2, 0, 0),
                manifest: crate::Digest::of(self.manifest.as_bytes()),
                manifest_size: self.manifest.len() as u64,
                keys_version: 1,
                created: created.parse().unwrap(),
                expires: expires.parse().unwrap(),
                critical: Vec::new(),
            }
            .to_toml();
            self.ts_sig = signature::sign_with(Domain::Timestamp, self.ts.as_bytes(), &[&self.fresh]).unwrap();
        }

        fn docs(&self) -> RoleDocs<'_> {
            RoleDocs {
                keys: self.keys.as_bytes(),
                keys_sig: self.keys_sig.as_bytes(),
                timestamp: self.ts.as_bytes(),
                timestamp_sig: self.ts_sig.as_bytes(),
                manifest: self.manifest.as_bytes(),
                manifest_sig: self.manifest_sig.as_bytes(),
            }
        }

        fn verify(&self, seen: Seen) -> Result<VerifiedChain, VerifyError> {
            let roots = TrustedKeys::new([self.root.public()]);
            verify_chain(&self.docs(), &policy(&roots), seen)
        }
    }

    #[test]
    fn the_chain_needs_all_three_keys() {
        let c = Chain::new();
        let v = c.verify(Seen::default()).unwrap();
        assert_eq!(&v.verified.signed_by, c.release.id());
        assert_eq!(&v.timestamp_signed_by, c.fresh.id());
        assert_eq!(&v.keys.signed_by, c.root.id());

        // A manifest signed by the root (the legacy single key) is not enough.
        let mut by_root = Chain::new();
        by_root.manifest_sig = signature::sign(by_root.manifest.as_bytes(), &[&by_root.root]);
        assert!(matches!(
            by_root.verify(Seen::default()),
            Err(VerifyError::Roles(RolesError::NotInRole {
                role: Role::Release,
                ..
            }))
        ));
        // A timestamp signed by the release key is not enough either.
        let mut ts_by_release = Chain::new();
        ts_by_release.ts_sig = signature::sign_with(
            Domain::Timestamp,
            ts_by_release.ts.as_bytes(),
            &[&ts_by_release.release],
        )
        .unwrap();
        assert!(matches!(
            ts_by_release.verify(Seen::default()),
            Err(VerifyError::Roles(RolesError::NotInRole {
                role: Role::Freshness,
                ..
            }))
        ));
        // Another root.
        let roots = TrustedKeys::new([SecretKey::generate().public()]);
        assert!(verify_chain(&c.docs(), &policy(&roots), Seen::default()).is_err());
    }

    #[test]
    fn stale_expired_and_mismatched_timestamps_are_refused() {
        let mut c = Chain::new();
        let seen = Seen {
            keys: Some((1, crate::Digest::of(c.keys.as_bytes()))),
            timestamp: Some("2026-11-14T12:00:00Z".parse().unwrap()),
        };
        assert!(matches!(c.verify(seen), Err(VerifyError::StaleTimestamp { .. })));
        c.stamp("2026-11-01T00:00:00Z", "2026-11-08T00:00:00Z");
        assert!(matches!(
            c.verify(Seen::default()),
            Err(VerifyError::TimestampExpired { .. })
        ));
        let mut other = Chain::new();
        let mut m = sample();
        m.version = Version::new(2, 0, 1);
        other.manifest = m.to_toml();
        other.manifest_sig = signature::sign(other.manifest.as_bytes(), &[&other.release]);
        assert!(matches!(
            other.verify(Seen::default()),
            Err(VerifyError::TimestampMismatch(_))
        ));
        // A timestamp signed under keys.toml version 2, served with version 1.
        let mut mixed = Chain::new();
        mixed.ts = mixed.ts.replace("keys_version = 1", "keys_version = 2");
        mixed.ts_sig = signature::sign_with(Domain::Timestamp, mixed.ts.as_bytes(), &[&mixed.fresh]).unwrap();
        assert!(matches!(
            mixed.verify(Seen::default()),
            Err(VerifyError::KeysOlderThanTimestamp { keys: 1, timestamp: 2 })
        ));
    }

    #[test]
    fn release_keys_rotate_and_freshness_keys_expire() {
        let mut c = Chain::new();
        let new_release = SecretKey::generate();
        let mut doc = crate::roles::tests::doc(&new_release, &c.fresh, 2);
        doc.created = "2026-11-10T00:00:00Z".parse().unwrap();
        c.set_keys(doc);
        // Signed by the retired key: refused once keys.toml no longer lists it.
        assert!(matches!(
            c.verify(Seen::default()),
            Err(VerifyError::Roles(RolesError::NotInRole { .. }))
        ));
        c.manifest_sig = signature::sign(c.manifest.as_bytes(), &[&new_release]);
        let v = c.verify(Seen::default()).unwrap();
        assert_eq!(v.keys.doc.version, 2);

        let mut expired = Chain::new();
        let mut doc = crate::roles::tests::doc(&expired.release, &expired.fresh, 1);
        doc.freshness[0].expires = "2026-11-10T00:00:00Z".parse().unwrap();
        expired.set_keys(doc);
        assert!(matches!(
            expired.verify(Seen::default()),
            Err(VerifyError::Roles(RolesError::KeyExpired {
                role: Role::Freshness,
                ..
            }))
        ));
    }

    #[test]
    fn min_agent_refuses_older_agents() {
        let key = SecretKey::generate();
        let trusted = TrustedKeys::new([key.public()]);
        let mut m = sample();
        m.min_agent = Some(Version::new(0, 2, 0));
        let bytes = m.to_toml().into_bytes();
        let sig = signature::sign(&bytes, &[&key]);
        let mut p = policy(&trusted);
        let old = Version::new(0, 1, 9);
        p.agent = Some(&old);
        match verify_manifest(&bytes, sig.as_bytes(), &p) {
            Err(e @ VerifyError::AgentTooOld { .. }) => assert!(e.to_string().contains("update the agent first")),
            other => panic!("{other:?}"),
        }
        let new = Version::new(0, 2, 0);
        p.agent = Some(&new);
        assert!(verify_manifest(&bytes, sig.as_bytes(), &p).is_ok());
    }
}
