//! The target's partition table: read what is there (to keep partitions named by
//! `keep_partlabel`), clear it before anything is written, and write the image's table,
//! grown to the target, only at the very end.

use std::fs::File;
use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use gptman::{GPT, GPTPartitionEntry};

pub const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// Backup GPT: 32 sectors of entries and the header.
const BACKUP_SECTORS: u64 = 33;
/// Bytes of MBR boot code in front of the partition table.
const BOOT_CODE: usize = 440;

/// Partitions of the target to keep, by their entry number.
pub type Kept = Vec<(u32, GPTPartitionEntry)>;

/// What the finished disk will hold.
#[derive(Debug)]
pub struct Plan {
    image: GPT,
    mbr: [u8; 512],
    /// The image's partitions end here; nothing beyond is written from the image.
    pub image_end: u64,
    /// Entry number and new last sector of the partition that grows (`state`).
    grow: Option<(u32, u64)>,
    kept: Vec<(u32, GPTPartitionEntry)>,
}

/// `*` and `?` globs, as operators write partition names.
pub fn glob(pattern: &str, name: &str) -> bool {
    fn rec(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some('?'), Some(_)) => rec(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    rec(&p, &n)
}

/// The partitions of `existing` (the target's table, if it has one) to keep.
pub fn kept(existing: Option<&GPT>, keep: &[String]) -> Vec<(u32, GPTPartitionEntry)> {
    let Some(gpt) = existing else { return Vec::new() };
    gpt.iter()
        .filter(|(_, p)| p.is_used())
        .filter(|(_, p)| keep.iter().any(|k| glob(k, p.partition_name.as_str())))
        .map(|(i, p)| (i, p.clone()))
        .collect()
}

/// The target's table, or `None` when it has none that reads. Headers are checked before
/// gptman sees them: the target's table is outside input, and a header with a huge entry
/// count or an unusual entry size would make gptman allocate without bound or panic.
pub fn read_existing(target: &mut File) -> Option<GPT> {
    let len = target.seek(SeekFrom::End(0)).ok()?;
    let mut header_at = |offset: u64| -> Option<Option<bool>> {
        let mut h = [0u8; 92];
        target.seek(SeekFrom::Start(offset)).ok()?;
        std::io::Read::read_exact(target, &mut h).ok()?;
        Some((&h[..8] == b"EFI PART").then(|| sane_header(&h)))
    };
    let primary = header_at(SECTOR)?;
    let backup = len.checked_sub(SECTOR).and_then(&mut header_at).flatten();
    if primary == Some(false) || backup == Some(false) || (primary.is_none() && backup.is_none()) {
        return None;
    }
    GPT::read_from(target, SECTOR).ok()
}

/// The disk GUID of the primary GPT on `disk`, if it has a valid one.
pub fn installed_guid(disk: &Path) -> Option<[u8; 16]> {
    let mut f = File::open(disk).ok()?;
    read_existing(&mut f).map(|g| g.header.disk_guid)
}

/// 128 entries of 128 bytes at most, the layout every tool writes.
fn sane_header(h: &[u8]) -> bool {
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    u32_at(12) == 92 && u32_at(80) <= 128 && u32_at(84) == 128
}

/// Lays the image's table (from the disk image's first MiB, `head`) out on a target of
/// `target_len` bytes: the last partition (`state`) grows up to the first kept partition
/// or the end of the disk.
pub fn plan(head: &[u8], target_len: u64, kept: Vec<(u32, GPTPartitionEntry)>) -> Result<Plan> {
    ensure!(
        head.len() >= 34 * SECTOR as usize,
        "the disk image is shorter than a GPT"
    );
    ensure!(
        &head[512..520] == b"EFI PART" && sane_header(&head[512..604]),
        "the disk image's GPT header is not one of 128 entries of 128 bytes"
    );
    let image = GPT::read_from(&mut Cursor::new(head), SECTOR)
        .map_err(|e| anyhow::anyhow!("the disk image has no GPT in its first MiB: {e}"))?;
    let mut mbr = [0u8; 512];
    mbr.copy_from_slice(&head[..512]);
    let used: Vec<(u32, &GPTPartitionEntry)> = image.iter().filter(|(_, p)| p.is_used()).collect();
    let Some(&(last_index, last)) = used.iter().max_by_key(|(_, p)| p.ending_lba) else {
        bail!("the disk image's GPT has no partitions");
    };
    let head_sectors = head.len() as u64 / SECTOR;
    if let Some((i, p)) = used
        .iter()
        .find(|(_, p)| p.starting_lba < head_sectors || p.ending_lba < p.starting_lba)
    {
        bail!(
            "the disk image's partition {i} ({}) starts inside its first MiB or ends before it starts",
            p.partition_name.as_str()
        );
    }
    let image_end = (last.ending_lba + 1) * SECTOR;
    let last_usable = (target_len / SECTOR)
        .checked_sub(BACKUP_SECTORS + 1)
        .context("the target is smaller than a partition table")?;
    let mut limit = last_usable;
    let image_names: Vec<&str> = used.iter().map(|(_, p)| p.partition_name.as_str()).collect();
    for (i, k) in &kept {
        if image_names.contains(&k.partition_name.as_str()) {
            bail!(
                "partition {i} is named {:?}, like one of the image's: keeping it would give two partitions that name",
                k.partition_name.as_str()
            );
        }
        if k.ending_lba < k.starting_lba {
            bail!("partition {i} ({}) ends before it starts", k.partition_name.as_str());
        }
        if k.starting_lba.saturating_mul(SECTOR) < image_end {
            bail!(
                "partition {i} ({}) starts at sector {}, inside the image's partitions (they end at \
                 sector {}): it cannot be kept",
                k.partition_name.as_str(),
                k.starting_lba,
                image_end / SECTOR
            );
        }
        if k.ending_lba > last_usable {
            bail!(
                "partition {i} ({}) reaches past the end of the target",
                k.partition_name.as_str()
            );
        }
        limit = limit.min(k.starting_lba - 1);
    }
    if image_end > (limit + 1) * SECTOR {
        bail!(
            "the target is {} bytes; the image's partitions need {} bytes{}",
            target_len,
            image_end + (BACKUP_SECTORS + 1) * SECTOR,
            if kept.is_empty() {
                ""
            } else {
                " before the first kept partition"
            }
        );
    }
    // Whole MiB, as the image's own partitions are aligned.
    let aligned_end = ((limit + 1) * SECTOR / MIB * MIB) / SECTOR - 1;
    let grow =
        (last.partition_name.as_str() == "state" && aligned_end > last.ending_lba).then_some((last_index, aligned_end));
    // A kept partition keeps its entry number unless the image uses it (or the image's
    // table has no such entry); then it takes the next free one.
    let mut taken: Vec<u32> = used.iter().map(|(i, _)| *i).collect();
    let mut kept = kept;
    for (i, _) in kept.iter_mut() {
        if taken.contains(i) || *i > image.header.number_of_partition_entries {
            *i = (1..=image.header.number_of_partition_entries)
                .find(|n| !taken.contains(n))
                .context("no free partition entry is left for a kept partition")?;
        }
        taken.push(*i);
    }
    Ok(Plan {
        image,
        mbr,
        image_end,
        grow,
        kept,
    })
}

impl Plan {
    pub fn grows(&self) -> Option<(u32, u64)> {
        self.grow.map(|(i, end)| {
            let start = self.image[i].starting_lba;
            (i, (end - start + 1) * SECTOR)
        })
    }

    pub fn kept(&self) -> &[(u32, GPTPartitionEntry)] {
        &self.kept
    }

    /// The byte range of the image's partition named `name`.
    pub fn partition(&self, name: &str) -> Option<(u64, u64)> {
        self.image
            .iter()
            .find(|(_, p)| p.is_used() && p.partition_name.as_str() == name)
            .map(|(_, p)| (p.starting_lba * SECTOR, (p.ending_lba + 1 - p.starting_lba) * SECTOR))
    }

    /// Writes the table: protective MBR with the image's boot code, primary and backup GPT.
    pub fn write(&self, target: &mut File) -> Result<()> {
        let mut gpt = self.image.clone();
        gpt.header
            .update_from(target, SECTOR)
            .context("cannot size the partition table to the target")?;
        if let Some((i, end)) = self.grow {
            gpt[i].ending_lba = end;
        }
        for (i, p) in &self.kept {
            gpt[*i] = p.clone();
        }
        gpt.write_into(target).context("cannot write the partition table")?;
        if self.mbr[446] == 0x80 {
            GPT::write_bootable_protective_mbr_into(target, SECTOR)
        } else {
            GPT::write_protective_mbr_into(target, SECTOR)
        }
        .context("cannot write the protective MBR")?;
        target.seek(SeekFrom::Start(0))?;
        target
            .write_all(&self.mbr[..BOOT_CODE])
            .context("cannot write the MBR boot code")?;
        target.sync_all().context("cannot flush the partition table")
    }
}

/// Removes every trace of a table (both GPT copies, the MBR and its boot code); with kept
/// partitions, writes a table of only those, so a failure later loses nothing kept.
pub fn clear(target: &mut File, existing: Option<&GPT>, kept: &[(u32, GPTPartitionEntry)]) -> Result<()> {
    if let Some(e) = existing
        && kept.iter().any(|(i, _)| *i > e.header.number_of_partition_entries)
    {
        bail!("a kept partition's new entry number is beyond the target's table: nothing was cleared");
    }
    let len = target.seek(SeekFrom::End(0))?;
    let zeros = vec![0u8; MIB as usize];
    target.seek(SeekFrom::Start(0))?;
    target
        .write_all(&zeros)
        .context("cannot clear the start of the target")?;
    target.seek(SeekFrom::Start(len - BACKUP_SECTORS * SECTOR))?;
    target
        .write_all(&zeros[..(BACKUP_SECTORS * SECTOR) as usize])
        .context("cannot clear the backup partition table")?;
    if let (Some(existing), false) = (existing, kept.is_empty()) {
        // The kept ones at the entry numbers they will have in the finished table.
        let mut gpt = existing.clone();
        let indexes: Vec<u32> = gpt.iter().filter(|(_, p)| p.is_used()).map(|(i, _)| i).collect();
        for i in indexes {
            gpt[i] = GPTPartitionEntry::empty();
        }
        for (i, p) in kept {
            gpt[*i] = p.clone();
        }
        gpt.header.update_from(target, SECTOR)?;
        gpt.write_into(target)
            .context("cannot write the table of kept partitions")?;
        GPT::write_protective_mbr_into(target, SECTOR)?;
    }
    target.sync_all().context("cannot flush the cleared table")
}

/// Tells the kernel the new partitions. BLKRRPART is not enough everywhere (loop devices
/// on some kernels accept it and scan nothing), so each partition is also set with BLKPG,
/// as partx does: the old ones removed, the new ones added.
pub fn reread(target: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    let fd = target.as_raw_fd();
    // SAFETY: BLKRRPART takes no argument; the descriptor is an open block device.
    let rrpart = unsafe { blkrrpart(fd) };
    let mut file = target.try_clone()?;
    let gpt = GPT::read_from(&mut file, SECTOR).context("cannot read back the new partition table")?;
    let entries = gpt.header.number_of_partition_entries;
    for n in 1..=entries {
        let _ = blkpg(fd, BLKPG_DEL_PARTITION, n, 0, 0);
    }
    for (n, p) in gpt.iter().filter(|(_, p)| p.is_used()) {
        let start = p.starting_lba * SECTOR;
        let len = (p.ending_lba + 1 - p.starting_lba) * SECTOR;
        if let Err(e) = blkpg(fd, BLKPG_ADD_PARTITION, n, start, len) {
            rrpart.context("BLKRRPART")?;
            return Err(e).with_context(|| format!("the kernel cannot add partition {n} (BLKPG)"));
        }
    }
    Ok(())
}

const BLKPG_ADD_PARTITION: libc::c_int = 1;
const BLKPG_DEL_PARTITION: libc::c_int = 2;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

fn blkpg(fd: std::os::fd::RawFd, op: libc::c_int, pno: u32, start: u64, length: u64) -> nix::Result<()> {
    nix::ioctl_write_ptr_bad!(blkpg_ioctl, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
    let mut part = BlkpgPartition {
        start: start as libc::c_longlong,
        length: length as libc::c_longlong,
        pno: pno as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&raw mut part).cast(),
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg whose data points at a blkpg_partition, both
    // laid out as in <linux/blkpg.h> and alive for the call.
    unsafe { blkpg_ioctl(fd, &arg) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("data", "data"));
        assert!(!glob("data", "data2"));
        assert!(glob("log*", "logs"));
        assert!(glob("*", ""));
        assert!(glob("d?t?", "data"));
        assert!(!glob("d?t", "data"));
    }
}
