//! `atom-build keygen`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use atom_dist::SecretKey;

use crate::cli::KeygenArgs;

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `create_new` so an existing key is never clobbered; the mode is set at creation so
/// the secret is never readable by others, not even for an instant.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &KeygenArgs) -> Result<()> {
    let secret_path = with_suffix(&args.out, ".key");
    let public_path = with_suffix(&args.out, ".pub");
    if let Some(uri) = &args.in_token {
        anyhow::ensure!(
            !public_path.exists(),
            "{} already exists; refusing to overwrite a key",
            public_path.display()
        );
        let public = crate::signing::pkcs11::Pkcs11Signer::generate(uri)?;
        write_new(&public_path, 0o644, &public.to_file_text())?;
        println!(
            "key id {} (generated inside the token; the secret never leaves it)",
            public.id()
        );
        println!("public key: {}", public_path.display());
        println!("sign with: --key '{}'", crate::signing::pkcs11::redact(uri));
        return Ok(());
    }
    for p in [&secret_path, &public_path] {
        anyhow::ensure!(
            !p.exists(),
            "{} already exists; refusing to overwrite a key",
            p.display()
        );
    }
    let key = SecretKey::generate();
    let text = if args.encrypt {
        let pass = match &args.passphrase_file {
            Some(f) => crate::signing::passphrase(Some(f), "")?,
            None => {
                let a = crate::signing::ask_secret("passphrase for the new key: ")?;
                let b = crate::signing::ask_secret("the same passphrase again: ")?;
                anyhow::ensure!(a == b, "the passphrases differ");
                a.into_bytes()
            }
        };
        anyhow::ensure!(pass.len() >= 8, "a passphrase of at least 8 characters, please");
        crate::signing::encrypted::to_file_text(&key, &pass)?
    } else {
        key.to_file_text()
    };
    write_new(&secret_path, 0o600, &text)?;
    if let Err(e) = write_new(&public_path, 0o644, &key.public().to_file_text()) {
        let _ = std::fs::remove_file(&secret_path);
        return Err(e);
    }
    println!("key id {}", key.id());
    println!(
        "secret key: {} (mode 0600; keep it off the hosts)",
        secret_path.display()
    );
    println!(
        "public key: {} (hosts: /etc/atom/keys/ for a single-key repository, /etc/atom/keys/root/ for a root key)",
        public_path.display()
    );
    Ok(())
}
