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

/// How the disks are opened while looking for the boot disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// The first stage writes the spent try at once.
    ReadWrite,
    /// The second stage only reads: under a distribution initramfs udev watches block
    /// devices, and closing one that was opened for writing makes udev re-probe the disk
    /// and all its partitions. Those late events write udev's database while the
    /// initramfs hands over, and `run-init` then fails to empty the initramfs
    /// ("nuking initramfs contents: No such file or directory"), a kernel panic.
    ReadOnly,
}

pub struct FoundDisk {
    pub path: PathBuf,
    file: File,
    access: Access,
    pub table: BootTable,
}

impl FoundDisk {
    /// Writes the table's changes, opening the disk for writing first if it was found
    /// read-only (only a slot that fails in the second stage gets here).
    pub fn commit(&mut self) -> Result<(), String> {
        if self.access == Access::ReadOnly {
            self.file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| format!("cannot open {} for writing: {e}", self.path.display()))?;
            self.access = Access::ReadWrite;
        }
        self.table.commit(&mut self.file).map_err(|e| e.to_string())
    }
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
    access: Access,
    wait: Duration,
) -> Result<FoundDisk, String> {
    find_among(
        &|| match configured {
            Some(d) => vec![PathBuf::from(d)],
            None => whole_disks(Path::new("/sys")),
        },
        guid,
        labels,
        access,
        wait,
    )
}

/// [`find`] over the disks `candidates` lists (again at each try: disks appear late).
fn find_among(
    candidates: &dyn Fn() -> Vec<PathBuf>,
    guid: Option<&str>,
    labels: &SlotLabels,
    access: Access,
    wait: Duration,
) -> Result<FoundDisk, String> {
    let deadline = Instant::now() + wait;
    let mut last_problem = String::from("no disk appeared");
    loop {
        let candidates = candidates();
        let mut matches = Vec::new();
        for path in candidates {
            let mut file = match OpenOptions::new()
                .read(true)
                .write(access == Access::ReadWrite)
                .open(&path)
            {
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
                    _ => matches.push(FoundDisk {
                        path,
                        file,
                        access,
                        table,
                    }),
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

pub use bootsel::sysfs::partition_node;

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_disk(path: &Path) {
        std::fs::File::create(path).unwrap().set_len(64 << 20).unwrap();
        let mut child = std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sfdisk (package fdisk) is needed");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: gpt\nsize=8MiB, name=root-a\nsize=8MiB, name=root-b\n")
            .unwrap();
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn two_disks_with_both_labels_are_an_error_not_a_coin_toss() {
        let d = tempfile::tempdir().unwrap();
        let (one, two, other) = (d.path().join("sda"), d.path().join("sdb"), d.path().join("sdc"));
        gpt_disk(&one);
        gpt_disk(&two);
        std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
        let labels = SlotLabels::default();
        let both = || vec![one.clone(), other.clone(), two.clone()];
        let e = find_among(&both, None, &labels, Access::ReadWrite, Duration::ZERO)
            .err()
            .unwrap();
        assert!(
            e.contains("several disks have both slot labels") && e.contains("sda") && e.contains("sdb"),
            "{e}"
        );
        let just_one = || vec![other.clone(), two.clone()];
        let found = find_among(&just_one, None, &labels, Access::ReadWrite, Duration::ZERO).unwrap();
        assert_eq!(found.path, two);
        // The second stage names the disk by GUID: then the other disk does not count.
        let guid = found.table.disk_guid();
        let found = find_among(&both, Some(&guid), &labels, Access::ReadOnly, Duration::ZERO).unwrap();
        assert_eq!(found.path, two);
        assert_eq!(found.access, Access::ReadOnly);
    }
}
