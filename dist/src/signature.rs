//! Detached signatures over manifests.
//!
//! A signature file holds one or more ed25519 signatures over the exact manifest bytes,
//! each tagged with the signer's key id, so a channel can be signed by an old and a new key
//! during a rotation:
//!
//! ```toml
//! [[signatures]]
//! key_id = "3f9c0d2e8a1b4c77"
//! algorithm = "ed25519"
//! signature = "<128 hex digits>"
//! ```
//!
//! The signed message is a fixed domain prefix followed by the document bytes, one prefix
//! per kind of document ([`Domain`]), so an Atom signature can never be replayed as a
//! signature over some other kind of document: a freshness key's signature over a timestamp
//! is never a manifest signature, even if the same key held both roles.
//!
//! Entries of an algorithm this build does not know are skipped (a newer publisher may sign
//! with a new algorithm beside ed25519 during a migration); unknown fields are ignored.

use ed25519_dalek::Signature;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, PublicKey, SecretKey, TrustedKeys};

pub const MAX_SIGNATURE_FILE_BYTES: usize = 16 * 1024;
const MAX_SIGNATURES: usize = 16;
const ALGORITHM: &str = "ed25519";

/// What kind of document a signature is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// A channel manifest (release keys; the single key of a repository without roles).
    Manifest,
    /// `keys.toml`, the list of release and freshness keys (root keys).
    Keys,
    /// A channel's `timestamp.toml` (freshness keys).
    Timestamp,
    /// An installer medium's `install.toml` (release keys; see `install`).
    Install,
}

impl Domain {
    fn prefix(self) -> &'static [u8] {
        match self {
            Domain::Manifest => b"atom-manifest-v1\0",
            Domain::Keys => b"atom-keys-v1\0",
            Domain::Timestamp => b"atom-timestamp-v1\0",
            Domain::Install => b"atom-install-v1\0",
        }
    }
}

/// Something that makes ed25519 signatures: a key file here, or a key that never leaves a
/// hardware token (the builder's PKCS#11 signer).
pub trait Signer {
    fn key_id(&self) -> KeyId;
    fn public_key(&self) -> PublicKey;
    fn sign_message(&self, message: &[u8]) -> Result<[u8; 64], SignError>;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign with key {key}: {reason}")]
pub struct SignError {
    pub key: KeyId,
    pub reason: String,
}

impl Signer for SecretKey {
    fn key_id(&self) -> KeyId {
        self.id().clone()
    }
    fn public_key(&self) -> PublicKey {
        self.public()
    }
    fn sign_message(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(self.signing_key().sign(message).to_bytes())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SignatureFile {
    signatures: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    key_id: KeyId,
    algorithm: String,
    signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("signature file is {0} bytes; the limit is {MAX_SIGNATURE_FILE_BYTES}")]
    TooLarge(usize),
    #[error("no signature found for this manifest (unsigned, or the manifest was altered)")]
    Missing,
    #[error("signature file is malformed: {0}")]
    Malformed(String),
    #[error("manifest is signed only by untrusted key(s) {signed_by:?}; trusted: {trusted:?}")]
    UntrustedKey { signed_by: Vec<KeyId>, trusted: Vec<KeyId> },
    #[error("signature by trusted key {0} does not match the manifest (tampered or corrupt)")]
    BadSignature(KeyId),
}

/// The exact bytes signed for a document of kind `domain`.
pub fn message(domain: Domain, document: &[u8]) -> Vec<u8> {
    let prefix = domain.prefix();
    let mut m = Vec::with_capacity(prefix.len() + document.len());
    m.extend_from_slice(prefix);
    m.extend_from_slice(document);
    m
}

/// Signature file text for `manifest`, signed by every key given.
pub fn sign(manifest: &[u8], keys: &[&SecretKey]) -> String {
    let signers: Vec<&dyn Signer> = keys.iter().map(|k| *k as &dyn Signer).collect();
    sign_with(Domain::Manifest, manifest, &signers).expect("key files sign without failing")
}

/// Signature file text for a document of kind `domain`, signed by every signer given.
pub fn sign_with(domain: Domain, document: &[u8], signers: &[&dyn Signer]) -> Result<String, SignError> {
    let msg = message(domain, document);
    let signatures = signers
        .iter()
        .map(|k| {
            Ok(Entry {
                key_id: k.key_id(),
                algorithm: ALGORITHM.into(),
                signature: hex::encode(k.sign_message(&msg)?),
            })
        })
        .collect::<Result<_, SignError>>()?;
    Ok(toml::to_string(&SignatureFile { signatures }).expect("signature entries always serialize"))
}

/// Checks one raw signature over an already prefixed message (a signer's self-test).
pub fn check_raw(key: &PublicKey, message: &[u8], sig: &[u8; 64]) -> Result<(), SignatureError> {
    key.verifying_key()
        .verify_strict(message, &Signature::from_bytes(sig))
        .map_err(|_| SignatureError::BadSignature(key.id().clone()))
}

/// A signature file made of detached signatures (from `atom-build sign --output` on another
/// machine), merged: the same key twice is kept once.
pub fn merge(files: &[&[u8]]) -> Result<String, SignatureError> {
    let mut signatures: Vec<Entry> = Vec::new();
    for f in files {
        for e in parse(f)?.signatures {
            if !signatures
                .iter()
                .any(|s| s.key_id == e.key_id && s.algorithm == e.algorithm)
            {
                signatures.push(e);
            }
        }
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(SignatureError::Malformed(format!(
            "{} signatures; expected 1 to {MAX_SIGNATURES}",
            signatures.len()
        )));
    }
    Ok(toml::to_string(&SignatureFile { signatures }).expect("signature entries always serialize"))
}

/// Key ids named in a signature file, without checking anything else (for messages).
pub fn signers(sig_file: &[u8]) -> Result<Vec<KeyId>, SignatureError> {
    Ok(parse(sig_file)?.signatures.into_iter().map(|e| e.key_id).collect())
}

fn parse(sig_file: &[u8]) -> Result<SignatureFile, SignatureError> {
    if sig_file.is_empty() {
        return Err(SignatureError::Missing);
    }
    if sig_file.len() > MAX_SIGNATURE_FILE_BYTES {
        return Err(SignatureError::TooLarge(sig_file.len()));
    }
    let text = std::str::from_utf8(sig_file).map_err(|_| SignatureError::Malformed("not UTF-8 text".into()))?;
    let file: SignatureFile =
        toml::from_str(text).map_err(|e| SignatureError::Malformed(crate::parse_error::describe(text, &e)))?;
    if file.signatures.is_empty() || file.signatures.len() > MAX_SIGNATURES {
        return Err(SignatureError::Malformed(format!(
            "{} signatures; expected 1 to {MAX_SIGNATURES}",
            file.signatures.len()
        )));
    }
    Ok(file)
}

/// Checks that at least one trusted key signed `manifest`, with `verify_strict`.
///
/// A signature by an untrusted key is ignored (it may be a key being rotated in), but a bad
/// signature by a *trusted* key fails the whole check: it means the bytes were altered.
pub fn verify(manifest: &[u8], sig_file: &[u8], trusted: &TrustedKeys) -> Result<KeyId, SignatureError> {
    verify_doc(Domain::Manifest, manifest, sig_file, trusted)
}

/// As [`verify`], for a document of kind `domain`.
pub fn verify_doc(
    domain: Domain,
    document: &[u8],
    sig_file: &[u8],
    trusted: &TrustedKeys,
) -> Result<KeyId, SignatureError> {
    let file = parse(sig_file)?;
    let msg = message(domain, document);
    let mut good = None;
    for entry in &file.signatures {
        if entry.algorithm != ALGORITHM {
            tracing::debug!(algorithm = %entry.algorithm.escape_debug(), "skipping a signature of an unknown algorithm");
            continue;
        }
        let Some(key) = trusted.get(&entry.key_id) else {
            continue;
        };
        let mut raw = [0u8; 64];
        hex::decode_to_slice(&entry.signature, &mut raw)
            .map_err(|_| SignatureError::Malformed("signature must be 128 hex digits".into()))?;
        key.verifying_key()
            .verify_strict(&msg, &Signature::from_bytes(&raw))
            .map_err(|_| SignatureError::BadSignature(entry.key_id.clone()))?;
        good.get_or_insert_with(|| entry.key_id.clone());
    }
    good.ok_or_else(|| SignatureError::UntrustedKey {
        signed_by: file.signatures.iter().map(|e| e.key_id.clone()).collect(),
        trusted: trusted.ids().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip_with_rotation() {
        let old = SecretKey::generate();
        let new = SecretKey::generate();
        let sig = sign(b"manifest", &[&old, &new]);
        // A host that trusts only one of the two keys accepts the file.
        for k in [&old, &new] {
            let trusted = TrustedKeys::new([k.public()]);
            assert_eq!(&verify(b"manifest", sig.as_bytes(), &trusted).unwrap(), k.id());
        }
    }

    #[test]
    fn domains_do_not_mix_and_unknown_algorithms_are_skipped() {
        let key = SecretKey::generate();
        let trusted = TrustedKeys::new([key.public()]);
        let sig = sign(b"doc", &[&key]);
        for other in [Domain::Keys, Domain::Timestamp, Domain::Install] {
            assert!(matches!(
                verify_doc(other, b"doc", sig.as_bytes(), &trusted),
                Err(SignatureError::BadSignature(_))
            ));
        }
        let ts = sign_with(Domain::Timestamp, b"doc", &[&key]).unwrap();
        assert!(verify_doc(Domain::Timestamp, b"doc", ts.as_bytes(), &trusted).is_ok());

        let future = format!(
            "[[signatures]]\nkey_id = \"{}\"\nalgorithm = \"ml-dsa-65\"\nsignature = \"00\"\nhint = 1\n\n{sig}",
            key.id()
        );
        assert_eq!(&verify(b"doc", future.as_bytes(), &trusted).unwrap(), key.id());
        let only_future = future.split("\n\n").next().unwrap();
        assert!(matches!(
            verify(b"doc", only_future.as_bytes(), &trusted),
            Err(SignatureError::UntrustedKey { .. })
        ));

        let other = SecretKey::generate();
        let merged = merge(&[sig.as_bytes(), sign(b"doc", &[&other]).as_bytes(), sig.as_bytes()]).unwrap();
        assert_eq!(
            signers(merged.as_bytes()).unwrap(),
            [key.id().clone(), other.id().clone()]
        );
    }

    #[test]
    fn every_tamper_is_caught() {
        let key = SecretKey::generate();
        let trusted = TrustedKeys::new([key.public()]);
        let sig = sign(b"version = 1", &[&key]);

        assert!(matches!(
            verify(b"version = 2", sig.as_bytes(), &trusted),
            Err(SignatureError::BadSignature(_))
        ));

        let other = SecretKey::generate();
        let foreign = sign(b"version = 1", &[&other]);
        assert!(matches!(
            verify(b"version = 1", foreign.as_bytes(), &trusted),
            Err(SignatureError::UntrustedKey { .. })
        ));

        // Another key's signature relabelled with the trusted key id.
        let relabelled = foreign.replace(other.id().as_str(), key.id().as_str());
        assert!(matches!(
            verify(b"version = 1", relabelled.as_bytes(), &trusted),
            Err(SignatureError::BadSignature(_))
        ));

        assert!(matches!(verify(b"m", b"", &trusted), Err(SignatureError::Missing)));
        for garbage in [
            " ",
            "signatures = []",
            "signatures = 3",
            "[[signatures]]\nkey_id = \"x\"",
        ] {
            assert!(
                matches!(
                    verify(b"m", garbage.as_bytes(), &trusted),
                    Err(SignatureError::Malformed(_))
                ),
                "{garbage}"
            );
        }
        let short = sig.replace("signature = \"", "signature = \"ab");
        assert!(matches!(
            verify(b"version = 1", short.as_bytes(), &trusted),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(b"m", &vec![b'#'; 20000], &trusted),
            Err(SignatureError::TooLarge(_))
        ));
    }
}
