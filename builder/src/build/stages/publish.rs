//! publish: the image into the recipe's repository and channel (signed, or waiting for
//! `atom-build sign` when no key is given), with the build's lock and package list
//! beside it under `builds/CHANNEL/VERSION/`.

use std::fs;

use anyhow::{Context as _, Result, bail};
use atom_dist::manifest::Manifest;
use atom_dist::repo::Repository;

use super::{Context, Plan, options, stem};
use crate::build::cache::Inputs;
use crate::build::lock;
use crate::cli::{PublishArgs, Signing};
use crate::recipe::Recipe;

pub fn inputs(p: &Plan<'_>) -> Result<Inputs> {
    let mut i = Inputs::new();
    i.insert("publish".into(), options(&p.recipe.publish)?);
    Ok(i)
}

/// The channel's current manifest in the recipe's repository (none without a
/// repository, or before the channel's first publish).
pub fn current_manifest(r: &Recipe) -> Result<Option<Manifest>> {
    let Some(p) = &r.publish else { return Ok(None) };
    if !p.repo.join("channels").is_dir() {
        return Ok(None);
    }
    let repo = Repository::open(&p.repo).with_context(|| format!("publish.repo {}", p.repo.display()))?;
    match repo.current(&r.os.channel)? {
        Some(signed) => Ok(Some(Manifest::parse(&signed.manifest)?)),
        None => Ok(None),
    }
}

/// Before anything is built: a publish that could not succeed is refused now.
pub fn check_version_grows(r: &Recipe) -> Result<()> {
    let Some(p) = &r.publish else { return Ok(()) };
    if let Some(m) = current_manifest(r)?
        && m.version >= r.os.version
    {
        bail!(
            "publish: channel {} of {} is at {} already; os.version {} must be newer (nothing was built)",
            r.os.channel,
            p.repo.display(),
            m.version,
            r.os.version
        );
    }
    Ok(())
}

pub fn run(cx: &Context<'_>) -> Result<()> {
    let Some(p) = &cx.recipe.publish else {
        cx.log.note("no [publish]: nothing published");
        return Ok(());
    };
    let image = cx.out_dir.join(format!("{}.img", stem(cx.recipe)));
    let duration =
        |what: &str, s: &str| humantime::parse_duration(s).map_err(|e| anyhow::anyhow!("publish.{what} = {s:?}: {e}"));
    let args = PublishArgs {
        signing: Signing {
            repo: p.repo.clone(),
            channel: cx.recipe.os.channel.clone(),
            key: p.key.clone(),
            passphrase_file: p.passphrase_file.clone(),
            timestamp_key: p.timestamp_key.clone(),
            timestamp_expires_in: std::time::Duration::from_secs(7 * 86400),
            trust: Vec::new(),
            replace_future_manifest: false,
        },
        deltas: p.deltas,
        expires_in: duration("expires_in", &p.expires_in)?,
        zstd_level: p.zstd_level,
        payload_level: p.payload_level.unwrap_or(crate::cli::DEFAULT_PAYLOAD_LEVEL),
        delta_format: p.delta_format.unwrap_or(crate::cli::DeltaEncoding::BaseExtents),
        rollout: p.rollout.as_deref().map(|r| duration("rollout", r)).transpose()?,
        rollout_start: None,
        min_agent: p.min_agent.clone(),
        critical: Vec::new(),
        sign_later: p.key.is_none(),
        image,
    };
    cx.progress.step(&format!(
        "publishing into {} ({})",
        p.repo.display(),
        cx.recipe.os.channel
    ));
    crate::publish::run(&args)?;
    let records = p
        .repo
        .join("builds")
        .join(&cx.recipe.os.channel)
        .join(cx.recipe.os.version.to_string());
    fs::create_dir_all(&records).with_context(|| format!("cannot create {}", records.display()))?;
    for name in [lock::FILE_NAME.to_string(), format!("{}.packages.tsv", stem(cx.recipe))] {
        let src = cx.out_dir.join(&name);
        if src.is_file() {
            fs::copy(&src, records.join(&name)).with_context(|| format!("cannot publish {name}"))?;
        }
    }
    Ok(())
}
