//! The agent's persistent state (`<state_dir>/state.toml`) and its lock.
//!
//! Written by atomic replace; it records what the agent verified into each slot (so
//! `status` can name the inactive slot's version and a rerun knows an update is already
//! staged) and the last update result.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Failure, Kind};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotContent {
    pub version: String,
    pub digest: String,
    /// `uname -r` of the kernel the slot booted with, once it has run on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub time: String,
    pub outcome: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default)]
    pub bytes_downloaded: u64,
    /// Read from a local repository (directory, stick): not over a network.
    #[serde(default)]
    pub bytes_read_locally: u64,
    #[serde(default)]
    pub bytes_uploaded: u64,
    #[serde(default)]
    pub bytes_written: u64,
    #[serde(default)]
    pub bytes_skipped: u64,
    /// Bytes a checkpoint of an interrupted run showed were already in place.
    #[serde(default)]
    pub bytes_resumed: u64,
}

/// The schema this agent writes. A newer agent's state (higher schema) is read tolerantly:
/// the fields known here are used, top-level fields unknown here are kept as they were and
/// written back, and the schema number never goes down.
pub const SCHEMA: u32 = 1;

/// Unknown fields are ignored, not errors: the state directory outlives the slots, so after
/// a fallback an older agent reads what a newer one wrote, and must keep the rollback floor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// 0 for files written before the schema was numbered.
    #[serde(default)]
    pub schema: u32,
    /// Verified contents by slot name ("A"/"B"); absent while a slot is being written.
    #[serde(default)]
    pub slots: BTreeMap<String, SlotContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastResult>,
    /// The newest version `mark-good` confirmed on this host: nothing older is installed
    /// without --allow-downgrade. It rises only on mark-good, never on staging or on a
    /// trial boot, so a version that fails its trial cannot lock the host out of the
    /// version it falls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_floor: Option<String>,
    /// This host's place in phased rollouts (uniform over u32), drawn once and kept, so
    /// its turn does not move between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_place: Option<u32>,
    /// By channel, the `created` time of the newest manifest accepted: an older one, though
    /// validly signed and unexpired, is a replay (it could undo a re-signed pause of a
    /// rollout) and is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub newest_manifest: BTreeMap<String, jiff::Timestamp>,
    /// Key roles: the highest `keys.toml` version accepted (a lower one is a replay that
    /// could bring back a retired key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_version: Option<u64>,
    /// The digest of that keys.toml: another list under the same version is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_digest: Option<String>,
    /// Key roles, by channel: the `created` time of the newest timestamp accepted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub newest_timestamp: BTreeMap<String, jiff::Timestamp>,
    /// Images (by digest) that failed on this host: a fallback from them or mark-bad.
    /// They are not installed again unless an operator says so.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, Rejected>,
    /// The boot (kernel boot id) whose fallback was already recorded: the record says
    /// "fell back from A" all boot long, also after A was rewritten with a new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_noted: Option<String>,
    /// Fields of a newer agent's schema, carried through unchanged.
    #[serde(flatten)]
    pub newer: toml::Table,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub version: String,
    pub why: String,
    pub time: String,
}

impl State {
    pub fn floor(&self) -> Option<semver::Version> {
        self.rollback_floor.as_deref().and_then(|v| v.parse().ok())
    }

    /// Raises the floor to `good`; true if it moved.
    pub fn raise_floor(&mut self, good: &semver::Version) -> bool {
        if self.floor().is_some_and(|f| &f >= good) {
            return false;
        }
        self.rollback_floor = Some(good.to_string());
        true
    }

    /// Records what `slot` holds as rejected (when its content is known); true if new.
    pub fn reject_slot(&mut self, slot: &str, why: &str) -> bool {
        let Some(content) = self.slots.get(slot).filter(|c| !c.digest.is_empty()) else {
            return false;
        };
        if self.rejected.contains_key(&content.digest) {
            return false;
        }
        tracing::warn!(version = %content.version, digest = %content.digest, why, "version rejected on this host");
        self.rejected.insert(
            content.digest.clone(),
            Rejected {
                version: content.version.clone(),
                why: why.to_owned(),
                time: jiff::Timestamp::now().to_string(),
            },
        );
        true
    }

    /// Records the fallback this boot made (once per boot); true if the state changed.
    pub fn note_fallback(&mut self, fell_back_from: Option<&str>, boot_id: &str) -> bool {
        let Some(from) = fell_back_from else {
            return false;
        };
        if self.fallback_noted.as_deref() == Some(boot_id) {
            return false;
        }
        self.fallback_noted = Some(boot_id.to_owned());
        self.reject_slot(
            from,
            &format!("the boot fell back from slot {from} (out of tries or failed to start)"),
        );
        true
    }

    /// Forgets the rejections of `version`; how many there were.
    pub fn forget_rejected(&mut self, version: &str) -> usize {
        let before = self.rejected.len();
        self.rejected.retain(|_, r| r.version != version);
        before - self.rejected.len()
    }

    /// The rollout place, drawn now if this host has none yet (the caller saves the state).
    pub fn rollout_place(&mut self) -> u32 {
        *self
            .rollout_place
            .get_or_insert_with(|| rand_core::RngCore::next_u32(&mut rand_core::OsRng))
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.toml")
    }

    fn backup_path(dir: &Path) -> PathBuf {
        dir.join("state.toml.bak")
    }

    fn read(path: &Path) -> Result<Option<State>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {}", path.display(), atom_dist::parse_error::describe(&text, &e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The state, from `state.toml` or, when that is unreadable, from the copy every save
    /// also writes. Never silently empty: the state holds the rollback floor, the replay
    /// watermark and the rejected versions, and forgetting them would let a downgrade, a
    /// replay or a known-bad version through.
    pub fn load(dir: &Path) -> Result<State, Failure> {
        let state = Self::load_any(dir)?;
        if state.schema > SCHEMA {
            tracing::debug!(
                schema = state.schema,
                known = SCHEMA,
                "state written by a newer agent: using the fields known here, keeping the others"
            );
        }
        Ok(state)
    }

    fn load_any(dir: &Path) -> Result<State, Failure> {
        let main = Self::read(&Self::path(dir));
        let path = Self::path(dir);
        match main {
            Ok(Some(state)) => Ok(state),
            Ok(None) => match Self::read(&Self::backup_path(dir)) {
                Ok(Some(state)) => {
                    tracing::warn!("state.toml is missing; using its backup copy");
                    Ok(state)
                }
                Ok(None) => Ok(State::default()),
                Err(e) => Err(Failure::refused(format!(
                    "{} is missing and its backup copy is unreadable ({e}); repair it, or move it away \
                     (mv {1} {1}.broken) to start from an empty state (the rollback floor, replay watermark \
                     and rejected versions would be forgotten)",
                    path.display(),
                    Self::backup_path(dir).display()
                ))),
            },
            Err(e) => match Self::read(&Self::backup_path(dir)) {
                Ok(Some(state)) => {
                    tracing::warn!(error = %e, "state file unreadable; using its backup copy");
                    Ok(state)
                }
                _ => Err(Failure::refused(format!(
                    "the state file is unreadable ({e}) and has no usable backup copy; it holds the rollback \
                     floor, the replay watermark and the rejected versions, so nothing is done without it: \
                     repair it, or move it away (mv {0} {0}.broken) to start from an empty state",
                    path.display()
                ))),
            },
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), Failure> {
        std::fs::create_dir_all(dir).map_err(|e| Failure::error(format!("cannot create {}: {e}", dir.display())))?;
        let mut state = self.clone();
        state.schema = state.schema.max(SCHEMA);
        let text = toml::to_string(&state).map_err(|e| Failure::error(e.to_string()))?;
        // The main file first: until it is complete the backup still holds the last state.
        for path in [Self::path(dir), Self::backup_path(dir)] {
            atom_dist::fsutil::write_atomic_bytes(&path, 0o600, text.as_bytes())
                .map_err(|e| Failure::error(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// How far an interrupted write of the inactive slot got: the first `durable` bytes of
/// `slot` were written, flushed to the device, and are `target`'s. A rerun for the same
/// target skips them; the final read-back of the whole slot still checks every byte.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub slot: String,
    pub target: String,
    pub durable: u64,
}

impl Checkpoint {
    fn path(dir: &Path) -> PathBuf {
        dir.join("checkpoint.toml")
    }

    /// Bytes to skip when writing `target` into `slot`: 0 unless the checkpoint is for them.
    pub fn durable_for(dir: &Path, slot: &str, target: &str) -> u64 {
        std::fs::read_to_string(Self::path(dir))
            .ok()
            .and_then(|t| toml::from_str::<Checkpoint>(&t).ok())
            .filter(|c| c.slot == slot && c.target == target)
            .map_or(0, |c| c.durable)
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        atom_dist::fsutil::write_atomic_bytes(&Self::path(dir), 0o600, text.as_bytes())
    }

    pub fn clear(dir: &Path) {
        let _ = std::fs::remove_file(Self::path(dir));
    }
}

/// Held for the whole of a verb that changes anything: one agent at a time.
pub struct Lock {
    _file: File,
}

impl Lock {
    /// As [`Self::acquire`], waiting up to `limit` for another agent to finish (mark-good
    /// must not give up because a timer run holds the lock).
    pub fn acquire_waiting(dir: &Path, limit: std::time::Duration) -> Result<Lock, Failure> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match Self::acquire(dir) {
                Err(f) if f.kind == Kind::Locked && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    pub fn acquire(dir: &Path) -> Result<Lock, Failure> {
        crate::perms::private_state_dir(dir)?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Failure::error(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Lock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Failure {
                kind: Kind::Locked,
                message: format!("another atom-update is running (lock {} is held)", path.display()),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Failure::error(format!("cannot lock {}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_agent_reads_a_newer_agents_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            State::path(dir.path()),
            "rollback_floor = \"2.0.0\"\nfrom_the_future = 7\n[slots.B]\nversion = \"3.0.0\"\ndigest = \"blake3:00\"\nnew_too = true\n",
        )
        .unwrap();
        let st = State::load(dir.path()).unwrap();
        assert_eq!(st.floor(), Some(semver::Version::new(2, 0, 0)));
        assert_eq!(st.slots["B"].version, "3.0.0");
    }

    #[test]
    fn newer_fields_survive_an_older_agents_save_and_the_schema_never_drops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            State::path(dir.path()),
            "schema = 7\nrollback_floor = \"2.0.0\"\nfuture_watermark = 12\n[future_table]\nx = \"y\"\n",
        )
        .unwrap();
        let mut st = State::load(dir.path()).unwrap();
        st.rollout_place = Some(5);
        st.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(State::path(dir.path())).unwrap();
        for want in [
            "schema = 7",
            "future_watermark = 12",
            "[future_table]",
            "rollout_place = 5",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let fresh = tempfile::tempdir().unwrap();
        State::default().save(fresh.path()).unwrap();
        assert!(
            std::fs::read_to_string(State::path(fresh.path()))
                .unwrap()
                .contains("schema = 1")
        );
    }

    #[test]
    fn a_corrupt_state_falls_back_to_its_backup_or_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let st = State {
            rollback_floor: Some("3.0.0".into()),
            ..Default::default()
        };
        st.save(dir.path()).unwrap();
        std::fs::write(State::path(dir.path()), "rollback_floor = [garbage").unwrap();
        assert_eq!(
            State::load(dir.path()).unwrap().floor(),
            Some(semver::Version::new(3, 0, 0))
        );

        std::fs::write(State::backup_path(dir.path()), "\u{0}\u{0}").unwrap();
        let f = State::load(dir.path()).unwrap_err();
        assert_eq!(f.exit_code(), crate::error::EXIT_REFUSED);
        assert!(
            f.message.contains("state.toml") && f.message.contains("mv "),
            "{}",
            f.message
        );

        std::fs::remove_file(State::path(dir.path())).unwrap();
        let f = State::load(dir.path()).unwrap_err();
        assert_eq!(f.exit_code(), crate::error::EXIT_REFUSED);
    }

    #[test]
    fn a_fallback_rejects_the_slots_content_once_per_boot() {
        let mut st = State::default();
        st.slots.insert(
            "A".into(),
            SlotContent {
                version: "4.0.0".into(),
                digest: "blake3:44".into(),
                kernel: None,
            },
        );
        assert!(st.note_fallback(Some("A"), "boot-1"));
        assert_eq!(st.rejected["blake3:44"].version, "4.0.0");
        // Later in the same boot, A was rewritten with 5.0.0: the old record must not reject it.
        st.slots.get_mut("A").unwrap().digest = "blake3:55".into();
        assert!(!st.note_fallback(Some("A"), "boot-1"));
        assert!(!st.rejected.contains_key("blake3:55"));
        assert_eq!(st.forget_rejected("4.0.0"), 1);
        assert!(st.rejected.is_empty());
    }
}
