//! Reading the repository: HTTP(S) mirrors and local directories, tried in order.
//!
//! Everything fetched here is untrusted until checked: manifests by signature, files by
//! the size and digest the verified manifest gives, and rsync answers only by the digest of
//! the image they produce.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atom_dist::repo::layout;
use atom_dist::verify::{Policy, Verified, verify_manifest};
use atom_dist::{Digest, localfile};
use reqwest::blocking::Client;
use reqwest::{Certificate, StatusCode};

use crate::config::{Repo, Settings};
use crate::error::Failure;
use crate::slotio::CANCELLED;
use crate::space;

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
                .connect_timeout(s.http_timeout)
                .timeout(s.http_timeout)
                .user_agent(concat!("atom-update/", env!("CARGO_PKG_VERSION")));
            if let Some(path) = &s.tls_ca {
                builder = builder.tls_certs_only(pinned_cas(path)?);
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

    fn get_small(&self, repo: &Repo, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, String> {
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
                let resp = {
                    let client = self.http()?;
                    self.with_retries(|| client.get(&url).send())?
                };
                if resp.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    return Err(format!("{url}: HTTP {}", resp.status()));
                }
                let mut body = Vec::new();
                resp.take(limit as u64 + 1)
                    .read_to_end(&mut body)
                    .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
                if body.len() > limit {
                    return Err(format!("{url} is larger than {limit} bytes"));
                }
                Ok(Some(body))
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
    /// older than `seen` (the newest this host accepted before).
    pub fn signed_manifest(
        &self,
        channel: &str,
        policy: &Policy<'_>,
        seen: Option<jiff::Timestamp>,
    ) -> Result<(Verified, String), Failure> {
        let mut errors = Vec::new();
        let mut refusals = Vec::new();
        for repo in &self.repos {
            let manifest = match self.get_small(
                repo,
                &layout::manifest(channel),
                atom_dist::manifest::MAX_MANIFEST_BYTES,
            ) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    errors.push(format!("{repo}: channel {channel:?} not found"));
                    continue;
                }
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let sig_rel = layout::signature(channel, &Digest::of(&manifest));
            let sig = match self.get_small(repo, &sig_rel, atom_dist::signature::MAX_SIGNATURE_FILE_BYTES) {
                Ok(s) => s.unwrap_or_default(),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match verify_manifest(&manifest, &sig, policy) {
                Ok(v) => match seen.filter(|t| v.manifest.created < *t) {
                    Some(t) => refusals.push(format!(
                        "{repo}: manifest created {} is older than one this host already accepted ({t}): \
                         a replay or a stale mirror",
                        v.manifest.created
                    )),
                    None => return Ok((v, repo.to_string())),
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
                Repo::Http(base) => {
                    match self.download(
                        &format!("{base}/{}", want.rel),
                        want.size,
                        want.dest,
                        want.downloaded,
                        cancel,
                    ) {
                        Ok(()) => check_file(want.dest, want.size, want.digest),
                        Err(e) if e == CANCELLED => return Err(e),
                        // The partial file stays: the next mirror or the next run resumes it.
                        Err(e) => {
                            errors.push(format!("{repo}: {e}"));
                            continue;
                        }
                    }
                }
            };
            match checked {
                Ok(file) => return Ok(file),
                Err(e) => {
                    if matches!(repo, Repo::Http(_)) || copy_local {
                        let _ = std::fs::remove_file(want.dest);
                    }
                    errors.push(format!("{repo}: {e}"));
                }
            }
        }
        Err(join(&errors))
    }

    fn download(
        &self,
        url: &str,
        size: u64,
        dest: &Path,
        progress: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(CANCELLED.into());
            }
            let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
            if have == size {
                return Ok(());
            }
            if have > size {
                std::fs::remove_file(dest).map_err(|e| e.to_string())?;
                continue;
            }
            let dir = dest.parent().unwrap_or(Path::new("."));
            space::ensure_room(dir, size - have, "the download")?;
            match self.download_from(url, have, size, dest, progress, cancel) {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= self.retries || e == CANCELLED => return Err(e),
                Err(e) => tracing::warn!(%url, error = %e, resume_at = have, "download interrupted; resuming"),
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
        }
    }

    fn download_from(
        &self,
        url: &str,
        from: u64,
        size: u64,
        dest: &Path,
        progress: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> Result<(), String> {
        let mut req = self.http()?.get(url).timeout(self.transfer_timeout(size - from));
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let mut resp = req.send().map_err(|e| error_chain(&e))?;
        let mut file = match (from, resp.status()) {
            (0, StatusCode::OK) => File::create(dest),
            (_, StatusCode::PARTIAL_CONTENT) => OpenOptions::new().append(true).open(dest),
            // The server ignored the range: start over.
            (_, StatusCode::OK) => File::create(dest),
            (_, s) => return Err(format!("HTTP {s}")),
        }
        .map_err(|e| format!("{}: {e}", dest.display()))?;
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
        Ok(())
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
            let url = format!("{base}/v1/delta?channel={channel}&version={version}");
            let result = (|| {
                // The server may need minutes for a diff against a drifted base.
                let timeout = self.transfer_timeout(limit / 4) + Duration::from_secs(300);
                let client = self.http()?;
                let mut resp =
                    self.with_retries(|| client.post(&url).timeout(timeout).body(signature_zst.clone()).send())?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    let mut text = String::new();
                    let _ = (&mut resp).take(4096).read_to_string(&mut text);
                    return Err(format!("HTTP {status}: {}", text.trim()));
                }
                let mut file = File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
                let n = std::io::copy(&mut resp.take(limit + 1), &mut file).map_err(|e| {
                    space::removed_if_full(dest, &e).unwrap_or_else(|| format!("transfer failed: {}", error_chain(&e)))
                })?;
                if n > limit {
                    return Err(format!("delta larger than {limit} bytes"));
                }
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
