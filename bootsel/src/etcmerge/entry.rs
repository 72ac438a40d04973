//! One entry of an `/etc` tree or overlay layer, and whether two entries are the same.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Extended attributes overlayfs keeps for itself: they describe a layer, not the file,
/// and must not travel to another layer (except the opaque mark of a directory).
const OVERLAY_XATTRS: &str = "trusted.overlay.";
pub const OPAQUE: &str = "trusted.overlay.opaque";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    /// An overlayfs whiteout: a character device 0:0 in the upper layer (deleted locally).
    Whiteout,
    /// Sockets, FIFOs, device nodes (file type bits and device number): kept as they are.
    Special(u32, u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    /// The entry at `path` (not following a symlink), or `None` if there is none.
    pub fn of(path: &Path) -> io::Result<Option<Meta>> {
        let m = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let t = m.file_type();
        let kind = if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink(fs::read_link(path)?)
        } else if t.is_char_device() && m.rdev() == 0 {
            Kind::Whiteout
        } else {
            Kind::Special(m.mode() & libc::S_IFMT, m.rdev())
        };
        Ok(Some(Meta {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }))
    }
}

/// The extended attributes that belong to the entry itself, sorted.
pub fn xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        // A file system without xattrs (tmpfs without user xattrs, some test mounts).
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let Some(name) = name.to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with(OVERLAY_XATTRS) {
            continue;
        }
        if let Some(v) = xattr::get(path, &name)? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

pub fn is_opaque(path: &Path) -> bool {
    matches!(xattr::get(path, OPAQUE), Ok(Some(v)) if v == b"y")
}

fn same_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Same type, mode, owner, extended attributes and (for files) bytes; two absent entries
/// are the same too. Directories compare by their own metadata only.
pub fn same(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (Meta::of(a)?, Meta::of(b)?);
    match (&ma, &mb) {
        (None, None) => return Ok(true),
        (Some(x), Some(y)) if x == y => {}
        _ => return Ok(false),
    }
    let m = ma.expect("both present");
    if matches!(m.kind, Kind::Whiteout | Kind::Special(..)) {
        return Ok(true);
    }
    if xattrs(a)? != xattrs(b)? {
        return Ok(false);
    }
    match m.kind {
        Kind::File => same_contents(a, b),
        _ => Ok(true),
    }
}

/// As [`same`], and for directories everything below them too.
pub fn same_tree(a: &Path, b: &Path) -> io::Result<bool> {
    if !same(a, b)? {
        return Ok(false);
    }
    if !fs::symlink_metadata(a).is_ok_and(|m| m.is_dir()) {
        return Ok(true);
    }
    let names = |p: &Path| -> io::Result<Vec<std::ffi::OsString>> {
        let mut v: Vec<_> = fs::read_dir(p)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    };
    let (na, nb) = (names(a)?, names(b)?);
    if na != nb {
        return Ok(false);
    }
    for n in na {
        if !same_tree(&a.join(&n), &b.join(&n))? {
            return Ok(false);
        }
    }
    Ok(true)
}
