//! Copies of layer entries that keep what overlayfs and the system care about: type,
//! bytes, mode, owner, extended attributes and modification time.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::sys::time::TimeSpec;

use super::entry::{self, Kind, Meta};

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn own(dst: &Path, m: &Meta) -> io::Result<()> {
    std::os::unix::fs::lchown(dst, Some(m.uid), Some(m.gid))
}

fn times(src: &Path, dst: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(src)?;
    let t = [
        TimeSpec::new(md.atime(), md.atime_nsec()),
        TimeSpec::new(md.mtime(), md.mtime_nsec()),
    ];
    nix::sys::stat::utimensat(
        AT_FDCWD,
        dst,
        &t[0],
        &t[1],
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io_err)
}

fn copy_xattrs(src: &Path, dst: &Path, with_opaque: bool) -> io::Result<()> {
    for (name, value) in entry::xattrs(src)? {
        xattr::set(dst, &name, &value)?;
    }
    if with_opaque && entry::is_opaque(src) {
        xattr::set(dst, entry::OPAQUE, b"y")?;
    }
    Ok(())
}

/// Copies one entry (not a directory's contents) from `src` to the new path `dst`.
pub fn entry(src: &Path, dst: &Path) -> io::Result<()> {
    let m = Meta::of(src)?.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, src.display().to_string()))?;
    match &m.kind {
        Kind::File => {
            fs::copy(src, dst)?;
        }
        Kind::Dir => fs::create_dir(dst)?,
        Kind::Symlink(target) => std::os::unix::fs::symlink(target, dst)?,
        Kind::Whiteout => return whiteout(dst, &m),
        Kind::Special(..) => {
            let md = fs::symlink_metadata(src)?;
            let kind = SFlag::from_bits_truncate(md.mode() & libc::S_IFMT);
            mknod(dst, kind, Mode::from_bits_truncate(m.mode), md.rdev()).map_err(io_err)?;
        }
    }
    own(dst, &m)?;
    if !matches!(m.kind, Kind::Symlink(_)) {
        // After chown, which clears setuid/setgid bits.
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode))?;
    }
    copy_xattrs(src, dst, m.kind == Kind::Dir)?;
    times(src, dst)
}

/// An overlayfs whiteout at `dst`: the file stays deleted over the lower layer.
pub fn whiteout(dst: &Path, m: &Meta) -> io::Result<()> {
    mknod(dst, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(io_err)?;
    own(dst, m)
}

/// Copies `src` and, for a directory, everything below it.
pub fn tree(src: &Path, dst: &Path) -> io::Result<()> {
    entry(src, dst)?;
    if fs::symlink_metadata(src)?.is_dir() {
        for e in fs::read_dir(src)? {
            let e = e?;
            tree(&e.path(), &dst.join(e.file_name()))?;
        }
        // The children changed the directory's time stamps: set them again.
        times(src, dst)?;
    }
    Ok(())
}
