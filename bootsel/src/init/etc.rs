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

/// The shared layer of an earlier bootsel, as it was when last adopted.
#[derive(Serialize, Deserialize)]
struct Shared {
    fingerprint: String,
}

/// Names, sizes, modes and change times of everything in a tree: any write changes it.
fn tree_fingerprint(root: &Path) -> std::io::Result<String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &Path, h: &mut std::collections::hash_map::DefaultHasher, depth: u32) -> std::io::Result<()> {
        let m = fs::symlink_metadata(p)?;
        (
            m.len(),
            m.mode(),
            m.ctime(),
            m.ctime_nsec(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino(),
        )
            .hash(h);
        if m.is_dir() && depth < 64 {
            let mut names: Vec<_> = fs::read_dir(p)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            for n in names {
                n.hash(h);
                walk(&p.join(&n), h, depth + 1)?;
            }
        }
        Ok(())
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    walk(root, &mut h, 0)?;
    Ok(format!("{:016x}", h.finish()))
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

    /// This slot's image: its file system's UUID and its release file (a UUID that cannot
    /// be read never matches, so the layer is merged again rather than trusted blindly).
    fn identity(&self) -> String {
        let release = fs::read_to_string(self.paths.newroot.join("usr/lib/atom/release")).unwrap_or_default();
        let version = release
            .lines()
            .find_map(|l| l.strip_prefix("version = "))
            .unwrap_or("")
            .trim_matches('"')
            .to_owned();
        match ext4_uuid(&self.mine) {
            Some(uuid) => format!("{uuid}:{version}"),
            None => format!("unreadable-{}:{version}", std::process::id()),
        }
    }

    /// The state partition is less trusted than the slot: none of the paths this uses may
    /// be a symlink (it would make PID 1 write, delete or mount wherever it points).
    fn check_no_symlinks(&self) -> Result<(), String> {
        let root = self.paths.state();
        for rel in [
            "etc".to_owned(),
            "etc/slots".to_owned(),
            format!("etc/slots/{}", self.slot),
            format!("etc/slots/{}", self.slot.other()),
            "etc/upper".to_owned(),
        ] {
            for sub in ["", "/upper", "/work", "/upper.merging"] {
                let p = root.join(format!("{rel}{sub}"));
                if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(format!("{} on the state partition is a symlink", p.display()));
                }
            }
        }
        Ok(())
    }

    /// The directory holding the `upper` and `work` the overlay of this boot uses.
    pub fn prepare(&self) -> Result<PathBuf, String> {
        self.check_no_symlinks()?;
        let mine = self.dir(self.slot);
        fs::create_dir_all(&mine).map_err(|e| format!("cannot create {}: {e}", mine.display()))?;
        if let Err(e) = layer::recover(&mine.join("upper")) {
            say!("/etc: cannot remove what a cut merge left in {} ({e})", mine.display());
        }
        let image = self.identity();
        let origin = mine.join("origin.toml");
        let last = self.adopt_shared_layer()?;
        if read_toml::<Origin>(&origin).is_some_and(|o| o.image == image) && mine.join("upper").is_dir() {
            if last == Some(self.slot.other()) {
                self.carry_back();
            }
            return Ok(mine);
        }
        let from = match last.or_else(|| self.any_layer()) {
            Some(slot) if self.dir(slot).join("upper").is_dir() => slot,
            // A host without any layer yet: this image's layer starts empty.
            _ => {
                self.note(&origin, &Origin { image });
                return Ok(mine);
            }
        };
        let record = match self.merge_from(from) {
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
                MergeRecord {
                    from_slot: from.to_string(),
                    report,
                }
            }
            Err(e) => {
                // A merge failure must not cost the boot, nor touch the other slot's layer:
                // this slot gets a plain copy of it, and the failure is on record.
                say!("/etc: the merge of slot {from}'s changes failed ({e}); this slot gets them unmerged");
                self.copy_from(from)
                    .map_err(|e2| format!("the merge failed ({e}), and so did a plain copy ({e2})"))?;
                let mut report = Report::default();
                report.conflicts.push(etcmerge::Conflict {
                    path: String::new(),
                    what: format!("the /etc merge failed ({e}): slot {from}'s changes were copied unmerged"),
                    image_version: None,
                });
                MergeRecord {
                    from_slot: from.to_string(),
                    report,
                }
            }
        };
        self.note(&mine.join("merge.toml"), &record);
        let _ = fs::remove_file(mine.join(etcmerge::RESOLVED));
        self.note(&origin, &Origin { image });
        Ok(mine)
    }

    /// Records written after the layer is in place: failing to write them (a full state
    /// partition) is said, not fatal; the next boot merges again.
    fn note<T: Serialize>(&self, path: &Path, value: &T) {
        if let Err(e) = write_toml(path, value) {
            say!("/etc: {e}");
        }
    }

    /// With no record of the last slot: the other slot's layer if there is one, else ours.
    fn any_layer(&self) -> Option<SlotName> {
        [self.slot.other(), self.slot]
            .into_iter()
            .find(|s| self.dir(*s).join("upper").is_dir())
    }

    fn copy_from(&self, from: SlotName) -> Result<(), String> {
        let upper = self.dir(self.slot).join("upper");
        let staged = layer::staging(&upper);
        let _ = fs::remove_dir_all(&staged);
        etcmerge::copy::tree(&self.dir(from).join("upper"), &staged)
            .and_then(|()| layer::replace(&upper))
            .map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(self.dir(self.slot).join("work"));
        Ok(())
    }

    /// The shared `state/etc/upper` of bootsel before per-slot layers. It stays where it is,
    /// for a slot whose (older) bootsel still uses it; when it changed since it was last
    /// adopted (that older bootsel ran), a copy becomes the other slot's layer and the
    /// slot the host ran last. Returns the slot whose layer the host used last.
    fn adopt_shared_layer(&self) -> Result<Option<SlotName>, String> {
        let recorded = read_toml::<Last>(&self.root().join("last.toml")).and_then(|l| l.slot.parse().ok());
        let shared = self.root().join("upper");
        if !shared.is_dir() {
            return Ok(recorded);
        }
        let fingerprint = tree_fingerprint(&shared).map_err(|e| format!("cannot read {}: {e}", shared.display()))?;
        let adopted = self.root().join("shared.toml");
        if read_toml::<Shared>(&adopted).is_some_and(|a| a.fingerprint == fingerprint) {
            return Ok(recorded);
        }
        // Only an older bootsel writes the shared layer, and this slot runs the new one:
        // the other slot ran last with it.
        let owner = self.slot.other();
        let dest = self.dir(owner).join("upper");
        fs::create_dir_all(self.dir(owner)).map_err(|e| format!("cannot create {}: {e}", self.dir(owner).display()))?;
        let staged = layer::staging(&dest);
        let _ = fs::remove_dir_all(&staged);
        etcmerge::copy::tree(&shared, &staged)
            .and_then(|()| layer::replace(&dest))
            .map_err(|e| format!("cannot copy {}: {e}", shared.display()))?;
        let _ = fs::remove_dir_all(self.dir(owner).join("work"));
        if let Some(uuid) = ext4_uuid(&self.other) {
            // The other slot's release is not mounted here: its UUID alone identifies it.
            self.note(
                &self.dir(owner).join("origin.toml"),
                &Origin {
                    image: format!("{uuid}:"),
                },
            );
        }
        self.note(&adopted, &Shared { fingerprint });
        say!("/etc: the shared layer of an earlier bootsel is now also slot {owner}'s (and stays for that bootsel)");
        Ok(Some(owner))
    }

    /// The other slot's image, read-only and without replaying its journal (`noload`):
    /// the base of a merge and the source of carried passwords.
    fn mount_other_image(&self, at: &Path) -> Result<(), String> {
        mount::mount_fs(
            &self.other.to_string_lossy(),
            at,
            "ext4",
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("noload"),
        )
    }

    /// Back on this slot after the other ran: its passwords changed since come along.
    fn carry_back(&self) {
        let other = self.slot.other();
        let base_mount = self.paths.run.join("atom/etc-base");
        let mounted = self.mount_other_image(&base_mount).is_ok();
        let mine_upper = self.dir(self.slot).join("upper");
        for file in etcmerge::accounts::PASSWORD_FILES {
            let theirs_layer = self.dir(other).join("upper").join(file);
            let theirs = view(&theirs_layer, mounted.then(|| base_mount.join("etc").join(file)));
            let lower = self.paths.newroot.join("etc").join(file);
            let mine = view(&mine_upper.join(file), Some(lower.clone()));
            let (Some(theirs), Some((mine, mine_src))) = (theirs, mine) else {
                continue;
            };
            let (text, carried) = etcmerge::accounts::carry_back(&mine, &theirs.0);
            if carried.is_empty() {
                continue;
            }
            let dest = mine_upper.join(file);
            let tmp = mine_upper.join(format!(".{file}.atom-carry"));
            let _ = fs::remove_file(&tmp);
            let written = etcmerge::copy::entry(&mine_src, &tmp)
                .and_then(|()| fs::write(&tmp, &text))
                .and_then(|()| fs::File::open(&tmp)?.sync_all())
                .and_then(|()| fs::rename(&tmp, &dest));
            match written {
                Ok(()) => say!(
                    "/etc: back on slot {}: carried {} changed under slot {other} for {}",
                    self.slot,
                    file,
                    carried.join(", ")
                ),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    say!("/etc: cannot carry {file} from slot {other} ({e})");
                }
            }
        }
        if mounted {
            mount::detach(&base_mount);
        }
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
            match self.mount_other_image(&base_mount) {
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

/// What a slot sees at `layer_file` (its layer's copy, a whiteout meaning none) or else at
/// `image_file`: the bytes and the file they came from. Account files only: bounded.
fn view(layer_file: &Path, image_file: Option<PathBuf>) -> Option<(Vec<u8>, PathBuf)> {
    let read = |p: &Path| -> Option<(Vec<u8>, PathBuf)> {
        let m = fs::symlink_metadata(p).ok()?;
        (m.is_file() && m.len() <= etcmerge::accounts::MAX_BYTES).then(|| Some((fs::read(p).ok()?, p.to_owned())))?
    };
    match fs::symlink_metadata(layer_file) {
        Ok(m) if m.is_file() => read(layer_file),
        Ok(_) => None,
        Err(_) => read(&image_file?),
    }
}

/// The partition nodes of both slots, for [`SlotEtc`].
pub fn slot_nodes(found: &disk::FoundDisk, slot: SlotName, wait: Duration) -> Result<(PathBuf, PathBuf), String> {
    let mine = disk::partition_node(&found.path, found.table.slot(slot).partition, wait)?;
    let other = disk::partition_node(&found.path, found.table.slot(slot.other()).partition, wait)?;
    Ok((mine, other))
}
