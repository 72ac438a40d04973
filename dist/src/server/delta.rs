//! `POST /v1/delta`: the rsync-style endpoint.
//!
//! The client sends the zstd-compressed fast_rsync signature of its running slot and names
//! a channel (and optionally a version); the answer is the zstd-compressed delta from that
//! base to the target image. Answers are cached on disk by (signature digest, target
//! digest), so a fleet on the same base costs one diff, and identical requests that arrive
//! while a diff runs wait for it instead of starting their own.

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
use tokio::sync::{OnceCell, Semaphore};

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
}

type Key = (Digest, Digest);

/// Diffs in progress, so identical requests share one.
#[derive(Default)]
pub struct InFlight {
    map: Mutex<HashMap<Key, Arc<OnceCell<PathBuf>>>>,
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
    pub permits: Semaphore,
    pub per_client: Arc<PerClient>,
    pub inflight: InFlight,
    pub cache_dir: PathBuf,
}

impl DeltaService {
    pub fn new(limits: DeltaLimits, cache_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cache_dir)?;
        Ok(DeltaService {
            permits: Semaphore::new(limits.max_concurrent_diffs),
            per_client: PerClient::new(limits.max_diffs_per_client),
            limits,
            inflight: InFlight::default(),
            cache_dir,
        })
    }
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
    let hit = if cached.exists() {
        state.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
        touch(&cached);
        true
    } else {
        compute_shared(&state, key, &cached, sig, &target, peer.map(|p| p.0.0)).await?;
        false
    };
    respond(&cached, &target, hit).await
}

/// Runs the diff once per key; concurrent callers for the same key wait for it.
async fn compute_shared(
    state: &Arc<AppState>,
    key: Key,
    path: &Path,
    sig: fast_rsync::Signature,
    target: &Manifest,
    peer: Option<IpAddr>,
) -> Result<(), ApiError> {
    let svc = &state.delta;
    let cell = {
        let mut map = svc.inflight.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    };
    if cell.initialized() || Arc::strong_count(&cell) > 2 {
        state.metrics.shared_waits.fetch_add(1, Ordering::Relaxed);
    }
    let result = cell
        .get_or_try_init(|| async {
            state.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
            // Held while queued too: a client cannot fill the queue either.
            let _client_slot = match peer.map(|ip| (ip, svc.per_client.try_acquire(ip))) {
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
            let permit = match tokio::time::timeout(svc.limits.queue_wait, svc.permits.acquire()).await {
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
            let image = state.images.get(target).await.map_err(ApiError::internal)?;
            let (out, started) = (path.to_owned(), Instant::now());
            tokio::task::spawn_blocking(move || write_delta(&sig, &image, &out))
                .await
                .map_err(|e| ApiError::internal(format!("diff task failed: {e}")))?
                .map_err(|e| ApiError::internal(format!("diff failed: {e}")))?;
            drop(permit);
            state.metrics.diff_done(started.elapsed().as_secs_f64());
            tracing::info!(target = %target.version, seconds = started.elapsed().as_secs_f64(), "computed delta");
            evict(&svc.cache_dir, svc.limits.cache_max_bytes, path);
            Ok(path.to_owned())
        })
        .await
        .map(|_| ());
    svc.inflight.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    result
}

fn write_delta(sig: &fast_rsync::Signature, target: &[u8], out: &Path) -> std::io::Result<()> {
    let tmp = crate::fsutil::temp_path(out);
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut w = BufWriter::new(f);
        delta::make_with_signature(sig, target, 3, &mut w)?;
        w.flush()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
            total -= len;
            tracing::debug!(path = %path.display(), "evicted cached delta");
        }
    }
}

async fn respond(path: &Path, target: &Manifest, hit: bool) -> Result<Response, ApiError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::internal(format!("cached delta vanished: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
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
        .into_response())
}
