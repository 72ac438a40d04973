//! The routes that bring the inactive slot to the target image, cheapest first: the
//! publisher's delta from the running version, a delta atom-dist computes from this host's
//! signature, the whole payload. Each writes through the slot writer (only differing blocks,
//! checkpoints) and is verified by reading the whole slot back; a route that fails or does
//! not verify hands over to the next.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

use atom_dist::manifest::{DeltaFormat, Manifest};
use atom_dist::{Digest, delta};
use memmap2::Mmap;

use crate::config::{RouteName, Settings};
use crate::error::{Failure, Kind};
use crate::host::Host;
use crate::progress::Progress;
use crate::slotio::{self, SlotWriter, WriteStats};
use crate::source::Sources;
use crate::space;
use crate::state::Checkpoint;
use crate::update::Options;

const DELTA_SUFFIX: &str = "delta.zst";
const PAYLOAD_SUFFIX: &str = "img.zst";
const RSYNC_ANSWER: &str = "rsync.delta.zst";

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

/// One run's writing of the inactive slot: the verified target, the slots, and the means.
pub(crate) struct Job<'a> {
    pub(crate) s: &'a Settings,
    pub(crate) sources: &'a Sources,
    pub(crate) target: &'a Manifest,
    pub(crate) disk: &'a File,
    pub(crate) running: bootsel::table::Slot,
    pub(crate) inactive: bootsel::table::Slot,
    pub(crate) opts: &'a Options<'a>,
    pub(crate) work: PathBuf,
    pub(crate) progress: Progress,
    /// Bytes of the inactive slot an interrupted run already wrote for this target.
    pub(crate) resume_from: std::cell::Cell<u64>,
    pub(crate) uploaded: std::cell::Cell<u64>,
    pub(crate) save_checkpoint: &'a dyn Fn(u64) -> std::io::Result<()>,
}

impl Job<'_> {
    pub(crate) fn write_by_cheapest_route(&self, host: &Host) -> Result<(Route, WriteStats), Failure> {
        let mut failures = Vec::new();
        let mut verify_failed = false;
        for route in self.s.routes.iter().map(|r| match r {
            RouteName::Precomputed => Route::Precomputed,
            RouteName::Rsync => Route::Rsync,
            RouteName::Full => Route::Full,
        }) {
            let attempt = match route {
                Route::Precomputed => self.precomputed(host),
                Route::Rsync => self.rsync(host),
                Route::Full => self.full().map(Some),
            };
            let stats = match attempt {
                Ok(Some(stats)) => stats,
                Ok(None) => continue,
                // Cancelled: what was fetched stays, for the next run to resume.
                Err(e) if e.kind == Kind::Error && e.message == slotio::CANCELLED => return Err(e),
                Err(e) => {
                    self.remove_files_of(route, host);
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
            self.remove_files_of(route, host);
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

    fn remove_files_of(&self, route: Route, host: &Host) {
        for f in self.files_of(route, host) {
            match std::fs::remove_file(&f) {
                Ok(()) => tracing::debug!(file = %f.display(), "removed what the failed route fetched"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot remove what the failed route fetched")
                }
            }
        }
    }

    /// What a failed route leaves in the downloads directory and nobody will use: removed,
    /// so the next route (on a small /var: the full payload) has the room. A partial full
    /// payload cut off by the network stays, for the next run to resume with Range.
    fn files_of(&self, route: Route, host: &Host) -> Vec<PathBuf> {
        match route {
            Route::Precomputed => self
                .target
                .deltas
                .iter()
                .filter(|d| d.base_version == host.release.version)
                .map(|d| self.download_path(&d.digest, DELTA_SUFFIX))
                .collect(),
            Route::Rsync => vec![self.work.join(RSYNC_ANSWER)],
            Route::Full => {
                let p = self.download_path(&self.target.payload.digest, PAYLOAD_SUFFIX);
                let complete = std::fs::metadata(&p).is_ok_and(|m| m.len() >= self.target.payload.size);
                if complete { vec![p] } else { Vec::new() }
            }
        }
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

    /// A file the manifest names, downloaded (resumably) under its digest, or from a local
    /// repository: copied (`copy_local`, for files that get mapped) or read in place.
    fn fetch(&self, rel: &str, size: u64, digest: &Digest, suffix: &str, copy_local: bool) -> Result<File, Failure> {
        let dest = self.download_path(digest, suffix);
        let want = crate::source::Wanted {
            rel,
            size,
            digest,
            dest: &dest,
            downloaded: self.progress.download_callback(),
            read_locally: self.progress.local_read_callback(),
        };
        self.sources
            .fetch_file(&want, copy_local, self.opts.cancel)
            .map_err(Failure::error)
    }

    fn download_path(&self, digest: &Digest, suffix: &str) -> PathBuf {
        self.work.join(format!("{}.{suffix}", digest.hex()))
    }

    fn map_running(&self, len: u64) -> Result<Mmap, Failure> {
        slotio::map_range(self.disk, self.running.offset_bytes, len.min(self.running.size_bytes))
            .map_err(|e| Failure::error(format!("cannot map the running slot: {e}")))
    }

    /// The digest of the running slot's first `len` bytes: whether it holds a given base.
    fn running_digest(&self, len: u64) -> Result<Digest, Failure> {
        self.progress.phase("checking the running slot");
        slotio::hash_range(
            self.disk,
            self.running.offset_bytes,
            len.min(self.running.size_bytes),
            &|_| {},
        )
        .map_err(io_failure)
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
    fn raw_delta(&self, src: &File, format: DeltaFormat, base: &[u8]) -> Result<RawDelta, Failure> {
        // SAFETY: a private file of this process in its downloads directory (local
        // repositories' files are copied there first), not modified while mapped.
        let zst = unsafe { Mmap::map(src) }.map_err(io_failure)?;
        // A base-extents delta's prefix is assembled beside the decoded delta.
        let prefix = match format {
            DeltaFormat::FastRsyncZstdBaseExtents => delta::extents::prefix_size(&zst, base.len() as u64),
            _ => None,
        };
        let declared = delta::declared_size(&zst);
        if prefix.is_some() || declared.is_some() {
            let need = prefix.unwrap_or(0) + declared.unwrap_or(0);
            space::ensure_room(&self.work, need, "the decoded delta").map_err(Failure::error)?;
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
            Some(&self.work),
        )
        .and_then(|_| w.flush().map_err(delta::DeltaError::Io));
        if let Err(e) = decoded {
            let full = match &e {
                delta::DeltaError::Io(io) => space::removed_if_full(&raw.path, io),
                _ => None,
            };
            return Err(Failure::error(full.unwrap_or_else(|| e.to_string())));
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
        let base_digest = self.running_digest(d.base_size)?;
        if base_digest != d.base_digest {
            return Err(Failure::error(format!(
                "the running slot does not hold the published {} image (digest {base_digest}); cannot use its delta",
                d.base_version
            )));
        }
        self.progress.phase("downloading the precomputed delta");
        let zst = self.fetch(&d.path, d.size, &d.digest, DELTA_SUFFIX, true)?;
        let base = self.map_running(d.base_size)?;
        let raw = self.raw_delta(&zst, d.format, &base)?;
        self.progress.phase("applying the precomputed delta");
        self.apply_delta(&base, &raw).map(Some)
    }

    fn rsync(&self, host: &Host) -> Result<Option<WriteStats>, Failure> {
        if !self.sources.has_http() {
            return Ok(None);
        }
        if let Some(stats) = self.rsync_from_known_base(host)? {
            return Ok(Some(stats));
        }
        // The server bounds signatures to bases up to twice the target's size.
        let base_len = self.running.size_bytes.min(self.target.image.size.saturating_mul(2));
        let base = self.map_running(base_len)?;
        self.progress.phase("computing the running slot's signature");
        let sig = delta::signature_of(&base);
        let body = zstd::bulk::compress(sig.serialized(), 3).map_err(io_failure)?;
        self.uploaded.set(self.uploaded.get() + body.len() as u64);
        self.progress.phase("fetching an rsync delta from the server");
        let zst = self.work.join(RSYNC_ANSWER);
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
        let answer = File::open(&zst).map_err(io_failure)?;
        let raw = self.raw_delta(&answer, DeltaFormat::FastRsyncZstd, &base)?;
        self.progress.phase("applying the rsync delta");
        self.apply_delta(&base, &raw).map(Some)
    }

    /// The server's delta from the published image of the running version (a host that
    /// skipped versions the publisher made deltas from): no signature to compute or send,
    /// and byte-level matches into the base. `None` when the server does not know that
    /// base or the running slot no longer holds it: then the signature is sent.
    fn rsync_from_known_base(&self, host: &Host) -> Result<Option<WriteStats>, Failure> {
        // The precomputed route had that very delta: the server would send it again.
        if self
            .target
            .deltas
            .iter()
            .any(|d| d.base_version == host.release.version)
        {
            return Ok(None);
        }
        self.progress
            .phase("asking the server for a delta from the running version");
        let zst = self.work.join(RSYNC_ANSWER);
        let Some(answer) = self.sources.known_base_delta(
            &self.s.channel,
            &self.target.version,
            &host.release.version,
            &zst,
            delta::raw_delta_limit(self.target.image.size),
            self.progress.download_callback(),
        ) else {
            let _ = std::fs::remove_file(&zst);
            return Ok(None);
        };
        if self.running_digest(answer.base_size)? != answer.base_digest {
            tracing::info!(running = %host.release.version, "the running slot is not the published image; sending its signature instead");
            let _ = std::fs::remove_file(&zst);
            return Ok(None);
        }
        tracing::info!(running = %host.release.version, bytes = answer.bytes, format = ?answer.format, "delta from the running version's published image");
        let file = File::open(&zst).map_err(io_failure)?;
        let base = self.map_running(answer.base_size)?;
        let raw = match self.raw_delta(&file, answer.format, &base) {
            Ok(raw) => raw,
            Err(e) => {
                // Nothing was written yet: the signature's answer can still do.
                tracing::warn!(error = %e, "the server's delta from the running version does not decode; sending the signature instead");
                let _ = std::fs::remove_file(&zst);
                return Ok(None);
            }
        };
        self.progress.phase("applying the rsync delta");
        self.apply_delta(&base, &raw).map(Some)
    }

    fn full(&self) -> Result<WriteStats, Failure> {
        let p = &self.target.payload;
        self.progress.phase("downloading the full payload");
        // Read in place from a local repository: streamed, never mapped.
        let payload = self.fetch(&p.path, p.size, &p.digest, PAYLOAD_SUFFIX, false)?;
        self.progress.phase("writing the full image");
        let mut dec = zstd::stream::read::Decoder::new(payload).map_err(io_failure)?;
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
