//! Passphrase-protected signing key files.
//!
//! ```toml
//! kind = "atom-signing-key-encrypted"
//! key_id = "3f9c0d2e8a1b4c77"
//! kdf = "argon2id"                 # m_cost_kib, t_cost, p_cost: its parameters
//! m_cost_kib = 65536
//! t_cost = 3
//! p_cost = 1
//! salt = "<32 hex digits>"
//! nonce = "<48 hex digits>"        # XChaCha20-Poly1305
//! ciphertext = "<96 hex digits>"   # the 32 secret bytes and the 16-byte tag
//! ```
//!
//! The key id is the associated data, so a ciphertext moved into another key's file does
//! not decrypt; the id is checked against the decrypted key as for plain key files.

use std::path::Path;

use anyhow::{Context, Result, bail};
use atom_dist::SecretKey;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

pub const KIND: &str = "atom-signing-key-encrypted";
const KDF: &str = "argon2id";
/// 64 MiB and 3 passes: about a second here, and costly to guess at scale.
const M_COST_KIB: u32 = 64 * 1024;
const T_COST: u32 = 3;
/// Refuse parameters that would make opening a (hostile) key file take the machine down.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptedFile {
    kind: String,
    key_id: String,
    kdf: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

fn derive(passphrase: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32]> {
    let params = argon2::Params::new(m, t, p, Some(32)).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let mut out = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
    Ok(out)
}

/// The key file's text, the secret encrypted under `passphrase`.
pub fn to_file_text(key: &SecretKey, passphrase: &[u8]) -> Result<String> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut salt);
    rand_core::OsRng.fill_bytes(&mut nonce);
    let kek = derive(passphrase, &salt, M_COST_KIB, T_COST, 1)?;
    let cipher = XChaCha20Poly1305::new((&kek).into());
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &key.secret_bytes(),
                aad: key.id().as_str().as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("encryption failed"))?;
    let body = toml::to_string(&EncryptedFile {
        kind: KIND.into(),
        key_id: key.id().to_string(),
        kdf: KDF.into(),
        m_cost_kib: M_COST_KIB,
        t_cost: T_COST,
        p_cost: 1,
        salt: hex::encode(salt),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ciphertext),
    })?;
    Ok(format!(
        "# Atom signing key, encrypted with a passphrase (argon2id, XChaCha20-Poly1305).\n{body}"
    ))
}

pub fn is_encrypted(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("kind").and_then(|k| k.as_str()).map(|k| k == KIND))
        .unwrap_or(false)
}

pub fn decrypt(path: &Path, text: &str, passphrase: &[u8]) -> Result<SecretKey> {
    let f: EncryptedFile =
        toml::from_str(text).with_context(|| format!("{} is not a valid encrypted key file", path.display()))?;
    if f.kdf != KDF {
        bail!(
            "{}: key derivation {:?} is not supported (only {KDF})",
            path.display(),
            f.kdf
        );
    }
    if f.m_cost_kib > MAX_M_COST_KIB || f.t_cost > MAX_T_COST || f.p_cost == 0 || f.p_cost > 16 {
        bail!("{}: argon2 parameters out of range", path.display());
    }
    let bad_hex = |field: &str| anyhow::anyhow!("{}: `{field}` is not hex of the right length", path.display());
    let salt = hex::decode(&f.salt).map_err(|_| bad_hex("salt"))?;
    let mut nonce = [0u8; 24];
    hex::decode_to_slice(&f.nonce, &mut nonce).map_err(|_| bad_hex("nonce"))?;
    let ciphertext = hex::decode(&f.ciphertext).map_err(|_| bad_hex("ciphertext"))?;
    if salt.len() < 8 || ciphertext.len() != 48 {
        return Err(bad_hex("salt/ciphertext"));
    }
    let kek = derive(passphrase, &salt, f.m_cost_kib, f.t_cost, f.p_cost)?;
    let plain = XChaCha20Poly1305::new((&kek).into())
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &ciphertext,
                aad: f.key_id.as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("{}: wrong passphrase (or the file was altered)", path.display()))?;
    let secret: [u8; 32] = plain.as_slice().try_into().map_err(|_| bad_hex("ciphertext"))?;
    let key = SecretKey::from_bytes(&secret);
    if key.id().as_str() != f.key_id {
        bail!(
            "{}: the file says key id {} but the key's id is {}",
            path.display(),
            f.key_id,
            key.id()
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_wrong_passphrase_and_moved_ciphertext() {
        let key = SecretKey::generate();
        let text = to_file_text(&key, b"correct horse").unwrap();
        assert!(is_encrypted(&text));
        assert!(!is_encrypted(&key.to_file_text()));
        let p = Path::new("k.key");
        assert_eq!(decrypt(p, &text, b"correct horse").unwrap().id(), key.id());
        let e = decrypt(p, &text, b"wrong").err().unwrap().to_string();
        assert!(e.contains("wrong passphrase"), "{e}");
        let other = SecretKey::generate();
        let relabelled = text.replace(key.id().as_str(), other.id().as_str());
        assert!(decrypt(p, &relabelled, b"correct horse").is_err());
        let greedy = text.replace("m_cost_kib = 65536", "m_cost_kib = 4294967295");
        let e = decrypt(p, &greedy, b"correct horse").err().unwrap().to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}
