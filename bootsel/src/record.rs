//! What bootsel did at boot, left under /run for the agent (`atom-update status`).
//!
//! ```toml
//! slot = "B"
//! label = "root-b"
//! partition = 3
//! partuuid = "…"
//! disk = "/dev/vda"
//! reason = "highest priority, on trial (2 tries left after this boot)"
//! trial = true
//! tries_left = 2
//! fell_back_from = "A"     # only when a preferred slot was out of tries
//! state = "mounted"        # or "none", or "unavailable: <why>"
//! kernel = "6.1.0-57-amd64" # the kernel that runs the slot
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the record lives in the booted system.
pub const RECORD_PATH: &str = "/run/atom/boot.toml";
const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Unknown fields are ignored: the initramfs that writes the record is shared by both
/// slots, so an agent in an older slot may read a record from a newer bootsel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    pub slot: String,
    pub label: String,
    pub partition: u32,
    pub partuuid: String,
    pub disk: String,
    pub reason: String,
    pub trial: bool,
    pub tries_left: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fell_back_from: Option<String>,
    pub state: String,
    /// `uname -r` of the kernel that booted the slot (from a bootsel that knows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a valid boot record: {1}")]
    Malformed(String, String),
}

impl BootRecord {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("record serializes")
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_RECORD_BYTES {
            return Err("too large".into());
        }
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecordError::Io(path.display().to_string(), e))?;
        Self::parse(&text).map_err(|e| RecordError::Malformed(path.display().to_string(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = BootRecord {
            slot: "B".into(),
            label: "root-b".into(),
            partition: 3,
            partuuid: "x".into(),
            disk: "/dev/vda".into(),
            reason: "r".into(),
            trial: true,
            tries_left: 2,
            fell_back_from: None,
            state: "mounted".into(),
            kernel: Some("6.1.0-57-amd64".into()),
        };
        assert_eq!(BootRecord::parse(&r.to_toml()).unwrap(), r);
        assert!(BootRecord::parse("slot = 1").is_err());
        let newer = format!("measured_boot = true\n{}", r.to_toml());
        assert_eq!(
            BootRecord::parse(&newer).unwrap(),
            r,
            "a newer bootsel's field is ignored"
        );
    }
}
