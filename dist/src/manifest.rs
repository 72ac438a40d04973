//! The channel manifest: what a channel currently offers, as signed by the publisher.
//!
//! ```toml
//! format = 1
//! channel = "stable"
//! version = "2.1.0"                    # semver; ordered, used for anti-rollback
//! board = "x86_64-generic"             # hosts accept only their own board string
//! created = "2026-11-22T02:00:00Z"
//! expires = "2026-12-22T02:00:00Z"     # freeze-attack bound; re-sign to extend
//! min_agent = "0.2.0"                  # optional: older agents refuse ("update the agent first")
//! critical = ["payload.encryption"]    # optional: fields an agent must know to install this
//!
//! [image]                              # the raw slot contents
//! size = 1073741824
//! digest = "blake3:…"
//!
//! [payload]                            # the full image, zstd-compressed
//! path = "objects/<image hex>.img.zst"
//! size = 123456
//! digest = "blake3:…"
//!
//! [rollout]                            # optional: phased, hosts spread over the duration
//! start = "2026-11-22T02:00:00Z"
//! duration_secs = 172800
//!
//! [[deltas]]                           # precomputed, one per recent base
//! base_version = "2.0.0"
//! base_size = 1073741824
//! base_digest = "blake3:…"
//! format = "fast-rsync-zstd"
//! path = "deltas/<base hex>-<image hex>.rsync.zst"
//! size = 4567
//! digest = "blake3:…"
//! ```
//!
//! Every file a manifest names is covered by a digest in it, so one signature check plus
//! digest checks cover the whole update.
//!
//! # Compatibility
//!
//! `format` stays 1 for every field added later. A field this build does not know is
//! *optional* unless the manifest names it in `critical`: optional fields are ignored (an
//! older agent installs the update without them), while a critical one this build does not
//! know makes the manifest refused with "update the agent first". `min_agent` refuses the
//! manifest on agents older than that version. Both are checked only after the signature.

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::evolve::{self, EvolveError};

pub const FORMAT: u32 = 1;
/// A manifest lists a handful of deltas; 1 MiB is far beyond any legitimate one.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
const MAX_DELTAS: usize = 64;
const MAX_TEXT_FIELD: usize = 128;

/// Every field this build understands, as dotted paths (array entries without their index):
/// what a manifest may name in `critical` for this build to install it.
pub const KNOWN_FIELDS: &[&str] = &[
    "format",
    "channel",
    "version",
    "board",
    "created",
    "expires",
    "min_agent",
    "critical",
    "image",
    "image.size",
    "image.digest",
    "payload",
    "payload.path",
    "payload.size",
    "payload.digest",
    "rollout",
    "rollout.start",
    "rollout.duration_secs",
    "deltas",
    "deltas.base_version",
    "deltas.base_size",
    "deltas.base_digest",
    "deltas.format",
    "deltas.path",
    "deltas.size",
    "deltas.digest",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub channel: String,
    pub version: Version,
    pub board: String,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// The oldest agent that may install this manifest's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent: Option<Version>,
    /// Fields (dotted paths) an agent must understand to install this; see the module docs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical: Vec<String>,
    pub image: Image,
    pub payload: Payload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<Delta>,
}

/// A phased rollout: each host takes the version at its own moment, spread evenly over
/// `duration_secs` from `start` by a random place it keeps, so a bad release reaches a
/// growing fraction of the fleet while the publisher can still stop it (by publishing a
/// fixed version) instead of all hosts at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub start: Timestamp,
    pub duration_secs: u64,
}

/// Longer spreads are certainly mistakes (and would overflow time arithmetic).
pub const MAX_ROLLOUT_SECS: u64 = 365 * 24 * 3600;

impl Rollout {
    /// Refuses spreads over a year: certainly a mistake, and beyond the time arithmetic.
    pub fn check_duration(secs: u64) -> Result<(), ManifestError> {
        if secs > MAX_ROLLOUT_SECS {
            return Err(ManifestError::Invalid(format!(
                "rollout lasts {secs} s; at most {MAX_ROLLOUT_SECS} (a year)"
            )));
        }
        Ok(())
    }

    /// When the last host gets its turn.
    pub fn end(&self) -> Timestamp {
        self.turn(u32::MAX)
    }

    /// When a host at `place` (uniform over all u32 values) gets its turn.
    pub fn turn(&self, place: u32) -> Timestamp {
        let offset = (u128::from(self.duration_secs.min(MAX_ROLLOUT_SECS)) * u128::from(place)) >> 32;
        // Both bounded above: start is a valid timestamp, offset under a year.
        self.start
            .checked_add(jiff::SignedDuration::from_secs(offset as i64))
            .unwrap_or(self.start)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub size: u64,
    pub digest: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub path: String,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaFormat {
    /// A librsync-format delta made by fast_rsync against the base image, zstd-compressed.
    #[serde(rename = "fast-rsync-zstd")]
    FastRsyncZstd,
    /// The same raw delta, zstd-compressed in frames that each use the base image as
    /// their prefix (see `delta::compress_with_base`): byte-level matches into the base.
    #[serde(rename = "fast-rsync-zstd-base-prefix")]
    FastRsyncZstdBasePrefix,
    /// The same raw delta, zstd-compressed in frames whose prefix is the base blocks the
    /// delta does not copy, named in a header (see `delta::extents`).
    #[serde(rename = "fast-rsync-zstd-base-extents")]
    FastRsyncZstdBaseExtents,
    /// A format this build does not know (a newer publisher's): hosts skip the delta
    /// and take another route instead of refusing the whole manifest.
    #[serde(other, skip_serializing)]
    Unsupported,
}

impl DeltaFormat {
    /// The name manifests and the delta endpoint's `X-Atom-Delta-Format` use.
    pub fn name(self) -> &'static str {
        match self {
            DeltaFormat::FastRsyncZstd => "fast-rsync-zstd",
            DeltaFormat::FastRsyncZstdBasePrefix => "fast-rsync-zstd-base-prefix",
            DeltaFormat::FastRsyncZstdBaseExtents => "fast-rsync-zstd-base-extents",
            DeltaFormat::Unsupported => "unsupported",
        }
    }

    /// The format of `name`, if this build reads it.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            DeltaFormat::FastRsyncZstd,
            DeltaFormat::FastRsyncZstdBasePrefix,
            DeltaFormat::FastRsyncZstdBaseExtents,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub base_version: Version,
    /// Size of the base image: a host hashes that much of its running slot to check it
    /// holds exactly this base.
    pub base_size: u64,
    pub base_digest: Digest,
    pub format: DeltaFormat,
    pub path: String,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("manifest is not UTF-8 text")]
    NotUtf8,
    #[error("manifest is malformed: {0}")]
    Syntax(String),
    #[error("manifest format {0} is not supported (this build reads format {FORMAT})")]
    UnsupportedFormat(u32),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error(
        "manifest marks field(s) {0:?} as critical and this build does not know them: update the agent \
         first (publish an image with a newer agent, without these fields, as a stepping stone)"
    )]
    UnknownCritical(Vec<String>),
}

impl From<EvolveError> for ManifestError {
    fn from(e: EvolveError) -> Self {
        match e {
            EvolveError::Syntax(m) => ManifestError::Syntax(m),
            EvolveError::Invalid(m) => ManifestError::Invalid(m),
            EvolveError::UnknownCritical(f) => ManifestError::UnknownCritical(f),
        }
    }
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ManifestError::NotUtf8)?;
        let (manifest, ignored): (Manifest, _) = evolve::parse_tolerant(text).map_err(ManifestError::from)?;
        manifest.validate()?;
        evolve::check_critical(&manifest.critical, KNOWN_FIELDS)?;
        evolve::log_ignored("manifest", &ignored);
        Ok(manifest)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("manifest fields always serialize")
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |m: String| Err(ManifestError::Invalid(m));
        if self.format != FORMAT {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        check_name("channel", &self.channel)?;
        check_name("board", &self.board)?;
        if self.expires <= self.created {
            return invalid(format!(
                "expires ({}) is not after created ({})",
                self.expires, self.created
            ));
        }
        if self.image.size == 0 {
            return invalid("image size is 0".into());
        }
        check_repo_path(&self.payload.path)?;
        if let Some(r) = &self.rollout {
            Rollout::check_duration(r.duration_secs)?;
        }
        if self.deltas.len() > MAX_DELTAS {
            return invalid(format!("{} deltas listed; at most {MAX_DELTAS}", self.deltas.len()));
        }
        for d in &self.deltas {
            check_repo_path(&d.path)?;
            if d.base_version >= self.version {
                return invalid(format!(
                    "delta base {} is not older than {}",
                    d.base_version, self.version
                ));
            }
        }
        Ok(())
    }

    /// The precomputed delta whose base is exactly this image, if the channel has one.
    pub fn delta_from(&self, base: &Digest) -> Option<&Delta> {
        self.deltas.iter().find(|d| &d.base_digest == base)
    }
}

/// Channel and board names end up in paths and log lines: keep them plain.
pub fn check_name(what: &str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_TEXT_FIELD
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Invalid(format!(
            "{what} {value:?} must be 1-{MAX_TEXT_FIELD} characters of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// Paths inside a manifest are relative to the repository root and may not escape it.
pub fn check_repo_path(path: &str) -> Result<(), ManifestError> {
    let ok = !path.is_empty()
        && path.len() <= 512
        && !path.starts_with('/')
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Invalid(format!(
            "path {path:?} is not a plain relative path"
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        let created: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        Manifest {
            format: FORMAT,
            channel: "stable".into(),
            version: Version::new(2, 0, 0),
            board: "x86_64-generic".into(),
            created,
            expires: "2026-12-01T00:00:00Z".parse().unwrap(),
            min_agent: None,
            critical: Vec::new(),
            image: Image {
                size: 4096,
                digest: Digest::of(b"image"),
            },
            payload: Payload {
                path: "objects/x.img.zst".into(),
                size: 10,
                digest: Digest::of(b"payload"),
            },
            rollout: None,
            deltas: vec![Delta {
                base_version: Version::new(1, 0, 0),
                base_size: 4096,
                base_digest: Digest::of(b"base"),
                format: DeltaFormat::FastRsyncZstd,
                path: "deltas/a-b.rsync.zst".into(),
                size: 5,
                digest: Digest::of(b"delta"),
            }],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse(m.to_toml().as_bytes()).unwrap(), m);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let text = sample().to_toml();
        let bad_version = text.replace("version = \"2.0.0\"", "version = \"two\"");
        assert!(matches!(
            Manifest::parse(bad_version.as_bytes()),
            Err(ManifestError::Syntax(_))
        ));

        let escape = text.replace("objects/x.img.zst", "../../etc/shadow");
        assert!(matches!(
            Manifest::parse(escape.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));

        let future_format = text.replace("format = 1", "format = 9");
        assert!(matches!(
            Manifest::parse(future_format.as_bytes()),
            Err(ManifestError::UnsupportedFormat(9))
        ));

        let mut newer_base = sample();
        newer_base.deltas[0].base_version = Version::new(3, 0, 0);
        assert!(matches!(
            Manifest::parse(newer_base.to_toml().as_bytes()),
            Err(ManifestError::Invalid(_))
        ));

        assert!(matches!(Manifest::parse(&[0xff, 0xfe]), Err(ManifestError::NotUtf8)));
        assert!(matches!(
            Manifest::parse(&vec![b' '; MAX_MANIFEST_BYTES + 1]),
            Err(ManifestError::TooLarge(_))
        ));
    }

    #[test]
    fn optional_fields_of_newer_publishers_are_ignored_critical_ones_refused() {
        let text = sample().to_toml();
        let newer = format!("surprise = 1\n{text}\n[shiny]\nthing = true\n")
            .replace("[image]\n", "[image]\nfs = \"erofs\"\n")
            .replace("[[deltas]]\n", "[[deltas]]\nchunked = 4\n");
        assert_eq!(
            Manifest::parse(newer.as_bytes()).unwrap(),
            sample(),
            "optional fields are ignored"
        );

        let critical_known = format!("critical = [\"rollout\", \"deltas.base_digest\"]\n{text}");
        assert!(Manifest::parse(critical_known.as_bytes()).is_ok());

        let critical_new = format!("critical = [\"image.fs\", \"rollout\"]\n{newer}");
        match Manifest::parse(critical_new.as_bytes()) {
            Err(e @ ManifestError::UnknownCritical(_)) => {
                assert!(e.to_string().contains("update the agent first"), "{e}");
                assert!(e.to_string().contains("image.fs"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Critical but absent from this manifest: still refused (its absence matters too).
        let absent = format!("critical = [\"encryption\"]\n{text}");
        assert!(matches!(
            Manifest::parse(absent.as_bytes()),
            Err(ManifestError::UnknownCritical(_))
        ));
        let bad_name = format!("critical = [\"a b\"]\n{text}");
        assert!(matches!(
            Manifest::parse(bad_name.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
    }

    /// Every field a manifest of this build can carry is in KNOWN_FIELDS (so it can be
    /// marked critical and still be installed here).
    #[test]
    fn known_fields_cover_the_format() {
        let mut m = sample();
        m.min_agent = Some(Version::new(0, 2, 0));
        m.critical = vec!["rollout".into()];
        m.rollout = Some(Rollout {
            start: m.created,
            duration_secs: 60,
        });
        let paths = evolve::paths_of(&m.to_toml());
        assert!(paths.len() > 20, "{paths:?}");
        for p in &paths {
            assert!(KNOWN_FIELDS.contains(&p.as_str()), "{p} is missing from KNOWN_FIELDS");
        }
    }

    #[test]
    fn delta_formats_of_newer_publishers_are_read_as_unsupported() {
        let text = sample().to_toml();
        assert!(text.contains("format = \"fast-rsync-zstd\""), "{text}");
        let m = Manifest::parse(
            text.replace("\"fast-rsync-zstd\"", "\"fast-rsync-zstd-base-prefix\"")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(m.deltas[0].format, DeltaFormat::FastRsyncZstdBasePrefix);
        let m = Manifest::parse(text.replace("\"fast-rsync-zstd\"", "\"some-future-format\"").as_bytes()).unwrap();
        assert_eq!(
            m.deltas[0].format,
            DeltaFormat::Unsupported,
            "the manifest stays usable"
        );
    }

    #[test]
    fn rollout_spreads_hosts_over_its_duration() {
        let mut m = sample();
        m.rollout = Some(Rollout {
            start: "2026-11-01T00:00:00Z".parse().unwrap(),
            duration_secs: 100 * 3600,
        });
        let text = m.to_toml();
        assert!(text.contains("[rollout]"), "{text}");
        assert_eq!(Manifest::parse(text.as_bytes()).unwrap(), m);
        let r = m.rollout.clone().unwrap();
        assert_eq!(r.turn(0), r.start);
        assert_eq!(r.turn(1 << 31).to_string(), "2026-11-03T02:00:00Z");
        assert_eq!(r.turn(u32::MAX).to_string(), "2026-11-05T03:59:59Z");

        m.rollout.as_mut().unwrap().duration_secs = MAX_ROLLOUT_SECS + 1;
        assert!(matches!(
            Manifest::parse(m.to_toml().as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn names_and_paths_are_plain() {
        assert!(check_name("board", "x86_64-generic").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(200)] {
            assert!(check_name("board", bad).is_err(), "{bad:?}");
        }
        assert!(check_repo_path("objects/ab.img.zst").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a\\b", "a\0b"] {
            assert!(check_repo_path(bad).is_err(), "{bad:?}");
        }
    }
}
