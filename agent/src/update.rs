//! `atom-update now` and `check`: the update pipeline.
//!
//! The order of steps carries the safety:
//! 1. the manifest is verified (signature, expiry, board, channel) and must be newer than
//!    what runs and what is staged, and not older than the newest version ever marked
//!    good here (anti-rollback);
//! 2. the inactive slot is made unbootable *before* its first byte is written, so no
//!    interruption can leave a half-written slot bootable;
//! 3. the image is written by the cheapest route that works;
//! 4. the whole slot is re-read from the device and its digest compared with the signed one;
//! 5. only then is the slot flipped to boot next, on trial.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use atom_dist::manifest::{DeltaFormat, Manifest};
use atom_dist::verify::Policy;
use atom_dist::{TrustedKeys, delta};
use bootsel::SlotName;
use memmap2::Mmap;

use crate::config::{RouteName, Settings};
use crate::error::{Failure, Kind};
use crate::host::{self, Host};
use crate::progress::Progress;
use crate::slotio::{self, SlotWriter, WriteStats};
use crate::source::Sources;
use crate::space;
use crate::state::{Checkpoint, LastResult, Lock, SlotContent, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Precomputed,
    Rsync,
    Full,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Precomputed => "precomputed-delta",
            Route::Rsync => "rsync-delta",
            Route::Full => "full-payload",
        }
    }
}

pub struct Options<'a> {
    pub allow_downgrade: bool,
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
    Staged {
        version: String,
        slot: SlotName,
        route: Route,
        stats: WriteStats,
        downloaded: u64,
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
}

fn trusted(s: &Settings) -> Result<TrustedKeys, Failure> {
    crate::perms::check_keys_dir(&s.keys_dir)?;
    TrustedKeys::load_dir(&s.keys_dir).map_err(|e| Failure::error(e.to_string()))
}

fn fetch_manifest(s: &Settings, sources: &Sources) -> Result<Manifest, Failure> {
    let keys = trusted(s)?;
    let policy = Policy {
        trusted: &keys,
        now: jiff::Timestamp::now(),
        board: Some(&s.board),
        channel: Some(&s.channel),
    };
    let (v, from) = sources.signed_manifest(&s.channel, &policy)?;
    tracing::info!(version = %v.manifest.version, repository = %from, signed_by = %v.signed_by, "verified manifest");
    Ok(v.manifest)
}

pub fn check(s: &Settings) -> Result<Offer, Failure> {
    let host = Host::detect(s)?;
    let sources = Sources::new(s)?;
    let m = fetch_manifest(s, &sources)?;
    let running = &host.release.version;
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
        newer: &m.version > running && State::load(&s.state_dir).floor().is_none_or(|f| m.version >= f),
        routes,
    })
}

struct Job<'a> {
    s: &'a Settings,
    sources: &'a Sources,
    target: &'a Manifest,
    disk: &'a File,
    running: bootsel::table::Slot,
    inactive: bootsel::table::Slot,
    opts: &'a Options<'a>,
    work: PathBuf,
    progress: Progress,
    /// Bytes of the inactive slot an interrupted run already wrote for this target.
    resume_from: std::cell::Cell<u64>,
    uploaded: std::cell::Cell<u64>,
    save_checkpoint: &'a dyn Fn(u64) -> std::io::Result<()>,
}

pub fn now(s: &Settings, opts: &Options<'_>) -> Result<Outcome, Failure> {
    let _lock = Lock::acquire(&s.state_dir)?;
    let result = run(s, opts);
    let mut state = State::load(&s.state_dir);
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
        Outcome::Staged {
            version,
            slot,
            route,
            stats,
            downloaded,
            uploaded,
        } => LastResult {
            time,
            outcome: "staged".into(),
            message: format!("{version} written to slot {slot} and set to boot next"),
            version: Some(version.clone()),
            route: Some(route.name().into()),
            bytes_downloaded: *downloaded,
            bytes_uploaded: *uploaded,
            bytes_written: stats.written,
            bytes_skipped: stats.skipped,
            bytes_resumed: stats.resumed,
        },
    }
}

fn run(s: &Settings, opts: &Options<'_>) -> Result<Outcome, Failure> {
    let host = Host::detect(s)?;
    let sources = Sources::new(s)?;
    let target = fetch_manifest(s, &sources)?;
    let running_version = &host.release.version;
    let mut state = State::load(&s.state_dir);

    if &target.version == running_version {
        forget_partial_work(&s.state_dir);
        return Ok(Outcome::UpToDate {
            version: target.version.to_string(),
        });
    }
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

    let (mut disk, mut table) = host::load_table(&host.disk, s, true)?;
    let inactive_name = host.running.other();
    let running = table.slot(host.running).clone();
    let inactive = table.slot(inactive_name).clone();
    if let Some(staged) = state.slots.get(inactive_name.as_str()) {
        let on_trial = inactive.flags.priority > running.flags.priority && inactive.flags.tries > 0;
        if staged.digest == target.image.digest.to_string() && on_trial {
            forget_partial_work(&s.state_dir);
            return Ok(Outcome::AlreadyStaged {
                version: staged.version.clone(),
            });
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
    }
    if target.image.size > inactive.size_bytes {
        return Err(Failure::error(format!(
            "the {} image is {} bytes but slot {} ({}) holds only {}",
            target.version, target.image.size, inactive_name, inactive.label, inactive.size_bytes
        )));
    }
    if host::partition_is_mounted(&host.disk, inactive.partition) {
        return Err(Failure::error(format!(
            "slot {inactive_name} ({}) is mounted; unmount it before updating",
            inactive.label
        )));
    }

    // Step 2: nothing half-written may ever be bootable.
    table.disable(inactive_name);
    table
        .commit(&mut disk)
        .map_err(|e| Failure::error(format!("cannot update the partition table: {e}")))?;
    state.slots.remove(inactive_name.as_str());
    state.save(&s.state_dir)?;
    tracing::info!(slot = %inactive_name, label = %inactive.label, "inactive slot marked unbootable; writing");

    let work = s.state_dir.join("downloads");
    std::fs::create_dir_all(&work).map_err(|e| Failure::error(format!("cannot create {}: {e}", work.display())))?;
    let target_digest = target.image.digest.to_string();
    let resume_from = Checkpoint::durable_for(&s.state_dir, inactive_name.as_str(), &target_digest);
    if resume_from > 0 {
        tracing::info!(bytes = resume_from, "resuming an interrupted write from its checkpoint");
    } else {
        Checkpoint::clear(&s.state_dir);
    }
    let save_checkpoint = |durable: u64| {
        Checkpoint {
            slot: inactive_name.as_str().to_owned(),
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
        sources: &sources,
        target: &target,
        disk: &disk,
        running: running.clone(),
        inactive: inactive.clone(),
        opts,
        work,
        progress: Progress::new(opts.progress, target.image.size),
    };
    let (route, stats) = job.write_by_cheapest_route(&host)?;
    let downloaded = job.progress.downloaded();
    let uploaded = job.uploaded.get();
    job.progress.finish();

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
        },
    );
    state.save(&s.state_dir)?;
    forget_partial_work(&s.state_dir);
    tracing::info!(
        version = %target.version, slot = %inactive_name, route = route.name(),
        written = stats.written, skipped = stats.skipped, downloaded, uploaded,
        "update staged: slot set to boot next on trial"
    );
    Ok(Outcome::Staged {
        version: target.version.to_string(),
        slot: inactive_name,
        route,
        stats,
        downloaded,
        uploaded,
    })
}

/// Downloads and a checkpoint left by a run that was cut off after its work was done
/// (or for a target that is no longer wanted) would only take space.
fn forget_partial_work(state_dir: &Path) {
    Checkpoint::clear(state_dir);
    let _ = std::fs::remove_dir_all(state_dir.join("downloads"));
}

impl Job<'_> {
    fn write_by_cheapest_route(&self, host: &Host) -> Result<(Route, WriteStats), Failure> {
        let mut failures = Vec::new();
        let mut verify_failed = false;
        for route in self.s.routes.iter().map(|r| match r {
            RouteName::Precomputed => Route::Precomputed,
            RouteName::Rsync => Route::Rsync,
            RouteName::Full => Route::Full,
        }) {
            let attempt = match route {
                Route::Precomputed => self.precomputed(host),
                Route::Rsync => self.rsync(),
                Route::Full => self.full().map(Some),
            };
            let stats = match attempt {
                Ok(Some(stats)) => stats,
                Ok(None) => continue,
                Err(e) if e.kind == Kind::Error && e.message == slotio::CANCELLED => return Err(e),
                Err(e) => {
                    tracing::warn!(route = route.name(), error = %e, "route failed; trying the next one");
                    failures.push(format!("{}: {e}", route.name()));
                    continue;
                }
            };
            self.progress.phase("verifying");
            let digest = slotio::hash_range(self.disk, self.inactive.offset_bytes, self.target.image.size, &|_| {})
                .map_err(|e| Failure::error(format!("cannot read back slot {}: {e}", self.inactive.name)))?;
            if digest == self.target.image.digest {
                tracing::info!(route = route.name(), "slot verified against the signed digest");
                return Ok((route, stats));
            }
            verify_failed = true;
            // Whatever the checkpoint vouched for did not hold: the next route writes all.
            self.resume_from.set(0);
            Checkpoint::clear(&self.s.state_dir);
            tracing::warn!(route = route.name(), got = %digest, want = %self.target.image.digest, "written slot does not match the signed digest");
            failures.push(format!(
                "{}: written image has digest {digest}, the manifest says {}",
                route.name(),
                self.target.image.digest
            ));
        }
        let message = format!(
            "every route failed; slot {} stays unbootable: {}",
            self.inactive.name,
            failures.join("; ")
        );
        Err(Failure {
            kind: if verify_failed { Kind::VerifyFailed } else { Kind::Error },
            message,
        })
    }

    fn writer(&self) -> SlotWriter<'_> {
        SlotWriter::new(
            self.disk,
            self.inactive.offset_bytes,
            self.inactive.size_bytes,
            self.opts.cancel,
            self.progress.write_callback(),
        )
        .with_resume(slotio::Resume {
            durable: self.resume_from.get(),
            save: self.save_checkpoint,
        })
    }

    fn map_running(&self, len: u64) -> Result<Mmap, Failure> {
        slotio::map_range(self.disk, self.running.offset_bytes, len.min(self.running.size_bytes))
            .map_err(|e| Failure::error(format!("cannot map the running slot: {e}")))
    }

    fn finish(&self, w: SlotWriter<'_>) -> Result<WriteStats, Failure> {
        let stats = w.finish().map_err(io_failure)?;
        if stats.total != self.target.image.size {
            return Err(Failure::error(format!(
                "produced {} bytes, the image is {}",
                stats.total, self.target.image.size
            )));
        }
        Ok(stats)
    }

    /// Decompresses an (untrusted) zstd delta made against `base` into a file and maps it;
    /// the file goes away with the map, whatever the route's outcome.
    fn raw_delta(&self, zst: &Path, format: DeltaFormat, base: &[u8]) -> Result<RawDelta, Failure> {
        let src = File::open(zst).map_err(io_failure)?;
        // SAFETY: a private download of this process, not modified while mapped.
        let zst = unsafe { Mmap::map(&src) }.map_err(io_failure)?;
        if let Some(size) = delta::declared_size(&zst) {
            space::ensure_room(&self.work, size, "the decoded delta").map_err(Failure::error)?;
        }
        let path = self.work.join("delta.raw");
        let out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_failure)?;
        let mut raw = RawDelta { path, map: None };
        let mut w = BufWriter::new(&out);
        let decoded = delta::decompress_format(
            format,
            base,
            &zst,
            &mut w,
            delta::raw_delta_limit(self.target.image.size),
        )
        .and_then(|_| w.flush().map_err(delta::DeltaError::Io));
        match decoded {
            Err(delta::DeltaError::Io(e)) if space::is_full(&e) => {
                return Err(Failure::error(space::full_message(&raw.path, &e)));
            }
            Err(e) => return Err(Failure::error(e.to_string())),
            Ok(()) => {}
        }
        drop(w);
        // SAFETY: a private file of this process, not modified while mapped.
        raw.map = Some(unsafe { Mmap::map(&out) }.map_err(io_failure)?);
        Ok(raw)
    }

    fn apply_delta(&self, base: &[u8], raw: &[u8]) -> Result<WriteStats, Failure> {
        let mut w = self.writer();
        delta::apply(base, raw, self.target.image.size, &mut w).map_err(|e| match e {
            delta::DeltaError::Io(io) => io_failure(io),
            other => Failure::error(other.to_string()),
        })?;
        self.finish(w)
    }

    fn precomputed(&self, host: &Host) -> Result<Option<WriteStats>, Failure> {
        let Some(d) = self
            .target
            .deltas
            .iter()
            .find(|d| d.base_version == host.release.version && d.format != DeltaFormat::Unsupported)
        else {
            tracing::info!(running = %host.release.version, "no precomputed delta from the running version in a format this agent reads");
            return Ok(None);
        };
        self.progress.phase("checking the running slot");
        let base_digest = slotio::hash_range(
            self.disk,
            self.running.offset_bytes,
            d.base_size.min(self.running.size_bytes),
            &|_| {},
        )
        .map_err(io_failure)?;
        if base_digest != d.base_digest {
            return Err(Failure::error(format!(
                "the running slot does not hold the published {} image (digest {base_digest}); cannot use its delta",
                d.base_version
            )));
        }
        self.progress.phase("downloading the precomputed delta");
        let zst = self
            .sources
            .fetch_file(
                &d.path,
                d.size,
                &d.digest,
                &self.work.join(format!("{}.delta.zst", d.digest.hex())),
                self.progress.download_callback(),
                self.opts.cancel,
            )
            .map_err(Failure::error)?;
        let base = self.map_running(d.base_size)?;
        let raw = self.raw_delta(&zst, d.format, &base)?;
        self.progress.phase("applying the precomputed delta");
        self.apply_delta(&base, &raw).map(Some)
    }

    fn rsync(&self) -> Result<Option<WriteStats>, Failure> {
        if !self.sources.has_http() {
            return Ok(None);
        }
        // The server bounds signatures to bases up to twice the target's size.
        let base_len = self.running.size_bytes.min(self.target.image.size.saturating_mul(2));
        let base = self.map_running(base_len)?;
        self.progress.phase("computing the running slot's signature");
        let sig = delta::signature_of(&base);
        let body = zstd::bulk::compress(sig.serialized(), 3).map_err(io_failure)?;
        self.uploaded.set(self.uploaded.get() + body.len() as u64);
        self.progress.phase("fetching an rsync delta from the server");
        let zst = self.work.join("rsync.delta.zst");
        self.sources
            .rsync_delta(
                &self.s.channel,
                &self.target.version,
                body,
                &zst,
                delta::raw_delta_limit(self.target.image.size),
                self.progress.download_callback(),
            )
            .map_err(Failure::error)?;
        let raw = self.raw_delta(&zst, DeltaFormat::FastRsyncZstd, &base)?;
        self.progress.phase("applying the rsync delta");
        self.apply_delta(&base, &raw).map(Some)
    }

    fn full(&self) -> Result<WriteStats, Failure> {
        let p = &self.target.payload;
        self.progress.phase("downloading the full payload");
        let path = self
            .sources
            .fetch_file(
                &p.path,
                p.size,
                &p.digest,
                &self.work.join(format!("{}.img.zst", p.digest.hex())),
                self.progress.download_callback(),
                self.opts.cancel,
            )
            .map_err(Failure::error)?;
        self.progress.phase("writing the full image");
        let mut dec = zstd::stream::read::Decoder::new(File::open(&path).map_err(io_failure)?).map_err(io_failure)?;
        dec.window_log_max(atom_dist::delta::MAX_WINDOW_LOG)
            .map_err(io_failure)?;
        let mut w = self.writer();
        std::io::copy(&mut dec.take(self.target.image.size + 1), &mut w).map_err(io_failure)?;
        self.finish(w)
    }
}

/// A decoded delta on disk (it can be as large as the image), removed when dropped.
struct RawDelta {
    path: PathBuf,
    map: Option<Mmap>,
}

impl std::ops::Deref for RawDelta {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}

impl Drop for RawDelta {
    fn drop(&mut self) {
        self.map = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    if slotio::is_cancelled(&e) {
        Failure::error(slotio::CANCELLED)
    } else {
        Failure::error(e.to_string())
    }
}
