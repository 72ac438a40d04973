//! Where signatures come from: key files (plain or passphrase-protected) and PKCS#11 tokens.
//!
//! Every command that signs takes `--key SPEC`: a path to a key file from `keygen`, or a
//! `pkcs11:` URI. The release and root keys can so stay on an HSM or an offline machine.

pub mod encrypted;
pub mod pkcs11;

use std::path::Path;

use anyhow::{Context, Result, bail};
use atom_dist::SecretKey;
use atom_dist::signature::Signer;

/// Refuses (like ssh) a secret others may read or write, or that another user owns.
pub fn check_secret_file(path: &Path, what: &str) -> Result<()> {
    atom_dist::keys::check_private(path).with_context(|| format!("{what} {}", path.display()))
}

/// Asks on the terminal, without echo; without a terminal, says how to give it instead.
pub fn ask_secret(prompt: &str) -> Result<String> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!(
            "{}needs a secret and there is no terminal to ask on (see --passphrase-file, or ATOM_PKCS11_PIN / pin-source= for tokens)",
            prompt.trim_end_matches(": ")
        );
    }
    rpassword::prompt_password(prompt).context("cannot read from the terminal")
}

/// The passphrase from `file` (its first line), else asked on the terminal.
pub fn passphrase(file: Option<&Path>, prompt: &str) -> Result<Vec<u8>> {
    match file {
        Some(p) => {
            check_secret_file(p, "passphrase file")?;
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                bail!("passphrase file {} is empty", p.display());
            }
            Ok(line.as_bytes().to_vec())
        }
        None => Ok(ask_secret(prompt)?.into_bytes()),
    }
}

/// A signer for `spec`: a `pkcs11:` URI, or a key file (asking for its passphrase if it
/// is encrypted).
pub fn load(spec: &str, passphrase_file: Option<&Path>) -> Result<Box<dyn Signer>> {
    if pkcs11::is_uri(spec) {
        let signer =
            pkcs11::Pkcs11Signer::open(spec).with_context(|| format!("PKCS#11 key {}", pkcs11::redact(spec)))?;
        return Ok(Box::new(signer));
    }
    let path = Path::new(spec);
    let text = SecretKey::read_private_file(path)?;
    if encrypted::is_encrypted(&text) {
        let pass = passphrase(passphrase_file, &format!("passphrase of {}: ", path.display()))?;
        return Ok(Box::new(encrypted::decrypt(path, &text, &pass)?));
    }
    Ok(Box::new(SecretKey::from_file_text(path, &text)?))
}
