//! Everything a client checks about a manifest before it believes it.

use jiff::Timestamp;

use crate::keys::{KeyId, TrustedKeys};
use crate::manifest::{Manifest, ManifestError};
use crate::signature::{self, SignatureError};

/// What the verifier holds the manifest against.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    pub trusted: &'a TrustedKeys,
    /// The clock, passed in so tests (and offline audits) can choose it.
    pub now: Timestamp,
    /// The host's board string; `None` only for repository audits.
    pub board: Option<&'a str>,
    /// The channel the client asked for; a manifest for another channel is a substitution.
    pub channel: Option<&'a str>,
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
    let manifest = Manifest::parse(manifest)?;
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
}
