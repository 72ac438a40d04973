//! `/usr/lib/atom/release`: what an image says about itself.
//!
//! Written into every image by the builder and read back by the publisher (so the version
//! published is the version built) and by the agent (to know what each slot holds).
//!
//! ```toml
//! version = "2.1.0"
//! board = "x86_64-generic"
//! ```

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::manifest::{self, ManifestError};

/// Path inside the root filesystem, without the leading slash.
pub const RELEASE_PATH: &str = "usr/lib/atom/release";
const MAX_RELEASE_BYTES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: Version,
    pub board: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("release file is {0} bytes; the limit is {MAX_RELEASE_BYTES}")]
    TooLarge(usize),
    #[error("release file is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

impl Release {
    pub fn parse(bytes: &[u8]) -> Result<Self, ReleaseError> {
        if bytes.len() > MAX_RELEASE_BYTES {
            return Err(ReleaseError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ReleaseError::Malformed("not UTF-8".into()))?;
        let release: Release =
            toml::from_str(text).map_err(|e| ReleaseError::Malformed(crate::parse_error::describe(text, &e)))?;
        manifest::check_name("board", &release.board)?;
        Ok(release)
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# Written by atom-build; read by atom-update.\n{}",
            toml::to_string(self).expect("release serializes")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let r = Release {
            version: Version::new(1, 2, 3),
            board: "x86_64-generic".into(),
        };
        assert_eq!(Release::parse(r.to_toml().as_bytes()).unwrap(), r);
        assert!(Release::parse(b"version = \"1\"\nboard = \"x\"").is_err());
        assert!(Release::parse(b"version = \"1.0.0\"\nboard = \"a b\"").is_err());
        assert!(Release::parse(b"version = \"1.0.0\"\nboard = \"x\"\nextra = 1").is_err());
    }
}
