//! `atom-build refresh`: the freshness key's timestamps, renewed without the release key.

use anyhow::{Context, Result, bail};
use atom_dist::digest::Digest;
use atom_dist::manifest::Manifest;
use atom_dist::repo::{SignedManifest, layout};
use atom_dist::roles::{KeysDoc, Role};
use atom_dist::signature::{self, Domain, Signer};
use atom_dist::timestamp::{self, TimestampDoc};
use atom_dist::{Repository, fsutil};
use jiff::Timestamp;

use crate::cli::RefreshArgs;
use crate::publish::{check_role, repo_roles};

pub fn run(args: &RefreshArgs) -> Result<()> {
    let repo = Repository::open(&args.repo)?;
    let doc = repo_roles(&repo)?.context(
        "the repository has no keys/keys.toml: timestamps belong to key roles (see `atom-build keys --help`)",
    )?;
    let key = crate::signing::load(&args.key, args.passphrase_file.as_deref())?;
    let _lock = repo.lock()?;
    let channels = if args.channels.is_empty() {
        repo.channels()?
    } else {
        args.channels.clone()
    };
    if channels.is_empty() {
        bail!("the repository has no channels yet");
    }
    // Each channel on its own: one that cannot be renewed must not let the others expire.
    let mut failed = Vec::new();
    for channel in &channels {
        match stamp(&repo, &doc, channel, key.as_ref(), args.expires_in) {
            Ok(t) => println!(
                "timestamp of channel {channel}: {} until {} (signed by {})",
                t.version,
                t.expires,
                key.key_id()
            ),
            Err(e) => failed.push(format!("channel {channel}: {}", crate::said_once(&e))),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} channel(s) not renewed (the others were): {}",
            failed.len(),
            channels.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// Signs a timestamp naming `channel`'s current manifest, valid for `lifetime`.
pub fn stamp(
    repo: &Repository,
    doc: &KeysDoc,
    channel: &str,
    key: &dyn Signer,
    lifetime: std::time::Duration,
) -> Result<TimestampDoc> {
    check_role(doc, Role::Freshness, &key.key_id())?;
    let now = Timestamp::now().round(jiff::Unit::Second)?;
    let current = repo
        .current(channel)?
        .with_context(|| format!("channel {channel:?} has never been published"))?;
    // Vouching for a manifest no release key signed would only make hosts refuse it later.
    let release = doc
        .verify_signed(
            Role::Release,
            Domain::Manifest,
            &current.manifest,
            &current.signature,
            now,
        )
        .with_context(|| format!("channel {channel:?}: the current manifest is not signed by a current release key"))?;
    let manifest = Manifest::parse(&current.manifest)?;
    if manifest.channel != channel {
        bail!(
            "manifest.toml of channel {channel:?} is for channel {:?}",
            manifest.channel
        );
    }
    if manifest.expires <= now {
        bail!(
            "the current manifest expired at {}: re-sign it (atom-build resign) first",
            manifest.expires
        );
    }
    let lifetime = jiff::SignedDuration::try_from(lifetime)?;
    if lifetime > timestamp::MAX_LIFETIME {
        bail!(
            "--expires-in is longer than the {} days hosts accept for a timestamp",
            timestamp::MAX_LIFETIME.as_hours() / 24
        );
    }
    if let Some(prev) = repo.timestamp(channel)?
        && let Ok(prev) = TimestampDoc::parse(&prev.manifest)
    {
        if prev.created > now {
            bail!(
                "this machine's clock ({now}) is behind the channel's timestamp (created {}): fix the clock; \
                 hosts would refuse the new timestamp as a replay",
                prev.created
            );
        }
        // Someone who can write the tree but holds no key must not get an old manifest
        // vouched for by the timer: never go back from what the last timestamp named.
        if let Some(named) = repo.manifest_by_digest(channel, &prev.manifest)?
            && let Ok(named) = Manifest::parse(&named.manifest)
            && (manifest.version < named.version || manifest.created < named.created)
        {
            bail!(
                "manifest.toml ({} created {}) is older than the manifest the current timestamp names ({} \
                 created {}): refusing to vouch for it (was an old manifest copied into place?)",
                manifest.version,
                manifest.created,
                named.version,
                named.created
            );
        }
    }
    // Repositories published before timestamps lack the by-digest copy hosts fetch.
    let digest = Digest::of(&current.manifest);
    let by_digest = repo.path(&layout::manifest_by_digest(channel, &digest));
    if !by_digest.exists() {
        let dir = by_digest.parent().expect("repository paths have a parent");
        fsutil::create_dir_synced(dir)?;
        fsutil::write_atomic_bytes(&by_digest, 0o644, &current.manifest)
            .with_context(|| format!("cannot write {}", by_digest.display()))?;
    }
    let t = TimestampDoc {
        format: timestamp::FORMAT,
        channel: channel.to_owned(),
        version: manifest.version,
        manifest: digest,
        manifest_size: current.manifest.len() as u64,
        keys_version: doc.version,
        created: now,
        expires: now
            .checked_add(lifetime)
            .context("--expires-in is too far in the future")?,
        critical: Vec::new(),
    };
    let text = t.to_toml();
    TimestampDoc::parse(text.as_bytes()).context("internal error: generated timestamp does not parse")?;
    let sig = signature::sign_with(Domain::Timestamp, text.as_bytes(), &[key])?;
    repo.commit_timestamp(
        channel,
        &SignedManifest {
            manifest: text.into_bytes(),
            signature: sig.into_bytes(),
        },
    )?;
    tracing::info!(%channel, version = %t.version, release = %release, expires = %t.expires, "timestamp signed");
    Ok(t)
}
