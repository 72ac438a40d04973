//! Per-slot `/etc` layers on the state partition, merged when a new image first boots.
//!
//! ```text
//! state/etc/slots/A/upper, work      slot A's overlay layer (what A last ran with)
//! state/etc/slots/A/origin.toml      the image the layer belongs to (its ext4 UUID)
//! state/etc/slots/A/merge.toml       what the merge that made it did (conflicts…)
//! state/etc/last.toml                the slot whose layer the host used last
//! ```
//!
//! When slot X boots an image its layer was not made for (the first boot after an update),
//! the layer of the slot the host ran last is merged for X's image (see
//! `bootsel::etcmerge`), with that slot's image `/etc` as the base. So edits made after the
//! update was staged are carried, and a fallback or rollback returns to the `/etc` the old
//! slot last ran with. A merge that cannot complete boots with the old layer unchanged.
//!
//! Hosts from before per-slot layers have one shared `state/etc/upper`: the first boot with
//! this bootsel moves it to the slot that last ran (the other one) and merges from there.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootsel::SlotName;
use bootsel::etcmerge::{self, MergeRecord, Report, layer, policy::Policy};
use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use super::{Paths, disk, mount};

#[derive(Serialize, Deserialize)]
struct Origin {
    /// The ext4 UUID of the slot's file system: a new image has a new one.
    image: String,
}

#[derive(Serialize, Deserialize)]
struct Last {
    slot: String,
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = fs::read_to_string(path).ok()?;
    toml::from_str(&text).ok()
}

fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = toml::to_string(value).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("toml.tmp");
    fs::write(&tmp, text)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The UUID in an ext4 superblock (1024 bytes in, at offset 0x68), as hex.
pub fn ext4_uuid(device: &Path) -> Option<String> {
    let mut f = fs::File::open(device).ok()?;
    let mut sb = [0u8; 0x78];
    f.seek(SeekFrom::Start(1024)).ok()?;
    f.read_exact(&mut sb).ok()?;
    // s_magic at 0x38
    (sb[0x38] == 0x53 && sb[0x39] == 0xEF).then(|| sb[0x68..0x78].iter().map(|b| format!("{b:02x}")).collect())
}

pub struct SlotEtc<'a> {
    pub paths: &'a Paths,
    pub slot: SlotName,
    /// The partition nodes of both slots.
    pub mine: PathBuf,
    pub other: PathBuf,
}

impl SlotEtc<'_> {
    fn root(&self) -> PathBuf {
        self.paths.state().join("etc")
    }

    fn dir(&self, slot: SlotName) -> PathBuf {
        self.root().join("slots").join(slot.as_str())
    }

    /// The directory holding the `upper` and `work` the overlay of this boot uses.
    pub fn prepare(&self) -> Result<PathBuf, String> {
        let mine = self.dir(self.slot);
        fs::create_dir_all(&mine).map_err(|e| format!("cannot create {}: {e}", mine.display()))?;
        layer::recover(&mine.join("upper")).map_err(|e| format!("cannot clean up {}: {e}", mine.display()))?;
        let image = ext4_uuid(&self.mine).unwrap_or_else(|| "unknown".into());
        let origin = mine.join("origin.toml");
        if read_toml::<Origin>(&origin).is_some_and(|o| o.image == image) {
            return Ok(mine);
        }
        let last = self.migrate_shared_layer()?;
        let from = match last {
            Some(slot) if self.dir(slot).join("upper").is_dir() => slot,
            // A host without any layer yet: this image's layer starts empty.
            _ => {
                write_toml(&origin, &Origin { image })?;
                return Ok(mine);
            }
        };
        match self.merge_from(from) {
            Ok(report) => {
                say!(
                    "/etc: merged slot {from}'s changes for this image: {} kept, {} follow the image now, {} account \
                     file(s) merged, {} conflict(s){}",
                    report.kept.len(),
                    report.follows_image.len(),
                    report.merged.len(),
                    report.conflicts.len(),
                    if report.conflicts.is_empty() {
                        ""
                    } else {
                        " (atom-update etc conflicts)"
                    }
                );
                write_toml(
                    &mine.join("merge.toml"),
                    &MergeRecord {
                        from_slot: from.to_string(),
                        report,
                    },
                )?;
                write_toml(&origin, &Origin { image })?;
                Ok(mine)
            }
            Err(e) if from != self.slot => {
                say!(
                    "/etc: the merge of slot {from}'s changes failed ({e}); booting with slot {from}'s /etc unchanged"
                );
                Ok(self.dir(from))
            }
            Err(e) => Err(e),
        }
    }

    /// A shared `state/etc/upper` (bootsel before per-slot layers) becomes the layer of the
    /// slot that ran last. Returns the slot whose layer the host used last.
    fn migrate_shared_layer(&self) -> Result<Option<SlotName>, String> {
        let recorded = read_toml::<Last>(&self.root().join("last.toml")).and_then(|l| l.slot.parse().ok());
        let shared = self.root().join("upper");
        if !shared.is_dir() {
            return Ok(recorded);
        }
        // Before per-slot layers nothing recorded the last slot: the first boot with this
        // bootsel is the first boot of a new image, so the other slot ran last.
        let last = recorded.unwrap_or(self.slot.other());
        let dest = self.dir(last);
        fs::create_dir_all(&dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        for part in ["upper", "work"] {
            let from = self.root().join(part);
            if from.exists() && !dest.join(part).exists() {
                fs::rename(&from, dest.join(part)).map_err(|e| format!("cannot move {}: {e}", from.display()))?;
            }
        }
        let node = if last == self.slot { &self.mine } else { &self.other };
        if let Some(image) = ext4_uuid(node) {
            write_toml(&dest.join("origin.toml"), &Origin { image })?;
        }
        say!("/etc: the shared layer of earlier bootsel versions is now slot {last}'s");
        Ok(Some(last))
    }

    fn merge_from(&self, from: SlotName) -> Result<Report, String> {
        let new_etc = self.paths.newroot.join("etc");
        let mine_upper = self.dir(self.slot).join("upper");
        let staged = layer::staging(&mine_upper);
        let base_mount = self.paths.run.join("atom/etc-base");
        // The base is the other slot's image /etc; the slot itself was rewritten if it
        // is `from`, and then its layer is kept as it is (base = new: nothing "changed").
        let base = if from == self.slot {
            new_etc.clone()
        } else {
            match mount::mount_fs(
                &self.other.to_string_lossy(),
                &base_mount,
                "ext4",
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("noload"),
            ) {
                Ok(()) => base_mount.join("etc"),
                Err(e) => {
                    say!("/etc: slot {from}'s image cannot be read ({e}); keeping its changes as they are");
                    new_etc.clone()
                }
            }
        };
        let policy = match fs::read(self.paths.newroot.join(etcmerge::policy::PATH)) {
            Ok(bytes) => Policy::parse(&bytes).unwrap_or_else(|e| {
                say!("/etc: {e}; merging without the image's policy");
                Policy::default()
            }),
            Err(_) => Policy::default(),
        };
        let _ = fs::remove_dir_all(&staged);
        let result = etcmerge::merge(&base, &self.dir(from).join("upper"), &new_etc, &staged, &policy)
            .map_err(|e| e.to_string())
            .and_then(|report| layer::replace(&mine_upper).map(|()| report).map_err(|e| e.to_string()));
        if base.starts_with(&base_mount) {
            mount::detach(&base_mount);
        }
        if result.is_err() {
            let _ = fs::remove_dir_all(&staged);
        }
        // A fresh work directory: overlayfs refuses one left from another upper layer.
        let work = self.dir(self.slot).join("work");
        let _ = fs::remove_dir_all(&work);
        result
    }

    /// After the overlay is mounted: the layer this boot writes to is the one used last.
    pub fn record_last(&self, used: &Path) {
        let slot = used.file_name().and_then(|n| n.to_str()).unwrap_or(self.slot.as_str());
        if let Err(e) = write_toml(&self.root().join("last.toml"), &Last { slot: slot.to_owned() }) {
            say!("/etc: {e}");
        }
    }
}

/// The partition nodes of both slots, for [`SlotEtc`].
pub fn slot_nodes(found: &disk::FoundDisk, slot: SlotName, wait: Duration) -> Result<(PathBuf, PathBuf), String> {
    let mine = disk::partition_node(&found.path, found.table.slot(slot).partition, wait)?;
    let other = disk::partition_node(&found.path, found.table.slot(slot.other()).partition, wait)?;
    Ok((mine, other))
}
