//! Room in the state directory for downloads and decoded deltas.
//!
//! The state directory usually shares /var with the journal and the host's services, and a
//! file system the agent filled would hurt the host more than a route it skipped. So a file
//! is written only when it fits in the space unprivileged users may still use (the root
//! reserve stays free) less 1% of the file system, and a write that runs out of space
//! anyway removes its file at once.

use std::io;
use std::path::Path;

use indicatif::HumanBytes;

/// Fails with an explanation unless `need` more bytes fit in `dir`'s file system.
pub fn ensure_room(dir: &Path, need: u64, what: &str) -> Result<(), String> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("cannot check the free space in {}: {e}", dir.display()))?;
    let unit = st.fragment_size() as u64;
    let available = (st.blocks_available() as u64).saturating_mul(unit);
    let reserve = (st.blocks() as u64).saturating_mul(unit) / 100;
    if need.saturating_add(reserve) > available {
        return Err(format!(
            "not enough space in {} for {what}: it needs {}, {} is free and {} of that stays for the rest of the host",
            dir.display(),
            HumanBytes(need),
            HumanBytes(available),
            HumanBytes(reserve.min(available))
        ));
    }
    Ok(())
}

/// When a write into `file` failed because the file system (or the quota) is full: removes
/// `file` and says so. Any other error: `None`, and the file stays.
pub fn removed_if_full(file: &Path, e: &io::Error) -> Option<String> {
    if !matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
        return None;
    }
    let _ = std::fs::remove_file(file);
    Some(format!(
        "{}: {e}; the file was removed so the file system is not left full",
        file.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_need_is_refused_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        ensure_room(dir.path(), 1, "a byte").unwrap();
        let e = ensure_room(dir.path(), u64::MAX / 2, "the payload").unwrap_err();
        assert!(
            e.contains("not enough space in") && e.contains("for the payload"),
            "{e}"
        );
        let file = dir.path().join("partial");
        for (errno, full) in [
            (nix::libc::ENOSPC, true),
            (nix::libc::EDQUOT, true),
            (nix::libc::EIO, false),
        ] {
            std::fs::write(&file, b"x").unwrap();
            let said = removed_if_full(&file, &io::Error::from_raw_os_error(errno));
            assert_eq!((said.is_some(), file.exists()), (full, !full), "errno {errno}");
        }
    }
}
