//! Crash-safe file replacement: the only way repository files are written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `path` so that a reader (or a crash) sees the old content or the new, never a mix:
/// write a temporary file beside it, fsync it, rename it over, fsync the directory.
pub fn write_atomic(path: &Path, mode: u32, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(temp_name(&name.to_string_lossy()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A hidden name beside `name`, unique per writer: the process id alone is not (every
/// container sharing a directory runs its server as PID 1), so 64 random bits follow.
pub fn temp_name(name: &str) -> String {
    use rand_core::RngCore;
    format!(
        ".{name}{TEMP_MARK}{}-{:016x}",
        std::process::id(),
        rand_core::OsRng.next_u64()
    )
}

/// `temp_name` beside `path`, in the same directory (so the rename is atomic).
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    path.with_file_name(temp_name(&path.file_name().unwrap_or_default().to_string_lossy()))
}

const TEMP_MARK: &str = ".tmp-";

/// Whether a file name is one `temp_name` made (or the publisher's scratch base image).
pub fn is_temp_name(name: &str) -> bool {
    // Older releases named them `.NAME.tmpPID`.
    let old_style = name
        .rsplit_once(".tmp")
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
    name.starts_with('.') && (name.contains(TEMP_MARK) || old_style || name.starts_with(SCRATCH_PREFIX))
}

/// Prefix of the publisher's scratch files (decompressed delta bases) in the repository.
pub const SCRATCH_PREFIX: &str = ".atom-base-";

pub fn write_atomic_bytes(path: &Path, mode: u32, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, mode, |f| f.write_all(bytes))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `create_dir_all` that also makes the new directory entries durable.
pub fn create_dir_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_synced(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(
        dir.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic_bytes(&p, 0o644, b"one").unwrap();
        write_atomic_bytes(&p, 0o644, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let failed = write_atomic(&p, 0o644, |_| Err(io::Error::other("boom")));
        assert!(failed.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
