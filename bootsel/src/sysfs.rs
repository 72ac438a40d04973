//! Partitions of a disk as the kernel lists them in sysfs (works for sda1, nvme0n1p1,
//! mmcblk0p1 and loop0p1 alike, whatever the naming scheme).

use std::fs;
use std::path::{Path, PathBuf};

/// `/sys/class/block/<disk>/<partition>` of partition `number` of `disk`, if the kernel
/// knows it.
pub fn partition_dir(disk: &Path, number: u32) -> Option<PathBuf> {
    let name = disk.file_name()?.to_str()?;
    fs::read_dir(Path::new("/sys/class/block").join(name))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| fs::read_to_string(p.join("partition")).is_ok_and(|s| s.trim() == number.to_string()))
}
