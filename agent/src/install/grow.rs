//! Growing the state filesystem to its grown partition. On a running system with
//! e2fsprogs: e2fsck and resize2fs on the unmounted filesystem. In the installer's
//! initramfs, which has no e2fsprogs: the kernel's online ext4 resize (EXT4_IOC_RESIZE_FS,
//! what resize2fs uses on a mounted filesystem; it needs CAP_SYS_RESOURCE).

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags};

nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// Grows the ext4 filesystem on `device` to `bytes`; returns the new size in bytes.
pub fn grow(device: &Path, bytes: u64, scratch: &Path) -> Result<u64> {
    if Command::new("resize2fs").arg("-V").output().is_ok() {
        return offline(device, bytes);
    }
    online(device, bytes, scratch)
}

fn offline(device: &Path, bytes: u64) -> Result<u64> {
    // resize2fs wants a freshly checked filesystem; 0 and 1 are "clean" and "fixed".
    let check = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .output()
        .context("cannot run e2fsck")?;
    if !matches!(check.status.code(), Some(0 | 1)) {
        bail!(
            "e2fsck {}: {}",
            device.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    let kib = bytes / 1024;
    let out = Command::new("resize2fs")
        .arg(device)
        .arg(format!("{kib}K"))
        .output()
        .context("cannot run resize2fs")?;
    if !out.status.success() {
        bail!(
            "resize2fs {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(kib * 1024)
}

fn online(device: &Path, bytes: u64, scratch: &Path) -> Result<u64> {
    let dir = scratch.join("state");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    nix::mount::mount(Some(device), &dir, Some("ext4"), MsFlags::MS_NOATIME, None::<&str>)
        .with_context(|| format!("cannot mount {} (ext4) to grow it", device.display()))?;
    let result = (|| -> Result<u64> {
        let stat = nix::sys::statvfs::statvfs(&dir).context("statvfs")?;
        let block = stat.fragment_size();
        let blocks: u64 = bytes / block;
        let f = File::open(&dir)?;
        // SAFETY: the argument is a u64 block count, as EXT4_IOC_RESIZE_FS expects.
        unsafe { ext4_resize_fs(f.as_raw_fd(), &blocks) }.context("EXT4_IOC_RESIZE_FS")?;
        Ok(blocks * block)
    })();
    let unmounted = nix::mount::umount2(&dir, MntFlags::empty()).context("cannot unmount the state filesystem");
    let grown = result?;
    unmounted?;
    Ok(grown)
}
