//! Reading the repository: HTTP(S) mirrors and local directories, tried in order.
//!
//! Everything fetched here is untrusted until checked: manifests by signature, files by
//! the size and digest the verified manifest gives, and rsync answers only by the digest of
//! the image they produce.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atom_dist::manifest::{DeltaFormat, MAX_MANIFEST_BYTES};
use atom_dist::repo::layout;
use atom_dist::verify::{Policy, RoleDocs, Seen, Verified, verify_chain, verify_manifest};
use atom_dist::{Digest, localfile};
use reqwest::blocking::Client;
use reqwest::{Certificate, StatusCode};

use crate::config::{Repo, Settings};
use crate::error::Failure;
use crate::slotio::CANCELLED;
use crate::space;
use crate::trust::Trust;

/// What a host accepted before, by scheme: nothing older is taken again.
#[derive(Clone, Copy, Debug, Default)]
pub struct Watermarks {
    /// The newest manifest `created` accepted on the channel.
    pub manifest: Option<jiff::Timestamp>,
    pub roles: Seen,
}

/// A manifest a mirror offered and this host accepted.
pub struct Accepted {
    pub verified: Verified,
    pub from: String,
    /// Key roles: what to record for the replay checks.
    pub roles: Option<RoleMarks>,
}

/// Key roles: the accepted keys.toml (version and digest) and the timestamp's `created`.
#[derive(Clone, Copy, Debug)]
pub struct RoleMarks {
    pub keys_version: u64,
    pub keys_digest: Digest,
    pub timestamp: jiff::Timestamp,
}

enum Docs {
    Single { manifest: Vec<u8>, sig: Vec<u8> },
    Roles(FetchedRoleDocs),
}

/// What [`RoleDocs`] views, as fetched from one mirror.
struct FetchedRoleDocs {
    keys: Vec<u8>,
    keys_sig: Vec<u8>,
    timestamp: Vec<u8>,
    timestamp_sig: Vec<u8>,
    manifest: Vec<u8>,
    manifest_sig: Vec<u8>,
}

impl FetchedRoleDocs {
    fn view(&self) -> RoleDocs<'_> {
        RoleDocs {
            keys: &self.keys,
            keys_sig: &self.keys_sig,
            timestamp: &self.timestamp,
            timestamp_sig: &self.timestamp_sig,
            manifest: &self.manifest,
            manifest_sig: &self.manifest_sig,
        }
    }
}

pub struct Sources {
    repos: Vec<Repo>,
    client: Option<Client>,
    retries: u32,
    timeout: Duration,
}

/// Transfers slower than this are treated as stalled: a large download gets the base
/// timeout plus the time this rate needs for its size.
const MIN_BYTES_PER_SEC: u64 = 64 * 1024;

/// The CAs of `tls_ca`: trust material like the signing keys, so others may not write it.
fn pinned_cas(path: &Path) -> Result<Vec<Certificate>, Failure> {
    crate::perms::check_private(path, "TLS CA file")?;
    let pem =
        std::fs::read(path).map_err(|e| Failure::error(format!("cannot read TLS CA file {}: {e}", path.display())))?;
    match Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(Failure::error(format!(
            "TLS CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))),
        Err(e) => Err(Failure::error(format!(
            "TLS CA file {}: {}",
            path.display(),
            error_chain(&e)
        ))),
    }
}

/// Why one mirror could not give us something; collected so the final error lists all.
/// TLS that trusts no certificate: for clients whose mirrors are all plain HTTP (a redirect
/// to HTTPS then fails with an unknown issuer instead of trusting the system's CAs).
fn no_trusted_roots() -> Result<rustls::ClientConfig, Failure> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::error(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// Follows up to 10 redirects, but never from HTTPS to plain HTTP: that would drop the
/// transport's protection (and a pinned `tls_ca`) for the rest of the request.
fn no_downgrade() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http" && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            let to = attempt.url().to_string();
            attempt.error(format!("refusing a redirect from HTTPS to plain HTTP ({to})"))
        } else if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else {
            attempt.follow()
        }
    })
}

fn join(errors: &[String]) -> String {
    errors.join("; ")
}

impl Sources {
    pub fn new(s: &Settings) -> Result<Self, Failure> {
        // rustls with ring; installing the provider twice (daemon reloads) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Only with an HTTP mirror: a host fed from a local disk may have no CA store.
        let client = if s.repositories.iter().any(|r| matches!(r, Repo::Http(_))) {
            let mut builder = Client::builder()
                .redirect(no_downgrade())
                .connect_timeout(s.http_timeout)
                .timeout(s.http_timeout)
                .user_agent(format!("atom-update/{}", crate::trust::AGENT_VERSION));
            let any_https = s
                .repositories
                .iter()
                .any(|r| matches!(r, Repo::Http(u) if u.starts_with("https://")));
            if let Some(path) = &s.tls_ca {
                builder = builder.tls_certs_only(pinned_cas(path)?);
            } else if !any_https {
                // Plain-HTTP mirrors only (the manifest signature is the trust): a minimal
                // OS may have no CA store, and loading the system's would fail the run.
                builder = builder.tls_backend_preconfigured(no_trusted_roots()?);
            }
            let c = builder
                .build()
                .map_err(|e| Failure::error(format!("cannot create the HTTP client: {}", error_chain(&e))))?;
            Some(c)
        } else {
            None
        };
        Ok(Sources {
            repos: s.repositories.clone(),
            client,
            retries: s.http_retries,
            timeout: s.http_timeout,
        })
    }

    fn http(&self) -> Result<&Client, String> {
        self.client
            .as_ref()
            .ok_or_else(|| "no HTTP client (no HTTP repository configured)".into())
    }

    fn transfer_timeout(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_secs(bytes / MIN_BYTES_PER_SEC)
    }

    pub fn has_http(&self) -> bool {
        self.repos.iter().any(|r| matches!(r, Repo::Http(_)))
    }

    fn get_small(&self, repo: &Repo, rel: &str, limit: usize, cancel: &AtomicBool) -> Result<Option<Vec<u8>>, String> {
        match repo {
            // A stick or a shared directory may hold FIFOs, links to devices or out of the
            // tree: regular files beneath the root only, bounded before reading.
            Repo::Dir(root) => match localfile::read_bounded(root, rel, limit as u64) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Repo::Http(base) => {
                let url = format!("{base}/{rel}");
                let started = Instant::now();
                let resp = {
                    let client = self.http()?;
                    let whole = self.transfer_timeout(limit as u64);
                    self.with_retries(|| client.get(&url).timeout(whole).send())?
                };
                if resp.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    return Err(format!("{url}: HTTP {}", resp.status()));
                }
                // A whole-request deadline by the size announced (or the limit): a server that
                // drips a byte now and then passes every per-read timeout.
                let expected = resp.content_length().unwrap_or(limit as u64).min(limit as u64);
                let deadline = started + self.transfer_timeout(expected);
                read_within(resp, limit, deadline, cancel)
                    .map(Some)
                    .map_err(|e| format!("{url}: {e}"))
            }
        }
    }

    fn with_retries(
        &self,
        mut f: impl FnMut() -> reqwest::Result<reqwest::blocking::Response>,
    ) -> Result<reqwest::blocking::Response, String> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(r)
                    if r.status().is_server_error()
                        && r.status() != StatusCode::SERVICE_UNAVAILABLE
                        && attempt < self.retries => {}
                Ok(r) => return Ok(r),
                Err(e) if attempt >= self.retries => return Err(error_chain(&e)),
                Err(e) => tracing::warn!(error = error_chain(&e), attempt, "request failed; retrying"),
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
        }
    }

    /// The channel's manifest, verified, from the first mirror that has a valid one not
    /// older than what this host accepted before (`seen`).
    pub fn signed_manifest(
        &self,
        channel: &str,
        trust: &Trust,
        policy: &Policy<'_>,
        seen: &Watermarks,
        cancel: &AtomicBool,
    ) -> Result<Accepted, Failure> {
        let mut errors = Vec::new();
        let mut refusals = Vec::new();
        for repo in &self.repos {
            let fetched = match trust {
                Trust::Single(_) => self.single_key_docs(repo, channel, cancel),
                Trust::Roles(_) => self.role_docs(repo, channel, cancel),
            };
            let docs = match fetched {
                Ok(d) => d,
                Err(e) if e.ends_with(CANCELLED) => return Err(Failure::error(CANCELLED)),
                Err(e) => {
                    errors.push(format!("{repo}: {e}"));
                    continue;
                }
            };
            let checked = match &docs {
                Docs::Single { manifest, sig } => verify_manifest(manifest, sig, policy).map(|v| (v, None)),
                Docs::Roles(docs) => verify_chain(&docs.view(), policy, seen.roles).map(|c| {
                    tracing::debug!(
                        keys_version = c.keys.doc.version, root = %c.keys.signed_by,
                        freshness = %c.timestamp_signed_by, timestamp_expires = %c.timestamp.expires,
                        "verified keys.toml and timestamp"
                    );
                    let marks = RoleMarks {
                        keys_version: c.keys.doc.version,
                        keys_digest: Digest::of(&docs.keys),
                        timestamp: c.timestamp.created,
                    };
                    (c.verified, Some(marks))
                }),
            };
            match checked {
                Ok((v, roles)) => match seen.manifest.filter(|t| v.manifest.created < *t) {
                    // A watermark in the future is still obeyed (ignoring it would let a
                    // replay through on a host whose clock went back), but explained.
                    Some(t) if atom_dist::verify::is_from_the_future(t, policy.now) => refusals.push(format!(
                        "{repo}: manifest created {} is older than one this host already accepted ({t}), which \
                         is after this host's clock: either the clock is wrong (fix it), or an older agent \
                         recorded a manifest dated in the future (`atom-update forget-watermark` clears it)",
                        v.manifest.created
                    )),
                    Some(t) => refusals.push(format!(
                        "{repo}: manifest created {} is older than one this host already accepted ({t}): \
                         a replay or a stale mirror",
                        v.manifest.created
                    )),
                    None => {
                        return Ok(Accepted {
                            verified: v,
                            from: repo.to_string(),
                            roles,
                        });
                    }
                },
                Err(e) => refusals.push(format!("{repo}: {e}")),
            }
        }
        if !refusals.is_empty() {
            refusals.extend(errors);
            return Err(Failure::refused(format!("no acceptable manifest: {}", join(&refusals))));
        }
        Err(Failure::error(format!("cannot fetch the manifest: {}", join(&errors))))
    }

    /// A small file that must exist (its absence is an error naming it).
    fn get_required(&self, repo: &Repo, rel: &str, limit: usize, cancel: &AtomicBool) -> Result<Vec<u8>, String> {
        self.get_small(repo, rel, limit, cancel)?
            .ok_or_else(|| format!("{rel} not found"))
    }

    /// A signature file; a missing one is read as empty, which every verifier refuses
    /// with a clear message.
    fn get_signature(&self, repo: &Repo, rel: &str, cancel: &AtomicBool) -> Result<Vec<u8>, String> {
        Ok(self
            .get_small(repo, rel, atom_dist::signature::MAX_SIGNATURE_FILE_BYTES, cancel)?
            .unwrap_or_default())
    }

    fn single_key_docs(&self, repo: &Repo, channel: &str, cancel: &AtomicBool) -> Result<Docs, String> {
        let manifest = self
            .get_small(repo, &layout::manifest(channel), MAX_MANIFEST_BYTES, cancel)?
            .ok_or_else(|| format!("channel {channel:?} not found"))?;
        let sig = self.get_signature(repo, &layout::signature(channel, &Digest::of(&manifest)), cancel)?;
        Ok(Docs::Single { manifest, sig })
    }

    /// keys.toml, the timestamp, and the manifest the timestamp names (by digest, so a
    /// publish in progress on the mirror cannot pair a new manifest with an old timestamp).
    fn role_docs(&self, repo: &Repo, channel: &str, cancel: &AtomicBool) -> Result<Docs, String> {
        let keys = self
            .get_required(repo, layout::KEYS, atom_dist::roles::MAX_KEYS_BYTES, cancel)
            .map_err(|e| format!("{e}: this host trusts root keys, so the repository must have key roles"))?;
        let keys_sig = self.get_signature(repo, &layout::keys_signature(&Digest::of(&keys)), cancel)?;
        let timestamp = self
            .get_small(
                repo,
                &layout::timestamp(channel),
                atom_dist::timestamp::MAX_TIMESTAMP_BYTES,
                cancel,
            )?
            .ok_or_else(|| format!("channel {channel:?} has no timestamp ({})", layout::timestamp(channel)))?;
        let timestamp_sig = self.get_signature(repo, &layout::signature(channel, &Digest::of(&timestamp)), cancel)?;
        // Unverified here: only used to find the manifest; verify_chain checks it all.
        let named = atom_dist::timestamp::TimestampDoc::parse(&timestamp)
            .map(|t| t.manifest)
            .map_err(|e| e.to_string())?;
        let manifest = self.get_required(
            repo,
            &layout::manifest_by_digest(channel, &named),
            MAX_MANIFEST_BYTES,
            cancel,
        )?;
        let manifest_sig = self.get_signature(repo, &layout::signature(channel, &Digest::of(&manifest)), cancel)?;
        Ok(Docs::Roles(FetchedRoleDocs {
            keys,
            keys_sig,
            timestamp,
            timestamp_sig,
            manifest,
            manifest_sig,
        }))
    }

    /// A manifest-named file, checked against `size` and `digest`, opened for reading.
    ///
    /// HTTP downloads go to `dest` and resume with Range after a failure. A local
    /// repository's file is copied to `dest` when `copy_local` (the caller maps it, and a
    /// mapped file on a stick that is pulled or truncated kills the process with SIGBUS),
    /// else read in place.
    pub fn fetch_file(&self, want: &Wanted<'_>, copy_local: bool, cancel: &AtomicBool) -> Result<File, String> {
        let mut errors = Vec::new();
        for repo in &self.repos {
            let checked = match repo {
                Repo::Dir(root) if copy_local => copy_checked(root, want),
                Repo::Dir(root) => localfile::check(root, want.rel, want.size, want.digest)
                    .map(|f| {
                        (want.read_locally)(f.size);
                        f.file
                    })
                    .map_err(|e| e.to_string()),
                Repo::Http(base) => match self.download_checked(base, want, cancel) {
                    Ok(file) => Ok(file),
                    Err(e) if e == CANCELLED => return Err(e),
                    Err(e) => {
                        errors.push(format!("{repo}: {e}"));
                        continue;
                    }
                },
            };
            match checked {
                Ok(file) => return Ok(file),
                Err(e) => {
                    if copy_local {
                        let _ = std::fs::remove_file(want.dest);
                    }
                    errors.push(format!("{repo}: {e}"));
                }
            }
        }
        Err(join(&errors))
    }

    /// Downloads `want` from the mirror at `base` and checks it. A file that resumed a
    /// partial download and then fails its check is fetched again from zero, once: the part
    /// before may have been an error page a broken mirror or a captive portal sent.
    fn download_checked(&self, base: &str, want: &Wanted<'_>, cancel: &AtomicBool) -> Result<File, String> {
        let url = format!("{base}/{}", want.rel);
        let resumed = self.download(base, &url, want.size, want.dest, want.downloaded, cancel)?;
        match check_file(want.dest, want.size, want.digest) {
            Ok(f) => return Ok(f),
            Err(e) if !resumed => {
                Origin::forget(want.dest);
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, "a resumed download failed its check; fetching it again from the start")
            }
        }
        Origin::forget(want.dest);
        self.download(base, &url, want.size, want.dest, want.downloaded, cancel)?;
        let checked = check_file(want.dest, want.size, want.digest);
        if checked.is_err() {
            Origin::forget(want.dest);
        }
        checked
    }

    /// Fetches `url` into `dest`, resuming a partial file when that is safe (see
    /// [`Origin`]); returns whether any of the file came from before this call.
    fn download(
        &self,
        base: &str,
        url: &str,
        size: u64,
        dest: &Path,
        progress: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> Result<bool, String> {
        let mut attempt = 0;
        let mut resumed = false;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CANCELLED.into());
            }
            let mut have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
            let origin = Origin::load(dest);
            let validator = match (&origin, have) {
                (_, 0) => None,
                (Some(o), _) if o.mirror == base => Some(o.etag.clone()),
                // Another mirror's bytes: only with a validator the server can compare.
                (Some(o), _) if o.etag.is_some() => Some(o.etag.clone()),
                _ => {
                    tracing::info!(%url, bytes = have, "a partial download from another mirror, without a validator: starting over");
                    Origin::forget(dest);
                    have = 0;
                    None
                }
            };
            if have == size && origin.as_ref().is_some_and(|o| o.mirror == base) {
                return Ok(true);
            }
            if have >= size {
                Origin::forget(dest);
                have = 0;
            }
            let dir = dest.parent().unwrap_or(Path::new("."));
            space::ensure_room(dir, size - have, "the download")?;
            resumed |= have > 0;
            match self.download_from(base, url, have, validator.flatten(), size, dest, progress, cancel) {
                Ok(fresh) => return Ok(resumed && !fresh),
                Err(e) if attempt >= self.retries || e == CANCELLED => return Err(e),
                Err(e) => tracing::warn!(%url, error = %e, resume_at = have, "download interrupted; resuming"),
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
        }
    }

    /// One request for `url` from byte `from` on; returns whether the server sent the whole
    /// file again (it ignored the range, or the validator no longer matched).
    #[allow(clippy::too_many_arguments)]
    fn download_from(
        &self,
        base: &str,
        url: &str,
        from: u64,
        etag: Option<String>,
        size: u64,
        dest: &Path,
        progress: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> Result<bool, String> {
        let mut req = self.http()?.get(url).timeout(self.transfer_timeout(size - from));
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            if let Some(tag) = &etag {
                // The range only if the file is still the one the partial part came from.
                req = req.header(reqwest::header::IF_RANGE, tag);
            }
        }
        let mut resp = req.send().map_err(|e| error_chain(&e))?;
        let fresh = resp.status() == StatusCode::OK;
        let mut file = match (from, resp.status()) {
            (0, StatusCode::OK) => File::create(dest),
            (_, StatusCode::PARTIAL_CONTENT) => OpenOptions::new().append(true).open(dest),
            // The server ignored the range (or the validator did not match): start over.
            (_, StatusCode::OK) => File::create(dest),
            (_, s) => return Err(format!("HTTP {s}")),
        }
        .map_err(|e| format!("{}: {e}", dest.display()))?;
        if fresh || from == 0 {
            let etag = resp
                .headers()
                .get(reqwest::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.starts_with("W/"))
                .map(str::to_owned);
            Origin {
                mirror: base.to_owned(),
                etag,
            }
            .save(dest);
        }
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = file.metadata().map(|m| m.len()).unwrap_or(0);
        loop {
            if cancel.load(Ordering::Relaxed) {
                file.sync_all().map_err(|e| e.to_string())?;
                return Err(CANCELLED.into());
            }
            let n = resp
                .read(&mut buf)
                .map_err(|e| format!("transfer failed: {}", error_chain(&e)))?;
            if n == 0 {
                break;
            }
            if total + n as u64 > size {
                return Err(format!("server sent more than the {size} bytes the manifest names"));
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                return Err(space::removed_if_full(dest, &e).unwrap_or_else(|| format!("{}: {e}", dest.display())));
            }
            total += n as u64;
            progress(n as u64);
            crate::failpoint::hit("download-chunk");
        }
        file.sync_all().map_err(|e| e.to_string())?;
        if total != size {
            return Err(format!("transfer ended at {total} of {size} bytes"));
        }
        Ok(fresh)
    }

    /// Asks the HTTP mirrors for the delta from the published `base_version` (what this host
    /// runs) to the target, without a signature: atom-dist answers it when it knows that
    /// base. `None` when no mirror does (an unknown base, a server without this, a plain
    /// static mirror): the caller sends its signature instead. The answer is written to
    /// `dest`, at most `limit` bytes; the base it names is for the caller to check.
    pub fn known_base_delta(
        &self,
        channel: &str,
        version: &semver::Version,
        base_version: &semver::Version,
        dest: &Path,
        limit: u64,
        progress: &dyn Fn(u64),
    ) -> Option<KnownBaseAnswer> {
        for repo in &self.repos {
            let Repo::Http(base) = repo else { continue };
            let Ok(url) = reqwest::Url::parse_with_params(
                &format!("{base}/v1/delta"),
                [
                    ("channel", channel.to_owned()),
                    ("version", version.to_string()),
                    ("base_version", base_version.to_string()),
                ],
            ) else {
                continue;
            };
            let url = url.to_string();
            let result = (|| {
                // The server computes a delta from a base no publisher diffed from once,
                // which for a large image takes minutes.
                let timeout = self.transfer_timeout(limit / 4) + Duration::from_secs(600);
                let client = self.http()?;
                let mut resp = self.with_retries(|| client.post(&url).timeout(timeout).body(Vec::new()).send())?;
                // A diff longer than the server's request timeout goes on after its 408
                // and is cached: asking again waits for it (or finds it done).
                for _ in 0..KNOWN_BASE_WAITS {
                    if resp.status() != StatusCode::REQUEST_TIMEOUT {
                        break;
                    }
                    tracing::info!(url = %url, "the server is still computing the delta; asking again");
                    resp = self.with_retries(|| client.post(&url).timeout(timeout).body(Vec::new()).send())?;
                }
                if resp.status().is_client_error() {
                    // unknown_base, or a server that wants a signature.
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    return Err(http_error(resp));
                }
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                // No header: a block-level answer (an older server ignored base_version),
                // which the signature route is the one to read.
                let Some(format) = header("x-atom-delta-format")
                    .as_deref()
                    .and_then(DeltaFormat::from_name)
                else {
                    return Ok(None);
                };
                let digest = header("x-atom-base-digest").and_then(|d| d.parse::<Digest>().ok());
                let size = header("x-atom-base-size").and_then(|n| n.parse::<u64>().ok());
                let (Some(base_digest), Some(base_size)) = (digest, size) else {
                    return Err("the answer does not name its base (x-atom-base-digest, x-atom-base-size)".into());
                };
                let n = save_bounded(resp, dest, limit)?;
                progress(n);
                Ok(Some(KnownBaseAnswer {
                    format,
                    base_digest,
                    base_size,
                    bytes: n,
                }))
            })();
            match result {
                Ok(Some(a)) => return Some(a),
                Ok(None) => {}
                Err(e) => tracing::info!(url = %url, error = %e, "no delta from the running version's published image"),
            }
        }
        None
    }

    /// Asks the first HTTP mirror that answers for a delta from `signature` to the target.
    /// The answer is written to `dest`, at most `limit` bytes.
    pub fn rsync_delta(
        &self,
        channel: &str,
        version: &semver::Version,
        signature_zst: Vec<u8>,
        dest: &Path,
        limit: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for repo in &self.repos {
            let Repo::Http(base) = repo else { continue };
            // Encoded: `+` of build metadata (1.0.0+b1) would otherwise arrive as a space.
            let url = match reqwest::Url::parse_with_params(
                &format!("{base}/v1/delta"),
                [("channel", channel.to_owned()), ("version", version.to_string())],
            ) {
                Ok(u) => u.to_string(),
                Err(e) => {
                    errors.push(format!("{base}: {e}"));
                    continue;
                }
            };
            let result = (|| {
                // The server may need minutes for a diff against a drifted base.
                let timeout = self.transfer_timeout(limit / 4) + Duration::from_secs(300);
                let client = self.http()?;
                let resp =
                    self.with_retries(|| client.post(&url).timeout(timeout).body(signature_zst.clone()).send())?;
                if !resp.status().is_success() {
                    return Err(http_error(resp));
                }
                let n = save_bounded(resp, dest, limit)?;
                progress(n);
                Ok(())
            })();
            match result {
                Ok(()) => return Ok(()),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        if errors.is_empty() {
            return Err("no HTTP repository configured (the rsync route needs atom-dist)".into());
        }
        Err(join(&errors))
    }
}

/// A file the verified manifest names, and where it goes.
pub struct Wanted<'a> {
    pub rel: &'a str,
    pub size: u64,
    pub digest: &'a Digest,
    pub dest: &'a Path,
    pub downloaded: &'a dyn Fn(u64),
    pub read_locally: &'a dyn Fn(u64),
}

/// Opens a downloaded file and checks it: size before reading, then the digest.
pub fn check_file(path: &Path, size: u64, digest: &Digest) -> Result<File, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("download path has no name")?;
    localfile::check(dir, name, size, digest)
        .map(|f| f.file)
        .map_err(|e| e.to_string())
}

/// Copies a local repository's file into `want.dest` (at most its size), then checks the copy.
fn copy_checked(root: &Path, want: &Wanted<'_>) -> Result<File, String> {
    let src = localfile::open_sized(root, want.rel, want.size).map_err(|e| e.to_string())?;
    let dir = want.dest.parent().unwrap_or(Path::new("."));
    space::ensure_room(dir, want.size, "a copy of the local repository's file")?;
    let mut out = File::create(want.dest).map_err(|e| format!("{}: {e}", want.dest.display()))?;
    let n = std::io::copy(&mut (&src.file).take(want.size), &mut out)
        .map_err(|e| space::removed_if_full(want.dest, &e).unwrap_or_else(|| format!("{}: {e}", src.path.display())))?;
    (want.read_locally)(n);
    drop(out);
    check_file(want.dest, want.size, want.digest)
}

/// Reads a small response body, at most `limit` bytes, by `deadline`, stopping on `cancel`.
fn read_within(
    mut resp: reqwest::blocking::Response,
    limit: usize,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(CANCELLED.into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} bytes arrived before the deadline; the server is too slow (or drips on purpose)",
                body.len()
            ));
        }
        let n = resp.read(&mut buf).map_err(|e| error_chain(&e))?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&buf[..n]);
        if body.len() > limit {
            return Err(format!("larger than {limit} bytes"));
        }
    }
}

/// Where a partial download came from: resuming it from another mirror is safe only with
/// a validator (`If-Range` with the first server's strong ETag), or a mirror that sent an
/// error page could poison every later attempt. Kept beside the download as `.NAME.origin`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Origin {
    mirror: String,
    etag: Option<String>,
}

impl Origin {
    fn path(dest: &Path) -> PathBuf {
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        dest.with_file_name(format!(".{name}.origin"))
    }

    fn load(dest: &Path) -> Option<Origin> {
        let text = std::fs::read_to_string(Self::path(dest)).ok()?;
        toml::from_str(&text).ok()
    }

    fn save(&self, dest: &Path) {
        if let Ok(text) = toml::to_string(self)
            && let Err(e) = atom_dist::fsutil::write_atomic_bytes(&Self::path(dest), 0o600, text.as_bytes())
        {
            tracing::warn!(error = %e, "cannot record where a download came from; it will not be resumed");
        }
    }

    /// Forgets the partial file and where it came from.
    fn forget(dest: &Path) {
        let _ = std::fs::remove_file(dest);
        let _ = std::fs::remove_file(Self::path(dest));
    }
}

/// reqwest's Display hides the cause ("builder error"); operators need all of it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// An HTTP answer that is not a success, with the start of its body.
fn http_error(mut resp: reqwest::blocking::Response) -> String {
    let status = resp.status();
    let mut text = String::new();
    let _ = (&mut resp).take(4096).read_to_string(&mut text);
    format!("HTTP {status}: {}", text.trim())
}

/// Writes a delta answer to `dest`, refusing more than `limit` bytes; returns its size.
fn save_bounded(resp: reqwest::blocking::Response, dest: &Path, limit: u64) -> Result<u64, String> {
    let mut file = File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let n = std::io::copy(&mut resp.take(limit + 1), &mut file).map_err(|e| {
        space::removed_if_full(dest, &e).unwrap_or_else(|| format!("transfer failed: {}", error_chain(&e)))
    })?;
    if n > limit {
        return Err(format!("delta larger than {limit} bytes"));
    }
    Ok(n)
}

/// How many more times a known-base request answered 408 (the diff outlived the server's
/// request timeout, 300 s by default) is asked again.
const KNOWN_BASE_WAITS: usize = 3;

/// A delta atom-dist made from a published base image, with the base it names.
pub struct KnownBaseAnswer {
    pub format: DeltaFormat,
    pub base_digest: Digest,
    pub base_size: u64,
    pub bytes: u64,
}
