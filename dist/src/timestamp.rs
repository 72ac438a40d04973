//! A channel's timestamp: the freshness key's short-lived word that a manifest is current.
//!
//! ```toml
//! format = 1
//! channel = "stable"
//! version = "2.1.0"                    # for people; the digest is what binds
//! manifest = "blake3:…"                # BLAKE3 of the current manifest's bytes
//! manifest_size = 1234
//! keys_version = 3                     # the keys.toml it was signed under; hosts need >= that
//! created = "2026-12-01T00:00:00Z"
//! expires = "2026-12-08T00:00:00Z"     # days, renewed by `atom-build refresh` from a timer
//! ```
//!
//! Stored at `channels/<channel>/timestamp.toml`, signed (domain [`Domain::Timestamp`]) in
//! `channels/<channel>/sigs/<BLAKE3 of the timestamp>.sig`. Hosts with root keys read the
//! timestamp first and then the manifest it names by digest
//! (`channels/<channel>/manifests/<hex>.toml`), so a publish becomes current for them only
//! once a freshness key vouches for it, and a mirror frozen in time is noticed within the
//! timestamp's lifetime rather than the manifest's.
//!
//! [`Domain::Timestamp`]: crate::signature::Domain::Timestamp

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::evolve::{self, EvolveError};
use crate::manifest::{self, MAX_MANIFEST_BYTES};

pub const FORMAT: u32 = 1;
pub const MAX_TIMESTAMP_BYTES: usize = 4096;
/// Hosts refuse a timestamp valid for longer: whoever held a freshness key once could
/// otherwise freeze hosts on a current manifest long after that key was retired.
pub const MAX_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_hours(31 * 24);

/// Every field of a timestamp this build understands (see `evolve`).
pub const KNOWN_FIELDS: &[&str] = &[
    "format",
    "channel",
    "version",
    "manifest",
    "manifest_size",
    "keys_version",
    "created",
    "expires",
    "critical",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampDoc {
    pub format: u32,
    pub channel: String,
    pub version: Version,
    pub manifest: Digest,
    pub manifest_size: u64,
    /// The `keys.toml` version in force when it was signed: a mirror cannot pair it with an
    /// older list.
    pub keys_version: u64,
    pub created: Timestamp,
    pub expires: Timestamp,
    /// Fields a reader must understand (see `evolve`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    #[error("timestamp is {0} bytes; the limit is {MAX_TIMESTAMP_BYTES}")]
    TooLarge(usize),
    #[error("timestamp is malformed: {0}")]
    Malformed(String),
    #[error("timestamp marks field(s) {0:?} as critical and this build does not know them: update the agent first")]
    UnknownCritical(Vec<String>),
}

impl From<EvolveError> for TimestampError {
    fn from(e: EvolveError) -> Self {
        match e {
            EvolveError::Syntax(m) | EvolveError::Invalid(m) => TimestampError::Malformed(m),
            EvolveError::UnknownCritical(f) => TimestampError::UnknownCritical(f),
        }
    }
}

impl TimestampDoc {
    pub fn parse(bytes: &[u8]) -> Result<Self, TimestampError> {
        if bytes.len() > MAX_TIMESTAMP_BYTES {
            return Err(TimestampError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| TimestampError::Malformed("not UTF-8 text".into()))?;
        let (doc, ignored): (TimestampDoc, _) = evolve::parse_tolerant(text).map_err(TimestampError::from)?;
        evolve::check_critical(&doc.critical, KNOWN_FIELDS)?;
        evolve::log_ignored("timestamp", &ignored);
        if doc.format != FORMAT {
            return Err(TimestampError::Malformed(format!(
                "format {} is not supported (this build reads format {FORMAT})",
                doc.format
            )));
        }
        manifest::check_name("channel", &doc.channel).map_err(|e| TimestampError::Malformed(e.to_string()))?;
        if doc.expires <= doc.created {
            return Err(TimestampError::Malformed(format!(
                "expires ({}) is not after created ({})",
                doc.expires, doc.created
            )));
        }
        if doc.expires.duration_since(doc.created) > MAX_LIFETIME {
            return Err(TimestampError::Malformed(format!(
                "valid from {} to {}: longer than the {} days a timestamp may last",
                doc.created,
                doc.expires,
                MAX_LIFETIME.as_hours() / 24
            )));
        }
        if doc.manifest_size == 0 || doc.manifest_size > MAX_MANIFEST_BYTES as u64 {
            return Err(TimestampError::Malformed(format!(
                "manifest_size {} is not 1 to {MAX_MANIFEST_BYTES}",
                doc.manifest_size
            )));
        }
        Ok(doc)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("timestamp serializes")
    }

    /// Whether `manifest` is the exact manifest this timestamp names.
    pub fn names(&self, manifest: &[u8]) -> bool {
        manifest.len() as u64 == self.manifest_size && Digest::of(manifest) == self.manifest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let t = TimestampDoc {
            format: FORMAT,
            channel: "stable".into(),
            version: Version::new(2, 0, 0),
            manifest: Digest::of(b"m"),
            manifest_size: 1,
            keys_version: 1,
            created: "2026-12-01T00:00:00Z".parse().unwrap(),
            expires: "2026-12-08T00:00:00Z".parse().unwrap(),
            critical: Vec::new(),
        };
        assert_eq!(TimestampDoc::parse(t.to_toml().as_bytes()).unwrap(), t);
        assert!(t.names(b"m"));
        let newer = format!("snapshot = \"x\"\n{}", t.to_toml());
        assert_eq!(TimestampDoc::parse(newer.as_bytes()).unwrap(), t);
        assert!(matches!(
            TimestampDoc::parse(format!("critical = [\"snapshot\"]\n{newer}").as_bytes()),
            Err(TimestampError::UnknownCritical(_))
        ));
        for p in evolve::paths_of(&t.to_toml()) {
            assert!(KNOWN_FIELDS.contains(&p.as_str()), "{p}");
        }
        assert!(!t.names(b"n"));
        let text = t.to_toml();
        for bad in [
            text.replace("manifest_size = 1", "manifest_size = 0"),
            text.replace("2026-12-08", "2026-11-08"),
            text.replace("2026-12-08", "2027-12-08"),
            text.replace("\"stable\"", "\"../x\""),
            text.replace("format = 1", "format = 2"),
            "x".repeat(MAX_TIMESTAMP_BYTES + 1),
        ] {
            assert!(TimestampDoc::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
