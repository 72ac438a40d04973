//! The disks of this machine and the one to install onto: by path, by serial or WWID, the
//! only empty one, or the operator's answer on the console.

use std::fs::{self, File};
use std::io::{BufRead, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A whole disk as sysfs describes it.
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub size: u64,
    pub model: String,
    pub serial: String,
    pub wwid: String,
    pub read_only: bool,
    pub removable: bool,
}

impl Disk {
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("{:.1} GiB", self.size as f64 / (1u64 << 30) as f64)];
        for (what, v) in [("model", &self.model), ("serial", &self.serial), ("wwid", &self.wwid)] {
            if !v.is_empty() {
                parts.push(format!("{what} {v}"));
            }
        }
        if self.removable {
            parts.push("removable".into());
        }
        if self.read_only {
            parts.push("read-only".into());
        }
        format!("{} ({})", self.path.display(), parts.join(", "))
    }
}

/// Devices that are never an install target: virtual and optical ones, eMMC boot and
/// RPMB areas.
fn ignored(name: &str) -> bool {
    ["ram", "zram", "loop", "dm-", "sr", "fd", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
        || (name.starts_with("mmcblk") && (name.contains("boot") || name.ends_with("rpmb")))
}

/// SCSI (SATA, SAS, USB bridges) keep the serial in VPD page 0x80: a 4-byte header whose
/// last byte is the length, then the serial, space-padded.
fn vpd_serial(dir: &Path) -> String {
    let Ok(page) = fs::read(dir.join("device/vpd_pg80")) else {
        return String::new();
    };
    let Some(&len) = page.get(3) else { return String::new() };
    let end = (4 + len as usize).min(page.len());
    String::from_utf8_lossy(&page[4.min(end)..end]).trim().to_string()
}

fn attr(dir: &Path, names: &[&str]) -> String {
    names
        .iter()
        .find_map(|n| fs::read_to_string(dir.join(n)).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The disk behind `/sys/block/NAME`.
pub fn describe(sys_block: &Path, name: &str) -> Disk {
    let dir = sys_block.join(name);
    let sectors: u64 = attr(&dir, &["size"]).parse().unwrap_or(0);
    Disk {
        path: Path::new("/dev").join(name),
        size: sectors * 512,
        model: attr(&dir, &["device/model", "device/name"]),
        serial: Some(attr(&dir, &["serial", "device/serial"]))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vpd_serial(&dir)),
        wwid: attr(&dir, &["wwid", "device/wwid"]),
        read_only: attr(&dir, &["ro"]) == "1",
        removable: attr(&dir, &["removable"]) == "1",
    }
}

/// Every whole disk the kernel knows (not loop, RAM, optical or mapped devices).
pub fn list(sys_block: &Path) -> Vec<Disk> {
    let mut names: Vec<String> = fs::read_dir(sys_block)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter(|n| !ignored(n))
        // NVMe multipath's per-path devices: the namespace device is the disk.
        .filter(|n| attr(&sys_block.join(n), &["hidden"]) != "1")
        .map(|n| describe(sys_block, &n))
        .filter(|d| d.size > 0)
        .collect()
}

/// Empty: the first MiB reads as zeros (no partition table, and no filesystem, RAID or LVM
/// signature starts there).
pub fn is_empty(path: &Path) -> Result<bool> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let filled = super::stream::fill(&mut f, &mut buf).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(buf[..filled].iter().all(|&b| b == 0))
}

/// The target that `spec` names among `disks`. `medium` (the device the installer reads
/// from) is never chosen.
pub fn select(spec: &str, disks: &[Disk], medium: Option<&Path>) -> Result<PathBuf> {
    let not_medium = |d: &&Disk| medium.is_none_or(|m| m != d.path);
    let one = |what: &str, found: Vec<&Disk>| -> Result<PathBuf> {
        match found.as_slice() {
            [d] => Ok(d.path.clone()),
            [] => bail!("no disk is {what}; disks here: {}", names(disks)),
            many => bail!(
                "{} disks are {what} ({}): name one by path",
                many.len(),
                many.iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    };
    if let Some(serial) = spec.strip_prefix("serial:") {
        return one(
            &format!("serial {serial}"),
            disks.iter().filter(not_medium).filter(|d| d.serial == serial).collect(),
        );
    }
    if let Some(wwid) = spec.strip_prefix("wwid:") {
        return one(
            &format!("WWID {wwid}"),
            disks.iter().filter(not_medium).filter(|d| d.wwid == wwid).collect(),
        );
    }
    if spec == "empty" {
        let mut empty = Vec::new();
        for d in disks.iter().filter(not_medium).filter(|d| !d.read_only) {
            match is_empty(&d.path) {
                Ok(true) => empty.push(d),
                Ok(false) => {}
                // A locked or absent medium (card reader, Opal disk) is not a candidate.
                Err(e) => tracing::warn!("{e:#}: not counted as empty"),
            }
        }
        return one("empty (first MiB all zeros)", empty);
    }
    if !Path::new(spec).is_absolute() {
        bail!("target {spec:?}: give /dev/NAME, serial:SERIAL, wwid:WWID or empty");
    }
    // /dev/disk/by-id/... names the same disk as /dev/sdX.
    let path = fs::canonicalize(spec).with_context(|| format!("target {spec}"))?;
    let meta = fs::metadata(&path).with_context(|| format!("target {spec}"))?;
    if !meta.file_type().is_block_device() {
        bail!("target {spec} is not a block device");
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if Path::new("/sys/class/block").join(name).join("partition").exists() {
        bail!("target {spec} is a partition; give the whole disk");
    }
    if medium.is_some_and(|m| m == path) {
        bail!("target {spec} is the installer's own medium");
    }
    Ok(path)
}

fn names(disks: &[Disk]) -> String {
    if disks.is_empty() {
        return "none".into();
    }
    disks.iter().map(Disk::describe).collect::<Vec<_>>().join("; ")
}

/// Asks on the console which disk to erase; `None` when the operator declines.
pub fn ask(disks: &[Disk], input: &mut dyn BufRead, out: &mut dyn Write) -> Result<Option<PathBuf>> {
    if disks.is_empty() {
        bail!("no disk to install onto was found");
    }
    writeln!(out, "Disks:")?;
    for (i, d) in disks.iter().enumerate() {
        let state = if is_empty(&d.path).unwrap_or(false) {
            ", empty"
        } else {
            ""
        };
        writeln!(out, "  {}) {}{state}", i + 1, d.describe())?;
    }
    let chosen = loop {
        write!(out, "Install onto which disk? [1-{}, or q to stop] ", disks.len())?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim();
        if line == "q" {
            return Ok(None);
        }
        match line.parse::<usize>() {
            Ok(n) if (1..=disks.len()).contains(&n) => break &disks[n - 1],
            _ => writeln!(out, "{line:?} is not one of the numbers above")?,
        }
    };
    write!(
        out,
        "Everything on {} will be erased. Type yes to go on: ",
        chosen.describe()
    )?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    Ok((line.trim() == "yes").then(|| chosen.path.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str) -> Disk {
        Disk {
            path: PathBuf::from(format!("/dev/{name}")),
            size: 8 << 30,
            model: String::new(),
            serial: serial.into(),
            wwid: format!("naa.{serial}"),
            read_only: false,
            removable: false,
        }
    }

    #[test]
    fn serial_and_wwid_pick_one_disk_and_never_the_medium() {
        let disks = [disk("vda", "A1"), disk("vdb", "B2"), disk("sdz", "B2")];
        assert_eq!(select("serial:A1", &disks, None).unwrap(), Path::new("/dev/vda"));
        assert_eq!(select("wwid:naa.A1", &disks, None).unwrap(), Path::new("/dev/vda"));
        let e = select("serial:B2", &disks, None).unwrap_err().to_string();
        assert!(e.contains("2 disks"), "{e}");
        assert_eq!(
            select("serial:B2", &disks, Some(Path::new("/dev/sdz"))).unwrap(),
            Path::new("/dev/vdb")
        );
        assert!(select("serial:none", &disks, None).is_err());
        assert!(select("vda", &disks, None).is_err());
        assert!(
            select("/etc/passwd", &disks, None)
                .unwrap_err()
                .to_string()
                .contains("not a block device")
        );
    }

    #[test]
    fn the_console_question_needs_a_number_and_yes() {
        let disks = [disk("vda", "A1"), disk("vdb", "B2")];
        let mut out = Vec::new();
        let answer = ask(&disks, &mut &b"7\n2\nyes\n"[..], &mut out).unwrap();
        assert_eq!(answer.as_deref(), Some(Path::new("/dev/vdb")));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"7\" is not one of the numbers"), "{text}");
        assert!(text.contains("Everything on /dev/vdb"), "{text}");
        assert_eq!(ask(&disks, &mut &b"1\nno\n"[..], &mut Vec::new()).unwrap(), None);
        assert_eq!(ask(&disks, &mut &b"q\n"[..], &mut Vec::new()).unwrap(), None);
    }
}
