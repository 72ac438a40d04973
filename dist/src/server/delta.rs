//! `POST /v1/delta`: the rsync-style endpoint.
//!
//! The client sends the zstd-compressed fast_rsync signature of its running slot and names
//! a channel (and optionally a version); the answer is the zstd-compressed delta from that
//! base to the target image. Answers are cached on disk by (signature digest, target
//! digest), so a fleet on the same base costs one diff, and identical requests that arrive
//! while a diff runs wait for it instead of starting their own.
//!
//! A host that names its running version (`base_version`) and runs an image the channel
//! once published needs no signature at all: the answer is then the delta the publisher
//! would have made from that version (served from the repository when the target lists
//! it, else computed once from the two published images and cached), much smaller than a
//! block-level answer. Headers name its format and base; the host checks its slot holds
//! that base before applying it. An unknown base with an empty body is a 404
//! `unknown_base`, and the host sends its signature instead.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};

use super::AppState;
use super::clients::{Peer, PerClient};
use super::error::ApiError;
use crate::delta;
use crate::digest::Digest;
use crate::manifest::{self, Manifest};

/// Signatures compress poorly (they are hashes); allow the raw limit plus zstd framing.
const COMPRESSION_SLACK: usize = 64 * 1024;

#[derive(Deserialize)]
pub struct DeltaQuery {
    channel: String,
    version: Option<semver::Version>,
    /// The version the host runs, if it runs a published image unchanged.
    base_version: Option<semver::Version>,
}

/// Zstd level of the deltas computed from a known base: they are made once per pair and
/// served to every host on that base, so the publisher's level pays.
const KNOWN_BASE_LEVEL: i32 = 19;

/// What a diff is computed from.
#[derive(Clone)]
enum Work {
    /// The host's block signature: a block-level delta.
    Signature(Arc<fast_rsync::Signature>),
    /// A published base image: the delta the publisher would have made.
    KnownBase(Box<Manifest>),
}

/// The base an answer was made against, for the host to check before applying it.
struct AnswerBase {
    format: manifest::DeltaFormat,
    digest: Digest,
    size: u64,
}

type Key = (Digest, Digest);

/// How a diff in progress ended, for the requests that wait on it.
#[derive(Clone, Debug)]
enum Done {
    Ready,
    Failed(String),
    /// Its leader could not start it (busy, over its share): a waiter tries to lead.
    Abandoned,
}

/// Diffs in progress, so identical requests share one. An entry lives as long as its diff,
/// not as long as the request that started it: a client that disconnects leaves its diff
/// running (and counted against the limits) until it ends.
#[derive(Default)]
pub struct InFlight {
    map: Mutex<HashMap<Key, watch::Receiver<Option<Done>>>>,
}

/// The start of a diff, before its task owns it: dropping it (a refused or disconnected
/// leader) takes the entry out and tells the waiters.
struct Leader {
    state: Arc<AppState>,
    key: Key,
    tx: Option<watch::Sender<Option<Done>>>,
}

impl Leader {
    fn finish(mut self, done: Done) {
        if let Some(tx) = self.tx.take() {
            remove_inflight(&self.state, &self.key);
            let _ = tx.send(Some(done));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            remove_inflight(&self.state, &self.key);
            let _ = tx.send(Some(Done::Abandoned));
        }
    }
}

fn remove_inflight(state: &AppState, key: &Key) {
    state
        .delta
        .inflight
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(key);
}

pub struct DeltaLimits {
    pub max_concurrent_diffs: usize,
    /// Uncached diffs one client address may have running (or queued) at once.
    pub max_diffs_per_client: usize,
    pub queue_wait: Duration,
    pub body_timeout: Duration,
    pub cache_max_bytes: u64,
}

pub struct DeltaService {
    pub limits: DeltaLimits,
    pub permits: Arc<Semaphore>,
    /// Known-base diffs (two whole images at level 19: minutes) have one permit of their
    /// own, so they never hold up the signature diffs.
    pub known_base_permits: Arc<Semaphore>,
    pub per_client: Arc<PerClient>,
    pub inflight: InFlight,
    pub cache_dir: PathBuf,
}

impl DeltaService {
    pub fn new(limits: DeltaLimits, cache_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cache_dir)?;
        Ok(DeltaService {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_diffs)),
            known_base_permits: Arc::new(Semaphore::new(1)),
            per_client: PerClient::new(limits.max_diffs_per_client),
            limits,
            inflight: InFlight::default(),
            cache_dir,
        })
    }
}

/// The manifest the channel published for `version`, if it ever did.
fn published(state: &AppState, channel: &str, version: &semver::Version) -> Result<Option<Manifest>, ApiError> {
    let path = state.repo.path(&crate::repo::layout::history(channel, version));
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    Manifest::parse(&bytes)
        .map(Some)
        .map_err(|e| ApiError::internal(format!("repository manifest unreadable: {e}")))
}

fn target_manifest(state: &AppState, q: &DeltaQuery) -> Result<Manifest, ApiError> {
    manifest::check_name("channel", &q.channel).map_err(|e| ApiError::bad_request("bad_channel", e.to_string()))?;
    let not_found = |what: String| ApiError::new(StatusCode::NOT_FOUND, "not_found", what);
    let bytes = match &q.version {
        None => state
            .repo
            .current(&q.channel)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map(|s| s.manifest),
        Some(v) => {
            let path = state.repo.path(&crate::repo::layout::history(&q.channel, v));
            std::fs::read(path).ok()
        }
    };
    let bytes = bytes.ok_or_else(|| match &q.version {
        None => not_found(format!("channel {:?} does not exist", q.channel)),
        Some(v) => not_found(format!("version {v} was never published on channel {:?}", q.channel)),
    })?;
    Manifest::parse(&bytes).map_err(|e| ApiError::internal(format!("repository manifest unreadable: {e}")))
}

pub async fn handle(
    State(state): State<Arc<AppState>>,
    Query(q): Query<DeltaQuery>,
    peer: Option<axum::Extension<Peer>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let target = target_manifest(&state, &q)?;
    let known = match &q.base_version {
        Some(v) => published(&state, &q.channel, v)?,
        None => None,
    };
    if let Some(base) = known
        && base.image.digest != target.image.digest
        && base.board == target.board
        && base.version < target.version
    {
        return known_base(&state, &q.channel, base, &target, peer.map(|p| p.0.0)).await;
    }
    let svc = &state.delta;
    // A client's base is an image of the same product; allow it to be up to twice the
    // target's size.
    let raw_limit = delta::signature_limit(target.image.size.saturating_mul(2));
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > (raw_limit + COMPRESSION_SLACK) as u64) {
        // Refused before reading a byte of it.
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("signature body exceeds {} bytes", raw_limit + COMPRESSION_SLACK),
        ));
    }
    let compressed = tokio::time::timeout(
        svc.limits.body_timeout,
        http_body_util::Limited::new(body, raw_limit + COMPRESSION_SLACK).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the signature upload took too long",
        )
    })?
    .map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("signature body exceeds {} bytes", raw_limit + COMPRESSION_SLACK),
            )
        } else {
            ApiError::bad_request("bad_body", format!("cannot read the request body: {e}"))
        }
    })?
    .to_bytes();
    if compressed.is_empty()
        && let Some(v) = &q.base_version
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_base",
            format!(
                "version {v} is not a published image of channel {:?} this server can diff from; send the slot's signature",
                q.channel
            ),
        ));
    }
    let mut raw = Vec::new();
    let dec = zstd::stream::read::Decoder::new(&compressed[..])
        .map_err(|e| ApiError::bad_request("bad_signature", e.to_string()))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(dec, raw_limit as u64 + 1), &mut raw)
        .map_err(|e| ApiError::bad_request("bad_signature", format!("body is not a zstd stream: {e}")))?;
    if raw.len() > raw_limit {
        // A wrong header is the more useful answer (e.g. a client using another block size).
        delta::check_signature_header(&raw).map_err(|e| ApiError::bad_request("bad_signature", e.to_string()))?;
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("decompressed signature exceeds {raw_limit} bytes, the most a base of this product can need"),
        ));
    }
    let sig_digest = Digest::of(&raw);
    let sig = delta::parse_signature(raw, raw_limit).map_err(|e| match e {
        delta::SignatureCheckError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
        }
        other => ApiError::bad_request("bad_signature", other.to_string()),
    })?;

    let key = (sig_digest, target.image.digest);
    let cached = svc.cache_dir.join(format!("{}-{}.zst", key.0.hex(), key.1.hex()));
    let hit = if entry_is_sound(&cached).await {
        true
    } else {
        compute_shared(
            &state,
            key,
            &cached,
            Work::Signature(Arc::new(sig)),
            &target,
            peer.map(|p| p.0.0),
        )
        .await?
    };
    if hit {
        state.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
        touch(&cached);
    }
    respond(&cached, &target, hit, None).await
}

/// The answer for a host on a published base: the target's own precomputed delta from it
/// if the publisher made one, else one computed here once per (base, target).
async fn known_base(
    state: &Arc<AppState>,
    channel: &str,
    base: Manifest,
    target: &Manifest,
    peer: Option<IpAddr>,
) -> Result<Response, ApiError> {
    let listed = target
        .deltas
        .iter()
        .find(|d| d.base_digest == base.image.digest && d.format != manifest::DeltaFormat::Unsupported);
    if let Some(d) = listed {
        let path = state.repo.path(&d.path);
        let (want, check) = (d.digest, path.clone());
        // A damaged repository object is not passed on: computed here instead.
        let sound = tokio::task::spawn_blocking(move || Digest::of_file(&check).is_ok_and(|(got, _)| got == want))
            .await
            .unwrap_or(false);
        if sound {
            let answer = AnswerBase {
                format: d.format,
                digest: d.base_digest,
                size: d.base_size,
            };
            let r = respond(&path, target, true, Some(answer)).await;
            state.metrics.known_base_answers.fetch_add(1, Ordering::Relaxed);
            return r;
        }
        tracing::warn!(path = %path.display(), "a published delta does not match its manifest; computing one");
    }
    // A level-19 diff of two whole images costs minutes: only toward the channel's current
    // version, so a client cannot make the server diff every pair of the history.
    let current = state
        .repo
        .current(channel)
        .ok()
        .flatten()
        .and_then(|s| Manifest::parse(&s.manifest).ok());
    if current.is_none_or(|c| c.image.digest != target.image.digest) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_base",
            "deltas from a published base are computed only toward the channel's current version; send the slot's signature",
        ));
    }
    let key = (base.image.digest, target.image.digest);
    let cached = state
        .delta
        .cache_dir
        .join(format!("known-{}-{}.zst", key.0.hex(), key.1.hex()));
    let usable = entry_is_sound(&cached).await
        && (read_format(&cached).is_some() || {
            // Its format file is lost: computed again rather than answered with a guess.
            let _ = std::fs::remove_file(&cached);
            let _ = std::fs::remove_file(digest_path(&cached));
            false
        });
    let hit = if usable {
        true
    } else {
        compute_shared(
            state,
            key,
            &cached,
            Work::KnownBase(Box::new(base.clone())),
            target,
            peer,
        )
        .await
        .map_err(|e| {
            // A base this server cannot diff from (its payload gone, say) is one the host
            // should send its signature for, not retry: a 5xx would be retried.
            if e.status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!(base = %base.version, error = %e.message, "no delta from a published base");
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_base",
                    format!(
                        "cannot diff from {}: {}; send the slot's signature",
                        base.version, e.message
                    ),
                )
            } else {
                e
            }
        })?
    };
    if hit {
        state.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
        touch(&cached);
    }
    let format = read_format(&cached).ok_or_else(|| ApiError::internal("cached delta lost its format"))?;
    let answer = AnswerBase {
        format,
        digest: base.image.digest,
        size: base.image.size,
    };
    let r = respond(&cached, target, hit, Some(answer)).await;
    state.metrics.known_base_answers.fetch_add(1, Ordering::Relaxed);
    r
}

/// The format of a known-base cache entry, kept beside it.
fn format_path(entry: &Path) -> PathBuf {
    entry.with_extension("zst.format")
}

fn read_format(entry: &Path) -> Option<manifest::DeltaFormat> {
    let text = std::fs::read_to_string(format_path(entry)).ok()?;
    manifest::DeltaFormat::from_name(text.trim())
}

/// Runs the diff once per key; concurrent callers for the same key wait for it. Returns
/// whether the entry turned out to be cached after all.
async fn compute_shared(
    state: &Arc<AppState>,
    key: Key,
    path: &Path,
    work: Work,
    target: &Manifest,
    peer: Option<IpAddr>,
) -> Result<bool, ApiError> {
    loop {
        let (tx, rx) = watch::channel(None);
        let running = {
            let mut map = state.delta.inflight.map.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some(rx) => Some(rx.clone()),
                None => {
                    map.insert(key, rx);
                    None
                }
            }
        };
        let Some(mut running) = running else {
            let leader = Leader {
                state: state.clone(),
                key,
                tx: Some(tx),
            };
            // A diff that ended between this request's cache check and its taking the
            // lead has already written the entry (before leaving the in-flight map).
            if entry_is_sound(path).await {
                leader.finish(Done::Ready);
                return Ok(true);
            }
            return lead(state, leader, path, work.clone(), target, peer)
                .await
                .map(|()| false);
        };
        state.metrics.shared_waits.fetch_add(1, Ordering::Relaxed);
        let done = running
            .wait_for(Option::is_some)
            .await
            .map(|d| d.clone().unwrap_or(Done::Abandoned))
            .unwrap_or(Done::Abandoned);
        match done {
            Done::Ready => return Ok(false),
            Done::Failed(e) => return Err(ApiError::internal(e)),
            Done::Abandoned => continue,
        }
    }
}

/// Takes the client's diff slot and a diff permit, then hands the diff to a task of its
/// own that holds both until the diff ends, whatever becomes of this request.
async fn lead(
    state: &Arc<AppState>,
    leader: Leader,
    path: &Path,
    work: Work,
    target: &Manifest,
    peer: Option<IpAddr>,
) -> Result<(), ApiError> {
    let svc = &state.delta;
    state.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
    // Held while queued too: a client cannot fill the queue either.
    let client_slot = match peer.map(|ip| (ip, svc.per_client.try_acquire(ip))) {
        Some((ip, None)) => {
            state.metrics.rejected_client_diffs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%ip, "delta refused: the client has its share of diffs running");
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "client-busy",
                "this address already has its share of diffs running; retry later",
            );
            e.retry_after_secs = Some(svc.limits.queue_wait.as_secs().max(1));
            return Err(e);
        }
        Some((_, slot)) => slot,
        None => None,
    };
    let permits = match work {
        Work::Signature(_) => &svc.permits,
        Work::KnownBase(_) => &svc.known_base_permits,
    };
    let permit = match tokio::time::timeout(svc.limits.queue_wait, permits.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            state.metrics.rejected_busy.fetch_add(1, Ordering::Relaxed);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many diffs in progress; retry later",
            );
            e.retry_after_secs = Some(svc.limits.queue_wait.as_secs().max(1) * 2);
            return Err(e);
        }
    };
    let (state2, out, target) = (state.clone(), path.to_owned(), target.clone());
    // The image's decompression (minutes for a cold, large one) is part of the diff: it
    // runs in the task too, under the permit and the client's slot.
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let version = target.version.clone();
        let written = match (work, state2.images.get(&target).await) {
            (_, Err(e)) => Ok(Err(std::io::Error::other(e))),
            (Work::Signature(sig), Ok(image)) => {
                let out = out.clone();
                tokio::task::spawn_blocking(move || write_delta(&sig, &image, &out)).await
            }
            (Work::KnownBase(base), Ok(image)) => match state2.images.get(&base).await {
                Ok(base) => {
                    let out = out.clone();
                    tokio::task::spawn_blocking(move || write_known_delta(&base, &image, &out)).await
                }
                Err(e) => Ok(Err(std::io::Error::other(e))),
            },
        };
        drop(permit);
        drop(client_slot);
        let done = match written {
            Ok(Ok(())) => {
                state2.metrics.diff_done(started.elapsed().as_secs_f64());
                tracing::info!(target = %version, seconds = started.elapsed().as_secs_f64(), "computed delta");
                evict(&state2.delta.cache_dir, state2.delta.limits.cache_max_bytes, &out);
                Done::Ready
            }
            Ok(Err(e)) => Done::Failed(format!("diff failed: {e}")),
            Err(e) => Done::Failed(format!("diff task failed: {e}")),
        };
        leader.finish(done.clone());
        done
    });
    match task.await {
        Ok(Done::Ready) => Ok(()),
        Ok(Done::Failed(e)) => Err(ApiError::internal(e)),
        Ok(Done::Abandoned) | Err(_) => Err(ApiError::internal("the diff task ended without an answer")),
    }
}

/// The digest of a cache entry, kept beside it: an entry is served only if its bytes are
/// still the ones written (a torn write, a disk error, two writers).
fn digest_path(entry: &Path) -> PathBuf {
    entry.with_extension("zst.b3")
}

/// Hashing an entry costs about what sending it does, so a hit is checked every time.
async fn entry_is_sound(entry: &Path) -> bool {
    let entry = entry.to_owned();
    tokio::task::spawn_blocking(move || {
        let Ok(want) = std::fs::read_to_string(digest_path(&entry)) else {
            return false;
        };
        let sound = Digest::of_file(&entry).is_ok_and(|(d, _)| d.hex() == want.trim());
        if !sound && entry.exists() {
            tracing::warn!(entry = %entry.display(), "cached delta does not match its digest; computing it again");
            let _ = std::fs::remove_file(&entry);
            let _ = std::fs::remove_file(digest_path(&entry));
        }
        sound
    })
    .await
    .unwrap_or(false)
}

/// Writes the entry under a name unique to this writer, then its digest, then renames it
/// into place: a reader sees a whole entry with its digest, or none.
fn write_delta(sig: &fast_rsync::Signature, target: &[u8], out: &Path) -> std::io::Result<()> {
    let tmp = crate::fsutil::temp_path(out);
    let result = (|| {
        slow_diff_for_tests();
        let f = std::fs::File::create(&tmp)?;
        let mut w = crate::digest::HashingWriter::new(BufWriter::new(f));
        delta::make_with_signature(sig, target, 3, &mut w)?;
        let (mut inner, digest, _) = w.finish();
        inner.flush()?;
        crate::fsutil::write_atomic_bytes(&digest_path(out), 0o644, digest.hex().as_bytes())?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_delta`], from a whole published base; its format goes beside it, written
/// before the entry is renamed into place.
fn write_known_delta(base: &[u8], target: &[u8], out: &Path) -> std::io::Result<()> {
    let tmp = crate::fsutil::temp_path(out);
    let result = (|| {
        slow_diff_for_tests();
        let (format, encoded) = delta::make_precomputed(base, target, KNOWN_BASE_LEVEL, delta::Encoding::BaseExtents)?;
        // Served to every host on this base: it must rebuild the target exactly.
        let scratch = out.parent();
        delta::check_rebuilds(
            format,
            base,
            &encoded,
            target.len() as u64,
            &Digest::of(target),
            scratch,
            &mut || {},
        )
        .map_err(std::io::Error::other)?;
        std::fs::write(&tmp, &encoded)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        let digest = Digest::of(&encoded);
        crate::fsutil::write_atomic_bytes(&format_path(out), 0o644, format.name().as_bytes())?;
        crate::fsutil::write_atomic_bytes(&digest_path(out), 0o644, digest.hex().as_bytes())?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `ATOM_DIST_FAILPOINT=diff:slow=MS` makes every diff take that much longer, so a test
/// can disconnect in the middle of one.
fn slow_diff_for_tests() {
    let ms = std::env::var("ATOM_DIST_FAILPOINT")
        .ok()
        .and_then(|v| v.strip_prefix("diff:slow=").and_then(|ms| ms.parse::<u64>().ok()));
    if let Some(ms) = ms {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Marks a cache entry as recently used (eviction removes the least recently used).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Deletes the least recently used cache entries until the cache fits its bound; never
/// the entry just written.
fn evict(dir: &Path, max_bytes: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let name = e.file_name();
            let is_delta = m.is_file() && name.to_str()?.ends_with(".zst");
            is_delta.then_some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max_bytes {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            let _ = std::fs::remove_file(digest_path(&path));
            let _ = std::fs::remove_file(format_path(&path));
            total -= len;
            tracing::debug!(path = %path.display(), "evicted cached delta");
        }
    }
}

async fn respond(path: &Path, target: &Manifest, hit: bool, base: Option<AnswerBase>) -> Result<Response, ApiError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::internal(format!("cached delta vanished: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::HeaderName::from_static("x-atom-target-digest"),
                target.image.digest.to_string(),
            ),
            (
                header::HeaderName::from_static("x-atom-target-version"),
                target.version.to_string(),
            ),
            (
                header::HeaderName::from_static("x-atom-cache"),
                if hit { "hit" } else { "miss" }.to_string(),
            ),
        ],
        body,
    )
        .into_response();
    if let Some(b) = base {
        let h = response.headers_mut();
        for (name, v) in [
            ("x-atom-delta-format", b.format.name().to_owned()),
            ("x-atom-base-digest", b.digest.to_string()),
            ("x-atom-base-size", b.size.to_string()),
        ] {
            if let Ok(v) = header::HeaderValue::from_str(&v) {
                h.insert(name, v);
            }
        }
    }
    Ok(response)
}
