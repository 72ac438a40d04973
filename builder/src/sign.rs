//! `atom-build sign`: the second half of `publish --sign-later`, here or air-gapped.

use std::path::Path;

use anyhow::{Context, Result, bail};
use atom_dist::manifest::{MAX_MANIFEST_BYTES, Manifest};
use atom_dist::repo::SignedManifest;
use atom_dist::signature::{self, Domain, Signer};
use atom_dist::verify::{Policy, verify_manifest};
use atom_dist::{PublicKey, Repository, TrustedKeys, fsutil, localfile};
use jiff::Timestamp;

use crate::cli::SignArgs;
use crate::publish::{check_role, current_manifest, repo_roles};

pub fn run(args: &SignArgs) -> Result<()> {
    let signers: Vec<Box<dyn Signer>> = args
        .keys
        .iter()
        .map(|spec| crate::signing::load(spec, args.passphrase_file.as_deref()))
        .collect::<Result<_>>()?;
    match (&args.manifest, &args.repo) {
        (Some(file), _) => detached(args, file, &signers),
        (None, Some(repo)) => in_place(args, repo, &signers),
        (None, None) => bail!("give --repo and --channel (a pending publication) or --manifest FILE --output SIG"),
    }
}

fn summary(m: &Manifest) -> String {
    let rollout = m
        .rollout
        .as_ref()
        .map(|r| format!("rollout from {} to {}", r.start, r.end()))
        .unwrap_or_else(|| "no rollout".into());
    let min_agent = m
        .min_agent
        .as_ref()
        .map(|v| format!(", min_agent {v}"))
        .unwrap_or_default();
    let critical = if m.critical.is_empty() {
        String::new()
    } else {
        format!(", critical {:?}", m.critical)
    };
    format!(
        "channel {} board {} version {}: image {} ({} bytes), payload {}, {} delta(s), created {}, expires {}, \
         {rollout}{min_agent}{critical}",
        m.channel,
        m.board,
        m.version,
        m.image.digest,
        m.image.size,
        m.payload.digest,
        m.deltas.len(),
        m.created,
        m.expires,
    )
}

/// The manifest exactly as this build writes it: nothing in the signed bytes that the
/// summary above did not show (a field this build does not know would be signed unseen).
fn parse_canonical(bytes: &[u8], what: &str) -> Result<Manifest> {
    let m = Manifest::parse(bytes).with_context(|| format!("{what} is not a manifest"))?;
    if m.to_toml().as_bytes() != bytes {
        bail!(
            "{what} is not in the form this atom-build writes (fields it does not know, or edited by hand): \
             refusing to sign what it cannot show; sign with the atom-build that published it, or a newer one"
        );
    }
    Ok(m)
}

/// Signs a manifest file alone: the machine holding the key needs nothing else.
fn detached(args: &SignArgs, file: &Path, signers: &[Box<dyn Signer>]) -> Result<()> {
    let bytes = read_manifest(file)?;
    let m = parse_canonical(&bytes, &file.display().to_string())?;
    let refs: Vec<&dyn Signer> = signers.iter().map(|k| k.as_ref()).collect();
    let sig = signature::sign_with(Domain::Manifest, &bytes, &refs)?;
    let out = args.output.as_deref().expect("clap requires --output with --manifest");
    fsutil::write_atomic_bytes(out, 0o644, sig.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("signed {}", summary(&m));
    println!(
        "signature: {} (attach it with `atom-build sign --repo R --channel C --signature FILE`)",
        out.display()
    );
    Ok(())
}

fn read_manifest(file: &Path) -> Result<Vec<u8>> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if size > MAX_MANIFEST_BYTES as u64 {
        bail!(
            "{} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}",
            file.display()
        );
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn in_place(args: &SignArgs, root: &Path, signers: &[Box<dyn Signer>]) -> Result<()> {
    let channel = args.channel.as_deref().expect("clap requires --channel with --repo");
    if signers.is_empty() && args.signatures.is_empty() {
        bail!("nothing to sign with: give --key (here) or --signature (made elsewhere)");
    }
    let repo = Repository::open(root)?;
    let roles = repo_roles(&repo)?;
    let lock = repo.lock()?;
    crate::publish::clean_stale_temp_files(&repo, &lock)?;
    let bytes = repo
        .pending(channel)?
        .with_context(|| format!("channel {channel:?} has no pending publication (publish --sign-later)"))?;
    let m = parse_canonical(&bytes, "the pending manifest")?;
    if m.channel != channel {
        bail!("the pending manifest is for channel {:?}", m.channel);
    }

    let mut trusted: Vec<PublicKey> = signers.iter().map(|k| k.public_key()).collect();
    for p in &args.trust {
        trusted.push(PublicKey::load(p)?);
    }
    if let Some(doc) = &roles {
        for k in signers {
            check_role(doc, atom_dist::roles::Role::Release, &k.key_id())?;
        }
        trusted.extend(doc.release.iter().filter_map(|k| k.public_key().ok()));
    }
    let trusted = TrustedKeys::new(trusted);

    let refs: Vec<&dyn Signer> = signers.iter().map(|k| k.as_ref()).collect();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    if !refs.is_empty() {
        parts.push(signature::sign_with(Domain::Manifest, &bytes, &refs)?.into_bytes());
    }
    for p in &args.signatures {
        parts.push(
            localfile::read_bounded(
                p.parent().unwrap_or(Path::new(".")),
                &p.file_name().context("--signature names no file")?.to_string_lossy(),
                signature::MAX_SIGNATURE_FILE_BYTES as u64,
            )
            .with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let sig = signature::merge(&slices)?;
    // Hosts check exactly this: a signature made over other bytes, or by a key nobody
    // trusts, must fail here and not on the fleet.
    let policy = Policy {
        trusted: &trusted,
        now: Timestamp::now(),
        board: None,
        channel: Some(channel),
        agent: None,
    };
    let v = verify_manifest(&bytes, sig.as_bytes(), &policy)
        .context("the signature does not verify over the pending manifest (with the keys given and --trust)")?;

    if let Some(prev) = current_manifest(&repo, channel, &trusted)? {
        crate::publish::check_clock(Timestamp::now(), &prev, false)?;
        if m.version <= prev.version {
            bail!(
                "the pending {} is not newer than {} now current on channel {channel:?}; publish it again",
                m.version,
                prev.version
            );
        }
        // Hosts refuse a manifest created before one they accepted (a resign in between).
        if m.created < prev.created {
            bail!(
                "the pending manifest was created at {}, before the current one ({}, a resign since?): hosts \
                 would refuse it as a replay; publish it again",
                m.created,
                prev.created
            );
        }
        if m.board != prev.board {
            bail!(
                "channel {channel:?} carries board {:?}, the pending manifest {:?}",
                prev.board,
                m.board
            );
        }
    }
    check_named_files(&repo, &m)?;
    repo.commit_manifest(
        channel,
        &m.version,
        &SignedManifest {
            manifest: bytes,
            signature: sig.into_bytes(),
        },
    )?;
    repo.remove_pending(channel)?;
    println!("signed and published {} (signed by {})", summary(&m), v.signed_by);
    if let Some(spec) = &args.timestamp_key {
        let doc = roles
            .as_ref()
            .context("--timestamp-key: the repository has no keys.toml")?;
        let key = crate::signing::load(spec, args.passphrase_file.as_deref())?;
        crate::refresh::stamp(&repo, doc, channel, key.as_ref(), args.timestamp_expires_in)?;
    } else if roles.is_some() {
        println!("key roles: hosts with root keys take it after `atom-build refresh`");
    }
    Ok(())
}

/// Every file the manifest names is in place with its size and digest: the signer vouches
/// for the files, not only for the manifest text.
fn check_named_files(repo: &Repository, m: &Manifest) -> Result<()> {
    localfile::check(repo.root(), &m.payload.path, m.payload.size, &m.payload.digest)
        .with_context(|| format!("payload {}", m.payload.path))?;
    for d in &m.deltas {
        localfile::check(repo.root(), &d.path, d.size, &d.digest).with_context(|| format!("delta {}", d.path))?;
    }
    Ok(())
}
