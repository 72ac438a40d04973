//! What this host is running: the disk, the booted slot and its version.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use atom_dist::release::Release;
use bootsel::record::BootRecord;
use bootsel::{BootTable, SlotName};

use crate::config::Settings;
use crate::error::Failure;

/// How the running slot was determined (shown by `status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detection {
    BootRecord(PathBuf),
    Mountinfo,
}

pub struct Host {
    pub disk: PathBuf,
    pub running: SlotName,
    pub detection: Detection,
    pub record: Option<BootRecord>,
    pub release: Release,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), new at every kernel start.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `uname -r`: the kernel the running slot booted with.
pub fn running_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `major:minor` of the filesystem mounted at `/`, from /proc/self/mountinfo. Mounts are
/// listed in the order they were made, so with several on `/` the last is the one in use.
fn root_devnum() -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    root_devnum_in(&info)
}

fn root_devnum_in(info: &str) -> Option<String> {
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&"/"))
            .then(|| f.get(2).map(|s| s.to_string()))
            .flatten()
    })
}

pub fn open_disk(disk: &Path, write: bool) -> Result<File, Failure> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(disk)
        .map_err(|e| Failure::error(format!("cannot open {}: {e}", disk.display())))
}

pub fn load_table(disk: &Path, s: &Settings, write: bool) -> Result<(File, BootTable), Failure> {
    let mut f = open_disk(disk, write)?;
    let t = BootTable::load(&mut f, &s.labels).map_err(|e| Failure::error(format!("{}: {e}", disk.display())))?;
    Ok((f, t))
}

impl Host {
    /// Finds the running slot: bootsel's record first, then the root mount's device
    /// matched against the slot partitions.
    pub fn detect(s: &Settings) -> Result<Host, Failure> {
        let release_text = std::fs::read(&s.release_file)
            .map_err(|e| Failure::error(format!("cannot read {}: {e}", s.release_file.display())))?;
        let release =
            Release::parse(&release_text).map_err(|e| Failure::error(format!("{}: {e}", s.release_file.display())))?;
        let record = match BootRecord::load(&s.boot_record) {
            Ok(r) => Some(r),
            Err(bootsel::record::RecordError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unreadable boot record");
                None
            }
        };
        if let Some(r) = &record {
            let running: SlotName = r.slot.parse().map_err(Failure::error)?;
            let disk = s.disk.clone().unwrap_or_else(|| PathBuf::from(&r.disk));
            return Ok(Host {
                disk,
                running,
                detection: Detection::BootRecord(s.boot_record.clone()),
                record,
                release,
            });
        }
        let (root_disk, number) = root_devnum()
            .as_deref()
            .and_then(bootsel::sysfs::partition_by_devnum)
            .map(|p| (p.disk, p.number))
            .ok_or_else(|| {
                Failure::error(format!(
                    "cannot tell which slot is running: no boot record at {} and / is not on a disk partition",
                    s.boot_record.display()
                ))
            })?;
        let disk = s.disk.clone().unwrap_or(root_disk);
        let (_, table) = load_table(&disk, s, false)?;
        let running = table
            .slots()
            .iter()
            .find(|sl| sl.partition == number)
            .map(|sl| sl.name)
            .ok_or_else(|| {
                Failure::error(format!(
                    "/ is on partition {number} of {}, which is not a slot",
                    disk.display()
                ))
            })?;
        Ok(Host {
            disk,
            running,
            detection: Detection::Mountinfo,
            record,
            release,
        })
    }
}

/// Mounts of a slot partition (the inactive slot must not be mounted while we write it).
pub fn partition_is_mounted(disk: &Path, number: u32) -> bool {
    let devnum = bootsel::sysfs::partition_dir(disk, number).and_then(|d| std::fs::read_to_string(d.join("dev")).ok());
    let Some(devnum) = devnum.map(|d| d.trim().to_owned()) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split_whitespace().nth(2) == Some(devnum.as_str()))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_mount_on_root_wins() {
        let info = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                    30 22 0:5 / /dev rw - devtmpfs udev rw\n\
                    41 22 259:2 / / ro - ext4 /dev/vda2 ro\n";
        assert_eq!(root_devnum_in(info).as_deref(), Some("259:2"));
        assert_eq!(root_devnum_in("30 22 0:5 / /dev rw - devtmpfs udev rw\n"), None);
    }
}
