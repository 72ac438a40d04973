//! `atom-build keys`: the root-signed keys.toml naming release and freshness keys.

use anyhow::{Context, Result, bail};
use atom_dist::repo::SignedManifest;
use atom_dist::roles::{self, KeysDoc, RoleKey};
use atom_dist::signature::{self, Domain, Signer};
use atom_dist::{PublicKey, Repository, TrustedKeys};
use jiff::{SignedDuration, Timestamp};

use crate::cli::KeysArgs;
use crate::publish::repo_roles;

pub fn run(args: &KeysArgs) -> Result<()> {
    let roots: Vec<Box<dyn Signer>> = args
        .root_keys
        .iter()
        .map(|spec| crate::signing::load(spec, args.passphrase_file.as_deref()))
        .collect::<Result<_>>()?;
    let repo = Repository::open_or_create(&args.repo)?;
    let _lock = repo.lock()?;
    let now = Timestamp::now().round(jiff::Unit::Second)?;
    let previous = repo_roles(&repo)?;
    let version = match (args.version, &previous) {
        (Some(v), Some(p)) if v <= p.version => {
            bail!(
                "--version {v} is not above the repository's keys.toml version {}; hosts would refuse it",
                p.version
            )
        }
        (Some(v), _) => v,
        (None, Some(p)) => p
            .version
            .checked_add(1)
            .context("the repository's keys.toml version is at its maximum; give a valid --version")?,
        // On an empty directory (the offline root machine) the version cannot be guessed,
        // and a guess of 1 every time would let an old list be replayed as a new one.
        (None, None) => bail!(
            "{} has no keys.toml to count from: give --version (1 for the first list, else one above the \
             version the hosts have: `atom-build verify --root` prints it)",
            repo.root().display()
        ),
    };
    if let Some(p) = &previous
        && p.created > now
    {
        bail!(
            "this machine's clock ({now}) is behind the current keys.toml (created {}): fix the clock",
            p.created
        );
    }
    let keys_expire = now
        .checked_add(SignedDuration::try_from(args.keys_expire_in)?)
        .context("--keys-expire-in is too far in the future")?;
    let load = |paths: &[std::path::PathBuf]| -> Result<Vec<RoleKey>> {
        paths
            .iter()
            .map(|p| Ok(RoleKey::new(&PublicKey::load(p)?, keys_expire)))
            .collect()
    };
    let doc = KeysDoc {
        format: roles::FORMAT,
        version,
        created: now,
        expires: now
            .checked_add(SignedDuration::try_from(args.expires_in)?)
            .context("--expires-in is too far in the future")?,
        critical: Vec::new(),
        release: load(&args.release)?,
        freshness: load(&args.freshness)?,
    };
    let text = doc.to_toml();
    let signers: Vec<&dyn Signer> = roots.iter().map(|k| k.as_ref()).collect();
    let sig = signature::sign_with(Domain::Keys, text.as_bytes(), &signers)?;
    // Check it as a host will: root signature, contents, roles kept apart.
    let trusted = TrustedKeys::new(roots.iter().map(|k| k.public_key()));
    roles::verify_keys(text.as_bytes(), sig.as_bytes(), &trusted, now, None)
        .context("the new keys.toml would be refused by hosts")?;
    repo.commit_keys(&SignedManifest {
        manifest: text.into_bytes(),
        signature: sig.into_bytes(),
    })?;
    println!(
        "keys.toml version {version} signed by {:?}: release {:?}, freshness {:?}, keys valid until {keys_expire}, \
         the list until {}",
        roots.iter().map(|k| k.key_id().to_string()).collect::<Vec<_>>(),
        doc.release.iter().map(|k| k.key_id.to_string()).collect::<Vec<_>>(),
        doc.freshness.iter().map(|k| k.key_id.to_string()).collect::<Vec<_>>(),
        doc.expires
    );
    println!("hosts trust the root key(s) in /etc/atom/keys/root/; run `atom-build refresh` for each channel next");
    Ok(())
}
