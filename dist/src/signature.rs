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
//! The signed message is a fixed domain prefix followed by the manifest bytes, so an Atom
//! signature can never be replayed as a signature over some other kind of document.

use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, SecretKey, TrustedKeys};

const DOMAIN: &[u8] = b"atom-manifest-v1\0";
pub const MAX_SIGNATURE_FILE_BYTES: usize = 16 * 1024;
const MAX_SIGNATURES: usize = 16;
const ALGORITHM: &str = "ed25519";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    signatures: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

fn message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + manifest.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(manifest);
    m
}

/// Signature file text for `manifest`, signed by every key given.
pub fn sign(manifest: &[u8], keys: &[&SecretKey]) -> String {
    let msg = message(manifest);
    let signatures = keys
        .iter()
        .map(|k| Entry {
            key_id: k.id().clone(),
            algorithm: ALGORITHM.into(),
            signature: hex::encode(k.signing_key().sign(&msg).to_bytes()),
        })
        .collect();
    toml::to_string(&SignatureFile { signatures }).expect("signature entries always serialize")
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
    let file = parse(sig_file)?;
    let msg = message(manifest);
    let mut good = None;
    for entry in &file.signatures {
        if entry.algorithm != ALGORITHM {
            return Err(SignatureError::Malformed(format!(
                "unknown algorithm {:?}",
                entry.algorithm
            )));
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
