//! Mount helpers with messages that say what failed.

use std::path::Path;

use nix::mount::{MsFlags, mount};

pub fn mount_fs(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("cannot mount {source} ({fstype}) on {}: {e}", target.display()))
}

pub fn bind(source: &Path, target: &Path) -> Result<(), String> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("cannot bind {} on {}: {e}", source.display(), target.display()))
}

pub fn move_mount(source: &Path, target: &Path) -> Result<(), String> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move {} to {}: {e}", source.display(), target.display()))
}

/// Detaches `target` and everything mounted below it; nothing there is an error.
pub fn detach(target: &Path) {
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
}

/// Binds `source` on `target` with nosuid and nodev: a bind inherits the flags of the
/// source's mount only in the kernel's view of the first mount, so they are set again.
pub fn bind_restricted(source: &Path, target: &Path) -> Result<(), String> {
    bind(source, target)?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make {} nosuid,nodev: {e}", target.display()))
}

/// A read-only bind of `source` on `target` (also nosuid, nodev, noexec): the remount that
/// sets the flags must name MS_RDONLY, or the bind is writable even over a read-only mount.
pub fn bind_readonly(source: &Path, target: &Path) -> Result<(), String> {
    bind(source, target)?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make {} read-only: {e}", target.display()))
}
