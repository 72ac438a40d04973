//! `atom-build resign`: the channel's current manifest signed again with a new expiry (and,
//! if asked, a new key or a changed rollout). Files and version stay as they are.

use anyhow::{Context, Result, bail};
use atom_dist::Repository;
use atom_dist::manifest::Rollout;
use jiff::Timestamp;

use crate::cli::ResignArgs;
use crate::publish::{Publisher, check_clock, current_manifest, sign_and_commit};

pub fn run(args: &ResignArgs) -> Result<()> {
    let channel = &args.signing.channel;
    let repo = Repository::open(&args.signing.repo)?;
    let keys = Publisher::load(&args.signing, &repo)?;
    let key = keys.signer()?;
    let lock = repo.lock()?;
    crate::publish::clean_stale_temp_files(&repo, &lock)?;
    let Some(mut m) = current_manifest(&repo, channel, &keys.trusted)? else {
        bail!("channel {channel:?} has never been published; nothing to re-sign");
    };
    let now = Timestamp::now().round(jiff::Unit::Second)?;
    check_clock(now, &m, args.signing.replace_future_manifest)?;
    m.created = now;
    m.expires = now
        .checked_add(jiff::SignedDuration::try_from(args.expires_in)?)
        .context("--expires-in is too far in the future")?;
    m.rollout = new_rollout(args, m.rollout.take(), now)?;
    sign_and_commit(&repo, &m, key)?;
    keys.vouch(&repo, &args.signing, &m)?;
    println!(
        "re-signed {} {} on channel {} (signed by {}): valid until {}{}",
        m.board,
        m.version,
        channel,
        key.key_id(),
        m.expires,
        match &m.rollout {
            Some(r) => format!(", rollout from {} to {}", r.start, r.end()),
            None => String::new(),
        }
    );
    Ok(())
}

fn new_rollout(args: &ResignArgs, old: Option<Rollout>, now: Timestamp) -> Result<Option<Rollout>> {
    if args.end_rollout {
        return Ok(None);
    }
    let spread = args.rollout.map(|d| d.as_secs());
    let Some(duration_secs) = spread.or(old.as_ref().map(|r| r.duration_secs)) else {
        if args.rollout_start.is_some() {
            bail!("the channel has no rollout to move; give --rollout DURATION to start one");
        }
        return Ok(None);
    };
    Rollout::check_duration(duration_secs).context("--rollout")?;
    // A new spread without a start begins now; a moved start keeps the spread.
    let start = args
        .rollout_start
        .or(spread.map(|_| now))
        .or(old.map(|r| r.start))
        .unwrap_or(now);
    Ok(Some(Rollout { start, duration_secs }))
}
