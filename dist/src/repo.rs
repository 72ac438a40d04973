//! The repository: a plain directory tree any static HTTP server or CDN can serve.
//!
//! ```text
//! atom-repo.toml                         marker: format = 1
//! channels/<channel>/manifest.toml       the channel's current manifest
//! channels/<channel>/sigs/<hex>.sig      signature of the manifest whose BLAKE3 is <hex>
//! channels/<channel>/history/<ver>.toml  every manifest ever published (signed via sigs/)
//! channels/<channel>/manifests/<hex>.toml every manifest by its BLAKE3 (timestamps name these)
//! channels/<channel>/timestamp.toml      key roles: the freshness key's word on the current one
//! keys/keys.toml                         key roles: release and freshness keys, root-signed
//! keys/sigs/<hex>.sig                    signature of the keys.toml whose BLAKE3 is <hex>
//! objects/<image hex>.img.zst            full payloads, content-addressed
//! deltas/<base hex>-<image hex>.rsync.zst
//! ```
//!
//! Publishing is atomic for readers without any server support: everything a manifest
//! names, and its signature, is written under a new content-addressed name first; the last
//! step is one rename of `manifest.toml`. The signature is found through the manifest's own
//! digest, so a reader can never pair a new manifest with an old signature.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::fsutil;
use crate::localfile::{self, LocalFileError};
use crate::manifest;
use crate::signature::MAX_SIGNATURE_FILE_BYTES;

pub const MARKER: &str = "atom-repo.toml";
const REPO_FORMAT: u32 = 1;
const LOCK: &str = ".atom-publish.lock";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0} is not an Atom repository (no {MARKER}); publish into an empty or new directory to create one")]
    NotARepository(PathBuf),
    #[error("{path}: repository format {found} is not supported (this build reads {REPO_FORMAT})")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("channel {0:?} has never been published")]
    NoSuchChannel(String),
    #[error("{0}")]
    InvalidName(#[from] manifest::ManifestError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Unsafe(#[from] LocalFileError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RepoError + '_ {
    move |source| RepoError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Unknown fields are ignored: a newer publisher may add some and keep `format = 1`.
#[derive(Serialize, Deserialize)]
struct MarkerFile {
    format: u32,
}

/// Relative paths (also URL paths) of repository files. Clients build URLs from these.
pub mod layout {
    use crate::digest::Digest;

    pub fn manifest(channel: &str) -> String {
        format!("channels/{channel}/manifest.toml")
    }

    pub fn signature(channel: &str, manifest_digest: &Digest) -> String {
        format!("channels/{channel}/sigs/{}.sig", manifest_digest.hex())
    }

    pub fn history(channel: &str, version: &semver::Version) -> String {
        format!("channels/{channel}/history/{version}.toml")
    }

    pub fn payload(image: &Digest) -> String {
        format!("objects/{}.img.zst", image.hex())
    }

    pub fn delta(base: &Digest, image: &Digest) -> String {
        format!("deltas/{}-{}.rsync.zst", base.hex(), image.hex())
    }

    pub fn manifest_by_digest(channel: &str, manifest_digest: &Digest) -> String {
        format!("channels/{channel}/manifests/{}.toml", manifest_digest.hex())
    }

    pub fn timestamp(channel: &str) -> String {
        format!("channels/{channel}/timestamp.toml")
    }

    pub const KEYS: &str = "keys/keys.toml";

    pub fn keys_signature(keys_digest: &Digest) -> String {
        format!("keys/sigs/{}.sig", keys_digest.hex())
    }

    /// Where a channel's publication waits for `atom-build sign` (never served as current).
    pub fn pending(channel: &str) -> String {
        format!("pending/{channel}/manifest.toml")
    }
}

/// A signed manifest as stored: the exact bytes and their signature file.
#[derive(Clone, Debug)]
pub struct SignedManifest {
    pub manifest: Vec<u8>,
    pub signature: Vec<u8>,
}

pub struct Repository {
    root: PathBuf,
}

/// Held while publishing, so two publishers never interleave.
pub struct PublishLock {
    _file: Option<fs::File>,
}

impl Repository {
    pub fn open(root: &Path) -> Result<Self, RepoError> {
        let marker = root.join(MARKER);
        let text = match localfile::read_bounded(root, MARKER, 4096) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) if e.is_not_found() => return Err(RepoError::NotARepository(root.to_owned())),
            Err(e) => return Err(RepoError::Unsafe(e)),
        };
        let parsed: MarkerFile = toml::from_str(&text).map_err(|e| RepoError::Io {
            path: marker.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e.message().to_owned()),
        })?;
        if parsed.format != REPO_FORMAT {
            return Err(RepoError::UnsupportedFormat {
                path: marker,
                found: parsed.format,
            });
        }
        Ok(Repository { root: root.to_owned() })
    }

    /// Opens a repository, creating it when `root` is missing or an empty directory. A
    /// non-empty directory without the marker is refused: it is someone else's data.
    pub fn open_or_create(root: &Path) -> Result<Self, RepoError> {
        let is_empty_dir = match fs::read_dir(root) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                return Err(RepoError::Io {
                    path: root.to_owned(),
                    source: e,
                });
            }
        };
        if !is_empty_dir {
            return Self::open(root);
        }
        fsutil::create_dir_synced(root).map_err(io_at(root))?;
        let text = toml::to_string(&MarkerFile { format: REPO_FORMAT }).expect("marker serializes");
        let marker = root.join(MARKER);
        fsutil::write_atomic_bytes(&marker, 0o644, text.as_bytes()).map_err(io_at(&marker))?;
        Ok(Repository { root: root.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Hidden temporary files a killed publish left behind (a crash between write and
    /// rename), with their sizes. Only meaningful while no publish runs: see `try_lock`.
    pub fn stale_temp_files(&self) -> Result<Vec<(PathBuf, u64)>, RepoError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::Io { path: dir, source: e }),
            };
            for e in entries {
                let e = e.map_err(io_at(&dir))?;
                let Ok(kind) = e.file_type() else { continue };
                let name = e.file_name();
                let name = name.to_string_lossy();
                if kind.is_dir() && !name.starts_with('.') {
                    dirs.push(e.path());
                } else if kind.is_file() && fsutil::is_temp_name(&name) {
                    out.push((e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes what `stale_temp_files` finds; call it holding the publish lock.
    pub fn remove_stale_temp_files(&self, _lock: &PublishLock) -> Result<Vec<(PathBuf, u64)>, RepoError> {
        let stale = self.stale_temp_files()?;
        for (path, _) in &stale {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RepoError::Io {
                        path: path.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(stale)
    }

    /// The publish lock if no publish holds it now, else `None`.
    pub fn try_lock(&self) -> Result<Option<PublishLock>, RepoError> {
        let path = self.root.join(LOCK);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            // Never published here with a lock file: nobody publishes now either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(PublishLock { _file: None })),
            Err(e) => return Err(RepoError::Io { path, source: e }),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(PublishLock { _file: Some(file) })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(RepoError::Io { path, source: e }),
        }
    }

    pub fn lock(&self) -> Result<PublishLock, RepoError> {
        let path = self.root.join(LOCK);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        file.lock().map_err(io_at(&path))?;
        Ok(PublishLock { _file: Some(file) })
    }

    pub fn channels(&self) -> Result<Vec<String>, RepoError> {
        let dir = self.root.join("channels");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(io_at(&dir))?;
                    if let Some(name) = e
                        .file_name()
                        .to_str()
                        .filter(|n| manifest::check_name("channel", n).is_ok())
                    {
                        out.push(name.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RepoError::Io { path: dir, source: e });
            }
        }
        out.sort();
        Ok(out)
    }

    /// A small file of the tree: regular, inside the repository, at most `limit` bytes.
    fn read_bounded(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, RepoError> {
        match localfile::read_bounded(&self.root, rel, limit as u64) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(RepoError::Unsafe(e)),
        }
    }

    fn signed_at(&self, channel: &str, manifest_rel: &str) -> Result<Option<SignedManifest>, RepoError> {
        let Some(manifest) = self.read_bounded(manifest_rel, manifest::MAX_MANIFEST_BYTES)? else {
            return Ok(None);
        };
        let sig_rel = layout::signature(channel, &Digest::of(&manifest));
        // A manifest without its signature is reported as an empty signature, which every
        // verifier rejects with a clear message, rather than as a missing channel.
        let signature = self
            .read_bounded(&sig_rel, MAX_SIGNATURE_FILE_BYTES)?
            .unwrap_or_default();
        Ok(Some(SignedManifest { manifest, signature }))
    }

    /// The root-signed key list, or `None` in a repository without key roles.
    pub fn keys(&self) -> Result<Option<SignedManifest>, RepoError> {
        let Some(doc) = self.read_bounded(layout::KEYS, crate::roles::MAX_KEYS_BYTES)? else {
            return Ok(None);
        };
        let signature = self
            .read_bounded(&layout::keys_signature(&Digest::of(&doc)), MAX_SIGNATURE_FILE_BYTES)?
            .unwrap_or_default();
        Ok(Some(SignedManifest {
            manifest: doc,
            signature,
        }))
    }

    /// The channel's timestamp, or `None` if it never had one.
    pub fn timestamp(&self, channel: &str) -> Result<Option<SignedManifest>, RepoError> {
        manifest::check_name("channel", channel)?;
        let Some(doc) = self.read_bounded(&layout::timestamp(channel), crate::timestamp::MAX_TIMESTAMP_BYTES)? else {
            return Ok(None);
        };
        let signature = self
            .read_bounded(&layout::signature(channel, &Digest::of(&doc)), MAX_SIGNATURE_FILE_BYTES)?
            .unwrap_or_default();
        Ok(Some(SignedManifest {
            manifest: doc,
            signature,
        }))
    }

    /// Writes a signed `keys.toml`.
    pub fn commit_keys(&self, signed: &SignedManifest) -> Result<(), RepoError> {
        let sig = layout::keys_signature(&Digest::of(&signed.manifest));
        self.write_signed(&sig, layout::KEYS, signed)
    }

    /// Writes a channel's signed timestamp.
    pub fn commit_timestamp(&self, channel: &str, signed: &SignedManifest) -> Result<(), RepoError> {
        manifest::check_name("channel", channel)?;
        let sig = layout::signature(channel, &Digest::of(&signed.manifest));
        self.write_signed(&sig, &layout::timestamp(channel), signed)
    }

    /// The signature (found by the document's digest) first, then the document: a reader
    /// never sees a document whose signature is not in place.
    fn write_signed(&self, sig_rel: &str, doc_rel: &str, signed: &SignedManifest) -> Result<(), RepoError> {
        let (sig, doc) = (self.path(sig_rel), self.path(doc_rel));
        for p in [&sig, &doc] {
            let dir = p.parent().expect("repository paths have a parent");
            fsutil::create_dir_synced(dir).map_err(io_at(dir))?;
        }
        fsutil::write_atomic_bytes(&sig, 0o644, &signed.signature).map_err(io_at(&sig))?;
        fsutil::write_atomic_bytes(&doc, 0o644, &signed.manifest).map_err(io_at(&doc))?;
        Ok(())
    }

    /// A manifest by its digest (what a timestamp names), with its signature.
    pub fn manifest_by_digest(&self, channel: &str, digest: &Digest) -> Result<Option<SignedManifest>, RepoError> {
        manifest::check_name("channel", channel)?;
        self.signed_at(channel, &layout::manifest_by_digest(channel, digest))
    }

    /// The channel's pending (unsigned) publication, from `publish --sign-later`.
    pub fn pending(&self, channel: &str) -> Result<Option<Vec<u8>>, RepoError> {
        manifest::check_name("channel", channel)?;
        self.read_bounded(&layout::pending(channel), manifest::MAX_MANIFEST_BYTES)
    }

    pub fn write_pending(&self, channel: &str, manifest: &[u8]) -> Result<PathBuf, RepoError> {
        manifest::check_name("channel", channel)?;
        let path = self.path(&layout::pending(channel));
        let dir = path.parent().expect("repository paths have a parent");
        fsutil::create_dir_synced(dir).map_err(io_at(dir))?;
        fsutil::write_atomic_bytes(&path, 0o644, manifest).map_err(io_at(&path))?;
        Ok(path)
    }

    pub fn remove_pending(&self, channel: &str) -> Result<(), RepoError> {
        let path = self.path(&layout::pending(channel));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RepoError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// The channel's current manifest, or `None` if it was never published.
    pub fn current(&self, channel: &str) -> Result<Option<SignedManifest>, RepoError> {
        manifest::check_name("channel", channel)?;
        self.signed_at(channel, &layout::manifest(channel))
    }

    /// All manifests ever published on the channel, oldest first.
    pub fn history(&self, channel: &str) -> Result<Vec<(Version, SignedManifest)>, RepoError> {
        manifest::check_name("channel", channel)?;
        let dir = self.root.join("channels").join(channel).join("history");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RepoError::Io { path: dir, source: e });
            }
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_at(&dir))?;
            let name = e.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".toml"))
                .and_then(|v| v.parse().ok())
            else {
                continue;
            };
            if let Some(signed) = self.signed_at(channel, &layout::history(channel, &version))? {
                out.push((version, signed));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Makes `signed` the channel's current manifest. Everything it names must already be
    /// in place: this writes the signature, the history copy, then renames the manifest.
    pub fn commit_manifest(&self, channel: &str, version: &Version, signed: &SignedManifest) -> Result<(), RepoError> {
        manifest::check_name("channel", channel)?;
        let digest = Digest::of(&signed.manifest);
        let sig = self.path(&layout::signature(channel, &digest));
        let history = self.path(&layout::history(channel, version));
        let by_digest = self.path(&layout::manifest_by_digest(channel, &digest));
        let current = self.path(&layout::manifest(channel));
        for p in [&sig, &history, &by_digest] {
            let dir = p.parent().expect("repository paths have a parent");
            fsutil::create_dir_synced(dir).map_err(io_at(dir))?;
        }
        fsutil::write_atomic_bytes(&sig, 0o644, &signed.signature).map_err(io_at(&sig))?;
        fsutil::write_atomic_bytes(&history, 0o644, &signed.manifest).map_err(io_at(&history))?;
        fsutil::write_atomic_bytes(&by_digest, 0o644, &signed.manifest).map_err(io_at(&by_digest))?;
        fsutil::write_atomic_bytes(&current, 0o644, &signed.manifest).map_err(io_at(&current))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_and_refuse_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        assert!(matches!(Repository::open(&root), Err(RepoError::NotARepository(_))));
        Repository::open_or_create(&root).unwrap();
        Repository::open(&root).unwrap();

        let foreign = dir.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("precious.txt"), "data").unwrap();
        assert!(matches!(
            Repository::open_or_create(&foreign),
            Err(RepoError::NotARepository(_))
        ));
        assert_eq!(
            fs::read_dir(&foreign).unwrap().count(),
            1,
            "nothing written into a foreign dir"
        );
    }

    #[test]
    fn commit_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_create(dir.path()).unwrap();
        assert!(repo.current("stable").unwrap().is_none());
        for v in ["1.0.0", "1.10.0", "1.2.0"] {
            let signed = SignedManifest {
                manifest: format!("v={v}").into_bytes(),
                signature: b"sig".to_vec(),
            };
            repo.commit_manifest("stable", &v.parse().unwrap(), &signed).unwrap();
        }
        let cur = repo.current("stable").unwrap().unwrap();
        assert_eq!(cur.manifest, b"v=1.2.0");
        assert_eq!(cur.signature, b"sig");
        let versions: Vec<String> = repo
            .history("stable")
            .unwrap()
            .iter()
            .map(|(v, _)| v.to_string())
            .collect();
        assert_eq!(
            versions,
            ["1.0.0", "1.2.0", "1.10.0"],
            "history sorted by semver, not text"
        );
        assert_eq!(repo.channels().unwrap(), ["stable"]);
        assert!(repo.current("../etc").is_err());
    }
}
