//! Partitions of a disk as the kernel lists them in sysfs (works for sda1, nvme0n1p1,
//! mmcblk0p1 and loop0p1 alike, whatever the naming scheme).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// The device node of partition `number` of `disk`, found through sysfs (works for sda1,
/// nvme0n1p1, mmcblk0p1 and loop0p1 alike), waiting for udev-less devtmpfs to create it.
pub fn partition_node(disk: &Path, number: u32, wait: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(dir) = partition_dir(disk, number)
            && let Some(name) = dir.file_name()
        {
            let node = Path::new("/dev").join(name);
            if node.exists() {
                return Ok(node);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "partition {number} of {} has no device node (is the partition table re-read?)",
                disk.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A partition block device as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The whole disk, e.g. /dev/sda for /dev/sda2.
    pub disk: PathBuf,
    pub number: u32,
    /// The GPT partition name (PARTLABEL), when the table has one.
    pub name: Option<String>,
}

/// What `/sys/dev/block/<major:minor>` says about a partition.
pub fn partition_by_devnum(devnum: &str) -> Option<PartitionInfo> {
    let sys = PathBuf::from(format!("/sys/dev/block/{devnum}"));
    let number = fs::read_to_string(sys.join("partition")).ok()?.trim().parse().ok()?;
    let name = fs::read_to_string(sys.join("uevent"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_owned));
    let real = fs::canonicalize(&sys).ok()?;
    let disk = real.parent()?.file_name()?.to_str()?.to_owned();
    Some(PartitionInfo {
        disk: PathBuf::from("/dev").join(disk),
        number,
        name,
    })
}

/// The partition behind a device node such as /dev/sda2 or /dev/disk/by-partlabel/root-a.
pub fn partition_of_device(dev: &Path) -> Result<PartitionInfo, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{} is not a block device", dev.display()));
    }
    let rdev = meta.rdev();
    let devnum = format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    partition_by_devnum(&devnum).ok_or_else(|| format!("{} ({devnum}) is not a disk partition", dev.display()))
}
