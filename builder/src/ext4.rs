//! The ext4 side of image building: a pinned mke2fs configuration, deterministic
//! identifiers, and post-processing that removes every trace of when an image was built.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::run;

/// mke2fs reads /etc/mke2fs.conf, which differs between build hosts and Debian releases.
/// A pinned copy makes the feature set (and so the bytes) depend only on Atom. The
/// features are those every kernel since 4.x mounts; `orphan_file` and friends are left
/// out so older target kernels can still boot the image.
pub const MKE2FS_CONF: &str = "\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,metadata_csum_seed,64bit,dir_nlink,extra_isize
	}
";

/// A UUID-formatted value derived from the image identity, so two builds of the same
/// version agree while different versions (and the two slots) differ.
pub fn derived_uuid(purpose: &str, version: &semver::Version, board: &str) -> String {
    let h = blake3::hash(format!("atom-{purpose}\0{version}\0{board}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// e2fsprogs tools with the pinned config and clock.
pub fn e2fs_tool(program: &str, conf: &Path, epoch: i64) -> Command {
    let mut c = Command::new(program);
    c.env("MKE2FS_CONFIG", conf)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("LC_ALL", "C");
    c
}

pub struct MkfsParams<'a> {
    pub conf: &'a Path,
    pub epoch: i64,
    pub uuid: &'a str,
    pub hash_seed: &'a str,
    pub source: &'a Path,
    pub image: &'a Path,
}

/// Error text of e2fsprogs and rsync when the filesystem is full.
pub fn is_out_of_space(err: &anyhow::Error) -> bool {
    let s = format!("{err:#}");
    s.contains("Could not allocate block") || s.contains("No space left") || s.contains("No free space")
}

pub fn mkfs(p: &MkfsParams<'_>) -> Result<()> {
    let ext = format!(
        "hash_seed={},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        p.hash_seed
    );
    run(e2fs_tool("mkfs.ext4", p.conf, p.epoch)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-L",
            "atom-root",
            "-U",
        ])
        .arg(p.uuid)
        .arg("-E")
        .arg(ext)
        .arg("-d")
        .arg(p.source)
        .arg(p.image))
    .map(drop)
}

/// Full read-only fsck: the builder never hands out an image e2fsck would complain about.
pub fn fsck_check(image: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .context("cannot run e2fsck (is e2fsprogs installed?)")?;
    if !out.status.success() {
        // e2fsck reports the problems on stdout.
        let text = String::from_utf8_lossy(&out.stdout);
        let problems: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(12).collect();
        bail!(
            "{} failed the filesystem check (e2fsck {}): {}",
            image.display(),
            out.status,
            problems.join(" / ")
        );
    }
    Ok(())
}

/// Reads one file out of an image without mounting it.
pub fn read_file(image: &Path, path_in_fs: &str) -> Result<Vec<u8>> {
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"/{path_in_fs}\""))
        .arg(image)
        .env("LC_ALL", "C"))?;
    // debugfs reports a missing file on stderr and still exits 0.
    if out.stdout.is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        let reason = err.lines().find(|l| !l.starts_with("debugfs ")).unwrap_or("empty file");
        bail!("cannot read /{path_in_fs} from {}: {reason}", image.display());
    }
    Ok(out.stdout)
}

/// Where an image came from, which decides what must be scrubbed from it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fresh from `mke2fs -d`: only inode change times (copied from the staging tree,
    /// which userspace cannot set) vary between builds.
    Mkfs,
    /// Written through a kernel mount: superblock times and counters, the mount point, the
    /// journal's old transactions and the kernel's random inode generation numbers too.
    Mounted,
}

/// Sets every timestamp the build left behind to `epoch`, so the image depends only on
/// its inputs. `paths` are all paths in the filesystem, `/` included.
pub fn normalize(
    image: &Path,
    conf: &Path,
    epoch: i64,
    paths: &[String],
    workdir: &Path,
    origin: Origin,
) -> Result<()> {
    let mut script = String::new();
    if origin == Origin::Mounted {
        // The kernel's mount path, time, count and write counter out of the primary
        // superblock first: the journal's recreation below copies the primary into every
        // backup superblock.
        zero_last_mounted(image)?;
        let pre = workdir.join("mount-fields.debugfs");
        std::fs::write(
            &pre,
            format!("ssv mtime @{epoch}\nssv mnt_count 0\nssv kbytes_written 0\n"),
        )
        .context("cannot write debugfs script")?;
        run(e2fs_tool("debugfs", conf, epoch)
            .args(["-w", "-n", "-f"])
            .arg(&pre)
            .arg(image))?;
        run(e2fs_tool("tune2fs", conf, epoch)
            .args(["-O", "^has_journal"])
            .arg(image))?;
        run(e2fs_tool("tune2fs", conf, epoch).args(["-O", "has_journal"]).arg(image))?;
        // Inodes the kernel freed (files the new version deleted) keep its timestamps and
        // generation numbers; clear them.
        for ino in freed_inodes(image)? {
            // clri zeroes only the classic 128-byte inode; the extended fields keep the
            // nanosecond parts of the kernel's timestamps.
            script.push_str(&format!("clri <{ino}>\n"));
            for field in ["ctime_extra", "mtime_extra", "atime_extra", "crtime", "crtime_extra"] {
                script.push_str(&format!("sif <{ino}> {field} 0\n"));
            }
        }
        zero_last_mounted(image)?;
    }
    for p in paths {
        if p.contains(['"', '\n']) {
            bail!("file name {p:?} cannot be stored reproducibly (contains a quote or newline)");
        }
        for field in ["atime", "ctime", "crtime"] {
            script.push_str(&format!("sif \"{p}\" {field} @{epoch}\nsif \"{p}\" {field}_extra 0\n"));
        }
        if origin == Origin::Mounted {
            // The kernel's change counter (i_version) depends on how the writes were split.
            script.push_str(&format!("sif \"{p}\" generation 0\nsif \"{p}\" version 0\n"));
        }
    }
    let script_path = workdir.join("normalize.debugfs");
    std::fs::write(&script_path, script).context("cannot write debugfs script")?;
    // -n: the superblock checksum is stale after zero_last_mounted; debugfs rewrites it.
    let out = run(e2fs_tool("debugfs", conf, epoch)
        .args(["-w", "-n", "-f"])
        .arg(&script_path)
        .arg(image))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(problem) = stderr
        .lines()
        .find(|l| !l.starts_with("debugfs") && !l.trim().is_empty())
    {
        bail!("normalizing {} failed: {problem}", image.display());
    }
    if origin == Origin::Mounted {
        refresh_checksums(image, conf, epoch, workdir)?;
    }
    Ok(())
}

/// With metadata_csum, directory, extent and xattr blocks are checksummed with their
/// inode's generation, which normalize just zeroed. debugfs does not rewrite those blocks;
/// e2fsck does (deterministically, with the pinned clock). Exit 1 means "corrected".
fn refresh_checksums(image: &Path, conf: &Path, epoch: i64, workdir: &Path) -> Result<()> {
    let out = e2fs_tool("e2fsck", conf, epoch)
        .args(["-f", "-y"])
        .arg(image)
        .output()
        .context("cannot run e2fsck (is e2fsprogs installed?)")?;
    match out.status.code() {
        // The kernel's mounts and e2fsck stamp the superblock with the real clock and
        // counters; last of all, put the build's back.
        Some(0 | 1) => {
            let script = workdir.join("superblock.debugfs");
            let mut text = String::new();
            for field in ["mtime", "wtime", "lastcheck", "mkfs_time"] {
                text.push_str(&format!("ssv {field} @{epoch}\n"));
            }
            text.push_str("ssv mnt_count 0\nssv kbytes_written 0\n");
            std::fs::write(&script, text).context("cannot write debugfs script")?;
            run(e2fs_tool("debugfs", conf, epoch)
                .args(["-w", "-f"])
                .arg(&script)
                .arg(image))
            .map(drop)
        }
        _ => bail!(
            "e2fsck could not refresh the checksums of {} ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .take(8)
                .collect::<Vec<_>>()
                .join(" / ")
        ),
    }
}

/// Free inodes below each group's never-used mark, from `dumpe2fs`.
fn freed_inodes(image: &Path) -> Result<Vec<u64>> {
    let out = run(Command::new("dumpe2fs").arg(image).env("LC_ALL", "C"))?;
    parse_freed_inodes(&String::from_utf8_lossy(&out.stdout))
}

fn parse_freed_inodes(dump: &str) -> Result<Vec<u64>> {
    let per_group: u64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("Inodes per group:"))
        .context("dumpe2fs printed no inode count")?
        .trim()
        .parse()?;
    let mut freed = Vec::new();
    let mut group_end = 0u64;
    let mut used_end = 0u64;
    for line in dump.lines().map(str::trim) {
        // Group headers look like "Group 3: (Blocks …)"; "Group descriptor size:" does not.
        if let Some(g) = line
            .strip_prefix("Group ")
            .and_then(|r| r.split_once(':'))
            .and_then(|(g, _)| g.parse::<u64>().ok())
        {
            group_end = (g + 1) * per_group;
        } else if group_end == 0 {
            continue;
        } else if let Some(unused) = line.split(", ").find_map(|part| part.strip_suffix(" unused inodes")) {
            used_end = group_end - unused.trim().parse::<u64>()?;
        } else if let Some(list) = line.strip_prefix("Free inodes:") {
            for range in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
                freed.extend(a..=b.min(used_end));
            }
        }
    }
    Ok(freed)
}

/// The kernel records the (random, temporary) mount point in the superblock's
/// `s_last_mounted`; debugfs can only overwrite it with a shorter string, not clear it. So
/// zero it in place; debugfs (run with -n, checksums unverified) then rewrites the
/// superblock checksum when it closes the filesystem.
fn zero_last_mounted(image: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const SUPERBLOCK: u64 = 1024;
    const LAST_MOUNTED: u64 = 0x88;
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    f.write_all_at(&[0u8; 64], SUPERBLOCK + LAST_MOUNTED)
        .with_context(|| format!("cannot clear s_last_mounted in {}", image.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_freed_inodes_below_the_unused_mark() {
        let dump = "Inodes per group:         4096\n\
            Free inodes:              3869\n\
            Group descriptor size:    64\n\
            Group 0: (Blocks 0-16383) csum 0xdc06 [ITABLE_ZEROED]\n  \
            12017 free blocks, 3869 free inodes, 18 directories, 3868 unused inodes\n  \
            Free inodes: 71, 229-4096\n\
            Group 1: (Blocks 16384-32767) csum 0x1 [INODE_UNINIT]\n  \
            1 free blocks, 4096 free inodes, 0 directories, 4096 unused inodes\n  \
            Free inodes: 4097-8192\n";
        assert_eq!(parse_freed_inodes(dump).unwrap(), vec![71]);
    }

    #[test]
    fn uuids_are_stable_and_distinct() {
        let v1 = semver::Version::new(1, 0, 0);
        let v2 = semver::Version::new(2, 0, 0);
        let a = derived_uuid("fs-uuid", &v1, "b");
        assert_eq!(a, derived_uuid("fs-uuid", &v1, "b"));
        assert_ne!(a, derived_uuid("fs-uuid", &v2, "b"));
        assert_ne!(a, derived_uuid("hash-seed", &v1, "b"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
