//! `atom-update now` and `check`: the update pipeline.
//!
//! The order of steps carries the safety:
//! 1. the manifest is verified (signature, expiry, board, channel, and not created before
//!    the newest one accepted here) and must be newer than what runs and what is staged,
//!    and not older than the newest version ever marked good here (anti-rollback); a
//!    phased rollout then waits for this host's turn;
//! 2. the inactive slot is made unbootable *before* its first byte is written, so no
//!    interruption can leave a half-written slot bootable;
//! 3. the image is written by the cheapest route that works (`routes`);
//! 4. the whole slot is re-read from the device and its digest compared with the signed one;
//! 5. only then is the slot flipped to boot next, on trial.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use atom_dist::manifest::{DeltaFormat, Manifest};
use atom_dist::verify::{Policy, Seen};
use bootsel::SlotName;
use bootsel::table::Slot;

use crate::config::Settings;
use crate::error::{Failure, Kind};
use crate::host::{self, Host};
use crate::progress::Progress;
use crate::routes::Job;
pub use crate::routes::Route;
use crate::slotio::WriteStats;
use crate::source::{Accepted, Sources, Watermarks};
use crate::state::{Checkpoint, LastResult, Lock, SlotContent, State};
use crate::trust::Trust;

pub struct Options<'a> {
    pub allow_downgrade: bool,
    /// Install a version that failed on this host before.
    pub allow_rejected: bool,
    /// Write the other slot even while the running one is on trial and the other holds
    /// the last version marked good.
    pub force: bool,
    /// Take a phased rollout's version before this host's turn.
    pub skip_rollout: bool,
    pub cancel: &'a AtomicBool,
    pub progress: bool,
}

#[derive(Debug)]
pub enum Outcome {
    UpToDate {
        version: String,
    },
    AlreadyStaged {
        version: String,
    },
    /// The offered version failed on this host before (a fallback or mark-bad).
    Rejected {
        version: String,
        why: String,
    },
    /// The version is rolled out in phases and this host's turn has not come.
    Waiting {
        version: String,
        turn: jiff::Timestamp,
        end: jiff::Timestamp,
    },
    Staged {
        version: String,
        slot: SlotName,
        route: Route,
        stats: WriteStats,
        downloaded: u64,
        /// Bytes read from a local repository (directory, stick), not over a network.
        read_locally: u64,
        /// The running slot's signature sent to the rsync endpoint (0 on other routes).
        uploaded: u64,
    },
}

/// What `check` found.
pub struct Offer {
    pub running: String,
    pub offered: String,
    pub newer: bool,
    pub routes: Vec<(Route, Option<u64>)>,
    /// A phased rollout's end, and this host's turn once `now` has drawn its place.
    pub rollout: Option<(jiff::Timestamp, Option<jiff::Timestamp>)>,
    /// Why the offered version is not taken: it failed on this host before.
    pub rejected: Option<String>,
}

/// The verified manifest, and (under key roles) the keys.toml version and timestamp time
/// to record once the manifest is taken.
fn fetch_manifest(s: &Settings, sources: &Sources, state: &State, cancel: &AtomicBool) -> Result<Accepted, Failure> {
    let trust = Trust::load(s)?;
    let now = jiff::Timestamp::now();
    let agent = crate::trust::agent_version();
    let policy = Policy {
        trusted: trust.keys(),
        now,
        board: Some(&s.board),
        channel: Some(&s.channel),
        agent: Some(&agent),
    };
    let seen = Watermarks {
        manifest: state.newest_manifest.get(&s.channel).copied(),
        roles: Seen {
            keys: state
                .keys_version
                .zip(state.keys_digest.as_deref().and_then(|d| d.parse().ok())),
            timestamp: state.newest_timestamp.get(&s.channel).copied(),
        },
    };
    let accepted = sources.signed_manifest(&s.channel, &trust, &policy, &seen, cancel)?;
    let v = &accepted.verified;
    tracing::info!(
        version = %v.manifest.version, repository = %accepted.from, signed_by = %v.signed_by,
        scheme = trust.scheme(), "verified manifest"
    );
    Ok(accepted)
}

pub fn check(s: &Settings) -> Result<Offer, Failure> {
    let host = Host::detect(s)?;
    let sources = Sources::new(s)?;
    let mut state = State::load(&s.state_dir)?;
    note_fallback(s, &host, &mut state)?;
    let m = fetch_manifest(s, &sources, &state, &AtomicBool::new(false))?
        .verified
        .manifest;
    let running = &host.release.version;
    let rejected = state.rejected.get(&m.image.digest.to_string()).map(|r| r.why.clone());
    let mut routes = Vec::new();
    if let Some(d) = m
        .deltas
        .iter()
        .find(|d| &d.base_version == running && d.format != DeltaFormat::Unsupported)
    {
        routes.push((Route::Precomputed, Some(d.size)));
    }
    if sources.has_http() {
        routes.push((Route::Rsync, None));
    }
    routes.push((Route::Full, Some(m.payload.size)));
    Ok(Offer {
        running: running.to_string(),
        offered: m.version.to_string(),
        // Below the rollback floor, `now` would refuse it.
        newer: &m.version > running && state.floor().is_none_or(|f| m.version >= f) && rejected.is_none(),
        rejected,
        routes,
        rollout: m
            .rollout
            .as_ref()
            .map(|r| (r.end(), state.rollout_place.map(|p| r.turn(p)))),
    })
}

pub fn now(s: &Settings, opts: &Options<'_>) -> Result<Outcome, Failure> {
    let _lock = Lock::acquire(&s.state_dir)?;
    let result = run(s, opts);
    let mut state = State::load(&s.state_dir)?;
    state.last = Some(match &result {
        Ok(o) => last_result(o),
        Err(f) => LastResult {
            time: jiff::Timestamp::now().to_string(),
            outcome: match f.kind {
                Kind::VerifyFailed => "verification-failed",
                Kind::Refused => "refused",
                _ => "failed",
            }
            .into(),
            message: f.message.clone(),
            ..Default::default()
        },
    });
    state.save(&s.state_dir)?;
    result
}

fn last_result(o: &Outcome) -> LastResult {
    let time = jiff::Timestamp::now().to_string();
    match o {
        Outcome::UpToDate { version } => LastResult {
            time,
            outcome: "up-to-date".into(),
            message: format!("{version} is the newest version"),
            version: Some(version.clone()),
            ..Default::default()
        },
        Outcome::AlreadyStaged { version } => LastResult {
            time,
            outcome: "staged".into(),
            message: format!("{version} is already staged for the next boot"),
            version: Some(version.clone()),
            ..Default::default()
        },
        Outcome::Rejected { version, why } => LastResult {
            time,
            outcome: "rejected".into(),
            message: format!("{version} was rejected on this host: {why}"),
            version: Some(version.clone()),
            ..Default::default()
        },
        Outcome::Waiting { version, turn, end } => LastResult {
            time,
            outcome: "waiting".into(),
            message: format!("{version} is being rolled out until {end}; this host's turn comes at {turn}"),
            version: Some(version.clone()),
            ..Default::default()
        },
        Outcome::Staged {
            version,
            slot,
            route,
            stats,
            downloaded,
            read_locally,
            uploaded,
        } => LastResult {
            time,
            outcome: "staged".into(),
            message: format!("{version} written to slot {slot} and set to boot next"),
            version: Some(version.clone()),
            route: Some(route.name().into()),
            bytes_downloaded: *downloaded,
            bytes_read_locally: *read_locally,
            bytes_uploaded: *uploaded,
            bytes_written: stats.written,
            bytes_skipped: stats.skipped,
            bytes_resumed: stats.resumed,
        },
    }
}

/// The pipeline, one named step each (numbers as in the design document).
fn run(s: &Settings, opts: &Options<'_>) -> Result<Outcome, Failure> {
    let host = Host::detect(s)?;
    let sources = Sources::new(s)?;
    let mut state = State::load(&s.state_dir)?;
    note_fallback(s, &host, &mut state)?;
    // Step 1: a signed, current manifest for a version this host may take.
    let accepted = fetch_manifest(s, &sources, &state, opts.cancel)?;
    record_watermarks(s, &mut state, &accepted)?;
    let target = accepted.verified.manifest;
    if let Some(done) = nothing_to_do(s, &host, &target) {
        return Ok(done);
    }
    refuse_downgrade(&host, &state, &target, opts)?;
    let (mut disk, mut table) = host::load_table(&host.disk, s, true)?;
    keep_the_last_good_slot(&host, &table, opts)?;
    let inactive_name = host.running.other();
    let running = table.slot(host.running).clone();
    let inactive = table.slot(inactive_name).clone();
    if let Some(done) = already_staged(s, &state, &running, &inactive, &target, opts)? {
        return Ok(done);
    }
    if let Some(rejected) = skip_rejected(&state, &target, opts) {
        return Ok(rejected);
    }
    if let Some(waiting) = wait_for_rollout_turn(s, &mut state, &target, opts)? {
        return Ok(waiting);
    }
    check_slot_fits(&host, &inactive, &target)?;

    // Step 2: nothing half-written may ever be bootable.
    table.disable(inactive_name);
    table
        .commit(&mut disk)
        .map_err(|e| Failure::error(format!("cannot update the partition table: {e}")))?;
    state.slots.remove(inactive_name.as_str());
    state.save(&s.state_dir)?;
    tracing::info!(slot = %inactive_name, label = %inactive.label, "inactive slot marked unbootable; writing");

    // Steps 3 and 4: write by the cheapest route, then read back and verify.
    let (
        route,
        stats,
        Transfer {
            downloaded,
            read_locally,
            uploaded,
        },
    ) = write_and_verify(s, &sources, &host, &disk, &running, &inactive, &target, opts)?;

    // Step 5: flip, only now that the slot holds exactly the signed image.
    table
        .start_trial(inactive_name, s.tries)
        .map_err(|e| Failure::error(e.to_string()))?;
    table
        .commit(&mut disk)
        .map_err(|e| Failure::error(format!("cannot update the partition table: {e}")))?;
    state.slots.insert(
        inactive_name.as_str().into(),
        SlotContent {
            version: target.version.to_string(),
            digest: target.image.digest.to_string(),
            kernel: None,
        },
    );
    state.save(&s.state_dir)?;
    forget_partial_work(&s.state_dir);
    tracing::info!(
        version = %target.version, slot = %inactive_name, route = route.name(),
        written = stats.written, skipped = stats.skipped, downloaded, read_locally, uploaded,
        "update staged: slot set to boot next on trial"
    );
    Ok(Outcome::Staged {
        version: target.version.to_string(),
        slot: inactive_name,
        route,
        stats,
        downloaded,
        read_locally,
        uploaded,
    })
}

/// A fallback this boot made rejects what the failed slot holds.
fn note_fallback(s: &Settings, host: &Host, state: &mut State) -> Result<(), Failure> {
    let from = host.record.as_ref().and_then(|r| r.fell_back_from.as_deref());
    if state.note_fallback(from, &host::boot_id()) {
        state.save(&s.state_dir)?;
    }
    Ok(())
}

/// The replay watermarks: the newest manifest `created` accepted on this channel (and under
/// key roles the keys.toml version and timestamp `created`), never later than this host's
/// clock (a document within the allowed skew ahead is recorded as now).
fn record_watermarks(s: &Settings, state: &mut State, accepted: &Accepted) -> Result<(), Failure> {
    let now = jiff::Timestamp::now();
    let before = state.clone();
    let created = accepted.verified.manifest.created.min(now);
    let slot = state.newest_manifest.entry(s.channel.clone()).or_insert(created);
    *slot = (*slot).max(created);
    if let Some(marks) = accepted.roles {
        // verify_chain refused anything below what is recorded; never lower it here either
        // (a clock that went back).
        if state.keys_version.is_none_or(|v| marks.keys_version > v) {
            state.keys_version = Some(marks.keys_version);
            state.keys_digest = Some(marks.keys_digest.to_string());
        }
        let t = marks.timestamp.min(now);
        let slot = state.newest_timestamp.entry(s.channel.clone()).or_insert(t);
        *slot = (*slot).max(t);
    }
    if *state != before {
        state.save(&s.state_dir)?;
    }
    Ok(())
}

fn nothing_to_do(s: &Settings, host: &Host, target: &Manifest) -> Option<Outcome> {
    (target.version == host.release.version).then(|| {
        forget_partial_work(&s.state_dir);
        Outcome::UpToDate {
            version: target.version.to_string(),
        }
    })
}

fn refuse_downgrade(host: &Host, state: &State, target: &Manifest, opts: &Options<'_>) -> Result<(), Failure> {
    let running_version = &host.release.version;
    if &target.version < running_version && !opts.allow_downgrade {
        return Err(Failure::refused(format!(
            "the repository offers {} but {} is running: refusing a downgrade (an old manifest replayed?); \
             use --allow-downgrade to install it on purpose",
            target.version, running_version
        )));
    }
    if let Some(floor) = state.floor()
        && target.version < floor
        && !opts.allow_downgrade
    {
        return Err(Failure::refused(format!(
            "the repository offers {} but {floor} was marked good on this host (the rollback floor): \
             refusing a downgrade (an old manifest replayed?); use --allow-downgrade to install it on purpose",
            target.version
        )));
    }
    Ok(())
}

/// A version that failed here is not installed again (a reboot loop into a known-bad
/// version otherwise), unless the operator overrides.
fn skip_rejected(state: &State, target: &Manifest, opts: &Options<'_>) -> Option<Outcome> {
    let rejected = state.rejected.get(&target.image.digest.to_string())?;
    if opts.allow_rejected {
        tracing::warn!(version = %target.version, "installing a version rejected on this host (--allow-rejected)");
        return None;
    }
    tracing::info!(version = %target.version, why = %rejected.why, "version rejected on this host; not installing it again");
    Some(Outcome::Rejected {
        version: target.version.to_string(),
        why: format!("{} ({})", rejected.why, rejected.time),
    })
}

/// While the running slot is on trial, the other slot is the last known-good one: writing
/// it could leave the host with no good slot at all.
fn keep_the_last_good_slot(host: &Host, table: &bootsel::BootTable, opts: &Options<'_>) -> Result<(), Failure> {
    let running = table.slot(host.running).flags;
    let other_name = host.running.other();
    let other = table.slot(other_name).flags;
    if !running.successful && other.successful && other.priority > 0 && !opts.force {
        return Err(Failure::not_allowed(format!(
            "slot {} ({}) is on trial, not yet marked good, and slot {other_name} holds the last version \
             marked good: not overwriting it. Wait for mark-good (atom-mark-good.service after the health \
             checks), or use --force",
            host.running, host.release.version
        )));
    }
    Ok(())
}

fn already_staged(
    s: &Settings,
    state: &State,
    running: &Slot,
    inactive: &Slot,
    target: &Manifest,
    opts: &Options<'_>,
) -> Result<Option<Outcome>, Failure> {
    let Some(staged) = state.slots.get(inactive.name.as_str()) else {
        return Ok(None);
    };
    let on_trial = inactive.flags.priority > running.flags.priority && inactive.flags.tries > 0;
    if staged.digest == target.image.digest.to_string() && on_trial {
        forget_partial_work(&s.state_dir);
        return Ok(Some(Outcome::AlreadyStaged {
            version: staged.version.clone(),
        }));
    }
    if let Ok(v) = staged.version.parse::<semver::Version>()
        && v > target.version
        && on_trial
        && !opts.allow_downgrade
    {
        return Err(Failure::refused(format!(
            "{v} is already staged; the repository now offers the older {}: refusing (replayed manifest?)",
            target.version
        )));
    }
    Ok(None)
}

fn wait_for_rollout_turn(
    s: &Settings,
    state: &mut State,
    target: &Manifest,
    opts: &Options<'_>,
) -> Result<Option<Outcome>, Failure> {
    let Some(rollout) = target.rollout.as_ref().filter(|_| !opts.skip_rollout) else {
        return Ok(None);
    };
    let had_place = state.rollout_place.is_some();
    let turn = rollout.turn(state.rollout_place());
    if !had_place {
        state.save(&s.state_dir)?;
    }
    if jiff::Timestamp::now() >= turn {
        return Ok(None);
    }
    tracing::info!(version = %target.version, %turn, "phased rollout: not this host's turn yet");
    Ok(Some(Outcome::Waiting {
        version: target.version.to_string(),
        turn,
        end: rollout.end(),
    }))
}

fn check_slot_fits(host: &Host, inactive: &Slot, target: &Manifest) -> Result<(), Failure> {
    if target.image.size > inactive.size_bytes {
        return Err(Failure::error(format!(
            "the {} image is {} bytes but slot {} ({}) holds only {}",
            target.version, target.image.size, inactive.name, inactive.label, inactive.size_bytes
        )));
    }
    if host::partition_is_mounted(&host.disk, inactive.partition) {
        return Err(Failure::error(format!(
            "slot {} ({}) is mounted; unmount it before updating",
            inactive.name, inactive.label
        )));
    }
    Ok(())
}

/// Bytes moved to stage an update, by where they came from or went.
struct Transfer {
    downloaded: u64,
    read_locally: u64,
    uploaded: u64,
}

/// Steps 3 and 4; returns the route taken, what was written, and the bytes moved.
#[allow(clippy::too_many_arguments)]
fn write_and_verify(
    s: &Settings,
    sources: &Sources,
    host: &Host,
    disk: &std::fs::File,
    running: &Slot,
    inactive: &Slot,
    target: &Manifest,
    opts: &Options<'_>,
) -> Result<(Route, WriteStats, Transfer), Failure> {
    let work = s.state_dir.join("downloads");
    std::fs::create_dir_all(&work).map_err(|e| Failure::error(format!("cannot create {}: {e}", work.display())))?;
    let target_digest = target.image.digest.to_string();
    let slot_name = inactive.name.as_str();
    let resume_from = Checkpoint::durable_for(&s.state_dir, slot_name, &target_digest);
    if resume_from > 0 {
        tracing::info!(bytes = resume_from, "resuming an interrupted write from its checkpoint");
    } else {
        Checkpoint::clear(&s.state_dir);
    }
    let save_checkpoint = |durable: u64| {
        Checkpoint {
            slot: slot_name.to_owned(),
            target: target_digest.clone(),
            durable,
        }
        .save(&s.state_dir)
    };
    let job = Job {
        resume_from: std::cell::Cell::new(resume_from),
        uploaded: std::cell::Cell::new(0),
        save_checkpoint: &save_checkpoint,
        s,
        sources,
        target,
        disk,
        running: running.clone(),
        inactive: inactive.clone(),
        opts,
        work,
        progress: Progress::new(opts.progress, target.image.size),
    };
    let (route, stats) = job.write_by_cheapest_route(host)?;
    let transfer = Transfer {
        downloaded: job.progress.downloaded(),
        read_locally: job.progress.read_locally(),
        uploaded: job.uploaded.get(),
    };
    job.progress.finish();
    Ok((route, stats, transfer))
}

/// Downloads and a checkpoint left by a run that was cut off after its work was done
/// (or for a target that is no longer wanted) would only take space.
fn forget_partial_work(state_dir: &Path) {
    Checkpoint::clear(state_dir);
    let _ = std::fs::remove_dir_all(state_dir.join("downloads"));
}
