//! Reading files of a repository tree that someone else may control: a USB stick, a
//! shared directory, a mirror synced from elsewhere.
//!
//! A hostile tree can hold a FIFO (an open that never returns), a link to `/dev/zero`
//! (a read that never ends), a sparse file of 64 GiB, or a symlink to a root-only file
//! elsewhere. So a file is opened beneath the tree's root only (the kernel resolves the
//! path with `RESOLVE_BENEATH`: no `..` or absolute symlink leads out), without blocking,
//! must be a regular file, and its size is checked before anything is read; reads are
//! bounded by that size in case the file grows.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    #[error("{0}: not found")]
    NotFound(PathBuf),
    #[error("{path}: {what}, not a regular file; refused")]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("{0}: leads out of the repository (a symlink or `..`); refused")]
    Outside(PathBuf),
    #[error("{path} is {size} bytes, more than the {limit} allowed")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path} is {size} bytes, the manifest says {expected}")]
    WrongSize { path: PathBuf, size: u64, expected: u64 },
    #[error("{path} has digest {actual}, the manifest says {expected}")]
    WrongDigest {
        path: PathBuf,
        actual: Digest,
        expected: Digest,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl LocalFileError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, LocalFileError::NotFound(_))
    }
}

/// An open regular file of the tree and its size at open time.
#[derive(Debug)]
pub struct LocalFile {
    pub file: File,
    pub size: u64,
    pub path: PathBuf,
}

fn kind_of(mode: nix::sys::stat::SFlag) -> &'static str {
    use nix::sys::stat::SFlag;
    match mode {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFDIR => "a directory",
        _ => "a special file",
    }
}

/// Opens `rel` beneath `root`: a regular file only, never blocking on the open, and never
/// opening anything else for reading (a device node's open can have effects of its own): the
/// path is resolved to an `O_PATH` handle first, checked, and only then opened.
pub fn open(root: &Path, rel: &str) -> Result<LocalFile, LocalFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(rel);
    let io_err = |source: io::Error| LocalFileError::Io {
        path: path.clone(),
        source,
    };
    // The root itself may be a FIFO on a hostile disk: a directory or nothing, at once.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NONBLOCK).bits())
        .open(root)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LocalFileError::NotFound(root.to_owned()),
            _ => LocalFileError::Io {
                path: root.to_owned(),
                source: e,
            },
        })?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let handle = match openat2(dir.as_fd(), rel, how) {
        Ok(fd) => File::from(fd),
        Err(nix::errno::Errno::ENOENT) => return Err(LocalFileError::NotFound(path)),
        Err(nix::errno::Errno::EXDEV | nix::errno::Errno::ELOOP) => return Err(LocalFileError::Outside(path)),
        // Kernels before 5.6 (or a seccomp filter) lack openat2: resolve by hand instead.
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) => return open_fallback(root, rel),
        Err(e) => return Err(io_err(e.into())),
    };
    regular(&handle, &path)?;
    // The checked handle, opened for reading through its /proc link (the same inode).
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOCTTY | OFlag::O_NONBLOCK).bits())
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(io_err)?;
    finish_open(file, path)
}

/// Refuses anything but a regular file, from its handle.
fn regular(handle: &File, path: &Path) -> Result<(), LocalFileError> {
    let stat = nix::sys::stat::fstat(handle).map_err(|e| LocalFileError::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let kind = nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode) & nix::sys::stat::SFlag::S_IFMT;
    if kind != nix::sys::stat::SFlag::S_IFREG {
        return Err(LocalFileError::NotRegular {
            path: path.to_owned(),
            what: kind_of(kind),
        });
    }
    Ok(())
}

fn finish_open(file: File, path: PathBuf) -> Result<LocalFile, LocalFileError> {
    regular(&file, &path)?;
    let stat = nix::sys::stat::fstat(&file).map_err(|e| LocalFileError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    // Back to blocking reads (O_NONBLOCK means nothing for regular files, but be plain).
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| LocalFileError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.remove(OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| LocalFileError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    Ok(LocalFile {
        file,
        size: stat.st_size as u64,
        path,
    })
}

fn open_fallback(root: &Path, rel: &str) -> Result<LocalFile, LocalFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(rel);
    let canon_root = root.canonicalize().map_err(|e| LocalFileError::Io {
        path: root.to_owned(),
        source: e,
    })?;
    let canon = match path.canonicalize() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LocalFileError::NotFound(path)),
        Err(e) => return Err(LocalFileError::Io { path, source: e }),
    };
    if !canon.starts_with(&canon_root) {
        return Err(LocalFileError::Outside(path));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_NOFOLLOW).bits())
        .open(&canon)
        .map_err(|e| LocalFileError::Io {
            path: path.clone(),
            source: e,
        })?;
    finish_open(file, path)
}

/// The whole of a small file (a manifest, a signature), at most `limit` bytes.
pub fn read_bounded(root: &Path, rel: &str, limit: u64) -> Result<Vec<u8>, LocalFileError> {
    let f = open(root, rel)?;
    if f.size > limit {
        return Err(LocalFileError::TooLarge {
            path: f.path,
            size: f.size,
            limit,
        });
    }
    let mut out = Vec::with_capacity(f.size as usize);
    (&f.file)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|source| LocalFileError::Io {
            path: f.path.clone(),
            source,
        })?;
    if out.len() as u64 > limit {
        return Err(LocalFileError::TooLarge {
            path: f.path,
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Opens a manifest-named file and checks its size before reading a byte of it.
pub fn open_sized(root: &Path, rel: &str, expected: u64) -> Result<LocalFile, LocalFileError> {
    let f = open(root, rel)?;
    if f.size != expected {
        return Err(LocalFileError::WrongSize {
            path: f.path,
            size: f.size,
            expected,
        });
    }
    Ok(f)
}

/// Checks a manifest-named file: size first (from the open file), then the digest of at
/// most that many bytes. Returns the file rewound to its start.
pub fn check(root: &Path, rel: &str, expected_size: u64, expected: &Digest) -> Result<LocalFile, LocalFileError> {
    let mut f = open_sized(root, rel, expected_size)?;
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| LocalFileError::Io { path, source }
    };
    let (actual, len) = Digest::of_reader((&f.file).take(expected_size + 1)).map_err(io_err(&f.path))?;
    if len != expected_size {
        return Err(LocalFileError::WrongSize {
            path: f.path,
            size: len,
            expected: expected_size,
        });
    }
    if &actual != expected {
        return Err(LocalFileError::WrongDigest {
            path: f.path,
            actual,
            expected: *expected,
        });
    }
    use std::io::Seek;
    f.file.rewind().map_err(io_err(&f.path))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/ok"), b"hello").unwrap();
        d
    }

    #[test]
    fn regular_files_inside_are_read() {
        let d = tree();
        assert_eq!(read_bounded(d.path(), "sub/ok", 5).unwrap(), b"hello");
        std::os::unix::fs::symlink("ok", d.path().join("sub/inner-link")).unwrap();
        assert_eq!(read_bounded(d.path(), "sub/inner-link", 5).unwrap(), b"hello");
        let f = check(d.path(), "sub/ok", 5, &Digest::of(b"hello")).unwrap();
        assert_eq!(f.size, 5);
    }

    #[test]
    fn special_files_and_escapes_are_refused_without_reading() {
        let d = tree();
        std::os::unix::fs::symlink("/dev/zero", d.path().join("zero")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../etc/hostname", d.path().join("sub/rel")).unwrap();
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        for (rel, want) in [
            ("zero", "leads out"),
            ("abs", "leads out"),
            ("sub/rel", "leads out"),
            ("fifo", "a FIFO"),
        ] {
            let e = read_bounded(d.path(), rel, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(want), "{rel}: {e}");
        }
        assert!(read_bounded(d.path(), "missing", 10).unwrap_err().is_not_found());
        // The repository root itself a FIFO: refused at once, not a hang.
        let e = read_bounded(&d.path().join("fifo"), "x", 10).unwrap_err().to_string();
        assert!(e.contains("fifo"), "{e}");
        assert!(
            read_bounded(d.path(), "sub", 10)
                .unwrap_err()
                .to_string()
                .contains("a directory")
        );
    }

    #[test]
    fn sizes_are_checked_before_reading() {
        let d = tree();
        let big = File::create(d.path().join("sparse")).unwrap();
        big.set_len(64 << 30).unwrap();
        let t = std::time::Instant::now();
        let e = check(d.path(), "sparse", 10, &Digest::of(b"x")).unwrap_err();
        assert!(
            matches!(e, LocalFileError::WrongSize { size, .. } if size == 64 << 30),
            "{e}"
        );
        let e = read_bounded(d.path(), "sparse", 1 << 20).unwrap_err();
        assert!(matches!(e, LocalFileError::TooLarge { .. }), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "nothing was read");
        let e = check(d.path(), "sub/ok", 5, &Digest::of(b"other")).unwrap_err();
        assert!(matches!(e, LocalFileError::WrongDigest { .. }), "{e}");
    }
}
