//! Finding the disk and its partition device nodes through sysfs.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bootsel::{BootTable, SlotLabels};

/// Block devices that are never the boot disk.
fn ignored(name: &str) -> bool {
    ["ram", "zram", "loop", "dm-", "sr", "fd", "md"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// `/dev/<disk>` for every whole disk the kernel knows, in sysfs order.
fn whole_disks(sys: &Path) -> Vec<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(sys.join("block"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter(|n| !ignored(n))
        .map(|n| PathBuf::from("/dev").join(n))
        .collect()
}

pub struct FoundDisk {
    pub path: PathBuf,
    pub file: File,
    pub table: BootTable,
}

/// Waits up to `wait` for the configured disk (or, with none configured, the one disk
/// whose GPT has both slot labels) and loads its table. With `guid`, only a disk with that
/// GPT disk GUID will do (the second stage finds the disk the first stage chose). Two
/// disks that both qualify (an install stick left plugged in) are an error, not a coin
/// toss. The error says what was seen.
pub fn find(
    configured: Option<&str>,
    guid: Option<&str>,
    labels: &SlotLabels,
    wait: Duration,
) -> Result<FoundDisk, String> {
    let deadline = Instant::now() + wait;
    let mut last_problem = String::from("no disk appeared");
    loop {
        let candidates = match configured {
            Some(d) => vec![PathBuf::from(d)],
            None => whole_disks(Path::new("/sys")),
        };
        let mut matches = Vec::new();
        for path in candidates {
            let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    last_problem = format!("{}: {e}", path.display());
                    continue;
                }
            };
            match BootTable::load(&mut file, labels) {
                Ok(table) => match guid {
                    Some(g) if !table.disk_guid().eq_ignore_ascii_case(g) => {
                        last_problem = format!("{}: disk GUID {}, not {g}", path.display(), table.disk_guid());
                    }
                    _ => matches.push(FoundDisk { path, file, table }),
                },
                Err(e) => last_problem = format!("{}: {e}", path.display()),
            }
        }
        if matches.len() > 1 {
            let names: Vec<String> = matches.iter().map(|m| m.path.display().to_string()).collect();
            return Err(format!(
                "several disks have both slot labels ({}); set the boot disk with bootsel.disk= or `disk` in the config",
                names.join(", ")
            ));
        }
        if let Some(found) = matches.pop() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no usable boot disk after {} s; last problem: {last_problem}",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The device node of partition `number` of `disk`, found through sysfs (works for sda1,
/// nvme0n1p1, mmcblk0p1 and loop0p1 alike), waiting for udev-less devtmpfs to create it.
pub fn partition_node(disk: &Path, number: u32, wait: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(dir) = bootsel::sysfs::partition_dir(disk, number)
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
